"""One training loop for backbones, side-information models and transformations.

SGD or AdamW, per-step cosine schedule with linear warm-up, bf16 autocast and channels_last on
GPU, a progress bar, an atomic checkpoint after every epoch and resume from the last one. Each
epoch reseeds torch from (seed, epoch) and the loaders shuffle and augment from (seed, epoch),
so a resumed run continues exactly where an uninterrupted one would be (on CPU).

Under torchrun (fct.distributed) the same loop trains with DistributedDataParallel: the step
function gets the DDP-wrapped module, every rank feeds its slice of each global batch, the
loss that is logged and checked for NaN is the mean over ranks, and rank 0 alone reads and
writes checkpoints (a resume broadcasts its weights and optimizer state to the others).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fct import distributed
from fct.errors import FCTError
from fct.io import atomic_dir, sha256_file, write_safetensors
from fct.seeding import derive_seed, isolated_rng  # noqa: F401  (isolated_rng: re-exported)
from fct.threads import adapt_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule of one training run."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: float = 1.0


@dataclass
class TrainResult:
    """What a finished training reports."""

    seconds: float  # wall time of this process's share (resumed epochs not counted twice)
    epochs: int
    last_loss: float
    resumed_from: int  # epochs found in a checkpoint (0 = fresh start)
    images_per_s: float


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser named in ``cfg``."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        # The FCT reference trains h with Adam and L2 weight decay.
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise FCTError(f"unknown optimizer '{cfg.optimizer}'; choose sgd, adamw or adam")


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed used for ``epoch`` (dropout, init of lazily built parts, ...)."""
    return derive_seed("epoch", seed, epoch)


# --- checkpoints ------------------------------------------------------------------------------


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus JSON for everything else."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in extra["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": extra["param_groups"]}


CKPT_FILES = ("model.safetensors", "optim.safetensors")
#: Largest ``state.json`` read back: ours hold a few optimizer scalars (a few KB).
STATE_LIMIT = 16 << 20


def save_checkpoint(
    folder: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer, info: dict
) -> None:
    """Write ``folder/epoch-NNNN`` atomically (temp dir + rename), then drop older ones.

    ``state.json`` holds the sha256 of both tensor files and is written last, so a checkpoint
    is used only when complete and unaltered (``load_checkpoint`` checks the sums).
    """
    final = folder / f"epoch-{epoch:04d}"
    # A folder already at `final` is a damaged checkpoint of this epoch that load_checkpoint
    # skipped; ours replaces it (the caller holds the artifact's lock: no one else writes here).
    with atomic_dir(
        final,
        prefix=".ckpt.",
        where=f"checkpoints to {folder}",
        fix="free disk space or set FCT_CACHE (or --cache) to a writable folder",
        disk_full=f"no space left on device while checkpointing to {folder}; free disk space and rerun: training resumes from the last complete epoch",
    ) as tmp:
        write_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            tmp / "model.safetensors",
        )
        opt_tensors, opt_extra = _flatten_optimizer(opt)
        write_safetensors(opt_tensors, tmp / "optim.safetensors")
        sums = {f: sha256_file(tmp / f) for f in CKPT_FILES}
        (tmp / "state.json").write_text(
            json.dumps({"epoch": epoch, "optim": opt_extra, "sha256": sums, **info}, default=float)
        )
    for old in folder.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _check_checkpoint(ckpt: Path, max_epoch: int | None = None) -> dict:
    """The checkpoint's state.json, after checking its shape and both tensor files' sha256.

    Raises ValueError for a checkpoint that is incomplete, altered, of the wrong shape (a
    ``state.json`` of ``[]``, an epoch that is not this folder's or beyond ``max_epoch``) or
    from an older format (no sums), so nothing unverified is ever handed to the loader. Files
    are read only when they are regular files (no symlink is followed, no FIFO blocks), and
    ``state.json`` is read bounded.
    """
    from fct.io import check_sums, read_json

    if ckpt.is_symlink() or not ckpt.is_dir():
        raise ValueError("not a folder")
    try:
        state = read_json(ckpt / "state.json", max_bytes=STATE_LIMIT)
    except FCTError as e:
        # Its message ends in advice to the user ("; delete it and rerun"); here the
        # checkpoint is simply skipped, so only the finding is kept.
        raise ValueError(str(e).split("; ")[0]) from e
    if not isinstance(state, dict):
        raise ValueError("state.json is not a JSON object")
    epoch = state.get("epoch")
    # bool is an int subclass: true is not epoch 1.
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError(f"state.json has no valid epoch ({epoch!r})")
    if ckpt.name != f"epoch-{epoch:04d}":
        raise ValueError(f"state.json says epoch {epoch}, the folder is {ckpt.name}")
    if max_epoch is not None and epoch > max_epoch:
        raise ValueError(f"epoch {epoch} is beyond the {max_epoch} epochs of this training")
    optim = state.get("optim")
    if not (
        isinstance(optim, dict)
        and isinstance(optim.get("scalars"), dict)
        and all(isinstance(v, dict) for v in optim["scalars"].values())
        and isinstance(optim.get("param_groups"), list)
        and all(isinstance(g, dict) for g in optim["param_groups"])
    ):
        raise ValueError("state.json has no valid optimizer state")
    sums = state.get("sha256")
    if not isinstance(sums, dict):
        raise ValueError("no checksums in state.json")
    for f in CKPT_FILES:
        if not isinstance(sums.get(f), str):
            raise ValueError(f"no checksum of {f} in state.json")
    problem = check_sums(ckpt, {f: (sums[f], None) for f in CKPT_FILES})
    if problem is not None:
        raise ValueError(problem)
    return state


def clean_stale_temps(folder: Path) -> None:
    """Remove ``.ckpt.*`` temp dirs a killed process left in ``folder``.

    Only the holder of the artifact's lock writes checkpoints, so any temp dir found by the
    holder is debris of a crash, never a write in progress.
    """
    for tmp in folder.glob(".ckpt.*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    max_epoch: int | None = None,
) -> int:
    """Restore the newest complete, verified checkpoint in ``folder``; return its epoch (0: none).

    A checkpoint that is damaged (checksum mismatch, truncated, unreadable, a ``state.json`` of
    the wrong shape, an epoch beyond ``max_epoch``) is skipped with a one-line warning, and the
    next older one is tried; with none left training starts over. Something that is not a
    folder where a checkpoint should be is removed, so the next checkpoint can take its place.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not folder.is_dir():
        return 0
    clean_stale_temps(folder)
    # A load that fails half-way must not leave half-restored weights behind: a fresh start
    # has to begin from the model's own initial weights to match an uninterrupted run.
    model_start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_start = copy.deepcopy(opt.state_dict())
    for ckpt in sorted(folder.glob("epoch-*"), reverse=True):
        try:
            state = _check_checkpoint(ckpt, max_epoch)
            model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            opt.load_state_dict(
                _unflatten_optimizer(load_file(str(ckpt / "optim.safetensors")), state["optim"])
            )
            return state["epoch"]
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            RuntimeError,
            SafetensorError,
        ) as e:
            # TypeError and friends: a state.json whose sums match but whose optimizer state
            # torch cannot take (crafted, or from another optimizer): damage like any other.
            log.warning("checkpoint %s is damaged or unreadable (%s); ignoring it", ckpt, e)
            model.load_state_dict(model_start)
            opt.load_state_dict(opt_start)
            if ckpt.is_symlink() or not ckpt.is_dir():
                # save_checkpoint replaces a folder at its target but cannot replace a file or
                # a symlink there; it holds no checkpoint of ours either way.
                with contextlib.suppress(OSError):
                    ckpt.unlink()
    return 0


# --- the loop ---------------------------------------------------------------------------------


def _resume(
    checkpoint_dir: Path | None,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    max_epoch: int | None = None,
) -> int:
    """Load the last checkpoint (rank 0) and hand weights and optimizer state to every rank."""
    start = (
        load_checkpoint(checkpoint_dir, model, opt, max_epoch)
        if checkpoint_dir and distributed.is_main()
        else 0
    )
    if not distributed.active():
        return start
    start = distributed.broadcast_json(start)
    if start:
        # DDP broadcasts rank 0's weights when it wraps the model; the optimizer state (SGD
        # momentum, Adam moments) must match too, or the ranks' updates would drift apart.
        tensors, extra = _flatten_optimizer(opt) if distributed.is_main() else (None, None)
        tensors = distributed.broadcast_tensors(tensors)
        extra = distributed.broadcast_json(extra)
        if not distributed.is_main():
            opt.load_state_dict(_unflatten_optimizer(tensors, extra))
    return start


def _wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """``model`` as trained by this process: itself, or DistributedDataParallel under torchrun."""
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        if device.type == "cuda":
            # In place for every BatchNorm below the top level; the weights stay shared.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning(
                "sync_bn needs GPUs (NCCL); on the CPU each rank keeps its own BatchNorm statistics"
            )
    # static_graph: the parameters a step uses are the same every step, found once in the
    # first; a loss that ignores some of them (SupCon never uses the classifier) then works
    # without a per-step search for unused parameters.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
    )


def train(
    model: nn.Module,
    step_loss: Callable[[Any, nn.Module], torch.Tensor],
    batches: Callable[[int], Iterable[Any]],
    steps_per_epoch: int,
    cfg: OptimConfig,
    *,
    device: torch.device,
    seed: int,
    desc: str,
    checkpoint_dir: Path | None = None,
    params: Iterable[nn.Parameter] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    items_per_batch: Callable[[Any], int] | None = None,
    sync_bn: bool = False,
) -> TrainResult:
    """Train ``model`` for ``cfg.epochs`` epochs.

    ``batches(epoch)`` yields the epoch's batches (under torchrun: this rank's slices of them);
    ``step_loss(batch, net)`` returns the scalar loss, computed by calling ``net`` (``model``
    itself, or its DistributedDataParallel wrapper under torchrun: call it, not its methods),
    under the autocast set here. ``on_epoch_start(epoch)`` runs before each epoch (e.g. to
    freeze BatchNorm late in training). A non-finite loss stops training with an FCTError
    naming the learning rate; the last good checkpoint is kept. ``sync_bn`` turns BatchNorm
    into SyncBatchNorm under torchrun on GPUs.
    """
    from tqdm import tqdm

    model.to(device)
    opt = make_optimizer(params if params is not None else model.parameters(), cfg)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    start = _resume(checkpoint_dir, model, opt, cfg.epochs)
    net = _wrap(model, device, sync_bn)
    if start:
        log.info(
            "%s: resuming from the checkpoint of epoch %d/%d in %s",
            desc,
            start,
            cfg.epochs,
            checkpoint_dir,
        )
    cuda = device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    t0 = time.perf_counter()
    seen = 0
    last = float("nan")
    try:
        for epoch in range(start, cfg.epochs):
            if epoch > start:
                adapt_threads()  # follow the machine's load (fct.threads)
            # Each rank draws its own dropout masks and the like (rank 0 as a single process would).
            torch.manual_seed(epoch_seed(seed, epoch) + distributed.rank())
            if on_epoch_start:
                on_epoch_start(epoch)
            model.train()
            if on_epoch_start:  # model.train() may undo what the callback set; run it again
                on_epoch_start(epoch)
            bar = tqdm(
                batches(epoch),
                total=steps_per_epoch,
                desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=distributed.quiet(),
                file=sys.stderr,
            )
            e0, wait, running, n, epoch_items = time.perf_counter(), 0.0, 0.0, 0, 0
            w0 = time.perf_counter()
            for i, batch in enumerate(bar):
                wait += time.perf_counter() - w0
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch * steps_per_epoch + i, total, warmup, cfg.lr)
                with autocast:
                    loss = step_loss(batch, net)
                # The mean over ranks, so every rank takes the same decision below.
                mean_loss = distributed.all_reduce_mean(loss)
                if not torch.isfinite(mean_loss):
                    kept = (
                        f"the checkpoint of epoch {epoch} is kept"
                        if epoch
                        else "no epoch had finished"
                    )
                    raise FCTError(
                        f"loss became {mean_loss.item()} at epoch {epoch + 1}, step {i + 1} while training {desc}; "
                        f"{kept}; lower the learning rate (now lr = {cfg.lr}) in the suite file and rerun"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += float(mean_loss)
                n += 1
                epoch_items += items_per_batch(batch) if items_per_batch else 0
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{running / n:.4f}")
                w0 = time.perf_counter()
            bar.close()
            last = running / max(1, n)
            dt = time.perf_counter() - e0
            epoch_items = int(distributed.all_reduce_sum(epoch_items))  # every rank's images
            seen += epoch_items
            log.info(
                "%s epoch %d/%d: loss %.4f, %.1fs, %.0f items/s%s, %.0f%% waiting for data",
                desc,
                epoch + 1,
                cfg.epochs,
                last,
                dt,
                epoch_items / max(dt, 1e-9),
                f" over {distributed.world()} processes" if distributed.world() > 1 else "",
                100 * wait / max(dt, 1e-9),
            )
            # No checkpoint after the last epoch: the caller writes the finished model at once
            # (a crash in between redoes only that epoch, with the same seeds, to the same end).
            if checkpoint_dir and distributed.is_main() and epoch + 1 < cfg.epochs:
                save_checkpoint(checkpoint_dir, epoch + 1, model, opt, {"loss": last})
    finally:
        if net is not model:
            # Free DDP's reducer now, while the process group is up: left to the garbage
            # collector it may be destroyed after the group is, which aborts the process.
            del net
            gc.collect()
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(seconds, cfg.epochs, last, start, seen / seconds if seconds > 0 else 0.0)

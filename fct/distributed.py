"""Running under torchrun: process group, rank roles, and the few collectives fct needs.

``torchrun --nproc-per-node N -m fct run SUITE ...`` (or ``fct run SUITE --nproc N``, which
launches exactly that) starts N copies of the same program. Every copy walks the same plan in
the same order (scenarios, methods, artifacts), so the collectives below line up:

- training: every rank trains (DistributedDataParallel, each rank a contiguous slice of every
  global batch), rank 0 alone writes checkpoints;
- cache: rank 0 takes the artifact's lock, decides hit or build and tells the others; on a
  hit every rank reads the entry (the cache folder must be shared by all nodes), on a build
  every rank takes part and rank 0 alone saves it;
- feature extraction: each rank embeds a contiguous shard, ``all_gather_rows`` puts them
  back in order on every rank;
- evaluation, run records and reports: rank 0 alone.

Outside torchrun (no ``WORLD_SIZE`` in the environment) every function here is a cheap no-op
for one process, so single-process code paths are unchanged.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from fct.errors import FCTError

log = logging.getLogger(__name__)

# How long a collective may wait for a slow rank (a rank 0 training an artifact alone never
# happens: every rank trains). Generous, because rank 0 may spend minutes writing a report.
TIMEOUT = datetime.timedelta(minutes=60)


def launched() -> bool:
    """True inside a process started by torchrun (it sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    """True once the process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0))


def world() -> int:
    """Number of processes (1 outside torchrun)."""
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank within this node (picks the GPU)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world() -> int:
    """Processes on this node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world()))


def is_main() -> bool:
    """Rank 0: the one process that writes artifacts, records, reports and logs."""
    return rank() == 0


def quiet() -> bool | None:
    """``disable`` for tqdm: progress bars on rank 0 only (None = tqdm's own tty check)."""
    return True if not is_main() else None


def setup(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    ``device_name`` is ``auto``, ``cpu`` or ``cuda[:N]``. Under torchrun a CUDA run uses
    GPU ``LOCAL_RANK`` with NCCL, a CPU run gloo. Idempotent (``--seeds`` calls it per seed).
    """
    from fct.device import resolve_device

    device = resolve_device(device_name)
    if not launched():
        return device
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise FCTError(
                f"LOCAL_RANK {local_rank()} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
        log.info(
            "distributed: rank %d of %d (local %d of %d), %s backend, device %s",
            rank(),
            world(),
            local_rank(),
            local_world(),
            backend,
            device,
        )
    return device


def teardown() -> None:
    """Leave the process group (after the last collective)."""
    if active():
        import gc

        gc.collect()  # DDP wrappers still awaiting collection go while the group is up
        dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors.
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank."""
    if active():
        dist.barrier()


def broadcast_json(obj=None, src: int = 0):
    """``obj`` from rank ``src`` to every rank, as JSON (no pickle): returns it everywhere."""
    if not active():
        return obj
    dev = _comm_device()
    if rank() == src:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    dist.broadcast(size, src)
    buf = (
        payload.to(dev) if rank() == src else torch.empty(int(size), dtype=torch.uint8, device=dev)
    )
    dist.broadcast(buf, src)
    return obj if rank() == src else json.loads(bytes(buf.cpu().numpy()).decode())


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int = 0) -> dict:
    """A dict of tensors from rank ``src`` to every rank (names, shapes and dtypes first)."""
    if not active():
        return tensors or {}
    spec = None
    if rank() == src:
        spec = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()]
    spec = broadcast_json(spec, src)
    dev = _comm_device()
    out = {}
    for name, shape, dtype in spec:
        if rank() == src:
            t = tensors[name].detach().to(dev).contiguous()
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
        dist.broadcast(t, src)
        out[name] = t.cpu()
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (scalar) tensor over ranks, on every rank (a copy; detached)."""
    if not active():
        return value.detach()
    t = value.detach().float().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / world()


def all_reduce_sum(value: float) -> float:
    """The sum of a Python number over ranks."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def shard(n: int) -> tuple[int, int]:
    """This rank's contiguous slice ``[start, stop)`` of ``n`` items (sizes differ by <= 1)."""
    w, r = world(), rank()
    return r * n // w, (r + 1) * n // w


def all_gather_rows(part: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's ``shard(n)`` rows in rank order: the full ``[n, ...]`` tensor."""
    if not active():
        return part
    w = world()
    bounds = [(r * n // w, (r + 1) * n // w) for r in range(w)]
    longest = max(b - a for a, b in bounds)
    dev = _comm_device()
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=dev)
    padded[: len(part)] = part.to(dev)
    pieces = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(pieces, padded)
    return torch.cat([p[: b - a].cpu() for p, (a, b) in zip(pieces, bounds)])


def local_batch(global_batch: int, what: str) -> int:
    """Each rank's share of a global batch; the global batch must split evenly."""
    w = world()
    if global_batch % w:
        raise FCTError(
            f"{what}: batch_size {global_batch} does not split over {w} processes; "
            f"use a number of processes that divides it or set batch_size to a multiple of {w}"
        )
    return global_batch // w


def check_shared_folder(folder: Path, what: str, option: str) -> None:
    """Every rank must see what rank 0 writes to ``folder`` (the cache is read by all ranks).

    Rank 0 writes a token file; the others look for it. Raises on every rank when any rank
    cannot see it (the usual cause: a node-local path on a multi-node run).
    """
    if not active() or world() == 1:
        return
    token = folder / f".shared-check-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        token.write_text(str(os.getpid()))
    barrier()
    seen = all_reduce_sum(1.0 if token.exists() else 0.0)
    barrier()
    if is_main():
        token.unlink(missing_ok=True)
    if seen < world():
        raise FCTError(
            f"{what} {folder} is not shared by all {world()} processes ({int(seen)} see it); "
            f"put {option} on a file system every node mounts"
        )


def torchrun_command(nproc: int, program: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N PROGRAM...``
    (``program``: a script and its arguments, or ``-m module ...``)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *program,
    ]


def launch(nproc: int, fct_args: Sequence[str]) -> int:
    """Run ``fct ARGS`` under torchrun with ``nproc`` processes on this node; its exit status.

    With several processes on a CPU, each gets an equal share of the cores as its torch
    threads (unless OMP_NUM_THREADS is set), or they would oversubscribe the machine.
    """
    if nproc < 1:
        raise FCTError(f"--nproc must be at least 1, got {nproc}")
    if launched():
        raise FCTError("--nproc is for launching; this process already runs under torchrun")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = torchrun_command(nproc, ["-m", "fct", *fct_args])
    log.info("launching %d processes: %s", nproc, " ".join(cmd[1:]))
    return subprocess.run(cmd, env=env).returncode

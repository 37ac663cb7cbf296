"""What tests/e2e/test_distributed.py runs under torchrun (and once in a single process).

Trains a BatchNorm-free embedding model with fct.train.train on a synthetic split (shuffled,
no augmentation), interrupted after the second epoch and resumed from its checkpoint; then
builds a cache entry by sharded embedding + all_gather_rows through Cache.get_or_build, twice
(build, then hit). Without BatchNorm or augmentation, DDP over W ranks computes the same
updates as one process with the same global batch, so the final weights must agree up to
float rounding. Writes OUT/rank{R}.safetensors with the weights and the gathered embeddings.

Usage: python tests/helpers/ddp_worker.py OUT CACHE   (under torchrun or alone)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fct import distributed
from fct.artifacts import Cache
from fct.context import embed_loader
from fct.data import make_loader, make_synthetic
from fct.train import OptimConfig, train

GLOBAL_BATCH = 32
CFG = OptimConfig("sgd", 0.05, 0.9, 5e-4, epochs=3, warmup_epochs=0.5)


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> embedding, plus a bias-free classifier and a layer no loss
    uses; no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16))
        self.classifier = nn.Linear(16, 6, bias=False)
        self.unused = nn.Linear(4, 4)  # never in the loss (like SupCon's classifier)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.body(x)
        return e, self.classifier(e)


class Stop(Exception):
    """Raised on every rank at the same point to simulate an interruption."""


def main(out: Path, cache_dir: Path) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    rank, world = distributed.rank(), distributed.world()
    src = make_synthetic(num_classes=6, per_class=16, image_size=16, channels=1, seed=0)
    loader = make_loader(
        src,
        distributed.local_batch(GLOBAL_BATCH, "mlp"),
        shuffle=True,
        seed=0,
        drop_last=True,
        rank=rank,
        world=world,
    )
    torch.manual_seed(0)
    model = MLP()

    def batches(epoch: int):
        loader.set_epoch(epoch)
        return loader

    def step(batch, net):
        x, y = batch
        return nn.functional.cross_entropy(net(x)[1], y)

    def stop_after_two(epoch: int) -> None:
        if epoch == 2:
            raise Stop

    ckpt = cache_dir / "partial" / "mlp"
    # sync_bn: no BatchNorm here, and on the CPU it is skipped with a warning anyway.
    kwargs = dict(device=torch.device("cpu"), seed=0, desc="mlp", checkpoint_dir=ckpt, sync_bn=True)
    with contextlib.suppress(Stop):
        train(model, step, batches, len(loader), CFG, on_epoch_start=stop_after_two, **kwargs)
    # Resume in a fresh model: rank 0 reads the checkpoint and hands it to the others.
    torch.manual_seed(1)
    model = MLP()
    result = train(model, step, batches, len(loader), CFG, **kwargs)
    assert result.resumed_from == 2, result

    cache = Cache(cache_dir)
    entry = cache.entry("features", "mlp-embeddings", {"test": 1})

    def build(e):
        start, stop = distributed.shard(len(src))
        part = make_loader(src.subset(range(start, stop)), 20, shuffle=False, seed=0)
        feats = distributed.all_gather_rows(
            embed_loader(model, part, torch.device("cpu")), len(src)
        )
        return {"features": feats}, {"n": len(src)}

    first, meta, built = cache.get_or_build(entry, build)
    assert built and meta["n"] == len(src), meta
    again, _, built = cache.get_or_build(entry, build)
    assert not built and torch.equal(first["features"], again["features"])

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"w.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["features"] = first["features"].contiguous()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

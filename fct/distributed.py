"""Multi-process runs under torchrun: process group, rank helpers, sharding and gathering.

``fct run SUITE --nproc N`` re-launches itself under ``torch.distributed.run`` (torchrun); any
torchrun command line works too (multi-node with the usual ``--nnodes``/``--rdzv-*``
arguments). Every rank runs the same code in lock-step:

- training is DistributedDataParallel; each global batch (the suite's ``batch_size``, for which
  the learning rate is given) is split across the ranks, so the optimisation does not change
  with the number of processes;
- cache reads happen on every rank, cache writes, run records and reports on rank 0 only;
- embeddings are computed in contiguous shards and gathered in order;
- retrieval metrics are computed on rank 0.

Outside torchrun every helper here is a cheap no-op for a world of one process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes artifacts, records and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1


def world() -> World:
    """The current job's world (one process unless launched by torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: str) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    NCCL on GPUs, gloo on CPUs. ``device`` is the user's choice (auto, cpu, cuda).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend=backend)
        w = world()
        log.info("rank %d/%d joined the %s process group", w.rank, w.size, backend)
    if use_cuda:
        return torch.device("cuda", local if size > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world().distributed:
        torch.distributed.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value produced by this code itself)."""
    if not world().distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, w: World | None = None) -> slice:
    """The contiguous slice of ``n`` items this rank handles (shards concatenate in order)."""
    w = w or world()
    per = -(-n // w.size)
    return slice(min(n, w.rank * per), min(n, (w.rank + 1) * per))


def gather_rows(part: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's ``shard(n)`` rows, in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return part
    per = -(-n // w.size)
    pad = torch.zeros((per,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
    pad[: len(part)] = part
    out = [torch.empty_like(pad) for _ in range(w.size)]
    torch.distributed.all_gather(out, pad)
    return torch.cat(out)[:n]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``fct ARGV`` under torchrun with ``nproc`` processes on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "fct", *argv]
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)

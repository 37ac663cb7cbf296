"""Random streams on the ground floor: forking torch's stream around a block (isolated_rng).

Imports nothing of fct, so the cache (fct.artifacts), the trainer (fct.train) and methods can
all use it without importing one another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block without touching the caller's torch random stream; seed it if ``seed``.

    Training reseeds torch every epoch and module initialisation draws from the global stream.
    Forking the stream around both means a model's initial weights, and everything drawn after
    it, are the same whether an artifact was trained in this process or loaded from the cache:
    that is what makes an interrupted run, resumed, end where an uninterrupted one would.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed % (2**63 - 1))
        yield

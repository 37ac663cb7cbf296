"""Random streams on the ground floor: every seed fct uses, derived in one place
(``derive_seed``), and forking torch's stream around a block (``isolated_rng``).

Imports only fct.hashing, so the cache (fct.artifacts), the trainer (fct.train), the data
loaders and the methods can all use it without importing one another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from fct.hashing import config_hash

_MAX = 2**63 - 1


def _from_hash(table: str, value: object, seed: int) -> int:
    return int(config_hash({table: value, "seed": seed}), 16)


#: Every random stream of a run, by name: what it seeds, and the formula of its seed from the
#: run's seed and the stream's parts. The formulas are those the streams had before they were
#: gathered here (changing one changes every trained artifact and record that depends on it).
STREAMS: dict[str, str] = {
    "init": "a module's initial weights; parts: what the module is (its spec, its sizes)",
    "fastfill-init": "FastFill's h with its uncertainty head; parts: spec dict, d_old, d_new, d_side",
    "method": "a method's own draws in fit(); parts: the method's run name",
    "sequence-step": "a method's draws in one update of a sequence; parts: run name, step",
    "epoch": "torch's stream during a training epoch (dropout, lazily built parts); parts: epoch",
    "shuffle": "the order of a loader's items in an epoch; parts: epoch",
    "augment": "a loader's augmentation draws in an epoch (apart from its order); parts: epoch",
    "h-batches": "the order of h's cached training embeddings in an epoch; parts: epoch",
    "curves": "the random backfilling order of the curves; no parts",
}


def derive_seed(stream: str, seed: int, *parts) -> int:
    """The seed of random stream ``stream`` (a key of ``STREAMS``) for the run's ``seed``.

    One function, so every draw a run makes is traceable to the run's seed and a named part;
    each stream keeps the formula it was introduced with, so records stay reproducible.
    """
    if stream == "init":
        return _from_hash("init", list(parts), seed)
    if stream == "fastfill-init":
        return _from_hash("fastfill", list(parts), seed)
    if stream == "method":
        (name,) = parts
        return _from_hash("method", name, seed) % _MAX
    if stream == "sequence-step":
        name, step = parts
        return int(config_hash({"method": name, "seed": seed, "step": step}), 16) % _MAX
    if stream == "epoch":
        (epoch,) = parts
        return (seed * 1_000_003 + epoch * 7919) % _MAX
    if stream == "shuffle":
        (epoch,) = parts
        return seed + epoch
    if stream == "augment":
        (epoch,) = parts
        return int(np.random.SeedSequence([seed, epoch, 1]).generate_state(1, np.uint64)[0] >> 1)
    if stream == "h-batches":
        (epoch,) = parts
        return seed * 7919 + epoch
    if stream == "curves":
        if parts:
            raise TypeError("the curves stream takes no parts")
        return seed
    raise KeyError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")


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

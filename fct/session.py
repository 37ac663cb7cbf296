"""What one ``fct run`` shares between its scenarios, and the small types handed around.

- ``Session``: the cache, the device, the seed, the data options, the data sources loaded so
  far (the checks load every split once; training reuses them) and the cache keys already
  rebuilt under ``--force`` (each once per run). The runner makes one per run and hands it to
  every scenario's Context; builders (fct.builders) and embedding (fct.embedding) take it
  explicitly.
- ``Role``: which data a model embeds (``ctx.embed(model, Role.NEW_TRAIN)``).
- ``Trained``: a trained, cached model with the key that identifies it, and accessors for
  what methods read of it (its classifier's weight, its input channels).
- ``Memo``: a Context's per-scenario memo (models, embeddings, and what the runner keeps
  between the methods of a scenario, such as the old/old evaluation).

Imports no module that imports the methods, so methods can use ``Role`` at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fct import distributed
from fct.errors import FCTError
from fct.seeding import derive_seed

if TYPE_CHECKING:
    from fct.artifacts import Cache, Entry
    from fct.data import ImageSource


class Role(StrEnum):
    """The data a model embeds: the evaluation gallery (``EVAL``: the stored items, which
    methods update and backfill) and its queries (``QUERY``), or the new or old model's
    training data. Leave-one-out (the default) makes both the whole evaluation split; a
    scenario's ``[eval]`` may name a query set apart (fct.scenarios.EvalSpec).

    A StrEnum: ``Role.NEW_TRAIN == "new-train"``, and ``Role("new-train")`` parses the strings
    plugins and older code pass to ``Context.embed``.
    """

    EVAL = "eval"
    QUERY = "query"
    NEW_TRAIN = "new-train"
    OLD_TRAIN = "old-train"

    @classmethod
    def training(cls, on: str) -> Role:
        """The training data of the ``"new"`` or ``"old"`` model (``TransformationSpec.train_on``)."""
        roles = {"new": cls.NEW_TRAIN, "old": cls.OLD_TRAIN}
        if on not in roles:
            raise FCTError(f"training data is of the 'new' or the 'old' model, got {on!r}")
        return roles[on]

    @classmethod
    def parse(cls, value: Role | str) -> Role:
        """``value`` as a Role; FCTError naming the roles for anything else."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(r.value) for r in cls)
            raise FCTError(f"unknown data role {value!r}; use one of {names}") from None


class Memo(dict):
    """A dict of things computed once per scenario, by key."""

    def get_or_build(self, key: Any, build: Callable[[], Any]) -> Any:
        """The value under ``key``, built (and kept) on the first request."""
        if key not in self:
            self[key] = build()
        return self[key]


@dataclass
class Trained:
    """A trained, cached model with the key that identifies it."""

    module: nn.Module
    entry: Entry
    train_seconds: float
    spec: Any
    built_now: bool

    @property
    def digest(self) -> str:
        """Cache digest: changes whenever anything that determines the model changes."""
        return self.entry.digest

    @property
    def name(self) -> str:
        """Human-readable artifact name."""
        return self.entry.name

    def _backbone(self) -> nn.Module:
        # A side-information model is SimCLR's wrapper around an EmbeddingModel.
        return getattr(self.module, "encoder", self.module)

    def classifier_weight(self) -> torch.Tensor:
        """The model's classifier rows ``[classes, embedding_dim]``, detached (a view of the
        module's parameter: clone it before changing it)."""
        classifier = getattr(self.module, "classifier", None)
        if classifier is None:
            raise FCTError(f"{self.name} has no classifier (a side-information model)")
        return classifier.weight.detach()

    @property
    def in_chans(self) -> int:
        """The number of image channels the model reads."""
        return int(self._backbone().in_chans)


#: Folder splits of at most this many images are decoded in the calling process: starting
#: DataLoader workers (a fork of a process that holds models: 50 ms each measured on a 2-core
#: CPU, then their first batches) costs more than decoding that many files (a few ms each).
INLINE_DECODE_MAX = 128


def loader_workers(source: Any = None) -> int:
    """DataLoader workers per process for ``source``: none for an in-memory source or a folder
    split of at most ``INLINE_DECODE_MAX`` images; otherwise this node's cores shared by its
    ranks, at least 2 and at most 8 each."""
    if source is not None and (source.images is not None or len(source) <= INLINE_DECODE_MAX):
        return 0
    return max(2, min(8, (os.cpu_count() or 4) // distributed.local_world()))


@dataclass
class Session:
    """What a run shares between its scenarios: every artifact goes through ``cache``."""

    cache: Cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    force: bool = False
    sync_bn: bool = False
    #: Loaded data sources by (dataset, split, classes, max_per_class, image size).
    sources: dict = field(default_factory=dict, repr=False)
    #: Digests of the cache entries already rebuilt under ``force`` (each once per run).
    forced: set = field(default_factory=set, repr=False)

    def source(
        self,
        dataset: str,
        split: str,
        classes: tuple[int, int] | None,
        max_per_class: int | None,
        size: int | None,
    ) -> ImageSource:
        """A dataset split (class range, items per class), at ``size`` px or its native size;
        loaded once per run."""
        from fct.data import load_dataset

        key = (dataset, split, classes, max_per_class, size)
        if key not in self.sources:
            src = load_dataset(
                dataset,
                split,
                root=self.data_root,
                classes=classes,
                max_per_class=max_per_class,
                download=self.download,
            )
            self.sources[key] = src.resized(size) if size else src
        return self.sources[key]

    def claim_force(self, digest: str) -> bool:
        """Whether the entry ``digest`` is to be rebuilt: under ``force``, the first time only."""
        force = self.force and digest not in self.forced
        self.forced.add(digest)
        return force

    def init_seed(self, *what: Any) -> int:
        """The torch seed for a module's initial weights: from what it is and the run's seed.

        Seeding each module from its own description, not from whatever the global stream holds
        by then, gives it the same initial weights whichever artifacts this process trained or
        loaded before it (an interrupted and resumed run, a ``--methods`` subset).
        """
        return derive_seed("init", self.seed, *what)

    def entry(self, kind: str, name: str, key: dict) -> Entry:
        """The cache entry of an artifact (fct.artifacts.Cache.entry)."""
        return self.cache.entry(kind, name, key)

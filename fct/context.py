"""What a compatibility method is handed: trained models, data, embeddings, all cached.

A method never trains or saves anything itself; it asks the Context, which builds each
artifact once (keyed by everything that determines it) and loads it on every later request,
in this process or a later run. Artifacts shared by several scenarios of a suite (one old
model, one side-information model) therefore train once.

The Context is a facade for one scenario: the run's shared state is its ``session``
(fct.session), the models are trained by fct.builders, the embeddings made by fct.embedding,
and what is computed once per scenario is kept in its ``memo``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fct.builders import (
    Batch,
    ExtraLoss,
    accepts_labels,
    model_key,
    model_name,
    train_backbone,
    train_loader,
    train_side,
    train_transformation,
)
from fct.embedding import (
    EMBED_BATCH,
    apply_transformation,
    embed_loader,
    embed_split,
    embedding_key,
    query_mask,
)
from fct.errors import FCTError
from fct.precomputed import StoredData, StoredModel
from fct.provenance import source_digest
from fct.scenarios import EvalSpec, ModelSpec, Scenario, TransformationSpec
from fct.session import Memo, Role, Session, Trained, loader_workers

__all__ = [
    "EMBED_BATCH",
    "Batch",
    "Context",
    "ExtraLoss",
    "Role",
    "Session",
    "Trained",
    "apply_transformation",
    "embed_loader",
    "loader_workers",
]

_accepts_labels = accepts_labels  # the name older tests import


class Context:
    """Everything a method may use for one scenario; every artifact goes through the cache.

    ``Context(scenario, cache, device=..., seed=...)`` makes a session of its own; the runner
    passes ``session=`` instead, shared by every scenario of the run. ``old=`` hands it a
    trained old model instead of training ``scenario.old`` (its spec must be that one).
    """

    def __init__(
        self,
        scenario: Scenario,
        cache: Any = None,
        device: torch.device | None = None,
        seed: int = 0,
        data_root: str | None = None,
        download: bool = False,
        force: bool = False,
        sync_bn: bool = False,
        *,
        session: Session | None = None,
        old: Trained | None = None,
    ) -> None:
        if session is None:
            if cache is None:
                raise TypeError("Context needs a cache or a session")
            session = Session(
                cache,
                device=torch.device("cpu") if device is None else device,
                seed=seed,
                data_root=data_root,
                download=download,
                force=force,
                sync_bn=sync_bn,
            )
        elif cache is not None or device is not None:
            raise TypeError("pass either a session or the cache and device, not both")
        if old is not None and old.spec != scenario.old:
            raise ValueError(
                f"the old model handed to the Context was trained from another spec than "
                f"scenario '{scenario.name}''s old one"
            )
        self.scenario = scenario
        self.session = session
        #: The old model when the caller hands it in (a sequence's previous deployed model,
        #: e.g. BCT's own model of the step before; fct.sequence), else None: trained from
        #: ``scenario.old``. Everything built from it keys on its digest, as on any old model.
        self.old_override = old
        #: What is computed once per scenario: models, embeddings, and what the runner keeps
        #: between the scenario's methods (the old/old evaluation, the kNN log line).
        self.memo = Memo()
        #: A scenario on stored embeddings (fct.precomputed): its files, served by role; the
        #: models are then ``StoredModel`` handles and nothing is trained but h.
        emb = scenario.embeddings
        self.stored = None if emb is None else StoredData(emb.paths())

    def __repr__(self) -> str:
        return f"Context(scenario={self.scenario.name!r}, session={self.session!r})"

    # The session's settings, as attributes of the Context (methods and plugins read them).
    cache = property(lambda self: self.session.cache)
    device = property(lambda self: self.session.device)
    seed = property(lambda self: self.session.seed)
    data_root = property(lambda self: self.session.data_root)
    download = property(lambda self: self.session.download)
    force = property(lambda self: self.session.force)
    sync_bn = property(lambda self: self.session.sync_bn)

    # --- data ---------------------------------------------------------------------------

    def source(self, spec: ModelSpec | EvalSpec, split: str = "train", size: int | None = None):
        """The ImageSource of a model spec's training data, or of the evaluation gallery's split.

        Images come at ``size``, else the model spec's ``image_size``, else the native size.
        """
        if isinstance(spec, EvalSpec):
            split = spec.gallery_data
        size = size or (spec.image_size if isinstance(spec, ModelSpec) else None)
        return self.session.source(spec.dataset, split, spec.classes, spec.max_per_class, size)

    def eval_source(self):
        """The evaluation split (queries and gallery)."""
        return self.source(self.scenario.eval)

    def loader(self, spec: ModelSpec, augment: str | None, epoch: int = 0, shuffle: bool = True):
        """A seeded training loader over ``spec``'s data (fct.builders.train_loader)."""
        return train_loader(self.session, spec, augment, epoch, shuffle)

    # --- models ---------------------------------------------------------------------------

    def old_model(self) -> Trained:
        """The old model φ_old, trained on the old data with the old loss (or the model the
        Context was handed as ``old``)."""
        if self.old_override is not None:
            return self.old_override
        spec = self.scenario.old
        if self.stored is not None:
            return self.memo.get_or_build(
                ("model", spec), lambda: StoredModel("old", spec, self.stored)
            )
        return self.memo.get_or_build(("model", spec), lambda: self._backbone(spec))

    def new_model(self, extra: ExtraLoss | None = None, tag: str | None = None) -> Trained:
        """The new model φ_new; with ``extra`` its training loss gains that term (e.g. BCT).

        ``tag`` names the model's cache entry (default: the term's name); methods pass their
        run name, so a suite's variants (``bct_scaled``) get entries of their own names."""
        spec = self.scenario.new
        if self.stored is not None:
            if extra is not None:
                raise FCTError(
                    f"a new model trained with {extra.name}'s loss needs images; scenario "
                    f"'{self.scenario.name}' has stored embeddings only"
                )
            return self.memo.get_or_build(
                ("model", spec, "None"), lambda: StoredModel("new", spec, self.stored)
            )
        # A method's own loss term: its source file is part of the model's key, so editing
        # the method retrains the models it shaped (and nothing else).
        extra_key = (
            None
            if extra is None
            else {"name": extra.name, **extra.key(), "source": source_digest(type(extra))}
        )
        tag = "" if extra is None else f"-{tag or extra.name}"
        return self.memo.get_or_build(
            ("model", spec, str(extra_key)), lambda: self._backbone(spec, tag, extra_key, extra)
        )

    def _backbone(
        self,
        spec: ModelSpec,
        tag: str = "",
        extra_key: dict | None = None,
        extra: ExtraLoss | None = None,
    ) -> Trained:
        s = self.session
        entry = s.entry("models", model_name(spec, tag), model_key(spec, s.seed, extra_key))
        return train_backbone(s, spec, entry, extra, self)

    def side_model(self) -> Trained | None:
        """The side-information model ψ (SimCLR, no labels, on the old training data)."""
        spec = self.scenario.side
        if spec is None:
            return None
        if self.stored is not None:
            return self.memo.get_or_build(
                ("side", spec), lambda: StoredModel("side", spec, self.stored)
            )
        return self.memo.get_or_build(("side", spec), lambda: train_side(self.session, spec))

    def shared_digests(self) -> set[str]:
        """Digests of the scenario's shared models built so far in this context: the old
        model, the new model without any method's loss term (Independent's) and the
        side-information model. Everything else a method deploys was trained for it alone."""
        sc = self.scenario
        keys = [("model", sc.old), ("model", sc.new, "None"), ("side", sc.side)]
        return {self.memo[k].digest for k in keys if self.memo.get(k) is not None}

    # --- embeddings -------------------------------------------------------------------------

    def embed(
        self, model: Trained, data: Role | str = Role.EVAL, view: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a data split by ``model`` (cached).

        ``data``: a ``Role`` or its value: ``Role.EVAL`` ("eval", the evaluation gallery),
        ``Role.QUERY`` ("query", its queries: the same items unless the scenario names a query
        set apart), ``Role.NEW_TRAIN`` or ``Role.OLD_TRAIN`` ("new-train", "old-train": the new
        or old model's training data). ``view`` 0 is the images as they are; view v > 0 is the
        split augmented as its model spec trains (draws fixed by the run's seed and v), the
        same augmented images whichever model embeds them.

        On stored embeddings (``self.stored``) a model is a ``StoredModel`` and its embeddings
        are its role's array of the training file (both training roles), of the eval file, or
        of the query and gallery files.
        """
        sc = self.scenario
        role = Role.parse(data)
        if self.stored is not None:
            feats, labels = self._stored_embed(model, role, view)
            # One stored evaluation set per scenario (and per Context): its mask, once.
            return self._query_cut(role, feats, labels, "stored")
        spec, split = {
            Role.EVAL: (sc.eval, sc.eval.gallery_data),
            Role.QUERY: (sc.eval, sc.eval.query_data),
            Role.NEW_TRAIN: (sc.new, "train"),
            Role.OLD_TRAIN: (sc.old, "train"),
        }[role]
        if view and not isinstance(spec, ModelSpec):
            raise FCTError("augmented views are of training data only, not the eval split")
        augment = spec.augment if view else None
        key = embedding_key(model, spec, split, view, augment, self.seed)
        feats, labels = self.memo.get_or_build(
            ("embed", str(key)), lambda: self._embed(model, spec, split, key)
        )
        return self._query_cut(role, feats, labels, str(key["data"]))

    def _query_cut(self, role: Role, feats, labels, data: str):
        """With ``[eval] query_fraction``, the queries' or the gallery's part of the split
        ``data`` (whose draw is made once per Context)."""
        sc = self.scenario
        if role in (Role.EVAL, Role.QUERY) and sc.eval.query_fraction is not None:
            # One split, cut into queries and gallery (the whole split is embedded once).
            keep = self.memo.get_or_build(("query-mask", data), lambda: query_mask(sc.eval, labels))
            keep = keep if role == Role.QUERY else ~keep
            feats, labels = feats[keep], labels[keep]
        return feats, labels

    def _stored_embed(self, model: Any, role: Role, view: int):
        if view:
            raise FCTError("augmented views need images; stored embeddings have view 0 only")
        if not isinstance(model, StoredModel):
            raise FCTError(f"{model.name} is an image model; this scenario has stored embeddings")
        # The evaluation set's stored items, or its query and gallery files when apart.
        split = {
            Role.EVAL: "gallery" if self.stored.split else "eval",
            Role.QUERY: "query" if self.stored.split else "eval",
        }.get(role, "train")
        return self.memo.get_or_build(
            ("embed", model.digest, split), lambda: self.stored.tensors(split, model.role)
        )

    def _embed(self, model: Trained, spec, split: str, key: dict):
        feats, labels, speed = embed_split(self.session, model, spec, split, key)
        self.memo[("embed-speed", model.digest)] = speed
        return feats, labels

    @property
    def separate_queries(self) -> bool:
        """True when the queries are a set apart from the gallery (``[eval]`` query_split or
        query_fraction, or stored query and gallery files): nothing excluded by index."""
        return self.scenario.eval.separate or (self.stored is not None and self.stored.split)

    def describe_data(self, role: Role) -> str:
        """Where a role's evaluation items come from, for the log."""
        ev = self.scenario.eval
        if self.stored is not None:
            return f"stored {'query' if role == Role.QUERY else 'gallery'} embeddings"
        split = ev.query_data if role == Role.QUERY else ev.gallery_data
        if ev.query_fraction is not None:
            part = "queries" if role == Role.QUERY else "the rest"
            return f"{ev.dataset}/{split}: {part} of a {ev.query_fraction:g} draw"
        return f"{ev.dataset}/{split}"

    def embed_speed(self, model: Trained) -> float | None:
        """Images per second measured when ``model`` embedded a split (the backfill cost)."""
        return self.memo.get(("embed-speed", model.digest))

    # --- transformation ---------------------------------------------------------------------

    def transformation(
        self,
        new: Trained,
        use_side: bool,
        spec: TransformationSpec | None = None,
        name: str = "h",
        extra_key: dict | None = None,
        module: nn.Module | None = None,
        loss: Callable | None = None,
    ) -> Trained:
        """FCT's h: old (+ side) embedding -> new embedding, trained with MSE on embeddings
        of the training data (``spec.train_on``: the new or the old training set), cached
        views or recomputed from augmented images every step (``spec.features``, fct.h_data).

        ``module`` and ``loss(module, old, side, target)`` let a method train its own variant
        through the same cached loop; ``extra_key`` must then say what differs. Under
        torchrun ``loss`` is handed the DistributedDataParallel wrapper of ``module``: compute
        through calls of it (``module(old, side, ...)``), not its other methods, or the
        gradients are not averaged over ranks. A ``loss``
        with a ``labels`` parameter also gets the batch's class labels (int64 ``[N]``, on the
        device) as ``labels=`` (FastFill's classification term needs them).
        """
        spec = spec or self.scenario.transformation
        old = self.old_model()
        side = self.side_model() if use_side else None
        if use_side and side is None:
            raise FCTError(
                f"scenario '{self.scenario.name}' has no side-information model; set side_info = true or use fct"
            )
        return train_transformation(
            self.session, self, spec, (old, new, side), name, extra_key, module, loss
        )

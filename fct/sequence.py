"""Sequence scenarios: a chain of three or more model generations, each update deployed the
method's way, and the compatibility matrix of the whole chain (docs/metrics.md, "Sequences").

A sequence is a chain of pair scenarios: step j has generation j as its old model and j+1
as its new one (``step_scenario``). Each step gets a ``Context`` of its own on the run's
session, so the cache, the training and every method's ``fit`` are the pair scenario's,
unchanged. The one difference: from the second step on, the step's old model is the model
the method itself deployed at the step before (BCT's, RACT's, L2-BCT's own model; the plain
model for Independent and the FCT family, whose new model is the plain one), handed to the
Context as ``old=``; with ``Method.sequence_anchor() == "first"`` (BCT's ``anchor =
"first"``) every step's old model is the first generation's instead.

``M[i][j]`` (i >= j): queries embedded by model i against the evaluation split embedded by
model j ("stored when j was current"), carried to model i's space: through each step's
transformation h in turn for a deployment with one (h_{j->j+1}, then h_{j+1->j+2} on the
result, ...), through each step's ``gallery_update`` for one with that, untouched otherwise.
The diagonal is each model on its own gallery, leave-one-out; the other cells exclude each
query's own item (paired), as the pair scenario's cross case does. When the scenario's
``[eval]`` names a query set apart, each model embeds those queries and every cell ranks the
gallery items (no exclusion). Each update's flip rates (``step_flips``) compare the queries
answered before and after it. For a deployment with a
transformation the direct h_{0->T} (first to last generation, trained directly: the first
generation's embeddings are kept) is evaluated beside the chained one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fct import distributed, retrieval, sequence_metrics
from fct.context import Context
from fct.curves import point_flips
from fct.embedding import apply_transformation
from fct.errors import FCTError
from fct.methods import Deployment, Method
from fct.scenarios import Scenario
from fct.seeding import derive_seed
from fct.session import Role, Session, Trained

log = logging.getLogger(__name__)

#: The metrics of the compatibility matrix (keys of fct.retrieval.evaluate's result).
MATRIX_METRICS = ("top1", "mAP")
#: The metric AC, BC, FC and the lower-triangle mean of the record's top level are of.
PRIMARY = "mAP"
ANCHORS = ("previous", "first")


def step_scenario(sc: Scenario, old: int, new: int) -> Scenario:
    """The pair scenario of one update: generation ``old`` as the old model, ``new`` as the
    new one (same name, side-information, transformation, evaluation and methods)."""
    return dataclasses.replace(sc, old=sc.models[old], new=sc.models[new], models=())


def anchor_of(method: Method) -> str:
    """The method's ``sequence_anchor()``, checked."""
    anchor = method.sequence_anchor()
    if anchor not in ANCHORS:
        raise FCTError(
            f"method '{method.run_name}': sequence_anchor() is {anchor!r}; it must be one of "
            f"{', '.join(ANCHORS)}"
        )
    return anchor


def check_sequence(sc: Scenario, method: Method) -> None:
    """Raise FCTError when ``method`` cannot run the sequence ``sc``: its ``check`` of every
    update's pair scenario (called by fct.runner.check_scenario before anything trains)."""
    first = anchor_of(method) == "first"
    for j in range(len(sc.models) - 1):
        try:
            method.check(step_scenario(sc, 0 if first else j, j + 1))
        except FCTError as e:
            raise FCTError(f"update {j} -> {j + 1}: {e}") from e


@dataclass
class Chain:
    """A method's deployed chain: the model of every generation and the step deployments."""

    models: list[Trained]
    steps: list[tuple[Context, Deployment]]
    anchor: str
    direct: tuple[Context, Deployment] | None = None


def deploy_chain(session: Session, sc: Scenario, method: Method, seed: int) -> Chain:
    """Fit ``method`` on every update of the sequence in turn (see the module docstring)."""
    anchor = anchor_of(method)
    first_ctx = Context(step_scenario(sc, 0, 1), session=session)
    models = [first_ctx.old_model()]
    steps: list[tuple[Context, Deployment]] = []
    for j in range(len(sc.models) - 1):
        if j == 0:
            ctx = first_ctx
        elif anchor == "first":
            ctx = Context(step_scenario(sc, 0, j + 1), session=session, old=models[0])
        else:
            ctx = Context(step_scenario(sc, j, j + 1), session=session, old=models[j])
        log.info(
            "%s / %s: update %d -> %d (old model %s)",
            sc.name,
            method.run_name,
            j,
            j + 1,
            ctx.old_model().name,
        )
        _seed(method.run_name, seed, j)
        dep = method.fit(ctx)
        if anchor == "first" and (dep.transformation or dep.gallery_update) and j > 0:
            raise FCTError(
                f"method '{method.run_name}' updates the gallery, which a sequence chains from "
                "the previous step: it cannot be anchored to the first model"
            )
        steps.append((ctx, dep))
        models.append(dep.query_model)
    chain = Chain(models, steps, anchor)
    if steps[-1][1].transformation is not None:
        ctx = Context(step_scenario(sc, 0, len(sc.models) - 1), session=session)
        log.info("%s / %s: direct update 0 -> %d", sc.name, method.run_name, len(sc.models) - 1)
        _seed(method.run_name, seed, "direct")
        chain.direct = (ctx, method.fit(ctx))
    return chain


def _seed(method: str, seed: int, step: Any) -> None:
    # As fct.runner.run_one: a method's own draws start from a stream fixed by what runs.
    torch.manual_seed(derive_seed("sequence-step", seed, method, step))


def _side(ctx: Context, dep: Deployment) -> torch.Tensor | None:
    return ctx.embed(ctx.side_model(), Role.EVAL)[0] if dep.uses_side else None


def carry(
    ctx: Context, dep: Deployment, gallery: torch.Tensor, speeds: dict | None = None
) -> torch.Tensor:
    """The stored ``gallery`` after the update ``dep``: h applied, the method's update, or as
    is. ``speeds`` gets h's embeddings per second under the transformation's digest."""
    if dep.transformation is not None:
        out, speed = apply_transformation(
            dep.transformation.module, gallery, _side(ctx, dep), ctx.device
        )
        if speeds is not None:
            speeds[dep.transformation.digest] = speed
        return out
    if dep.gallery_update is not None:
        return dep.gallery_update(gallery, _side(ctx, dep))
    return gallery


def _features(x: torch.Tensor, labels: torch.Tensor, name: str) -> retrieval.FeatureSet:
    return retrieval.FeatureSet(x.float().numpy(), labels.numpy().astype(np.int64), name=name)


def _round(d: dict[str, Any]) -> dict[str, Any]:
    """A case as the record holds it: rounded, without the per-query arrays."""
    return {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in d.items()
        if k not in ("hits", "scored")
    }


@dataclass
class Evaluated:
    """The full evaluation of every cell (``cells[(i, j)]``) and of the direct update."""

    cells: dict[tuple[int, int], dict[str, Any]]
    direct: dict[str, Any] | None = None
    #: h's measured embeddings per second, by transformation digest.
    speeds: dict[str, float] = field(default_factory=dict)


def evaluate_chain(chain: Chain, knn: dict[str, str]) -> Evaluated | None:
    """Every cell of the compatibility matrix (and the direct update), each with its per-query
    ``hits`` for flip rates; None on ranks other than 0 once their part (embedding, sharded)
    is done. Leave-one-out on the evaluation split, or, when the scenario's ``[eval]`` names a
    query set apart, each model's queries (``Role.QUERY``) against the gallery items."""
    ctxs = [chain.steps[0][0]] + [c for c, _ in chain.steps]  # a Context per generation
    separate = ctxs[0].scenario.eval.separate
    embedded = [ctxs[i].embed(m, Role.EVAL) for i, m in enumerate(chain.models)]
    queries = embedded
    if separate:
        queries = [ctxs[i].embed(m, Role.QUERY) for i, m in enumerate(chain.models)]
    for ctx, dep in chain.steps:
        _side(ctx, dep)  # every rank embeds, sharded
    direct_q = None
    if chain.direct is not None:
        dctx, ddep = chain.direct
        direct_q = dctx.embed(ddep.query_model, Role.QUERY if separate else Role.EVAL)[0]
        _side(dctx, ddep)
    if not distributed.is_main():
        return None
    labels = embedded[0][1]
    q_labels = queries[0][1]
    n = len(chain.models)

    def cell(q: torch.Tensor, gallery: torch.Tensor | None, name: str) -> dict[str, Any]:
        if gallery is not None and gallery.shape[1:] != q.shape[1:]:
            raise FCTError(
                f"{name}: the carried gallery has shape {tuple(gallery.shape)} but the queries "
                f"{tuple(q.shape)}; every update must map the gallery into the new model's space"
            )
        return retrieval.evaluate(
            _features(q, q_labels, f"{name} queries"),
            None if gallery is None else _features(gallery, labels, f"{name} gallery"),
            paired=not separate and gallery is not None,
            hits=True,
            **knn,
        )

    cells: dict[tuple[int, int], dict[str, Any]] = {}
    speeds: dict[str, float] = {}
    for i in range(n):
        own = embedded[i][0] if separate else None  # leave-one-out without a gallery
        cells[(i, i)] = cell(queries[i][0], own, f"M{i}{i}")
    for j in range(n - 1):
        gallery = embedded[j][0]
        for i in range(j + 1, n):
            ctx, dep = chain.steps[i - 1]
            gallery = carry(ctx, dep, gallery, speeds)
            cells[(i, j)] = cell(queries[i][0], gallery, f"M{i}{j}")
    out = Evaluated(cells, speeds=speeds)
    if chain.direct is not None:
        dctx, ddep = chain.direct
        out.direct = cell(direct_q, carry(dctx, ddep, embedded[0][0]), "direct")
    return out


def step_flips(ev: Evaluated, n: int) -> list[dict[str, float]]:
    """The flip rates of every update k-1 -> k (fct.flips) as the chain is deployed: the
    gallery stored by the first model, never backfilled, carried through each update. Before:
    queries by model k-1 against it (``M[k-1][0]``); after: queries by model k (``M[k][0]``).
    For the first update that is the pair scenario's cross case against old/old."""
    return [point_flips(ev.cells[(k - 1, 0)], ev.cells[(k, 0)]) for k in range(1, n)]


def _artifact(a: Trained) -> str:
    return f"{a.entry.kind}/{a.name}"


def sequence_record(chain: Chain, ev: Evaluated) -> dict[str, Any]:
    """The record's ``sequence`` key (docs/architecture.md, "Run records")."""
    n = len(chain.models)
    matrix = {
        m: [
            [round(float(ev.cells[(i, j)][m]), 4) if j <= i else None for j in range(n)]
            for i in range(n)
        ]
        for m in MATRIX_METRICS
    }
    by_metric = {m: sequence_metrics.summarize(matrix[m]) for m in MATRIX_METRICS}
    primary = by_metric[PRIMARY]
    direct = None
    if ev.direct is not None:
        h = chain.direct[1].transformation
        direct = {
            **{m: round(float(ev.direct[m]), 4) for m in MATRIX_METRICS},
            **{f"chained_{m}": matrix[m][n - 1][0] for m in MATRIX_METRICS},
            "transformation": _artifact(h),
            "digest": h.digest,
        }
    return {
        "models": [{"artifact": _artifact(m), "digest": m.digest} for m in chain.models],
        "anchor": chain.anchor,
        "steps": [
            {
                "old": ctx.old_model().digest,
                "new": dep.query_model.digest,
                "transformation": None if dep.transformation is None else dep.transformation.digest,
                # null when no query was scored both before and after the update
                **{k: None if np.isnan(v) else _r(v) for k, v in flips.items()},
            }
            for (ctx, dep), flips in zip(chain.steps, step_flips(ev, n), strict=True)
        ],
        "matrix": matrix,
        "compatible": {m: by_metric[m]["compatible"] for m in MATRIX_METRICS},
        "metric": PRIMARY,
        **{k: _r(primary[k]) for k in ("AC", "BC", "FC", "mean")},
        "by_metric": {
            m: {k: _r(by_metric[m][k]) for k in ("AC", "BC", "FC", "mean")} for m in MATRIX_METRICS
        },
        "direct": direct,
    }


def _r(x: float) -> float:
    return round(float(x), 4)


@dataclass
class Outcome:
    """What the runner writes into a sequence's run record."""

    cases: dict[str, dict[str, Any]]
    costs: dict[str, Any]
    used: dict[str, Trained]
    shared: set[str]
    roles: dict[str, str]
    notes: dict[str, Any]
    sequence: dict[str, Any]


def run_sequence(
    session: Session, sc: Scenario, method: Method, seed: int, knn: dict[str, str]
) -> Outcome | None:
    """Deploy ``method``'s chain on the sequence ``sc`` and evaluate it (None on ranks > 0).

    The record's three cases: old/old is the first model on its own gallery (M[0][0], the
    same for every method), new/new the last model on its own (M[T-1][T-1]), cross the last
    model against the first gallery carried through every update (M[T-1][0]): the pair
    scenario's cases for the sequence's old and new ends.
    """
    chain = deploy_chain(session, sc, method, seed)
    ev = evaluate_chain(chain, knn)
    if ev is None:
        return None
    n = len(chain.models)
    cases = {
        "old/old": _round(ev.cells[(0, 0)]),
        "new/new": _round(ev.cells[(n - 1, n - 1)]),
        "cross": _round(
            {**ev.cells[(n - 1, 0)], **point_flips(ev.cells[(0, 0)], ev.cells[(n - 1, 0)])}
        ),
    }
    last = chain.steps[-1][1]
    costs = {
        "backfill_fraction": last.backfill_fraction,
        "backfill_images_per_s": chain.steps[-1][0].embed_speed(last.query_model),
        "transform_embeddings_per_s": None
        if last.transformation is None
        else ev.speeds.get(last.transformation.digest),
    }
    t, b = costs["transform_embeddings_per_s"], costs["backfill_images_per_s"]
    costs["speedup_vs_backfill"] = t / b if t and b else None
    used: dict[str, Trained] = {}
    shared: set[str] = set()
    parts = [*chain.steps, *([chain.direct] if chain.direct else [])]
    for ctx, dep in parts:
        side = [ctx.side_model()] if dep.uses_side else []
        for a in [*dep.artifacts, ctx.old_model(), dep.query_model, dep.transformation, *side]:
            if a is None:
                continue
            name = _artifact(a)
            k = 1
            while name in used and used[name].digest != a.digest:
                # One name, two artifacts (the direct h and the last step's; BCT's models of
                # two generations of one spec): told apart by a number.
                k += 1
                name = f"{_artifact(a)}#{k}"
            used[name] = a
        shared |= ctx.shared_digests()
    roles = {"old": _artifact(chain.models[0]), "query": _artifact(chain.models[-1])}
    if last.transformation is not None:
        roles["transformation"] = _artifact(last.transformation)
    if last.uses_side:
        roles["side"] = _artifact(chain.steps[-1][0].side_model())
    notes = {f"update {j}": dep.notes for j, (_, dep) in enumerate(chain.steps) if dep.notes}
    seq = sequence_record(chain, ev)
    log.info(
        "%s / %s: sequence of %d, %s AC %.2f BC %+.2f FC %+.2f mean %.2f",
        sc.name,
        method.run_name,
        n,
        PRIMARY,
        seq["AC"],
        seq["BC"],
        seq["FC"],
        seq["mean"],
    )
    return Outcome(cases, costs, used, shared, roles, notes, seq)

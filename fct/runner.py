"""Run a suite: every (scenario, method) -> one run record, then the suite's report.

A record's path comes from its config: ``OUT/runs/SCENARIO/METHOD.json`` (seed 0) or
``METHOD.seedN.json``. A record that exists and was made from the same config (scenario,
method, seed: its ``config_hash``) is skipped; ``force`` reruns it and retrains its artifacts.

Under torchrun every rank walks the same plan: all ranks train and embed (fct.distributed),
rank 0 alone decides what is skipped, evaluates, and writes records and the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct import distributed, retrieval
from fct.artifacts import Cache
from fct.builders import check_weights
from fct.context import Context
from fct.curves import backfill_curves, curve_orders, point_flips
from fct.embedding import apply_transformation
from fct.errors import FCTError
from fct.io import check_writable, read_json
from fct.methods import Deployment
from fct.pretrained import refuse_trainers
from fct.provenance import provenance, source_digest
from fct.record import SCHEMA, RunRecord, is_current, record_path
from fct.recovery import recovery
from fct.scenarios import Scenario, Suite, config_hash
from fct.seeding import derive_seed
from fct.sequence import check_sequence, run_sequence
from fct.session import Role, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Options of one ``fct run``."""

    out: Path
    cache: Path | None = None
    device: str = "auto"
    seed: int = 0
    force: bool = False
    data_root: str | None = None
    download: bool = False
    methods: tuple[str, ...] | None = None
    scenarios: str | None = None
    sync_bn: bool = False
    #: ``--rerun``: rerun every selected record's method and evaluation; cached models
    #: whose config did not change are reused (``force`` retrains them too).
    rerun: bool = False
    #: ``--smoke``: the records are marked ``"smoke": true`` (a wiring test, not results).
    smoke: bool = False
    #: The project's reference results of this suite, compared with this run in its report.
    reference: Path | None = None
    #: ``--no-plots``: the report at the end of the run without its figures (fct.report).
    plots: bool = True


def resolve_device(name: str | torch.device) -> torch.device:
    """fct.device.resolve_device, kept under this name for callers of fct.runner."""
    from fct.device import resolve_device as resolve

    return resolve(name)


def _features(x: torch.Tensor, y: torch.Tensor, name: str) -> retrieval.FeatureSet:
    return retrieval.FeatureSet(x.float().numpy(), y.numpy().astype(np.int64), name=name)


def knn_options(ctx: Context) -> dict[str, str]:
    """The evaluation's distance, kNN backend and device, logged once per run.

    On a GPU: faiss's GPU index when the scenario asks for faiss and the installed faiss has
    GPU support (``pip install .[gpu]``), else the torch backend on the GPU (the same exact
    metrics: the backends agree to 1e-6). On a CPU: the scenario's backend.
    """
    sc = ctx.scenario
    backend, device = sc.eval.backend, "cpu"
    if ctx.device.type == "cuda":
        device = str(ctx.device)
        if backend == "faiss" and not retrieval.faiss_has_gpu():
            backend = "torch"
            why = "the installed faiss has no GPU support (pip install .[gpu] for it)"
        else:
            why = "faiss GPU index" if backend == "faiss" else "as the scenario asks"
        message = f"kNN evaluation: {backend} backend on {device} ({why})"
    else:
        message = f"kNN evaluation: {backend} backend on the CPU"
    if ctx.memo.get("knn-log") != message:
        log.info("%s", message)
        ctx.memo["knn-log"] = message
    return {"distance": sc.eval.distance, "backend": backend, "device": device}


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def evaluate_deployment(
    ctx: Context, dep: Deployment
) -> tuple[dict[str, dict], dict[str, Any], dict[str, Any]] | None:
    """The three cases of a deployment, the measured update costs, and the other record keys:
    the backfilling curves (``curves``, ``auc``, ``backfill_curves``: see fct.curves), the
    cases under cosine distance (``cases_cosine``) and ``diagnostics.cross_norm_ratio``.

    Leave-one-out on the evaluation split, or, when the scenario names a query set apart
    (``[eval]`` query_split / query_fraction, or stored ``query`` and ``gallery`` files), its
    queries (``Role.QUERY``) against the gallery (``Role.EVAL``): the method updates and
    backfills the gallery items only. A query-side update (``Deployment.query_update``) maps
    the new queries into the old space instead and keeps the old gallery.

    Under torchrun every rank takes part in embedding the evaluation data (sharded); the
    evaluation itself runs on rank 0, and the other ranks return None.
    """
    sc = ctx.scenario
    old = ctx.old_model()
    old_x, labels = ctx.embed(old, Role.EVAL)
    new_x, _ = ctx.embed(dep.query_model, Role.EVAL)
    side_x = ctx.embed(ctx.side_model(), Role.EVAL)[0] if dep.uses_side else None
    queries = None
    if ctx.separate_queries:
        old_q, q_labels = ctx.embed(old, Role.QUERY)
        queries = QuerySet(old_q, ctx.embed(dep.query_model, Role.QUERY)[0], q_labels)
    if not distributed.is_main():
        return None
    opts = knn_options(ctx)
    if queries is not None and "sets-log" not in ctx.memo:  # once per scenario
        ctx.memo["sets-log"] = True
        log.info(
            "%s: %d queries (%s) against a gallery of %d (%s), none excluded",
            sc.name,
            len(queries.labels),
            ctx.describe_data(Role.QUERY),
            len(labels),
            ctx.describe_data(Role.EVAL),
        )
    costs: dict[str, Any] = {
        "backfill_fraction": dep.backfill_fraction,
        "backfill_images_per_s": ctx.embed_speed(dep.query_model),
    }
    # The cross case's queries: the new model's, or mapped into the old space.
    cross_q = new_x if queries is None else queries.new
    if dep.query_update is not None:
        # Query-side adaptation: new queries mapped into the old space, the old gallery kept.
        if dep.transformation is not None or dep.gallery_update is not None:
            raise FCTError("a deployment maps either its queries or its gallery, not both")
        with torch.inference_mode():
            cross_q = dep.query_update(cross_q)
        gallery = old_x
        costs["transform_embeddings_per_s"] = None
    elif dep.transformation is not None:
        gallery, speed = apply_transformation(dep.transformation.module, old_x, side_x, ctx.device)
        costs["transform_embeddings_per_s"] = speed
    elif dep.gallery_update is not None:
        t0 = time.perf_counter()
        gallery = dep.gallery_update(old_x, side_x)
        dt = time.perf_counter() - t0
        costs["transform_embeddings_per_s"] = len(old_x) / dt if dt > 0 else None
    else:
        gallery = old_x
        costs["transform_embeddings_per_s"] = None
    if gallery.shape[1:] != cross_q.shape[1:] or len(gallery) != len(old_x):
        raise FCTError(
            f"method's updated gallery has shape {tuple(gallery.shape)} but its queries "
            f"{tuple(cross_q.shape)}; the gallery update must map old embeddings into the new "
            "model's space"
            + (" (its query update: new queries into the old space)" if dep.query_update else "")
        )
    raw = _three_cases(ctx, old, old_x, new_x, gallery, labels, opts, queries, cross_q)
    # The same cases under cosine distance: a method whose embeddings change scale (BCT's grow
    # with a frozen classifier) shows it as a gap between the two (docs/baselines.md).
    cos_opts = {**opts, "distance": "cosine"}
    cases = _record_cases(raw)
    cases_cosine = (
        cases
        if opts["distance"] == "cosine"
        else _record_cases(
            _three_cases(ctx, old, old_x, new_x, gallery, labels, cos_opts, queries, cross_q)
        )
    )
    diagnostics = {"cross_norm_ratio": _norm_ratio(cross_q, gallery)}
    t, b = costs.get("transform_embeddings_per_s"), costs.get("backfill_images_per_s")
    costs["speedup_vs_backfill"] = t / b if t and b else None
    # --- backfilling curves (fct.curves): the cross case as the gallery is re-encoded ---
    # (none for a query-side update: a gallery part re-encoded with the new model and a part
    # left old share no query space)
    curves = {}
    if sc.eval.curves and dep.query_update is None:
        own = None
        if dep.backfill_order is not None:
            own = (dep.backfill_order_name, dep.backfill_order)
        curves = backfill_curves(
            curve_orders(len(labels), ctx.seed, own),
            new_x,
            gallery,
            labels,
            opts,
            queries=None if queries is None else (queries.new, queries.labels),
            before=raw["old/old"],
        )
    # --- end of backfilling curves ---
    extras = {
        "cases_cosine": {k: _round(v) for k, v in cases_cosine.items()},
        "diagnostics": _round(diagnostics),
    }
    return {k: _round(v) for k, v in cases.items()}, _round(costs), {**curves, **extras}


@dataclass(frozen=True)
class QuerySet:
    """A query set apart from the gallery: its old and new model embeddings and its labels."""

    old: torch.Tensor
    new: torch.Tensor
    labels: torch.Tensor


def _three_cases(
    ctx: Context,
    old,
    old_x,
    new_x,
    gallery,
    labels,
    opts: dict,
    queries: QuerySet | None = None,
    cross_q: torch.Tensor | None = None,
) -> dict[str, dict]:
    """old/old, new/new and cross (``cross_q``, the new queries or their query-side update,
    against the updated gallery), each with its per-query ``hits``
    (fct.retrieval.evaluate(hits=True)) and the scenario's ranking metrics. Leave-one-out (the
    cross case paired: a query's own item excluded) unless ``queries`` is a set apart."""
    opts = {**opts, "ranking": ctx.scenario.eval.metrics or ()}

    def run(q, q_labels, g, name: str, paired: bool = False) -> dict:
        gal = None if g is None else _features(g, labels, f"{name} gallery")
        return retrieval.evaluate(
            _features(q, q_labels, f"{name} queries"), gal, paired=paired, hits=True, **opts
        )

    cases = {}
    if queries is None:
        cases["old/old"] = ctx.memo.get_or_build(
            ("old/old", old.digest, str(opts)), lambda: run(old_x, labels, None, "old/old")
        )
        cases["new/new"] = run(new_x, labels, None, "new/new")
        cross_q = new_x if cross_q is None else cross_q
        cases["cross"] = run(cross_q, labels, gallery, "cross", paired=True)
    else:
        cases["old/old"] = ctx.memo.get_or_build(
            ("old/old", old.digest, str(opts)),
            lambda: run(queries.old, queries.labels, old_x, "old/old"),
        )
        cases["new/new"] = run(queries.new, queries.labels, new_x, "new/new")
        cross_q = queries.new if cross_q is None else cross_q
        cases["cross"] = run(cross_q, queries.labels, gallery, "cross")
    return cases


def _record_cases(raw: dict[str, dict]) -> dict[str, dict]:
    """The cases as the record holds them: without the per-query arrays, and the cross case
    with its flip rates against old/old (``nfr``, ``pfr``: fct.flips; the queries skipped
    by either are left out, as they are of top-1)."""
    out = {
        name: {k: v for k, v in r.items() if k not in ("hits", "scored")} for name, r in raw.items()
    }
    out["cross"].update(point_flips(raw["old/old"], raw["cross"]))
    return out


def _norm_ratio(queries: torch.Tensor, gallery: torch.Tensor) -> float | None:
    """Mean L2 norm of the cross case's queries over that of its gallery."""
    g = gallery.float().norm(dim=1).mean().item()
    return queries.float().norm(dim=1).mean().item() / g if g > 0 else None


def record_digest(sc: Scenario, method, seed: int) -> str:
    """The hash a record is checked against: the scenario's results key, the method's run
    name, registered method and settings (not its display label), the seed, the schema."""
    return config_hash(
        {
            "scenario": sc.results_key(),
            "method": method.hash_config(),
            "seed": seed,
            "schema": SCHEMA,
        }
    )


def run_one(ctx: Context, method_name: str, opts: RunOptions) -> Path:
    """Fit one method on the context's scenario, evaluate it, write its run record."""
    sc = ctx.scenario
    method = sc.method(method_name)
    path = record_path(opts.out, sc.name, method_name, opts.seed)
    digest = record_digest(sc, method, opts.seed)
    source = source_digest(type(method))
    fresh = _up_to_date(path, digest, source, opts, sc.name, method_name)
    if distributed.broadcast_json(fresh):
        return path
    log.info("%s / %s: fitting on %s (seed %d)", sc.name, method_name, ctx.device, opts.seed)
    t0 = time.perf_counter()
    # A method's own random draws (a module it builds, a sample it takes) start from a stream
    # fixed by (method, seed); the cache never advances it (fct.train.isolated_rng), so a rerun
    # after a crash, which loads what the first run trained, draws exactly the same numbers.
    torch.manual_seed(derive_seed("method", opts.seed, method_name))
    extra: dict[str, Any] = {}
    if sc.is_sequence:  # a chain of updates: fct.sequence deploys and evaluates it
        outcome = run_sequence(ctx.session, sc, method, opts.seed, knn_options(ctx))
        if outcome is None:  # a rank other than 0
            return path
        cases, costs, curves, fitted = outcome.cases, outcome.costs, {}, None
        used, shared, roles, notes = outcome.used, outcome.shared, outcome.roles, outcome.notes
        extra["sequence"] = outcome.sequence
    else:
        dep = method.fit(ctx)
        evaluated = evaluate_deployment(ctx, dep)
        if evaluated is None:  # a rank other than 0: its part (training, embedding) is done
            return path
        cases, costs, curves = evaluated
        fitted = dep
        used, shared = _used_artifacts(ctx, dep), ctx.shared_digests()
        roles, notes = _model_roles(ctx, dep), dep.notes
    own = sum(a.train_seconds for a in used.values() if a.digest not in shared)
    costs["train_seconds"] = round(sum(a.train_seconds for a in used.values()), 2)
    costs["train_seconds_method"] = round(own, 2)
    costs["train_seconds_shared"] = round(costs["train_seconds"] - own, 2)
    wall = time.perf_counter() - t0
    record = RunRecord(
        suite=sc.suite,
        scenario=sc.name,
        method=method_name,
        label=method.display_label,
        seed=opts.seed,
        smoke=opts.smoke,
        config_hash=digest,
        method_source=source,
        scenario_config=sc.as_dict(),
        method_config=method.config(),
        cases=cases,
        costs=costs,
        **curves,  # curves, auc, backfill_curves (fct.curves); cases_cosine, diagnostics
        artifacts={name: a.digest for name, a in used.items()},
        artifact_weights={name: a.entry.weights_digest() for name, a in used.items()},
        models=roles,
        # fct.recovery: how much of the new model's retrieval the update recovers
        recovery=None
        if fitted is None
        else recovery(cases, fitted, costs["train_seconds_method"], sc.new.embedding_dim),
        notes=json.loads(json.dumps(notes, default=str)),  # Deployment.notes
        provenance={
            **provenance(str(ctx.device), opts.seed, wall),
            "world_size": distributed.world(),
        },
        extra=extra,  # "sequence" (fct.sequence) for a sequence scenario
    )
    record.write(path)
    c = cases["cross"]
    log.info(
        "%s / %s: cross top1 %.2f mAP %.2f (old/old mAP %.2f, new/new mAP %.2f) -> %s",
        sc.name,
        method_name,
        c["top1"],
        c["mAP"],
        cases["old/old"]["mAP"],
        cases["new/new"]["mAP"],
        path,
    )
    return path


def _used_artifacts(ctx: Context, dep: Deployment) -> dict[str, Any]:
    """Every trained artifact the deployment used, by "KIND/NAME": the method's own list plus
    the models the evaluation itself used (the old model, the query model, h, ψ)."""
    used = [*dep.artifacts, ctx.old_model(), dep.query_model, dep.transformation]
    if dep.uses_side:
        used.append(ctx.side_model())
    return {f"{a.entry.kind}/{a.name}": a for a in used if a is not None}


def _model_roles(ctx: Context, dep: Deployment) -> dict[str, str]:
    """Which artifact played which part: old, query (the new model), side, transformation."""
    roles = {"old": ctx.old_model(), "query": dep.query_model, "transformation": dep.transformation}
    if dep.uses_side:
        roles["side"] = ctx.side_model()
    return {role: f"{a.entry.kind}/{a.name}" for role, a in roles.items() if a is not None}


def _up_to_date(
    path: Path, digest: str, source: str | None, opts: RunOptions, scenario: str, method: str
) -> bool:
    """Whether the record at ``path`` was made from this config and this method source
    (rank 0 reads it; fct.record.is_current); never under ``--force`` or ``--rerun``."""
    if not distributed.is_main() or not (path.exists() or path.is_symlink()):
        return False
    if opts.force or opts.rerun:
        log.info(
            "%s / %s: rerun asked (%s)", scenario, method, "--force" if opts.force else "--rerun"
        )
        return False
    return is_current(path, digest, source, f"{scenario} / {method}")


def check_scenario(ctx: Context, methods: Sequence[str]) -> dict[str, str]:
    """Refuse, before anything trains, what would fail later: an unknown method, a missing
    dataset or a wrong layout, a class range the dataset does not have (FCTError). Returns
    the methods that cannot handle the scenario (``Method.check``), with the reason: the
    runner skips those pairs and runs the rest.

    Loading every split here costs nothing extra: the sources are kept for training.
    """
    sc = ctx.scenario
    refused: dict[str, str] = {}
    for m in methods:
        method = sc.method(m)  # an unknown name raises, with "did you mean"
        try:
            check_sequence(sc, method) if sc.is_sequence else method.check(sc)
        except FCTError as e:
            refused[m] = str(e)
    if ctx.stored is not None:  # stored embeddings: their files, not images, are checked
        try:
            ctx.stored.check()
        except FCTError as e:
            raise FCTError(f"scenario '{sc.name}' [embeddings]: {e}") from e
        return refused
    roles = [("old", sc.old), ("new", sc.new), ("side", sc.side), ("eval", sc.eval)]
    roles += [(f"models[{k}]", spec) for k, spec in enumerate(sc.models)]
    for role, spec in roles:
        if spec is None:
            continue
        try:
            ctx.source(spec)
            if role == "eval" and spec.query_data != spec.gallery_data:
                ev = spec
                ctx.session.source(ev.dataset, ev.query_data, ev.classes, ev.max_per_class, None)
            if role != "eval":  # given weights must fit the model the spec describes
                check_weights(ctx.session, spec, side=role == "side")
        except FCTError as e:
            raise FCTError(f"scenario '{sc.name}' [{role}]: {e}") from e
    return {**refuse_trainers(sc, methods), **refused}


def check_smoke(out: Path, smoke: bool) -> None:
    """Refuse to write smoke records beside full ones (or the other way round): a report of
    the folder would mix a wiring test with results."""
    runs = Path(out) / "runs"
    if not runs.is_dir():
        return
    for path in sorted(runs.glob("*/*.json")):
        try:
            rec = read_json(path)
        except FCTError:
            continue  # damaged: moved aside and rerun when its turn comes
        if isinstance(rec, dict) and bool(rec.get("smoke", False)) != smoke:
            kind = "full-run" if smoke else "smoke-run (--smoke)"
            raise FCTError(
                f"{out} holds {kind} records (e.g. {path}); "
                f"{'a --smoke run' if smoke else 'a full run'} must not be mixed with them: "
                "pass another --out"
            )


def _pair_failed(failures: list[tuple[str, str]], scenario: str, method: str, why: str) -> None:
    log.error("%s / %s: %s", scenario, method, why)
    failures.append((f"{scenario}/{method}", why))


def _failure_summary(failures: list[tuple[str, str]], total: int, out: Path) -> str:
    """One line for the pairs that did not run. One cause shared by all of them (a damaged
    cache lock, a full disk) comes first, as it is; distinct causes are listed per pair."""
    where = f"the other records are in {out / 'runs'}"
    reasons = {why for _, why in failures}
    pairs = ", ".join(pair for pair, _ in failures)
    if len(reasons) == 1:
        return (
            f"{failures[0][1]} ({len(failures)} of {total} (scenario, method) pairs did not run "
            f"because of it: {pairs}; {where})"
        )
    listed = "; ".join(f"{pair} ({why[:160]})" for pair, why in failures)
    return f"{len(failures)} of {total} (scenario, method) pairs did not run: {listed}; {where}"


def run_suite(suite: Suite, opts: RunOptions) -> list[Path]:
    """Run the selected scenarios and methods of ``suite``; write records and the report.

    Every scenario is checked (``check_scenario``) and the results folder tested for writing
    before the first training starts. A method that cannot handle a scenario is refused then,
    by name; a pair that fails later (a NaN loss, a plugin's error) is reported and the suite
    goes on. Records are written one by one as they finish, so an error or a crash later
    keeps every finished record and cache entry; rerunning the same command continues from
    there. When any pair was refused or failed, FCTError at the end names them (exit 2),
    after the report of what did finish.
    """
    device = distributed.setup(opts.device)
    cache = Cache(opts.cache)
    scenarios: list[Scenario] = suite.select(opts.scenarios)
    written: list[Path] = []
    if distributed.is_main():
        check_writable(opts.out / "runs", "results folder", "choose another --out")
        check_smoke(opts.out, opts.smoke)
    distributed.check_shared_folder(cache.root, "the cache folder", "--cache (or FCT_CACHE)")
    # What every scenario's Context shares: the cache, the device, the seed, the data
    # loaded by the checks, the entries already rebuilt under --force.
    session = Session(
        cache,
        device=device,
        seed=opts.seed,
        data_root=opts.data_root,
        download=opts.download,
        force=opts.force,
        sync_bn=opts.sync_bn,
    )
    plan = []
    failures: list[tuple[str, str]] = []
    for sc in scenarios:
        methods = opts.methods or sc.methods
        ctx = Context(sc, session=session)
        refused = check_scenario(ctx, methods)
        for m, why in refused.items():
            _pair_failed(failures, sc.name, m, f"refused before training: {why}")
        for m in methods:  # a name that cannot be a record file fails here, before training
            record_path(opts.out, sc.name, m, opts.seed)
        plan.append((ctx, [m for m in methods if m not in refused]))
    total = sum(len(ms) for _, ms in plan) + len(failures)
    # Logged once every check passed: a refused run prints its one error line only.
    log.info(
        "suite %s%s: %d scenario(s) on %s%s%s; records -> %s/runs, cache -> %s",
        suite.name,
        " (smoke: a wiring test, not results)" if opts.smoke else "",
        len(scenarios),
        device,
        f" x {distributed.world()} process{'es' if distributed.world() > 1 else ''}"
        if distributed.active()
        else "",
        f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else "",
        opts.out,
        cache.root,
    )
    for ctx, methods in plan:
        for m in methods:
            try:
                written.append(run_one(ctx, m, opts))
            except FCTError as e:
                if distributed.active():
                    raise  # every rank must leave together: the launcher reports it
                _pair_failed(failures, ctx.scenario.name, m, str(e))
    if not distributed.is_main():
        return []  # records and the report are rank 0's
    if written:
        from fct.report import build_report

        build_report(suite.name, [opts.out], opts.out, reference=opts.reference, plots=opts.plots)
        log.info("report written to %s", opts.out)
    if failures:
        raise FCTError(_failure_summary(failures, total, opts.out))
    return written

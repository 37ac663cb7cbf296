"""The ``fct`` command line: evaluate, run, list, report, bench, transform.

Every user-facing error is an FCTError: printed as one ``error: ...`` line naming the fix, exit
status 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fct import __version__
from fct.errors import FCTError

# OpenMP threads that wait for work spin on their core by default; beside other processes a
# spinning thread takes the core a working one needs, and a training step slowed 10x beside
# one busy process (docs/throughput.md, "A busy machine"). Sleeping waits cost nothing
# measurable on a quiet machine. Set before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FCTError(f"{message}; see `{self.prog} --help`")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fct.device import resolve_device
    from fct.retrieval import evaluate, load_npz

    # Checked before any file is read: a bad --device is a typo, found in a second.
    device = str(resolve_device(args.device))
    from fct.threads import configure_threads

    configure_threads()
    query = load_npz(args.query)
    gallery = load_npz(args.gallery) if args.gallery else None
    if args.paired and gallery is None:
        raise FCTError(
            "--paired needs --gallery (without a gallery the query set is evaluated leave-one-out)"
        )
    out = evaluate(
        query,
        gallery,
        paired=args.paired,
        distance=args.distance,
        backend=args.backend,
        device=device,
        progress=sys.stderr.isatty() and not args.json,
    )
    if out["n_skipped"]:
        print(
            f"note: {out['n_skipped']} queries have no same-class item in the gallery "
            "(e.g. a class with a single item, left out) and are excluded from every metric",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        mode = (
            "paired"
            if args.paired
            else ("leave-one-out" if gallery is None else "query vs gallery")
        )
        print(
            f"{mode}, {out['distance']} distance, {out['backend']} backend: "
            f"{out['n_query']} queries scored, {out['n_skipped']} skipped, {out['n_gallery']} gallery items"
        )
        print(f"{'top1':>8} {'top5':>8} {'mAP':>8} {'mAP@R':>8}")
        print(" ".join(f"{out[k]:8.2f}" for k in ("top1", "top5", "mAP", "mAP@R")))
    return 0


def _load_plugins(args: argparse.Namespace) -> None:
    from fct.methods import load_entry_points, load_plugin

    load_entry_points()
    for spec in getattr(args, "plugin", None) or []:
        load_plugin(spec)


#: Where a run writes by default (``results/SUITE``, ignored by git) and where the project's
#: committed reference results of a suite live (``results/reference/SUITE``).
RESULTS = Path("results")
REFERENCE = RESULTS / "reference"


def _results_dir(args: argparse.Namespace, suite: str) -> Path:
    return Path(args.out) if args.out else RESULTS / suite


def _reference_dir(suite: str, out: Path, given: str | None = None) -> Path | None:
    """The reference results a report compares with: ``--reference DIR``, else
    results/reference/SUITE when it exists and is not the folder being written."""
    if given:
        return Path(given)
    ref = REFERENCE / suite
    try:
        if not (ref / "runs").is_dir() or ref.resolve() == Path(out).resolve():
            return None
    except OSError:
        return None
    return ref


SEED_MAX = 2**31 - 1


def _check_seed(seed: int, flag: str) -> int:
    """A seed in [0, 2^31): torch and numpy generators take it as it is."""
    if not 0 <= seed <= SEED_MAX:
        raise FCTError(f"{flag} must be an integer in [0, {SEED_MAX}], got {seed}")
    return seed


def _parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of distinct non-negative integers, in the given order."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) > SEED_MAX or len(set(seeds)) != len(seeds):
        raise FCTError(
            f"--seeds takes distinct non-negative integers separated by commas, e.g. 0,1,2; got {text!r}"
        )
    return seeds


def _os_error_message(e: OSError) -> str | None:
    """One line for an environment error that escaped the FCTError checks, or None.

    Full disks and unwritable folders are caught where fct writes; this is the net under
    them (a lock file, a library writing for us), so the user still gets one line naming the
    fix. Other OSErrors are bugs or unexpected and keep their traceback.
    """
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device{where}; free disk space and rerun the same command: finished work is kept"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return (
            f"{e.strerror}{where}; check that path (--out and --cache must be writable folders, "
            "--data-root readable) and rerun"
        )
    return None


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` / ``--nproc=N`` (what each launched process gets)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from fct import distributed
    from fct.runner import RunOptions, run_suite
    from fct.scenarios import load_suite, parse_set
    from fct.suite_variants import with_global_batch

    overrides = parse_set(args.set or [])
    _check_seed(args.seed, "--seed")
    # Every flag is checked before anything trains or a launcher starts; an empty list is a
    # mistake (a shell variable that expanded to nothing), not "the default".
    methods = None
    if args.methods is not None:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not methods:
            raise FCTError(f"--methods names no method ({args.methods!r}); e.g. --methods fct,bct")
    if args.scenarios is not None and not [p for p in args.scenarios.split(",") if p.strip()]:
        raise FCTError(
            f"--scenarios names no scenario ({args.scenarios!r}); see `fct list scenarios`"
        )
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    if args.global_batch is not None and args.global_batch < 1:
        raise FCTError(f"--global-batch must be a positive integer, got {args.global_batch}")
    if args.nproc is not None:
        _load_plugins(args)
        load_suite(args.suite, overrides=overrides)  # a bad suite fails here, once
        rc = distributed.launch(args.nproc, _without_nproc(args.argv))
        if rc:
            raise FCTError(
                f"the {args.nproc}-process run failed (exit {rc}; the first error is printed "
                "above); fix it and rerun the same command: finished work is kept"
            )
        return 0
    _load_plugins(args)
    suite = load_suite(args.suite, overrides=overrides)
    if args.global_batch is not None:
        suite = with_global_batch(suite, args.global_batch)
    if args.smoke:
        from fct.suite_variants import smoke_suite

        suite = smoke_suite(suite)
        if not args.out:
            args.out = str(RESULTS / f"{suite.name}-smoke")
    out = _results_dir(args, suite.name)
    from fct.threads import configure_threads

    configure_threads(quiet=True)  # run_suite logs the count once the checks passed
    if (REFERENCE / suite.name).exists() and out.resolve() == (REFERENCE / suite.name).resolve():
        raise FCTError(
            f"{out} holds the project's reference results, which a run never overwrites; "
            f"run into the default results/{suite.name} (or another --out)"
        )
    for seed in seeds:
        opts = RunOptions(
            out=out,
            cache=args.cache,
            device=args.device,
            seed=seed,
            force=args.force,
            data_root=args.data_root,
            download=args.download,
            methods=methods,
            scenarios=args.scenarios,
            sync_bn=args.sync_bn,
            rerun=args.rerun,
            smoke=args.smoke,
            reference=None if args.smoke else _reference_dir(suite.name, out),
            plots=not args.no_plots,
        )
        run_suite(suite, opts)
    distributed.teardown()
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fct.report import build_report

    dirs = [Path(d) for d in (args.results or [RESULTS / args.suite])]
    if not args.results and not dirs[0].exists() and (REFERENCE / args.suite / "runs").is_dir():
        raise FCTError(
            f"no results of your own in {dirs[0]} yet (run `fct run {args.suite}`); the "
            f"project's reference results are in {REFERENCE / args.suite}: "
            f"`fct report {args.suite} --results {REFERENCE / args.suite}`"
        )
    out = Path(args.out) if args.out else dirs[0]
    reference = None if args.no_reference else _reference_dir(args.suite, out, args.reference)
    paths = build_report(args.suite, dirs, out, reference=reference, plots=not args.no_plots)
    print(f"wrote {len(paths)} files to {out}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import fnmatch

    _load_plugins(args)
    what, pattern = args.what, args.pattern
    lines = []
    if what == "methods":
        from fct.methods import METHODS

        for name in METHODS.names(pattern):
            cls = METHODS.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            lines.append(f"{name:14s} {doc}")
    elif what == "datasets":
        from fct.data import DATASETS

        lines = DATASETS.names(pattern)
    elif what == "losses":
        from fct.losses import LOSSES

        lines = LOSSES.names(pattern)
        if fnmatch.fnmatchcase("simclr", pattern):
            lines.append("simclr (side-information only)")
    elif what == "transformations":
        from fct.transform_models import cached_transformations

        found = cached_transformations(args.cache)
        if not found:
            where = args.cache or "the cache ($FCT_CACHE or .fct-cache)"
            raise FCTError(
                f"no trained transformation in {where}; `fct run` trains them (or pass --cache DIR)"
            )
        lines = [f"{n}  {what}" for n, what in found if fnmatch.fnmatchcase(n, pattern)]
    elif what == "suites":
        from fct.scenarios import list_suites, load_suite

        for name in list_suites():
            if fnmatch.fnmatchcase(name, pattern):
                suite = load_suite(name)
                lines.append(f"{name:12s} {len(suite.scenarios):3d} scenarios  {suite.description}")
    else:
        from fct.scenarios import list_suites, load_suite

        for name in list_suites():
            for sc in load_suite(name).scenarios:
                if fnmatch.fnmatchcase(sc.name, pattern) or fnmatch.fnmatchcase(
                    f"{name}/{sc.name}", pattern
                ):
                    lines.append(
                        f"{name + '/' + sc.name:40s} {','.join(sc.kinds):45s} {sc.description}"
                    )
    if not lines:  # a typo in the pattern says so, instead of printing nothing
        every = f"; `fct list {what}` shows them all" if pattern != "*" else ""
        raise FCTError(f"no {what} match {pattern!r}{every}")
    print("\n".join(lines))
    return 0


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise FCTError(f"--batches takes comma-separated integers, got {text!r}") from e


def _cmd_bench(args: argparse.Namespace) -> int:
    """``fct bench transformation``: fct.throughput measures, this prints and writes."""
    import math

    from fct.device import resolve_device
    from fct.io import write_json, write_text
    from fct.throughput import SIZES, measure, merge, to_markdown
    from fct.throughput.presets import resolve_dtype

    dev = resolve_device(args.device)
    default = "float32,bfloat16" if dev.type == "cuda" else "float32"
    dtypes = [d.strip() for d in (default if args.dtype is None else args.dtype).split(",")]
    for d in dtypes:  # all of them before the first measurement
        if not d:
            raise FCTError(f"--dtype names no dtype ({args.dtype!r}); e.g. --dtype float32")
        resolve_dtype(d)
    if args.budget is not None and not (0 < args.budget < math.inf):
        raise FCTError(f"--budget must be a positive number of seconds, got {args.budget}")
    sizes = list(SIZES) if args.sizes == "both" else [args.sizes]
    if args.batches is not None and not args.batches.strip():
        raise FCTError("--batches names no batch size; e.g. --batches 256,4096")
    batches = _csv_ints(args.batches) if args.batches else None
    results = [
        measure(
            s,
            dev,
            d.strip(),
            batches,
            quick=args.quick,
            budget_s=args.budget,
            threads=args.threads,
        )
        for s in sizes
        for d in dtypes
    ]
    result = merge(results)
    command = "fct " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    if args.out:
        out = Path(args.out)
        write_json(out / "transformation.json", result)
        write_text(out / "transformation.md", to_markdown(result, command))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(to_markdown(result, command), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = _Parser(prog="fct", description="FCT Bench: model compatibility in embedding retrieval.")
    p.add_argument("--version", action="version", version=f"fct {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("evaluate", help="retrieval metrics for embeddings in .npz files")
    ev.add_argument("--query", required=True, help="npz with features [N, D] and labels [N]")
    ev.add_argument("--gallery", help="npz gallery (default: the query set, leave-one-out)")
    ev.add_argument("--distance", choices=("l2", "cosine"), default="l2")
    ev.add_argument("--backend", choices=("torch", "faiss"), default="torch")
    ev.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda[:N] or auto (torch backend, or faiss with GPU support)",
    )
    ev.add_argument(
        "--paired",
        action="store_true",
        help="query i and gallery i are one item encoded by two models: exclude it",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_evaluate)

    run = sub.add_parser("run", help="run a suite: train, fit every method, evaluate, report")
    run.add_argument(
        "suite", help="suite name (fct/suites/NAME.toml, or $FCT_SUITES) or path to a .toml"
    )
    run.add_argument("--methods", help="comma-separated methods (default: the suite's)")
    run.add_argument("--scenarios", help="comma-separated scenario name wildcards")
    run.add_argument(
        "--data-root", help="folder holding the datasets (else $FCT_DATA, system locations)"
    )
    run.add_argument(
        "--download", action="store_true", help="let torchvision download missing datasets"
    )
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument(
        "--smoke",
        action="store_true",
        help="shrink every scenario (10 classes, 4 images each, 1 epoch, 32px) to test the wiring",
    )
    run.add_argument("--no-plots", action="store_true", help="its report without plots/ (faster)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a method setting for every scenario (bct.weight=0.5) or a key of the "
        "suite file (defaults.model.epochs=2, scenario.NAME.new.lr=0.1), validated like the "
        "file; repeatable (docs/suites.md)",
    )
    run.add_argument("--seeds", help="comma-separated seeds to run one after another, e.g. 0,1,2")
    run.add_argument(
        "--force", action="store_true", help="rerun finished records and retrain their artifacts"
    )
    run.add_argument(
        "--rerun",
        action="store_true",
        help="rerun the methods and evaluation of finished records, reusing every cached "
        "model whose config did not change (--force retrains those too)",
    )
    run.add_argument(
        "--out",
        help="results folder (default results/SUITE; the project's reference results are in "
        "results/reference/SUITE and are never written)",
    )
    run.add_argument("--cache", help="artifact cache folder (default $FCT_CACHE or .fct-cache)")
    run.add_argument(
        "--plugin",
        action="append",
        help="module or .py file registering extra methods (repeatable)",
    )
    run.add_argument(
        "--nproc",
        type=int,
        help="train on N processes of this node (one per GPU): relaunches under torchrun",
    )
    run.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm across GPUs when running under torchrun",
    )
    run.add_argument(
        "--global-batch",
        type=int,
        help="train every backbone with this global batch, lr scaled linearly",
    )
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser(
        "report", help="leaderboard, tables, plots and index.html from run records"
    )
    rep.add_argument("suite")
    rep.add_argument(
        "--results", action="append", help="results folder(s) to merge (default results/SUITE)"
    )
    rep.add_argument("--out", help="where to write (default: the first results folder)")
    rep.add_argument(
        "--reference",
        help="reference results to compare with (default results/reference/SUITE when it "
        "exists): a 'Reproduction check' section, never ranked with the run",
    )
    rep.add_argument(
        "--no-reference", action="store_true", help="no comparison with reference results"
    )
    rep.add_argument("--no-plots", action="store_true", help="tables only: no plots/ (faster)")
    rep.set_defaults(func=_cmd_report)

    ls = sub.add_parser("list", help="list suites, scenarios, methods, datasets or losses")
    ls.add_argument(
        "what",
        nargs="?",
        default="scenarios",
        choices=("suites", "scenarios", "methods", "datasets", "losses", "transformations"),
    )
    ls.add_argument("--cache", help="cache folder listed by `transformations` (default $FCT_CACHE)")
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard filter")
    ls.add_argument(
        "--plugin", action="append", help="module or .py file registering extra methods"
    )
    ls.set_defaults(func=_cmd_list)

    from fct.export import add_parser as add_export  # the subcommand's work is fct.export

    add_export(sub)

    from fct import transform

    tf = sub.add_parser("transform", help="stream a gallery of .npy shards through a trained h")
    transform.add_arguments(tf)
    tf.set_defaults(func=lambda a: transform.command(a))

    from fct.throughput.presets import SIZES

    bench = sub.add_parser("bench", help="throughput benchmarks")
    inner = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    tr = inner.add_parser(
        "transformation",
        help="h's embeddings/s (eager, folded, compiled) vs its GEMM peak and vs backfilling",
    )
    tr.add_argument(
        "--quick", action="store_true", help="a few seconds per configuration (smoke check)"
    )
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    tr.add_argument(
        "--dtype", help="float32 and/or bfloat16, comma-separated (default: cpu float32, cuda both)"
    )
    tr.add_argument(
        "--sizes",
        choices=(*SIZES, "both"),
        default="both",
        help="paper sizes (h 128/128/128, ResNet50), the quickstart's, or both (default)",
    )
    tr.add_argument("--batches", help="comma-separated h batch sizes (default 4096 on CPU)")
    tr.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timed rounds per configuration (default 20)",
    )
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    tr.add_argument("--out", help="also write transformation.json and .md into this folder")
    tr.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fct`` console script."""
    import os

    # Under torchrun only rank 0 logs progress; the others say only what goes wrong.
    rank = int(os.environ.get("RANK", 0))
    who = f"rank {rank}: " if rank else ""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else (logging.WARNING if rank else logging.INFO),
            format=f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args.func(args) or 0)
    except FCTError as e:
        print(f"error: {who}{e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # `fct list | head`: the reader left. Quiet, as tools killed by SIGPIPE are (no
        # traceback, and none at exit when Python flushes stdout into the closed pipe).
        import contextlib

        with contextlib.suppress(OSError, ValueError):  # no real file behind stdout (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        message = _os_error_message(e)
        if message is None:
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, as FCTError
        return FCTError.exit_code
    except KeyboardInterrupt:
        print(
            "error: interrupted; rerun the same command to continue from the finished work",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

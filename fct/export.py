"""``fct export-embeddings``: a scenario's old, new and side-information embeddings written as
stored-embedding files (fct.precomputed's format), so any image scenario becomes a scenario
on embeddings (and another tool's adapters can be compared on the same vectors).

Writes, in ``--out``:

- ``train.npz``: the training set h is fitted on (``[transformation] train_on``: the new or
  the old model's training images), embedded by every model, un-augmented;
- ``eval.npz``: the evaluation split;
- ``suite.toml``: a one-scenario suite on those two files (the methods that run on stored
  embeddings), ready for ``fct run OUT/suite.toml``.

Each holds ``old``, ``new``, ``labels`` and ``side`` when the scenario has side-information.
The models come from the cache (trained first when missing). ``--method NAME`` takes that
method's query model as the new model (BCT's compatible model, say) instead of Independent's.
Every file is written through a temp file and renamed, after all embeddings are computed:
an interrupted export leaves no part of a file.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from fct.artifacts import Cache
from fct.context import Context
from fct.errors import FCTError
from fct.io import atomic_path, write_text
from fct.runner import check_scenario
from fct.scenarios import load_suite
from fct.session import Role, Session

log = logging.getLogger(__name__)

#: Methods a stored-embedding suite written by the export runs by default.
STORED_METHODS = (
    "independent",
    "fct",
    "fct_side",
    "procrustes",
    "affine",
    "low_rank",
    "mlp_adapter",
)


def add_parser(sub) -> None:
    """The ``export-embeddings`` subcommand (called by fct.cli.build_parser)."""
    ex = sub.add_parser(
        "export-embeddings",
        help="write a scenario's old/new/side embeddings as stored-embedding files",
    )
    ex.add_argument("suite", help="suite name or path to a .toml")
    ex.add_argument("--scenario", required=True, help="the scenario's name")
    ex.add_argument("--out", required=True, help="folder for train.npz, eval.npz, suite.toml")
    ex.add_argument("--method", help="take this method's query model as the new model")
    ex.add_argument("--cache", help="cache folder (default: $FCT_CACHE or ~/.cache/fct)")
    ex.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ex.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    ex.add_argument("--data-root", help="folder holding the datasets")
    ex.add_argument("--download", action="store_true", help="let torchvision download data")
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``fct export-embeddings`` from parsed arguments."""
    from fct.threads import configure_threads

    configure_threads(quiet=True)
    written = export_embeddings(
        args.suite,
        args.scenario,
        Path(args.out),
        method=args.method,
        cache=Path(args.cache) if args.cache else None,
        device=args.device,
        seed=args.seed,
        data_root=args.data_root,
        download=args.download,
    )
    print("\n".join(str(p) for p in written))
    return 0


def export_embeddings(
    suite_name: str,
    scenario: str,
    out: Path,
    method: str | None = None,
    cache: Path | None = None,
    device: str = "auto",
    seed: int = 0,
    data_root: str | None = None,
    download: bool = False,
) -> list[Path]:
    """Write ``out/train.npz``, ``out/eval.npz`` and ``out/suite.toml``; return their paths."""
    from fct.device import resolve_device

    suite = load_suite(suite_name)
    matches = [s for s in suite.scenarios if s.name == scenario]
    if not matches:
        names = ", ".join(s.name for s in suite.scenarios)
        raise FCTError(f"suite '{suite.name}' has no scenario '{scenario}'; it has: {names}")
    sc = matches[0]
    if sc.embeddings is not None:
        raise FCTError(
            f"scenario '{scenario}' already runs on stored embeddings ({sc.embeddings.train}, "
            f"{sc.embeddings.eval}); export an image scenario"
        )
    if seed < 0:
        raise FCTError(f"--seed must be >= 0, got {seed}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FCTError(f"--out {out} is a file; pass a folder")
    session = Session(
        Cache(cache),
        device=resolve_device(device),
        seed=seed,
        data_root=data_root,
        download=download,
    )
    ctx = Context(sc, session=session)
    refused = check_scenario(ctx, [method] if method else [])
    if refused:
        raise FCTError(f"method '{method}' cannot run scenario '{scenario}': {refused[method]}")
    old = ctx.old_model()
    if method:
        log.info("export: fitting %s for its query model", method)
        new = sc.method(method).fit(ctx).query_model
    else:
        new = ctx.new_model()
    side = ctx.side_model()
    train_role = Role.training(sc.transformation.train_on)
    sets = {}
    for name, role in (("train", train_role), ("eval", Role.EVAL)):
        old_x, labels = ctx.embed(old, role)
        arrays = {
            "old": old_x.float().numpy(),
            "new": ctx.embed(new, role)[0].float().numpy(),
            "labels": labels.numpy().astype(np.int64),
        }
        if side is not None:
            arrays["side"] = ctx.embed(side, role)[0].float().numpy()
        sets[name] = arrays
    written = []
    for name, arrays in sets.items():
        path = out / f"{name}.npz"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        log.info("export: %s (%d rows: %s)", path, len(arrays["labels"]), ", ".join(arrays))
        written.append(path)
    methods = [m for m in STORED_METHODS if side is not None or m != "fct_side"]
    text = (
        f"# Stored embeddings of {suite.name} / {scenario}"
        f"{f' (new model: {method})' if method else ''}, written by fct export-embeddings.\n"
        f'[suite]\nname = "{suite.name}-{scenario}-embeddings"\n'
        f"methods = {json.dumps(methods)}\n\n"
        f"[defaults.transformation]\n"
        + "".join(
            f"{k} = {json.dumps(v)}\n"
            for k, v in sc.transformation.as_dict().items()
            if k not in ("features", "views")
        )
        + f'\n[[scenario]]\nname = "{scenario}"\n'
        'embeddings = { train = "train.npz", eval = "eval.npz" }\n'
    )
    suite_file = out / "suite.toml"
    write_text(suite_file, text)
    written.append(suite_file)
    return written

"""The ``fct`` command line: evaluate, run, list, report, bench.

Every user-facing error is an FCTError: printed as one ``error: ...`` line naming the fix, exit
status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from fct import __version__
from fct.errors import FCTError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FCTError(f"{message}; see `{self.prog} --help`")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fct.retrieval import evaluate, load_npz

    query = load_npz(args.query)
    gallery = load_npz(args.gallery) if args.gallery else None
    if args.paired and gallery is None:
        raise FCTError("--paired needs --gallery (without a gallery the query set is evaluated leave-one-out)")
    out = evaluate(query, gallery, paired=args.paired, distance=args.distance,
                   backend=args.backend, device=args.device,
                   progress=sys.stderr.isatty() and not args.json)
    if out["n_skipped"]:
        print(
            f"note: {out['n_skipped']} queries have no same-class item in the gallery "
            "(e.g. a class with a single item, left out) and are excluded from every metric",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        mode = "paired" if args.paired else ("leave-one-out" if gallery is None else "query vs gallery")
        print(f"{mode}, {out['distance']} distance, {out['backend']} backend: "
              f"{out['n_query']} queries scored, {out['n_skipped']} skipped, {out['n_gallery']} gallery items")
        print(f"{'top1':>8} {'top5':>8} {'mAP':>8} {'mAP@R':>8}")
        print(" ".join(f"{out[k]:8.2f}" for k in ("top1", "top5", "mAP", "mAP@R")))
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
    ev.add_argument("--device", default="cpu", help="cpu or cuda (torch backend, or faiss with GPU support)")
    ev.add_argument("--paired", action="store_true",
                    help="query i and gallery i are one item encoded by two models: exclude it")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fct`` console script."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args.func(args) or 0)
    except FCTError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue from the finished work", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

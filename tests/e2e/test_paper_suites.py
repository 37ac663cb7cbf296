"""Every paper suite's whole wiring with `--smoke` on fabricated copies of its dataset in the
real on-disk format, end to end through `fct run` (real timm architectures, shrunk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fabricate import (
    fabricate_cifar100,
    fabricate_imagenet,
    fabricate_places365,
    fabricate_vggface2,
)

from fct.cli import main
from fct.scenarios import load_suite


def fabricate(suite: str, root: Path) -> None:
    if suite == "cifar100":
        fabricate_cifar100(root / "cifar100", per_class=4)
    elif suite == "imagenet":
        fabricate_imagenet(root / "imagenet", synsets=12, per_class=4, size=40)
        fabricate_places365(root / "places365", categories=12, per_class=4, size=40)
    elif suite == "places365":
        fabricate_places365(root / "places365", categories=12, per_class=4, size=40)
    elif suite == "vggface2":
        fabricate_vggface2(root / "vggface2", train_ids=12, test_ids=10, per_id=4, size=40)


@pytest.mark.parametrize("suite", ["cifar100", "imagenet", "places365", "vggface2"])
def test_paper_suite_smoke_end_to_end(suite, tmp_path):
    data, out, cache = tmp_path / "data", tmp_path / "out", tmp_path / "cache"
    fabricate(suite, data)
    code = main(
        [
            "run",
            suite,
            "--smoke",
            "--no-plots",  # the wiring: plots are tested on tiny and in the report tests
            "--data-root",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(cache),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    expected = {(sc.name, m) for sc in load_suite(suite).scenarios for m in sc.methods}
    found = set()
    for p in (out / "runs").glob("*/*.json"):
        rec = json.loads(p.read_text())
        found.add((rec["scenario"], rec["method"]))
        assert set(rec["cases"]) == {"old/old", "new/new", "cross"}
        assert rec["scenario_config"]["eval"]["max_per_class"] == 4
    assert found == expected
    board = (out / "leaderboard.md").read_text()
    assert "FCT" in board and "Independent" in board
    assert (out / "index.html").exists()
    assert not (out / "plots").exists()  # --no-plots reached the run's report

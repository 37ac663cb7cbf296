"""Every seed of a run comes from fct.seeding.derive_seed, and each stream keeps its formula.

The expected values are the formulas the streams had when they lived in their own modules,
written out here independently: a changed formula would silently change every trained artifact
and record, so it must fail here first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fct.hashing import config_hash
from fct.seeding import STREAMS, derive_seed

PKG = Path(__file__).resolve().parents[2] / "fct"


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40 + 3])
def test_every_stream_keeps_its_formula(seed: int) -> None:
    spec = {"arch": "test_resnet", "embedding_dim": 32}
    assert derive_seed("init", seed, spec, 3) == int(
        config_hash({"init": [spec, 3], "seed": seed}), 16
    )
    assert derive_seed("fastfill-init", seed, spec, 8, 16, 0) == int(
        config_hash({"fastfill": [spec, 8, 16, 0], "seed": seed}), 16
    )
    assert derive_seed("method", seed, "bct") == int(
        config_hash({"method": "bct", "seed": seed}), 16
    ) % (2**63 - 1)
    assert derive_seed("sequence-step", seed, "fct", 2) == int(
        config_hash({"method": "fct", "seed": seed, "step": 2}), 16
    ) % (2**63 - 1)
    for epoch in (0, 1, 5):
        assert derive_seed("epoch", seed, epoch) == (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)
        assert derive_seed("shuffle", seed, epoch) == seed + epoch
        assert derive_seed("h-batches", seed, epoch) == seed * 7919 + epoch
        state = np.random.SeedSequence([seed, epoch, 1]).generate_state(1, np.uint64)[0]
        assert derive_seed("augment", seed, epoch) == int(state >> 1)
    assert derive_seed("curves", seed) == seed


def test_streams_differ_and_depend_on_the_seed_and_parts() -> None:
    epoch_streams = {"epoch", "shuffle", "augment", "h-batches"}

    def parts(stream: str) -> tuple:
        if stream == "sequence-step":
            return ("x", 1)
        return () if stream == "curves" else (3,) if stream in epoch_streams else ("x",)

    for s in STREAMS:
        assert derive_seed(s, 0, *parts(s)) != derive_seed(s, 1, *parts(s)), s
    assert derive_seed("init", 0, "a") != derive_seed("init", 0, "b")
    assert derive_seed("epoch", 0, 1) != derive_seed("epoch", 0, 2)


def test_unknown_stream_and_wrong_parts_are_refused() -> None:
    with pytest.raises(KeyError, match="unknown random stream"):
        derive_seed("dropout", 0)
    with pytest.raises(TypeError):
        derive_seed("curves", 0, 1)
    with pytest.raises(ValueError):
        derive_seed("epoch", 0)


def test_no_seed_formula_outside_the_seeding_module() -> None:
    """The constants and constructions of the formulas appear in fct/seeding.py only."""
    pattern = re.compile(r"7919|1_000_003|SeedSequence|% \(2\*\*63|manual_seed\([^)]*[+*]")
    offenders = [
        f"{path.relative_to(PKG.parent)}:{n}"
        for path in PKG.rglob("*.py")
        if path.name != "seeding.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []

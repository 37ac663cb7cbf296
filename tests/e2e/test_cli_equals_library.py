"""`fct evaluate` gives exactly what `fct.retrieval.evaluate` gives, for every flag: a flag the
CLI dropped or mixed up (`--distance` ignored, `--paired` not passed) fails here."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from fct.cli import main
from fct.retrieval import FeatureSet, evaluate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Query and gallery sets whose metrics differ under every flag: l2 and cosine rank them
    differently (norms vary), the gallery is a perturbed copy (paired matters), ties exist."""
    rng = np.random.default_rng(7)
    n, d = 120, 8
    labels = rng.integers(0, 6, n)
    centers = rng.normal(size=(6, d))
    q = centers[labels] + 0.9 * rng.normal(size=(n, d))
    q *= rng.uniform(0.2, 5.0, size=(n, 1))  # norms that make cosine and l2 disagree
    g = q + 0.6 * rng.normal(size=(n, d))
    q[5] = q[6]  # a tie
    base = tmp_path_factory.mktemp("cli-eq")
    np.savez(base / "q.npz", features=q.astype(np.float32), labels=labels)
    np.savez(base / "g.npz", features=g.astype(np.float32), labels=labels)
    return base, FeatureSet(q.astype(np.float32), labels), FeatureSet(g.astype(np.float32), labels)


CASES = [
    (distance, backend, gallery, paired)
    for distance, backend, (gallery, paired) in itertools.product(
        ("l2", "cosine"), ("torch", "faiss"), ((False, False), (True, False), (True, True))
    )
]


@pytest.mark.parametrize(("distance", "backend", "gallery", "paired"), CASES)
def test_cli_output_equals_the_library(files, capsys, distance, backend, gallery, paired):
    base, q, g = files
    argv = ["evaluate", "--query", str(base / "q.npz"), "--json"]
    argv += ["--distance", distance, "--backend", backend]
    if gallery:
        argv += ["--gallery", str(base / "g.npz")]
    if paired:
        argv += ["--paired"]
    capsys.readouterr()
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = evaluate(q, g if gallery else None, paired=paired, distance=distance, backend=backend)
    assert got == pytest.approx(want, abs=1e-9)
    assert got["distance"] == distance and got["backend"] == backend


def test_the_flags_change_the_numbers(files):
    """The fixture is strong enough for the test above to catch a dropped flag."""
    _, q, g = files
    metrics = ("top1", "top5", "mAP", "mAP@R")

    def values(**kw):
        out = evaluate(q, **kw)
        return tuple(out[k] for k in metrics) + (out["n_query"],)

    assert values(distance="l2") != values(distance="cosine")
    assert values(gallery=g) != values()
    assert values(gallery=g, paired=True) != values(gallery=g)

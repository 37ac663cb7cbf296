"""A query set apart from the gallery, as a scenario's [eval] names it (fct.scenarios.EvalSpec,
checked by fct.suite_checks; the query draw in fct.embedding.query_mask): bad specs are one
line, and scenarios that do not use the new keys keep their config hashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fct.embedding import query_mask
from fct.errors import FCTError
from fct.runner import record_digest
from fct.scenarios import SUITES_DIR, EvalSpec, load_suite
from fct.session import Role

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference"
TINY = SUITES_DIR / "tiny.toml"


def test_reference_records_keep_their_config_hashes() -> None:
    """The committed reference records were made before the query keys existed: their
    scenarios' configs (and so their record digests) must not change."""
    checked = 0
    for suite_dir in sorted(p for p in REFERENCE.iterdir() if p.is_dir()):
        suite = load_suite(suite_dir.name)
        scenarios = {s.name: s for s in suite.scenarios}
        for path in sorted((suite_dir / "runs").glob("*/*.json")):
            rec = json.loads(path.read_text())
            sc = scenarios[rec["scenario"]]
            digest = record_digest(sc, sc.method(rec["method"]), rec["seed"])
            assert digest == rec["config_hash"], path
            assert sc.as_dict()["eval"] == rec["scenario_config"]["eval"], path
            checked += 1
    assert checked >= 20


def test_unset_keys_stay_out_of_the_config_and_set_ones_go_in() -> None:
    for suite in ("tiny", "quickstart"):
        for sc in load_suite(suite).scenarios:
            assert not set(EvalSpec.OPTIONAL) & set(sc.as_dict()["eval"])
            assert not sc.eval.separate
    (sc,) = load_suite("tiny").scenarios
    split = load_suite("tiny", overrides={("defaults", "eval", "query_split"): "train"}).scenarios[
        0
    ]
    frac = load_suite("tiny", overrides={("defaults", "eval", "query_fraction"): 0.2}).scenarios[0]
    assert split.as_dict()["eval"]["query_split"] == "train" and split.eval.separate
    assert frac.as_dict()["eval"]["query_fraction"] == 0.2 and frac.eval.separate
    assert len({sc.digest(), split.digest(), frac.digest()}) == 3
    assert (split.eval.query_data, split.eval.gallery_data) == ("train", "test")
    assert (frac.eval.query_data, frac.eval.gallery_data) == ("test", "test")


@pytest.mark.parametrize(
    "keys, needle",
    [
        ('query_split = "val"', "unknown query_split 'val'; use one of 'train', 'test'"),
        ('query_split = "train"\ngallery_split = "tst"', "unknown gallery_split 'tst'"),
        ('split = "dev"', "unknown split 'dev'"),
        ("query_split = 3", "unknown query_split 3"),
        ("query_fraction = 0", "query_fraction must lie in (0, 1)"),
        ("query_fraction = 1", "query_fraction must lie in (0, 1)"),
        ("query_fraction = 1.5", "query_fraction must lie in (0, 1)"),
        ("query_fraction = -0.2", "query_fraction must lie in (0, 1)"),
        ('query_fraction = "half"', "query_fraction must be a number in (0, 1)"),
        ("query_fraction = true", "query_fraction must be a number in (0, 1)"),
        (
            'query_fraction = 0.2\nquery_split = "train"',
            "query_fraction and query_split/gallery_split both name the queries",
        ),
        ('gallery_split = "train"', "gallery_split needs query_split"),
        ('query_split = "test"', "query_split 'test' is also the gallery's split"),
        (
            'query_split = "train"\ngallery_split = "train"',
            "query_split 'train' is also the gallery's split",
        ),
        ('query_splitt = "train"', "unknown key 'query_splitt' (did you mean 'query_split'?)"),
    ],
)
def test_bad_query_specs_are_one_line(keys, needle, tmp_path) -> None:
    text = TINY.read_text().replace(
        '[defaults.eval]\ndataset = "synthetic"',
        "[defaults.eval]\n" + 'dataset = "synthetic"\n' + keys,
    )
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(FCTError) as err:
        load_suite(str(path))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert "[eval]" in msg


def test_query_draw_is_stratified_seeded_and_fixed_by_the_spec() -> None:
    labels = torch.from_numpy(np.repeat(np.arange(5), [10, 7, 3, 2, 1]))
    spec = EvalSpec(dataset="synthetic", query_fraction=0.25)
    mask = query_mask(spec, labels).numpy()
    # Per class: round(0.25 c) halves up, at least 1 and at most c - 1; a single item stays.
    per_class = [int(mask[labels.numpy() == c].sum()) for c in range(5)]
    assert per_class == [3, 2, 1, 1, 0]
    assert np.array_equal(mask, query_mask(spec, labels).numpy())  # the same draw every time
    other = query_mask(EvalSpec(dataset="synthetic", query_fraction=0.25, split="train"), labels)
    assert not np.array_equal(mask, other.numpy())  # another split: another draw
    wide = query_mask(EvalSpec(dataset="synthetic", query_fraction=0.9), labels).numpy()
    assert [int(wide[labels.numpy() == c].sum()) for c in range(5)] == [9, 6, 2, 1, 0]


def test_query_role() -> None:
    assert Role.parse("query") is Role.QUERY
    with pytest.raises(FCTError, match="'query'"):
        Role.parse("queries")

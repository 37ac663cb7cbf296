"""The run's seed reaches everything random (issue 18, item 3): the training loaders' order and
augmentation, every module's initial weights (backbones, h), the batches h is fitted on and the
backfilling curves' random order. Same seed: the same draws; another seed: other draws. The
end-to-end check (whole records across runs and seeds) is tests/e2e/test_determinism.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fct import builders
from fct.artifacts import Cache
from fct.curves import backfill_curves, curve_orders
from fct.h_data import h_batches
from fct.scenarios import load_suite
from fct.session import Session

SC = load_suite("tiny").scenarios[0]


class Captured(Exception):
    pass


def session(tmp_path, seed: int) -> Session:
    return Session(Cache(tmp_path / f"cache{seed}"), seed=seed)


def first_batch(tmp_path, seed: int, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    loader = builders.train_loader(session(tmp_path, seed), SC.new, "supervised", shuffle=shuffle)
    return next(iter(loader))


def test_the_training_loader_draws_from_the_run_seed(tmp_path):
    x0, y0 = first_batch(tmp_path, 0)
    x0b, y0b = first_batch(tmp_path, 0)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    x1, y1 = first_batch(tmp_path, 1)
    assert not torch.equal(y0, y1)  # another shuffle
    # Without shuffling the items are the same: only the augmentation can differ.
    a0, b0 = first_batch(tmp_path, 0, shuffle=False)
    a1, b1 = first_batch(tmp_path, 1, shuffle=False)
    assert torch.equal(b0, b1)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, first_batch(tmp_path, 0, shuffle=False)[0])


def backbone_init(monkeypatch, tmp_path, seed: int) -> dict[str, torch.Tensor]:
    got = {}

    def capture(session, model, *args, **kwargs):
        got["model"] = model
        raise Captured

    monkeypatch.setattr(builders, "fit_on_images", capture)
    monkeypatch.setattr(builders, "load_or_train", lambda s, entry, module, fit, spec: fit(entry))
    torch.manual_seed(1234)  # the global stream must not matter
    with pytest.raises(Captured):
        builders.train_backbone(session(tmp_path, seed), SC.new, None)
    torch.manual_seed(99)
    return {k: v.clone() for k, v in got["model"].state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_backbone_initial_weights_follow_the_seed_only(monkeypatch, tmp_path):
    w0 = backbone_init(monkeypatch, tmp_path, 0)
    assert same(w0, backbone_init(monkeypatch, tmp_path, 0))
    assert not same(w0, backbone_init(monkeypatch, tmp_path, 1))


def h_init(monkeypatch, tmp_path, seed: int) -> dict[str, torch.Tensor]:
    got = {}

    def capture(model, *args, **kwargs):
        got["h"] = model
        raise Captured

    import fct.h_data

    monkeypatch.setattr(builders, "train", capture)
    monkeypatch.setattr(fct.h_data, "h_batches", lambda *a: (None, 1))
    monkeypatch.setattr(builders, "load_or_train", lambda s, entry, module, fit, spec: fit(entry))

    def trained(digest, spec):
        return SimpleNamespace(digest=digest, spec=spec, name=digest)

    models = (trained("o", SC.old), trained("n", SC.new), None)
    torch.manual_seed(seed + 7)  # the global stream must not matter
    with pytest.raises(Captured):
        builders.train_transformation(session(tmp_path, seed), None, SC.transformation, models)
    return {k: v.clone() for k, v in got["h"].state_dict().items()}


def test_hs_initial_weights_follow_the_seed_only(monkeypatch, tmp_path):
    w0 = h_init(monkeypatch, tmp_path, 0)
    assert same(w0, h_init(monkeypatch, tmp_path, 0))
    assert not same(w0, h_init(monkeypatch, tmp_path, 1))


def h_order(seed: int) -> list[torch.Tensor]:
    """The first epoch's batches of h's cached fit: the labels show the order."""
    n = 300
    y = torch.arange(n) % 20
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    ctx = SimpleNamespace(seed=seed, device=torch.device("cpu"), embed=lambda m, r, view=0: (x, y))
    models = (SimpleNamespace(), SimpleNamespace(), None)
    batches, steps = h_batches(ctx, SC.transformation, models, True, "h")
    assert steps == 2
    return [b[0].flatten() for b in batches(0)]


def test_hs_batches_are_shuffled_from_the_seed():
    a, b, c = h_order(0), h_order(0), h_order(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])


def curves(seed: int) -> dict:
    g = np.random.default_rng(5)
    n, d = 120, 6
    labels = np.arange(n) % 4
    new = (g.normal(size=(4, d))[labels] * 2 + g.normal(size=(n, d))).astype(np.float32)
    gallery = g.normal(size=(n, d)).astype(np.float32)  # an incompatible gallery
    opts = {"distance": "l2", "backend": "torch", "device": "cpu"}
    rec = backfill_curves(
        curve_orders(n, seed, None),
        torch.from_numpy(new),
        torch.from_numpy(gallery),
        torch.from_numpy(labels),
        opts,
    )
    return rec


def test_the_curves_random_order_follows_the_run_seed():
    a, b, c = curves(0), curves(0), curves(1)
    assert a["curves"] == b["curves"]
    ra, rc = a["curves"]["random"], c["curves"]["random"]
    assert ra[0] == rc[0] and ra[-1] == rc[-1]  # nothing and everything backfilled
    assert ra[1:-1] != rc[1:-1]

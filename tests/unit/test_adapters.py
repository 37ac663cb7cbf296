"""The adapter maps (fct.methods.adapters) against their closed-form definitions: Procrustes
recovers a known rotation (and, between sizes, equals the zero-padded square problem), the
affine map equals numpy's least squares (ridge 0) and the normal equations (ridge > 0), the
low-rank map has the asked rank and is the best rank-r fit of the fitted values, and the
residual MLP lowers the error below its starting map. A fitted map is a cache entry: a second
fit of the same key loads it (no refit, the same rows out, the stored fit time), a changed
setting or adapter source refits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stored_embeddings import make_arrays, write_suite

from fct.artifacts import Cache
from fct.context import Context
from fct.errors import FCTError
from fct.methods import METHODS, adapters, make_settings
from fct.methods.adapters import (
    MLPAdapter,
    MLPSettings,
    affine,
    low_rank,
    procrustes,
)
from fct.scenarios import load_suite
from fct.transform_models import cached_transformations


def _data(n=400, d_in=12, d_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return x, g


def test_procrustes_recovers_a_rotation_and_shift():
    x, g = _data()
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    y = x @ q + 3.0
    m = procrustes(x, y)
    assert torch.allclose(m.weight.double(), q, atol=1e-5)
    assert torch.allclose(m(x).double(), y, atol=1e-4)
    w = m.weight.double()
    assert torch.allclose(w.T @ w, torch.eye(12, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(8, 12), (12, 8)])
def test_procrustes_between_sizes_is_the_zero_padded_square_solution(d_in, d_out):
    x, g = _data(d_in=d_in)
    y = torch.randn(400, d_out, generator=g, dtype=torch.float64) + x[:, :1]
    w = procrustes(x, y, center=False).weight.double()
    d = max(d_in, d_out)
    xp = torch.zeros(400, d, dtype=torch.float64)
    yp = torch.zeros(400, d, dtype=torch.float64)
    xp[:, :d_in], yp[:, :d_out] = x, y
    u, _, vh = torch.linalg.svd(xp.T @ yp)
    square = (u @ vh)[:d_in, :d_out]
    # The square problem's residual over the real coordinates is the same (its solution is
    # unique on them up to the null directions the padding adds).
    assert torch.allclose(x @ w, x @ square, atol=1e-6) or torch.linalg.norm(
        x @ w - y
    ) == pytest.approx(float(torch.linalg.norm(x @ square - y)), rel=1e-9)
    eye = torch.eye(min(d_in, d_out), dtype=torch.float64)
    gram = w.T @ w if d_in >= d_out else w @ w.T
    assert torch.allclose(gram, eye, atol=1e-6)  # semi-orthogonal


def test_affine_is_least_squares_and_ridge_the_normal_equations():
    x, g = _data(d_in=10, d_out=6)
    y = x @ torch.randn(10, 6, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        400, 6, generator=g, dtype=torch.float64
    )
    m = affine(x, y, 0.0)
    xa = np.hstack([x.numpy(), np.ones((400, 1))])
    coef, *_ = np.linalg.lstsq(xa, y.numpy(), rcond=None)
    np.testing.assert_allclose(m.weight.numpy(), coef[:10], atol=1e-5)
    np.testing.assert_allclose(m(x).numpy(), xa @ coef, atol=1e-4)
    lam = 0.5
    xc = x.numpy() - x.numpy().mean(0)
    yc = y.numpy() - y.numpy().mean(0)
    a = np.linalg.solve(xc.T @ xc / 400 + lam * np.eye(10), xc.T @ yc / 400)
    np.testing.assert_allclose(affine(x, y, lam).weight.numpy(), a, atol=1e-5)


def test_low_rank_has_the_rank_and_is_the_best_rank_r_fit():
    x, g = _data(d_in=10)
    y = torch.randn(400, 9, generator=g, dtype=torch.float64) + x[:, :9]
    m = low_rank(x, y, 0.0, rank=3)
    assert torch.linalg.matrix_rank(m.weight.double(), tol=1e-4) == 3
    full = affine(x, y, 0.0)
    fitted = (x - x.mean(0)) @ full.weight.double()
    u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
    got = (x - x.mean(0)) @ m.weight.double()
    assert torch.allclose(got, best, atol=1e-4)


def test_mlp_adapter_lowers_the_error_of_its_start():
    x, g = _data(d_in=8)
    y = torch.tanh(x) * 2 + 0.5 * x  # not linear: the MLP has something to add
    torch.manual_seed(0)
    method = MLPAdapter(MLPSettings(hidden=64, epochs=30, lr=3e-3, batch_size=64))
    model = method.fit_map(x, y)
    with torch.no_grad():
        before = (x - y).pow(2).sum(1).mean()  # the identity skip alone
        after = (model(x).double() - y).pow(2).sum(1).mean()
    assert after < 0.3 * before


def test_settings_are_checked():
    with pytest.raises(FCTError, match="direction"):
        make_settings(METHODS.get("procrustes").Settings, {"direction": "both"})
    with pytest.raises(FCTError, match="ridge"):
        make_settings(METHODS.get("affine").Settings, {"ridge": -1.0})
    with pytest.raises(FCTError, match="rank"):
        make_settings(METHODS.get("low_rank").Settings, {"rank": 0})
    with pytest.raises(FCTError, match="lr"):
        make_settings(METHODS.get("mlp_adapter").Settings, {"lr": 0.0})


# --- the fitted map in the cache ----------------------------------------------------------------


@pytest.fixture
def stored(tmp_path):
    """A stored-embedding scenario (16-d old, 24-d new) and a fresh Context on one cache per
    call (what a rerun of `fct run` gets)."""
    suite = write_suite(tmp_path, ["affine"], make_arrays(240), make_arrays(120, seed=1))
    (sc,) = load_suite(str(suite)).scenarios
    return lambda: Context(sc, Cache(tmp_path / "cache"), seed=0)


def _method(name: str, **settings):
    return METHODS.get(name)(make_settings(METHODS.get(name).Settings, settings))


def _update(dep):
    return dep.query_update or dep.gallery_update


SETTINGS = {
    "procrustes": {},
    "affine": {"ridge": 0.01},
    "low_rank": {"rank": 4},
    "mlp_adapter": {"hidden": 8, "epochs": 2, "batch_size": 64},
}


@pytest.mark.parametrize("direction", ["query", "gallery"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_second_fit_loads_the_map_from_the_cache(stored, monkeypatch, name, direction):
    torch.manual_seed(0)
    first = _method(name, direction=direction, **SETTINGS[name]).fit(stored())
    entry = first.artifacts[-1]
    assert entry.built_now and entry.entry.kind == "transformations"
    assert entry.name == f"{name}-new-train"
    assert first.fit_seconds == pytest.approx(entry.train_seconds) and first.fit_seconds > 0
    assert first.notes == {"direction": direction, "fit_rows": 240}

    def refit(*_a, **_k):
        raise AssertionError("refitted: the cached map was not loaded")

    monkeypatch.setattr(type(_method(name)), "fit_map", refit)
    second = _method(name, direction=direction, **SETTINGS[name]).fit(stored())
    assert not second.artifacts[-1].built_now
    assert second.artifacts[-1].digest == entry.digest
    assert second.fit_seconds == first.fit_seconds  # the stored fit time, not 0
    assert second.notes == first.notes
    x = torch.randn(37, 24 if direction == "query" else 16)
    a, b = _update(first)(x), _update(second)(x)
    assert a.shape == (37, 16 if direction == "query" else 24)
    assert torch.equal(a, b)


def test_a_changed_setting_or_source_refits(stored, monkeypatch):
    lams = []
    real = adapters.affine

    def counting(x, y, lam):
        lams.append(lam)
        return real(x, y, lam)

    monkeypatch.setattr(adapters, "affine", counting)
    g = _method("affine", direction="gallery").fit(stored())
    _method("affine", direction="gallery", label="shown name only").fit(stored())
    assert lams == [1e-3]  # the display label is not part of the key
    _method("affine", direction="gallery", ridge=0.5).fit(stored())
    _method("affine", direction="query").fit(stored())
    assert lams == [1e-3, 0.5, 1e-3]
    monkeypatch.setattr(adapters, "source_digest", lambda obj: "edited")
    again = _method("affine", direction="gallery").fit(stored())
    assert lams == [1e-3, 0.5, 1e-3, 1e-3]  # adapters.py edited: refitted
    assert again.artifacts[-1].digest != g.artifacts[-1].digest
    # Four entries, each listed with its kind, sizes, direction and fit time.
    listed = dict(cached_transformations(g.artifacts[-1].entry.root))
    assert len(listed) == 4
    mine = listed[g.artifacts[-1].entry.path.name]
    assert mine.startswith(
        "adapter affine, gallery side (maps the gallery old->new), linear 16->24, fit "
    )
    assert (
        sum("query side (maps queries new->old), linear 24->16" in v for v in listed.values()) == 1
    )


def test_a_map_fct_transform_cannot_apply_is_refused(stored, monkeypatch):
    monkeypatch.setattr(
        adapters.Affine, "fit_map", lambda self, x, y: torch.nn.Linear(x.shape[1], y.shape[1])
    )
    with pytest.raises(FCTError, match="return a LinearMap or a ResidualMLP"):
        _method("affine").fit(stored())

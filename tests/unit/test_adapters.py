"""The adapter maps (fct.methods.adapters) against their closed-form definitions: Procrustes
recovers a known rotation (and, between sizes, equals the zero-padded square problem), the
affine map equals numpy's least squares (ridge 0) and the normal equations (ridge > 0), the
low-rank map has the asked rank and is the best rank-r fit of the fitted values, and the
residual MLP lowers the error below its starting map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fct.errors import FCTError
from fct.methods import METHODS, make_settings
from fct.methods.adapters import (
    MLPAdapter,
    MLPSettings,
    affine,
    low_rank,
    procrustes,
)


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

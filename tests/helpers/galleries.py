"""Small galleries of .npy shards, small trained-looking h's and fitted adapter maps, for the
`fct transform` tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fct.models import Transformation


def make_h(d_old=16, d_new=8, d_side=0, hidden=32, seed=0) -> Transformation:
    """A small h with non-trivial BatchNorm statistics (so folding them is exercised)."""
    torch.manual_seed(seed)
    h = Transformation(d_old, d_new, d_side, hidden)
    for m in h.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return h.eval()


def gallery(folder: Path, sizes, width=16, dtype=np.float32, seed=0) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i, n in enumerate(sizes):
        a = rng.standard_normal((n, width)).astype(dtype)
        np.save(folder / f"part{i:02d}.npy", a)
        arrays.append(a)
    return arrays


def in_memory(h: Transformation, x: np.ndarray, side=None, batch=64) -> np.ndarray:
    """h applied the way fct.embedding.apply_transformation does: folded, in batches."""
    folded = h.folded()
    # fct transform's first call is a full batch (fct.transform._warm): oneDNN packs the
    # weights for that row count, which can move the last bit.
    with torch.no_grad():
        s0 = None if side is None else torch.zeros(batch, side.shape[1])
        folded(torch.zeros(batch, x.shape[1]), s0)
    out = []
    with torch.no_grad():
        for a in range(0, len(x), batch):
            s = None if side is None else torch.from_numpy(side[a : a + batch].astype(np.float32))
            out.append(folded(torch.from_numpy(x[a : a + batch].astype(np.float32)), s))
    return torch.cat(out).numpy() if out else np.zeros((0, h.d_new), np.float32)


def adapter_maps(d_in=16, d_out=8, seed=0) -> dict:
    """name -> (a fitted adapter map from d_in to d_out, its kind): each adapter's fit on
    random paired rows; the residual MLP trained a few steps, so its layers are not zeros."""
    from fct.methods.adapters import MLPAdapter, MLPSettings, affine, low_rank, procrustes

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_in, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :d_out]) + 0.1 * torch.randn(200, d_out, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    mlp = MLPAdapter(MLPSettings(hidden=6, epochs=3, batch_size=50, lr=1e-2)).fit_map(x, y)
    torch.manual_seed(seed)
    square = MLPAdapter(MLPSettings(hidden=6, epochs=2, batch_size=50)).fit_map(x, x)
    return {
        "procrustes": (procrustes(x, y), "linear"),
        "affine": (affine(x, y, 0.1), "linear"),
        "low_rank": (low_rank(x, y, 0.1, 3), "linear"),
        "mlp_adapter": (mlp, "residual_mlp"),  # d_in != d_out: a linear skip map
        "mlp_identity_skip": (square, "residual_mlp"),
    }

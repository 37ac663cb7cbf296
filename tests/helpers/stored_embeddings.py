"""Fabricated stored embeddings (fct.precomputed's format) for tests: an old and a new model's
embeddings of the same items, related by a known map, with class structure.

The new embeddings are class centres plus noise; the old ones a fixed linear map of the new
(a random rotation, cut to ``d_old`` columns) plus noise, so every adapter has something to
recover and a perfect map exists up to the noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUITE = """
[suite]
name = "stored"
methods = {methods}

[defaults.transformation]
hidden = 32
epochs = 3
batch_size = 64
warmup_epochs = 0

[defaults.eval]
curves = false

[[scenario]]
name = "pair"
embeddings = {{ train = "{train}", eval = "{eval}" }}
"""


def make_arrays(
    n: int,
    d_old: int = 16,
    d_new: int = 24,
    classes: int = 8,
    side: int | None = None,
    seed: int = 0,
    noise: float = 0.3,
) -> dict[str, np.ndarray]:
    """``old``, ``new``, ``labels`` (and ``side``) arrays of ``n`` items."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(classes, d_new)) * 2
    rot = np.linalg.qr(np.random.default_rng(99).normal(size=(d_new, d_new)))[0][:, :d_old]
    labels = np.arange(n) % classes
    new = centres[labels] + rng.normal(size=(n, d_new))
    old = new @ rot + noise * rng.normal(size=(n, d_old))
    out = {
        "old": old.astype(np.float32),
        "new": new.astype(np.float32),
        "labels": labels.astype(np.int64),
    }
    if side:
        out["side"] = (old[:, :side] + rng.normal(size=(n, side))).astype(np.float32)
    return out


def write_set(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An .npz (``path`` ending in .npz) or a folder of .npy files."""
    path = Path(path)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    else:
        path.mkdir(parents=True, exist_ok=True)
        for k, v in arrays.items():
            np.save(path / f"{k}.npy", v)
    return path


def write_suite(
    folder: Path,
    methods: list[str],
    train: dict | None = None,
    evals: dict | None = None,
    names: tuple[str, str] = ("train.npz", "eval.npz"),
    extra: str = "",
) -> Path:
    """A suite file with one stored-embedding scenario and its two sets in ``folder``."""
    folder = Path(folder)
    write_set(folder / names[0], train if train is not None else make_arrays(240, seed=0))
    write_set(folder / names[1], evals if evals is not None else make_arrays(160, seed=1))
    import json

    text = SUITE.format(methods=json.dumps(methods), train=names[0], eval=names[1]) + extra
    path = folder / "suite.toml"
    path.write_text(text)
    return path

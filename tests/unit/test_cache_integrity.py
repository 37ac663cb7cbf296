"""The verified cache and the no-pickle rule: planted pickles are never loaded, damaged entries
and checkpoints are detected, reported in one line and rebuilt, never used."""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, assert_cache_verifies, records, tiny_args

from fct.cli import main


class _Planted:
    """Unpickling this creates ``marker``: proof that someone called pickle on it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    """Write a pickle at ``path`` that creates ``marker`` when loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Planted(marker)))


def entry(cache: Path, kind: str, prefix: str) -> Path:
    """The one finished entry of ``kind`` whose name is ``prefix`` + the digest."""
    found = [p for p in (cache / kind).iterdir() if p.name.rsplit("-", 1)[0] == prefix]
    assert len(found) == 1, (prefix, found)
    return found[0]


@pytest.mark.slow  # end to end: a whole `fct` command
def test_planted_pickles_are_never_loaded_and_damage_is_rebuilt(
    clean_tiny, tmp_path, caplog, one_thread
):
    _, clean_cache, clean = clean_tiny
    cache, out, marker = tmp_path / "cache", tmp_path / "out", tmp_path / "PWNED"
    shutil.copytree(clean_cache, cache)

    # 1. The transformation's weights replaced by a pickle (a manifest mismatch).
    h = entry(cache, "transformations", "h-test_resnet-synthetic-all-ce-32")
    plant_pickle(h / "tensors.safetensors", marker)
    # 2. An extra model.pt beside an intact old model: the manifest does not list it.
    old = entry(cache, "models", "test_resnet-synthetic-0-9-ce-32")
    plant_pickle(old / "model.pt", marker)
    # 3. A features entry with flipped bytes (same size: only the checksum can tell).
    feats = entry(cache, "features", "test_resnet-synthetic-0-9-ce-32-synthetic-test")
    data = bytearray((feats / "tensors.safetensors").read_bytes())
    data[-16:] = bytes(255 - b for b in data[-16:])
    (feats / "tensors.safetensors").write_bytes(bytes(data))
    # 4. The side model must be trained again, and partial/ holds a "checkpoint" of pickles
    # whose state.json even carries their correct sha256 sums, plus a stray model.pt.
    side = entry(cache, "models", "test_resnet-synthetic-0-9-simclr-16")
    shutil.rmtree(side)
    ckpt = cache / "partial" / "models" / side.name / "epoch-0001"
    for f in ("model.safetensors", "optim.safetensors"):
        plant_pickle(ckpt / f, marker)
    sums = {
        f: hashlib.sha256((ckpt / f).read_bytes()).hexdigest()
        for f in ("model.safetensors", "optim.safetensors")
    }
    (ckpt / "state.json").write_text(
        json.dumps({"epoch": 1, "optim": {"scalars": {}, "param_groups": []}, "sha256": sums})
    )
    plant_pickle(ckpt.parent / "model.pt", marker)

    caplog.set_level("INFO")
    assert main(tiny_args(out, cache, "--no-plots")) == 0
    assert not marker.exists()
    log = caplog.text
    for damaged, why in (
        (h, "tensors.safetensors has "),  # ... N bytes, manifest says M
        (old, "unexpected file model.pt"),
        (feats, "tensors.safetensors checksum mismatch"),
    ):
        line = next(x for x in log.splitlines() if f"cache entry {damaged} is damaged (" in x)
        assert why in line and line.endswith("; rebuilding it")
    assert f"checkpoint {ckpt} is damaged or unreadable" in log
    assert "resuming" not in log  # the side model started over
    for rebuilt in (
        "models/test_resnet-synthetic-0-9-ce-32",
        "transformations/h-",
        "models/test_resnet-synthetic-0-9-simclr-16",
    ):
        assert f"training {rebuilt}" in log
    assert_cache_verifies(cache)
    assert records(out) == clean  # rebuilt, not used: the results are the clean run's
    assert len(list((cache / "models" / ".corrupt").iterdir())) == 1


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            yield (owner.id if isinstance(owner, ast.Name) else None), node.func.attr, node


def test_source_loads_nothing_with_pickle():
    """No pickle.load(s) or Unpickler outside CIFAR's restricted unpickler; torch.load only
    with weights_only=True; np.load never with allow_pickle=True; no pickle-based formats."""
    problems = []
    for path in sorted((ROOT / "fct").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                if root in ("dill", "cloudpickle", "joblib", "shelve", "marshal"):
                    problems.append(f"{rel}: imports {name}")
                if root == "pickle" and rel != "fct/data/cifar.py":
                    problems.append(f"{rel}: imports pickle")
        for owner, attr, call in _calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            if owner == "pickle" and attr in ("load", "loads", "Unpickler"):
                problems.append(f"{rel}:{call.lineno}: pickle.{attr}")
            if owner == "torch" and attr == "load":
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{rel}:{call.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and attr == "load":
                flag = kw.get("allow_pickle")
                if flag is not None and not (
                    isinstance(flag, ast.Constant) and flag.value is False
                ):
                    problems.append(f"{rel}:{call.lineno}: np.load with allow_pickle")
    assert not problems, problems
    # The one unpickler left refuses every global but numpy's array reconstruction.
    cifar = (ROOT / "fct" / "data" / "cifar.py").read_text()
    assert "class _SafeUnpickler(pickle.Unpickler)" in cifar and "def find_class" in cifar

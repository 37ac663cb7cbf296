"""The trainer: schedule, determinism, checkpoint resume, NaN handling; the cache's integrity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fct.artifacts import Cache
from fct.data import make_loader, make_synthetic
from fct.errors import FCTError
from fct.models import EmbeddingModel
from fct.train import OptimConfig, _check_checkpoint, lr_at, train

CFG = OptimConfig("sgd", 0.05, 0.9, 5e-4, epochs=3, warmup_epochs=0.5)


def setup(init_seed: int = 0):
    torch.manual_seed(init_seed)
    src = make_synthetic(num_classes=6, per_class=16, image_size=16, channels=1, seed=0)
    model = EmbeddingModel("test_resnet", 16, 6, in_chans=1, image_size=16, small_stem=False)
    loader = make_loader(src, 32, shuffle=True, seed=0, augment="supervised")

    def batches(epoch):
        loader.set_epoch(epoch)
        return loader

    def step(batch, net):
        x, y = batch
        return torch.nn.functional.cross_entropy(net(x)[1], y)

    return model, batches, step, len(loader)


def fit(model, step, batches, n, desc, checkpoint_dir=None):
    """``train`` with this file's settings: CFG, on the CPU, seed 0."""
    return train(
        model,
        step,
        batches,
        n,
        CFG,
        device=torch.device("cpu"),
        seed=0,
        desc=desc,
        checkpoint_dir=checkpoint_dir,
    )


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


def test_same_seed_gives_identical_weights(tmp_path):
    a, b = setup(), setup()
    fit(a[0], a[2], a[1], a[3], "a")
    fit(b[0], b[2], b[1], b[3], "b")
    for (k, x), (_, y) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
        assert torch.equal(x, y), k


def test_resume_after_interrupted_epoch_equals_uninterrupted_run(tmp_path):
    ref_model, batches, step, n = setup()
    fit(ref_model, step, batches, n, "ref")

    model, batches, step, n = setup()
    calls = {"n": 0}

    def crashing_step(batch, net):
        calls["n"] += 1
        if calls["n"] == n + 2:  # in the middle of the second epoch
            raise KeyboardInterrupt
        return step(batch, net)

    with pytest.raises(KeyboardInterrupt):
        fit(model, crashing_step, batches, n, "x", tmp_path)
    assert [p.name for p in tmp_path.glob("epoch-*")] == ["epoch-0001"]

    fresh, batches, step, n = setup(init_seed=123)  # different init: the checkpoint must win
    result = fit(fresh, step, batches, n, "x", tmp_path)
    assert result.resumed_from == 1
    for (k, x), (_, y) in zip(ref_model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), k


def test_damaged_checkpoint_is_skipped_for_an_older_valid_one(tmp_path, caplog):
    """A checkpoint whose bytes changed is never loaded: training resumes from the older,
    intact one (as after a crash between writing epoch 2 and deleting epoch 1) and still ends
    with the weights of an uninterrupted run; the damaged epoch is rewritten."""
    ref_model, batches, step, n = setup()
    fit(ref_model, step, batches, n, "ref")

    ckpt, kept = tmp_path / "ckpt", tmp_path / "kept"
    model, batches, step, n = setup()
    calls = {"n": 0}

    def crashing_step(batch, net):
        calls["n"] += 1
        if calls["n"] == n + 1:  # epoch 2 starts: epoch 1's checkpoint is complete
            shutil.copytree(ckpt / "epoch-0001", kept)
        if calls["n"] == 2 * n + 1:  # epoch 3 starts: stop
            raise KeyboardInterrupt
        return step(batch, net)

    with pytest.raises(KeyboardInterrupt):
        fit(model, crashing_step, batches, n, "x", ckpt)
    shutil.copytree(kept, ckpt / "epoch-0001")
    weights = ckpt / "epoch-0002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))

    caplog.set_level("WARNING")
    fresh, batches, step, n = setup(init_seed=123)
    result = fit(fresh, step, batches, n, "x", ckpt)
    assert result.resumed_from == 1
    assert (
        "epoch-0002 is damaged or unreadable (model.safetensors checksum mismatch)" in caplog.text
    )
    for (k, x), (_, y) in zip(ref_model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), k
    # The damaged epoch 2 was rewritten; the last epoch writes no checkpoint (the caller saves
    # the finished model at once), so epoch 2's is the last one.
    assert [p.name for p in ckpt.iterdir()] == ["epoch-0002"]
    assert _check_checkpoint(ckpt / "epoch-0002")["epoch"] == 2


def test_nan_loss_stops_with_the_learning_rate_named(tmp_path):
    model, batches, step, n = setup()
    calls = {"n": 0}

    def nan_step(batch, net):
        calls["n"] += 1
        loss = step(batch, net)
        return loss * float("nan") if calls["n"] > n else loss

    with pytest.raises(
        FCTError, match=r"loss became nan at epoch 2.*checkpoint of epoch 1 is kept.*lr = 0.05"
    ):
        fit(model, nan_step, batches, n, "m", tmp_path)
    assert (tmp_path / "epoch-0001" / "state.json").exists()


def test_cache_detects_corruption_and_rebuilds(tmp_path, caplog):
    cache = Cache(tmp_path)
    entry = cache.entry("models", "m", {"a": 1})
    builds = []

    def build(e):
        builds.append(1)
        return {"w": torch.arange(10.0)}, {"train_seconds": 1.0}

    t, meta, built = cache.get_or_build(entry, build)
    assert built and meta["train_seconds"] == 1.0 and meta["key"] == {"a": 1}
    t, _, built = cache.get_or_build(entry, build)
    assert not built and torch.equal(t["w"], torch.arange(10.0))
    data = (entry.path / "tensors.safetensors").read_bytes()
    (entry.path / "tensors.safetensors").write_bytes(data[:-8])  # truncate
    caplog.set_level("WARNING")
    t, _, built = cache.get_or_build(entry, build)
    assert built and len(builds) == 2 and "damaged" in caplog.text
    assert json.loads((entry.path / "manifest.json").read_text())["format"] == 1


def test_cache_key_change_gives_new_entry(tmp_path):
    cache = Cache(tmp_path)
    assert (
        cache.entry("models", "m", {"lr": 0.1}).digest
        != cache.entry("models", "m", {"lr": 0.2}).digest
    )

"""Multi-process training on the CPU (gloo): exact equivalence of the DDP trainer with one
process, and `fct run` on two ranks against a single-process run.

The ranks are forks of the test process with the environment torchrun gives its workers
(tests/helpers/forked_cli.py `run_ranks`: no launcher and no 4 s of imports per rank); the
launch itself, `fct run --nproc 2` through torchrun, is run for real by
`test_an_error_on_rank0_ends_every_rank_with_one_line` here and
tests/e2e/test_transform_cli.py::test_torchrun_ranks_write_their_share.

Tolerance of the end-to-end comparison (stated in docs/scale-out.md): mAP and mAP@R of every
case within 8 points of the single-process record, top-1 and top-5 within 12, and the mean
absolute difference over all 48 numbers within 4 points. The two runs see the same batches
with the same augmentation, but they are not the same computation: the test_resnet backbones
have BatchNorm, whose batch statistics come from each rank's half batch. On this 320-image
evaluation split that moves metrics about as much as changing the seed does (measured for
seeds 0-2: largest differences 8.1 top-1, 5.7 mAP, mean 2.2-2.5; seed 0 vs seed 1 of one
process: mean 2.3). The exact check is the BatchNorm-free one below.
"""

from __future__ import annotations

import importlib.util
import json
import os

import forked_cli
import pytest
import torch
from conftest import ROOT, fct_env, run_fct, tiny_args
from safetensors.torch import load_file

from fct.cli import main

TINY = ROOT / "fct" / "suites" / "tiny.toml"
AUDIT = ROOT / "tests" / "helpers" / "write_audit" / "sitecustomize.py"
METRICS = ("top1", "top5", "mAP", "mAP@R")


def test_ddp_training_equals_one_process(tmp_path):
    """BatchNorm-free model, no augmentation: 2 ranks x 16 == 1 process x 32, weights and
    all, across an interruption and resume (rank 0 broadcasts the optimizer state), and the
    sharded embeddings come back in order."""
    import ddp_worker

    def worker(name: str):
        return lambda: ddp_worker.main(tmp_path / name, tmp_path / f"cache-{name}")

    env = fct_env()
    one = forked_cli.run(["ddp_worker"], tmp_path, env, 300, target=worker("one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = forked_cli.run_ranks(2, ["ddp_worker"], tmp_path, env, 300, target=worker("two"))
    assert two.returncode == 0, two.stderr[-3000:]
    ref = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    r0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    assert ref.keys() == r0.keys() == r1.keys()
    for k in ref:
        # The ranks hold identical weights (DDP), equal to one process's up to rounding.
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # Only rank 0 wrote the cache entry and the checkpoints (one of each, in cache-two).
    # (the worker itself asserts that the second train() resumed from epoch 2 on every rank)
    assert len(list((tmp_path / "cache-two" / "features").iterdir())) == 1


@pytest.mark.parametrize(
    "option, message",
    [
        (["--nproc", "0"], "error: --nproc must be at least 1"),
        (["--global-batch", "0"], "error: --global-batch must be a positive integer"),
    ],
)
def test_bad_scale_out_options_are_one_line(tmp_path, option, message):
    proc = run_fct("run", "tiny", *option, "--out", str(tmp_path / "o"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.strip().startswith(message)


def test_batch_that_does_not_split_over_ranks_is_refused():
    from fct import distributed
    from fct.errors import FCTError

    assert distributed.local_batch(64, "m") == 64  # one process: the whole batch
    os.environ["WORLD_SIZE"] = "3"
    try:
        with pytest.raises(FCTError, match="batch_size 64 does not split over 3 processes"):
            distributed.local_batch(64, "m")
    finally:
        del os.environ["WORLD_SIZE"]


@pytest.mark.parametrize("augment", [None, "supervised", "simclr"])
def test_ranks_see_the_single_process_batches_split_and_augmented_alike(augment):
    """Rank r of 2 gets images r, r+2, ... of each global batch, augmented exactly as one
    process augments them (folder sources use DistributedSampler, same permutation)."""
    from fct.data import make_loader, make_synthetic

    src = make_synthetic(num_classes=5, per_class=9, image_size=16, channels=3, seed=0)
    kw = dict(shuffle=True, seed=3, augment=augment, drop_last=True, epoch=2)
    one = list(make_loader(src, 8, **kw))
    ranks = [list(make_loader(src, 4, rank=r, world=2, **kw)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 45 // 8
    for i, (x, y) in enumerate(one):
        for r in range(2):
            xr, yr = ranks[r][i]
            assert torch.equal(yr, y[r::2])
            if augment == "simclr":
                for view, view_r in zip(x, xr):
                    assert torch.equal(view_r, view[r::2])
            else:
                assert torch.equal(xr, x[r::2])


def test_global_batch_scales_the_learning_rate_linearly():
    from fct.errors import FCTError
    from fct.scenarios import load_suite
    from fct.suite_variants import with_global_batch

    suite = load_suite("tiny")
    scaled = with_global_batch(suite, 256)
    for a, b in zip(suite.scenarios, scaled.scenarios):
        for role in ("old", "new", "side"):
            before, after = getattr(a, role), getattr(b, role)
            assert after.batch_size == 256
            assert after.lr == pytest.approx(before.lr * 256 / before.batch_size)
        assert b.transformation == a.transformation  # h keeps its own settings
    with pytest.raises(FCTError, match="--global-batch must be a positive integer"):
        with_global_batch(suite, 0)


def test_knn_on_a_gpu_falls_back_to_torch_when_faiss_has_no_gpu(caplog):
    """On a GPU the faiss backend needs a GPU build of faiss; otherwise the torch backend runs
    on the GPU, and the log says which (faiss-cpu is what the tests have)."""
    import dataclasses
    from types import SimpleNamespace

    from fct.retrieval import faiss_has_gpu
    from fct.runner import knn_options
    from fct.scenarios import load_suite

    sc = load_suite("tiny").scenarios[0]
    sc = dataclasses.replace(sc, eval=dataclasses.replace(sc.eval, backend="faiss"))
    caplog.set_level("INFO")
    gpu = SimpleNamespace(scenario=sc, device=torch.device("cuda", 1), memo={})
    opts = knn_options(gpu)
    if faiss_has_gpu():  # pragma: no cover - only with a GPU build of faiss and a GPU
        assert opts["backend"] == "faiss"
    else:
        assert opts == {"distance": "l2", "backend": "torch", "device": "cuda:1"}
        assert "kNN evaluation: torch backend on cuda:1 (the installed faiss has no GPU" in (
            caplog.text
        )
    cpu = SimpleNamespace(scenario=sc, device=torch.device("cpu"), memo={})
    assert knn_options(cpu) == {"distance": "l2", "backend": "faiss", "device": "cpu"}
    assert "kNN evaluation: faiss backend on the CPU" in caplog.text


def test_an_error_on_rank0_ends_every_rank_with_one_line(tmp_path):
    """A results folder rank 0 cannot write stops the run before training: exit 2, the error
    line, and no rank left waiting."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # fct's own front end forked; the launch is real: torchrun and two fresh ranks.
    args = ["run", "tiny", "--device", "cpu", "--nproc", "2", "--out", str(blocker / "out")]
    proc = run_fct(*args, "--cache", str(tmp_path / "cache"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: cannot write to the results folder" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the 2-process run failed")
    assert not (tmp_path / "cache" / "models").exists()  # nothing trained


def test_a_query_set_apart_on_two_ranks_matches_one_process(tmp_path, clean_tiny):
    """A cache trained by one process is read by both ranks (nothing trains), and test queries
    against a train gallery ([eval] query_split / gallery_split), both sets embedded sharded
    by two ranks (the cached embeddings removed, the models kept), give every method the
    records one process gives from its own embeddings."""
    import shutil

    _, single_cache, _ = clean_tiny
    keys = ['defaults.eval.query_split="test"', 'defaults.eval.gallery_split="train"']
    outs = {}
    for nproc in ("1", "2"):
        cache = tmp_path / f"cache{nproc}"
        shutil.copytree(single_cache, cache)
        shutil.rmtree(cache / "features")  # every embedding is made again, sharded on 2 ranks
        out = tmp_path / f"out{nproc}"
        args = tiny_args(out, cache, "--no-plots", *(x for k in keys for x in ("--set", k)))
        if nproc == "1":
            proc = run_fct(*args, cwd=tmp_path, timeout=600)
        else:
            proc = forked_cli.run_ranks(2, args, tmp_path, fct_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "training " not in proc.stderr  # the models came from the cache
        outs[nproc] = out
    for method in ("independent", "bct", "fct", "fct_side"):
        one, two = (
            json.loads((outs[n] / "runs" / "half-classes" / f"{method}.json").read_text())
            for n in ("1", "2")
        )
        assert one["scenario_config"]["eval"]["query_split"] == "test"
        for case in ("old/old", "new/new", "cross"):
            assert two["cases"][case]["n_gallery"] == one["cases"][case]["n_gallery"] == 1280
            for m in (*METRICS, "n_query"):
                # Same weights: the only difference is the sharded embedding's batching.
                assert two["cases"][case][m] == pytest.approx(one["cases"][case][m], abs=0.5)
        assert two["cases"]["cross"]["nfr"] == pytest.approx(one["cases"]["cross"]["nfr"], abs=0.5)


# tiny.toml plus a scenario whose every model is free of batch statistics: a ViT (LayerNorm
# normalises each item alone), no side model and no h (their BatchNorm would see half batches).
BN_FREE = """
[[scenario]]
name = "bn-free"
kinds = ["class-subset"]
description = "tiny's split with ViT backbones, no side-information, no h"
methods = ["independent", "bct"]
old = { arch = "test_vit", epochs = 2 }
new = { arch = "test_vit", epochs = 2 }
"""


def test_a_suite_on_two_ranks_matches_one_process_and_only_rank0_writes(tmp_path, clean_tiny):
    """`fct run` on two ranks on tiny plus a BatchNorm-free scenario, in one launch.

    Only rank 0 writes (rank 1 writes nothing under the run's folder: a write audit installed
    in each rank before fct starts). tiny's records equal the one-process clean run's
    within the tolerance above (BatchNorm sees half batches). The BatchNorm-free scenario is the
    exact check, against the same scenario run in one process: not bit for bit in the weights
    (DDP sums the two ranks' gradients, another order of float additions than one process's
    batch sum, and sharded embedding runs other GEMM batch shapes), so: Independent's metrics,
    cosine cases and curves within 0.01 (measured: 0.0007 at most, a tie broken the other way
    in the cosine old/old case; the rest equal to the last recorded digit); BCT (whose
    extended old classifier is a mean of sharded old embeddings) within 0.05 mAP and one query
    of 320 on CMC (measured, seed 0: 0.009 mAP, 0.006 mAP@R, CMC equal), far below what a DDP
    bug does (ranks seeing the same items or the same augmentation draws: points, not
    hundredths)."""
    single_out, _, _ = clean_tiny
    root, log = tmp_path / "work", tmp_path / "audit"
    root.mkdir()
    log.mkdir()
    suite = root / "tiny_bn_free.toml"
    suite.write_text(TINY.read_text() + BN_FREE)
    out, cache = root / "out", root / "cache"
    args = ["run", str(suite), "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    args.append("--no-plots")

    def audited() -> int:
        spec = importlib.util.spec_from_file_location("write_audit", AUDIT)
        audit = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(audit)
        audit.install(root, log)  # this rank's writes, from here on
        return main(args)

    proc = forked_cli.run_ranks(2, args, tmp_path, fct_env(), timeout=600, target=audited)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x 2 processes" in proc.stderr and "2 shards" in proc.stderr
    assert "items/s over 2 processes" in proc.stderr  # the per-epoch throughput line
    assert "kNN evaluation: torch backend on the CPU" in proc.stderr

    # Only one process wrote: rank 0. Rank 1 wrote nothing under root.
    writers = {p.name.split(".")[1] for p in log.glob("writes.*.txt")}
    assert writers == {"0"}, sorted(log.glob("writes.*.txt"))
    written = (log / next(p.name for p in log.glob("writes.0.*.txt"))).read_text()
    assert str(out / "runs") in written and str(cache / "models") in written

    # tiny: the same records as one process, within the stated tolerance.
    diffs = []
    for path in sorted((single_out / "runs").glob("*/*.json")):
        one = json.loads(path.read_text())
        two = json.loads((out / path.relative_to(single_out)).read_text())
        assert two["provenance"]["world_size"] == 2 and one["provenance"]["world_size"] == 1
        assert two["config_hash"] == one["config_hash"]
        for case in ("old/old", "new/new", "cross"):
            for m in METRICS:
                d = abs(two["cases"][case][m] - one["cases"][case][m])
                # CMC on tiny's small eval split moves in steps; BCT's influence term at the
                # old model's smoothing measured up to 13.75 top-5 points of new/new
                assert d <= (8.0 if m.startswith("mAP") else 15.0), (path.name, case, m, d)
                diffs.append(d)
    assert sum(diffs) / len(diffs) <= 4.0, diffs

    # The BatchNorm-free scenario: exact, against one process.
    alone = tmp_path / "alone"
    one_args = ["run", str(suite), "--out", str(alone), "--cache", str(tmp_path / "cache1")]
    one_args += ["--device", "cpu", "--no-plots", "--scenarios", "bn-free"]
    single = run_fct(*one_args, cwd=tmp_path, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    for name in ("independent", "bct"):
        path = f"runs/bn-free/{name}.json"
        one = json.loads((alone / path).read_text())
        two = json.loads((out / path).read_text())
        assert two["provenance"]["world_size"] == 2 and one["provenance"]["world_size"] == 1
        assert two["config_hash"] == one["config_hash"]
        if name == "independent":  # every number within 0.01 (measured: 0.0007 at most)
            for key in ("cases", "cases_cosine", "curves", "auc"):
                assert_close_numbers(two[key], one[key], 0.01, key)
            continue
        for case in ("old/old", "new/new", "cross"):
            for m in METRICS:
                d = abs(two["cases"][case][m] - one["cases"][case][m])
                assert d <= (0.05 if m.startswith("mAP") else 100 / 320 + 1e-9), (case, m, d)
        assert two["cases"]["old/old"] == one["cases"]["old/old"]  # the shared old model


def assert_close_numbers(a, b, tol: float, where: str) -> None:
    """``a`` and ``b`` have the same structure, strings and None; numbers within ``tol``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close_numbers(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_numbers(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert isinstance(b, (int, float)) and abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, (where, a, b)

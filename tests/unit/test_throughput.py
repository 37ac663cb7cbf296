"""Throughput measurement of h: record shape and sanity (never timings), the CLI, and the
folded module's numerics on every kernel path."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch

from fct import throughput
from fct.cli import main
from fct.errors import FCTError
from fct.models import Transformation, onednn_linear_available, transformation_flops
from fct.throughput import Sizes, layer_shapes, measure, with_backoff

# Small enough for a test, big enough that GEMMs, not call overheads, dominate the timings.
# Without side-information the GEMM sequence and the folded module run almost the same
# calls, and one thread keeps a busy shared machine's scheduling out of small GEMMs.
TINY = Sizes("tiny", 64, 64, 0, 1024, "test_resnet", 10, 1, 28, False, 16, 16)

CONFIG_KEYS = {
    "embeddings_per_s",
    "flops_per_s",
    "gemm_flops_per_s",
    "fraction_of_gemm_peak",
    "backfill_images_per_s",
    "speedup_vs_backfill",
    "device",
    "dtype",
    "batch",
    "threads",
    "variants",
}
POSITIVE = (
    "embeddings_per_s",
    "flops_per_s",
    "gemm_flops_per_s",
    "fraction_of_gemm_peak",
    "backfill_images_per_s",
    "speedup_vs_backfill",
    "gemm_dominant_flops_per_s",
)


def check_record(record: dict) -> None:
    assert set(record) >= CONFIG_KEYS
    for key in POSITIVE:
        assert record[key] > 0, key
    # Reported, not asserted as a speed: two timings' ratio is positive and finite (on a
    # shared machine a neighbour's burst can push it past 1, so no upper bound is asserted).
    assert 0 < record["fraction_of_gemm_peak"] < math.inf
    for name in ("eager", "folded"):
        variant = record["variants"][name]
        assert variant["embeddings_per_s"] > 0
        assert 0 < variant["fraction_of_gemm_peak"] < math.inf
    assert record["folded_max_rel_error"] < 1e-4


def test_measure_quick_returns_every_key():
    threads = torch.get_num_threads()
    # A budget for the 30 interleaved rounds: medians of 3 sub-millisecond rounds can land on a
    # neighbour's burst (another test worker) for one variant and not the other.
    result = measure(TINY, "cpu", "float32", batches=[1024], quick=True, budget_s=1.0, threads=1)
    assert set(result) >= {"configurations", "provenance"}
    assert result["provenance"]["torch"] and result["provenance"]["device"].startswith("cpu")
    (record,) = result["configurations"]
    check_record(record)
    assert record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["batch"] == record["requested_batch"] == 1024
    assert record["threads"] == 1 and torch.get_num_threads() == threads  # restored
    assert record["h_flops_per_item"] == transformation_flops(64, 64, 0, 1024)
    # --quick never compiles on CPU, and says so.
    assert "skipped" in record["variants"]["compiled"]
    expected_backends = {"torch.mm", "onednn"} if onednn_linear_available() else {"torch.mm"}
    assert set(record["gemm_flops_per_s_by_backend"]) == expected_backends


def test_cli_bench_transformation_prints_json(capsys, monkeypatch, tmp_path):
    # The real quickstart sizes would time a real backbone; the wiring is what is tested.
    monkeypatch.setitem(throughput.SIZES, "quickstart", TINY)
    argv = ["bench", "transformation", "--quick", "--json", "--sizes", "quickstart"]
    argv += ["--batches", "1024", "--budget", "1", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (record,) = out["configurations"]
    check_record(record)
    assert "provenance" in out
    assert json.loads((tmp_path / "transformation.json").read_text()) == out
    table = (tmp_path / "transformation.md").read_text()
    assert "| tiny | float32 | 1 | 1024 |" in table and "threads: " in table
    png = throughput.plot(out, tmp_path / "throughput.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_bench_rejects_bad_input(capsys):
    assert main(["bench", "transformation", "--quick", "--dtype", "float16"]) == 2
    assert "unsupported dtype" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "transformation", "--quick", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_sizes_name():
    with pytest.raises(FCTError, match="quickstart"):
        measure("paper", quick=True)


@pytest.mark.parametrize(
    "dims", [(32, 32, 16, 256), (128, 128, 0, 2048), (128, 128, 128, 2048), (16, 24, 8, 64)]
)
def test_layer_shapes_account_for_every_flop(dims):
    assert 2 * sum(i * o for i, o in layer_shapes(*dims)) == transformation_flops(*dims)


def test_backoff_halves_the_batch_on_out_of_memory():
    tried = []

    def run(batch: int) -> dict:
        tried.append(batch)
        if batch > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"batch": batch}

    out = with_backoff(run, 512, torch.device("cpu"))
    assert tried == [512, 256, 128, 64]
    assert out == {"batch": 64, "requested_batch": 512}
    with pytest.raises(ValueError):
        with_backoff(lambda b: (_ for _ in ()).throw(ValueError("not memory")), 8, "cpu")


# ------------------------------------------------------------------ folded == eager, every path


def _h(d_old: int, d_new: int, d_side: int, hidden: int, seed: int = 0) -> Transformation:
    return throughput.build_transformation(
        Sizes("t", d_old, d_new, d_side, hidden, "test_resnet", 2, 1, 28, False, 1, 1), seed
    )


BACKENDS = ["auto", "addmm"] + (["onednn"] if onednn_linear_available() else [])


# Each kernel plan of the oneDNN path: branches fused block-diagonally (64/64/*/1024) or run
# apart (the others, where fusing would waste too many multiply-adds); with and without side.
FOLD_DIMS = [(64, 64, 64, 1024), (64, 64, 0, 1024), (128, 128, 64, 512), (128, 128, 0, 512)]
FOLD_DIMS += [(32, 48, 24, 96), (16, 24, 0, 64)]


def test_block_diagonal_only_where_little_is_wasted():
    plans = {dims: _h(*dims).folded().block_diagonal for dims in FOLD_DIMS[:4]}
    assert plans == {
        (64, 64, 64, 1024): True,
        (64, 64, 0, 1024): True,
        (128, 128, 64, 512): False,  # the quickstart's h: 18 % of its multiply-adds wasted
        (128, 128, 0, 512): False,
    }
    assert _h(128, 128, 128, 2048).folded().block_diagonal  # the reference h: 3.4 %


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", FOLD_DIMS)
def test_folded_equals_eager(dims, backend):
    h = _h(*dims)
    folded = h.folded() if backend == "auto" else throughput_fold(h, backend)
    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 300):
        old = torch.randn(n, dims[0], generator=gen).relu()
        side = torch.randn(n, dims[2], generator=gen) if dims[2] else None
        with torch.inference_mode():
            expected, got = h(old, side), folded(old, side)
        scale = expected.abs().max()
        assert scale > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(scale))
    fast = backend != "addmm" and onednn_linear_available()
    assert folded.path_for(old) == ("onednn" if fast else "addmm")


def throughput_fold(h: Transformation, backend: str):
    from fct.models import fold_batchnorm

    return fold_batchnorm(h, backend=backend)


@pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")
def test_folded_onednn_path_tracks_weight_changes_and_copies():
    h1, h2 = _h(32, 32, 16, 64, seed=1), _h(32, 32, 16, 64, seed=2)
    f1, f2 = h1.folded(), h2.folded()
    old, side = torch.randn(5, 32), torch.randn(5, 16)
    assert f1.path_for(old) == "onednn"
    with torch.no_grad():
        before = f1(old, side)
        # The packed copy must follow an in-place weight update, not serve stale weights.
        f1.load_state_dict(f2.state_dict())
        torch.testing.assert_close(f1(old, side), f2(old, side))
        assert not torch.allclose(before, f1(old, side))
    # The packed cache is dropped by pickling and deep copies (opaque tensors cannot be).
    for clone in (copy.deepcopy(f1), pickle.loads(pickle.dumps(f1))):
        with torch.no_grad():
            torch.testing.assert_close(clone(old, side), f2(old, side))


@pytest.mark.skipif(
    not onednn_linear_available(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU"
)
def test_folded_bfloat16_on_cpu_is_close():
    h = _h(64, 64, 32, 256)
    folded = h.folded().to(dtype=torch.bfloat16)
    old, side = torch.randn(64, 64).relu(), torch.randn(64, 32)
    with torch.inference_mode():
        expected = h(old, side)
        got = folded(old.bfloat16(), side.bfloat16()).float()
    assert folded.path_for(old.bfloat16()) == "onednn"
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_folded_onednn_backend_refuses_other_dtypes():
    if not onednn_linear_available():
        with pytest.raises(FCTError, match="oneDNN"):
            throughput_fold(_h(8, 8, 0, 16), "onednn")
        return
    folded = throughput_fold(_h(8, 8, 0, 16), "onednn")
    with pytest.raises(FCTError, match="backend='auto'"):
        folded(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(FCTError, match="backend must be"):
        throughput_fold(_h(8, 8, 0, 16), "mkl")

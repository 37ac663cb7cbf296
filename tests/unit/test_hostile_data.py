"""Hostile data files (docs/reliability.md, "Data files and fct evaluate"): crafted CIFAR-100
pickles, .npz files for `fct evaluate` and bad `--device` values. Each is refused with one
FCTError line (exit status 2 on the command line) before anything large is allocated.

The files are written here in the real formats: protocol-2 pickles assembled opcode by opcode
(as Python 2 wrote the original CIFAR files) or by pickle.dumps, zip archives of .npy arrays.
The cases that would allocate gigabytes if a fix regressed run in one subprocess whose address
space is capped 1 GiB above what its imports use: a regression fails there with MemoryError,
quickly, instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fct_env
from numpy.lib import format as npy

import fct.data.cifar as cifar
from fct import distributed, retrieval, runner, throughput
from fct.cli import main
from fct.data import fashion_mnist as fmnist
from fct.data import load_dataset
from fct.device import resolve_device
from fct.errors import FCTError
from fct.retrieval import load_npz

# --- protocol-2 pickles, opcode by opcode ---------------------------------------------------


def s(text: str | bytes) -> bytes:
    """A Python 2 byte string (SHORT_BINSTRING / BINSTRING), read back as str with latin1."""
    raw = text.encode("latin1") if isinstance(text, str) else text
    if len(raw) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw
    return pickle.BINSTRING + struct.pack("<i", len(raw)) + raw


def by(raw: bytes) -> bytes:
    """A bytes object (SHORT_BINBYTES)."""
    return pickle.SHORT_BINBYTES + bytes([len(raw)]) + raw


def i(n: int) -> bytes:
    """An int: BININT1, BININT or LONG1 as Python 2's cPickle chose."""
    if 0 <= n < 256:
        return pickle.BININT1 + bytes([n])
    if -(2**31) <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    raw = pickle.encode_long(n)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def g(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def lst(items: list[bytes]) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(items) + pickle.APPENDS


def dct(**items: bytes) -> bytes:
    pairs = b"".join(s(k) + v for k, v in items.items())
    return pickle.EMPTY_DICT + pickle.MARK + pairs + pickle.SETITEMS


def dtype(name: str = "u1", order: str = "|") -> bytes:
    """numpy.dtype(name, 0, 1) and its BUILD, as numpy 1.x pickled a dtype."""
    state = tup(i(3), s(order), pickle.NONE * 3, i(-1), i(-1), i(0))
    return g("numpy", "dtype") + tup(s(name), i(0), i(1)) + pickle.REDUCE + state + pickle.BUILD


def array(shape: tuple[int, ...], raw: bytes, dt: bytes | None = None) -> bytes:
    """An ndarray as numpy 1.x pickled it: _reconstruct(ndarray, (0,), 'b'), then BUILD with
    (1, shape, dtype, fortran, data)."""
    new = tup(g("numpy", "ndarray"), tup(i(0)), s("b"))
    head = g("numpy.core.multiarray", "_reconstruct") + new + pickle.REDUCE
    state = tup(i(1), tup(*map(i, shape)), dt or dtype(), pickle.NEWFALSE, s(raw))
    return head + state + pickle.BUILD


def pkl(body: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def py2_cifar(n: int = 4, seed: int = 0) -> tuple[bytes, np.ndarray, list[int]]:
    """A CIFAR-100 split as the original (Python 2) files hold it: data, labels, names."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 100, n)]
    body = dct(
        batch_label=s("training batch 1 of 1"),
        filenames=lst([s(f"img_{k}.png") for k in range(n)]),
        fine_labels=lst([i(v) for v in labels]),
        coarse_labels=lst([i(v // 5) for v in labels]),
        data=array((n, 3072), data.tobytes()),
    )
    return pkl(body), data, labels


def cifar_root(root: Path, train: bytes | None = None, test: bytes | None = None) -> Path:
    """A cifar-100-python folder with the given split files (valid small ones otherwise)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train").write_bytes(train if train is not None else py2_cifar()[0])
    (folder / "test").write_bytes(test if test is not None else py2_cifar(seed=1)[0])
    return root


def refused(root: Path, split: str = "train") -> str:
    """The one-line FCTError that loading ``split`` raises."""
    with pytest.raises(FCTError) as err:
        load_dataset("cifar100", split, root=root)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg
    return msg


def py3(entry: dict) -> bytes:
    """``entry`` pickled by Python 3 in protocol 2, as re-saved copies are."""
    return pickle.dumps(entry, protocol=2)


# Zero strides: numpy.ndarray(shape, dtype, buffer, offset, strides) called by the pickle on
# one byte, reading as 1,000,000 images; copied, that is 3 GB. About 100 bytes of file.
ZERO_STRIDE = pkl(
    dct(
        data=g("numpy", "ndarray")
        + tup(tup(i(1_000_000), i(3072)), s("u1"), by(b"\0"), i(0), tup(i(0), i(0)))
        + pickle.REDUCE,
        fine_labels=g("numpy", "ndarray")
        + tup(tup(i(1_000_000)), s("i8"), by(b"\0" * 8), i(0), tup(i(0)))
        + pickle.REDUCE,
    )
)
# An array whose state declares 10**13 bytes of data and holds 16.
HUGE_SHAPE = pkl(dct(data=array((10**13,), b"\0" * 16), fine_labels=lst([])))
# _reconstruct asked for a 10**13-element array itself (numpy's allocates it before BUILD).
HUGE_RECONSTRUCT = pkl(
    dct(
        data=g("numpy.core.multiarray", "_reconstruct")
        + tup(g("numpy", "ndarray"), tup(i(10**13)), s("b"))
        + pickle.REDUCE,
        fine_labels=lst([]),
    )
)


# --- .npz files -----------------------------------------------------------------------------


def npz_with(path: Path, members: dict[str, tuple[dict, bytes]], **zip_args) -> Path:
    """An npz whose members are given as (.npy header dict, raw data after the header)."""
    with zipfile.ZipFile(path, "w", **zip_args) as zf:
        for name, (header, raw) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                npy.write_array_header_1_0(fh, header)
                fh.write(raw)
    return path


def header(descr: str, shape: tuple[int, ...]) -> dict:
    return {"descr": descr, "fortran_order": False, "shape": shape}


LABELS4 = (header("<i8", (4,)), np.arange(4, dtype="<i8").tobytes())

BOMB_ROWS = 390_625  # x 128 float32 = 200 MB of zeros, about 195 KB deflated


def write_bomb(path: Path) -> Path:
    """A 195 KB npz of zeros that expands to 200 MB (features) plus 3 MB (labels)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("features.npy", "w", force_zip64=True) as fh:
            npy.write_array_header_1_0(fh, header("<f4", (BOMB_ROWS, 128)))
            zeros, left = bytes(1 << 20), BOMB_ROWS * 128 * 4
            while left:
                fh.write(zeros[: min(left, len(zeros))])
                left -= min(left, len(zeros))
        with zf.open("labels.npy", "w") as fh:
            npy.write_array_header_1_0(fh, header("<i8", (BOMB_ROWS,)))
            fh.write(bytes(BOMB_ROWS * 8))
    return path


def huge_header_npz(path: Path) -> Path:
    """features.npy declaring shape (10**12, 8) float64 over 64 bytes of data."""
    return npz_with(path, {"features": (header("<f8", (10**12, 8)), bytes(64)), "labels": LABELS4})


# --- the capped subprocess ------------------------------------------------------------------

CAPPED = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from fct.data import load_dataset
    from fct.errors import FCTError
    from fct.retrieval import load_npz

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    # 1 GiB above what the imports use: enough for every case when it is refused, far too
    # little for the gigabytes a regression would allocate (it fails with MemoryError).
    limit = vm_bytes() + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {}
    try:
        np.empty(2 << 30, np.uint8)
        results["cap"] = "not enforced"
    except MemoryError:
        results["cap"] = "enforced"
    for name, kind, arg in json.loads(sys.argv[1]):
        try:
            if kind == "cifar":
                load_dataset("cifar100", "train", root=arg)
            else:
                load_npz(arg)
            results[name] = "loaded"
        except FCTError as e:
            results[name] = "FCTError: " + str(e)
        except BaseException as e:
            results[name] = type(e).__name__ + ": " + str(e)[:300]
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.npz")


@pytest.fixture(scope="module")
def capped(tmp_path_factory, bomb) -> dict[str, str]:
    """Every allocation-heavy case, loaded in one address-space-capped subprocess."""
    base = tmp_path_factory.mktemp("capped")
    cases = []
    for name, raw in (
        ("zero_stride", ZERO_STRIDE),
        ("huge_shape", HUGE_SHAPE),
        ("huge_reconstruct", HUGE_RECONSTRUCT),
    ):
        cases.append((name, "cifar", str(cifar_root(base / name, train=raw))))
    cases.append(("npz_bomb", "npz", str(bomb)))
    cases.append(("npy_huge_header", "npz", str(huge_header_npz(base / "huge.npz"))))
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED, json.dumps(cases)],
        env=fct_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if results["cap"] != "enforced":
        pytest.skip("RLIMIT_AS is not enforced here; the allocation-heavy cases cannot be capped")
    return results


@pytest.mark.slow  # the capped fixture runs subprocesses under a memory cap
def test_zero_stride_array_pickle_is_refused(capped):
    assert len(ZERO_STRIDE) < 130
    assert capped["zero_stride"].startswith("FCTError: "), capped["zero_stride"]
    assert "refusing to call numpy.ndarray" in capped["zero_stride"]


@pytest.mark.slow  # the capped fixture runs subprocesses under a memory cap
def test_declared_shape_of_1e13_is_refused(capped):
    msg = capped["huge_shape"]
    assert msg.startswith("FCTError: ") and "declares shape (10000000000000,)" in msg, msg
    assert "holds 16 bytes" in msg


@pytest.mark.slow  # the capped fixture runs subprocesses under a memory cap
def test_reconstruct_of_a_huge_array_is_refused(capped):
    msg = capped["huge_reconstruct"]
    assert msg.startswith("FCTError: ") and "_reconstruct called with unusual arguments" in msg


def test_npz_bomb_is_refused(capped, bomb):
    assert bomb.stat().st_size < 250_000
    msg = capped["npz_bomb"]
    assert msg.startswith("FCTError: ") and "zip bomb" in msg, msg
    assert "would expand to 203125" in msg  # 200 MB of features, 3 MB of labels (+ headers)


@pytest.mark.slow  # the capped fixture runs subprocesses under a memory cap
def test_npy_header_declaring_1e12_rows_is_refused(capped):
    msg = capped["npy_huge_header"]
    assert msg.startswith("FCTError: "), msg
    assert "declares shape (1000000000000, 8)" in msg and "holds 64 bytes" in msg


def test_npz_bomb_is_refused_before_decompressing(bomb, monkeypatch):
    """No member is even opened: the zip directory's sizes alone decide."""

    def no_open(*args, **kwargs):
        raise AssertionError("a member of the bomb was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_open)
    with pytest.raises(FCTError, match="zip bomb"):
        load_npz(bomb)


# --- CIFAR-100 pickles ----------------------------------------------------------------------


def test_python2_cifar_pickle_loads_as_numpy_reads_it(tmp_path):
    """The hand-assembled Python 2 format is what numpy's own unpickling reads, and ours too."""
    raw, data, labels = py2_cifar(n=5)
    theirs = pickle.loads(raw, encoding="latin1")
    assert np.array_equal(theirs["data"], data) and theirs["fine_labels"] == labels
    src = load_dataset("cifar100", "train", root=cifar_root(tmp_path, train=raw))
    assert src.labels.tolist() == labels
    assert np.array_equal(src.images.numpy(), data.reshape(-1, 3, 32, 32))
    assert src.images.numpy().flags.writeable


def test_python3_copy_with_big_endian_and_fortran_arrays_loads(tmp_path):
    data = np.asfortranarray(np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072))
    entry = {"data": data, "fine_labels": np.array([3, 99], dtype=">i8"), "filenames": []}
    src = load_dataset("cifar100", "train", root=cifar_root(tmp_path, train=py3(entry)))
    assert src.labels.tolist() == [3, 99]
    assert np.array_equal(src.images.numpy().reshape(2, 3072), data)


def test_build_on_a_function_is_refused(tmp_path):
    # BUILD with a state dict on the _codecs.encode global: setattr on a module's function.
    body = dct(data=g("_codecs", "encode") + dct(x=i(1)) + pickle.BUILD, fine_labels=lst([]))
    msg = refused(cifar_root(tmp_path, train=pkl(body)))
    assert "refusing to set the state of _codecs.encode" in msg


def test_object_dtype_array_is_refused(tmp_path):
    # numpy.dtype('O'): an object array whose items the pickle builds one by one.
    items = lst([i(1)] * 3072)
    state = tup(i(1), tup(i(1), i(3072)), dtype("O"), pickle.NEWFALSE, items)
    new = g("numpy.core.multiarray", "_reconstruct") + tup(g("numpy", "ndarray"), tup(i(0)), s("b"))
    body = dct(data=new + pickle.REDUCE + state + pickle.BUILD, fine_labels=lst([i(0)]))
    msg = refused(cifar_root(tmp_path, train=pkl(body)))
    assert "refusing dtype 'O': not a plain number" in msg


def test_append_on_a_dict_is_refused(tmp_path):
    body = dct(data=pickle.EMPTY_DICT + i(1) + pickle.APPEND, fine_labels=lst([]))
    msg = refused(cifar_root(tmp_path, train=pkl(body)))
    assert "corrupt or not a CIFAR data file (AttributeError" in msg


def test_unknown_codec_is_refused_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "encodings.uu_codec", raising=False)
    body = dct(data=g("_codecs", "encode") + tup(s("abc"), s("uu_codec")) + pickle.REDUCE)
    msg = refused(cifar_root(tmp_path, train=pkl(body)))
    assert "refusing _codecs.encode with codec 'uu_codec'" in msg
    assert "encodings.uu_codec" not in sys.modules


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"data": {}, "fine_labels": []}, "'data' is a dict, not a uint8 array"),
        ({"data": np.zeros((1, 3072), np.uint8), "fine_labels": None}, "'fine_labels' is a NoneType"),
        ({"data": np.zeros((1, 3072), np.uint8), "fine_labels": "7"}, "'fine_labels' is a str"),
        ({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [2**70]}, "other than class ids 0..99"),
        ({"data": np.zeros((1, 3072), np.uint8), "fine_labels": [True]}, "other than class ids 0..99"),
        ({"data": np.full((1, 3072), 300, np.int16), "fine_labels": [0]}, "holds int16 values"),
        ({"data": [[300] * 3072], "fine_labels": [0]}, "'data' is a list, not a uint8 array"),
        ({"data": np.full((1, 3072), 0.5), "fine_labels": [0]}, "holds float64 values, not uint8"),
        ({"data": np.zeros((1, 3071), np.uint8), "fine_labels": [0]}, "has shape (1, 3071)"),
        ({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0]}, "1 fine_labels for 2 images"),
    ],
)  # fmt: skip
def test_bad_cifar_entries_are_refused(tmp_path, entry, needle):
    msg = refused(cifar_root(tmp_path, train=py3(entry)))
    assert needle in msg, msg


def test_data_shorter_than_its_shape_is_refused(tmp_path):
    body = dct(data=array((2, 3072), bytes(3072)), fine_labels=lst([i(0), i(0)]))
    msg = refused(cifar_root(tmp_path, train=pkl(body)))
    assert "declares shape (2, 3072) (6144 bytes of uint8) but holds 3072 bytes" in msg


def test_more_images_than_the_split_has_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(cifar.SPLIT_SIZES, "test", 3)  # CIFAR-100 test has 10,000
    root = cifar_root(tmp_path, test=py2_cifar(n=4)[0])
    assert "N at most 3 (CIFAR-100 test)" in refused(root, "test")


def test_oversized_and_non_regular_files_are_refused(tmp_path, monkeypatch):
    root = cifar_root(tmp_path)
    monkeypatch.setattr(cifar, "MAX_FILE_BYTES", 1000)
    assert "over the 1000-byte limit for a file" in refused(root)
    monkeypatch.undo()
    train = root / "cifar-100-python" / "train"
    train.unlink()
    os.mkfifo(train)
    with pytest.raises(FCTError, match="not a regular file"):
        cifar.safe_load_pickle(train)  # returns at once: a FIFO is opened without blocking


def test_bad_meta_names_are_refused(tmp_path):
    root = cifar_root(tmp_path)
    (root / "cifar-100-python" / "meta").write_bytes(py3({"fine_label_names": 5}))
    assert "'fine_label_names' is not a list of 100 names" in refused(root)


def test_fashion_mnist_gzip_bomb_is_refused(tmp_path, monkeypatch):
    import gzip

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(5000)))
    monkeypatch.setattr(fmnist, "MAX_IDX_BYTES", 4000)
    with pytest.raises(FCTError, match="expands to more than 4000 bytes"):
        fmnist.read_idx(path, 3)


# --- .npz files for fct evaluate ------------------------------------------------------------


def test_zero_width_features_are_refused(tmp_path):
    path = tmp_path / "q.npz"
    np.savez(path, features=np.zeros((5, 0), np.float32), labels=np.arange(5))
    with pytest.raises(FCTError, match=r"shape \(5, 0\), no value per item"):
        load_npz(path)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "q.npz"
    features = np.empty((2, 2), object)
    features[:] = 1.0
    np.savez(path, features=features, labels=np.arange(2))
    with pytest.raises(FCTError, match="features is an object array, which is never loaded"):
        load_npz(path)


def test_structured_and_string_arrays_are_refused(tmp_path):
    path = tmp_path / "q.npz"
    np.savez(path, features=np.zeros((2, 2), np.float32), labels=np.array(["a", "b"]))
    with pytest.raises(FCTError, match="labels has dtype <U1, not a plain number"):
        load_npz(path)


def test_npz_size_limits(tmp_path, monkeypatch):
    path = tmp_path / "q.npz"
    np.savez(path, features=np.ones((64, 8), np.float32), labels=np.arange(64))
    assert load_npz(path).features.shape == (64, 8)
    monkeypatch.setattr(retrieval, "NPZ_MAX_BYTES", 1000)
    with pytest.raises(FCTError, match="over the 1000-byte limit"):
        load_npz(path)


def test_damaged_npz_member_is_refused(tmp_path):
    path = tmp_path / "q.npz"
    np.savez_compressed(
        path, features=np.random.default_rng(0).random((64, 8)), labels=np.arange(64)
    )
    raw = bytearray(path.read_bytes())
    raw[200:210] = bytes(10)  # inside the deflated features
    path.write_bytes(bytes(raw))
    with pytest.raises(FCTError, match="not a readable npz file"):
        load_npz(path)


def test_npz_reads_what_np_load_reads(tmp_path):
    """Compressed, Fortran-order, big-endian and float64 members load as np.load reads them."""
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.normal(size=(30, 6))).astype(">f8")
    y = np.repeat(np.arange(6), 5).astype(">i4")
    path = tmp_path / "q.npz"
    np.savez_compressed(path, features=x, labels=y)
    got = load_npz(path)
    assert got.features.dtype == np.float32 and np.array_equal(got.features, x.astype(np.float32))
    assert np.array_equal(got.labels, y)


def test_single_npy_is_refused(tmp_path):
    path = tmp_path / "q.npy"
    np.save(path, np.zeros((3, 2), np.float32))
    with pytest.raises(FCTError, match=r"a single \.npy array, not an npz of two"):
        load_npz(path)


@pytest.mark.slow  # end to end: a whole `fct` command
def test_fifo_as_query_does_not_block(tmp_path):
    fifo = tmp_path / "q.npz"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "fct", "evaluate", "--query", str(fifo)],
        env=fct_env(),
        capture_output=True,
        text=True,
        timeout=120,  # without the fix, opening the FIFO waits for a writer forever
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a regular file (a folder, FIFO or device)" in lines[0]


# --- --device -------------------------------------------------------------------------------


@pytest.fixture
def good_npz(tmp_path) -> str:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5)
    x = (np.eye(4, 8)[y] * 3 + rng.normal(size=(20, 8))).astype(np.float32)
    np.savez(tmp_path / "q.npz", features=x, labels=y)
    return str(tmp_path / "q.npz")


def evaluate_fails(capsys, good_npz: str, device: str) -> str:
    code = main(["evaluate", "--query", good_npz, "--device", device])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("device", ["tpu", "mps", "meta", "gpu", "cuda:x", "cpu:1", "xla:0", ""])
def test_evaluate_refuses_unknown_devices(capsys, good_npz, device):
    msg = evaluate_fails(capsys, good_npz, device)
    assert f"unknown device '{device}'; use auto, cpu, cuda or cuda:N" in msg


def test_evaluate_refuses_cuda_without_a_gpu(capsys, good_npz, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        msg = evaluate_fails(capsys, good_npz, device)
        assert "CUDA is not available (torch sees no GPU); use --device cpu or auto" in msg


def test_evaluate_refuses_a_gpu_index_beyond_the_count(capsys, good_npz, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    msg = evaluate_fails(capsys, good_npz, "cuda:7")
    assert "this machine has 2 GPU(s), cuda:0 to cuda:1" in msg


def test_evaluate_auto_device(capsys, good_npz, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "--query", good_npz, "--device", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_query"] == 20


def test_one_device_resolver_everywhere(monkeypatch):
    assert runner.resolve_device("cpu") == throughput.resolve_device(torch.device("cpu"))
    assert resolve_device("CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    for resolve in (runner.resolve_device, throughput.resolve_device, distributed.setup):
        with pytest.raises(FCTError, match="has 2 GPU"):
            resolve("cuda:2")
        with pytest.raises(FCTError, match="unknown device 'meta'"):
            resolve("meta")


def test_bench_refuses_meta_device(capsys):
    assert main(["bench", "transformation", "--quick", "--device", "meta"]) == 2
    assert "unknown device 'meta'" in capsys.readouterr().err

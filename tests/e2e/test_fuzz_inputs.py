"""Property tests of everything fct reads that a person or another machine may have written:
suite files, run records and cache manifests, and the command line of every subcommand.

Each property is "handled or refused in one line, never a crash": a mutated suite either loads
or raises FCTError; a damaged run record is an FCTError for the report and a rerun for the
runner; a damaged manifest is a rebuilt cache entry; a malformed `fct` command line (439 of
them, across evaluate, run, report, list and bench) exits 2 with one `error:` line, writes
nothing outside its output folder and trains nothing (docs/reliability.md, "Malformed input to
every subcommand"). Hypothesis runs derandomized and without its example database, so every run
tries the same inputs and the file stays well under a minute on a small CPU.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
import tomllib
import warnings
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fct_command, fct_env, toml_str
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from report_records import SUITE as REPORT_SUITE
from report_records import make_record, write_record

import fct.distributed
import fct.runner
from fct.artifacts import Cache, Entry
from fct.cli import main
from fct.errors import FCTError
from fct.report import load_records, validate_record
from fct.report.records import read_json
from fct.runner import RunOptions, _up_to_date, record_path
from fct.scenarios import (
    ARCH_ARGS,
    SUITES_DIR,
    EvalSpec,
    ModelSpec,
    TransformationSpec,
    check_name,
    load_suite,
    parse_suite,
    suite_path,
)
from fct.suite_checks import parse_set

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------------------------------
# TOML writing: the mutated documents go back through the real parser


def toml_value(v: Any) -> str:
    """One TOML value on one line (tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else repr(v)  # repr: 1e+300, inf, -inf, 5e-324 are TOML
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, datetime.date | datetime.time):  # a datetime is a date too
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(doc: dict) -> str:
    """A whole document as ``key = value`` lines; arrays of tables as arrays of inline tables."""
    return "".join(f"{toml_str(k)} = {toml_value(v)}\n" for k, v in doc.items())


# A valid suite touching every section: defaults of every role, a method variant, per-scenario
# settings, timm and loss arguments, a scenario without side-information.
BASE_TEXT = (
    (SUITES_DIR / "tiny.toml").read_text()
    + """\
methods = ["fct", "bct", "bct_v"]
settings = { bct = { weight = 0.5 } }
old = { arch_args = { drop_rate = 0.1 }, loss_args = { smoothing = 0.1 } }
transformation = { views = 2, features = "cached" }
eval = { curves = false, max_per_class = 3 }

[[scenario]]
name = "no-side"
side_info = false
methods = ["independent", "fct"]
new = { embedding_dim = 16, classes = [0, 20] }

[methods.bct_v]
base = "bct"
smoothing = 0.1
"""
)
BASE_DOC = tomllib.loads(BASE_TEXT)


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def _setting_names() -> set[str]:
    from fct.methods import METHODS

    return {f.name for m in METHODS.names() for f in fields(METHODS.get(m).Settings)}


KNOWN_KEYS = sorted(
    _keys(BASE_DOC)
    | {f.name for cls in (ModelSpec, TransformationSpec, EvalSpec) for f in fields(cls)}
    | _setting_names()
    | {"base", "pretrained", "checkpoint_path", "channels", "layers", "temperature", "margin"}
)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=6))
# Values that get past the first checks, so the later ones are reached too.
PLAUSIBLE = st.sampled_from(
    [
        "synthetic",
        "fashion_mnist",
        "test_resnet",
        "resnet18",
        "bct",
        "fct",
        "fct_side",
        "independent",
        "simclr",
        "ce",
        "cosface",
        "cached",
        "online",
        "relu",
        "none",
        "l2",
        "cosine",
        "faiss",
        "torch",
        "test",
        "train",
        "new",
        "old",
        "class-subset",
        "sgd",
        "adamw",
        "x.json",
        "fct.seed1",
        "../x",
        "a\x00b",
        "",
        0,
        1,
        2,
        3,
        8,
        16,
        32,
        64,
        -1,
        0.5,
        1.0,
        0.0,
        [0, 10],
        [0, 5],
        [10, 0],
        [1, 1, 1, 1],
        [],
        {},
    ]  # fmt: skip
)
SCALARS = st.one_of(
    PLAUSIBLE,
    st.integers(min_value=-3, max_value=300),  # in and around the ranges, so they are reached
    st.floats(min_value=-1, max_value=2),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.dates(),
    st.datetimes(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)


def _containers(node: Any) -> list[Any]:
    """Every table and array in ``node``, itself included (depth first)."""
    out = [node] if isinstance(node, dict | list) else []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        out += _containers(child)
    return out


@st.composite
def mutated_suites(draw) -> dict:
    """The base suite with 1-3 random edits: a key of any table (nested or in an array of
    tables) set to a random value, deleted, or an array's item replaced or added."""
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(_containers(doc)))
        op = draw(st.sampled_from(["set", "set", "delete"]))
        if isinstance(target, dict):
            if op == "delete" and target:
                del target[draw(st.sampled_from(sorted(target)))]
            else:
                key = draw(st.one_of(st.sampled_from(sorted(target) or ["name"]), KEYS))
                target[key] = draw(VALUES)
        elif op == "delete" and target:
            target.pop(draw(st.integers(0, len(target) - 1)))
        elif target and draw(st.booleans()):
            target[draw(st.integers(0, len(target) - 1))] = draw(VALUES)
        else:
            target.append(draw(VALUES))
    return doc


def _settings_fields(method: str) -> list[str]:
    from fct.methods import METHODS

    return sorted(f.name for f in fields(METHODS.get(method).Settings))


# (where in the document, the keys that table takes): edits that pass the key checks, so
# every type and range check behind them is reached.
FIELD_TABLES = [
    (("defaults", "model"), sorted(f.name for f in fields(ModelSpec))),
    (("defaults", "old"), sorted(f.name for f in fields(ModelSpec))),
    (("defaults", "side"), sorted(f.name for f in fields(ModelSpec))),
    (("defaults", "transformation"), sorted(f.name for f in fields(TransformationSpec))),
    (("defaults", "eval"), sorted(f.name for f in fields(EvalSpec))),
    (("scenario", 1, "new"), sorted(f.name for f in fields(ModelSpec))),
    (("scenario", 0, "old", "arch_args"), sorted(ARCH_ARGS)),
    # Arguments of some registered loss, and 'name' (make_loss's own parameter).
    (("scenario", 0, "old", "loss_args"), ["smoothing", "scale", "margin", "temperature", "name"]),
    (("methods", "bct_v"), _settings_fields("bct")),
    (("scenario", 0, "settings", "bct"), _settings_fields("bct")),
]


# Mostly scalars and flat lists: what a setting holds, so most edits reach its range check.
FIELD_VALUES = st.one_of(SCALARS, SCALARS, st.lists(SCALARS, max_size=4), VALUES)


@st.composite
def field_edits(draw) -> dict:
    """The base suite with 1-2 known keys of its spec and settings tables set to any value."""
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(draw(st.integers(1, 2))):
        where, keys = draw(st.sampled_from(FIELD_TABLES))
        node = doc
        for k in where:
            node = node[k]
        node[draw(st.sampled_from(keys))] = draw(FIELD_VALUES)
    return doc


def test_the_base_suite_is_valid_and_round_trips():
    """The fuzz starts from a suite that loads, and the TOML writer writes what it reads."""
    assert tomllib.loads(toml_doc(BASE_DOC)) == BASE_DOC
    suite = parse_suite(toml_doc(BASE_DOC), "t", Path("t.toml"))
    assert [sc.name for sc in suite.scenarios] == ["half-classes", "no-side"]
    assert suite.scenarios[0].method("bct_v").settings.smoothing == 0.1


def _loaded_suite_is_usable(suite) -> None:
    """What a run does with a suite that loaded: names give record paths inside runs/, the
    scenario and every method config are JSON (records are written with allow_nan=False)."""
    out = Path(tempfile.gettempdir()) / "fct-fuzz-never-written"
    check_name(suite.name, "suite", "fuzz")
    for sc in suite.scenarios:
        json.dumps(sc.as_dict(), allow_nan=False)
        sc.digest()
        for m in sc.methods:
            assert record_path(out, sc.name, m, 0).parent.parent == out / "runs"
            json.dumps(sc.method(m).config(), allow_nan=False)


def _loads_or_is_refused(doc: dict) -> None:
    """``doc`` written as TOML loads (and is usable) or raises one FCTError line."""
    try:
        suite = parse_suite(toml_doc(doc), "t", Path("t.toml"))
    except FCTError as e:
        assert "\n" not in str(e) and str(e).strip()
        return
    _loaded_suite_is_usable(suite)


@settings(FUZZ, max_examples=400)
@given(doc=mutated_suites())
def test_mutated_suite_loads_or_is_refused_in_one_line(doc):
    _loads_or_is_refused(doc)


@settings(FUZZ, max_examples=300)
@given(doc=field_edits())
def test_any_value_of_a_known_setting_loads_or_is_refused_in_one_line(doc):
    _loads_or_is_refused(doc)


@settings(FUZZ, max_examples=120)
@given(
    position=st.floats(0, 1),
    junk=st.one_of(
        st.binary(max_size=12),
        st.text(max_size=12).map(str.encode),
        st.sampled_from([b"[", b"]]", b"=", b'"', b"\x00", b"\xff", b"\n[[scenario]]\n", b"{"]),
    ),
    cut=st.booleans(),
)
def test_suite_file_with_random_bytes_spliced_in_loads_or_is_refused(position, junk, cut):
    """Bytes inserted anywhere in a suite file (or the file cut there): load_suite reads it
    as a file, so non-UTF-8, NUL bytes and broken TOML all take the same path a user's do."""
    data = BASE_TEXT.encode()
    at = int(position * len(data))
    data = data[:at] + junk + (b"" if cut else data[at:])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_bytes(data)
        try:
            suite = load_suite(str(path))
        except FCTError as e:
            assert "\n" not in str(e)
            return
        _loaded_suite_is_usable(suite)


# ---------------------------------------------------------------------------------------------
# Run records: the report's loader and the runner's skip check

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
RECORD = make_record("a", "fct", (45.0, 25.0), curves={"random": [1.0] * 22}, auc={"random": 1.0})
RECORD["artifacts"] = {"models/old": "d1"}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_records(draw) -> Any:
    """A valid run record with 1-3 values (anywhere, any depth) replaced or removed."""
    rec = copy.deepcopy(RECORD)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(_paths(rec)))
        if not where:
            return draw(JSON_VALUES)
        node = rec
        for k in where[:-1]:
            node = node[k]
        if draw(st.integers(0, 3)) == 0:
            del node[where[-1]]
        else:
            node[where[-1]] = draw(JSON_VALUES)
    return rec


RECORD_FILES = st.one_of(
    st.binary(max_size=64),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    mutated_records().map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"[" * 100, b"{" * 100, b'{"schema": 1}', b"\xef\xbb\xbf{}", b"NaN"]),
)


@settings(FUZZ, max_examples=150)
@given(data=RECORD_FILES)
def test_record_file_of_any_content_is_loaded_or_named_by_the_report(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "r"
        write_record(folder, make_record("a", "bct", (40.0, 20.0)))
        bad = folder / "runs" / "a" / "fct.json"
        bad.write_bytes(data)
        try:
            recs = load_records([folder])
        except FCTError as e:
            assert "\n" not in str(e) and len(str(e)) < 1000, str(e)[:300]
            assert str(bad) in str(e) or "different versions" in str(e), str(e)[:300]
            return
        assert {r["method"] for r in recs} <= {"bct", "fct"}


@settings(FUZZ, max_examples=150)
@given(value=st.one_of(JSON_VALUES, mutated_records()))
def test_any_json_value_is_a_record_or_refused_in_one_line(value):
    try:
        validate_record(value, "r.json")
    except FCTError as e:
        assert "\n" not in str(e) and len(str(e)) < 1000


DIGEST = "0123456789abcdef"


@settings(FUZZ, max_examples=150)
@given(
    data=st.one_of(
        RECORD_FILES,
        JSON_VALUES.map(
            lambda v: json.dumps({"config_hash": DIGEST, "x": v} if isinstance(v, dict) else v)
        ).map(str.encode),
    )
)
def test_runner_reruns_a_record_of_any_content(data):
    """``_up_to_date`` skips only a JSON object holding this config's hash; anything else is a
    rerun, and what cannot be read as a record is moved aside as ``NAME.corrupt``."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(out=Path(tmp))
        path = record_path(opts.out, "a", "fct", 0)
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            value = ...  # not JSON
        skipped = _up_to_date(path, DIGEST, None, opts, "a", "fct")
        assert skipped is (isinstance(value, dict) and value.get("config_hash") == DIGEST)
        if not isinstance(value, dict):  # damage: kept for a look, out of the rerun's way
            assert not path.exists() and path.with_name("fct.json.corrupt").exists()


def _fifo(p: Path) -> None:
    os.mkfifo(p)


HOSTILE_RECORD_PATHS = {
    "a folder": lambda p: (p / "inner").mkdir(parents=True),
    "a FIFO": _fifo,
    "a symlink to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    "a dangling symlink": lambda p: p.symlink_to(p.parent / "nowhere"),
    "a symlink loop": lambda p: p.symlink_to(p),
}
HOSTILE_ASIDE = {
    "none": lambda p: None,
    "a file": lambda p: p.write_text("old"),
    "a folder": lambda p: (p / "x").mkdir(parents=True),
    "a symlink": lambda p: p.symlink_to("/dev/null"),
}


@pytest.mark.parametrize("aside", list(HOSTILE_ASIDE))
@pytest.mark.parametrize("shape", list(HOSTILE_RECORD_PATHS))
def test_runner_moves_a_hostile_record_path_aside(shape, aside, tmp_path, caplog):
    """Not a file at the record's path, whatever is at NAME.corrupt already: a rerun, with
    the thing moved aside and nothing outside the results folder read or touched."""
    opts = RunOptions(out=tmp_path / "out")
    path = record_path(opts.out, "a", "fct", 0)
    path.parent.mkdir(parents=True)
    HOSTILE_RECORD_PATHS[shape](path)
    HOSTILE_ASIDE[aside](path.with_name("fct.json.corrupt"))
    caplog.set_level(logging.WARNING)
    assert _up_to_date(path, DIGEST, None, opts, "a", "fct") is False
    assert not os.path.lexists(path)
    assert os.path.lexists(path.with_name("fct.json.corrupt"))
    assert os.path.exists("/dev/null") and os.path.exists("/dev/zero")
    assert "rerunning it" in caplog.text


# ---------------------------------------------------------------------------------------------
# Cache manifests: anything but the manifest the cache wrote is damage, rebuilt


KEY = {"model": "m", "data": {"dataset": "synthetic", "split": "test"}}


def _build(value: float):
    def build(e: Entry):
        return {"w": torch.full((4,), float(value))}, {"value": value}

    return build


@st.composite
def mutated_manifests(draw, real: dict) -> Any:
    """The real manifest with 1-2 values anywhere replaced or removed (or the whole of it)."""
    doc = copy.deepcopy(real)
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(_paths(doc)))
        if not where:
            return draw(JSON_VALUES)
        node = doc
        for k in where[:-1]:
            node = node[k]
        if draw(st.booleans()):
            del node[where[-1]]
        else:
            node[where[-1]] = draw(JSON_VALUES)
    return doc


def _real_manifest() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp))
        e = cache.entry("models", "m", KEY)
        cache.get_or_build(e, _build(1.0))
        return json.loads((e.path / "manifest.json").read_text())


REAL_MANIFEST = _real_manifest()


@settings(FUZZ, max_examples=120)
@given(
    data=st.one_of(
        st.binary(max_size=64),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        mutated_manifests(REAL_MANIFEST).map(lambda v: json.dumps(v).encode()),
    )
)
def test_manifest_of_any_content_is_rebuilt(data):
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "cache")
        e = cache.entry("models", "m", KEY)
        _, _, built = cache.get_or_build(e, _build(1.0))
        assert built
        real = (e.path / "manifest.json").read_bytes()
        (e.path / "manifest.json").write_bytes(data)
        tensors, meta, built = cache.get_or_build(e, _build(2.0))
        try:
            same = json.loads(data) == json.loads(real)
        except (UnicodeDecodeError, ValueError, RecursionError):
            same = False
        if same:  # the edit happened to write the same manifest back
            assert not built and meta["value"] == 1.0
        else:
            assert (
                built and meta["value"] == 2.0 and torch.equal(tensors["w"], torch.full((4,), 2.0))
            )
            assert len(list((e.path.parent / ".corrupt").iterdir())) == 1
        # Whatever happened, the slot now holds a sound entry that loads without a rebuild.
        _, _, again = cache.get_or_build(e, _build(3.0))
        assert not again


# =============================================================================================
# The command line: malformed input to every subcommand
#
# Each generated input is a Case: files to lay out in a fresh sandbox folder and the argv of
# one `fct` command. It runs through `fct.cli.main` in-process (a subprocess costs seconds
# of imports; test_the_real_cli_answers_as_the_in_process_harness shows both give the same
# answer), with the sandbox as the working folder and HOME, FCT_CACHE, FCT_DATA and
# XDG_CACHE_HOME inside it. For every input:
#
# - main() returns 2 and raises nothing;
# - stderr is exactly one line, starting "error: ". Log records (INFO and up, as the real
#   CLI shows them) and warnings are written to the same stderr, so a progress line before
#   the error counts as a second line;
# - nothing in the sandbox changed outside the command's own output folders (a snapshot of
#   the tree before and after), and nothing was written anywhere else: an audit hook sees
#   every write of the process (the repository, $HOME, /tmp, ...; bytecode caches aside).
#   The repository is audited rather than snapshotted because other work may edit the
#   checkout while the tests run: only this process's own writes count;
# - nothing was trained, launched or measured: guards make the test fail if a run reaches
#   training, a torchrun launch or a benchmark's first measurement.


@dataclass(frozen=True)
class Special:
    """A file-system entry that is not a regular file: a folder, a FIFO or a symlink."""

    kind: str  # "dir", "fifo" or "link"
    target: str = ""


DIR, FIFO = Special("dir"), Special("fifo")
TO_DEV_ZERO, DANGLING = Special("link", "/dev/zero"), Special("link", "nowhere/x")


@dataclass(frozen=True)
class Case:
    """One command line: ``files`` (relative path -> bytes or Special) are made in the sandbox
    first; ``allowed`` are the sandbox's top-level names the command may write (its --out and
    --cache); ``env`` holds extra variables, ``{box}`` standing for the sandbox."""

    argv: tuple[str, ...]
    files: tuple[tuple[str, Any], ...] = ()
    allowed: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        files = {k: v if isinstance(v, Special) else f"<{len(v)} bytes>" for k, v in self.files}
        return f"Case(argv={list(self.argv)!r}, files={files!r}, env={dict(self.env)!r})"


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: list[str]
    changed: list[str] = field(default_factory=list)  # outside the allowed folders
    box: str = ""  # the sandbox it ran in

    def said(self) -> list[str]:
        """stderr with the sandbox's path as <box> (to compare runs in two sandboxes)."""
        return [line.replace(self.box, "<box>") for line in self.stderr]


def _make(box: Path, files: tuple[tuple[str, Any], ...]) -> None:
    for rel, content in files:
        path = box / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == DIR:
            path.mkdir(exist_ok=True)
        elif content == FIFO:
            os.mkfifo(path)
        elif isinstance(content, Special):
            path.symlink_to(content.target)
        else:
            path.write_bytes(content)


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its type, size and mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st_ = os.lstat(path)
            out[os.path.relpath(path, root)] = (
                stat.S_IFMT(st_.st_mode),
                st_.st_size,
                st_.st_mtime_ns,
            )
    return out


# Writes seen while a command runs in-process (None: not recording). The hook is process-wide
# and permanent (Python has no way to remove one), so it does nothing unless recording.
_WRITES: list[tuple[str, str]] | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink",
                 "os.link", "os.truncate", "os.chmod", "os.utime"}  # fmt: skip


def _audit(event: str, args: tuple) -> None:
    if _WRITES is None:
        return
    paths: tuple = ()
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        paths = (path,) if writes and isinstance(path, str | bytes | os.PathLike) else ()
    elif event == "os.mkdir" and os.path.isdir(args[0]):
        return  # makedirs(exist_ok=True) of a folder that is there (torch does, on import)
    elif event in _WRITE_EVENTS:
        paths = tuple(a for a in args[:2] if isinstance(a, str | bytes | os.PathLike))
    for p in paths:
        with contextlib.suppress(TypeError, ValueError):
            _WRITES.append((event, os.path.abspath(os.fsdecode(p))))


sys.addaudithook(_audit)


def _in_process(argv: tuple[str, ...]) -> tuple[int, str, list[str], list[tuple[str, str]]]:
    """``main(argv)`` with stdout and stderr captured, log records and warnings written to
    stderr as the real CLI does; returns (exit code, stdout, stderr lines, writes)."""
    global _WRITES
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(  # fct.cli.main's format
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    level, path, modules = root.level, list(sys.path), set(sys.modules)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _WRITES = []
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("default")
            code = main(list(argv))
    finally:
        writes, _WRITES = _WRITES, None
        root.removeHandler(handler)
        root.setLevel(level)
        sys.path[:] = path  # a module plugin puts "" on sys.path
        for name in set(sys.modules) - modules:  # and a failed plugin stays half-imported
            if name.startswith("fct_plugin_"):
                del sys.modules[name]
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(
            w.category, DeprecationWarning | PendingDeprecationWarning | ImportWarning
        )
    ]
    return code, out.getvalue(), err.getvalue().splitlines() + shown, writes


def _env(box: Path, case: Case) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "HOME": str(box / "home"),
        "XDG_CACHE_HOME": str(box / "home" / ".cache"),
        "FCT_CACHE": str(box / "fct-cache"),
        "FCT_DATA": str(box / "data"),
        "FCT_SUITES": None,
        "FCT_NO_DOWNLOAD": "1",
        "RANK": None,
        "WORLD_SIZE": None,
    }
    env.update({k: v.replace("{box}", str(box)) for k, v in case.env})
    return env


@contextlib.contextmanager
def _sandbox(case: Case):
    """A fresh folder holding ``case.files``, made the working folder with the environment
    pointed into it; yields its path."""
    with tempfile.TemporaryDirectory(prefix="fct-fuzz-") as tmp, pytest.MonkeyPatch.context() as mp:
        box = Path(tmp).resolve()
        (box / "home").mkdir()
        _make(box, case.files)
        mp.chdir(box)
        for key, value in _env(box, case).items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        yield box


def _changes(box: Path, before: dict, after: dict, allowed: tuple[str, ...]) -> list[str]:
    def outside(rel: str) -> bool:
        return Path(rel).parts[0] not in allowed

    return sorted(
        f"{rel} ({'added' if rel not in before else 'removed' if rel not in after else 'changed'})"
        for rel in set(before) | set(after)
        if before.get(rel) != after.get(rel) and outside(rel)
    )


def run_case(case: Case) -> Outcome:
    """``case`` through main() in its sandbox; what it changed outside its allowed folders."""
    with _sandbox(case) as box:
        tree = _tree(box)
        code, out, err, writes = _in_process(case.argv)
        changed = _changes(box, tree, _tree(box), case.allowed)
        changed += [  # anywhere else: the repository, $HOME, /tmp, ...
            f"{path} ({event})"
            for event, path in writes
            if "__pycache__" not in path and not path.startswith(str(box) + os.sep)
        ]
    return Outcome(code, out, err, changed, str(box))


def assert_refused(case: Case, outcome: Outcome) -> None:
    """Exit 2, one stderr line "error: ...", no traceback, nothing written outside."""
    said = "\n".join(outcome.stderr)
    assert outcome.code == 2, f"{case!r}: exit {outcome.code}, stderr:\n{said}"
    assert len(outcome.stderr) == 1 and outcome.stderr[0].startswith("error: "), (
        f"{case!r}: stderr is not one 'error:' line:\n{said}"
    )
    assert "Traceback" not in said
    assert not outcome.changed, f"{case!r} wrote outside its output folder: {outcome.changed}"


class Started(AssertionError):
    """A malformed input got as far as training, a launch or a benchmark measurement."""


@pytest.fixture
def guarded(monkeypatch):
    """Any input that reaches training, a torchrun launch or a measurement fails the test:
    each of them must be refused before that."""
    # measure() calls these two by their module-level names.
    bench_measure = importlib.import_module("fct.throughput.measurement")

    def refuse(what: str):
        def started(*args, **kwargs):
            raise Started(f"{what} started: the input was accepted")

        return started

    monkeypatch.setattr(fct.runner, "run_one", refuse("training"))
    # launch() checks --nproc, then builds the torchrun command: that is the launch.
    monkeypatch.setattr(fct.distributed, "torchrun_command", refuse("a torchrun launch"))
    monkeypatch.setattr(bench_measure, "measure_backfill", refuse("a benchmark"))
    monkeypatch.setattr(bench_measure, "measure_transformation", refuse("a benchmark"))


CLI = settings(FUZZ, suppress_health_check=list(HealthCheck))
NO_GPU = not torch.cuda.is_available()

# Text that may show up in an argument: printable, quotes, a newline, non-ASCII (no NUL,
# which no real argv can hold).
ARG_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
# ---------------------------------------------------------------------------------------------
# fct evaluate: arguments, files and .npz contents


def _npz(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_entry(header: bytes, body: bytes = b"") -> bytes:
    """An npz whose features.npy is ``header`` + ``body`` (crafted), with valid labels."""
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("features.npy", header + body)
        zf.writestr("labels.npy", labels.getvalue())
    return buf.getvalue()


def _npy_header(descr: str, shape: tuple) -> bytes:
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@st.composite
def good_sets(draw) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels that evaluate: every class has two items or more."""
    n = draw(st.integers(4, 12))
    d = draw(st.integers(1, 6))
    classes = draw(st.integers(1, n // 2))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    features = np.random.default_rng(n * 7 + d).normal(size=(n, d)).astype(dtype)
    labels = (np.arange(n) % classes).astype(draw(st.sampled_from([np.int64, np.int32, np.uint8])))
    return features, labels


def _cast(draw, shape: tuple, dtypes: list) -> np.ndarray:
    dtype = draw(st.sampled_from(dtypes))
    if dtype == "object":
        out = np.empty(shape, dtype=object)
        out[...] = draw(st.sampled_from([None, 1.0, "x"]))
        return out
    return np.zeros(shape, dtype=dtype)


BAD_FEATURE_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, "U3", "S2",
                      "datetime64[s]", "timedelta64[s]", [("a", "<f4"), ("b", "<f4")], "object"]  # fmt: skip
BAD_LABEL_DTYPES = [np.float32, np.float64, np.complex64, np.bool_, "U3", "S2", "datetime64[s]",
                    [("a", "<i8")], "object"]  # fmt: skip


DEFECT_ORDER = ["empty", "no columns", "length", "non-finite", "singletons", "features dtype",
                "labels dtype", "features ndim", "labels ndim", "missing key"]  # fmt: skip


@st.composite
def bad_npz_contents(draw, leave_one_out: bool = True) -> bytes:
    """A valid set with 1-2 defects that each make it unusable."""
    features, labels = draw(good_sets())
    n, d = features.shape
    defects = draw(st.lists(st.sampled_from(
        ["features dtype", "labels dtype", "features ndim", "labels ndim", "empty", "no columns",
         "length", "non-finite", "missing key"] + (["singletons"] if leave_one_out else [])
    ), min_size=1, max_size=2, unique=True))  # fmt: skip
    arrays: dict[str, Any] = {}
    for defect in sorted(defects, key=DEFECT_ORDER.index):  # sizes first, then shapes and keys
        if defect == "features dtype":
            features = _cast(draw, features.shape, BAD_FEATURE_DTYPES)
        elif defect == "labels dtype":
            labels = _cast(draw, labels.shape, BAD_LABEL_DTYPES)
        elif defect == "features ndim":
            features = draw(st.sampled_from([features.reshape(-1), features[..., None],
                                             features[None], np.float32(1.0)]))  # fmt: skip
        elif defect == "labels ndim":
            labels = draw(st.sampled_from([labels[:, None], labels[None], np.int64(1)]))
        elif defect == "empty":
            features, labels = features[:0], labels[:0]
        elif defect == "no columns":
            features = features[:, :0]
        elif defect == "length":
            k = draw(st.integers(1, 3))
            labels = labels[:-k] if draw(st.booleans()) else np.concatenate([labels, labels[:k]])
        elif defect == "non-finite" and features.dtype.kind == "f" and features.size:
            features = features.copy()
            for _ in range(draw(st.integers(1, 3))):
                i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
                if features.ndim == 2:
                    features[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        elif defect == "missing key":
            arrays[
                draw(st.sampled_from(["feats", "Features", "embeddings", "x", "label", "y"]))
            ] = features
            if draw(st.booleans()):
                features = None
            else:
                labels = None
        elif defect == "singletons":
            labels = np.arange(len(labels))
    if defects == ["non-finite"] and (features.dtype.kind != "f" or features.size == 0):
        features = features[:0]  # nothing to poison: make it empty instead
    arrays.update({k: v for k, v in (("features", features), ("labels", labels)) if v is not None})
    return _npz(arrays)


@functools.cache
def _zip_bomb() -> bytes:
    """An npz of zeros expanding ~1000x (100 MB from ~100 KB): over the expansion limit."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, features=np.zeros((25_000, 1024), np.float32), labels=np.zeros(25_000, np.int64)
    )
    return buf.getvalue()


NPZ_KINDS = ["contents", "huge dims", "damaged header", "npy version", "bytes", "text",
             "truncated", "npy", "empty", "members", "zip bomb", "special"]  # fmt: skip


@st.composite
def bad_npz_files(draw, kind: str | None = None, leave_one_out: bool = True) -> Any:
    """What --query or --gallery may point at that is not a usable npz (``kind``: one of
    NPZ_KINDS, else any)."""
    features, labels = draw(good_sets())
    good = _npz({"features": features, "labels": labels})
    kind = kind or draw(st.sampled_from(NPZ_KINDS))
    if kind == "contents":
        return draw(bad_npz_contents(leave_one_out))
    if kind == "huge dims":
        shape = draw(st.sampled_from([(10**12, 10**6), (2**40,), (10**9, 10**9, 10**9), (-1, 4)]))
        return _npy_entry(_npy_header("<f4", shape), b"\0" * draw(st.integers(0, 64)))
    if kind == "damaged header":  # the magic, then junk where the header's dict goes
        return _npy_entry(b"\x93NUMPY\x01\x00" + draw(st.binary(min_size=0, max_size=40)))
    if kind == "npy version":
        major = draw(st.sampled_from([0, 4, 9, 255]))
        return _npy_entry(b"\x93NUMPY" + bytes([major, 0]) + b"\x10\x00{'descr': '<f4'}")
    if kind == "bytes":
        return draw(st.binary(max_size=200).filter(lambda b: not b.startswith(b"PK")))
    if kind == "text":
        return draw(st.text(min_size=1, max_size=200)).encode()
    if kind == "truncated":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, features)
        return buf.getvalue()
    if kind == "empty":
        return b""
    if kind == "members":  # the arrays under other names or inside a folder
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name in draw(st.lists(st.sampled_from(
                ["a/features.npy", "labels/", "features.NPY", "features.npz", "x.npy"]
            ), max_size=3, unique=True)):  # fmt: skip
                zf.writestr(name, good[:100])
        return buf.getvalue()
    if kind == "zip bomb":
        return _zip_bomb()
    return draw(st.sampled_from([DIR, FIFO, TO_DEV_ZERO, DANGLING, None]))  # None: no file


def _with(files: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in files.items() if v is not None)


BAD_DEVICES = ["tpu", "mps", "xla", "meta", "cpu:1", "auto:0", "cuda:x", "cuda:99999", "CUDA:-1",
               "", " ", "gpu", "cuda:0:0", "cpu,cuda"] + (["cuda", "cuda:0", "CUDA"] if NO_GPU else [])  # fmt: skip
DEVICE_WORDS = ("auto", "cpu", "cuda")
bad_devices = st.one_of(
    st.sampled_from(BAD_DEVICES),
    ARG_TEXT.filter(lambda t: not t.strip().lower().startswith(DEVICE_WORDS)),
)
EVALUATE_OPTIONS = [("--json",), ("--distance", "cosine"), ("--distance", "l2"),
                    ("--backend", "torch"), ("--backend", "faiss"), ("--device", "cpu"),
                    ("--device", "auto")]  # fmt: skip


@st.composite
def evaluate_cases(draw, where: str) -> Case:
    """``where``: "query KIND" (a bad query file of that NPZ_KINDS kind), "gallery" (a bad
    gallery file, any kind) or "argument" (a bad option beside a good query)."""
    features, labels = draw(good_sets())
    good = _npz({"features": features, "labels": labels})
    options = [
        x for opt in draw(st.lists(st.sampled_from(EVALUATE_OPTIONS), max_size=3)) for x in opt
    ]
    files: dict[str, Any] = {"q.npz": good}
    argv = ["evaluate", *options, "--query", "q.npz"]  # valid options first: the last one wins
    if where.startswith("query "):
        files["q.npz"] = draw(bad_npz_files(where.removeprefix("query ")))
    elif where == "gallery":
        files["g.npz"] = draw(bad_npz_files(leave_one_out=False))
        argv += ["--gallery", "g.npz"] + (["--paired"] if draw(st.booleans()) else [])
    else:
        n, d = features.shape
        other = draw(st.sampled_from(["dim", "length"]))
        rows, cols = (n, d + draw(st.integers(1, 3))) if other == "dim" else (n + 1, d)
        files["g.npz"] = _npz({"features": np.ones((rows, cols), np.float32),
                               "labels": np.arange(rows) % 2})  # fmt: skip
        argv += draw(st.sampled_from([
            ["--distance", draw(ARG_TEXT.filter(lambda t: t not in ("l2", "cosine")))],
            ["--backend", draw(ARG_TEXT.filter(lambda t: t not in ("torch", "faiss")))],
            ["--device", draw(bad_devices)],
            ["--paired"],  # without a gallery
            ["--gallery", "g.npz", "--paired"] if other == "length" else ["--gallery", "g.npz"],
            ["--bogus"],
            ["extra"],
            ["--query"],  # no value
        ]))  # fmt: skip
    return Case(tuple(argv), _with(files))


# ---------------------------------------------------------------------------------------------
# fct run: suite files and flags (every input is refused before anything trains)


def _refused_at_load(data: bytes) -> bool:
    """Whether a suite file of these bytes is refused when loaded (only such files are run:
    one that loads would train)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    try:
        parse_suite(text, "s", Path("s.toml"))
    except FCTError:
        return True
    return False


BAD_NAMES = ["../x", "a/b", "", ".hidden", "x" * 101, "a\x00b", "a b", "runs/../..", "~", "é/"]


@st.composite
def renamed_suites(draw) -> dict:
    """The base suite with its suite, a scenario's or a method variant's name made unsafe."""
    doc = copy.deepcopy(BASE_DOC)
    bad = draw(st.one_of(st.sampled_from(BAD_NAMES), ARG_TEXT.map(lambda t: t + "/x")))
    where = draw(st.sampled_from(["suite", "scenario", "variant"]))
    if where == "suite":
        doc["suite"]["name"] = bad
    elif where == "scenario":
        doc["scenario"][draw(st.integers(0, 1))]["name"] = bad
    else:
        doc["methods"][bad] = doc["methods"].pop("bct_v")
        doc["suite"]["methods"] = [m if m != "bct_v" else bad for m in doc["suite"]["methods"]]
    return doc


def _splice(data: bytes, position: float, junk: bytes, cut: bool) -> bytes:
    at = int(position * len(data))
    return data[:at] + junk + (b"" if cut else data[at:])


SUITE_JUNK = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"[", b"]]", b"=", b'"', b"\x00", b"\xff", b"\n[[scenario]]\n", b"{"]),
)
bad_suite_bytes = st.one_of(
    st.builds(_splice, st.just(BASE_TEXT.encode()), st.floats(0, 1), SUITE_JUNK, st.booleans()),
    mutated_suites().map(lambda d: toml_doc(d).encode()),
    field_edits().map(lambda d: toml_doc(d).encode()),
    renamed_suites().map(lambda d: toml_doc(d).encode()),
).filter(_refused_at_load)

VALID_RUN_OPTIONS = [("--seed", "3"), ("--force",), ("--sync-bn",), ("--download",), ("--smoke",),
                     ("--data-root", "data")]  # fmt: skip
RUN_OUT = ("--out", "out", "--cache", "cache")


BAD_SEEDS = [",", " , ", "0,0", "-1", "1.5", "0,x", "2147483648", "1e3", "0;1", "0x10", "one",
             "0,,0"]  # fmt: skip


def _bad_seeds() -> st.SearchStrategy[str]:
    """--seeds values that are not distinct non-negative integers below 2^31."""
    ints = st.integers(-(2**40), 2**40)
    return st.one_of(
        st.sampled_from(BAD_SEEDS),
        st.lists(ints, min_size=1, max_size=4)
        .filter(lambda s: min(s) < 0 or max(s) > 2**31 - 1 or len(set(s)) < len(s))
        .map(lambda s: ",".join(map(str, s))),
        st.tuples(ARG_TEXT, st.sampled_from("abcxyz"), ARG_TEXT).map("".join),
    )


def _set_refused(item: str) -> bool:
    """Whether ``--set item`` on the tiny suite is refused (only those are run)."""
    try:
        load_suite("tiny", overrides=parse_set([item]))
    except FCTError:
        return True
    return False


SET_KEYS = ["defaults.model.epochs", "defaults.model.lr", "defaults.old.classes", "bct.weight",
            "defaults.eval.max_per_class", "scenario.half-classes.new.embedding_dim",
            "suite.methods", "defaults.transformation.hidden", "nosuch.key", "defaults.model.archh",
            "defaults", "scenario.nosuch.new.lr", "methods.bct.weight"]  # fmt: skip
SET_VALUES = ["-1", "0", "nan", "inf", "1e9", '"x"', "[1, 2, 3]", "[]", "{}", "true", "x y",
              "1.5", "99999999999999999999", '"../x"', "[0, 0]", "[10, 0]"]  # fmt: skip
BAD_SET_SHAPES = ["", "=", "x", "x=1", ".=1", "a..b=1", "bct.=1", "=1", "a.b.c.d=1", "scenario.x=1"]
bad_sets = st.one_of(
    st.sampled_from(BAD_SET_SHAPES),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SET_KEYS), st.sampled_from(SET_VALUES)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SET_KEYS), ARG_TEXT),
).filter(_set_refused)
BROKEN_PLUGINS = [b"def broken(:\n", b"import fct_no_such_module_for_fuzz\n", b"1 / 0\n",
                  b"raise RuntimeError('a plugin error\\nover two lines')\n", b"\xff\xfe\x00"]  # fmt: skip


def _not_an_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


@st.composite
def run_cases(draw, kind: str) -> Case:
    """``kind``: "suite file", "special file", "suite name" or "flag --NAME" (one bad flag
    beside the valid tiny suite)."""
    options = [x for o in draw(st.lists(st.sampled_from(VALID_RUN_OPTIONS), max_size=2)) for x in o]
    files: dict[str, Any] = {}
    suite, flag = "tiny", []
    if kind == "suite file":
        suite, files["s.toml"] = "s.toml", draw(bad_suite_bytes)
    elif kind == "special file":
        suite = "s.toml"
        files["s.toml"] = draw(st.sampled_from([DIR, FIFO, TO_DEV_ZERO, DANGLING, None, b"",
                                                b"#" * (4 << 20) + b"\n"]))  # fmt: skip
    elif kind == "suite name":
        suite = draw(ARG_TEXT.filter(lambda t: not t.startswith("-") and _unknown_suite(t)))
    else:
        which = kind.removeprefix("flag ")
        if which == "--seeds":
            flag = ["--seeds", draw(_bad_seeds())]
        elif which == "--seed":
            flag = ["--seed", draw(st.one_of(
                st.integers(max_value=-1).map(str), st.integers(min_value=2**31).map(str),
                ARG_TEXT.filter(_not_an_int),
            ))]  # fmt: skip
        elif which == "--set":
            flag = ["--set", draw(bad_sets)]
        elif which == "--device":
            flag = ["--device", draw(bad_devices)]
        elif which in ("--global-batch", "--nproc"):
            flag = [which, draw(st.one_of(st.integers(max_value=0).map(str),
                                          ARG_TEXT.filter(_not_an_int)))]  # fmt: skip
        elif which == "--plugin":
            if draw(st.booleans()):
                files["plugin.py"] = draw(st.sampled_from(BROKEN_PLUGINS))
                flag = ["--plugin", "plugin.py"]
            else:  # a missing file, or a module that does not exist
                flag = ["--plugin", draw(st.sampled_from(["nope.py", "fct_no_such_plugin"]))]
        elif which == "--cache":  # a path below a regular file
            files["blocker"] = b"not a folder"
            flag = ["--cache", "blocker/sub"]
        elif which == "--scenarios":  # wildcards that match no scenario of the suite
            flag = ["--scenarios", draw(st.sampled_from(["half-clases", "nomatch", "x*", "[",
                                                        "half-classes?", "*/half-classes"]))]  # fmt: skip
        elif which == "--bogus":
            flag = ["--bogus"]
        else:
            flag = [draw(st.sampled_from(["--seeds", "--set", "--out", "--device"]))]
    argv = ["run", suite, *RUN_OUT, *options, *flag]  # a flag without its value comes last
    return Case(tuple(argv), _with(files), allowed=("out", "cache"))


def _unknown_suite(name: str) -> bool:
    try:
        suite_path(name)
    except FCTError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# fct report: results folders with bad records


def _record_refused(data: bytes) -> bool:
    """Whether a record file of these bytes is refused by the report (only such are run)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        path.write_bytes(data)
        try:
            validate_record(read_json(path), path)
        except FCTError:
            return True
    return False


GOOD_RECORD = json.dumps(make_record("a", "bct", (40.0, 20.0))).encode()


@st.composite
def report_cases(draw, kind: str) -> Case:
    """``kind``: "record", "special record", "folder", "suite" or "unwritable out"."""
    files: dict[str, Any] = {"res/runs/a/bct.json": GOOD_RECORD}
    suite = REPORT_SUITE
    results = ["--results", "res"]
    if kind == "record":
        files["res/runs/a/fct.json"] = draw(RECORD_FILES.filter(_record_refused))
    elif kind == "special record":
        files["res/runs/a/fct.json"] = draw(st.sampled_from([DIR, FIFO, TO_DEV_ZERO, DANGLING]))
    elif kind == "folder":
        shape = draw(st.sampled_from(["missing", "a file", "runs a file", "empty", "default"]))
        files = {"missing": {}, "a file": {"res": b"x"}, "runs a file": {"res/runs": b"x"},
                 "empty": {"res/runs": DIR}, "default": {}}[shape]  # fmt: skip
        if shape == "default":  # no --results: results/SUITE, which does not exist
            results = []
    elif kind == "suite":  # records exist, none of this suite
        suite = draw(ARG_TEXT.filter(lambda t: t != REPORT_SUITE and not t.startswith("-")))
    out = ["--out", "rep"]
    if kind == "unwritable out":
        files["blocker"] = b"not a folder"
        out = ["--out", "blocker/sub"]
    elif draw(st.booleans()):
        out = []  # the report goes into the (first) results folder
    return Case(("report", suite, *results, *out), _with(files), allowed=("rep", "res"))


# ---------------------------------------------------------------------------------------------
# fct list: what, patterns, plugins, suite folders

LIST_WHAT = ("suites", "scenarios", "methods", "datasets", "losses")


@st.composite
def list_cases(draw, kind: str) -> Case:
    """``kind``: "what", "pattern", "extra", "plugin" or "suites"."""
    what = draw(st.sampled_from(LIST_WHAT))
    files: dict[str, Any] = {}
    env: tuple = ()
    if kind == "what":
        argv = ["list", draw(ARG_TEXT.filter(lambda t: t not in LIST_WHAT))]
    elif kind == "pattern":  # matches nothing: no name starts with "no-such"
        pattern = draw(st.one_of(
            st.sampled_from(["[", "[!", "]", "**/", "\\", "", "?" * 40, "no-such"]),
            ARG_TEXT.map(lambda t: "no-such" + t),
        ))  # fmt: skip
        argv = ["list", what, pattern]
    elif kind == "extra":
        argv = ["list", what, "*", draw(ARG_TEXT)]
    elif kind == "plugin":
        files["plugin.py"] = draw(st.sampled_from(BROKEN_PLUGINS))
        argv = ["list", what, "--plugin", draw(st.sampled_from(["plugin.py", "nope.py"]))]
    else:  # $FCT_SUITES holds a broken suite: listing suites or scenarios names it
        files["mine/broken.toml"] = draw(st.one_of(bad_suite_bytes, st.sampled_from([DIR, FIFO])))
        env = (("FCT_SUITES", "{box}/mine"),)
        argv = ["list", draw(st.sampled_from(["suites", "scenarios"]))]
    return Case(tuple(argv), _with(files), env=env)


# ---------------------------------------------------------------------------------------------
# fct bench: flags refused before the first measurement

BENCH_OPTIONS = [("--quick",), ("--json",), ("--device", "cpu"), ("--sizes", "quickstart"),
                 ("--threads", "1"), ("--batches", "16"), ("--budget", "1")]  # fmt: skip


@st.composite
def bench_cases(draw, kind: str) -> Case:
    """``kind``: "subcommand", "--bogus" or the flag given a bad value."""
    if kind == "subcommand":
        return Case(tuple(["bench", *draw(st.sampled_from(
            [[], [draw(ARG_TEXT.filter(lambda t: t != "transformation" and t[:1] != "-"))]]
        ))]))  # fmt: skip
    options = [x for o in draw(st.lists(st.sampled_from(BENCH_OPTIONS), max_size=3)) for x in o]
    if kind == "--device":
        flag = ["--device", draw(bad_devices)]
    elif kind == "--dtype":  # the first listed dtype is not float32 or bfloat16
        first = draw(
            ARG_TEXT.filter(lambda t: t.strip() not in ("float32", "bfloat16") and "," not in t)
        )
        flag = ["--dtype", first + draw(st.sampled_from(["", ",", ",float32"]))]
        if flag[1] == "":
            flag[1] = "float16"
    elif kind == "--batches":  # at least one token that is not a positive integer
        bad = draw(st.one_of(st.sampled_from(["0", "-3", "1.5", "1e3", "x", "0x10"]),
                             st.tuples(ARG_TEXT, st.sampled_from("abc")).map("".join)))  # fmt: skip
        tokens = draw(st.lists(st.sampled_from(["16", "1024"]), max_size=2)) + [bad]
        flag = ["--batches", ",".join(draw(st.permutations(tokens)))]
    elif kind == "--threads":
        flag = ["--threads", draw(st.one_of(st.integers(max_value=0).map(str),
                                            ARG_TEXT.filter(_not_an_int)))]  # fmt: skip
    elif kind == "--sizes":
        flag = [
            "--sizes",
            draw(ARG_TEXT.filter(lambda t: t not in ("reference", "quickstart", "both"))),
        ]
    elif kind == "--budget":  # not a number at all
        flag = ["--budget", draw(ARG_TEXT.filter(_not_a_float))]
    else:
        flag = ["--bogus"]
    return Case(("bench", "transformation", *options, *flag))


def _not_a_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The tests: one per subcommand (hypothesis), the real CLI against the harness, known gaps

# How many inputs each kind of malformed input gets (kinds with fewer possible inputs stop
# when they run out); docs/reliability.md quotes the totals.
FUZZ_PLAN = {
    "evaluate": {"query contents": 40, **{f"query {k}": 6 for k in NPZ_KINDS[1:]},
                 "query zip bomb": 1, "gallery": 20, "argument": 30},
    "run": {"suite file": 40, "special file": 7, "suite name": 10,
            **{f"flag {f}": 8 for f in ("--seeds", "--seed", "--set", "--device", "--global-batch",
                                        "--nproc", "--plugin", "--scenarios")},
            "flag --cache": 1, "flag --bogus": 1, "flag missing value": 4},
    "report": {"record": 30, "special record": 4, "folder": 5, "suite": 10, "unwritable out": 2},
    "list": {"what": 10, "pattern": 15, "extra": 8, "plugin": 10, "suites": 15},
    "bench": {"subcommand": 6, "--device": 8, "--dtype": 8, "--batches": 8, "--threads": 8,
              "--sizes": 6, "--budget": 8, "--bogus": 1},
}  # fmt: skip
STRATEGIES = {"evaluate": evaluate_cases, "run": run_cases, "report": report_cases,
              "list": list_cases, "bench": bench_cases}  # fmt: skip


@pytest.mark.parametrize(
    "command, kind",
    [pytest.param(c, k, id=f"{c} {k}") for c, kinds in FUZZ_PLAN.items() for k in kinds],
)
def test_malformed_input_is_refused_in_one_line(command, kind, guarded):
    """`fct COMMAND` given malformed input of this kind: exit 2, one line, nothing written
    outside the output folder, nothing trained or measured (see the top of this section)."""

    @settings(CLI, max_examples=FUZZ_PLAN[command][kind])
    @given(case=STRATEGIES[command](kind))
    def refused(case: Case) -> None:
        assert_refused(case, run_case(case))

    refused()


def _real_cli(case: Case, box: Path, audit: Path) -> subprocess.Popen:
    """``python -m fct ARGV`` started in ``box`` (laid out already), environment as above;
    its writes into the repository are logged into ``audit`` (tests/helpers/write_audit)."""
    env = fct_env(
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "helpers" / "write_audit"), str(ROOT)]),
        FCT_AUDIT_ROOT=str(ROOT),
        FCT_AUDIT_LOG=str(audit),
    )
    for key, value in _env(box, case).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.pop("TQDM_DISABLE", None)  # as a user runs it
    return subprocess.Popen(
        fct_command(*case.argv), cwd=box, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _good_npz() -> bytes:
    return _npz({"features": np.eye(4, 3, dtype=np.float32), "labels": np.array([0, 0, 1, 1])})


def _evaluate(*argv: str, **files: Any) -> Case:
    return Case(("evaluate", "--query", *argv), tuple(files.items()))


# One bad input down each of three paths (a file `fct evaluate` cannot read, a device that is
# not there, a suite file `fct run` cannot parse). Each subprocess costs ~3 s of CPU for its
# imports (torch), so three: they show the harness answers as the real CLI; the fuzz tests
# above put every other bad input through the harness (issue 14, point 9: a .npy file, a text
# file, a folder, `--device tpu`, ...).
REAL_CLI_CASES = {
    "evaluate a truncated npz": _evaluate("q.npz", **{"q.npz": _good_npz()[:200]}),
    "evaluate --device cuda without a GPU": _evaluate(
        "q.npz", "--device", "cuda" if NO_GPU else "cuda:9999", **{"q.npz": _good_npz()}
    ),
    "run a broken suite file": Case(
        ("run", "s.toml", *RUN_OUT), (("s.toml", b"[suite\nname = 1\n"),), ("out", "cache")
    ),
}


def test_the_real_cli_answers_as_the_in_process_harness(guarded):
    """Each case through `python -m fct` (all started at once, each in a sandbox of its own)
    and through the harness: both exit 2 with the same one stderr line, and neither writes
    outside its output folders (the subprocess: its sandbox compared before and after, its
    writes into the repository logged by tests/helpers/write_audit). The harness is what the fuzz
    tests above rely on."""
    with contextlib.ExitStack() as stack:
        started = {}
        for name, case in REAL_CLI_CASES.items():
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fct-cli-"))
            box = Path(tmp).resolve()
            audit = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fct-audit-")))
            (box / "home").mkdir()
            _make(box, case.files)
            proc = _real_cli(case, box, audit)
            stack.callback(proc.kill)  # a no-op once it has exited
            started[name] = (box, _tree(box), proc, audit)
        harness = {name: run_case(case) for name, case in REAL_CLI_CASES.items()}
        for name, case in REAL_CLI_CASES.items():
            box, before, proc, audit = started[name]
            out, err = proc.communicate(timeout=120)
            real = Outcome(proc.returncode, out, err.splitlines(), box=str(box))
            real.changed = _changes(box, before, _tree(box), case.allowed) + [
                line
                for log in audit.iterdir()
                for line in log.read_text().splitlines()
                if "__pycache__" not in line
            ]
            assert_refused(case, harness[name])
            assert_refused(case, real)
            assert real.said() == harness[name].said(), name


# Inputs that break the contract today, each with where it goes wrong. strict: once one is
# fixed, its XPASS fails this test: move the input into the strategies above.
_CLASS_RANGE = BASE_TEXT.replace("classes = [0, 10]", "classes = [0, 30]").encode()
#: Gaps the fuzz found (each with where it was and the fix), all fixed since: regular cases.
KNOWN_GAPS = {
    "run --seeds '' trains seed 0": (
        Case(("run", "tiny", *RUN_OUT, "--seeds", ""), allowed=("out", "cache")),
        "fct/cli.py _cmd_run: `_parse_seeds(args.seeds) if args.seeds else [args.seed]` takes an "
        "empty --seeds for no --seeds; test `args.seeds is not None`",
    ),
    "run --methods '' trains every method": (
        Case(("run", "tiny", *RUN_OUT, "--methods", ""), allowed=("out", "cache")),
        "fct/cli.py _cmd_run: an empty --methods list becomes None/() and the runner takes the "
        "suite's methods; refuse a --methods that names no method",
    ),
    "run --methods , trains every method": (
        Case(("run", "tiny", *RUN_OUT, "--methods", ","), allowed=("out", "cache")),
        "fct/cli.py _cmd_run: methods == () is falsy in run_suite (`opts.methods or sc.methods`)",
    ),
    "run --scenarios '' trains every scenario": (
        Case(("run", "tiny", *RUN_OUT, "--scenarios", ""), allowed=("out", "cache")),
        "fct/scenarios.py Suite.select: `if not pattern` selects all; refuse an empty --scenarios",
    ),
    "run --scenarios , is an IndexError": (
        Case(("run", "tiny", *RUN_OUT, "--scenarios", ","), allowed=("out", "cache")),
        "fct/scenarios.py Suite.select: pats is empty, did_you_mean(pats[0], ...) raises "
        "IndexError; refuse a pattern list without a pattern",
    ),
    "run --methods with an unknown name logs a line first": (
        Case(("run", "tiny", *RUN_OUT, "--methods", "fastfil"), allowed=("out", "cache")),
        "fct/runner.py run_suite logs 'suite NAME: N scenario(s) on DEVICE; ...' (INFO) before "
        "check_scenario refuses: two stderr lines; log it after the checks",
    ),
    "run with a class range beyond the dataset logs a line first": (
        Case(("run", "s.toml", *RUN_OUT), (("s.toml", _CLASS_RANGE),), ("out", "cache")),
        "fct/runner.py run_suite: the INFO line comes before check_scenario, as above",
    ),
    "run --out below a file logs a line first": (
        Case(
            ("run", "tiny", "--out", "blocker/sub", "--cache", "cache"),
            (("blocker", b"not a folder"),),
            ("cache",),
        ),  # fmt: skip
        "fct/runner.py run_suite: the INFO line comes before check_writable, as above",
    ),
    "run --nproc 2 launches before checking --seeds": (
        Case(("run", "tiny", *RUN_OUT, "--nproc", "2", "--seeds", "x"), allowed=("out", "cache")),
        "fct/cli.py _cmd_run: with --nproc only the suite is checked before distributed.launch; "
        "parse --seeds, --methods and --global-batch first",
    ),
    "bench --budget -1 measures": (
        Case(("bench", "transformation", "--budget", "-1")),
        "fct/cli.py _cmd_bench: --budget is not checked (negative, 0, nan, inf all measure)",
    ),
    "bench --budget nan measures": (
        Case(("bench", "transformation", "--budget", "nan")),
        "fct/cli.py _cmd_bench: as above",
    ),
    "bench --dtype float32,x measures float32 first": (
        Case(("bench", "transformation", "--dtype", "float32,x")),
        "fct/cli.py _cmd_bench: dtypes are resolved one by one inside measure(); resolve them "
        "all before the first measurement",
    ),
    "bench --dtype '' measures the default": (
        Case(("bench", "transformation", "--dtype", "")),
        "fct/cli.py _cmd_bench: `args.dtype or default` takes an empty --dtype for none",
    ),
    "bench --batches '' measures the default": (
        Case(("bench", "transformation", "--batches", "")),
        "fct/cli.py _cmd_bench: `if args.batches` takes an empty --batches for none",
    ),
}


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=name) for name, (case, _) in sorted(KNOWN_GAPS.items())]
)
def test_fixed_gaps(case, guarded):
    assert_refused(case, run_case(case))

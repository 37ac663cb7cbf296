"""docs/suites.md, the reference of the suite file format, cannot drift from the loader.

The page's key tables are marked ``<!-- keys: SECTION -->`` (the table right below the
marker); the first column of every row is a key in backticks. Each section is compared with
what the code accepts:

==================  =======================================================================
section             the code's keys
==================  =======================================================================
top                 ``fct.scenarios._SECTIONS`` (the loader's unknown-key set for the file)
suite               ``fct.scenarios._SUITE_KEYS`` (unknown-key set of ``[suite]``)
defaults            ``fct.scenarios._DEFAULT_KEYS`` (unknown-key set of ``[defaults]``)
scenario            ``fct.scenarios._SCENARIO_KEYS`` (unknown-key set of ``[[scenario]]``),
                    and the fields of ``Scenario`` (internal ones listed below)
model               ``dataclasses.fields(ModelSpec)`` (``_build`` refuses any other key)
transformation      ``dataclasses.fields(TransformationSpec)``
eval                ``dataclasses.fields(EvalSpec)``
arch_args           ``fct.suite_checks.ARCH_ARGS`` (the allow-list)
kinds               ``fct.scenarios.KINDS``
losses              (loss, argument) pairs: the signatures of the built-in ``fct.losses.LOSSES``
                    factories, plus ``simclr``'s ``temperature`` (SIMCLR_ARGS below)
methods             ``"base"`` (popped by ``_method_specs``) and the fields of
                    ``fct.methods.Settings`` (``label``)
method-settings     (method, setting) pairs: the fields of each built-in method's
                    ``Settings`` class, without ``label``
==================  =======================================================================

A key in the code and not on the page fails, and so does a key on the page and not in the
code. Documented defaults are compared with the dataclass and signature defaults, documented
integer ranges ("A to B") are probed through the loader, and every ```toml block of the page
is loaded by the real loader as a suite file, and every ``fct run ... --set`` line of a ```sh
block is parsed and applied. Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fct import scenarios
from fct.errors import FCTError
from fct.scenarios import (
    KINDS,
    EvalSpec,
    ModelSpec,
    Scenario,
    TransformationSpec,
    list_suites,
    load_suite,
    parse_set,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "suites.md"

#: Fields of Scenario that are no key of a [[scenario]] entry, and why.
SCENARIO_INTERNAL = {
    "suite": "the suite's name, from [suite] name (or the file name)",
    "method_specs": "built from [methods.NAME], settings.NAME and --set, not written directly",
}
#: Keys of a [[scenario]] entry that are no field of Scenario, and why.
SCENARIO_KEY_ONLY = {
    "model": "merged into the old, new and side specs",
    "side_info": "decides whether Scenario.side is None",
    "settings": "per-scenario method settings: goes into Scenario.method_specs",
}
#: SimCLR (side-information only) is no LOSSES entry: its one argument and default are
#: hard-coded in fct.suite_checks._validate_model and fct.builders.train_side.
SIMCLR_ARGS = {"temperature": 0.1}

_MARKER = re.compile(r"<!--\s*keys:\s*([\w-]+)\s*-->")
_KEY_CELL = re.compile(r"^`([^`]+)`$")
_NO_KEY = "—"  # a method without settings


# --- reading the page -----------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), f"not a table row: {line!r}"
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner[1:-1])]


def doc_tables(text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """The marked tables of the page: section -> rows as {header: cell}."""
    lines = (text if text is not None else DOC.read_text(encoding="utf-8")).splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    i = 0
    while i < len(lines):
        m = _MARKER.search(lines[i])
        i += 1
        if not m:
            continue
        section = m.group(1)
        assert section not in tables, f"docs/suites.md marks two tables '{section}'"
        while i < len(lines) and not lines[i].strip():
            i += 1
        block = []
        while i < len(lines) and lines[i].strip().startswith("|"):
            block.append(lines[i])
            i += 1
        assert len(block) >= 3, f"docs/suites.md: no table below <!-- keys: {section} -->"
        header = [h.lower() for h in _cells(block[0])]
        assert set(block[1].replace("|", "").strip()) <= set("-: "), block[1]
        rows = []
        for line in block[2:]:
            cells = _cells(line)
            assert len(cells) == len(header), f"[{section}] row has {len(cells)} cells: {line}"
            rows.append(dict(zip(header, cells, strict=True)))
        tables[section] = rows
    return tables


def key_of(cell: str, section: str) -> str | None:
    """The key of a first cell: `key`; None for a note row (*italic*) or "—"."""
    if cell == _NO_KEY or (cell.startswith("*") and cell.endswith("*")):
        return None
    m = _KEY_CELL.match(cell)
    assert m, f"[{section}] first cell {cell!r} is not a key in backticks"
    return m.group(1)


def documented(section: str) -> list[str]:
    rows = doc_tables()[section]
    first = next(iter(rows[0]))
    keys = [key_of(r[first], section) for r in rows]
    return [k for k in keys if k is not None]


def documented_pairs(section: str) -> dict[tuple[str, str | None], dict[str, str]]:
    """Rows of a two-key table (loss/argument, method/setting): (first, second) -> row."""
    rows = doc_tables()[section]
    first, second = list(rows[0])[:2]
    out = {}
    for r in rows:
        pair = (key_of(r[first], section), key_of(r[second], section))
        assert pair[0] is not None, f"[{section}] row without a key: {r}"
        assert pair not in out, f"[{section}] documents {pair} twice"
        out[pair] = r
    return out


def assert_same(section: str, docs: list | set, code: set) -> None:
    dup = sorted({k for k in docs if list(docs).count(k) > 1})
    assert not dup, f"docs/suites.md [{section}] documents {dup} twice"
    missing, extra = sorted(code - set(docs), key=str), sorted(set(docs) - code, key=str)
    assert not missing and not extra, (
        f"docs/suites.md [{section}] is out of date: keys the code accepts but the page "
        f"does not document: {missing}; keys documented that the code does not accept: {extra}"
    )


def doc_default(cell: str) -> Any:
    """A documented default: "unset..." is None, else the first `value` read as TOML."""
    if cell.lower().startswith("unset"):
        return None
    m = re.search(r"`([^`]+)`", cell)
    assert m, f"default {cell!r} is neither 'unset ...' nor a `value`"
    try:
        return tomllib.loads(f"v = {m.group(1)}")["v"]
    except tomllib.TOMLDecodeError as e:
        raise AssertionError(f"default {m.group(1)!r} is not a TOML value: {e}") from None


def as_toml(value: Any) -> Any:
    """A code default as TOML would write it (tuples of pairs are tables, tuples lists)."""
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: as_toml(v) for k, v in value}
    if isinstance(value, tuple):
        return [as_toml(v) for v in value]
    return value


def check_defaults(section: str, cls: type, skip: set[str] = frozenset()) -> None:
    rows = {key_of(r["key"], section): r for r in doc_tables()[section]}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in rows:
            continue
        code = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = doc_default(rows[f.name]["default"])
        assert doc == as_toml(code), (
            f"docs/suites.md [{section}] `{f.name}`: documented default {doc!r}, "
            f"the code's is {as_toml(code)!r}"
        )


def builtin_methods() -> dict[str, type]:
    from fct.methods import METHODS

    out = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.__module__.startswith("fct.methods"):  # not a plugin a test registered
            out[name] = cls
    return out


def builtin_losses() -> dict[str, Any]:
    from fct.losses import LOSSES

    return {n: LOSSES.get(n) for n in LOSSES.names() if LOSSES.get(n).__module__ == "fct.losses"}


# --- keys: page against code ----------------------------------------------------------------


def test_every_section_is_on_the_page():
    want = {
        "top",
        "suite",
        "defaults",
        "scenario",
        "kinds",
        "model",
        "arch_args",
        "losses",
        "transformation",
        "eval",
        "methods",
        "method-settings",
    }
    assert set(doc_tables()) == want


@pytest.mark.parametrize(
    "section, code",
    [
        ("top", scenarios._SECTIONS),
        ("suite", scenarios._SUITE_KEYS),
        ("defaults", scenarios._DEFAULT_KEYS),
        ("scenario", scenarios._SCENARIO_KEYS),
        ("kinds", set(KINDS)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_table_keys_match_the_loader(section, code):
    assert_same(section, documented(section), set(code))


@pytest.mark.parametrize(
    "section, cls",
    [("model", ModelSpec), ("transformation", TransformationSpec), ("eval", EvalSpec)],
    ids=["model", "transformation", "eval"],
)
def test_spec_keys_match_the_dataclasses(section, cls):
    assert_same(section, documented(section), {f.name for f in dataclasses.fields(cls)})


def test_scenario_keys_match_the_scenario_dataclass():
    fields = {f.name for f in dataclasses.fields(Scenario)}
    stale = (set(SCENARIO_INTERNAL) - fields) | (set(SCENARIO_KEY_ONLY) & fields)
    assert not stale, f"update SCENARIO_INTERNAL / SCENARIO_KEY_ONLY: {sorted(stale)}"
    assert_same(
        "scenario",
        documented("scenario"),
        (fields - set(SCENARIO_INTERNAL)) | set(SCENARIO_KEY_ONLY),
    )


def test_arch_args_match_the_allow_list():
    from fct.suite_checks import ARCH_ARGS

    assert_same("arch_args", documented("arch_args"), set(ARCH_ARGS))


def test_losses_and_their_arguments_match_the_registry():
    code: dict[tuple[str, str | None], Any] = {}
    for name, factory in builtin_losses().items():
        params = inspect.signature(factory).parameters  # follows functools.wraps
        for arg, p in params.items():
            code[(name, arg)] = p.default
        if not params:
            code[(name, None)] = None
    for arg, default in SIMCLR_ARGS.items():
        code[("simclr", arg)] = default
    docs = documented_pairs("losses")
    assert_same("losses", list(docs), set(code))
    for pair, row in docs.items():
        assert doc_default(row["default"]) == code[pair], (
            f"docs/suites.md [losses] {pair}: default {row['default']} != {code[pair]!r}"
        )


def test_method_table_keys_match_the_settings_base():
    from fct.methods import Settings

    code = {"base"} | {f.name for f in dataclasses.fields(Settings)}
    assert_same("methods", documented("methods"), code)


def test_builtin_method_settings_match_their_dataclasses():
    from fct.methods import Settings

    common = {f.name for f in dataclasses.fields(Settings)}  # label: in the methods table
    code: dict[tuple[str, str | None], Any] = {}
    for name, cls in builtin_methods().items():
        own = [f for f in dataclasses.fields(cls.Settings) if f.name not in common]
        for f in own:
            code[(name, f.name)] = f.default
        if not own:
            code[(name, None)] = None
    docs = documented_pairs("method-settings")
    assert_same("method-settings", list(docs), set(code))
    for pair, row in docs.items():
        if pair[1] is not None:
            assert doc_default(row["default"]) == code[pair], (
                f"docs/suites.md [method-settings] {pair}: default {row['default']} "
                f"!= {code[pair]!r}"
            )


# --- defaults and allowed values ------------------------------------------------------------


def test_documented_spec_defaults_are_the_code_defaults():
    check_defaults("model", ModelSpec)
    check_defaults("transformation", TransformationSpec)
    check_defaults("eval", EvalSpec)


def _row(section: str, key: str) -> dict[str, str]:
    rows = [r for r in doc_tables()[section] if key_of(next(iter(r.values())), section) == key]
    assert len(rows) == 1, f"docs/suites.md [{section}] has no row `{key}`"
    return rows[0]


def _assert_mentions(section: str, key: str, names) -> None:
    text = " ".join(_row(section, key).values())
    missing = [n for n in names if f"`{n}`" not in text and f'`"{n}"`' not in text]
    assert not missing, f"docs/suites.md [{section}] `{key}` does not name {missing}"


def test_documented_choices_name_every_choice():
    from fct.data import DATASETS
    from fct.data.loader import AUGMENTS
    from fct.suite_checks import GLOBAL_POOLS

    builtin_data = [n for n in DATASETS.names() if DATASETS.get(n).__module__.startswith("fct.")]
    _assert_mentions("model", "dataset", builtin_data)
    _assert_mentions("model", "loss", [*builtin_losses(), "simclr"])
    _assert_mentions("model", "augment", AUGMENTS)
    _assert_mentions("model", "optimizer", ["sgd", "adamw", "adam"])
    _assert_mentions("model", "embed_act", ["none", "relu"])
    _assert_mentions("arch_args", "global_pool", GLOBAL_POOLS)
    _assert_mentions("transformation", "train_on", ["new", "old"])
    _assert_mentions("transformation", "features", ["cached", "online"])
    _assert_mentions("eval", "distance", ["l2", "cosine"])
    _assert_mentions("eval", "backend", ["torch", "faiss"])


def _int_ranges() -> list[tuple[str, str, int, int]]:
    out = []
    for section in ("model", "transformation"):
        for row in doc_tables()[section]:
            m = re.match(r"^(\d+) to (\d+)$", row["allowed"])
            if m:
                out.append((section, key_of(row["key"], section), int(m[1]), int(m[2])))
    return out


def _probe(tmp_path: Path, section: str, key: str, value: int) -> None:
    tables = {
        "model": {"dataset": '"synthetic"', "arch": '"test_resnet"', "warmup_epochs": "0"},
        "transformation": {"warmup_epochs": "0"},
    }
    tables[section][key] = str(value)
    text = "".join(
        f"[defaults.{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
        for name, table in tables.items()
    )
    text += '[[scenario]]\nname = "probe"\n'
    path = tmp_path / f"probe-{section}-{key}-{value}.toml"
    path.write_text(text, encoding="utf-8")
    load_suite(str(path))


def test_documented_integer_ranges_are_the_loader_ranges(tmp_path):
    ranges = _int_ranges()
    assert len(ranges) >= 6, ranges
    for section, key, low, high in ranges:
        for ok in (low, high):
            _probe(tmp_path, section, key, ok)
        for bad in (low - 1, high + 1):
            with pytest.raises(FCTError, match=key):
                _probe(tmp_path, section, key, bad)


# --- examples -------------------------------------------------------------------------------


def code_blocks(lang: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


TOML_BLOCKS = code_blocks("toml")


def test_the_page_has_examples():
    assert len(TOML_BLOCKS) >= 8
    assert any("--set" in b for b in code_blocks("sh"))


@pytest.mark.parametrize("index", range(len(TOML_BLOCKS)))
def test_toml_example_loads_as_a_suite(index, tmp_path):
    path = tmp_path / f"example{index}.toml"
    path.write_text(TOML_BLOCKS[index], encoding="utf-8")
    suite = load_suite(str(path))
    assert suite.scenarios


def _set_lines() -> list[list[str]]:
    out = []
    for block in code_blocks("sh"):
        for line in block.splitlines():
            if line.startswith("fct run ") and "--set" in line:
                out.append(shlex.split(line))
    return out


@pytest.mark.parametrize("argv", _set_lines(), ids=lambda a: " ".join(a[2:])[:60])
def test_set_example_applies_to_the_shipped_suite(argv, monkeypatch):
    monkeypatch.delenv("FCT_SUITES", raising=False)
    suite = argv[2]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert suite in list_suites(), f"docs/suites.md: `{' '.join(argv)}` names no shipped suite"
    changed = load_suite(suite, overrides=parse_set(sets))
    assert changed != load_suite(suite), f"`{' '.join(argv)}` changes nothing"


def _slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_links_within_the_page_resolve():
    text = DOC.read_text(encoding="utf-8")
    outside = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", outside, flags=re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors, f"broken links: {sorted(links - anchors)}"

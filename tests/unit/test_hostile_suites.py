"""Hostile suite files: names that would become paths outside the results folder, timm arguments
that would load weights, values of the wrong type or range, files that are not text at all.

Each is refused when the suite is loaded, in one FCTError line naming the fix; through
`fct run FILE` that is one `error: ...` line, exit status 2, before anything trains or any
record is written. Names that are accepted always give record paths inside ``OUT/runs``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import toml_str, within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fct.cli import main
from fct.errors import FCTError
from fct.runner import record_path
from fct.scenarios import ARCH_ARGS, NAME_MAX, check_name, load_suite, parse_suite

TINY = Path(__file__).resolve().parents[2] / "fct" / "suites" / "tiny.toml"

# Small enough to load in milliseconds: no data is read when a suite is parsed.
HEAD = '[suite]\nname = "t"\nmethods = ["independent", "bct", "fct", "fct_side"]\n'
DEFAULTS = '[defaults.model]\ndataset = "synthetic"\narch = "test_resnet"\nembedding_dim = 32\n'
SCENARIO = '[[scenario]]\nname = "a"\n'


def refused(text: str, *needles: str, tmp_path: Path) -> str:
    """Parse ``text`` as a suite: it must be refused in one FCTError line holding ``needles``."""
    with pytest.raises(FCTError) as e:
        parse_suite(text, "t", tmp_path / "t.toml")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 1000, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def no_records(out: Path, cache: Path) -> bool:
    """True when no run record, trained model or embedding was written."""
    records = list((out / "runs").rglob("*.json")) if (out / "runs").exists() else []
    trained = [
        k for k in ("models", "features", "transformations", "partial") if (cache / k).exists()
    ]
    return not records and not trained


def cli_refuses(tmp_path: Path, capsys, suite: str | Path, *more: str) -> str:
    """`fct run SUITE --out --cache MORE` in-process: exit 2, one `error:` line, no traceback,
    nothing trained or recorded. Returns the line."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["run", str(suite), "--out", str(out), "--cache", str(cache), "--device", "cpu", *more]
    code = within(60, lambda: main(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert no_records(out, cache)
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. Names: they become folder and file names under --out


BAD_NAMES = [
    "/an/absolute/path",
    "../../../x",
    "..",
    ".",
    "x" * 300,
    "a\x00b",
    "a b",
    "a/b",
    "a\\b",
    "",
    ".hidden",
    "a\nb",
    "é",
    # Names that end like a record file's name: 'fct.seed1' at seed 0 would be the file of
    # 'fct' at seed 1, and a scenario folder 'x.json' would be read as a record by the report.
    "fct.seed1",
    "fct.SEED12",
    "x.json",
    "x.JSON",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:24])
def test_bad_suite_name_is_refused(name, tmp_path):
    text = f"[suite]\nname = {toml_str(name)}\n" + DEFAULTS + SCENARIO
    refused(text, "suite name", "is not allowed", tmp_path=tmp_path)


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:24])
def test_bad_scenario_name_is_refused(name, tmp_path):
    text = HEAD + DEFAULTS + f"[[scenario]]\nname = {toml_str(name)}\n"
    refused(text, "scenario name", "is not allowed", tmp_path=tmp_path)


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:24])
def test_bad_method_variant_name_is_refused(name, tmp_path):
    # As a [methods.NAME] variant table, and as a name in a scenario's list of methods.
    table = HEAD + DEFAULTS + f'[methods.{toml_str(name)}]\nbase = "bct"\n' + SCENARIO
    refused(table, "method name", "is not allowed", tmp_path=tmp_path)
    listed = HEAD + DEFAULTS + SCENARIO + f'methods = ["fct", {toml_str(name)}]\n'
    refused(listed, "method name", "is not allowed", tmp_path=tmp_path)


def test_suite_named_after_a_bad_file_name_is_refused(tmp_path):
    """Without `name` in [suite] the file's stem is the suite's name; it is checked the same."""
    path = tmp_path / "my suite.toml"
    path.write_text("[suite]\n" + DEFAULTS + SCENARIO)
    with pytest.raises(FCTError, match="suite name 'my suite' is not allowed"):
        load_suite(str(path))


def test_bad_names_through_the_cli(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(HEAD + DEFAULTS + '[[scenario]]\nname = "../../../x"\n')
    msg = cli_refuses(tmp_path, capsys, path)
    assert "scenario name '../../../x' is not allowed" in msg
    assert not (tmp_path / "x").exists()


def test_scenario_names_differing_only_in_case_are_refused(tmp_path):
    text = HEAD + DEFAULTS + SCENARIO + '[[scenario]]\nname = "A"\n'
    refused(text, "clashes with 'a'", "letter case", tmp_path=tmp_path)


def test_method_names_differing_only_in_case_are_refused(tmp_path):
    """Two methods of one scenario whose record files would be one file on a case-insensitive
    file system (macOS, Windows): 'FCT' (a variant of fct) beside 'fct'."""
    text = (
        HEAD + DEFAULTS + '[methods.FCT]\nbase = "fct"\n' + SCENARIO + 'methods = ["fct", "FCT"]\n'
    )
    refused(text, "'FCT'", "'fct'", "letter case", tmp_path=tmp_path)
    # Apart, in scenarios of their own, they are fine.
    ok = HEAD + DEFAULTS + '[methods.FCT]\nbase = "fct"\n' + SCENARIO + 'methods = ["FCT"]\n'
    assert parse_suite(ok, "t", tmp_path / "t.toml").scenarios[0].methods == ("FCT",)


GOOD_NAMES = ["a", "half-classes", "A_b.c-9", "a..b", "a.", "x" * NAME_MAX, "fct.seed", "seed1"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_load_and_stay_inside_runs(name, tmp_path):
    text = (
        f"[suite]\nname = {toml_str(name)}\n"
        + DEFAULTS
        + f'[methods.{toml_str(name)}]\nbase = "fct"\n'
        + f'[[scenario]]\nname = {toml_str(name)}\nmethods = ["fct", {toml_str(name)}]\n'
    )
    suite = parse_suite(text, "t", tmp_path / "t.toml")
    sc = suite.scenarios[0]
    assert suite.name == sc.name == name and sc.methods == ("fct", name)
    out = tmp_path / "out"
    runs = (out / "runs").resolve()
    for method in sc.methods:
        for seed in (0, 1, 2**31 - 1):
            path = record_path(out, sc.name, method, seed)
            assert path.resolve().parent == runs / name, path
            assert path.name.endswith(".json")


NAME_CHARS = st.sampled_from("abcXYZ0189-_.")


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    scenario=st.text(NAME_CHARS, min_size=1, max_size=12), method=st.text(NAME_CHARS, max_size=12)
)
def test_every_accepted_name_gives_a_record_path_inside_runs(scenario, method):
    """Whatever check_name accepts gives one file directly in ``OUT/runs/SCENARIO/``; two
    accepted (scenario, method, seed) triples never share a record file."""
    out = Path("/tmp/fct-out-that-is-never-written")
    try:
        check_name(scenario, "scenario", "test")
        check_name(method, "method", "test")
    except FCTError:
        return
    runs = (out / "runs").resolve()
    paths = {}
    for seed in (0, 1, 10):
        path = record_path(out, scenario, method, seed).resolve()
        assert path.parent == runs / scenario and path.parent.parent == runs
        paths[path] = seed
    assert len(paths) == 3
    # The file of this method at seed 0 is never that of another accepted method at seed N.
    stem = record_path(out, scenario, method, 0).name.removesuffix(".json")
    base, dot, seed = stem.rpartition(".seed")
    assert not (dot and seed.isdigit() and base), stem


@pytest.mark.parametrize(
    ("scenario", "method"),
    [
        ("../../../x", "fct"),
        ("/an/absolute/path", "fct"),
        ("..", "fct"),
        (".", "fct"),
        ("", "fct"),
        ("a/b", "fct"),
        ("a\x00b", "fct"),
        ("a", "../../x"),
        ("a", "/etc/passwd"),
        ("a", "b/c"),
        ("a", ""),
        ("a", "x" * 300),
    ],
    ids=repr,
)
def test_record_path_refuses_names_that_leave_runs(scenario, method, tmp_path):
    """The last line of defence: a name that reached the runner without check_name (a plugin's
    registered method, a Scenario built in code) still cannot put a record outside OUT/runs."""
    with pytest.raises(FCTError) as e:
        record_path(tmp_path / "out", scenario, method, 0)
    assert "\n" not in str(e.value) and "outside" in str(e.value)


def test_record_path_refuses_a_scenario_folder_linked_out_of_runs(tmp_path):
    """OUT/runs/SCENARIO a symlink to a folder elsewhere: the record would be written there."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "runs" / "a").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FCTError, match="outside"):
        record_path(out, "a", "fct", 0)
    # The record file itself may be anything (a link out, a loop): that is damage the runner
    # moves aside (tests/e2e/test_fuzz_inputs.py), not a reason to stop.
    (out / "runs" / "b").mkdir()
    (out / "runs" / "b" / "fct.json").symlink_to(out / "runs" / "b" / "fct.json")
    (out / "runs" / "b" / "bct.json").symlink_to(elsewhere / "bct.json")
    assert record_path(out, "b", "fct", 0) == out / "runs" / "b" / "fct.json"
    assert record_path(out, "b", "bct", 0) == out / "runs" / "b" / "bct.json"
    # OUT itself (or OUT/runs) may be a link: records still land in OUT/runs.
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    assert (
        record_path(tmp_path / "link", "b", "fct", 0)
        == tmp_path / "link" / "runs" / "b" / "fct.json"
    )


# ---------------------------------------------------------------------------------------------
# 2. timm arguments: shapes and regularisation only, never anything that loads weights


LOADING_ARGS = [
    'checkpoint_path = "x.pth"',
    "pretrained = true",
    'pretrained_cfg = "a1_in1k"',
    'pretrained_cfg_overlay = { file = "/tmp/weights.pth", num_classes = 0 }',
    'pretrained_cfg_overlay = { hf_hub_id = "someone/else" }',
    "pretrained_strict = false",
    'cache_dir = "/tmp"',
    "features_only = true",
]


@pytest.mark.parametrize("arg", LOADING_ARGS)
@pytest.mark.parametrize("where", ["model", "old", "new", "side"])
def test_arch_args_that_load_weights_are_refused(arg, where, tmp_path):
    key = arg.split(" =")[0]
    text = HEAD + DEFAULTS + SCENARIO + f"{where} = {{ arch_args = {{ {arg} }} }}\n"
    refused(
        text, f"arch_args key '{key}' is not allowed", "no weights are loaded", tmp_path=tmp_path
    )


def test_arch_args_in_defaults_are_checked_too(tmp_path):
    text = HEAD + DEFAULTS + 'arch_args = { checkpoint_path = "x.pth" }\n' + SCENARIO
    refused(text, "[old]", "arch_args key 'checkpoint_path' is not allowed", tmp_path=tmp_path)


ALLOWED_ARGS = {
    "drop_rate": 0.1,
    "drop_path_rate": 0.05,
    "drop_block_rate": 0.0,
    "channels": [8, 16, 32, 64],
    "layers": [1, 1, 1, 1],
    "stem_width": 16,
    "stem_type": "deep",
    "output_stride": 16,
    "width_multiplier": 0.5,
    "depth_multiplier": 1.0,
    "channel_multiplier": 0.75,
    "global_pool": "avg",
}


def test_allowed_arch_args_still_load(tmp_path):
    assert set(ALLOWED_ARGS) == ARCH_ARGS
    args = ", ".join(f"{k} = {json.dumps(v)}" for k, v in ALLOWED_ARGS.items())
    text = HEAD + DEFAULTS + SCENARIO + f"model = {{ arch_args = {{ {args} }} }}\n"
    sc = parse_suite(text, "t", tmp_path / "t.toml").scenarios[0]
    want = {k: tuple(v) if isinstance(v, list) else v for k, v in ALLOWED_ARGS.items()}
    assert dict(sc.old.arch_args) == dict(sc.new.arch_args) == want


def test_allowed_arch_args_build_a_model():
    """What the allow-list admits is what timm's ResNet takes (one cheap backbone)."""
    import torch

    from fct.models import build_backbone

    model = build_backbone(
        "test_resnet", 3, 16, {"drop_rate": 0.1, "stem_width": 16, "stem_type": "deep"}
    )
    assert model(torch.zeros(2, 3, 16, 16)).shape[0] == 2


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ('drop_rate = "x"', "drop_rate must be a number in [0, 1)"),
        ("drop_rate = 1.5", "drop_rate must be a number in [0, 1)"),
        ("drop_path_rate = true", "drop_path_rate must be a number in [0, 1)"),
        ("channels = [-1, 2]", "channels must be"),
        ('layers = [1, "a"]', "layers must be"),
        ("layers = [0, 1]", "layers must be"),
        ("layers = []", "layers must be"),
        ("stem_width = 0", "stem_width must be"),
        ("output_stride = 7", "output_stride must be 8, 16 or 32"),
        ("width_multiplier = -1.0", "width_multiplier must be"),
        ("depth_multiplier = nan", "depth_multiplier must be"),
        ('global_pool = ""', "global_pool must be one of"),
        ('global_pool = "zz"', "global_pool must be one of"),
        ("stem_type = 5", "stem_type must be"),
    ],
)
def test_allowed_arch_args_with_bad_values_are_refused(arg, needle, tmp_path):
    """A value timm would reject mid-run with a traceback (a string rate, a negative width, an
    output stride it asserts on) is refused when the suite loads."""
    text = HEAD + DEFAULTS + SCENARIO + f"model = {{ arch_args = {{ {arg} }} }}\n"
    refused(text, "arch_args", needle, tmp_path=tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. Types and ranges through `fct run FILE`: exit 2, one line, nothing trained or written


def _tiny() -> str:
    return TINY.read_text()


SUITE_TABLE = '[suite]\nname = "t"\n'


BAD_VALUES = {
    "kinds = 5": (
        lambda: _tiny().replace('kinds = ["class-subset"]', "kinds = 5"),
        "kinds must be a list",
    ),
    "methods = 5": (
        lambda: _tiny().replace(
            'methods = ["independent", "bct", "fct", "fct_side"]', "methods = 5"
        ),
        "methods must be a list",
    ),
    "methods = [1]": (
        lambda: _tiny().replace(
            'methods = ["independent", "bct", "fct", "fct_side"]', "methods = [1]"
        ),
        "methods must be a list",
    ),
    "scenario methods = [1]": (lambda: _tiny() + "methods = [1]\n", "methods must be a list"),
    # A top-level key in place of a whole section (TOML wants it before the first table).
    "defaults = 5": (
        lambda: "defaults = 5\n" + SUITE_TABLE + SCENARIO,
        "'defaults' must be a table",
    ),
    "suite = 5": (lambda: "suite = 5\n" + DEFAULTS + SCENARIO, "'suite' must be a table"),
    "scenario = [1]": (
        lambda: "scenario = [1]\n" + SUITE_TABLE + DEFAULTS,
        "scenarios are [[scenario]] tables",
    ),
    "scenario = 5": (
        lambda: "scenario = 5\n" + SUITE_TABLE + DEFAULTS,
        "scenarios are [[scenario]] tables",
    ),
    "model = 5": (lambda: _tiny() + "model = 5\n", "'model' must be a table"),
    "[methods.bct] smoothing = 5.0": (
        lambda: _tiny() + "[methods.bct]\nsmoothing = 5.0\n",
        "[methods.bct]: setting 'smoothing' must be in [0, 1)",
    ),
    "image_size = -4": (
        lambda: _tiny() + "model = { image_size = -4 }\n",
        "image_size must be an integer in [8, 4096], got -4",
    ),
    "transformation batch_size = 0": (
        lambda: _tiny() + "transformation = { batch_size = 0 }\n",
        "batch_size must be an integer in [1,",
    ),
    "embedding_dim = 10000000": (
        lambda: _tiny() + "model = { embedding_dim = 10000000 }\n",
        "embedding_dim must be an integer in [1, 65536], got 10000000",
    ),
    "features = sometimes": (
        lambda: _tiny() + 'transformation = { features = "sometimes" }\n',
        "features must be 'cached'",
    ),
    "views = 0": (
        lambda: _tiny() + "transformation = { views = 0 }\n",
        "views must be an integer in [1, 64], got 0",
    ),
    "max_per_class = true": (
        lambda: _tiny() + "model = { max_per_class = true }\n",
        "max_per_class must be a positive integer, got True",
    ),
    "eval max_per_class = true": (
        lambda: _tiny() + "eval = { max_per_class = true }\n",
        "max_per_class must be a positive integer",
    ),
    "classes = [false, true]": (
        lambda: _tiny() + "model = { classes = [false, true] }\n",
        "classes must be [first, end)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_types_and_ranges_exit_2_before_anything_trains(case, tmp_path, capsys):
    make, needle = BAD_VALUES[case]
    path = tmp_path / "s.toml"
    path.write_text(make())
    msg = cli_refuses(tmp_path, capsys, path)
    assert needle in msg, msg


@pytest.mark.parametrize(
    ("seed", "needle"),
    [
        ("-1", "--seed must be an integer in [0, 2147483647], got -1"),
        ("99999999999999999999", "--seed must be an integer in [0, 2147483647]"),
        ("2147483648", "--seed must be an integer in [0, 2147483647]"),
        ("1e3", "--seed: invalid int value"),
    ],
)
def test_bad_seed_exits_2_before_anything_trains(seed, needle, tmp_path, capsys):
    msg = cli_refuses(tmp_path, capsys, TINY, "--seed", seed)
    assert needle in msg, msg


def test_bad_seeds_exit_2_before_anything_trains(tmp_path, capsys):
    msg = cli_refuses(tmp_path, capsys, TINY, "--seeds", "0,99999999999999999999")
    assert "--seeds takes distinct non-negative integers" in msg


def test_suite_file_that_is_a_fifo_does_not_hang(tmp_path, capsys):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    msg = cli_refuses(tmp_path, capsys, fifo)  # within() fails the test if it blocks
    assert str(fifo) in msg
    with pytest.raises(FCTError):
        within(10, lambda: load_suite(str(fifo)))


def test_suite_file_of_invalid_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[suite]\nname = "\xff\xfe"\n[[scenario]]\nname = "a"\n')
    msg = cli_refuses(tmp_path, capsys, path)
    assert "must be UTF-8 text" in msg and str(path) in msg


def test_suite_file_of_10_mb_is_refused_unread(tmp_path, capsys, monkeypatch):
    path = tmp_path / "big.toml"
    with open(path, "w") as fh:
        fh.write(_tiny())
        fh.write(("# " + "x" * 1022 + "\n") * (10 << 10))
    assert path.stat().st_size > 10 << 20
    # The size is checked before anything is parsed: TOML never sees the text.
    import tomllib

    monkeypatch.setattr(tomllib, "loads", lambda *a, **k: pytest.fail("parsed a 10 MB file"))
    msg = cli_refuses(tmp_path, capsys, path)
    assert "over the" in msg and "limit for a suite file" in msg


def test_a_folder_or_a_symlinked_fifo_as_suite_file(tmp_path, capsys):
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    cli_refuses(tmp_path, capsys, folder)
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    link = tmp_path / "link.toml"
    link.symlink_to(fifo)
    cli_refuses(tmp_path, capsys, link)


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    key=st.sampled_from(
        [
            "epochs",
            "batch_size",
            "embedding_dim",
            "image_size",
            "max_per_class",
            "lr",
            "momentum",
            "weight_decay",
            "warmup_epochs",
        ]
    ),
    value=st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=5),
    ),
)
def test_model_numbers_are_in_range_or_refused(key, value, tmp_path):
    """Any number (or not-a-number) for a model field either loads within its documented range
    or is refused in one line."""
    if isinstance(value, bool):
        literal = "true" if value else "false"
    elif isinstance(value, str):
        literal = toml_str(value)
    else:  # repr of a float is TOML too: 1e+300, inf, -inf; NaN is spelled nan
        literal = "nan" if value != value else repr(value)
    text = HEAD + DEFAULTS + SCENARIO + f"new = {{ {key} = {literal} }}\n"
    try:
        sc = parse_suite(text, "t", tmp_path / "t.toml").scenarios[0]
    except FCTError as e:
        assert "\n" not in str(e)
        return
    got = getattr(sc.new, key)
    assert not isinstance(got, bool | str)
    if key in ("epochs", "batch_size", "embedding_dim", "image_size", "max_per_class"):
        assert isinstance(got, int) and got > 0
    else:
        assert 0 <= got < 1e308


def test_loss_argument_called_name_is_refused(tmp_path):
    """Found by tests/e2e/test_fuzz_inputs.py: `loss_args = { name = ... }` collided with
    make_loss's own parameter and raised TypeError instead of naming the argument."""
    text = HEAD + DEFAULTS + SCENARIO + 'old = { loss_args = { name = "x" } }\n'
    refused(text, "loss_args", "unknown argument(s) name", tmp_path=tmp_path)

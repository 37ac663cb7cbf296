"""A non-editable install ships the suites (package data), and suites are found by name in
$FCT_SUITES before the shipped ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from fct.scenarios import SUITES_DIR, list_suites, load_suite, suite_path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_every_shipped_suite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fct", src / "fct", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fct/suites/")}
    expected = {f"fct/suites/{p.name}" for p in SUITES_DIR.glob("*.toml")}
    assert {"fct/suites/quickstart.toml", "fct/suites/tiny.toml"} <= expected
    assert shipped == expected


def test_fct_suites_folder_is_searched_first(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    text = (SUITES_DIR / "tiny.toml").read_text().replace('name = "tiny"', 'name = "tiny2"')
    (mine / "tiny2.toml").write_text(text)
    (mine / "tiny.toml").write_text(text)  # shadows the shipped tiny
    monkeypatch.setenv("FCT_SUITES", str(mine))
    assert {"tiny2", "tiny", "quickstart"} <= set(list_suites())
    assert suite_path("tiny") == mine / "tiny.toml"
    assert suite_path("quickstart") == SUITES_DIR / "quickstart.toml"
    assert load_suite("tiny2").scenarios

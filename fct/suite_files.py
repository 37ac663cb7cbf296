"""Where suite files are found: by path, or by name in the suite folders (``$FCT_SUITES``,
then the suites shipped in the package). fct.scenarios loads and parses what is found here
(and re-exports these names)."""

from __future__ import annotations

import os
from pathlib import Path

from fct.errors import FCTError
from fct.registry import did_you_mean

SUITES_DIR = Path(__file__).resolve().parent / "suites"


def suite_folders(suites_dir: Path | None = None) -> list[Path]:
    """Where suites are looked up by name, first match wins: ``suites_dir`` when given, else
    the folders of ``$FCT_SUITES`` (separated by the OS path separator), then the suites
    shipped inside the package (fct/suites/, installed as package data)."""
    if suites_dir is not None:
        return [Path(suites_dir)]
    extra = [Path(p) for p in os.environ.get("FCT_SUITES", "").split(os.pathsep) if p]
    return [*extra, SUITES_DIR]


def suite_path(name: str, suites_dir: Path | None = None) -> Path:
    """The file of suite ``name``: a path to a .toml, or NAME.toml in the suite folders."""
    p = Path(name)
    if p.suffix == ".toml":
        if not p.exists() and not p.is_symlink():
            raise FCTError(f"suite file {p} does not exist; check the path")
        return p  # not a regular file: load_suite's bounded read names the problem
    for folder in suite_folders(suites_dir):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    raise FCTError(
        f"unknown suite '{name}'{did_you_mean(name, list_suites(suites_dir))}; see "
        "`fct list suites`, or pass the path of a .toml file"
    )


def list_suites(folder: Path | None = None) -> list[str]:
    """Names of the suites found in the suite folders (see suite_folders)."""
    return sorted({p.stem for f in suite_folders(folder) for p in f.glob("*.toml")})

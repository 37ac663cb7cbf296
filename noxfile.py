"""Developer and suite sessions.

The heavy sessions (tests, suites, bench) share one virtualenv, ``.nox/fct``: torch alone is
several GB, so it is built once and reinstalled only when pyproject.toml changes. ``lint`` has
its own small environment.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
ENV = ROOT / ".nox" / "fct"
BIN = ENV / "bin"


def _shared_env(session: nox.Session) -> str:
    """Create or refresh the shared environment; return its python executable."""
    stamp = ENV / ".fct-stamp"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = str(BIN / "python")
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(ENV), external=True)
        session.run(python, "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
    if not stamp.exists() or stamp.read_text() != digest:
        # torch and torchvision first, pinned to the builds a constraint file may cap us at.
        session.run(python, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]", external=True)
        stamp.write_text(digest)
    return python


def _fct(session: nox.Session, *args: str) -> None:
    python = _shared_env(session)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    session.run(python, "-m", "fct", *args, external=True, env=env)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the CPU test suite on every core (pytest args pass through: `-- -m "not slow"`)."""
    python = _shared_env(session)
    # One worker per core (pytest-xdist), tests handed out as workers free up; every test runs
    # its torch on one thread (tests/conftest.py), so the workers do not oversubscribe the CPU.
    args = ["-q", "-n", "auto", "--dist", "worksteal", *session.posargs]
    # Compiled modules and pytest's rewritten test modules are cached in __pycache__ even where
    # the environment turns that off (PYTHONDONTWRITEBYTECODE): 2.5 s less of collection per
    # worker, and less start-up in every fresh interpreter a test starts.
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    session.run(python, "-m", "pytest", *args, external=True, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff")
    session.run("ruff", "check", "fct", "tests", "bench", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "fct", "tests", "bench", "examples", "noxfile.py")


@nox.session(venv_backend="none", default=False)
def quickstart(session: nox.Session) -> None:
    """The quickstart suite on Fashion-MNIST (CPU minutes); results in results/quickstart/."""
    _fct(session, "run", "quickstart", *session.posargs)


def _suite_session(name: str, doc: str):
    def session_fn(session: nox.Session) -> None:
        _fct(session, "run", name, *session.posargs)

    session_fn.__doc__ = doc
    return nox.session(name=f"{name}_suite", venv_backend="none", default=False)(session_fn)


cifar100_suite = _suite_session(
    "cifar100", "CIFAR-100 paper suite (-- --data-root DIR, --smoke, ...)"
)
imagenet_suite = _suite_session(
    "imagenet", "ImageNet paper suite (-- --data-root /data/imagenet, ...)"
)
places365_suite = _suite_session("places365", "Places-365 paper suite (-- --data-root DIR, ...)")
vggface2_suite = _suite_session("vggface2", "VGGFace2 paper suite (-- --data-root DIR, ...)")


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """Throughput and metric benchmarks (pytest-benchmark); figures go to results/bench/."""
    python = _shared_env(session)
    session.run(
        python,
        "-m",
        "pytest",
        "bench",
        "--benchmark-enable",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        *session.posargs,
        external=True,
    )


@nox.session(venv_backend="none", default=False)
def mutants(session: nox.Session) -> None:
    """Mutation testing of the core modules with the fast unit tests (mutmut 3; slow).

    ``nox -s mutants`` mutates every module of ``[tool.mutmut] only_mutate`` in pyproject.toml;
    ``nox -s mutants -- "fct.losses*"`` only the mutants whose names match (one module at a
    time fits a small machine). Results stay in ``mutants/`` between runs (unchanged functions
    are not retested); ``mutmut results`` lists the survivors, ``mutmut show NAME`` one diff.
    See docs/testing.md for the last measured kill rate and the survivors' reasons.
    """
    python = _shared_env(session)
    session.run(python, "-m", "pip", "install", "-q", "mutmut>=3.3,<4", external=True)
    env = {"FCT_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    session.run(python, "-m", "mutmut", "run", *session.posargs, external=True, env=env)
    session.run(python, "-m", "mutmut", "results", external=True, env=env)

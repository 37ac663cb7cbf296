"""The forked `fct` the end-to-end tests start (tests/helpers/forked_cli.py) answers as a fresh
`python -m fct` does: same exit status, same stdout, same stderr, on a command that succeeds and
on commands refused in one line; what a fresh interpreter prints for an exception escaping
`main` (a traceback, exit 1); and SIGKILL kills it."""

from __future__ import annotations

import signal

import pytest
from conftest import run_fct, start_fct

# A fresh interpreter costs ~4 CPU s: a few commands, each down another path of the CLI.
CASES = {
    "list methods": ["list", "methods"],
    "unknown suite": ["run", "quickstar", "--out", "o"],
    "missing query file": ["evaluate", "--query", "missing.npz"],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_a_fork_answers_as_a_fresh_interpreter(argv, tmp_path):
    fresh = run_fct(*argv, cwd=tmp_path, fresh=True)
    forked = run_fct(*argv, cwd=tmp_path)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )
    assert fresh.returncode in (0, 2)


def test_an_exception_escaping_main_is_a_traceback_and_exit_1(tmp_path, monkeypatch):
    import fct.cli

    def broken(argv=None):
        raise RuntimeError("planted")

    monkeypatch.setattr(fct.cli, "main", broken)  # the fork inherits the patch
    proc = run_fct("list", "suites", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: planted" in proc.stderr


def test_a_fork_is_killed_for_real(tmp_path):
    proc = start_fct("run", "tiny", "--out", str(tmp_path / "o"), cwd=tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.stderr.close()
    assert proc.wait(timeout=60) == -signal.SIGKILL

"""The forked `fct` the end-to-end tests start (tests/helpers/forked_cli.py) answers as a fresh
`python -m fct` does: same exit status, same stdout, same stderr, on a command that succeeds and
on commands refused in one line; what a fresh interpreter prints for an exception escaping
`main` (a traceback, exit 1); and SIGKILL kills it. Forked ranks start as torchrun's workers do."""

from __future__ import annotations

import signal

import forked_cli
import pytest
from conftest import fct_env, run_fct, start_fct

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


def _rank_1_fails() -> int:
    import time

    from fct import distributed

    distributed.setup("cpu")  # the process group forms as under torchrun
    total = distributed.all_reduce_sum(distributed.rank() + 1.0)
    print(f"rank {distributed.rank()} of {distributed.world()}: sum {total:g}", flush=True)
    if distributed.rank() == 1:
        return 3
    time.sleep(600)  # rank 0 would run on for good
    return 0


def test_forked_ranks_form_a_group_and_one_failing_rank_ends_the_others(tmp_path):
    """run_ranks (the ranks of tests/e2e/test_distributed.py) as torchrun: every rank joins
    one gloo group, and a rank that fails ends the ones still running; its status is the
    launch's."""
    proc = forked_cli.run_ranks(2, ["ranks"], tmp_path, fct_env(), 120, target=_rank_1_fails)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["rank 0 of 2: sum 3", "rank 1 of 2: sum 3"]

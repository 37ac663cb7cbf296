"""fct.threads: one thread per usable core (or, with FCT_THREADS=auto, per core other processes
leave free); the environment wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fct.threads import TAKEN, available_cores, decide, others_busy


@pytest.mark.parametrize(
    ("cores", "others", "want"),
    [
        (2, 0.0, 2),  # quiet: every core
        (2, 0.3, 2),  # a little noise does not cost a core
        (2, 1.0, 1),  # beside one busy process: the free core only
        (2, 2.0, 1),  # oversubscribed: one thread, never zero
        (2, 5.0, 1),
        (16, 3.2, 13),
        (16, 2.6, 13),  # 0.6 of a core taken counts as a core
        (1, 0.0, 1),
    ],
)
def test_auto_takes_one_thread_per_free_core(cores, others, want):
    assert decide(cores, others, {"FCT_THREADS": "auto"}).threads == want


@pytest.mark.parametrize("others", [0.0, 1.0, 5.0, None])
def test_by_default_every_core_whatever_the_load(others):
    """Reproducible numerics: the count never depends on what else runs."""
    assert decide(4, others, {}).threads == 4


def test_a_core_counts_as_taken_above_the_threshold():
    auto = {"FCT_THREADS": "auto"}
    assert decide(4, TAKEN - 0.01, auto).threads == 4
    assert decide(4, TAKEN + 0.01, auto).threads == 3


def test_the_environment_wins_and_nothing_adapts():
    assert decide(16, 0.0, {"FCT_THREADS": "3"}).threads == 3
    assert decide(16, 9.0, {"OMP_NUM_THREADS": "5"}).threads == 5
    assert decide(16, 0.0, {"FCT_THREADS": "2", "OMP_NUM_THREADS": "7"}).threads == 2
    assert decide(4, 0.0, {"FCT_THREADS": "junk"}).threads == 4  # ignored, not a crash
    assert decide(4, None, {"FCT_THREADS": "auto"}).threads == 4  # load unknown: every core


def test_available_cores_is_the_affinity():
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_others_busy_sees_a_busy_process():
    """A spinning process beside us shows as about one busy core (bounded above by the
    machine: other tests may run too, so only the lower bound is tight)."""
    quiet = others_busy(0.3)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = others_busy(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert quiet is not None and busy is not None
    assert busy >= 0.7 and busy > quiet - 0.3

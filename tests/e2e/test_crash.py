"""Crash safety: `fct run` killed with SIGKILL at several moments, then rerun, ends with the
run records of an uninterrupted run, and an interrupted training resumes from its checkpoint."""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

from conftest import assert_cache_verifies, records, run_fct, start_fct, tiny_args

# (what the killed run must have printed, to its log, when SIGKILL arrives). Each kill lands
# a few milliseconds after the line, while the process goes on working: mid-epoch, mid-write.
KILL_POINTS = (
    # During the first model's training, after its first epoch checkpoint.
    r"test_resnet-synthetic-all-ce-32 epoch 2/3",
    # Right after the first run record was written, while BCT's model starts training.
    r"half-classes / bct: fitting",
    # During the transformation's training (six short epochs).
    r"h-test_resnet-synthetic-all-ce-32 epoch 3/6",
    # After the last record, while the report is written.
    r"half-classes / fct_side: cross",
)


def run_until(args: list[str], cwd: Path, marker: str, timeout: float = 300) -> str:
    """Start `fct ARGS`, SIGKILL it as soon as its log shows ``marker``; return the log."""
    proc = start_fct(*args, cwd=cwd)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.search(marker, line):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.stderr.close()
        proc.wait()
    log = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {marker!r}:\n{log[-3000:]}"
    return log


def test_killed_at_any_point_then_rerun_gives_the_clean_records(clean_tiny, tmp_path):
    _, _, clean = clean_tiny
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = tiny_args(out, cache)
    logs = [run_until(args, tmp_path, marker) for marker in KILL_POINTS]

    # The first rerun finds the first model's epoch checkpoint and continues from it.
    assert re.search(
        r"test_resnet-synthetic-all-ce-32: resuming from the checkpoint of epoch [12]/3", logs[1]
    ), logs[1][-3000:]
    # Finished records are never redone: the third run skips independent (the second wrote it).
    assert "independent: up to date" in logs[2]

    final = run_fct(*args, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "training" not in final.stderr  # everything was trained by the killed runs
    assert records(out) == clean
    assert_cache_verifies(cache, no_temps=False)
    assert (out / "leaderboard.md").stat().st_size > 0

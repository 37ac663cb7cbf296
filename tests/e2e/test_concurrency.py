"""Two `fct run` processes sharing one cache: the per-artifact lock makes one build each
artifact while the other waits for it and then loads it; neither corrupts the cache."""

from __future__ import annotations

import fcntl
import threading
import time

from conftest import assert_cache_verifies, entries, records, start_fct, tiny_args

FIRST = "models/test_resnet-synthetic-all-ce-32"  # the first artifact `fct run tiny` builds


def test_two_runs_share_one_cache_without_corrupting_it(clean_tiny, tmp_path):
    _, clean_cache, clean = clean_tiny
    cache = tmp_path / "cache"
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    # Hold the first artifact's lock ourselves until both processes are waiting for it, so
    # the two really overlap however the machine schedules their start-up.
    (first,) = [p for p in entries(clean_cache) if p.name.rsplit("-", 1)[0] == FIRST.split("/")[1]]
    (cache / "locks").mkdir(parents=True)
    lock = open(cache / "locks" / f"{first.name.rsplit('-', 1)[1]}.lock", "a+")  # noqa: SIM115
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)

    procs = [start_fct(*tiny_args(out, cache, "--no-plots"), cwd=tmp_path) for out in outs]
    logs: list[list[str]] = [[], []]
    readers = [
        threading.Thread(target=lambda p=p, log=log: log.extend(p.stderr), daemon=True)
        for p, log in zip(procs, logs, strict=True)
    ]
    for r in readers:
        r.start()
    waiting = f"waiting for another process building {FIRST}"
    deadline = time.monotonic() + 240
    while not all(any(waiting in line for line in log) for log in logs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs
        time.sleep(0.1)
    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    lock.close()

    for p, r in zip(procs, readers, strict=True):
        p.wait(timeout=300)
        r.join(timeout=10)
    texts = ["".join(log) for log in logs]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-3000:]
    # Every artifact was trained once, by one of the two; the other loaded it.
    trained = [
        line.split("training ")[1].split(" ")[0]
        for text in texts
        for line in text.splitlines()
        if "fct.context: training " in line
    ]
    assert len(trained) == len(set(trained)) == 6, trained
    assert records(outs[0]) == records(outs[1]) == clean
    assert_cache_verifies(cache)

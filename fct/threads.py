"""How many CPU threads fct uses, and how they wait.

torch starts one intra-op thread per core, and its OpenMP threads spin while they wait for
work. On a machine shared with other work the spinning is what hurts: a waiting thread holds
a core another process (or our own working thread) needs, and a training step of the
quickstart ran 10-50x slower beside one or two busy processes. fct therefore makes OpenMP
waits sleep (``OMP_WAIT_POLICY=PASSIVE``, set by fct.cli before torch loads; measured in
docs/speed.md) and keeps **one thread per core this process may use** (its CPU affinity,
capped by a cgroup CPU quota), the same on a quiet and on a busy machine: the thread count
changes a model's numerics in its last bits, so a fixed count keeps a run reproducible
whatever else the machine does.

``FCT_THREADS=N`` (or ``OMP_NUM_THREADS=N``) fixes another count. ``FCT_THREADS=auto`` instead
follows the machine's load: one thread per core other processes leave free, measured over a
short sample of /proc/stat (the machine's busy time minus this process's own) at the start and
before every epoch; faster beside heavy jobs, but the numbers then depend on the load.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds of /proc/stat sampling behind one decision (small against an epoch).
SAMPLE_S = 0.2
#: A core counts as taken by others when they use more than this share of it.
TAKEN = 0.5


@dataclass(frozen=True)
class Choice:
    """A thread decision and what it was based on (for the log and the records)."""

    threads: int
    cores: int
    others_busy: float | None  # cores' worth of CPU used by other processes; None: unknown
    reason: str


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The cgroup v2 CPU quota in cores ("max 100000" or "200000 100000"), or None."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _proc_stat_busy() -> tuple[float, float] | None:
    """(busy seconds, total seconds) of all cores since boot, from /proc/stat's cpu line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def _own_cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def others_busy(sample_s: float = SAMPLE_S) -> float | None:
    """Cores' worth of CPU that processes other than this one used over ``sample_s``
    seconds (0.0 on an idle machine, about 1.0 beside one busy single-threaded process), or
    None where /proc/stat cannot be read."""
    first, own0, t0 = _proc_stat_busy(), _own_cpu_seconds(), time.monotonic()
    if first is None:
        return None
    time.sleep(sample_s)
    second, own1, t1 = _proc_stat_busy(), _own_cpu_seconds(), time.monotonic()
    if second is None or t1 <= t0:
        return None
    busy = (second[0] - first[0]) - (own1 - own0)
    return max(0.0, busy / (t1 - t0))


def decide(cores: int, others: float | None, env: dict[str, str]) -> Choice:
    """The thread count for ``cores`` usable cores when others use ``others`` cores' worth.

    ``FCT_THREADS=N`` (then ``OMP_NUM_THREADS=N``) in ``env`` fixes it; ``FCT_THREADS=auto``
    takes one thread per core that others leave free (at least one); by default every core.
    """
    mode = env.get("FCT_THREADS", "").strip().lower()
    for var in ("FCT_THREADS", "OMP_NUM_THREADS"):
        value = env.get(var, "").strip()
        if value and value.lower() != "auto":
            try:
                n = int(value)
            except ValueError:
                n = 0
            if n >= 1:
                return Choice(n, cores, None, f"{var}={n}")
    if mode != "auto":
        return Choice(cores, cores, None, "one per usable core; FCT_THREADS=auto follows the load")
    if others is None:
        return Choice(cores, cores, None, "load unknown: one thread per core")
    taken = int(others + (1 - TAKEN))  # a core counts once others use more than TAKEN of it
    threads = max(1, cores - taken)
    return Choice(
        threads, cores, others, f"FCT_THREADS=auto: others use {others:.1f} of {cores} cores"
    )


_last: Choice | None = None
_used: set[int] = set()


def threads_used() -> list[int]:
    """The CPU thread counts this process has trained or evaluated with (for provenance:
    results can differ in their last digits between thread counts)."""
    import torch

    return sorted(_used | {torch.get_num_threads()})


def configure_threads(sample_s: float = SAMPLE_S, quiet: bool = False) -> Choice:
    """Measure, decide and apply (``torch.set_num_threads``) the thread count; idempotent
    apart from following the machine's load. Logs one line when the choice changes."""
    global _last
    import torch

    auto = os.environ.get("FCT_THREADS", "").strip().lower() == "auto"
    others = others_busy(sample_s) if auto else None
    choice = decide(available_cores(), others, dict(os.environ))
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if not quiet and (_last is None or _last.threads != choice.threads):
        log.debug("CPU threads: %d (%s)", choice.threads, choice.reason)
    _last = choice
    _used.add(choice.threads)
    return choice


def adapt_threads() -> Choice | None:
    """Between epochs, under ``FCT_THREADS=auto`` only: follow the machine's load (nothing
    when configure_threads was never called: a library user's own setting stands)."""
    if _last is None or _last.others_busy is None:
        return None
    return configure_threads()

"""End-to-end rows/s of `fct transform` against its two limits, measured in the same run:

(a) the in-memory folded h: the same map, batch and threads on rows already in memory (no
    reading, no writing): what h alone allows;
(b) the disk's sequential read bandwidth, in rows/s: the gallery's shards read with large
    ``readinto`` calls after they were dropped from the page cache.

On a machine shared with other work the wall-clock rates swing with the load, so each round
also runs `fct transform`'s function (``fct.transform.transform_gallery``) in this process and
reports rows per second of this process's CPU time for it and for the in-memory h: their ratio
is the work `fct transform` adds (reading, checking, writing, hashing, fsync), whatever the
load; time spent waiting for the disk is not CPU time, which is what (b) is for.

Before every read of the gallery (b, and each `fct transform` run) its shards are dropped
from the page cache with ``os.posix_fadvise(POSIX_FADV_DONTNEED)`` after an fsync, so both
read from the disk, not from memory; the file sizes stay small enough for a shared machine
(a few GB at most). The three are measured interleaved, one each per round, and the median of
the rounds is reported, so a burst of other work slows all three alike.

Usage (results/bench/transform.{json,md}; run it niced on a shared machine)::

    nice -n 10 python bench/transform_gallery.py [--sizes quickstart,reference] [--rounds 3]
        [--seconds 15] [--max-gb 2] [--shards 8] [--batch 4096] [--out DIR]

The gallery's size is what h alone transforms in ``--seconds`` (a short probe decides; at most
``--max-gb``), so each measurement takes about that long whatever the machine's load. `fct transform` runs as a subprocess (the
command a user types); its rows/s is the one its summary line prints (startup excluded; the
wall time with startup is recorded too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# As fct's command line does before torch loads (fct/cli.py): idle OpenMP threads sleep
# instead of spinning, so the in-memory h runs under the same conditions as `fct transform`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fct.io import write_json, write_text  # noqa: E402
from fct.models import Transformation  # noqa: E402
from fct.provenance import provenance  # noqa: E402
from fct.throughput.presets import SIZES  # noqa: E402
from fct.transform_models import load_artifact, save_transformation  # noqa: E402

WIDTH = 128  # d_old of both sizes


def drop_cache(paths: list[Path]) -> None:
    """Write back and drop ``paths`` from the page cache (the next read comes from the disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_gallery(folder: Path, rows: int, shards: int) -> list[Path]:
    """``shards`` float32 shards of ``rows`` rows in all, 128 wide, written once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    paths = []
    rng = np.random.default_rng(0)
    for i in range(shards):
        path = folder / f"shard{i:03d}.npy"
        if not path.exists() or np.load(path, mmap_mode="r").shape != (per, WIDTH):
            block = np.lib.format.open_memmap(path, "w+", np.float32, (per, WIDTH))
            for a in range(0, per, 1 << 16):
                b = min(a + (1 << 16), per)
                block[a:b] = rng.standard_normal((b - a, WIDTH), dtype=np.float32)
            block.flush()
            del block
        paths.append(path)
    return paths


def disk_rows_per_s(paths: list[Path]) -> float:
    """Sequential read of every shard, 8 MiB per ``readinto``, from a dropped cache: rows/s."""
    drop_cache(paths)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total / (WIDTH * 4) / (time.perf_counter() - t0)


def memory_rows_per_s(mapper, rows: int, batch: int) -> tuple[float, float]:
    """The folded h on ``rows`` rows already in memory, in batches of ``batch``: (rows per
    second of wall time, rows per second of this process's CPU time)."""
    x = torch.randn(min(rows, 64 * batch), WIDTH)
    mapper(x[:batch])  # packs the weights, as fct transform's first call does
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while done < rows:
        for a in range(0, len(x), batch):
            mapper(x[a : a + batch])
        done += len(x)
    return done / (time.perf_counter() - t0), done / (time.process_time() - c0)


def in_process_rows_per_s(
    mapper, gallery: Path, out: Path, paths, batch: int
) -> tuple[float, float]:
    """fct.transform.transform_gallery (what the command runs) in this process, on the
    dropped gallery: (rows per second of wall time, rows per second of CPU time). CPU time
    counts the work, not the waits for a core: on a loaded machine its ratio to the in-memory
    h's is the overhead of reading, checking, writing and hashing, whatever the load."""
    import shutil

    from fct.transform import transform_gallery

    shutil.rmtree(out, ignore_errors=True)
    drop_cache(paths)
    summary = transform_gallery(mapper, gallery, out, batch=batch, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    return summary.rows_per_s, summary.rows / summary.cpu_seconds


def transform_rows_per_s(
    model: Path, gallery: Path, out: Path, paths, batch: int
) -> tuple[float, float]:
    """`fct transform` on the dropped gallery into a fresh folder: (rows/s it prints, wall s)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    drop_cache(paths)
    cmd = [sys.executable, "-m", "fct", "transform", "--model", str(model), "--in", str(gallery)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--batch", str(batch)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    m = re.search(r"s: ([\d,]+) rows/s", proc.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return float(m.group(1).replace(",", "")), wall


def bench_size(
    name: str, work: Path, seconds: float, max_gb: float, shards: int, rounds: int, batch: int
) -> dict:
    ref = SIZES[name]
    torch.manual_seed(0)
    h = Transformation(ref.d_old, ref.d_new, 0, ref.hidden).eval()
    model = save_transformation(h, work / f"h-{name}.safetensors")
    mapper = load_artifact(str(model))
    probe = memory_rows_per_s(mapper, 4 * batch, batch)[0]
    cap = int(max_gb * (1 << 30) / (WIDTH * 4))
    rows = min(cap, int(probe * seconds))
    rows = max(rows - rows % shards, shards)
    gallery = work / f"gallery-{name}"
    paths = make_gallery(gallery, rows, shards)
    per_round = []
    for r in range(rounds):
        disk = disk_rows_per_s(paths)
        memory, memory_cpu = memory_rows_per_s(mapper, rows, batch)
        e2e, wall = transform_rows_per_s(model, gallery, work / "out", paths, batch)
        inproc, inproc_cpu = in_process_rows_per_s(mapper, gallery, work / "out", paths, batch)
        per_round.append(
            {
                "disk": disk,
                "memory": memory,
                "transform": e2e,
                "wall_s": wall,
                "memory_cpu": memory_cpu,
                "in_process": inproc,
                "in_process_cpu": inproc_cpu,
            }
        )
        print(
            f"{name} round {r + 1}: disk {disk:,.0f}, h in memory {memory:,.0f}, fct transform "
            f"{e2e:,.0f} rows/s; per CPU second: h {memory_cpu:,.0f}, transform {inproc_cpu:,.0f}",
            flush=True,
        )
    med = {k: statistics.median(p[k] for p in per_round) for k in per_round[0]}
    ratios = [p["transform"] / min(p["disk"], p["memory"]) for p in per_round]
    cpu_ratios = [p["in_process_cpu"] / p["memory_cpu"] for p in per_round]
    return {
        "size": name,
        "h": f"{ref.d_old}->{ref.d_new}, hidden {ref.hidden}, no side-information",
        "rows": rows,
        "gallery_bytes": rows * WIDTH * 4,
        "shards": shards,
        "batch": batch,
        "median_rows_per_s": med,
        "fraction_of_limit": statistics.median(ratios),
        "fraction_of_limit_each_round": ratios,
        "cpu_fraction": statistics.median(cpu_ratios),
        "cpu_fraction_each_round": cpu_ratios,
        "rounds": per_round,
    }


def to_markdown(result: dict) -> str:
    lines = [
        "# `fct transform` against its limits",
        "",
        f"Command: `{result['command']}`; {result['provenance'].get('device', '')}, "
        f"{result['threads']} torch threads, load average {result['load']:.1f}.",
        "",
        "| h | gallery | disk read rows/s | h in memory rows/s | fct transform rows/s | fraction of the smaller (each round) | per CPU second: transform / h in memory (each round) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for c in result["cases"]:
        m = c["median_rows_per_s"]
        each = ", ".join(f"{x:.2f}" for x in c["fraction_of_limit_each_round"])
        cpu_each = ", ".join(f"{x:.2f}" for x in c["cpu_fraction_each_round"])
        lines.append(
            f"| {c['size']} ({c['h']}) | {c['rows']:,} rows, {c['gallery_bytes'] / 2**20:,.0f} MiB, "
            f"{c['shards']} shards | {m['disk']:,.0f} | {m['memory']:,.0f} | {m['transform']:,.0f} | "
            f"**{c['fraction_of_limit']:.2f}** ({each}) | {c['cpu_fraction']:.2f} ({cpu_each}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="quickstart,reference")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of h per measurement")
    p.add_argument("--max-gb", type=float, default=2.0, help="largest gallery written")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument(
        "--threads", type=int, help="torch threads, here and in fct transform (FCT_THREADS)"
    )
    p.add_argument(
        "--work",
        default=str(ROOT / ".bench-transform"),
        help="scratch folder (gallery kept for reruns)",
    )
    p.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = p.parse_args()
    if args.threads:
        os.environ["FCT_THREADS"] = str(args.threads)  # fct transform's subprocesses too
    from fct.threads import configure_threads

    configure_threads(quiet=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [
        bench_size(s.strip(), work, args.seconds, args.max_gb, args.shards, args.rounds, args.batch)
        for s in args.sizes.split(",")
    ]
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
        "provenance": provenance(),
        "cases": cases,
    }
    out = Path(args.out)
    write_json(out / "transform.json", json.loads(json.dumps(result, default=str)))
    write_text(out / "transform.md", to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()

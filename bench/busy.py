"""Speed on a busy machine: training and evaluation, quiet and beside busy processes, in one run.

    python bench/busy.py [--seconds 8] [--out results/bench]

For each load (quiet, beside one and two `while True: pass` processes, started by this script)
and each thread setting, a fresh worker process measures:

- **train**: items/s of the quickstart's new model (fmnist-half: timm test_resnet, 128-d, batch
  128, real Fashion-MNIST with the suite's augmentation, through fct's loader and SGD), as in
  `fct run`;
- **metrics**: the speed-up of fct.retrieval.evaluate over the per-query scikit-learn loop
  (bench/test_bench_metrics.py's reference, 10,000 x 128-d leave-one-out).

Thread settings: ``fct`` (what `fct run` does: OpenMP waits sleep, one thread per usable core,
fct.threads), ``fct, FCT_THREADS=auto`` (sleeping waits, one thread per core other processes
leave free) and ``torch default`` (spinning waits, one thread per core).
Writes busy.json and busy.md. Timings, not assertions: the figures are reported in
docs/throughput.md and the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADS = (0, 1, 2)
SETTINGS = {
    "fct": {"OMP_WAIT_POLICY": "PASSIVE"},
    "fct, FCT_THREADS=auto": {"OMP_WAIT_POLICY": "PASSIVE", "FCT_THREADS": "auto"},
    "torch default": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def _worker_train(seconds: float, policy: bool) -> dict:
    import tempfile

    import torch

    from fct.artifacts import Cache
    from fct.builders import build_model, train_loader
    from fct.scenarios import load_suite
    from fct.session import Session

    if policy:
        from fct.threads import configure_threads

        configure_threads(quiet=True)
    threads = torch.get_num_threads()
    spec = load_suite("quickstart").select("fmnist-half")[0].new
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(Cache(tmp))
        torch.manual_seed(0)
        model = build_model(session, spec, 10)
        loader = train_loader(session, spec, spec.augment)
        opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
        model.train()
        items, t0, warm = 0, None, 3
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for x, y in loader:
                emb, logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if warm:
                    warm -= 1
                    if not warm:
                        t0 = time.perf_counter()
                    continue
                items += len(y)
                if time.perf_counter() - t0 >= seconds:
                    return {"items_per_s": items / (time.perf_counter() - t0), "threads": threads}
            epoch += 1


def _worker_metrics(policy: bool) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from test_bench_metrics import CLASSES, DIM, N, reference_loop

    from fct.retrieval import FeatureSet, evaluate

    if policy:
        from fct.threads import configure_threads

        configure_threads(quiet=True)
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, N)
    x = (rng.normal(size=(CLASSES, DIM))[y] + 1.5 * rng.normal(size=(N, DIM))).astype(np.float32)
    fs = FeatureSet(x, y)
    evaluate(fs)  # warm-up
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        evaluate(fs)
        runs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    reference_loop(x, y)
    ref = time.perf_counter() - t0
    fast = min(runs)
    return {
        "fct_s": fast,
        "sklearn_s": ref,
        "speedup": ref / fast,
        "threads": torch.get_num_threads(),
    }


def _measure(kind: str, setting: str, seconds: float) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "FCT_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    env.update(SETTINGS[setting], TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", kind, "--seconds", str(seconds)]
    if setting.startswith("fct"):
        cmd.append("--policy")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=("train", "metrics"))
    p.add_argument("--policy", action="store_true")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default=str(ROOT / "results" / "bench"))
    p.add_argument("--skip-metrics", action="store_true")
    args = p.parse_args()
    if args.worker == "train":
        print(json.dumps(_worker_train(args.seconds, args.policy)))
        return
    if args.worker == "metrics":
        print(json.dumps(_worker_metrics(args.policy)))
        return
    from fct.provenance import provenance

    load_before = os.getloadavg()
    rows = []
    for load in LOADS:
        spin = _spinners(load)
        try:
            time.sleep(1.0)
            for setting in SETTINGS:
                row = {"busy_processes": load, "setting": setting}
                row["train"] = _measure("train", setting, args.seconds)
                if not args.skip_metrics:
                    row["metrics"] = _measure("metrics", setting, args.seconds)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            for s in spin:
                s.kill()
                s.wait()
    result = {
        "loadavg_before": load_before,
        "command": "python bench/busy.py " + " ".join(sys.argv[1:]),
        "rows": rows,
        "provenance": provenance(),
    }
    out = Path(args.out)
    from fct.io import write_json, write_text

    write_json(out / "busy.json", result)
    write_text(out / "busy.md", to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    quiet = {r["setting"]: r for r in result["rows"] if r["busy_processes"] == 0}
    lines = [
        "# Speed on a busy machine",
        "",
        f"`{result['command']}`; {result['provenance']['device']}, "
        f"{result['provenance']['date']}; load average before the run: "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_before'])}.",
        "",
        "| busy processes beside | threads setting | train items/s (threads) | slower than quiet "
        "| metric speed-up vs scikit-learn loop (threads) |",
        "|---:|:---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        t = r["train"]
        slower = quiet[r["setting"]]["train"]["items_per_s"] / t["items_per_s"]
        m = r.get("metrics")
        metric = f"{m['speedup']:.0f}x ({m['threads']})" if m else "-"
        lines.append(
            f"| {r['busy_processes']} | {r['setting']} | {t['items_per_s']:,.0f} ({t['threads']}) "
            f"| {slower:.2f}x | {metric} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Optuna (TPE, batches of traced trials) against random search at the same budget on digits.

Both search clip_norm's max_norm in loguniform(0.01, 10) and the learning rate in
loguniform(0.01, 3), K trials each, one training seed per trial, the task's 500 steps of
SGD+momentum. Optuna: `--search 'optuna(n=K, batch=B, lr=loguniform(0.01,3))'`, B trials per
compiled batch. Random: `--search 'random(n=K, seed=S)'` draws the K max_norm values (the sweep's
own code path, one compiled cell each), and each cell gets a learning rate drawn loguniformly from
the same range by this script (random search has no learning-rate axis). Each (strategy, search
seed) runs in its own process with an empty compilation cache, so both pay their compiles. Wall
time is the search alone (data loaded, imports done). Writes results/search/optuna_vs_random.md
and .csv: best final training loss and best test accuracy reached against trials used.

    python scripts/bench_search.py [--trials 32] [--batch 8] [--search-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "search"
METHOD = "clip_norm(max_norm=loguniform(0.01,10))"
LR = (0.01, 3.0)


def one(strategy: str, seed: int, trials: int, batch: int, out: str) -> dict:
    """Run one search in this process; its trials in order, compiles and seconds."""
    import numpy as np

    from stabench.executor import SerialExecutor
    from stabench.search import run_search
    from stabench.store import Store
    from stabench.sweeps import Random, Range, SweepSpec, TaskEntry, Template, parse_search
    from stabench.config import make_spec
    from stabench.runner import load_data
    from stabench.train import backend_compiles

    load_data(make_spec("digits"))  # the dataset and imports outside the timed search
    store = Store(out)
    before, t0 = backend_compiles(), time.perf_counter()
    if strategy == "optuna":
        text = f"optuna(n={trials}, batch={batch}, seed={seed}, lr=loguniform({LR[0]},{LR[1]}))"
        sweep = SweepSpec(tasks=(TaskEntry("digits"),), methods=(METHOD,), seeds=1, search=text)
        [study] = run_search(sweep, parse_search(text), out, log=lambda _: None)
        specs = [spec for spec, _ in study.trials]
    else:
        methods = Random(trials, seed).expand(Template.parse(METHOD, "method"))
        rng = np.random.default_rng([seed, 1])
        lr_range = Range("loguniform", *LR)
        specs = [make_spec("digits", m, seeds=1, lrs=(lr_range.sample(rng),)) for m in methods]
        for outcome in SerialExecutor().run(specs, out):
            if outcome.error:
                sys.exit(f"random cell failed: {outcome.error}")
    seconds = time.perf_counter() - t0
    rows = []
    for spec in specs:
        run = store.load(spec).runs[0]
        rows.append({"max_norm": float(spec.method.split("=")[1].rstrip(")")), "lr": spec.lrs[0],
                     "final_train_loss": run["final_train_loss"],
                     "test_accuracy": run["test_accuracy"]})
    return {"trials": rows, "compiles": backend_compiles() - before, "seconds": seconds}


def run_one(strategy: str, seed: int, args, tmp: str) -> dict:
    env = {**os.environ, "STABENCH_CACHE_DIR": tempfile.mkdtemp(dir=tmp),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--one", strategy, str(seed),
                           "--trials", str(args.trials), "--batch", str(args.batch),
                           "--out", tempfile.mkdtemp(dir=tmp)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{strategy} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_so_far(values: list[float], pick) -> list[float]:
    out, best = [], None
    for v in values:
        best = v if best is None else pick(best, v)
        out.append(best)
    return out


def mean_sd(xs: list[float]) -> str:
    if any(not math.isfinite(x) for x in xs):
        return "inf"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4g} ± {sd:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.trials, args.batch, args.out)))
        return

    strategies = {"optuna": f"optuna(n={args.trials}, batch={args.batch}, seed=S, "
                            f"lr=loguniform({LR[0]},{LR[1]}))",
                  "random": f"random(n={args.trials}, seed=S)"}
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.search_seeds:
            for strategy in strategies:
                results[(strategy, seed)] = run_one(strategy, seed, args, tmp)
                r = results[(strategy, seed)]
                print(f"{strategy} seed {seed}: {r['seconds']:.1f} s, {r['compiles']} compiles, "
                      f"best loss {min(t['final_train_loss'] for t in r['trials']):.4g}",
                      flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    checkpoints = sorted({c for c in (args.batch, args.trials // 2, args.trials) if c > 0})
    with open(OUT / "optuna_vs_random.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "search_seed", "trial", "max_norm", "lr", "final_train_loss",
                         "test_accuracy", "best_loss_so_far", "best_accuracy_so_far",
                         "compiles", "wall_s"])
        for (strategy, seed), r in results.items():
            losses = best_so_far([t["final_train_loss"] for t in r["trials"]], min)
            accs = best_so_far([t["test_accuracy"] for t in r["trials"]], max)
            for i, t in enumerate(r["trials"]):
                writer.writerow([strategy, seed, i + 1, t["max_norm"], t["lr"],
                                 t["final_train_loss"], t["test_accuracy"], losses[i], accs[i],
                                 r["compiles"], f"{r['seconds']:.2f}"])

    lines = [
        "# Optuna vs random search at the same budget (digits)",
        "",
        f"`python scripts/bench_search.py --trials {args.trials} --batch {args.batch} "
        f"--search-seeds {' '.join(map(str, args.search_seeds))}` on {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.machine()}), {dt.date.today()}.",
        "",
        f"Searched: `{METHOD}` and the learning rate in loguniform({LR[0]}, {LR[1]}); digits task "
        "(its MLP, SGD+momentum 0.9, 500 steps, batch 128), one training seed per trial. "
        f"Optuna: `{strategies['optuna']}` (TPE, first batch random, constant liar), each batch "
        "one compiled program with the trials' max_norm and lr as per-run inputs. Random: "
        f"`{strategies['random']}` draws max_norm (the sweep's own path, one compiled cell per "
        "trial) with a learning rate drawn from the same range per cell. Each search runs in a "
        "fresh process with an empty compilation cache; wall time is the search alone, on a "
        "machine whose CPUs other work may share (compare within a row of seeds). Compiles: XLA "
        "compilations (each compiled cell is an init and a training-chunk program).",
        "",
        f"Mean ± sd over {len(args.search_seeds)} search seeds. Best final training loss and best "
        "test accuracy reached after the given number of trials:",
        "",
        "| strategy | " + " | ".join(f"best loss @{c}" for c in checkpoints) + " | "
        + " | ".join(f"best test acc @{c}" for c in checkpoints) + " | compiles | wall s |",
        "|---|" + "---|" * (2 * len(checkpoints) + 2),
    ]
    for strategy in strategies:
        runs = [results[(strategy, s)] for s in args.search_seeds]
        losses = [best_so_far([t["final_train_loss"] for t in r["trials"]], min) for r in runs]
        accs = [best_so_far([t["test_accuracy"] for t in r["trials"]], max) for r in runs]
        cells = [mean_sd([x[c - 1] for x in losses]) for c in checkpoints]
        cells += [mean_sd([x[c - 1] for x in accs]) for c in checkpoints]
        lines.append(f"| {strategy} | " + " | ".join(cells)
                     + f" | {mean_sd([r['compiles'] for r in runs])}"
                     f" | {mean_sd([r['seconds'] for r in runs])} |")
    lines += ["", "Per search seed (after all trials):", "",
              "| strategy | search seed | best loss | best test acc | diverged trials | compiles "
              "| wall s |", "|---|---|---|---|---|---|---|"]
    for (strategy, seed), r in results.items():
        t = r["trials"]
        lines.append(f"| {strategy} | {seed} | {min(x['final_train_loss'] for x in t):.4g} | "
                     f"{max(x['test_accuracy'] for x in t):.4f} | "
                     f"{sum(not math.isfinite(x['final_train_loss']) for x in t)} | "
                     f"{r['compiles']} | {r['seconds']:.1f} |")
    lines += ["", "Trials: `optuna_vs_random.csv` (one row per trial, in the order asked)."]
    (OUT / "optuna_vs_random.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

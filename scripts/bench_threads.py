"""What one intra-op thread costs a single training process (`run`, `diagnose`, a serial sweep).

Every stabench process starts JAX with one intra-op thread so that a cell trains to the same bits
in any process (see Reproducibility in the README); sweep workers, pinned to one core each, had
one thread before. This trains the same cells in fresh processes started both ways, on every
usable core, and reports the steady time of each (best of --repeats) and their ratio. Writes
results/bench/threads.md.

    python scripts/bench_threads.py            # digits (32 runs x 500 steps) and a ResNet-20 cell
    python scripts/bench_threads.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = {  # name -> (task, method, seeds, learning rates, overrides, fake data)
    "digits MLP, 32 runs": ("digits", "clip_norm", 8, (0.01, 0.03, 0.1, 0.3), {}, False),
    "ResNet-20 fake CIFAR-10, 4 runs": ("cifar10", "clip_norm", 2, (0.01, 0.1),
                                        {"train.batch_size": 32}, True),
}
STEPS = {"digits MLP, 32 runs": 500, "ResNet-20 fake CIFAR-10, 4 runs": 20}

CHILD = """
import json, sys, time
import numpy as np
one_thread, name = sys.argv[1] == "1", sys.argv[2]
steps, repeats = int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from stabench.process import enable_compilation_cache, start_backend
if one_thread:
    start_backend()
enable_compilation_cache()
from bench_threads import CELLS
from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.runner import load_data
from stabench.train import Engine
task, method, seeds, lrs, overrides, fake = CELLS[name]
spec = make_spec(task, method, seeds=seeds, lrs=lrs, fake_data=fake,
                 overrides={**overrides, "train.steps": steps, "train.eval_every": steps})
engine = Engine(build_cell(spec, data_source(task_of(spec))), load_data(spec))
s, l = (np.array(x) for x in zip(*spec.runs))
engine.run(s, l)  # compile and warm up
print(json.dumps(min(engine.run(s, l).timing["steady_s"] for _ in range(repeats))))
"""


def steady(one_thread: bool, name: str, steps: int, repeats: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if one_thread else "0", name, str(steps), str(repeats),
         str(ROOT)], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "threads.md"))
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    rows = []
    for name in CELLS:
        steps = STEPS[name] // (5 if args.quick else 1)
        cores = steady(False, name, steps, repeats)
        one = steady(True, name, steps, repeats)
        rows.append(f"| {name}, {steps} steps | {cores:.3f} | {one:.3f} | {one / cores:.2f} |")
        print(rows[-1], flush=True)
    from stabench.hardware import cache_sizes, cpu_model

    lines = [
        "# One intra-op thread: its cost to one training process",
        "",
        f"`python scripts/bench_threads.py{' --quick' if args.quick else ''}` on {cpu_model()} "
        f"({len(os.sched_getaffinity(0))} usable cores, L2 {cache_sizes().get('L2', 0) >> 10} "
        f"KiB per core), Python {platform.python_version()}; steady seconds, best of {repeats}, "
        "each way in a fresh process.",
        "",
        "| cell | every core | one intra-op thread | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

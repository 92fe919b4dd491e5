"""Time per training step of a task's cell on --fake-data (same shapes, so the same program).

For each number of runs (seeds; the task's default cell has seeds x learning rates), trains the
cell for `--steps` and for twice as many steps, evaluating once at the end, and takes the
difference: the steady time of `--steps` steps without compile, initialization or evaluation.
Compile time is reported separately (no persistent cache).

    python scripts/bench_step_time.py --task cifar --runs 1,18 --steps 10
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np

from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.data import fake
from stabench.hardware import cpu_model
from stabench.tasks import get_task
from stabench.train import Engine


def steady_seconds(task: str, runs: int, steps: int, overrides: dict) -> tuple[float, float]:
    """(compile seconds, steady seconds) of one cell of `runs` runs trained for `steps` steps."""
    # the task's smallest learning rate: a run that diverges stops the engine early, which would
    # read as a fast step
    lr = min(get_task(task).train["lrs"])
    spec = make_spec(task, "clip_norm", seeds=runs, lrs=(lr,), fake_data=True,
                     overrides={**overrides, "train.steps": steps, "train.eval_every": steps})
    source = data_source(task_of(spec))
    engine = Engine(build_cell(spec, source), fake(source.meta))
    seed_arr, lr_arr = (np.array(x) for x in zip(*spec.runs))
    timing = engine.run(seed_arr, lr_arr).timing
    return timing["compile_s"], timing["steady_s"]


def report(args) -> None:
    """Print compile and per-step times for each number of runs."""
    overrides = {"train.batch_size": args.batch_size} if args.batch_size else {}
    print(f"{args.task} on fake data | {cpu_model()}, "
          f"{os.cpu_count()} cores, {jax.devices()[0].device_kind} | jax {jax.__version__}")
    for runs in (int(r) for r in args.runs.split(",")):
        compile_s, short = steady_seconds(args.task, runs, args.steps, overrides)
        _, long = steady_seconds(args.task, runs, 2 * args.steps, overrides)
        per_step = (long - short) / args.steps
        print(f"runs {runs:3d}: compile {compile_s:6.1f} s | {per_step * 1000:8.0f} ms per step "
              f"| {per_step / runs * 1000:7.0f} ms per run-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cifar")
    parser.add_argument("--runs", default="1", help="comma-separated numbers of runs per cell")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-step-time-") as cache:  # compiles are timed
        jax.config.update("jax_compilation_cache_dir", cache)
        report(args)


if __name__ == "__main__":
    main()

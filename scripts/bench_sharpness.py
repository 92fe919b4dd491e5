"""Cost of the curvature and logit telemetry per training step, as ratios to the step without it.

Sharpness (`--set telemetry.sharpness_every=K`): the digits MLP cell (`--runs` seeds at the task's
smallest learning rate, so no run diverges and stops the engine early) with K = 10 and 100 against
the setting absent, for SGD with momentum (one Lanczos estimate) and Adam (two: the preconditioned
sharpness too). Steady time: the difference between training 2N and N steps, without compile,
initialization or evaluation. Also checks that K = 0 compiles the step of the cell without it.
Logits (`log_z`, `attn_logit_max`): the ListOps Transformer (64 tokens) on fake data against the
same program that records neither, the two taking turns. Writes the table to
results/bench/sharpness.md.

    python scripts/bench_sharpness.py --steps 200 --runs 4 --repeats 3 --logit-steps 40
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np

from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.data import fake
from stabench.hardware import cpu_model
from stabench.program import RunProgram
from stabench.runner import load_data
from stabench.train import Engine

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "sharpness.md"


class WithoutLogits(RunProgram):
    """The cell program without its logit telemetry: what the model taps is never read, so XLA
    drops its computation."""

    def tapped_forward_loss(self, params, model_state, x, y):
        loss, model_state = self.forward_loss(params, model_state, x, y)
        return loss, (model_state, {})


def engine(task, optimizer, runs, steps, overrides, fake_data=False, program=None) -> Engine:
    spec = make_spec(task, optimizer=optimizer, seeds=runs, lrs=(min(make_spec(task).lrs),),
                     fake_data=fake_data,
                     overrides={**overrides, "train.steps": steps, "train.eval_every": steps})
    source = data_source(task_of(spec))
    cell = build_cell(spec, source)
    data = fake(source.meta) if fake_data else load_data(spec)
    return Engine(cell, data, program=program and program(cell)), spec


def steady(task, optimizer, runs, steps, overrides, repeats, **kw) -> float:
    """Seconds per step of `runs` runs: (time of 2N steps - time of N) / N, each time the least of
    `repeats` trainings of one compiled program (on a shared machine, the least disturbed)."""
    times = []
    for n in (steps, 2 * steps):
        eng, spec = engine(task, optimizer, runs, n, overrides, **kw)
        seeds, lrs = (np.array(x) for x in zip(*spec.runs))
        times.append(min(eng.run(seeds, lrs).timing["steady_s"] for _ in range(repeats)))
    return (times[1] - times[0]) / steps


def logit_cost(steps: int, repeats: int) -> tuple[float, float]:
    """Seconds per step of the ListOps Transformer without and with its logit telemetry: the
    least of `repeats` trainings of `steps` steps each (one evaluation included), the two
    programs taking turns so that both see the same load."""
    short = {"dataset.min_length": 16, "dataset.max_length": 64}  # 64 tokens: seconds, not minutes
    engines = [engine("listops", None, 2, steps, short, fake_data=True, program=program)
               for program in (WithoutLogits, None)]
    times = [[], []]
    for _ in range(repeats):
        for k, (eng, spec) in enumerate(engines):
            seeds, lrs = (np.array(x) for x in zip(*spec.runs))
            times[k].append(eng.run(seeds, lrs).timing["steady_s"] / steps)
    return min(times[0]), min(times[1])


def chunk_text(task, optimizer, overrides) -> str:
    """The compiled training program (one chunk of steps) of a small cell, as HLO text without its
    debug information (source locations, which differ between any two compiles)."""
    eng, spec = engine(task, optimizer, 2, 20, overrides)
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    text = eng.compile(seeds, lrs.astype(np.float32))[1].as_text()
    start = text.index("\nFileNames\n")
    end = text.index("\n\n", text.index("\nStackFrames\n"))
    return text[:start] + re.sub(r", metadata=\{[^}]*\}", "", text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--logit-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    lines = ["# Telemetry cost per training step\n",
             f"{cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
             f"jax {jax.__version__}; `python scripts/bench_sharpness.py --steps {args.steps} "
             f"--runs {args.runs} --logit-steps {args.logit_steps} --repeats {args.repeats}`\n"]
    absent = chunk_text("digits", None, {})
    same = absent == chunk_text("digits", None, {"telemetry.sharpness_every": 0})
    differs = absent != chunk_text("digits", None, {"telemetry.sharpness_every": 10})
    lines.append(f"Compiled step with `telemetry.sharpness_every=0` identical to the cell without "
                 f"the setting: {same} (with 10: differs: {differs}).\n")

    lines += ["| task | optimizer | setting | ms per step | ratio to off |",
              "|---|---|---|---:|---:|"]
    for optimizer in ("sgd(momentum=0.9)", "adam"):
        off = steady("digits", optimizer, args.runs, args.steps, {}, args.repeats)
        lines.append(f"| digits ({args.runs} runs) | {optimizer} | off | {off * 1e3:.2f} | 1.00 |")
        for every in (100, 10):
            on = steady("digits", optimizer, args.runs, args.steps,
                        {"telemetry.sharpness_every": every}, args.repeats)
            lines.append(f"| digits ({args.runs} runs) | {optimizer} | sharpness_every={every} | "
                         f"{on * 1e3:.2f} | {on / off:.2f} |")
        print("\n".join(lines), flush=True)
    without, with_logits = logit_cost(args.logit_steps, 2 * args.repeats)
    lines.append(f"| listops 64 tokens, fake data (2 runs) | adam | without logit telemetry | "
                 f"{without * 1e3:.1f} | 1.00 |")
    lines.append(f"| listops 64 tokens, fake data (2 runs) | adam | log_z, attn_logit_max | "
                 f"{with_logits * 1e3:.1f} | {with_logits / without:.2f} |")
    lines.append(f"\nLoad average (1 min) at the start and end: {load:.1f}, "
                 f"{os.getloadavg()[0]:.1f} (other processes share the cores: times are the least "
                 f"of {args.repeats} trainings).")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench-sharpness-") as cache:  # compiles are timed
        jax.config.update("jax_compilation_cache_dir", cache)
        main()

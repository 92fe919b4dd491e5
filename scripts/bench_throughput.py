"""Throughput of the stabench engine against what users would otherwise write, in one process.

For the digits MLP sweep (64-128-128-10, SGD momentum 0.9 + global-norm clipping, batch 128,
8 seeds x 4 learning rates, 500 steps) and a CIFAR-10 ResNet-20 cell on fake data (fewer steps):
  (a) a naive JAX loop: Python loop over runs and steps, a jitted step, float(loss) each step;
  (b) the stabench engine in one process: jit(vmap(lax.scan)) over every run;
  (c) the stabench sweep executor using every core (the runs split into one cell per worker);
  (d) a PyTorch eager loop with the same model, data order, optimizer and clipping.
Reports compile and steady seconds (best of --repeats), runs/s, samples/s, GFLOP/s from XLA's cost
analysis, MFU against a float32 matmul peak measured in the same run, and compile time of a
residual MLP at depth 10, 100 and 1000. Writes results/bench/throughput.md; the last line printed
is `speedup_vs_naive=X speedup_vs_torch=Y mfu=Z` for the digits sweep using every core.

    python scripts/bench_throughput.py            # full run (minutes)
    python scripts/bench_throughput.py --quick    # smoke run: fewer steps and repeats
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.runner import load_data
from stabench.train import Engine, epoch_order

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """float32 GFLOP/s of a jitted n x n matmul, best of `repeats` (all cores XLA uses)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    jax.block_until_ready(f(a))
    t = best_of(lambda: jax.block_until_ready(f(a)), repeats)
    return 2 * n**3 / t / 1e9


def batch_index(seed: int, t: int, n: int, b: int) -> np.ndarray:
    """The engine's data order: batch t of seed's per-epoch permutation."""
    per_epoch = n // b * b
    pos = t * b
    return epoch_order(seed, pos // per_epoch, n)[pos % per_epoch:][:b]


# ---- (a) naive JAX loop ------------------------------------------------------------------------
def naive_jax(spec, data, repeats: int) -> dict:
    """Same model and transform as the engine, trained run by run with a jitted step."""
    cell = build_cell(spec, data_source(task_of(spec)))
    graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0))),
                                  nnx.Param, ...)

    def update_key(seed):
        return jax.random.fold_in(jax.random.key(seed), 1)

    def init(seed, lr):
        model = cell.build_model(nnx.Rngs(jax.random.key(seed)))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest, cell.transform.build(lr, update_key(seed)).init(params)

    def loss_fn(params, rest, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, rest, state, x, y, lr, seed):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, state = cell.transform.build(lr, update_key(seed)).update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    init_jit = jax.jit(init)
    x_train, y_train = jax.device_put((data.x_train, data.y_train))
    n, b, steps = len(data.x_train), cell.batch_size, cell.steps
    order = {(s, t): batch_index(s, t, n, b) for s in spec.seeds for t in range(steps)}

    def sweep():
        for seed, lr in spec.runs:
            params, rest_, state = init_jit(seed, np.float32(lr))
            for t in range(steps):
                idx = order[(seed, t)]
                params, state, loss = step(params, rest_, state, x_train[idx], y_train[idx],
                                           np.float32(lr), seed)
                float(loss)

    t0 = time.perf_counter()
    params, rest_, state = init_jit(0, np.float32(0.1))
    idx = order[(0, 0)]
    jax.block_until_ready(step(params, rest_, state, x_train[idx], y_train[idx],
                               np.float32(0.1), 0))
    compile_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "steady_s": best_of(sweep, repeats)}


# ---- (b) the engine in one process --------------------------------------------------------------
def engine_once(spec, data, repeats: int) -> dict:
    engine = Engine(build_cell(spec, data_source(task_of(spec))), data)
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    results = [engine.run(seeds, lrs) for _ in range(repeats)]
    steady = min(r.timing["steady_s"] for r in results)
    flops_step = step_flops(engine, seeds, lrs)
    return {"compile_s": results[0].timing["compile_s"], "steady_s": steady,
            "flops": flops_step * engine.cell.steps}


def step_flops(engine: Engine, seeds, lrs) -> float:
    """XLA's cost analysis of one vmapped training step (all runs); loops count once in XLA's
    analysis, so the step is lowered on its own and multiplied by the step count."""
    seeds_d, lrs_d = jax.device_put((np.asarray(seeds, np.int32), np.asarray(lrs, np.float32)))
    idx = jax.ShapeDtypeStruct((len(lrs), engine.cell.batch_size), jnp.int32)
    carry = jax.eval_shape(jax.vmap(engine._init_run, in_axes=(0, 0, 0, None)), seeds_d, lrs_d,
                           idx, engine.arrays)
    step = jax.jit(jax.vmap(engine._step, in_axes=(0, None, 0, 0, None)))
    cost = step.lower(carry, jax.ShapeDtypeStruct((), jnp.int32), idx, lrs_d, engine.arrays).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


# ---- (d) PyTorch eager loop ---------------------------------------------------------------------
def torch_loop(spec, data, repeats: int, max_norm: float) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = spec.task_config["model"]
    width, depth = cfg["width"], cfg["depth"]
    x_train = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train.astype(np.int64))
    n, b, steps = len(data.x_train), spec.train["batch_size"], spec.train["steps"]
    order = {(s, t): torch.from_numpy(batch_index(s, t, n, b)) for s in spec.seeds
             for t in range(steps)}

    def model(seed):
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(x_train.shape[1], width)]
        for _ in range(depth):
            layers += [torch.nn.ReLU(), torch.nn.Linear(width, width)]
        return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(width, 10))

    def sweep():
        for seed, lr in spec.runs:
            net = model(seed)
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
            for t in range(steps):
                idx = order[(seed, t)]
                loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
                opt.step()
                float(loss)

    return {"compile_s": 0.0, "steady_s": best_of(sweep, repeats), "torch": torch.__version__}


def depth_compile(depths, steps: int) -> dict[int, float]:
    out = {}
    for depth in depths:
        spec = make_spec("digits", "clip_norm", seeds=1, lrs=(0.01,),
                         overrides={"model.depth": depth, "model.residual": True,
                                    "model.branch_scale": 1.0 / depth, "train.steps": steps,
                                    "train.eval_every": steps})
        engine = Engine(build_cell(spec, data_source(task_of(spec))), load_data(spec))
        seeds, lrs = (np.array(x) for x in zip(*spec.runs))
        _, _, compile_s = engine.compile(*jax.device_put((seeds.astype(np.int32),
                                                          lrs.astype(np.float32))))
        out[depth] = compile_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "throughput.md"))
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    steps = 100 if args.quick else 500
    # compile times are measured, so nothing may come from a persistent cache
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="bench-cache-"))

    lrs = (0.01, 0.03, 0.1, 0.3)
    spec = make_spec("digits", "clip_norm(max_norm=1.0)", "default", "sgd(momentum=0.9)", seeds=8,
                     lrs=lrs, overrides={"train.steps": steps, "train.eval_every": steps // 5})
    data = load_data(spec)
    peak = matmul_peak()
    rows = {"naive JAX loop": naive_jax(spec, data, repeats),
            "stabench engine, 1 process": engine_once(spec, data, repeats)}
    torch_row = torch_loop(spec, data, repeats, 1.0)
    if torch_row:
        rows[f"PyTorch {torch_row['torch']} eager loop"] = torch_row
    flops = rows["stabench engine, 1 process"]["flops"]
    samples = len(spec.runs) * steps * spec.train["batch_size"]
    naive_s = rows["naive JAX loop"]["steady_s"]

    lines = [f"# Throughput: digits MLP sweep ({len(spec.runs)} runs x {steps} steps)", ""]
    lines += ["| implementation | compile s | steady s | runs/s | samples/s | GFLOP/s | MFU | vs naive |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        gflops = flops / r["steady_s"] / 1e9
        lines.append(f"| {name} | {r['compile_s']:.2f} | {r['steady_s']:.3f} | "
                     f"{len(spec.runs) / r['steady_s']:.1f} | {samples / r['steady_s']:,.0f} | "
                     f"{gflops:.1f} | {gflops / peak:.0%} | {naive_s / r['steady_s']:.2f}x |")
    depths = depth_compile((10, 100, 1000), 20)
    lines += ["", "## Compile time of a residual MLP by depth (seconds)", "",
              "| depth | compile s |", "|---|---|"]
    lines += [f"| {d} | {s:.2f} |" for d, s in depths.items()]
    lines += ["", f"Matmul peak (float32 1024x1024, jit): {peak:.1f} GFLOP/s. Training FLOPs per "
              f"sweep from XLA's cost analysis of one vmapped step x steps: {flops / 1e9:.1f} GFLOP.",
              f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{jax.devices()[0].device_kind}; jax {jax.__version__}; "
              f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    engine_s = rows["stabench engine, 1 process"]["steady_s"]
    torch_s = torch_row["steady_s"] if torch_row else float("nan")
    print(f"speedup_vs_naive={naive_s / engine_s:.2f} speedup_vs_torch={torch_s / engine_s:.2f} "
          f"mfu={flops / engine_s / 1e9 / peak:.2f}")


if __name__ == "__main__":
    main()

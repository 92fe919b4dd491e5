"""The throughput benchmark: its FLOP count (XLA's cost analysis of a program, loops unrolled) and
its row of the training math alone."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_throughput import BareProgram, bare_run, counted_flops, unrolled  # noqa: E402

from stabench.config import build_cell, data_source, make_spec, task_of  # noqa: E402
from stabench.runner import load_data  # noqa: E402
from stabench.train import Engine  # noqa: E402

N = 128  # elementwise work (N^2 per op) is under 1% of a matmul's 2 N^3
MATMUL = 2 * N**3


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def chain(x, w):  # len(w) matmuls in a scan
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


X = jax.ShapeDtypeStruct((N, N), jnp.float32)
W = jax.ShapeDtypeStruct((8, N, N), jnp.float32)


def test_xla_counts_a_scan_body_once_and_unrolled_counts_every_trip():
    assert xla_flops(chain, X, W) == pytest.approx(MATMUL, rel=0.01)
    assert counted_flops(chain, X, W) == pytest.approx(8 * MATMUL, rel=0.01)


def test_nested_loops_under_vmap_grad_and_cond_multiply_out():
    def loss(x, w):  # 3 maps x 8 scanned matmuls
        return jax.lax.map(lambda s: chain(x * s, w).sum(), jnp.arange(3.0)).sum()

    def program(x, w):
        g = jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0))(x, w)
        return jax.lax.cond(g.sum() > 0, lambda: g, lambda: -g)

    ws = jax.ShapeDtypeStruct((2, 8, N, N), jnp.float32)
    # per map: 8 forward, 8 kernel gradients, 7 input gradients (the first input is constant)
    assert counted_flops(program, X, ws) == pytest.approx(2 * 3 * 23 * MATMUL, rel=0.01)


def test_a_while_loop_cannot_be_counted():
    def loop(x):
        return jax.lax.while_loop(lambda h: h.sum() < 1e6, lambda h: h @ h, x)

    with pytest.raises(ValueError, match="while loop"):
        unrolled(jax.make_jaxpr(loop)(X))


def test_training_math_alone_trains_as_the_engine_does():
    """The bench's bare row times the engine's own training: same losses, step by step, for runs
    that stay finite (what it leaves out only records and guards)."""
    spec = make_spec("digits", "clip_norm(max_norm=1.0)", "default", "sgd(momentum=0.9)",
                     seeds=2, lrs=(0.01, 0.1), overrides={"train.steps": 30,
                                                         "train.eval_every": 10})
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))

    cell, data = build_cell(spec, data_source(task_of(spec))), load_data(spec)
    expected = Engine(cell, data).run(seeds, lrs).telemetry["loss"]
    _, _, losses = bare_run(Engine(cell, data, program=BareProgram(cell)), seeds, lrs)
    assert losses.shape == expected.shape == (4, 30)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)

"""Sharpness and logit telemetry against their definitions: Lanczos against eigvalsh, Adam's
preconditioner against optax's update, the stability thresholds against simulated quadratics, the
recorded logits against the model's own forward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy.special import logsumexp

from stabench import curvature
from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.metrics import run_metrics, sharpness_metrics, stability_threshold
from stabench.program import RunProgram
from stabench.registry import UserError
from stabench.runner import cell_record
from stabench.testing import catalog_spec, engine_for


def quadratic(n, eigenvalues, seed=0):
    """A symmetric matrix with the given spectrum in a random basis."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * eigenvalues) @ q.T


@pytest.mark.parametrize("n", [6, 200])  # fewer dimensions than Lanczos steps: it breaks down
def test_sharpness_of_a_quadratic_is_its_top_eigenvalue(n):
    # close top eigenvalues and a negative one of larger magnitude: power iteration would need
    # hundreds of products for the first and converge to the second
    eigenvalues = np.linspace(-5.0, 2.0, n)
    eigenvalues[-2] = 1.95
    a = quadratic(n, eigenvalues)
    params = {"w": jnp.ones(n), "b": jnp.ones(3)}  # b: linear, no curvature
    loss = lambda p: 0.5 * p["w"] @ jnp.asarray(a, jnp.float32) @ p["w"] + 3.0 * p["b"].sum()  # noqa: E731
    top = float(curvature.sharpness(loss, params))
    assert abs(top - 2.0) < 0.01 * 2.0, top


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_p_inverse_h():
    n = 60
    a = quadratic(n, np.linspace(0.1, 3.0, n), seed=1)
    p = np.random.default_rng(2).uniform(0.05, 2.0, n)
    loss = lambda w: 0.5 * w @ jnp.asarray(a, jnp.float32) @ w  # noqa: E731
    estimate = float(curvature.sharpness(loss, jnp.zeros(n), jnp.asarray(p ** -0.5, jnp.float32)))
    expected = scipy.linalg.eigh(a, np.diag(p), eigvals_only=True).max()  # A x = λ P x
    assert abs(estimate - expected) < 0.01 * expected, (estimate, expected)


def test_adam_preconditioner_is_the_one_optax_divides_the_momentum_by():
    b1, b2, eps = 0.9, 0.99, 1e-3
    tx = optax.scale_by_adam(b1, b2, eps)
    params = {"a": jnp.zeros(5), "b": jnp.zeros((2, 3))}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        direction, state = tx.update(grads, state, params)
    adam = curvature.adam_state(state, params)
    s = curvature.adam_inverse_sqrt_preconditioner(adam, b1, b2, eps)
    # Adam's direction is P^-1 m, m the plain EMA of the gradients
    for got, mu, scale in zip(jax.tree.leaves(direction), jax.tree.leaves(adam.mu),
                              jax.tree.leaves(s)):
        np.testing.assert_allclose(got, scale ** 2 * mu, rtol=1e-5)


def test_sharpness_and_log_z_recorded_by_the_engine_match_their_definitions(digits_data):
    b1, eps, lr = 0.9, 1e-8, 0.01  # Adam's defaults (b2 cancels out after one step)
    spec = catalog_spec(optimizer="adam", steps=7, lrs=(lr,),
                        **{"model.width": 8, "telemetry.sharpness_every": 3})
    engine = engine_for(spec, digits_data)
    result = engine.run(np.array([0]), np.array([lr]))
    tel = result.telemetry
    for name in ("sharpness", "precond_sharpness"):
        assert np.flatnonzero(np.isfinite(tel[name][0])).tolist() == [0, 3, 6], name
    # the record's metrics: Adam's threshold on the preconditioned series, 38 / lr at b1 = 0.9
    run = cell_record(spec, result)[0]["runs"][0]
    estimates = tel["precond_sharpness"][0, [0, 3, 6]]
    assert run["eos_share"] == np.mean(estimates >= 38 / lr)
    assert run["sharpness_max"] == tel["sharpness"][0, [0, 3, 6]].max()

    program, arrays = engine.program, engine.arrays
    first = engine.batch_indices(np.array([0]), 0)[0, 0]
    x0, y0 = program.inputs(arrays["x_train"][first], arrays), arrays["y_train"][first]
    _, params, state = nnx.split(program.initial_model(0, x0), nnx.Param, nnx.Not(nnx.Param))
    # log Z of step 0: the initial model's logits on its first batch
    logits = np.asarray(program.initial_model(0, x0)(x0), np.float64)
    np.testing.assert_allclose(tel["log_z"][0, 0], logsumexp(logits, axis=-1).mean(), rtol=1e-5)

    # sharpness of step 0: the full Hessian of the loss on the fixed batch at the initial params
    flat, unravel = ravel_pytree(params)
    fixed = curvature.fixed_batch(arrays["x_train"].shape[0], spec.train["batch_size"])
    x, y = program.inputs(arrays["x_train"][fixed], arrays), arrays["y_train"][fixed]
    hessian = np.asarray(jax.hessian(
        lambda f: program.forward_loss(unravel(f), state, x, y)[0])(flat), np.float64)
    hessian = (hessian + hessian.T) / 2
    top = np.linalg.eigvalsh(hessian).max()
    assert abs(tel["sharpness"][0, 0] - top) < 0.01 * top, (tel["sharpness"][0, 0], top)

    # Adam after one step: v = (1 - b2) g^2, so P = (1 - b1) (|g| + eps)
    g = ravel_pytree(jax.grad(lambda p: program.forward_loss(p, state, x0, y0)[0])(params))[0]
    p = (1 - b1) * (np.abs(np.asarray(g, np.float64)) + eps)
    top = scipy.linalg.eigh(hessian, np.diag(p), eigvals_only=True).max()
    assert abs(tel["precond_sharpness"][0, 0] - top) < 0.01 * top, (
        tel["precond_sharpness"][0, 0], top)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_logit_max_and_log_z_match_the_forward_pass(qk_norm):
    spec = make_spec("listops", fake_data=True, overrides={
        "model.dim": 8, "model.depth": 2, "model.heads": 2, "model.qk_norm": qk_norm,
        "dataset.min_length": 4, "dataset.max_length": 8})
    cell = build_cell(spec, data_source(task_of(spec)))
    program = RunProgram(cell)
    model = cell.build_model(nnx.Rngs(0))
    # larger weights than at init, so that logits are far from 0 and the padding matters
    model.blocks.qkv.kernel[...] = 4 * model.blocks.qkv.kernel[...]
    x = jnp.array([[3, 5, 7, 2, 0, 0, 0, 0], [4, 4, 9, 1, 6, 11, 2, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    y = jnp.array([0, 1, 2])
    _, params, state = nnx.split(model, nnx.Param, nnx.Not(nnx.Param))
    loss, (_, stats) = program.tapped_forward_loss(params, state, x, y)
    assert loss == program.forward_loss(params, state, x, y)[0]  # the telemetry changes nothing

    # each block's logits from its own layers, applied one after another outside the scan
    mask = np.asarray(x != 0)
    h = model.embed(x)
    graphdef, blocks = nnx.split(model.blocks)
    expected = []
    for layer in range(2):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], blocks))
        q, k, _ = np.split(np.asarray(block.qkv(block.norm1(h))).reshape(3, 8, 6, 4), 3, axis=2)
        if qk_norm:
            q, k = np.asarray(block.q_norm(q)), np.asarray(block.k_norm(k))
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        pairs = (mask[:, :, None] & mask[:, None, :])[:, None]
        expected.append(np.abs(logits)[np.broadcast_to(pairs, logits.shape)].max())
        h = block(h, jnp.asarray(mask))
    np.testing.assert_allclose(stats["attn_logit_max"], expected, rtol=1e-5)
    logits = np.asarray(model(x), np.float64)
    np.testing.assert_allclose(stats["log_z"], logsumexp(logits, axis=-1).mean(), rtol=1e-5)


# ---- metrics ----------------------------------------------------------------------------------
def diverges(tx, curvature_value, steps=2000):
    """Whether the optimizer's iterates on f(x) = curvature/2 x^2 grow without bound."""
    x = jnp.ones(1)
    state = tx.init(x)
    for _ in range(steps):
        update, state = tx.update(curvature_value * x, state, x)
        x = x + update
    return not abs(float(x[0])) < 1.0


@pytest.mark.parametrize("optimizer, args, tx", [
    ("sgd", {"momentum": 0.0}, lambda lr: optax.sgd(lr)),
    ("sgd", {"momentum": 0.9}, lambda lr: optax.sgd(lr, momentum=0.9)),
    ("sgd", {"momentum": 0.9, "nesterov": True}, lambda lr: optax.sgd(lr, 0.9, nesterov=True)),
    # Adam with its preconditioner frozen is gradient descent with EMA momentum on P^-1 H
    ("adam", {"b1": 0.9}, lambda lr: optax.chain(optax.ema(0.9, debias=False), optax.scale(-lr))),
])
def test_stability_threshold_is_where_the_quadratic_starts_to_diverge(optimizer, args, tx):
    lr = 0.1
    _, level = stability_threshold(optimizer, args, lr)
    assert not diverges(tx(lr), 0.97 * level)
    assert diverges(tx(lr), 1.03 * level)


def test_sharpness_metrics_read_the_estimated_steps():
    nan = math.nan
    tel = {"sharpness": np.array([1.0, nan, 3.0, nan, 5.0, nan, 2.0, nan]),
           "precond_sharpness": np.array([10.0, nan, 50.0, nan, 20.0, nan, 40.0, nan])}
    out = sharpness_metrics(tel, divergence=6, edge=("precond_sharpness", 30.0))
    assert out == {"sharpness_final": 2.0, "sharpness_max": 5.0, "precond_sharpness_final": 40.0,
                   "precond_sharpness_max": 50.0, "sharpness_at_divergence": 5.0,
                   "eos_share": 0.5}
    stable = sharpness_metrics(tel, divergence=None, edge=None)
    assert math.isnan(stable["sharpness_at_divergence"]) and math.isnan(stable["eos_share"])


def test_run_metrics_add_the_sharpness_metrics_only_for_a_run_that_recorded_it():
    steps = 40
    tel = {"loss": np.full(steps, 1.0), "grad_norm": np.ones(steps), "nonfinite": np.zeros(steps),
           "changed": np.full(steps, math.nan)}
    evals = {"test_loss": np.array([1.0]), "test_accuracy": np.array([0.5])}
    args = (evals, np.array([steps]), 30, ("test_accuracy", 0.9, "max"))
    assert "sharpness_max" not in run_metrics(tel, *args)
    sharp = np.where(np.arange(steps) % 10 == 0, 25.0 + np.arange(steps), math.nan)
    out = run_metrics({**tel, "sharpness": sharp}, *args, edge=("sharpness", 40.0))
    # frozen at step 30: the estimates before it are of steps 0, 10 and 20
    assert out["sharpness_at_divergence"] == 45.0 and out["sharpness_max"] == 55.0
    assert out["eos_share"] == 0.5  # 45 and 55 of 25, 35, 45, 55


# ---- the setting ------------------------------------------------------------------------------
def test_sharpness_every_zero_is_the_cell_without_it():
    plain = make_spec("digits")
    assert make_spec("digits", overrides={"telemetry.sharpness_every": 0}) == plain
    every = make_spec("digits", overrides={"telemetry.sharpness_every": 10})
    assert every.task_config["telemetry"] == {"sharpness_every": 10} and every.hash != plain.hash
    with pytest.raises(UserError, match="sharpness_every"):
        make_spec("digits", overrides={"telemetry.sharpness_every": -1})
    with pytest.raises(UserError, match="no key 'telemetry.sharpnes'"):
        make_spec("digits", overrides={"telemetry.sharpnes": 1})


def test_sharpness_figure_draws_the_estimates_and_each_learning_rates_threshold():
    from stabench.plots import entry_styles, sharpness_traces

    entries = [("none", "default", "sgd"), ("clip_norm", "default", "sgd")]
    nan = math.nan
    traces = {lr: {e: np.array([[1.0 + k, nan, 2.0, nan, 4.0], [1.0, nan, 2.0 + k, nan, 6.0]])
                   for k, e in enumerate(entries)} for lr in (0.1, 1.0)}
    fig = sharpness_traces(traces, {0.1: 20.0, 1.0: 2.0}, entry_styles(entries), "digits")
    for ax, edge in zip(fig.axes, (20.0, 2.0)):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert lines["stability threshold"].get_ydata()[0] == edge
        medians = [line for label, line in lines.items() if label != "stability threshold"]
        assert [list(line.get_xdata()) for line in medians] == [[0, 2, 4]] * 2
        assert list(medians[0].get_ydata()) == [1.0, 2.0, 5.0]  # the median over two seeds


def test_a_record_trained_before_a_telemetry_series_existed_still_reproduces():
    from stabench.reproduce import compare

    body = {"runs": [{"test_loss": 0.5}]}
    stored = (body, {"loss": np.array([1.0, 0.5])})
    assert compare(stored, (body, {"loss": np.array([1.0, 0.5]), "log_z": np.ones(2)})).exact

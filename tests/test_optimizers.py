"""Each optimizer's update against its textbook formula, and L-BFGS's line search in the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stabench.optimizers import OPTIMIZERS

from conftest import catalog_spec, covers, engine_for

LR = 0.1


def steps(spec, n=3, lr=LR):
    """Gradients, parameters and our updates over n steps on a small tree."""
    tx = OPTIMIZERS.get(spec)(lr)
    update = jax.jit(tx.update)
    params = {"a": jax.random.normal(jax.random.key(0), (5, 3)), "b": jnp.linspace(-1, 1, 3)}
    state = tx.init(params)
    grads, ps, updates = [], [], []
    for i in range(n):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + i), p.shape), params)
        u, state = update(g, state, params)
        grads.append(g)
        ps.append(params)
        updates.append(u)
        params = optax.apply_updates(params, u)
    return grads, ps, updates


def check(updates, expected):
    for u, e in zip(updates, expected):
        for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(e)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # float32 against float64


def per_leaf(grads, rule):
    """Apply `rule(g_history_list) -> update` leaf by leaf over the step history, in float64."""
    out = []
    for t in range(len(grads)):
        out.append(jax.tree.map(lambda *gs: rule([np.asarray(g, np.float64) for g in gs]),
                                *grads[: t + 1]))
    return out


@covers("optimizer", "sgd")
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_heavy_ball_and_nesterov(momentum, nesterov):
    grads, _, updates = steps(f"sgd(momentum={momentum}, nesterov={nesterov})")

    def rule(gs):
        v = 0.0
        for g in gs:
            v = momentum * v + g
        return -LR * (gs[-1] + momentum * v if nesterov else v)

    check(updates, per_leaf(grads, rule))


def adam_rule(b1=0.9, b2=0.999, eps=1e-8):
    def rule(gs):
        m = v = 0.0
        for g in gs:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
        t = len(gs)
        return -LR * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)

    return rule


@covers("optimizer", "adam")
def test_adam_bias_corrected_moments():
    grads, _, updates = steps("adam(b1=0.8, b2=0.99)")
    check(updates, per_leaf(grads, adam_rule(0.8, 0.99)))


@covers("optimizer", "adamw")
def test_adamw_adds_decoupled_decay_scaled_by_the_learning_rate():
    grads, params, updates = steps("adamw(weight_decay=0.3)")
    adam = per_leaf(grads, adam_rule())
    expected = [jax.tree.map(lambda a, p: a - LR * 0.3 * np.asarray(p, np.float64), a, p)
                for a, p in zip(adam, params)]
    check(updates, expected)


@covers("optimizer", "rmsprop")
@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_divides_by_running_rms(centered):
    grads, _, updates = steps(f"rmsprop(decay=0.9, eps=1e-8, centered={centered})")

    def rule(gs):
        v = m = 0.0
        for g in gs:
            v = 0.9 * v + 0.1 * g * g
            m = 0.9 * m + 0.1 * g
        return -LR * gs[-1] / np.sqrt(v - (m * m if centered else 0.0) + 1e-8)

    check(updates, per_leaf(grads, rule))


@covers("optimizer", "adagrad")
def test_adagrad_divides_by_root_sum_of_squares():
    grads, _, updates = steps("adagrad(initial_accumulator=0.1)")

    def rule(gs):
        return -LR * gs[-1] / np.sqrt(0.1 + sum(g * g for g in gs) + 1e-7)

    check(updates, per_leaf(grads, rule))


@covers("optimizer", "lbfgs")
def test_lbfgs_solves_a_convex_quadratic():
    a = jax.random.normal(jax.random.key(1), (6, 6))
    h = a @ a.T + 0.5 * jnp.eye(6)
    b = jnp.arange(6.0)

    def f(x):
        return 0.5 * x @ h @ x - b @ x

    opt = OPTIMIZERS.get("lbfgs")
    assert opt.needs_value
    tx = opt(1.0)

    @jax.jit
    def step(x, state):
        value, grad = jax.value_and_grad(f)(x)
        u, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(x, u), state

    x = jnp.zeros(6)
    state = tx.init(x)
    for _ in range(30):
        x, state = step(x, state)
    np.testing.assert_allclose(x, jnp.linalg.solve(h, b), rtol=1e-4, atol=1e-4)


@covers("optimizer", "lbfgs")
@pytest.mark.slow
def test_lbfgs_in_the_engine_decreases_the_full_batch_loss_every_step(digits_data):
    # one batch of all training examples: every step's loss is the same function, and the line
    # search only accepts steps that decrease it (Armijo)
    n = len(digits_data.x_train)
    spec = catalog_spec(optimizer="lbfgs", steps=6, lrs=(1.0,),
                        **{"train.batch_size": n})
    loss = engine_for(spec, digits_data).run(np.array([0]), np.array([1.0])).telemetry["loss"][0]
    assert np.isfinite(loss).all()
    assert (np.diff(loss) < 1e-6).all() and loss[-1] < 0.5 * loss[0]

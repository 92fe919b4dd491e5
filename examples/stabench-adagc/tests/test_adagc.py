"""AdaGC against its definition, step by step, and stabench's conformance checks on it."""

import jax
import numpy as np
import optax
import pytest
from stabench.methods import METHODS, Context
from stabench.testing import check_method, covers

import stabench_adagc  # noqa: F401  (registers adagc)

# A parameter tree shaped like a model's: an input layer, a part of 3 layers stacked along a
# leading axis, a head.
STACKED = ("blocks",)
SHAPES = {"input": {"kernel": (8, 16), "bias": (16,)}, "blocks": {"kernel": (3, 16, 16)},
          "head": {"kernel": (16, 4)}}


def tree(key, scale=1.0):
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, s)
                                        for k, s in zip(keys, leaves)])


def tensors(grads) -> list[np.ndarray]:
    """The tensors AdaGC clips one by one: each leaf, and each layer of a stacked leaf."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        leaf = np.asarray(leaf, np.float64)
        out += list(leaf) if path[0].key in STACKED else [leaf]
    return out


def reference(gradients, lambda_rel, beta, warmup, max_norm):
    """The definition in float64: each step's clipped tensors and every tensor's gamma."""
    gamma, steps = None, []
    for t, grads in enumerate(gradients):
        norms = np.array([np.linalg.norm(x) for x in grads])
        gamma = np.full(len(norms), np.inf) if gamma is None else gamma
        if t < warmup:
            h = np.full(len(norms), min(1.0, max_norm / np.sqrt(np.sum(norms ** 2))))
            gamma = np.minimum(gamma, h * norms)
        else:
            h = np.minimum(1.0, lambda_rel * gamma / norms)
            gamma = beta * gamma + (1 - beta) * h * norms
        steps.append(([f * x for f, x in zip(h, grads)], gamma.copy(), h))
    return steps


@covers("method", "adagc")
def test_adagc_clips_each_tensor_against_the_ema_of_its_clipped_norms():
    lambda_rel, beta, warmup, max_norm = 1.05, 0.7, 3, 4.0
    tx = METHODS.get(f"adagc(lambda_rel={lambda_rel}, beta={beta}, warmup={warmup}, "
                     f"max_norm={max_norm})")(Context(10, jax.random.key(0), stacked=STACKED))
    base = tree(jax.random.key(1))
    base = jax.tree.map(lambda x: x / optax.tree.norm(base), base)  # global norm 1
    # global norms: above max_norm, then below it in the warm-up; then changes within
    # lambda_rel, and one tensor spiking: the middle layer of the stack at step 5, the head at 7
    scales = [8.0, 3.0, 3.5, 3.1, 3.0, 3.0, 2.9, 3.0]
    gradients = [jax.tree.map(lambda x, s=s: s * x, base) for s in scales]
    gradients[5]["blocks"]["kernel"] = gradients[5]["blocks"]["kernel"].at[1].multiply(20.0)
    gradients[7]["head"]["kernel"] = gradients[7]["head"]["kernel"] * 50.0
    expected = reference([tensors(g) for g in gradients], lambda_rel, beta, warmup, max_norm)
    state, update = tx.init(base), jax.jit(tx.update)
    for t, (g, (clipped, gamma, h)) in enumerate(zip(gradients, expected)):
        out, state = update(g, state, base)
        for got, want in zip(tensors(out), clipped):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
        np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in
                                                   jax.tree.leaves(state.gamma)]),
                                   gamma, rtol=2e-5, err_msg=f"step {t}")
        assert bool(state.changed) == bool((h < 1).any()), t
        assert float(state.out_norm) == pytest.approx(
            np.sqrt(sum(np.sum(x ** 2) for x in clipped)), rel=2e-5)
    # both phases clipped and passed: the first step globally, the spikes alone in their tensor
    hs = np.array([h for _, _, h in expected])
    assert hs[0].max() < 1 and (hs[1:warmup] == 1).all()
    assert (hs[5] < 1).sum() == 1 and (hs[7] < 1).sum() == 1 and (hs[6] == 1).all()


def test_adagc_refuses_arguments_outside_its_definition():
    for spec in ["adagc(beta=1.0)", "adagc(lambda_rel=0.0)", "adagc(warmup=0)",
                 "adagc(max_norm=-1.0)"]:
        with pytest.raises(ValueError):
            METHODS.get(spec)


def test_adagc_conforms_to_stabench():
    check_method("adagc(warmup=2)")  # an 8-step conformance cell leaves the warm-up

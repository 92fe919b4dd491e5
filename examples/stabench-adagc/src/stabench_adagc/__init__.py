"""AdaGC as a stabench plugin: per-tensor adaptive gradient clipping (Wang et al. 2025,
"AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv:2502.11034).

For each parameter tensor i at update t, with g its gradient and gamma_i the EMA of its past
clipped gradient norms:

    after warm-up:  h_i = min(1, lambda_rel * gamma_i / ||g_i||),  g_i <- h_i g_i,
                    gamma_i <- beta * gamma_i + (1 - beta) * ||h_i g_i||
    warm-up (the first `warmup` updates): h = min(1, max_norm / ||g||), one global factor,
                    gamma_i <- min(gamma_i, ||h g_i||), starting from infinity

Each layer of a stacked part (a leading layer axis) is a tensor of its own, as it is in a model
whose layers are separate tensors. Installed, the package's entry point in group
`stabench.plugins` registers the method `adagc` in every stabench process.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import stabench


class AdaGCState(NamedTuple):
    count: jax.Array  # updates so far
    gamma: Any  # per tensor (a [layers] vector in a stacked part): EMA of its clipped norms
    changed: jax.Array  # the last update rescaled some tensor's gradient
    out_norm: jax.Array  # the global norm of its result


def _check(value, name: str, below: float | None = None) -> None:
    """Positive, and below `below` if given; a traced value (a run's own, in a compiled search)
    was checked when its run's spec was made."""
    if isinstance(value, jax.core.Tracer):
        return
    if not 0 < value < (below or float("inf")):
        raise ValueError(f"{name} must lie in (0, {below})" if below else
                         f"{name} must be positive")


@stabench.register_method(
    "adagc", stage="pre", traced=("lambda_rel", "beta", "max_norm"),
    ref="Wang et al. 2025 (AdaGC, arXiv:2502.11034)",
    help="per-tensor adaptive clipping: each parameter tensor's gradient is clipped to norm "
         "lambda_rel * gamma, gamma an EMA (beta) of that tensor's past clipped gradient norms; "
         "over the first `warmup` updates the global norm is clipped to max_norm instead and "
         "gamma starts as the least clipped norm the tensor had then")
def adagc(lambda_rel: float = 1.05, beta: float = 0.98, warmup: int = 100,
          max_norm: float = 1.0):
    _check(lambda_rel, "lambda_rel")
    _check(beta, "beta", below=1.0)
    _check(max_norm, "max_norm")
    if warmup < 1:  # gamma starts from the warm-up's clipped norms
        raise ValueError("warmup must be at least 1")
    return lambda ctx: _adagc(lambda_rel, beta, warmup, max_norm, ctx.stacked)


def _adagc(lambda_rel, beta, warmup: int, max_norm, stacked: tuple[str, ...]):
    def layer_axis(path) -> bool:
        return jax.tree_util.keystr(path[:1], simple=True) in stacked

    def norms(tree):
        """Each tensor's norm: a scalar, or one per layer of a stacked part."""
        def one(path, x):
            return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(layer_axis(path), x.ndim))))

        return jax.tree_util.tree_map_with_path(one, tree)

    def init(params):
        return AdaGCState(jnp.zeros([], jnp.int32),
                          jax.tree.map(lambda n: jnp.full_like(n, jnp.inf), norms(params)),
                          jnp.zeros([], bool), jnp.zeros([]))

    def update(updates, state, params=None):
        norm = norms(updates)
        total = jnp.sqrt(sum(jnp.sum(jnp.square(n)) for n in jax.tree.leaves(norm)))
        warming = state.count < warmup

        def factor(n, gamma):
            threshold = jnp.where(warming, max_norm, lambda_rel * gamma)
            measured = jnp.where(warming, total, n)
            # below the threshold (or NaN) the gradient passes untouched
            return jnp.where(measured > threshold, threshold / measured, 1.0)

        h = jax.tree.map(factor, norm, state.gamma)
        clipped_norm = jax.tree.map(jnp.multiply, h, norm)
        gamma = jax.tree.map(
            lambda g, c: jnp.where(warming, jnp.minimum(g, c), beta * g + (1 - beta) * c),
            state.gamma, clipped_norm)

        def rescale(x, factors):  # a stacked part's factors broadcast over each layer
            return x * factors.reshape(factors.shape + (1,) * (x.ndim - factors.ndim))

        out = jax.tree.map(rescale, updates, h)
        changed = jnp.any(jnp.stack([jnp.any(f < 1.0) for f in jax.tree.leaves(h)]))
        out_norm = jnp.sqrt(sum(jnp.sum(jnp.square(c)) for c in jax.tree.leaves(clipped_norm)))
        return out, AdaGCState(optax.safe_increment(state.count), gamma, changed, out_norm)

    return optax.GradientTransformation(init, update)

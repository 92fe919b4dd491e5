"""Curvature of the training loss: the largest eigenvalue of its Hessian (the sharpness, Cohen et
al. 2021) and of the Hessian preconditioned by Adam (Cohen et al. 2022), for the cell program.

Pure functions of a loss function and a parameter tree, traced inside the compiled step and vmapped
over runs. Hessian-vector products are forward-over-reverse (`jax.jvp` of `jax.grad`); the largest
eigenvalue comes from LANCZOS_STEPS steps of the Lanczos method from a fixed start vector, one
product each. Lanczos rather than power iteration: it converges to the algebraically largest
eigenvalue (a negative one of larger magnitude does not capture it) and, for the same products,
much faster when the top eigenvalues lie close together. It runs without reorthogonalization: the
Lanczos vectors then lose orthogonality only as Ritz values converge, and its Ritz values stay
within the spectrum up to rounding (Paige 1980), so the largest one is still the estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

LANCZOS_STEPS = 20  # Hessian-vector products per estimate
# a Lanczos step whose residual is below this share of the operator's scale found an invariant
# subspace: its Ritz values are exact, and the steps after it are left out
BREAKDOWN = 1e-5
BATCH_SEED = 0  # draws the fixed batch the sharpness is measured on


def fixed_batch(n: int, size: int) -> np.ndarray:
    """The training examples the sharpness is measured on: `size` of the `n`, drawn without
    replacement with a fixed seed, the same for every run and step (sorted, for locality)."""
    return np.sort(np.random.default_rng(BATCH_SEED).choice(n, size, replace=False))


def top_eigenvalue(matvec: Callable[[jax.Array], jax.Array], n: int,
                   steps: int = LANCZOS_STEPS) -> jax.Array:
    """The largest eigenvalue of the symmetric operator `matvec` on R^n (Lanczos, `steps`
    products, a fixed random start vector)."""
    v0 = jax.random.normal(jax.random.key(0), (n,), jnp.float32)

    def step(state, _):
        v, v_prev, beta = state
        w = matvec(v) - beta * v_prev
        alpha = jnp.vdot(w, v)
        w = w - alpha * v
        beta_next = jnp.linalg.norm(w)
        # w / beta_next is the next vector; after a breakdown it is dropped below, so any finite
        # vector will do
        v_next = w / jnp.maximum(beta_next, jnp.finfo(jnp.float32).tiny)
        return (v_next, v, beta_next), (alpha, beta_next)

    start = (v0 / jnp.linalg.norm(v0), jnp.zeros(n, jnp.float32), jnp.float32(0))
    _, (alphas, betas) = jax.lax.scan(step, start, None, length=steps)
    scale = jnp.max(jnp.abs(alphas)) + jnp.max(betas)
    # step j counts while every residual before it was above the breakdown level
    ok = jnp.concatenate([jnp.ones(1, bool), jnp.cumprod(betas[:-1] > BREAKDOWN * scale) > 0])
    # a left-out step: decoupled (zero off-diagonal), its diagonal alphas[0], a Rayleigh quotient
    # of the operator, which cannot raise the largest eigenvalue
    diag = jnp.where(ok, alphas, alphas[0])
    off = jnp.where(ok[1:], betas[:-1], 0.0)
    tridiagonal = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.linalg.eigvalsh(tridiagonal)[-1]


def sharpness(loss_fn: Callable[[Any], jax.Array], params: Any, scale: Any = None,
              steps: int = LANCZOS_STEPS) -> jax.Array:
    """λ_max of the Hessian of `loss_fn` at `params`; with `scale` (a tree like params, s > 0),
    λ_max of S H S, S = diag(s): with s = P^(-1/2), the eigenvalues of P^(-1) H."""
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda f: loss_fn(unravel(f)))
    s = None if scale is None else ravel_pytree(scale)[0]

    def matvec(v):
        v = v if s is None else s * v
        hv = jax.jvp(grad, (flat,), (v.astype(flat.dtype),))[1]
        return hv if s is None else s * hv

    return top_eigenvalue(matvec, flat.size, steps)


def adam_state(opt_state: Any, params: Any) -> optax.ScaleByAdamState | None:
    """The one `ScaleByAdamState` in an update's state whose moments are shaped like `params`
    (optax's Adam and AdamW hold one); None when there is none or more than one."""
    found = [s for s in jax.tree.leaves(opt_state,
                                        is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)
             and jax.tree.structure(s.nu) == jax.tree.structure(params)]
    return found[0] if len(found) == 1 else None


def adam_inverse_sqrt_preconditioner(state: optax.ScaleByAdamState, b1: float, b2: float,
                                     eps: float) -> Any:
    """P^(-1/2) for the Adam state after a step, P = (1 - b1^t) (sqrt(v / (1 - b2^t)) + eps): Adam's
    step is -lr P^(-1) m with m the plain EMA of gradients, whose bias correction P holds, as
    Cohen et al. 2022 write it (their preconditioned sharpness is λ_max(P^(-1) H), stable below
    (2 + 2 b1) / ((1 - b1) lr), 38 / lr at b1 = 0.9)."""
    t = state.count.astype(jnp.float32)
    return jax.tree.map(
        lambda nu: jax.lax.rsqrt((1 - b1 ** t) * (jnp.sqrt(nu / (1 - b2 ** t)) + eps)), state.nu)

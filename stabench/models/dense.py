"""Dense layer product whose kernel gradient stays on XLA:CPU's fast path for few outputs.

The kernel gradient of y = x @ k (k: [in, out]) is x^T @ dy, a product over the batch axis, which
is the major axis of both operands. XLA:CPU runs that form on Eigen (YNNPACK takes only products
whose left operand is contracted along its minor axis), slowly when `out` is small, as for a
classifier head (in the digits cell, two runs a step, batch 128: 46 us for the 0.65 MFLOP of the
128x10 head, 100 us for the 8.4 MFLOP of a 128x128 layer). The same sums as (dy^T @ x)^T, with dy^T
materialized, are a canonical product that runs on YNNPACK; the two transposes are of [batch, out]
and [out, in] arrays, cheap when `out` is small and costly when it is not (a training step of one
such layer on one core, 128 or 64 inputs: 1.2-1.9x faster up to 32 outputs, about even at 64-100,
slower from 128). Optimization barriers keep XLA from folding the transposes back into the product.
Other backends take the inputs' layouts as they are: there it is `jax.lax.dot_general` unchanged.
"""

from __future__ import annotations

from functools import partial

import jax

FEW_OUTPUTS = 32  # up to this many output features, the transposed kernel gradient is faster


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
    """Drop-in for `jax.lax.dot_general` as nnx.Linear calls it (`dot_general=`): the product
    x @ k of a kernel with few outputs takes the transposed kernel gradient on CPU."""
    linear = (rhs.ndim == 2 and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
              and not any(dimension_numbers[1]))
    if (not linear or rhs.shape[1] > FEW_OUTPUTS or preferred_element_type is not None
            or out_sharding is not None or jax.default_backend() != "cpu"):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type,
                                   out_sharding=out_sharding)
    return _product(lhs, rhs, precision)


def _plain(x, k, precision):
    return jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product(x, k, precision):
    return _plain(x, k, precision)


def _product_fwd(x, k, precision):
    return _plain(x, k, precision), (x, k)


def _product_bwd(precision, residuals, dy):
    x, k = residuals
    dx = jax.lax.dot_general(dy, k, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)
    dy_t = jax.lax.optimization_barrier(dy.reshape(-1, dy.shape[-1]).T)
    dk_t = jax.lax.optimization_barrier(
        jax.lax.dot(dy_t, x.reshape(-1, x.shape[-1]), precision=precision))
    return dx, dk_t.T


_product.defvjp(_product_fwd, _product_bwd)

"""2-D convolution that stays on XLA:CPU's fast path inside the engine's compiled cell.

XLA:CPU runs a convolution fast (Eigen) only in the canonical layout (input NHWC, kernel HWIO,
output NHWC) and without feature groups. Two things in a cell leave that path:
- the gradient convolutions JAX derives use other layouts, and inside a loop body (the engine's
  scan over steps) XLA:CPU keeps those layouts and runs them some 30x slower (jax-ml/jax#12868):
  a custom VJP computes the same gradients with canonical convolutions and explicit transposes;
- vmap over runs turns a convolution whose input and kernel both differ per run into a grouped
  one, which XLA:CPU expands block-diagonally (cost grows with the runs squared): on CPU the
  batching rule loops over runs instead, and folds the run axis into the batch (or the output
  channels) when only one operand differs per run. Other backends batch as usual.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **kwargs):
    """Drop-in for `jax.lax.conv_general_dilated` as nnx.Conv calls it (`conv_general_dilated=`):
    2-D NHWC convolutions without dilation or groups take the fast path."""
    plain = (lhs.ndim == 4 and feature_group_count == 1
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and dimension_numbers is not None
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
             and kwargs.get("preferred_element_type") is None)
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _conv(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in padding))


def _canonical(strides, pads, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    """(x, k) -> canonical NHWC convolution with these settings, batched over runs cheaply."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, pads, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=NHWC)

    if jax.default_backend() != "cpu":
        return conv
    batched = jax.custom_batching.custom_vmap(conv)

    @batched.def_vmap
    def rule(axis_size, in_batched, x, k):
        x_batched, k_batched = in_batched
        if x_batched and k_batched:
            return jax.lax.map(lambda xk: batched(*xk), (x, k)), True
        if x_batched:  # runs become more examples
            out = batched(x.reshape(-1, *x.shape[2:]), k)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        # runs become more output channels
        cout = k.shape[-1]
        out = batched(x, jnp.moveaxis(k, 0, -2).reshape(*k.shape[1:-1], axis_size * cout))
        return jnp.moveaxis(out.reshape(*out.shape[:-1], axis_size, cout), -2, 0), True

    return batched


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, k, strides, pads):
    return _canonical(strides, pads)(x, k)


def _conv_fwd(x, k, strides, pads):
    return _conv(x, k, strides, pads), (x, k)


def _conv_bwd(strides, pads, residuals, dy):
    x, k = residuals
    size, window, out = x.shape[1:3], k.shape[:2], dy.shape[1:3]
    # d/dx: dy dilated by the stride, convolved with the kernel flipped in space, in/out swapped
    pads_x = tuple((window[d] - 1 - pads[d][0],
                    window[d] - 1 - pads[d][1] + (size[d] + sum(pads[d]) - window[d]) % strides[d])
                   for d in range(2))
    flipped = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    dx = _canonical((1, 1), pads_x, lhs_dilation=strides)(dy, flipped)
    # d/dk: input channels act as the batch, the batch as features, dy (dilated) as the kernel
    pads_k = tuple((pads[d][0], window[d] + (out[d] - 1) * strides[d] - size[d] - pads[d][0])
                   for d in range(2))
    dk = _canonical((1, 1), pads_k, rhs_dilation=strides)(x.transpose(3, 1, 2, 0),
                                                          dy.transpose(1, 2, 0, 3))
    return dx, dk.transpose(1, 2, 0, 3)


_conv.defvjp(_conv_fwd, _conv_bwd)

"""Init registry. An `Init` gives the kernel initializer of every layer (None keeps each layer's
own default) and, for inits that need more than a distribution:

- `model_args`: arguments the model must be built with (e.g. a learnable branch gain at 0);
- `check(model)`: raises UserError when the model lacks the structure the init needs (run on the
  abstract model when the cell is built, before anything runs);
- `after(model, x)`: runs on each new model inside the compiled init program, with the run's
  first training batch `x` (residual rescaling, LSUV's data-driven calibration).

Residual inits read the model's residual structure as `models` documents it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import MUTABLE, LayerLayout, activation_stds, residual_blocks
from .registry import Registry, UserError

INITS = Registry("init")


@dataclass(frozen=True)
class Init:
    kernel_init: Callable | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    check: Callable[[nnx.Module], None] | None = None
    after: Callable[[nnx.Module, jax.Array], None] | None = None


@INITS.register("default",
                help="each layer's own default (Flax: LeCun normal kernels, zero biases)",
                ref="the model's layer defaults")
def default() -> Init:
    return Init()


@INITS.register("lecun_normal", help="truncated normal, Var = 1/fan_in", ref="LeCun et al. 1998")
def lecun_normal() -> Init:
    return Init(jax.nn.initializers.lecun_normal())


@INITS.register("glorot_uniform", help="uniform, Var = 2/(fan_in+fan_out)",
                ref="Glorot & Bengio 2010")
def glorot_uniform() -> Init:
    return Init(jax.nn.initializers.glorot_uniform())


@INITS.register("glorot_normal", help="truncated normal, Var = 2/(fan_in+fan_out)",
                ref="Glorot & Bengio 2010")
def glorot_normal() -> Init:
    return Init(jax.nn.initializers.glorot_normal())


@INITS.register("he_normal", help="truncated normal, Var = 2/fan_in (ReLU nets)",
                ref="He et al. 2015")
def he_normal() -> Init:
    return Init(jax.nn.initializers.he_normal())


@INITS.register("he_uniform", help="uniform, Var = 2/fan_in (ReLU nets)", ref="He et al. 2015")
def he_uniform() -> Init:
    return Init(jax.nn.initializers.he_uniform())


@INITS.register("orthogonal", help="random (semi-)orthogonal kernels times gain: W^T W = gain^2 I, "
                "or W W^T where fan_in < fan_out",
                ref="Saxe et al. 2014")
def orthogonal(gain: float = 1.0) -> Init:
    if gain <= 0:
        raise ValueError("gain must be positive")
    return Init(jax.nn.initializers.orthogonal(scale=gain))


@INITS.register("delta_orthogonal", help="convolutions: an orthogonal matrix (times gain) at the "
                "centre tap, zero elsewhere; dense kernels: orthogonal",
                ref="Xiao et al. 2018")
def delta_orthogonal(gain: float = 1.0) -> Init:
    if gain <= 0:
        raise ValueError("gain must be positive")
    dense = jax.nn.initializers.orthogonal(scale=gain)
    conv = jax.nn.initializers.delta_orthogonal(scale=gain)

    def init(key, shape, dtype=jnp.float32):
        return (dense if len(shape) == 2 else conv)(key, shape, dtype)

    return Init(init)


@INITS.register("normal", help="naive fixed-scale baseline: N(0, std^2) whatever the width",
                ref="a fixed-scale baseline (cf. Glorot & Bengio 2010)")
def normal(std: float = 0.01) -> Init:
    if std <= 0:
        raise ValueError("std must be positive")
    return Init(jax.nn.initializers.normal(stddev=std))


@INITS.register("uniform", help="naive fixed-scale baseline: U(-scale, scale) whatever the width",
                ref="a fixed-scale baseline (cf. Glorot & Bengio 2010)")
def uniform(scale: float = 0.05) -> Init:
    if scale <= 0:
        raise ValueError("scale must be positive")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return Init(init)


# ---- inits that need the model's residual structure ------------------------------------------
def _needs_residual(name: str, gain: bool = False, fixup: bool = False):
    def check(model: nnx.Module) -> None:
        blocks = [block for block, _ in residual_blocks(model)]
        kind = type(model).__name__
        if not blocks:
            raise UserError(f"init '{name}' needs residual blocks; this {kind} has none "
                            "(e.g. set model.residual=true)")
        if gain and any(getattr(block, "branch_gain", None) is None for block in blocks):
            raise UserError(f"init '{name}' needs a learnable gain on each residual branch; "
                            f"this {kind} has none")
        if fixup and any(len(block.branches) != 1 for block in blocks):
            raise UserError(f"init 'fixup' is defined for blocks of one residual branch; this "
                            f"{kind}'s blocks have {len(blocks[0].branches)} (its transformer "
                            "variant, T-Fixup, is a different init)")
        if fixup and any(_is_norm(_branch(block, 0)[-1]) for block in blocks):
            raise UserError(f"init 'fixup' zeroes the last layer of each residual branch, and "
                            f"this {kind}'s branches end in a norm layer, which would multiply "
                            "that layer's gradient by 1/sqrt(eps); Fixup trains without "
                            "normalization (set model.norm=none)")

    return check


def _branch(block: nnx.Module, i: int) -> list[nnx.Module]:
    """The layers of the block's i-th residual branch in the order they apply."""
    layers = [getattr(block, name) for name in block.branches[i]]
    return [layer for layer in layers if layer is not None]


def _is_norm(layer: nnx.Module) -> bool:
    return hasattr(layer, "scale") and not hasattr(layer, "kernel")


def _zero(layer: nnx.Module) -> None:
    for name in ("kernel", "bias"):
        param = getattr(layer, name, None)
        if param is not None:
            param[...] = jnp.zeros_like(param[...])


def _fixup(model: nnx.Module, x: jax.Array) -> None:
    blocks = residual_blocks(model)
    depth = sum(n for _, n in blocks)  # L: residual branches in the network
    for block, _ in blocks:
        layers = [layer for layer in _branch(block, 0) if hasattr(layer, "kernel")]
        m = len(layers)
        for layer in layers[:-1]:  # m = 1: the branch is its last layer, nothing to scale
            layer.kernel[...] = layer.kernel[...] * depth ** (-1.0 / (2 * m - 2))
        _zero(layers[-1])
    _zero(getattr(model, model.layer_order[-1]))


@INITS.register("fixup", help="He init; inside each of the L residual branches of m layers, "
                "scale by L^(-1/(2m-2)) and zero the last layer; zero the classifier (Fixup's "
                "initialization rules; not its added scalar multipliers and biases)",
                ref="Zhang et al. 2019 (Fixup)")
def fixup() -> Init:
    return Init(jax.nn.initializers.he_normal(), check=_needs_residual("fixup", fixup=True),
                after=_fixup)


@INITS.register("skipinit", help="a learnable scalar gain on each residual branch, initialized "
                "at 0: every block starts as the identity",
                ref="De & Smith 2020 (SkipInit)")
def skipinit() -> Init:
    return Init(model_args=(("branch_gain", 0.0),), check=_needs_residual("skipinit", gain=True))


@INITS.register("rezero", help="x + alpha * F(x) with a learnable alpha initialized at 0 on each "
                "residual branch (as skipinit; ReZero also drops normalization: set "
                "model.norm=none)",
                ref="Bachlechner et al. 2020 (ReZero)")
def rezero() -> Init:
    return Init(model_args=(("branch_gain", 0.0),), check=_needs_residual("rezero", gain=True))


def _zero_branch_ends(model: nnx.Module, x: jax.Array) -> None:
    # A pre-activation branch ends in a kernel layer: zeroing the norm before its ReLU instead
    # would zero the gradient of every layer in the branch, for good.
    for block, _ in residual_blocks(model):
        for i in range(len(block.branches)):
            end = _branch(block, i)[-1]
            if _is_norm(end):
                end.scale[...] = jnp.zeros_like(end.scale[...])
            else:
                _zero(end)


@INITS.register("zero_init_residual", help="every residual branch starts at zero: the scale of "
                "the norm layer that ends it is zeroed, or, where it ends in a kernel layer "
                "(pre-activation blocks), that layer",
                ref="Goyal et al. 2017; pre-activation form as in timm's ResNetV2")
def zero_init_residual() -> Init:
    return Init(check=_needs_residual("zero_init_residual"), after=_zero_branch_ends)


# ---- data-dependent ------------------------------------------------------------------------
def _plain_only(model: nnx.Module) -> None:
    kind = type(model).__name__
    if residual_blocks(model):
        raise UserError("init 'lsuv' scales each layer to unit output variance, which a residual "
                        f"block's output cannot reach; this {kind} has residual blocks (set "
                        "model.residual=false)")
    bounded = getattr(model, "bounded_parts", ())
    if bounded:
        raise UserError("init 'lsuv' scales each layer to unit output variance, which a "
                        "saturating output cannot reach (rescaling its kernel only saturates it); "
                        f"this {kind}'s {', '.join(bounded)} output is bounded: use lsuv on a "
                        "plain feed-forward model (mlp, cnn, resnet with residual=false and "
                        "norm=none)")
    if any(isinstance(m, (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm))
           for _, m in nnx.iter_modules(model)):
        raise UserError("init 'lsuv' scales each layer to unit output variance, which a "
                        "normalization layer undoes (its output does not depend on the kernel's "
                        f"scale); this {kind} has normalization layers (set model.norm=none)")


def _lsuv(tol: float, max_iters: int):
    def after(model: nnx.Module, x: jax.Array) -> None:
        graphdef, params, rest = nnx.split(model, nnx.Param, MUTABLE)
        layout = LayerLayout(params, model.layer_order, getattr(model, "stacked_layers", ()))
        # A layer of k kernels with ReLUs between them (a plain ResNet block) scales its output
        # by s^k when each kernel is scaled by s: the k-th root of 1/std brings it to unit std.
        root = jnp.asarray(1.0 / np.maximum(layout.leaf_counts(params), 1), jnp.float32)

        def stds(scales):  # inside the loops: nnx modules are merged at the loop's trace level
            scaled = nnx.merge(graphdef, layout.scale(params, scales), rest)
            return activation_stds(scaled, x, layout)

        def layer(i, scales):
            def more(carry):
                it, _, std = carry
                return (it < max_iters) & (jnp.abs(jnp.square(std[i]) - 1.0) > tol)

            def rescale(carry):
                it, scales, std = carry
                ok = jnp.isfinite(std[i]) & (std[i] > 0)
                scales = scales.at[i].multiply(jnp.where(ok, std[i] ** -root[i], 1.0))
                return it + 1, scales, stds(scales)

            return jax.lax.while_loop(more, rescale, (0, scales, stds(scales)))[1]

        scales = jax.lax.fori_loop(0, len(layout), layer, jnp.ones(len(layout)))
        nnx.update(model, layout.scale(params, scales))

    return after


@INITS.register("lsuv", help="orthogonal init, then each layer in depth order rescaled to unit "
                "output variance on the run's first batch (plain networks)",
                ref="Mishkin & Matas 2016 (LSUV)")
def lsuv(tol: float = 0.01, max_iters: int = 10) -> Init:
    if tol <= 0 or max_iters <= 0:
        raise ValueError("tol and max_iters must be positive")
    return Init(jax.nn.initializers.orthogonal(), check=_plain_only, after=_lsuv(tol, max_iters))

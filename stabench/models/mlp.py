"""MLP with a stack of identical hidden blocks; `residual` and `norm` switches for depth studies."""

from __future__ import annotations

import jax
from flax import nnx

from . import dense
from .layers import MODELS, NORMS, branch_gain_param, gained, make_norm, observe, scan_layers

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jax.nn.tanh, "sigmoid": jax.nn.sigmoid,
               "gelu": jax.nn.gelu, "linear": lambda x: x}


def kernel_init_kwargs(kernel_init) -> dict:
    """None keeps the layer's own default initializer."""
    return {} if kernel_init is None else {"kernel_init": kernel_init}


class Block(nnx.Module):
    """One hidden layer: h -> [h +] scale * [gain *] linear(act(norm(h))) (pre-activation, He et
    al. 2016b); `gain` is a learnable scalar on a residual branch when branch_gain is given."""

    branches = (("norm", "linear"),)

    def __init__(self, width, activation, norm, residual, branch_scale, branch_gain, kernel_init,
                 rngs):
        self.norm = make_norm(norm, width, rngs)
        self.linear = nnx.Linear(width, width, **kernel_init_kwargs(kernel_init), rngs=rngs)
        self.activation = activation
        self.residual = residual
        self.branch_scale = branch_scale
        self.branch_gain = branch_gain_param(branch_gain)

    def __call__(self, h):
        z = self.norm(h) if self.norm is not None else h
        branch = gained(self.branch_gain, self.branch_scale * self.linear(
            ACTIVATIONS[self.activation](z)))
        return h + branch if self.residual else branch


class MLP(nnx.Module):
    layer_order = ("input", "blocks", "final_norm", "head")
    stacked_layers = ("blocks",)

    def __init__(self, in_features, num_outputs, *, width, depth, activation, norm, residual,
                 branch_scale, branch_gain, kernel_init, rngs):
        init = kernel_init_kwargs(kernel_init)
        self.residual_parts = ("blocks",) if residual else ()
        self.input = nnx.Linear(in_features, width, **init, rngs=rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(width, activation, norm, residual, branch_scale, branch_gain, kernel_init,
                         rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = make_norm(norm, width, rngs)
        self.head = nnx.Linear(width, num_outputs, **init, dot_general=dense.dot_general,
                               rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        h = observe("input", self.input(x.reshape(x.shape[0], -1)))
        h = scan_layers(self, "blocks", h)
        if self.final_norm is not None:
            h = observe("final_norm", self.final_norm(h))
        return observe("head", self.head(ACTIVATIONS[self.activation](h)))


@MODELS.register("mlp", help="MLP: input layer, `depth` identical hidden blocks, linear head",
                 ref="Rumelhart et al. 1986; residual/norm switches: He et al. 2016")
def mlp(width: int = 128, depth: int = 2, activation: str = "relu", norm: str = "none",
        residual: bool = False, branch_scale: float = 1.0, branch_gain: float | None = None):
    if branch_gain is not None and not residual:
        raise ValueError("branch_gain multiplies residual branches: set residual=true")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")
    if width <= 0 or depth <= 0:
        raise ValueError("width and depth must be positive")

    def build(meta, kernel_init, rngs):
        in_features = 1
        for d in meta.x_shape:
            in_features *= d
        return MLP(in_features, meta.num_outputs, width=width, depth=depth, activation=activation,
                   norm=norm, residual=residual, branch_scale=branch_scale,
                   branch_gain=branch_gain, kernel_init=kernel_init, rngs=rngs)

    return build

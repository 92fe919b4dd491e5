"""CIFAR-style ResNet of He et al. 2016 (section 4.2), depth 6n+2, and its plain twin.

A 3x3 stem convolution, three stages of n basic blocks with `width`, 2 `width` and 4 `width`
channels (the first block of stages 2 and 3 halves the resolution), global average pooling and a
linear head. Shortcuts are parameter-free (option A: identity, subsampled and zero-padded where the
shape changes), so `residual=false` gives the plain net with exactly the same layers and parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import dense
from .layers import MODELS, NORMS, branch_gain_param, gained, make_norm, observe, scan_layers
from .conv import conv_general_dilated
from .mlp import kernel_init_kwargs

IMAGE_AXES = (-3, -2, -1)  # layer norm over height, width and channels


class Stem(nnx.Module):
    def __init__(self, cin, cout, norm, kernel_init, rngs):
        self.conv = conv3x3(cin, cout, 1, norm == "none", kernel_init, rngs)
        self.norm = make_norm(norm, cout, rngs, IMAGE_AXES)

    def __call__(self, x):
        h = self.conv(x)
        return jax.nn.relu(self.norm(h) if self.norm is not None else h)


class BasicBlock(nnx.Module):
    """relu(shortcut(x) + branch_scale * [gain *] norm2(conv2(relu(norm1(conv1(x)))))),
    post-activation as in He et al. 2016; the plain block drops `shortcut(x)`; `gain` is a
    learnable scalar on the residual branch when branch_gain is given."""

    branches = (("conv1", "norm1", "conv2", "norm2"),)

    def __init__(self, cin, cout, stride, norm, residual, branch_scale, branch_gain, kernel_init,
                 rngs):
        bias = norm == "none"
        self.conv1 = conv3x3(cin, cout, stride, bias, kernel_init, rngs)
        self.norm1 = make_norm(norm, cout, rngs, IMAGE_AXES)
        self.conv2 = conv3x3(cout, cout, 1, bias, kernel_init, rngs)
        self.norm2 = make_norm(norm, cout, rngs, IMAGE_AXES)
        self.stride, self.pad = stride, cout - cin
        self.residual = residual
        self.branch_scale = branch_scale
        self.branch_gain = branch_gain_param(branch_gain)

    def shortcut(self, x):
        x = x[:, ::self.stride, ::self.stride, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.pad))) if self.pad else x

    def __call__(self, x):
        h = self.conv1(x)
        h = jax.nn.relu(self.norm1(h) if self.norm1 is not None else h)
        h = self.conv2(h)
        h = gained(self.branch_gain,
                   self.branch_scale * (self.norm2(h) if self.norm2 is not None else h))
        return jax.nn.relu(h + self.shortcut(x) if self.residual else h)


def conv3x3(cin, cout, stride, bias, kernel_init, rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=bias,
                    conv_general_dilated=conv_general_dilated, **kernel_init_kwargs(kernel_init),
                    rngs=rngs)


def _stack(n, c, rngs, **block):
    """n identical blocks with a leading layer axis, or None when n is 0."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return BasicBlock(c, c, 1, rngs=rngs, **block)

    return make(rngs)


class ResNet(nnx.Module):
    layer_order = ("stem", "stage1", "down2", "stage2", "down3", "stage3", "head")
    stacked_layers = ("stage1", "stage2", "stage3")

    def __init__(self, in_channels, num_outputs, *, depth, width, norm, residual, branch_scale,
                 branch_gain, kernel_init, rngs):
        n = (depth - 2) // 6
        w = width
        block = dict(norm=norm, residual=residual, branch_scale=branch_scale,
                     branch_gain=branch_gain, kernel_init=kernel_init, rngs=rngs)
        self.stem = Stem(in_channels, w, norm, kernel_init, rngs)
        self.stage1 = _stack(n, w, **block)
        self.down2 = BasicBlock(w, 2 * w, 2, **block)
        self.stage2 = _stack(n - 1, 2 * w, **block)
        self.down3 = BasicBlock(2 * w, 4 * w, 2, **block)
        self.stage3 = _stack(n - 1, 4 * w, **block)
        self.head = nnx.Linear(4 * w, num_outputs, **kernel_init_kwargs(kernel_init),
                               dot_general=dense.dot_general, rngs=rngs)
        self.residual_parts = tuple(part for part in self.layer_order[1:-1]
                                    if residual and getattr(self, part) is not None)

    def __call__(self, x):
        h = observe("stem", self.stem(x))
        for part in ("stage1", "down2", "stage2", "down3", "stage3"):
            if part in self.stacked_layers:
                if getattr(self, part) is not None:
                    h = scan_layers(self, part, h)
            else:
                h = observe(part, getattr(self, part)(h))
        return observe("head", self.head(h.mean(axis=(1, 2))))


@MODELS.register(
    "resnet", help="CIFAR ResNet, depth 6n+2 (20, 32, 44, 56, 110); residual=false: plain twin",
    ref="He et al. 2016 (Deep Residual Learning, CIFAR-10 section)")
def resnet(depth: int = 20, width: int = 16, norm: str = "batch", residual: bool = True,
           branch_scale: float = 1.0, branch_gain: float | None = None):
    if branch_gain is not None and not residual:
        raise ValueError("branch_gain multiplies residual branches: set residual=true")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError("depth must be 6n+2 with n >= 1: 8, 14, 20, 32, 44, 56, 110, ...")
    if width <= 0:
        raise ValueError("width must be positive")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")

    def build(meta, kernel_init, rngs):
        if len(meta.x_shape) != 3:
            raise ValueError(f"resnet needs image inputs [height, width, channels], got "
                             f"{meta.x_shape}")
        return ResNet(meta.x_shape[-1], meta.num_outputs, depth=depth, width=width, norm=norm,
                      residual=residual, branch_scale=branch_scale, branch_gain=branch_gain,
                      kernel_init=kernel_init, rngs=rngs)

    return build

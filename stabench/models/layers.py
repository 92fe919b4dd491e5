"""The model registry and what the models share: the per-layer view of a parameter tree
(LayerLayout), activation recording (`observe`), stacks applied with `scan_layers`, norms and
residual gains. The package docstring states the contract a model keeps with them."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..registry import Registry

MODELS = Registry("model")


class LayerLayout:
    """Groups a parameter tree's leaves into layers in depth order; computes per-layer norms."""

    def __init__(self, tree: Any, layer_order: tuple[str, ...], stacked: tuple[str, ...] = ()):
        paths = [tuple(p) for p, _ in nnx.to_flat_state(tree)]
        leaves = [v for _, v in nnx.to_flat_state(tree)]
        groups: dict[tuple, list[int]] = {}
        for i, path in enumerate(paths):
            top = path[0]
            if top not in layer_order:
                raise ValueError(f"parameter {'/'.join(map(str, path))} is outside layer_order")
            key = path[:2] if len(path) > 2 and isinstance(path[1], int) else path[:1]
            groups.setdefault(key, []).append(i)
        self._groups = sorted(groups.items(), key=lambda kv: (layer_order.index(kv[0][0]), kv[0]))
        self._stacked = stacked
        self.names: list[str] = []
        self._layers_per_group: list[int] = []
        self._first: dict[tuple, int] = {}  # group -> index of its first layer
        for key, idx in self._groups:
            self._first[key] = len(self.names)
            label = "/".join(map(str, key))
            if key[0] in stacked:
                depth = _shape(leaves[idx[0]])[0]
                self.names += [f"{label}[{d}]" for d in range(depth)]
            else:
                depth = 1
                self.names.append(label)
            self._layers_per_group.append(depth)

    def __len__(self) -> int:
        return len(self.names)

    def sq_norms(self, tree: Any) -> jax.Array:
        """Squared L2 norm of each layer's leaves, shape [layers]."""
        leaves = [v for _, v in nnx.to_flat_state(tree)]
        out = []
        for key, idx in self._groups:
            if key[0] in self._stacked:
                # summed over the trailing axes in place: a reshape would copy the leaf
                out.append(sum(jnp.sum(jnp.square(_value(leaves[i])),
                                       axis=tuple(range(1, len(_shape(leaves[i]))))) for i in idx))
            else:
                total = sum(jnp.sum(jnp.square(_value(leaves[i]))) for i in idx)
                out.append(jnp.reshape(total, (1,)))
        return jnp.concatenate(out)

    def norms(self, tree: Any) -> jax.Array:
        return jnp.sqrt(self.sq_norms(tree))

    def leaf_counts(self, tree: Any, leaf: str = "kernel") -> np.ndarray:
        """How many leaves named `leaf` each layer holds: the leaves `scale` multiplies by that
        layer's factor (a plain ResNet block holds two kernels, one after the other)."""
        counts = np.zeros(len(self), np.int32)
        for path, value in nnx.to_flat_state(tree):
            if path[-1] != leaf:
                continue
            key = tuple(path[:2]) if len(path) > 2 and isinstance(path[1], int) else path[:1]
            first = self._first[key]
            depth = _shape(value)[0] if key[0] in self._stacked else 1
            counts[first:first + depth] += 1
        return counts

    def scale(self, tree: Any, factors: jax.Array, leaf: str = "kernel") -> Any:
        """Multiply the leaves named `leaf` of each layer by that layer's factor ([layers])."""
        def one(path, x):
            names = key_names(path)
            if names[-1] != leaf:
                return x
            key = tuple(names[:2]) if len(names) > 2 and isinstance(names[1], int) else (names[0],)
            first = self._first[key]
            if key[0] in self._stacked:
                f = factors[first:first + x.shape[0]]
                return x * f.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            return x * factors[first].astype(x.dtype)

        return jax.tree_util.tree_map_with_path(one, tree)

    def observed(self, recorded: dict[str, jax.Array]) -> jax.Array:
        """The per-layer values `observe` recorded (a vector per stack), in layer order; NaN for
        a part the model does not observe."""
        by_layer = {tuple(int(p) if p.isdigit() else p for p in part.split("/")):
                    jnp.reshape(value, (-1,)) for part, value in recorded.items()}
        return jnp.concatenate([by_layer.get(key, jnp.full((n,), jnp.nan))
                                for (key, _), n in zip(self._groups, self._layers_per_group)])


_RECORDERS: list[dict] = []  # active activation_stds calls, innermost last
_TAPS: list[dict] = []  # active `tapping` blocks, innermost last


def observe(part: str, h: jax.Array, std: jax.Array | None = None) -> jax.Array:
    """Report the std of a part's output (or the given per-layer stds) to an active
    `activation_stds` call; returns h unchanged."""
    if _RECORDERS:
        _RECORDERS[-1][part] = jnp.std(h) if std is None else std
    return h


def tap(name: str, value: jax.Array) -> None:
    """Report a value of the forward pass to the innermost active `tapping` block (a layer of a
    stack reports to `scan_layers`, which reports the values of all its layers, stacked)."""
    if _TAPS:
        _TAPS[-1][name] = value


@contextlib.contextmanager
def tapping():
    """Collect, in the dict it yields, what the calls inside report with `tap`: values of the
    caller's own trace, which it may return from the function it traces (the training step returns
    them beside the loss, from the forward pass the gradient takes). Outside a block, `tap`
    records nothing."""
    taps: dict[str, jax.Array] = {}
    _TAPS.append(taps)
    try:
        yield taps
    finally:
        _TAPS.pop()


def residual_blocks(model: nnx.Module) -> list[tuple[nnx.Module, int]]:
    """The modules holding the model's residual blocks (see the module docstring), each with the
    number of blocks it holds (the length of its leading axis if stacked, else 1)."""
    out = []
    for part in getattr(model, "residual_parts", ()):
        module = getattr(model, part)
        if module is None:  # an empty stack
            continue
        stacked = part in getattr(model, "stacked_layers", ())
        out.append((module, jax.tree.leaves(nnx.state(module, nnx.Param))[0].shape[0]
                    if stacked else 1))
    return out


def scan_layers(model: nnx.Module, part: str, h: jax.Array, *args) -> jax.Array:
    """Apply a stack of identical layers (leading layer axis) in order with lax.scan:
    h = layer(h, *args) for each layer; `args` (e.g. an attention mask) are shared by all layers.

    Plain jax.lax.scan over the split state, rather than nnx.scan, so the model can be called under
    any outer transformation; state a layer mutates (batch statistics) is written back.
    """
    stack = getattr(model, part)
    graphdef, state = nnx.split(stack)
    tapped = bool(_TAPS)

    def body(carry, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        # a layer's taps are values of the scan's trace: they leave it as the scan's outputs
        with tapping() if tapped else contextlib.nullcontext({}) as taps:
            out = layer(carry, *args)
        return out, (nnx.state(layer, MUTABLE), jnp.std(out), taps)

    h, (new_state, stds, taps) = jax.lax.scan(body, h, state)
    if jax.tree.leaves(new_state):
        nnx.update(stack, new_state)
    for name, value in taps.items():
        tap(name, value)
    return observe(part, h, stds)


# Model state that training carries and updates besides the parameters (e.g. batch statistics).
MUTABLE = nnx.Not(nnx.Param)

NORMS = ("none", "layer", "batch")
BATCHNORM_MOMENTUM = 0.9  # running statistics settle within the short runs of a benchmark


def make_norm(kind: str, features: int, rngs: nnx.Rngs, reduction_axes=-1) -> nnx.Module | None:
    """A normalization layer over the trailing feature axis: LayerNorm over `reduction_axes` (e.g.
    (-3, -2, -1) for images), BatchNorm over every other axis (statistics of the batch in training,
    running averages after `model.eval()`), or None."""
    if kind == "layer":
        return nnx.LayerNorm(features, reduction_axes=reduction_axes, rngs=rngs)
    if kind == "batch":
        return nnx.BatchNorm(features, momentum=BATCHNORM_MOMENTUM, rngs=rngs)
    if kind != "none":
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")
    return None


def branch_gain_param(value: float | None) -> nnx.Param | None:
    """A block's learnable scalar on its residual branches (see the module docstring), or None."""
    return None if value is None else nnx.Param(jnp.asarray(value, jnp.float32))


def gained(gain: nnx.Param | None, branch: jax.Array) -> jax.Array:
    """The branch multiplied by its block's gain, when the block has one."""
    return branch if gain is None else gain[...] * branch


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """Logits soft-capped to (-cap, cap): cap * tanh(x / cap), about x where |x| << cap."""
    return cap * jnp.tanh(x / cap)


def activation_stds(model: nnx.Module, x: jax.Array, layout: LayerLayout) -> jax.Array:
    """Per-layer activation std of one forward pass, in the layout's layer order."""
    recorded: dict[str, jax.Array] = {}
    _RECORDERS.append(recorded)
    try:
        model(x)
    finally:
        _RECORDERS.pop()
    return layout.observed(recorded)


def key_names(path) -> tuple:
    """The dict keys and sequence indices along a pytree key path, without its attribute steps
    (an nnx Variable's `.value`): ('blocks', 0, 'kernel')."""
    return tuple(k.idx if isinstance(k, jax.tree_util.SequenceKey) else k.key
                 for k in path if not isinstance(k, jax.tree_util.GetAttrKey))


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _shape(leaf) -> tuple[int, ...]:
    return tuple(_value(leaf).shape)

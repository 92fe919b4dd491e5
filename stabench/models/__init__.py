"""Model registry and the per-layer view of a model's parameters that telemetry reports.

A model factory takes the task's model arguments and returns a builder
`(meta, kernel_init, rngs) -> nnx.Module`. Every model names its top-level parts in depth order
(`layer_order`); parts listed in `stacked_layers` hold a leading layer axis (built with nnx.vmap and
applied with nnx.scan), so each index along it is one layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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
        for key, idx in self._groups:
            label = "/".join(map(str, key))
            if key[0] in stacked:
                depth = _shape(leaves[idx[0]])[0]
                self.names += [f"{label}[{d}]" for d in range(depth)]
            else:
                self.names.append(label)

    def __len__(self) -> int:
        return len(self.names)

    def sq_norms(self, tree: Any) -> jax.Array:
        """Squared L2 norm of each layer's leaves, shape [layers]."""
        leaves = [v for _, v in nnx.to_flat_state(tree)]
        out = []
        for key, idx in self._groups:
            if key[0] in self._stacked:
                out.append(sum(jnp.sum(jnp.square(_value(leaves[i])).reshape(
                    _shape(leaves[i])[0], -1), axis=1) for i in idx))
            else:
                out.append(jnp.reshape(sum(jnp.sum(jnp.square(_value(leaves[i]))) for i in idx), (1,)))
        return jnp.concatenate(out)

    def norms(self, tree: Any) -> jax.Array:
        return jnp.sqrt(self.sq_norms(tree))


def scan_layers(stack: nnx.Module, h: jax.Array) -> jax.Array:
    """Apply a stack of identical layers (leading layer axis) in order with lax.scan.

    Plain jax.lax.scan over the split state, rather than nnx.scan, so the model can be called under
    any outer transformation; state a layer mutates (batch statistics) is written back.
    """
    graphdef, state = nnx.split(stack)

    def body(carry, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        out = layer(carry)
        return out, nnx.state(layer, nnx.Not(nnx.Param))

    h, new_state = jax.lax.scan(body, h, state)
    if jax.tree.leaves(new_state):
        nnx.update(stack, new_state)
    return h


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _shape(leaf) -> tuple[int, ...]:
    return tuple(_value(leaf).shape)


from . import mlp  # noqa: E402,F401  (registers the models)

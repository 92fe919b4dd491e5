"""Method registry: stabilization techniques as optax gradient transformations.

A method string composes registered methods with '+', applied in the written order to the gradient
before the optimizer: `warmup(steps=200)+clip_norm(max_norm=1)`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from .registry import Call, Registry, UserError, split_plus

METHODS = Registry("method")


@METHODS.register("none", help="no stabilization: the optimizer sees the raw gradient")
def none() -> optax.GradientTransformation:
    return optax.identity()


@METHODS.register("clip_norm", help="rescale the gradient so its global L2 norm is <= max_norm",
                  ref="Pascanu et al. 2013")
def clip_norm(max_norm: float = 1.0) -> optax.GradientTransformation:
    if max_norm <= 0:
        raise ValueError("max_norm must be positive")
    return optax.clip_by_global_norm(max_norm)


@METHODS.register("clip_value", help="clip every gradient element to [-limit, limit]",
                  ref="Mikolov 2012")
def clip_value(limit: float = 1.0) -> optax.GradientTransformation:
    if limit <= 0:
        raise ValueError("limit must be positive")
    return optax.clip(limit)


def resolve(spec: str) -> tuple[Call, ...]:
    """Parse a '+'-composed method string; every term validated against its factory."""
    return tuple(METHODS.resolve(term) for term in split_plus(spec))


def canonical(calls: tuple[Call, ...]) -> str:
    return "+".join(str(c) for c in calls)


def build(calls: tuple[Call, ...]) -> optax.GradientTransformation:
    """The gradient transformation the methods apply, in order, before the optimizer."""
    return optax.chain(*(METHODS.build(c) for c in calls))


# ---- fault injection: plants a known failure so detectors (diagnose) can be tested ------------
def _layer_key(layer: str) -> tuple[tuple, int | None]:
    """A layer name as telemetry prints it (`head`, `blocks[3]`, `layers/2`): the parameter path
    prefix and the index along a stacked part's leading axis (None if not stacked)."""
    match = re.fullmatch(r"([^\[\]]+?)(?:\[(\d+)\])?", layer)
    if match is None:
        raise ValueError(f"layer '{layer}' is not a layer name like head, blocks[3] or layers/2")
    prefix = tuple(int(p) if p.isdigit() else p for p in match[1].split("/"))
    return prefix, None if match[2] is None else int(match[2])


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


@METHODS.register("inject_spike", help="fault injection for testing detectors, not a stabilizer: "
                  "multiplies the gradient of `layer` (all layers if '') by `factor` for `steps` "
                  "steps from step `step`")
def inject_spike(step: int = 100, factor: float = 100.0, layer: str = "",
                 steps: int = 1) -> optax.GradientTransformation:
    if step < 0 or steps <= 0:
        raise ValueError("step must be >= 0 and steps positive")
    target = _layer_key(layer) if layer else None

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        on = (state.count >= step) & (state.count < step + steps)
        scale = jnp.where(on, factor, 1.0)
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        hit = False
        out = []
        for path, g in flat:
            names = _path_names(path)
            if target is None:
                out.append(g * scale)
                hit = True
            elif names[:len(target[0])] == target[0]:
                if target[1] is None:
                    out.append(g * scale)
                elif target[1] < g.shape[0]:
                    mask = (jnp.arange(g.shape[0]) == target[1]).reshape(-1, *[1] * (g.ndim - 1))
                    out.append(jnp.where(mask, g * scale, g))
                else:
                    out.append(g)
                    continue
                hit = True
            else:
                out.append(g)
        if not hit:
            raise UserError(f"inject_spike: the model has no layer '{layer}'")
        return jax.tree_util.tree_unflatten(treedef, out), optax.ScaleByScheduleState(
            count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)

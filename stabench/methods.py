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
    built = [METHODS.build(c) for c in calls if not _is_fault(c)]
    return optax.chain(*built) if built else optax.identity()


def _is_fault(call: Call) -> bool:
    return METHODS.entry(call.name).meta.get("fault", False)


def build_fault(calls: tuple[Call, ...]):
    """The planted faults of a method string as one `(grads, step) -> grads`, or None."""
    faults = [METHODS.build(c) for c in calls if _is_fault(c)]
    if not faults:
        return None

    def apply(grads, step):
        for fault in faults:
            grads = fault(grads, step)
        return grads

    return apply


# ---- fault injection: plants a known failure so detectors (diagnose) can be tested ------------
# Not stabilizers. `inject_spike` corrupts the gradient as computed, before the engine records it
# (a "fault": the factory returns (grads, step) -> grads), so its layer is the one whose recorded
# norm jumps; `inject_lr_spike` scales what the optimizer gets, like a too-large learning rate, and
# shows up in the recorded gradients only through its effect on the parameters.
def _layer_key(layer: str) -> tuple[tuple, int | None]:
    """A layer name as telemetry prints it (`head`, `blocks[3]`, `layers/2`): the parameter path
    prefix and the index along a stacked part's leading axis (None if not stacked)."""
    match = re.fullmatch(r"([^\[\]]+?)(?:\[(\d+)\])?", layer)
    if match is None:
        raise ValueError(f"layer '{layer}' is not a layer name like head, blocks[3] or layers/2")
    prefix = tuple(int(p) if p.isdigit() else p for p in match[1].split("/"))
    return prefix, None if match[2] is None else int(match[2])


def _scale_layer(tree, layer: str, on: jax.Array, factor: float):
    """Multiply the leaves of one layer (every leaf if layer is '') by factor where `on`; elsewhere
    the leaves pass through untouched (selected, not multiplied by 1)."""
    target = _layer_key(layer) if layer else None
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out, hit, parts = [], False, set()
    for path, g in flat:
        names = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        parts.add(str(names[0]))
        if target is None or (names[:len(target[0])] == target[0] and target[1] is None):
            g, hit = jnp.where(on, g * factor, g), True
        elif names[:len(target[0])] == target[0] and g.ndim and target[1] < g.shape[0]:
            row = (jnp.arange(g.shape[0]) == target[1]).reshape(-1, *[1] * (g.ndim - 1))
            g, hit = jnp.where(on & row, g * factor, g), True
        out.append(g)
    if not hit:
        raise UserError(f"layer '{layer}' is not a layer of this model; its parts are "
                        f"{', '.join(sorted(parts))} (a stacked part takes an index: name[0])")
    return jax.tree_util.tree_unflatten(treedef, out)


def _spike_args(step: int, factor: float, steps: int) -> None:
    if step < 0 or steps <= 0 or not factor > 0:
        raise ValueError("step must be >= 0, steps and factor positive")


@METHODS.register("inject_spike", fault=True,
                  help="fault injection to test detectors, not a stabilizer: multiplies the computed "
                       "gradient of `layer` ('' = all) by `factor` for `steps` steps from `step`")
def inject_spike(step: int = 100, factor: float = 100.0, layer: str = "", steps: int = 1):
    _spike_args(step, factor, steps)
    if layer:
        _layer_key(layer)  # a malformed name fails now, not when the cell compiles

    def fault(grads, t):
        return _scale_layer(grads, layer, (t >= step) & (t < step + steps), factor)

    return fault


@METHODS.register("inject_lr_spike",
                  help="fault injection to test detectors, not a stabilizer: multiplies the gradient "
                       "the optimizer gets for `layer` ('' = all) by `factor` for `steps` steps from "
                       "`step` (a learning-rate spike, for SGD)")
def inject_lr_spike(step: int = 100, factor: float = 100.0, layer: str = "",
                    steps: int = 1) -> optax.GradientTransformation:
    _spike_args(step, factor, steps)
    if layer:
        _layer_key(layer)  # a malformed name fails now, not when the cell compiles

    def update(updates, state, params=None):
        on = (state.count >= step) & (state.count < step + steps)
        return _scale_layer(updates, layer, on, factor), optax.ScaleByScheduleState(
            count=optax.safe_increment(state.count))

    return optax.GradientTransformation(
        lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), update)

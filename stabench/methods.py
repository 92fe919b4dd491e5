"""Method registry: stabilization techniques as optax gradient transformations.

A method string composes registered methods with '+', applied in the written order to the gradient
before the optimizer: `warmup(steps=200)+clip_norm(max_norm=1)`.
"""

from __future__ import annotations

import optax

from .registry import Call, Registry, split_plus

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

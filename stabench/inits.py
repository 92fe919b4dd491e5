"""Init registry. An init gives a kernel initializer used by every layer of the model
(None keeps each layer's own default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax

from .registry import Registry

INITS = Registry("init")


@dataclass(frozen=True)
class Init:
    kernel_init: Callable | None


@INITS.register("default", help="each layer's own default (Flax: LeCun normal kernels, zero biases)")
def default() -> Init:
    return Init(None)


@INITS.register("lecun_normal", help="truncated normal, Var = 1/fan_in", ref="LeCun et al. 1998")
def lecun_normal() -> Init:
    return Init(jax.nn.initializers.lecun_normal())


@INITS.register("glorot_normal", help="truncated normal, Var = 2/(fan_in+fan_out)",
                ref="Glorot & Bengio 2010")
def glorot_normal() -> Init:
    return Init(jax.nn.initializers.glorot_normal())


@INITS.register("he_normal", help="truncated normal, Var = 2/fan_in (ReLU nets)",
                ref="He et al. 2015")
def he_normal() -> Init:
    return Init(jax.nn.initializers.he_normal())


@INITS.register("normal", help="naive fixed-scale baseline: N(0, std^2) whatever the width")
def normal(std: float = 0.01) -> Init:
    if std <= 0:
        raise ValueError("std must be positive")
    return Init(jax.nn.initializers.normal(stddev=std))

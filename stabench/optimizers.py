"""Optimizer registry. A factory returns `lr -> optax.GradientTransformation`, so the learning
rate can be a traced value that differs per vmapped run."""

from __future__ import annotations

import optax

from .registry import Registry

OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("sgd", help="stochastic gradient descent with optional (Nesterov) momentum",
                     ref="Robbins & Monro 1951; Polyak 1964; Nesterov 1983")
def sgd(momentum: float = 0.0, nesterov: bool = False):
    if not 0.0 <= momentum < 1.0:
        raise ValueError("momentum must lie in [0, 1)")
    return lambda lr: optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)


@OPTIMIZERS.register("adam", help="Adam: bias-corrected first and second moment estimates",
                     ref="Kingma & Ba 2015")
def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    return lambda lr: optax.adam(lr, b1=b1, b2=b2, eps=eps)

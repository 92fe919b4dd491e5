"""Optimizer registry. A factory returns an `Optimizer`: the optimizer's step direction, applied
before the learning rate, and what follows the learning rate (a line search). Calling it with a
learning rate gives the whole optax transformation, so the learning rate can be a traced value that
differs per vmapped run, and methods can act on the direction before the learning rate scales it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import optax

from .registry import Registry

OPTIMIZERS = Registry("optimizer")


@dataclass(frozen=True)
class Optimizer:
    direction: optax.GradientTransformation  # gradient -> step direction (learning rate 1, no sign)
    after_lr: optax.GradientTransformation = field(default_factory=optax.identity)
    needs_value: bool = False  # update() also takes value, grad and value_fn (line searches)

    def __call__(self, lr) -> optax.GradientTransformationExtraArgs:
        return optax.chain(self.direction, optax.scale_by_learning_rate(lr), self.after_lr)


def _unit_interval(name: str, value: float, closed: bool = False) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must lie in [0, 1{']' if closed else ')'}")


def check_positive(**values) -> None:
    """Each argument named must be positive (the methods' factories check theirs with it too)."""
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):  # a method's traced argument has no value yet
            continue
        if not value > 0:
            raise ValueError(f"{name} must be positive")


@OPTIMIZERS.register("sgd", help="stochastic gradient descent with optional (Nesterov) momentum",
                     ref="Robbins & Monro 1951; Polyak 1964; Nesterov 1983 (Sutskever et al. 2013)")
def sgd(momentum: float = 0.0, nesterov: bool = False) -> Optimizer:
    _unit_interval("momentum", momentum)
    if nesterov and momentum == 0:
        raise ValueError("nesterov needs a positive momentum")
    return Optimizer(optax.trace(momentum, nesterov) if momentum else optax.identity())


@OPTIMIZERS.register("adam", help="Adam: bias-corrected first and second moment estimates",
                     ref="Kingma & Ba 2015")
def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    _unit_interval("b1", b1)
    _unit_interval("b2", b2)
    check_positive(eps=eps)
    return Optimizer(optax.scale_by_adam(b1, b2, eps))


@OPTIMIZERS.register("adamw", help="Adam with decoupled weight decay (decay scaled by the lr)",
                     ref="Loshchilov & Hutter 2019")
def adamw(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-4) -> Optimizer:
    _unit_interval("b1", b1)
    _unit_interval("b2", b2)
    check_positive(eps=eps)
    if weight_decay < 0:
        raise ValueError("weight_decay must be >= 0")
    return Optimizer(optax.chain(optax.scale_by_adam(b1, b2, eps),
                                 optax.add_decayed_weights(weight_decay)))


@OPTIMIZERS.register("rmsprop", help="divide by a running root mean square of the gradient",
                     ref="Tieleman & Hinton 2012 (Lecture 6.5)")
def rmsprop(decay: float = 0.9, eps: float = 1e-8, centered: bool = False) -> Optimizer:
    _unit_interval("decay", decay)
    check_positive(eps=eps)
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    return Optimizer(scale(decay=decay, eps=eps))


@OPTIMIZERS.register("adagrad", help="divide by the root of the sum of all squared gradients",
                     ref="Duchi et al. 2011")
def adagrad(initial_accumulator: float = 0.1, eps: float = 1e-7) -> Optimizer:
    if initial_accumulator < 0:
        raise ValueError("initial_accumulator must be >= 0")
    check_positive(eps=eps)
    return Optimizer(optax.scale_by_rss(initial_accumulator, eps))


@OPTIMIZERS.register("lbfgs", help="limited-memory BFGS with a zoom line search on each batch "
                     "(the lr scales the step the search starts from)",
                     ref="Liu & Nocedal 1989; Nocedal & Wright 2006 (Alg. 3.5, 7.4)")
def lbfgs(memory: int = 10, linesearch_steps: int = 20) -> Optimizer:
    if memory <= 0 or linesearch_steps <= 0:
        raise ValueError("memory and linesearch_steps must be positive")
    return Optimizer(optax.scale_by_lbfgs(memory_size=memory),
                     optax.scale_by_zoom_linesearch(linesearch_steps,
                                                   initial_guess_strategy="one"),
                     needs_value=True)

"""The cell program: the pure per-run functions the engine vmaps over runs and scans over steps.

A run initializes its model from its seed (`init_run`), takes training steps that record their
telemetry and freeze the run at its first non-finite step (`step`), and is evaluated on the test
set (`evaluate`). Nothing here compiles, groups runs or touches the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .methods import CellTransform
from .models import MUTABLE, LayerLayout

RUNS = "runs"  # the vmapped axis of runs, named so that a group of runs can branch together
TELEMETRY = ("loss", "grad_norm", "grad_norm_post", "update_norm", "param_norm", "nonfinite",
             "changed", "layer_grad_norm")


@dataclass(frozen=True)
class Cell:
    """What one compiled program trains: a model, its update (methods and optimizer), a loss."""

    build_model: Callable[[nnx.Rngs], nnx.Module]
    transform: CellTransform
    loss: str  # "cross_entropy" | "mse"
    steps: int
    batch_size: int
    eval_every: int
    # a planted error in the computed gradient, (grads, step) -> grads; for testing detectors
    fault: Callable[[Any, jax.Array], Any] | None = None
    # the init's hook, run on the new model with the run's first batch inside the init program
    after_init: Callable[[nnx.Module, jax.Array], None] | None = None


class Carry(NamedTuple):
    params: Any
    model_state: Any  # non-parameter model state, e.g. batch statistics
    opt_state: Any  # the state of the whole update: methods and optimizer (unused once a run ends)
    key: jax.Array  # the run's key for its update (e.g. gradient noise)
    alive: jax.Array  # False once the run hit a non-finite step it did not skip, or state
    diverged_at: jax.Array  # step of that event, -1 if none


def loss_and_metrics(kind: str, out: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and per-example score (correctness, or squared error for regression)."""
    if kind == "cross_entropy":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return loss, (jnp.argmax(out, -1) == y).astype(jnp.float32)
    pred = out.reshape(y.shape)
    err = jnp.square(pred - y).reshape(y.shape[0], -1).mean(-1)
    return err, err


def new_state_finite(params, updates, updates_sq, state, keep, first, group=None) -> jax.Array:
    """Whether the new parameters (params + updates) and the new `state` are finite in every
    floating-point leaf (counters and random keys are skipped).
    Exact: x * 0 is 0 for finite x and NaN otherwise, summed as floats, which XLA on CPU
    vectorizes (a boolean reduction it does not). Within a group of runs vmapped under the axis
    name `group`, cheaper sums decide first, unless this is the `first` step (whose parameters are
    the init's, not known to be finite): the squared norm of the updates is finite only if every
    |u| < 2e19, and a finite p plus such a u is finite; a plain sum per state leaf is finite
    whenever every element is, unless it overflows. The exact check runs only in the rare step
    where some kept run of the group has a sum that is not finite, a branch the group takes
    together."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]

    def exact():
        new = jax.tree.leaves(optax.apply_updates(params, updates))
        return jnp.isfinite(sum((jnp.sum(x * 0) for x in new + leaves), jnp.float32(0)))

    if group is None:
        return exact()
    sums_finite = jnp.all(jnp.isfinite(jnp.stack([updates_sq] + [jnp.sum(x) for x in leaves])))
    unsure = (jax.lax.psum((keep & ~sums_finite).astype(jnp.int32), group) > 0) | first
    return jax.lax.cond(unsure, exact, lambda: sums_finite)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


class RunProgram:
    """The per-run functions of a cell. Subclasses may replace `step` (a benchmark of the
    training math alone does)."""

    def __init__(self, cell: Cell):
        self.cell = cell
        abstract = nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0)))
        self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, MUTABLE)
        self.layout = LayerLayout(abstract_params, abstract.layer_order,
                                  getattr(abstract, "stacked_layers", ()))

    def inputs(self, x, arrays):
        if "mean" in arrays:
            return (x.astype(jnp.float32) - arrays["mean"]) / arrays["std"]
        return x

    def initial_model(self, seed, x) -> nnx.Module:
        """The model a run of this seed starts from (x: its first training batch, which
        data-dependent inits calibrate on)."""
        model = self.cell.build_model(nnx.Rngs(jax.random.fold_in(jax.random.key(seed), 0)))
        if self.cell.after_init is not None:
            self.cell.after_init(model, x)
        return model

    def init_run(self, seed, lr, idx, arrays, values=None) -> Carry:
        model = self.initial_model(seed, self.inputs(arrays["x_train"][idx], arrays))
        _, params, model_state = nnx.split(model, nnx.Param, MUTABLE)
        update_key = jax.random.fold_in(jax.random.key(seed), 1)
        opt_state = self.cell.transform.build(lr, update_key, values).init(params)
        return Carry(params, model_state, opt_state, update_key, jnp.array(True),
                     jnp.array(-1, jnp.int32))

    def forward_loss(self, params, model_state, x, y):
        # copy: fresh variables at this trace level, so layers may update their batch statistics
        model = nnx.merge(self.graphdef, params, model_state, copy=True)
        loss, _ = loss_and_metrics(self.cell.loss, model(x), y)
        return loss.mean(), nnx.state(model, MUTABLE)

    def step(self, carry: Carry, t, idx, lr, arrays, values=None):
        cell = self.cell
        x, y = self.inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
        (loss, model_state), grads = jax.value_and_grad(self.forward_loss, has_aux=True)(
            carry.params, carry.model_state, x, y)
        if cell.fault is not None:
            grads = cell.fault(grads, t)
        extra = {}
        if cell.transform.needs_value:  # line searches evaluate the loss on this batch
            extra = {"value": loss, "grad": grads,
                     "value_fn": lambda p: self.forward_loss(p, carry.model_state, x, y)[0]}
        updates, opt_state = cell.transform.build(lr, carry.key, values).update(
            grads, carry.opt_state, carry.params, **extra)
        seen = cell.transform.observe(carry.opt_state, opt_state)
        model_state = jax.tree.map(lambda old, new: jnp.where(seen.skipped, old, new),
                                   carry.model_state, model_state)

        grad_norm = optax.tree.norm(grads)
        updates_sq = optax.tree.norm(updates, squared=True)
        in_range = t < cell.steps
        keep = carry.alive & in_range
        # A non-finite loss or gradient ends the run unless a method skipped the step; so does
        # any non-finite parameter or state. The runs of a group (on one device) check their
        # state together.
        finite = ((jnp.isfinite(loss) & jnp.isfinite(grad_norm)) | seen.skipped) & (
            new_state_finite(carry.params, updates, updates_sq, (model_state, opt_state), keep,
                              t == 0, RUNS))
        accept = keep & finite
        # Parameters and model state stay as of a run's last accepted step: evaluation reads
        # them. The optimizer state is not frozen: a step is rejected only when its run ends,
        # and nothing reads an ended run's optimizer state (the select would cost a pass over it).
        # The new parameters feed only this select, which XLA fuses into the update.
        frozen = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        merged = Carry(
            jax.tree.map(frozen, optax.apply_updates(carry.params, updates), carry.params),
            jax.tree.map(frozen, model_state, carry.model_state), opt_state, carry.key,
            alive=carry.alive & (finite | ~in_range),
            diverged_at=jnp.where(keep & ~finite, t, carry.diverged_at).astype(jnp.int32))

        nan = jnp.float32(jnp.nan)  # the optimizer took no update: nothing seen, nothing changed
        record = {
            "loss": loss, "grad_norm": grad_norm,
            "grad_norm_post": jnp.where(seen.ran, seen.seen_norm, nan),
            "update_norm": jnp.sqrt(updates_sq), "param_norm": optax.tree.norm(merged.params),
            "nonfinite": (~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm)).astype(jnp.float32),
            # a skipped step counts as changed: the methods dropped the gradient
            "changed": jnp.where(seen.ran, seen.changed, jnp.where(seen.skipped, 1.0, nan)),
            "layer_grad_norm": self.layout.norms(grads),
        }
        record = {k: jnp.where(keep, v, jnp.nan).astype(jnp.float32) for k, v in record.items()}
        return merged, record

    def evaluate(self, carry: Carry, arrays):
        def one_batch(batch):
            x, y, w = batch
            # inside: nnx needs one trace level; copy as in _forward_loss
            model = nnx.merge(self.graphdef, carry.params, carry.model_state, copy=True)
            model.eval()
            loss, score = loss_and_metrics(self.cell.loss, model(self.inputs(x, arrays)), y)
            return jnp.sum(loss * w), jnp.sum(score * w)

        loss_sum, score_sum = jax.lax.map(one_batch, (arrays["x_test"], arrays["y_test"],
                                                      arrays["w_test"]))
        n = jnp.sum(arrays["w_test"])
        alive = lambda v: jnp.where(carry.alive, v, jnp.nan)  # noqa: E731
        out = {"test_loss": alive(loss_sum.sum() / n)}
        if self.cell.loss == "cross_entropy":
            out["test_accuracy"] = alive(score_sum.sum() / n)
        return out

    def run_bytes(self, arrays) -> int:
        """Bytes one run touches in a training step: the activations its backward pass keeps,
        its parameters four times over (parameters, gradient, update, new parameters) and its
        optimizer state."""
        i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
        idx = jax.ShapeDtypeStruct((self.cell.batch_size,), jnp.int32)
        carry = jax.eval_shape(self.init_run, i32, f32, idx, arrays)

        def residuals(carry, idx, arrays):
            x, y = self.inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
            return jax.vjp(lambda p: self.forward_loss(p, carry.model_state, x, y), carry.params,
                           has_aux=True)[1]

        kept = jax.eval_shape(residuals, carry, idx, arrays)
        return _nbytes(kept) + 4 * _nbytes(carry.params) + _nbytes(carry.opt_state)

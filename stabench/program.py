"""The cell program: the pure per-run functions the engine vmaps over runs and scans over steps.

A run initializes its model from its seed (`init_run`), takes training steps that record their
telemetry and freeze the run at its first non-finite step (`step`), and is evaluated on the
validation and test sets (`evaluate`). Nothing here compiles, groups runs or touches the host.
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

from . import curvature
from .methods import CellTransform
from .models import MUTABLE, LayerLayout, tap, tapping

RUNS = "runs"  # the vmapped axis of runs, named so that a group of runs can branch together
# what every step records, [steps] (layer_grad_norm: [steps, layers]); besides, classifiers
# record log_z, a Transformer attn_logit_max ([steps, blocks]), and a cell with
# telemetry.sharpness_every its sharpness (and with Adam, precond_sharpness), NaN between estimates
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
    sharpness_every: int = 0  # steps between sharpness estimates; 0: none (no trace of it)
    adam: tuple[float, float, float] | None = None  # the optimizer's Adam (b1, b2, eps), if any
    # the forward and backward pass's dtype; parameters, optimizer state and loss stay float32
    compute_dtype: str = "float32"


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


def _scaled(f, scale):
    """A function returning (value, aux) with its value multiplied by `scale`."""
    def scaled(*args):
        value, aux = f(*args)
        return value * scale, aux

    return scaled


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

    def model(self, params, model_state) -> nnx.Module:
        """The model of these parameters and state, computing in the compute dtype. A copy: fresh
        variables at the caller's trace level, so layers may update their batch statistics."""
        model = nnx.merge(self.graphdef, self._compute(params), model_state, copy=True)
        if self._compute_dtype != jnp.float32:
            # batch norm normalizes in the compute dtype and keeps its statistics in float32
            for _, module in nnx.iter_modules(model):
                if isinstance(module, nnx.BatchNorm):
                    module.dtype = self._compute_dtype
        return model

    def logits(self, model: nnx.Module, x) -> jax.Array:
        """The model's output on x, computed in the compute dtype, as float32 and through the
        "model" methods' functions of it (soft-capping)."""
        out = model(self._compute(x)).astype(jnp.float32)
        for output in self.cell.transform.outputs:
            out = output(out)
        tap("logits", out)
        return out

    @property
    def _compute_dtype(self):
        return jnp.dtype(self.cell.compute_dtype)

    def _compute(self, tree):
        """The floating-point leaves of a tree in the compute dtype (unchanged in float32)."""
        dtype = self._compute_dtype
        if dtype == jnp.float32:
            return tree
        return jax.tree.map(
            lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree)

    def forward_loss(self, params, model_state, x, y):
        """The mean training loss of a batch ("loss" methods' terms included) and the new model
        state."""
        model = self.model(params, model_state)
        out = self.logits(model, x)
        loss, _ = loss_and_metrics(self.cell.loss, out, y)
        for term in self.cell.transform.loss_terms:
            loss = loss + term(out)
        return loss.mean(), nnx.state(model, MUTABLE)

    def tapped_forward_loss(self, params, model_state, x, y):
        """`forward_loss`, and the logit telemetry of its forward pass: `log_z`, the mean over the
        batch of the log-partition logsumexp(logits) of a classifier (of the logits the loss
        takes), and `attn_logit_max`, the largest |q.k|/sqrt(d) of each layer of a model that taps
        it (the Transformer)."""
        with tapping() as taps:
            loss, model_state = self.forward_loss(params, model_state, x, y)
        stats = {}
        if self.cell.loss == "cross_entropy":
            stats["log_z"] = jax.nn.logsumexp(taps["logits"], axis=-1).mean()
        if "attn_logit_max" in taps:
            stats["attn_logit_max"] = taps["attn_logit_max"].astype(jnp.float32)
        return loss, (model_state, stats)

    def sharpness(self, params, model_state, opt_state, t, arrays) -> dict[str, jax.Array]:
        """At steps t divisible by `sharpness_every` (NaN at the others, which skip it): λ_max of
        the Hessian of the training loss at `params` on the fixed batch (`curvature.fixed_batch`),
        and for Adam (`opt_state` after this step) λ_max(P^(-1) H) (`precond_sharpness`)."""
        cell = self.cell
        idx = curvature.fixed_batch(arrays["x_train"].shape[0], cell.batch_size)
        x, y = self.inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
        loss_fn = lambda p: self.forward_loss(p, model_state, x, y)[0]  # noqa: E731
        scales = {}
        adam = None if cell.adam is None else curvature.adam_state(opt_state, params)
        if adam is not None:
            scales["precond_sharpness"] = curvature.adam_inverse_sqrt_preconditioner(adam,
                                                                                     *cell.adam)

        def estimate():
            out = {"sharpness": curvature.sharpness(loss_fn, params)}
            out.update({k: curvature.sharpness(loss_fn, params, s) for k, s in scales.items()})
            return out

        def skip():
            return {k: jnp.float32(jnp.nan) for k in ("sharpness", *scales)}

        return jax.lax.cond(t % cell.sharpness_every == 0, estimate, skip)

    def step(self, carry: Carry, t, idx, lr, arrays, values=None):
        cell = self.cell
        x, y = self.inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
        scale = cell.transform.loss_scale(carry.opt_state)  # None: the loss is not scaled
        forward = self.tapped_forward_loss if scale is None else _scaled(self.tapped_forward_loss,
                                                                         scale)
        (loss, (model_state, logit_stats)), grads = jax.value_and_grad(forward, has_aux=True)(
            carry.params, carry.model_state, x, y)
        if scale is not None:  # a power of 2: unscaling is exact, what overflowed stays Inf
            loss, grads = loss / scale, jax.tree.map(lambda g: g / scale, grads)
        if cell.fault is not None:
            grads = cell.fault(grads, t)
        extra = {}
        if cell.transform.needs_value:  # line searches and SAM evaluate the loss on this batch
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
            **logit_stats,
        }
        if cell.sharpness_every:
            record.update(self.sharpness(carry.params, carry.model_state, opt_state, t, arrays))
        record = {k: jnp.where(keep, v, jnp.nan).astype(jnp.float32) for k, v in record.items()}
        return merged, record

    def evaluate(self, carry: Carry, arrays):
        """Loss (and accuracy for classifiers) on the test split and, where the data holds one,
        the validation split: `{split}_loss`, `{split}_accuracy`; NaN once the run has ended."""
        def one_batch(batch):
            x, y, w = batch
            model = self.model(carry.params, carry.model_state)  # inside: one trace level
            model.eval()
            out = self.logits(model, self.inputs(x, arrays))
            loss, score = loss_and_metrics(self.cell.loss, out, y)
            return jnp.sum(loss * w), jnp.sum(score * w)

        alive = lambda v: jnp.where(carry.alive, v, jnp.nan)  # noqa: E731
        out = {}
        for split in ("val", "test"):
            if f"x_{split}" not in arrays:
                continue
            batches = (arrays[f"x_{split}"], arrays[f"y_{split}"], arrays[f"w_{split}"])
            loss_sum, score_sum = jax.lax.map(one_batch, batches)
            n = jnp.sum(arrays[f"w_{split}"])
            out[f"{split}_loss"] = alive(loss_sum.sum() / n)
            if self.cell.loss == "cross_entropy":
                out[f"{split}_accuracy"] = alive(score_sum.sum() / n)
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

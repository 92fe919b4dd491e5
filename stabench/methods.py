"""Method registry: stabilization techniques as optax transformations, each placed by its stage.

A method string composes registered methods with '+': `warmup(steps=200)+clip_norm(max_norm=1)`.
Each entry's `stage` says where it acts in a training step:

- "pre": on the gradient, before the optimizer (clipping, centralization, gradient noise, LARS's
  trust ratio), in the written order. The engine reports the gradient norm after these
  (`grad_norm_post`, what the optimizer sees) and whether they changed the gradient (`changed`):
  by comparing every element, unless each method's state holds its own `changed` flag, and by
  measuring that norm, unless the last method's state holds it (`out_norm`). The global-norm
  clippers report both: whether they rescaled, and min(norm, threshold) (NaN for a non-finite
  norm), which spares the step two passes over every element.
- "direction": on the optimizer's step direction, before the learning rate scales it (LAMB's
  trust ratio, decoupled weight decay), in the written order.
- "post": multiplies the final update like a learning-rate multiplier (warmup, schedules);
  scaling the gradient instead would do nothing under Adam.
- "wrap": wraps the whole update (skipping steps, accumulating gradients); the first written is
  the outermost.
- "model": changes the model (`ModelChange`): arguments of its builder (attention soft-capping)
  or a function of its output logits, in training and evaluation alike (logit soft-capping).
- "loss": acts on the training loss (`LossChange`): a term added to each example's loss (z-loss),
  or a loss multiplier held in the update's state (dynamic loss scaling), whose wrapper encloses
  every other.
- "fault": plants an error in the computed gradient before the engine records it (fault injection
  for testing detectors, not a stabilizer): `build_fault`.

A factory returns a transformation, or a function of the run's `Context` that returns one, for
methods that need the number of optimizer updates, the run's own random key or the model's layers.

An entry's `traced` names its float arguments that may enter the compiled program as per-run inputs
(`CellTransform.build(..., values)`), like the learning rate: runs of one program may then differ in
them, so a search over them compiles once. A factory checks such an argument only when it is a
number; a traced value was checked as a number when its run's spec was made. An entry's
`needs_value` says its update evaluates the loss: it takes `value_fn` (params -> the batch's loss)
as line searches do.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .models import key_names, softcap
from .optimizers import Optimizer, check_positive
from .registry import Call, Registry, UserError, split_plus

METHODS = Registry("method")
STAGES = ("fault", "model", "loss", "pre", "direction", "post", "wrap")


@dataclass(frozen=True)
class Context:
    """What a method may need beyond its arguments, known once a run is built."""

    steps: int  # optimizer updates in the run (training steps over gradient accumulation)
    key: jax.Array  # the run's own random key
    layer_order: tuple[str, ...] = ()  # the model's top-level parts in depth order
    stacked: tuple[str, ...] = ()  # parts holding one layer per index of a leading axis


@dataclass(frozen=True)
class Wrap:
    """A method that wraps the whole update: `wrap(inner)` is the wrapping transformation."""

    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation]
    inner: Callable[[Any], Any]  # this wrapper's state -> the wrapped update's state
    holds: Callable[[Any, Any], jax.Array] | None = None  # (old, new) state: took a micro-step
    every: int = 1  # training steps per optimizer update


@dataclass(frozen=True)
class SeesGradient:
    """A "direction" method that also takes the gradient the optimizer stepped on:
    `tx.update(direction, state, params, gradient=g)`."""

    tx: optax.GradientTransformationExtraArgs


@dataclass(frozen=True)
class ModelChange:
    """A "model" method: arguments its model's builder must take (`args`), and a function of the
    model's output logits (`output`; classifiers only)."""

    args: tuple[tuple[str, Any], ...] = ()
    output: Callable[[jax.Array], jax.Array] | None = None


@dataclass(frozen=True)
class LossChange:
    """A "loss" method: a term of the output logits added to each example's loss (`term`;
    classifiers only), or a multiplier of the loss read from the update's state (`scale`) by the
    program, which divides the gradient by it before anything sees it, with the wrapper that keeps
    it (`wrap`, enclosing every other)."""

    term: Callable[[jax.Array], jax.Array] | None = None
    scale: Callable[[Any], jax.Array] | None = None
    wrap: Wrap | None = None


class Observation(NamedTuple):
    ran: jax.Array  # the optimizer took an update this step
    seen_norm: jax.Array  # global norm of the gradient it saw (after the "pre" methods)
    changed: jax.Array  # the "pre" methods changed the gradient
    skipped: jax.Array  # a wrapper dropped this step (parameters and model state unchanged)


class ObservedState(NamedTuple):
    inner: Any
    count: jax.Array
    seen_norm: jax.Array
    changed: jax.Array


def any_changed(a, b) -> jax.Array:
    """Whether any element differs (NaN in both counts as unchanged). The differences are
    counted as a float sum: XLA on CPU vectorizes float reductions, not boolean ones."""
    def differences(x, y):
        return jnp.sum(jnp.where((x != y) & ~(jnp.isnan(x) & jnp.isnan(y)), 1.0, 0.0))

    return sum(differences(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) > 0


def _observed(inner: optax.GradientTransformation | None) -> optax.GradientTransformationExtraArgs:
    """The "pre" methods (None: there are none), recording in their state what the optimizer saw
    on its last update."""
    identity = inner is None
    inner = optax.with_extra_args_support(inner or optax.identity())

    def init(params):
        return ObservedState(inner.init(params), jnp.zeros([], jnp.int32), jnp.zeros([]),
                             jnp.zeros([], bool))

    def update(updates, state, params=None, **extra):
        out, inner_state = inner.update(updates, state.inner, params, **extra)
        # comparing every element costs ~3% of a step: skipped without methods, and when every
        # method's state says itself whether it changed the gradient (a `changed` field)
        reported = [s.changed for s in inner_state if "changed" in getattr(s, "_fields", ())]
        if identity:
            changed = jnp.zeros([], bool)
        elif len(reported) == len(inner_state):
            changed = functools.reduce(jnp.logical_or, reported)
        else:
            changed = any_changed(updates, out)
        # likewise the norm of what the optimizer sees: the last method's `out_norm` if it has one
        last = inner_state[-1] if len(inner_state) else None
        seen = last.out_norm if "out_norm" in getattr(last, "_fields", ()) else optax.tree.norm(out)
        return out, ObservedState(inner_state, state.count + 1, seen, changed)

    return optax.GradientTransformationExtraArgs(init, update)


def _seeing_gradient(direction: list) -> optax.GradientTransformation:
    """The optimizer's direction and the direction methods after it, in order, as one
    transformation: each `SeesGradient` method also gets the gradient the optimizer stepped on."""
    txs = [m.tx if isinstance(m, SeesGradient) else m for m in direction]

    def update(updates, state, params=None):
        gradient, states = updates, []
        for method, tx, s in zip(direction, txs, state):
            seen = {"gradient": gradient} if isinstance(method, SeesGradient) else {}
            updates, s = tx.update(updates, s, params, **seen)
            states.append(s)
        return updates, tuple(states)

    return optax.GradientTransformation(lambda params: tuple(tx.init(params) for tx in txs),
                                        update)


@dataclass(frozen=True)
class Traced:
    """A method whose traced arguments are inputs of the program: built per run from its values."""

    call: Call
    slots: tuple[tuple[str, int], ...]  # (argument, index into the run's values)

    def build(self, values):
        kwargs = {**dict(self.call.kwargs), **{arg: values[i] for arg, i in self.slots}}
        return METHODS.entry(self.call.name).factory(**kwargs)


def traced_args(call: Call) -> tuple[str, ...]:
    """The arguments of a method call that the compiled program may take as inputs."""
    return METHODS.entry(call.name).meta.get("traced", ())


def traced_values(calls: tuple[Call, ...]) -> tuple[float, ...]:
    """The values of the traced arguments of a method string's calls, in slot order."""
    return tuple(float(dict(c.kwargs)[a])
                 for c in calls if not _is_fault(c) for a in traced_args(c))


@dataclass(frozen=True)
class CellTransform:
    """A cell's whole update: wrappers around (pre methods, the optimizer's direction, direction
    methods, learning rate, the optimizer's line search, post multipliers)."""

    stages: dict[str, tuple]  # stage -> built methods in the written order
    optimizer: Optimizer
    steps: int  # training steps of a run
    layer_order: tuple[str, ...] = ()
    stacked: tuple[str, ...] = ()
    values: tuple[float, ...] = ()  # the traced arguments' own values, in slot order
    method_values: bool = False  # a method's update evaluates the loss (`needs_value`)

    @property
    def needs_value(self) -> bool:
        return self.optimizer.needs_value or self.method_values

    @property
    def wrappers(self) -> tuple[Wrap, ...]:
        """Every wrapper of the update, the outermost first: the loss scaler's, then the "wrap"
        methods'."""
        return tuple(m.wrap for m in self.stages["loss"] if m.wrap is not None) + \
            self.stages["wrap"]

    @property
    def updates(self) -> int:
        """Optimizer updates in a run: training steps over the accumulated micro-steps."""
        return self.steps // math.prod(w.every for w in self.wrappers)

    @property
    def loss_terms(self) -> tuple[Callable[[jax.Array], jax.Array], ...]:
        return tuple(m.term for m in self.stages["loss"] if m.term is not None)

    @property
    def outputs(self) -> tuple[Callable[[jax.Array], jax.Array], ...]:
        """The "model" methods' functions of the output logits, in the written order."""
        return tuple(m.output for m in self.stages["model"] if m.output is not None)

    def loss_scale(self, state) -> jax.Array | None:
        """The multiplier of the loss in this update's state (None: the loss is not scaled). The
        scaler's wrapper is the outermost (`transform` allows one), so `state` is its own."""
        scalers = [m for m in self.stages["loss"] if m.scale is not None]
        return scalers[0].scale(state) if scalers else None

    def build(self, lr, key: jax.Array, values=None) -> optax.GradientTransformationExtraArgs:
        """The update for learning rate `lr` and traced-argument values `values` (a traced
        [len(self.values)] array; None: the spec's own values, constants of the program)."""
        ctx = Context(self.updates, key, self.layer_order, self.stacked)
        values = self.values if values is None else values

        def make(m):
            m = m.build(values) if isinstance(m, Traced) else m
            return m(ctx) if callable(m) else m

        made = {stage: [make(m) for m in self.stages[stage]]
                for stage in ("pre", "direction", "post")}
        pre = [m for m in made["pre"] if m is not UNCHANGED]
        pre = optax.chain(*pre) if pre else None
        direction = [self.optimizer.direction, *made["direction"]]
        if any(isinstance(m, SeesGradient) for m in made["direction"]):
            direction = [_seeing_gradient(direction)]
        tx = optax.chain(_observed(pre), *direction, optax.scale_by_learning_rate(lr),
                         self.optimizer.after_lr, *made["post"])
        for wrapper in reversed(self.wrappers):
            tx = wrapper.wrap(tx)
        return tx

    def observe(self, old, new) -> Observation:
        """What the optimizer saw this step, from the update's state before and after it."""
        held = jnp.array(False)
        for wrapper in self.wrappers:
            if wrapper.holds is not None:
                held = held | wrapper.holds(old, new)
            old, new = wrapper.inner(old), wrapper.inner(new)
        ran = new[0].count != old[0].count
        return Observation(ran, new[0].seen_norm, new[0].changed, ~ran & ~held)


def resolve(spec: str) -> tuple[Call, ...]:
    """Parse a '+'-composed method string; every term validated against its factory."""
    return tuple(METHODS.resolve(term) for term in split_plus(spec))


def canonical(calls: tuple[Call, ...]) -> str:
    return "+".join(str(c) for c in calls)


def transform(calls: tuple[Call, ...], optimizer: Optimizer, steps: int,
              layer_order: tuple[str, ...] = (), stacked: tuple[str, ...] = ()) -> CellTransform:
    """The cell's update from its methods (each factory checks its arguments now) and optimizer;
    the methods' traced arguments become slots of the program's per-run values."""
    stages: dict[str, list] = {s: [] for s in STAGES if s != "fault"}
    slot = 0
    for call in calls:
        if _is_fault(call):  # faults act on the computed gradient: see build_fault
            continue
        built = METHODS.build(call)
        names = traced_args(call)
        if names:
            built = Traced(call, tuple((a, slot + i) for i, a in enumerate(names)))
            slot += len(names)
        stages[METHODS.entry(call.name).meta["stage"]].append(built)
    if sum(m.scale is not None for m in stages["loss"]) > 1:
        raise UserError(f"{canonical(calls)}: one loss scaler at most")
    takes_loss = any(METHODS.entry(c.name).meta.get("needs_value", False) for c in calls)
    cell = CellTransform({s: tuple(v) for s, v in stages.items()}, optimizer, steps,
                         tuple(layer_order), tuple(stacked), traced_values(calls), takes_loss)
    _check_acts(calls, cell)
    return cell


def model_args(calls: tuple[Call, ...]) -> tuple[tuple[str, Any], ...]:
    """The model arguments that a method string's "model" methods set."""
    return tuple(arg for c in calls if METHODS.entry(c.name).meta["stage"] == "model"
                 for arg in METHODS.build(c).args)


def _check_acts(calls: tuple[Call, ...], cell: CellTransform) -> None:
    """A method that cannot act within the run is a mistake: its cell would train as another."""
    if cell.updates == 0:
        every = math.prod(w.every for w in cell.wrappers)
        raise UserError(f"{canonical(calls)}: no optimizer update in {cell.steps} training steps "
                        f"(one update takes {every}); train at least {every} steps")
    for call in calls:
        counted = FIRES_BY.get(call.name)
        if counted is None:
            continue
        first = dict(call.kwargs)["step"]
        limit = cell.steps if counted == "training steps" else cell.updates
        if first >= limit:
            raise UserError(f"{call}: never fires, since step {first} is past the run's {limit} "
                            f"{counted} (steps count from 0)")


# ---- helpers ---------------------------------------------------------------------------------
def _part(path) -> str:
    """The top-level part a parameter path belongs to."""
    return str(key_names(path)[0])


def _per_layer(tx: optax.GradientTransformation, stacked: tuple[str, ...]):
    """A stateless transformation applied to each parameter on its own, and to each layer of a
    stacked part on its own (a stacked leaf holds all its part's layers along the leading axis)."""
    def update(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def one(path, u, p):
            def apply(u, p):
                return tx.update(u, tx.init(p), p)[0]

            return jax.vmap(apply)(u, p) if _part(path) in stacked else apply(u, p)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)


# ---- gradient methods ("pre") ----------------------------------------------------------------
UNCHANGED = optax.identity()  # the baseline's gradient, known unchanged without comparing it


@METHODS.register("none", label="none",
                  help="no stabilization: the optimizer sees the raw gradient",
                  ref="the baseline", stage="pre")
def none() -> optax.GradientTransformation:
    return UNCHANGED


class ClipState(NamedTuple):
    changed: jax.Array  # the last update rescaled the gradient
    out_norm: jax.Array  # the global norm of its result


def clip_to_norm(updates, threshold) -> tuple[Any, ClipState]:
    """optax's global-norm clipping, whether it changed the gradient and the norm of its result,
    from its arithmetic: it passes a gradient of norm below `threshold` through untouched and
    rescales any other to norm `threshold` (up to rounding; NaN for a non-finite norm). The norm
    is computed once: XLA merges this one with optax's."""
    clipped, _ = optax.clip_by_global_norm(threshold).update(updates, optax.EmptyState())
    norm = optax.tree.norm(updates)
    below = norm < threshold
    return clipped, ClipState(~below, jnp.where(below, norm, jnp.where(jnp.isfinite(norm),
                                                                        threshold, jnp.nan)))


@METHODS.register("clip_norm", label="clip-norm ({max_norm:g})",
                  help="rescale the gradient so its global L2 norm is <= max_norm",
                  ref="Pascanu et al. 2013", stage="pre", traced=("max_norm",))
def clip_norm(max_norm: float = 1.0) -> optax.GradientTransformation:
    check_positive(max_norm=max_norm)

    def update(updates, state, params=None):
        return clip_to_norm(updates, max_norm)

    return optax.GradientTransformation(
        lambda params: ClipState(jnp.zeros([], bool), jnp.zeros([])), update)


@METHODS.register("clip_value", label="clip-value ({limit:g})",
                  help="clip every gradient element to [-limit, limit]",
                  ref="Mikolov 2012 (PhD thesis)", stage="pre", traced=("limit",))
def clip_value(limit: float = 1.0) -> optax.GradientTransformation:
    check_positive(limit=limit)
    return optax.clip(limit)


@METHODS.register("clip_block_rms", label="block-RMS clip ({threshold:g})",
                  help="rescale each layer's gradient so its RMS is <= threshold",
                  ref="Shazeer & Stern 2018 (Adafactor update clipping)", stage="pre",
                  traced=("threshold",))
def clip_block_rms(threshold: float = 1.0):
    check_positive(threshold=threshold)
    return lambda ctx: _per_layer(optax.clip_by_block_rms(threshold), ctx.stacked)


@METHODS.register("agc", label="AGC ({clip:g})",
                  help="adaptive gradient clipping: each unit's ||G|| <= clip * "
                  "max(||W||, eps); the final layer is not clipped",
                  ref="Brock et al. 2021 (NFNets)", stage="pre", traced=("clip",))
def agc(clip: float = 0.01, eps: float = 1e-3):
    check_positive(clip=clip, eps=eps)

    def make(ctx: Context):
        final = ctx.layer_order[-1] if ctx.layer_order else None

        def not_final(tree):
            return jax.tree_util.tree_map_with_path(lambda path, _: _part(path) != final, tree)

        return optax.masked(_per_layer(optax.adaptive_grad_clip(clip, eps), ctx.stacked), not_final)

    return make


class AutoClipState(NamedTuple):
    history: jax.Array  # the last `size` gradient norms (a ring buffer)
    count: jax.Array


def masked_percentile(values: jax.Array, n: jax.Array, q: float) -> jax.Array:
    """numpy's default (linear) percentile q of values[:n]."""
    s = jnp.sort(jnp.where(jnp.arange(values.shape[0]) < n, values, jnp.inf))
    pos = q / 100.0 * (n - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


@METHODS.register("autoclip", label="AutoClip (p{percentile:g})",
                  help="clip the global norm to the given percentile of the recent "
                  "gradient norms (the current one included; a window of `history` steps)",
                  ref="Seetharaman et al. 2020", stage="pre")
def autoclip(percentile: float = 10.0, history: int = 1000) -> optax.GradientTransformation:
    if not 0.0 < percentile <= 100.0:
        raise ValueError("percentile must lie in (0, 100]")
    check_positive(history=history)

    def init(params):
        return AutoClipState(jnp.zeros([history], jnp.float32), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        recorded = state.history.at[state.count % history].set(norm)
        threshold = masked_percentile(recorded, jnp.minimum(state.count + 1, history), percentile)
        # not reported as a change: the current norm is often the threshold itself, rescaled
        # by 1 up to rounding, and only comparing the elements tells
        clipped, _ = optax.clip_by_global_norm(threshold).update(updates, optax.EmptyState())
        return clipped, AutoClipState(recorded, state.count + 1)

    return optax.GradientTransformation(init, update)


class ZClipState(NamedTuple):
    count: jax.Array
    mean: jax.Array  # of the (clipped) gradient norm: exact over the warm-up, then an EMA
    var: jax.Array
    changed: jax.Array  # the last update clipped the gradient
    out_norm: jax.Array  # the global norm of its result


@METHODS.register("zclip", label="ZClip (z={z:g})",
                  help="clip a gradient norm whose z-score against an EMA of its mean "
                  "and variance exceeds z, to mean + z^2 std / z-score (statistics from the first "
                  "`warmup` steps, unclipped)",
                  ref="Kumar et al. 2025 (ZClip)", stage="pre")
def zclip(z: float = 2.5, alpha: float = 0.97, warmup: int = 25,
          eps: float = 1e-6) -> optax.GradientTransformation:
    check_positive(z=z, warmup=warmup, eps=eps)
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")

    def init(params):
        return ZClipState(jnp.zeros([], jnp.int32), jnp.zeros([]), jnp.zeros([]),
                          jnp.zeros([], bool), jnp.zeros([]))

    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        # warm-up: running mean and population variance of the raw norms (Welford)
        n = (state.count + 1).astype(jnp.float32)
        warm_mean = state.mean + (norm - state.mean) / n
        warm_var = (state.var * state.count + (norm - state.mean) * (norm - warm_mean)) / n
        std = jnp.sqrt(state.var)
        score = (norm - state.mean) / (std + eps)
        spike = (state.count >= warmup) & (score > z)
        effective = jnp.where(spike, state.mean + z * z * std / score, norm)
        clipped, clip = clip_to_norm(updates, effective)
        ema_mean = alpha * state.mean + (1 - alpha) * effective
        ema_var = alpha * state.var + (1 - alpha) * jnp.square(effective - ema_mean)
        warming = state.count < warmup
        return (jax.tree.map(lambda c, u: jnp.where(spike, c, u), clipped, updates),
                ZClipState(state.count + 1, jnp.where(warming, warm_mean, ema_mean),
                           jnp.where(warming, warm_var, ema_var), spike & clip.changed,
                           jnp.where(spike, clip.out_norm, norm)))

    return optax.GradientTransformation(init, update)


def _trust_ratio(trust: float):
    """Each layer's input rescaled to norm trust * ||W||: LARS before the optimizer, LAMB after.
    As optax's lars and lamb: every parameter, biases and norm scales included, and a parameter
    (or input) of norm 0 passes unscaled, so a zero-initialized bias takes one raw step first."""
    check_positive(trust=trust)
    return lambda ctx: _per_layer(optax.scale_by_trust_ratio(trust_coefficient=trust), ctx.stacked)


@METHODS.register("lars", label="LARS ({trust:g})",
                  help="layer-wise trust ratio on the gradient before the optimizer: "
                  "each parameter's gradient rescaled to norm trust * ||W||, biases included, "
                  "unscaled where ||W|| = 0 (LARS with sgd+momentum)",
                  ref="You et al. 2017", stage="pre", traced=("trust",))
def lars(trust: float = 0.001):
    return _trust_ratio(trust)


# lookup tables (token embeddings, learned positions): a row's gradient is its token's or
# position's, and centring over rows would move the rows of tokens the batch never held
LOOKUP_TABLES = ("embedding", "positions")


def _centralize(updates, state, params=None):
    def one(u):
        # Flax kernels are (..., fan_in, fan_out): each output unit's weights span all but the
        # last axis
        return u - u.mean(tuple(range(u.ndim - 1)), keepdims=True) if u.ndim > 1 else u

    return jax.tree.map(one, updates), state


def _not_lookup_table(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: key_names(path)[-1] not in LOOKUP_TABLES, params)


@METHODS.register("centralize", label="grad. centralization",
                  help="gradient centralization: subtract from each output unit's "
                  "weight gradient its mean (weight matrices and conv kernels only: not biases, "
                  "embedding or position tables)",
                  ref="Yong et al. 2020", stage="pre")
def centralize():
    tx = optax.GradientTransformation(optax.init_empty_state, _centralize)
    return lambda ctx: optax.masked(_per_layer(tx, ctx.stacked), _not_lookup_table)


@METHODS.register("grad_noise", label="grad. noise ({eta:g})",
                  help="add Gaussian noise of variance eta / (1 + t)^gamma to the "
                  "gradient (t = update count, a random key per run)",
                  ref="Neelakantan et al. 2015", stage="pre", traced=("eta",))
def grad_noise(eta: float = 0.01, gamma: float = 0.55):
    check_positive(eta=eta)
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    return lambda ctx: optax.add_noise(eta, gamma, ctx.key)


@METHODS.register("sam", label="SAM ({rho:g})",
                  help="sharpness-aware minimization: the optimizer gets the gradient at the "
                  "parameters moved rho along the normalized gradient, w + rho g / ||g|| (a "
                  "second forward and backward pass on the batch; one update per step)",
                  ref="Foret et al. 2021", stage="pre", needs_value=True, traced=("rho",))
def sam(rho: float = 0.05) -> optax.GradientTransformationExtraArgs:
    check_positive(rho=rho)

    def update(updates, state, params=None, *, value_fn, **extra):
        norm = optax.tree.norm(updates)
        # a zero gradient has no direction: its point is the parameters themselves
        step = jnp.where(norm > 0, rho / jnp.where(norm > 0, norm, 1.0), 0.0)
        ascent = jax.tree.map(lambda p, g: p + step * g, params, updates)
        return jax.grad(value_fn)(ascent), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


# ---- on the optimizer's direction ("direction") ----------------------------------------------
@METHODS.register("lamb", label="LAMB ({trust:g})",
                  help="layer-wise trust ratio on the optimizer's direction before the "
                  "learning rate: each parameter's step rescaled to norm trust * ||W|| (LAMB with "
                  "adam; write weight_decay+lamb for LAMB's decay, which the ratio includes)",
                  ref="You et al. 2020", stage="direction", traced=("trust",))
def lamb(trust: float = 1.0):
    return _trust_ratio(trust)


@METHODS.register("weight_decay", label="weight decay ({wd:g})",
                  help="decoupled weight decay: add wd * W to the optimizer's "
                  "direction, scaled by the learning rate (adam + weight_decay = adamw)",
                  ref="Loshchilov & Hutter 2019", stage="direction", traced=("wd",))
def weight_decay(wd: float = 1e-4) -> optax.GradientTransformation:
    check_positive(wd=wd)
    return optax.add_decayed_weights(wd)


class UpdateClipState(NamedTuple):
    count: jax.Array
    nu: Any  # the EMA of the squared gradient, not bias-corrected


@METHODS.register("update_clip", label="update clip",
                  help="StableAdamW's update clipping: each parameter tensor's step (each "
                  "layer's, in a stack) divided by max(1, RMS(g^2 / max(v, eps^2))), g the "
                  "gradient the optimizer took and v the bias-corrected EMA of g^2 (decay b2: the "
                  "optimizer's), this step's included",
                  ref="Wortsman et al. 2023 (StableAdamW, Algorithm 2)", stage="direction")
def update_clip(b2: float = 0.999, eps: float = 1e-8):
    if not 0.0 < b2 < 1.0:
        raise ValueError("b2 must lie in (0, 1)")
    check_positive(eps=eps)

    def init(params):
        return UpdateClipState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def make(ctx: Context) -> SeesGradient:
        def update(updates, state, params=None, *, gradient):
            count = optax.safe_increment(state.count)
            nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, gradient)
            correction = 1 - b2 ** count.astype(jnp.float32)

            def clip(path, u, v, g):
                ratio = jnp.square(g) / jnp.maximum(v / correction, eps * eps)
                first = 1 if _part(path) in ctx.stacked else 0  # stacked: a tensor per layer
                rms = jnp.sqrt(jnp.mean(ratio, tuple(range(first, g.ndim)), keepdims=True))
                return u / jnp.maximum(1.0, rms)

            return (jax.tree_util.tree_map_with_path(clip, updates, nu, gradient),
                    UpdateClipState(count, nu))

        return SeesGradient(optax.GradientTransformationExtraArgs(init, update))

    return make


# ---- learning-rate multipliers ("post") ------------------------------------------------------
WARMUP_SHAPES = ("linear", "cosine")
SCHEDULES = ("cosine", "step", "constant")


def _warmup_label(steps: int, shape: str) -> str:
    return f"warmup {steps} steps" + ("" if shape == "linear" else f" ({shape})")


def _warmup_frac_label(fraction: float, shape: str) -> str:
    return f"warmup {fraction * 100:.3g}%" + ("" if shape == "linear" else f" ({shape})")


@METHODS.register("warmup", label=_warmup_label,
                  help="learning-rate warmup from 0 to the full rate over `steps` "
                  "optimizer updates (shape linear or cosine)",
                  ref="Goyal et al. 2017", stage="post")
def warmup(steps: int = 100, shape: str = "linear") -> optax.GradientTransformation:
    check_positive(steps=steps)
    if shape == "linear":
        multiplier = optax.linear_schedule(0.0, 1.0, steps)
    elif shape == "cosine":
        decay = optax.cosine_decay_schedule(1.0, steps)
        multiplier = lambda t: 1.0 - decay(t)  # noqa: E731
    else:
        raise ValueError(f"shape must be one of {', '.join(WARMUP_SHAPES)}")
    return optax.scale_by_schedule(multiplier)


@METHODS.register("warmup_frac", label=_warmup_frac_label,
                  help="learning-rate warmup from 0 to the full rate over a "
                  "fraction of the run's optimizer updates (shape linear or cosine)",
                  ref="Goyal et al. 2017", stage="post", traced=("fraction",))
def warmup_frac(fraction: float = 0.05, shape: str = "linear"):
    if not isinstance(fraction, jax.core.Tracer) and not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must lie in (0, 1]")
    if shape not in WARMUP_SHAPES:
        raise ValueError(f"shape must be one of {', '.join(WARMUP_SHAPES)}")

    def make(ctx: Context):
        def multiplier(t):
            done = jnp.clip(t / (fraction * ctx.steps), 0.0, 1.0)
            return done if shape == "linear" else 0.5 * (1.0 - jnp.cos(jnp.pi * done))

        return optax.scale_by_schedule(multiplier)

    return make


@METHODS.register("schedule", label="{kind} schedule",
                  help="learning-rate decay over the run: cosine to 0, step (x0.1 at "
                  "50% and 75% of the updates) or constant",
                  ref="Loshchilov & Hutter 2017 (cosine); He et al. 2016 (step)", stage="post")
def schedule(kind: str = "cosine"):
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {', '.join(SCHEDULES)}")

    def make(ctx: Context):
        if kind == "cosine":
            return optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, max(ctx.steps, 1)))
        if kind == "step":
            bounds = {ctx.steps // 2: 0.1, (3 * ctx.steps) // 4: 0.1}
            return optax.scale_by_schedule(optax.piecewise_constant_schedule(1.0, bounds))
        return optax.identity()

    return make


# ---- wrappers ("wrap") -----------------------------------------------------------------------
@METHODS.register("skip_nonfinite", label="skip non-finite",
                  help="skip an update whose gradient holds NaN or Inf "
                  "(parameters unchanged, counted as a non-finite step); give up after max_skips "
                  "in a row",
                  ref="Micikevicius et al. 2018 (skipped overflow steps); optax.apply_if_finite",
                  stage="wrap")
def skip_nonfinite(max_skips: int = 10) -> Wrap:
    check_positive(max_skips=max_skips)
    return Wrap(lambda tx: optax.apply_if_finite(tx, max_skips), lambda s: s.inner_state)


@METHODS.register("skip_large_updates", label="skip large ({max_sq_norm:g})",
                  help="skip an update whose gradient's squared global "
                  "norm is >= max_sq_norm (NaN included)",
                  ref="optax.skip_large_updates (via optax.MultiSteps)", stage="wrap")
def skip_large_updates(max_sq_norm: float = 1e4) -> Wrap:
    check_positive(max_sq_norm=max_sq_norm)
    skip = functools.partial(optax.skip_large_updates, max_squared_norm=max_sq_norm)
    return Wrap(lambda tx: optax.MultiSteps(tx, 1, should_skip_update_fn=skip)
                .gradient_transformation(), lambda s: s.inner_opt_state)


@METHODS.register("accumulate", label="accumulate {k}",
                  help="gradient accumulation: one optimizer update from the mean "
                  "gradient of k successive batches (effective batch k x the task's)",
                  ref="Ott et al. 2018 (delayed updates); optax.MultiSteps", stage="wrap")
def accumulate(k: int = 4) -> Wrap:
    check_positive(k=k)

    def holds(old, new):
        return (new.mini_step != old.mini_step) & (new.mini_step != 0)

    return Wrap(lambda tx: optax.MultiSteps(tx, k).gradient_transformation(),
                lambda s: s.inner_opt_state, holds, every=k)


# ---- the model ("model") and the loss ("loss") -----------------------------------------------
@METHODS.register("logit_softcap", label="logit soft-cap ({cap:g})",
                  help="soft-cap the output logits, cap * tanh(logits / cap), in training and "
                  "evaluation (classifiers)",
                  ref="Gemma Team 2024 (Gemma 2)", stage="model")
def logit_softcap(cap: float = 30.0) -> ModelChange:
    check_positive(cap=cap)
    return ModelChange(output=functools.partial(softcap, cap=cap))


@METHODS.register("attn_softcap", label="attention soft-cap ({cap:g})",
                  help="soft-cap the attention logits before the softmax, cap * tanh(logits / "
                  "cap) (models with attention: the transformer's attn_softcap argument)",
                  ref="Gemma Team 2024 (Gemma 2)", stage="model")
def attn_softcap(cap: float = 50.0) -> ModelChange:
    check_positive(cap=cap)
    return ModelChange(args=(("attn_softcap", float(cap)),))


@METHODS.register("z_loss", label="z-loss ({coef:g})",
                  help="auxiliary loss coef * (log Z)^2 per example, Z the softmax partition of "
                  "the output logits (classifiers): keeps log Z near 0",
                  ref="Chowdhery et al. 2022 (PaLM)", stage="loss")
def z_loss(coef: float = 1e-4) -> LossChange:
    check_positive(coef=coef)
    return LossChange(term=lambda logits: coef * jnp.square(jax.nn.logsumexp(logits, axis=-1)))


class LossScaleState(NamedTuple):
    inner: Any
    scale: jax.Array  # S: the loss is multiplied by it, the gradient divided by it
    good_steps: jax.Array  # finite steps in a row since S last changed


def _scaled(tx: optax.GradientTransformation, scale: float,
            period: int) -> optax.GradientTransformationExtraArgs:
    tx = optax.with_extra_args_support(tx)

    def init(params):
        return LossScaleState(tx.init(params), jnp.asarray(scale, jnp.float32),
                              jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, **extra):
        finite = jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(updates)]))
        # at S = 1 an overflow is not the scale's: the update goes on and the run ends
        skip = ~finite & (state.scale > 1)
        out, inner = tx.update(updates, state.inner, params, **extra)
        grow = finite & (state.good_steps + 1 >= period)
        new_scale = jnp.where(grow, 2 * state.scale,
                              jnp.where(skip, state.scale / 2, state.scale))
        keep = lambda old, new: jnp.where(skip, old, new)  # noqa: E731
        return (jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), out),
                LossScaleState(jax.tree.map(keep, state.inner, inner), new_scale,
                               jnp.where(finite & ~grow, state.good_steps + 1, 0)))

    return optax.GradientTransformationExtraArgs(init, update)


@METHODS.register("loss_scale", label="loss scaling",
                  help="dynamic loss scaling for low precision: the loss is multiplied by S "
                  "(from `scale`, a power of 2) and the gradient divided by it; a non-finite "
                  "gradient skips the update (parameters unchanged) and halves S; S doubles after "
                  "`period` finite steps in a row; at S = 1 a non-finite gradient ends the run",
                  ref="Micikevicius et al. 2018 (mixed precision training)", stage="loss")
def loss_scale(scale: float = 2.0 ** 15, period: int = 2000) -> LossChange:
    check_positive(period=period)
    if not (scale >= 1 and math.log2(scale).is_integer()):
        raise ValueError(f"scale must be a power of 2 of at least 1 (dividing by it is then "
                         f"exact), got {scale:g}")
    return LossChange(scale=lambda state: state.scale,
                      wrap=Wrap(lambda tx: _scaled(tx, scale, period), lambda s: s.inner))


def _is_fault(call: Call) -> bool:
    return METHODS.entry(call.name).meta["stage"] == "fault"


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
        names = key_names(path)
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


# what a planted fault's `step` counts: it must fall within the run
FIRES_BY = {"inject_spike": "training steps", "inject_lr_spike": "optimizer updates"}


def _spike_args(step: int, factor: float, steps: int) -> None:
    if step < 0 or steps <= 0 or not factor > 0:
        raise ValueError("step must be >= 0, steps and factor positive")


@METHODS.register("inject_spike", label="gradient spike (fault)",
                  stage="fault", ref="a planted fault (tests of diagnose)",
                  help="fault injection to test detectors, not a stabilizer: multiplies the "
                       "computed gradient of `layer` ('' = all) by `factor` for `steps` steps from "
                       "`step`")
def inject_spike(step: int = 100, factor: float = 100.0, layer: str = "", steps: int = 1):
    _spike_args(step, factor, steps)
    if layer:
        _layer_key(layer)  # a malformed name fails now, not when the cell compiles

    def fault(grads, t):
        return _scale_layer(grads, layer, (t >= step) & (t < step + steps), factor)

    return fault


@METHODS.register("inject_lr_spike", label="LR spike (fault)",
                  stage="pre", ref="a planted fault (tests of diagnose)",
                  help="fault injection to test detectors, not a stabilizer: multiplies the "
                       "gradient the optimizer gets for `layer` ('' = all) by `factor` for `steps` "
                       "steps from `step` (a learning-rate spike, for SGD)")
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

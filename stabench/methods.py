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
- "fault": plants an error in the computed gradient before the engine records it (fault injection
  for testing detectors, not a stabilizer): `build_fault`.

A factory returns a transformation, or a function of the run's `Context` that returns one, for
methods that need the number of optimizer updates, the run's own random key or the model's layers.

An entry's `traced` names its float arguments that may enter the compiled program as per-run inputs
(`CellTransform.build(..., values)`), like the learning rate: runs of one program may then differ in
them, so a search over them compiles once. A factory checks such an argument only when it is a
number; a traced value was checked as a number when its run's spec was made.
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

from .models import key_names
from .optimizers import Optimizer, check_positive
from .registry import Call, Registry, UserError, split_plus

METHODS = Registry("method")
STAGES = ("fault", "pre", "direction", "post", "wrap")


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

    @property
    def needs_value(self) -> bool:
        return self.optimizer.needs_value

    @property
    def updates(self) -> int:
        """Optimizer updates in a run: training steps over the accumulated micro-steps."""
        return self.steps // math.prod(w.every for w in self.stages["wrap"])

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
        tx = optax.chain(_observed(pre), self.optimizer.direction,
                         *made["direction"], optax.scale_by_learning_rate(lr),
                         self.optimizer.after_lr, *made["post"])
        for wrapper in reversed(self.stages["wrap"]):
            tx = wrapper.wrap(tx)
        return tx

    def observe(self, old, new) -> Observation:
        """What the optimizer saw this step, from the update's state before and after it."""
        held = jnp.array(False)
        for wrapper in self.stages["wrap"]:
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
    cell = CellTransform({s: tuple(v) for s, v in stages.items()}, optimizer, steps,
                         tuple(layer_order), tuple(stacked), traced_values(calls))
    _check_acts(calls, cell)
    return cell


def _check_acts(calls: tuple[Call, ...], cell: CellTransform) -> None:
    """A method that cannot act within the run is a mistake: its cell would train as another."""
    if cell.updates == 0:
        every = math.prod(w.every for w in cell.stages["wrap"])
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


@METHODS.register("none", help="no stabilization: the optimizer sees the raw gradient",
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


@METHODS.register("clip_norm", help="rescale the gradient so its global L2 norm is <= max_norm",
                  ref="Pascanu et al. 2013", stage="pre", traced=("max_norm",))
def clip_norm(max_norm: float = 1.0) -> optax.GradientTransformation:
    check_positive(max_norm=max_norm)

    def update(updates, state, params=None):
        return clip_to_norm(updates, max_norm)

    return optax.GradientTransformation(
        lambda params: ClipState(jnp.zeros([], bool), jnp.zeros([])), update)


@METHODS.register("clip_value", help="clip every gradient element to [-limit, limit]",
                  ref="Mikolov 2012 (PhD thesis)", stage="pre", traced=("limit",))
def clip_value(limit: float = 1.0) -> optax.GradientTransformation:
    check_positive(limit=limit)
    return optax.clip(limit)


@METHODS.register("clip_block_rms", help="rescale each layer's gradient so its RMS is <= threshold",
                  ref="Shazeer & Stern 2018 (Adafactor update clipping)", stage="pre",
                  traced=("threshold",))
def clip_block_rms(threshold: float = 1.0):
    check_positive(threshold=threshold)
    return lambda ctx: _per_layer(optax.clip_by_block_rms(threshold), ctx.stacked)


@METHODS.register("agc", help="adaptive gradient clipping: each unit's ||G|| <= clip * "
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


@METHODS.register("autoclip", help="clip the global norm to the given percentile of the recent "
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


@METHODS.register("zclip", help="clip a gradient norm whose z-score against an EMA of its mean "
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


@METHODS.register("lars", help="layer-wise trust ratio on the gradient before the optimizer: "
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


@METHODS.register("centralize", help="gradient centralization: subtract from each output unit's "
                  "weight gradient its mean (weight matrices and conv kernels only: not biases, "
                  "embedding or position tables)",
                  ref="Yong et al. 2020", stage="pre")
def centralize():
    tx = optax.GradientTransformation(optax.init_empty_state, _centralize)
    return lambda ctx: optax.masked(_per_layer(tx, ctx.stacked), _not_lookup_table)


@METHODS.register("grad_noise", help="add Gaussian noise of variance eta / (1 + t)^gamma to the "
                  "gradient (t = update count, a random key per run)",
                  ref="Neelakantan et al. 2015", stage="pre", traced=("eta",))
def grad_noise(eta: float = 0.01, gamma: float = 0.55):
    check_positive(eta=eta)
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    return lambda ctx: optax.add_noise(eta, gamma, ctx.key)


# ---- on the optimizer's direction ("direction") ----------------------------------------------
@METHODS.register("lamb", help="layer-wise trust ratio on the optimizer's direction before the "
                  "learning rate: each parameter's step rescaled to norm trust * ||W|| (LAMB with "
                  "adam; write weight_decay+lamb for LAMB's decay, which the ratio includes)",
                  ref="You et al. 2020", stage="direction", traced=("trust",))
def lamb(trust: float = 1.0):
    return _trust_ratio(trust)


@METHODS.register("weight_decay", help="decoupled weight decay: add wd * W to the optimizer's "
                  "direction, scaled by the learning rate (adam + weight_decay = adamw)",
                  ref="Loshchilov & Hutter 2019", stage="direction", traced=("wd",))
def weight_decay(wd: float = 1e-4) -> optax.GradientTransformation:
    check_positive(wd=wd)
    return optax.add_decayed_weights(wd)


# ---- learning-rate multipliers ("post") ------------------------------------------------------
WARMUP_SHAPES = ("linear", "cosine")
SCHEDULES = ("cosine", "step", "constant")


@METHODS.register("warmup", help="learning-rate warmup from 0 to the full rate over `steps` "
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


@METHODS.register("warmup_frac", help="learning-rate warmup from 0 to the full rate over a "
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


@METHODS.register("schedule", help="learning-rate decay over the run: cosine to 0, step (x0.1 at "
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
@METHODS.register("skip_nonfinite", help="skip an update whose gradient holds NaN or Inf "
                  "(parameters unchanged, counted as a non-finite step); give up after max_skips "
                  "in a row",
                  ref="Micikevicius et al. 2018 (skipped overflow steps); optax.apply_if_finite",
                  stage="wrap")
def skip_nonfinite(max_skips: int = 10) -> Wrap:
    check_positive(max_skips=max_skips)
    return Wrap(lambda tx: optax.apply_if_finite(tx, max_skips), lambda s: s.inner_state)


@METHODS.register("skip_large_updates", help="skip an update whose gradient's squared global "
                  "norm is >= max_sq_norm (NaN included)",
                  ref="optax.skip_large_updates (via optax.MultiSteps)", stage="wrap")
def skip_large_updates(max_sq_norm: float = 1e4) -> Wrap:
    check_positive(max_sq_norm=max_sq_norm)
    skip = functools.partial(optax.skip_large_updates, max_squared_norm=max_sq_norm)
    return Wrap(lambda tx: optax.MultiSteps(tx, 1, should_skip_update_fn=skip)
                .gradient_transformation(), lambda s: s.inner_opt_state)


@METHODS.register("accumulate", help="gradient accumulation: one optimizer update from the mean "
                  "gradient of k successive batches (effective batch k x the task's)",
                  ref="Ott et al. 2018 (delayed updates); optax.MultiSteps", stage="wrap")
def accumulate(k: int = 4) -> Wrap:
    check_positive(k=k)

    def holds(old, new):
        return (new.mini_step != old.mini_step) & (new.mini_step != 0)

    return Wrap(lambda tx: optax.MultiSteps(tx, k).gradient_transformation(),
                lambda s: s.inner_opt_state, holds, every=k)


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


@METHODS.register("inject_spike", stage="fault", ref="a planted fault (tests of diagnose)",
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


@METHODS.register("inject_lr_spike", stage="pre", ref="a planted fault (tests of diagnose)",
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

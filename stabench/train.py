"""The compiled engine: every run of a cell (seeds x learning rates) in one program.

`jit(vmap(run))` where each run initializes its own parameters from its seed and `lax.scan`s over
training steps; the scan runs in chunks of `eval_every` steps so the host can report progress,
evaluate, and stop once every run has diverged. Telemetry is computed inside the program.
The runs axis is sharded over all local devices (a 1-D mesh), padded to a multiple of their count.
Each device trains its runs in groups, one group after another, each vmapped: on CPU a group is
sized from the cell alone so that its working set stays in a core's L2 cache (training there is
bound by memory traffic); on accelerators a group is every run of the device. The groups are the
same on one device or several, so a run's float32 rounding, which depends on how many runs are
vmapped with it, does not depend on the device count (see `run_group`).
Given per-run `values` of the methods' traced arguments, runs differ in those too (one program for
a whole search over them); without, the spec's values are constants of the program.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .data import Dataset
from .methods import CellTransform
from .models import MUTABLE, LayerLayout, activation_stds
from .process import forced_run_group

RUNS = "runs"  # the vmapped axis of runs, named so that a group of runs can branch together
DEVICES = "devices"  # the mesh axis the runs are sharded over
# The working set a CPU group of runs is sized to: a constant, not the host's L2, so that every host
# and process trains a cell in the same groups (1 MiB: the smallest L2 per core of the hosts seen).
GROUP_CACHE_BYTES = 1 << 20
TELEMETRY = ("loss", "grad_norm", "grad_norm_post", "update_norm", "param_norm", "nonfinite",
             "changed", "layer_grad_norm")
# test examples evaluated together: at most this, and at most a training batch, whose forward pass
# fits wherever training does (a 1024-example batch of 512-token IMDB made 4 GB of attention
# logits and evaluated 2.5x slower per example)
EVAL_BATCH = 1024


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
    rest: Any  # non-parameter model state, e.g. batch statistics
    opt_state: Any  # the state of the whole update: methods and optimizer (unused once a run ends)
    key: jax.Array  # the run's key for its update (e.g. gradient noise)
    alive: jax.Array  # False once the run hit a non-finite step it did not skip, or state
    diverged_at: jax.Array  # step of that event, -1 if none


@dataclass
class CellResult:
    telemetry: dict[str, np.ndarray]  # name -> [runs, steps(, layers)]
    eval_steps: np.ndarray  # [evals]
    evals: dict[str, np.ndarray]  # test_loss, test_accuracy -> [runs, evals]
    diverged_at: np.ndarray  # [runs], -1 where the run stayed finite
    layer_names: list[str]
    timing: dict[str, float]

    def take(self, start: int, stop: int) -> "CellResult":
        """Runs start..stop of this result (one cell of a program that trained several)."""
        return CellResult({k: v[start:stop] for k, v in self.telemetry.items()}, self.eval_steps,
                          {k: v[start:stop] for k, v in self.evals.items()},
                          self.diverged_at[start:stop], self.layer_names, self.timing)


def loss_and_metrics(kind: str, out: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and per-example score (correctness, or squared error for regression)."""
    if kind == "cross_entropy":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return loss, (jnp.argmax(out, -1) == y).astype(jnp.float32)
    pred = out.reshape(y.shape)
    err = jnp.square(pred - y).reshape(y.shape[0], -1).mean(-1)
    return err, err


def _new_state_finite(params, updates, updates_sq, state, keep, first, group=None) -> jax.Array:
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


_COMPILES = {"count": 0, "names": [], "cache_hits": 0}


def _on_compile_event(event: str, duration: float, fun_name: str = "", **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["count"] += 1
        _COMPILES["names"].append(fun_name)


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _COMPILES["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)
jax.monitoring.register_event_listener(_on_event)


def backend_compiles() -> int:
    """XLA compilations so far in this process (persistent-cache hits included)."""
    return _COMPILES["count"]


def cache_hits() -> int:
    """Programs loaded from the persistent compilation cache so far in this process."""
    return _COMPILES["cache_hits"]


def compiled_names() -> list[str]:
    """Names of the programs compiled so far in this process, in order."""
    return list(_COMPILES["names"])


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of training examples in one epoch of a seed: shared by every lr of that seed,
    drawn on the host so any other implementation can replay it."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def cpu_group(run_bytes: int, runs: int, budget: int = GROUP_CACHE_BYTES) -> int:
    """The runs a CPU device trains together for a cell of `runs` runs of `run_bytes` each: the
    largest divisor of `runs` that fits in `budget` bytes, at least two when one fits."""
    fit = budget // run_bytes
    fit = max(2, fit) if fit else 1
    return max(g for g in range(1, min(fit, runs) + 1) if runs % g == 0)


class Engine:
    """Builds and compiles the programs of one cell for a given number of runs."""

    def __init__(self, cell: Cell, data: Dataset, devices: list | None = None,
                 group: int | None = None):
        """group: runs a device trains together; None chooses (see run_group) unless
        STABENCH_RUN_GROUP forces one."""
        group = forced_run_group() if group is None else group
        if group is not None and group < 1:
            raise ValueError("group must be a positive number of runs")
        self.group = group
        self.cell = cell
        self.data = data
        self.devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.array(self.devices), (DEVICES,))
        self.by_run = NamedSharding(self.mesh, P(DEVICES))
        self.replicated = NamedSharding(self.mesh, P())
        if cell.batch_size > len(data.x_train):
            raise ValueError(f"batch size {cell.batch_size} exceeds the {len(data.x_train)} "
                             "training examples")
        abstract = nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0)))
        self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, MUTABLE)
        self.layout = LayerLayout(abstract_params, abstract.layer_order,
                                  getattr(abstract, "stacked_layers", ()))
        self.chunk = min(cell.eval_every, cell.steps)
        self.n_chunks = math.ceil(cell.steps / self.chunk)
        # after each chunk: every eval_every steps and the last
        self.eval_steps = [min((i + 1) * self.chunk, cell.steps) for i in range(self.n_chunks)]
        self.arrays = self._device_data()
        # (runs, traced values, group) -> compiled
        self.programs: dict[tuple[int, bool, int], tuple] = {}

    def _device_data(self) -> dict[str, jax.Array]:
        d = self.data
        n_test = len(d.x_test)
        eval_batch = min(EVAL_BATCH, n_test, self.cell.batch_size)
        n_pad = -n_test % eval_batch
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], n_pad, 0)])  # noqa: E731
        arrays = {
            "x_train": d.x_train, "y_train": d.y_train,
            "x_test": pad(d.x_test).reshape(-1, eval_batch, *d.x_test.shape[1:]),
            "y_test": pad(d.y_test).reshape(-1, eval_batch, *d.y_test.shape[1:]),
            "w_test": np.concatenate([np.ones(n_test), np.zeros(n_pad)]).astype(np.float32)
                        .reshape(-1, eval_batch),
        }
        if d.mean is not None:
            arrays["mean"], arrays["std"] = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
        return jax.device_put(arrays, self.replicated)

    # ---- the pure per-run functions, vmapped below ------------------------------------------
    def _inputs(self, x, arrays):
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

    def activation_stds_at_init(self, seed: int) -> np.ndarray:
        """Per-layer activation std of the seed's initial model on its first training batch."""
        idx = self.batch_indices(np.array([seed]), 0)[0, 0]
        x = self._inputs(self.arrays["x_train"][idx], self.arrays)
        return np.asarray(activation_stds(self.initial_model(seed, x), x, self.layout))

    def _init_run(self, seed, lr, idx, arrays, values=None) -> Carry:
        model = self.initial_model(seed, self._inputs(arrays["x_train"][idx], arrays))
        _, params, rest = nnx.split(model, nnx.Param, MUTABLE)
        update_key = jax.random.fold_in(jax.random.key(seed), 1)
        opt_state = self.cell.transform.build(lr, update_key, values).init(params)
        return Carry(params, rest, opt_state, update_key, jnp.array(True), jnp.array(-1, jnp.int32))

    def _forward_loss(self, params, rest, x, y):
        # copy: fresh variables at this trace level, so layers may update their batch statistics
        model = nnx.merge(self.graphdef, params, rest, copy=True)
        loss, _ = loss_and_metrics(self.cell.loss, model(x), y)
        return loss.mean(), nnx.state(model, MUTABLE)

    def _step(self, carry: Carry, t, idx, lr, arrays, values=None):
        cell = self.cell
        x, y = self._inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
        (loss, rest), grads = jax.value_and_grad(self._forward_loss, has_aux=True)(
            carry.params, carry.rest, x, y)
        if cell.fault is not None:
            grads = cell.fault(grads, t)
        extra = {}
        if cell.transform.needs_value:  # line searches evaluate the loss on this batch
            extra = {"value": loss, "grad": grads,
                     "value_fn": lambda p: self._forward_loss(p, carry.rest, x, y)[0]}
        updates, opt_state = cell.transform.build(lr, carry.key, values).update(
            grads, carry.opt_state, carry.params, **extra)
        seen = cell.transform.observe(carry.opt_state, opt_state)
        rest = jax.tree.map(lambda old, new: jnp.where(seen.skipped, old, new), carry.rest, rest)

        grad_norm = optax.tree.norm(grads)
        updates_sq = optax.tree.norm(updates, squared=True)
        in_range = t < cell.steps
        keep = carry.alive & in_range
        # A non-finite loss or gradient ends the run unless a method skipped the step; so does
        # any non-finite parameter or state. The runs of a group (on one device) check their
        # state together.
        finite = ((jnp.isfinite(loss) & jnp.isfinite(grad_norm)) | seen.skipped) & (
            _new_state_finite(carry.params, updates, updates_sq, (rest, opt_state), keep,
                              t == 0, RUNS))
        accept = keep & finite
        # Parameters and model state stay as of a run's last accepted step: evaluation reads
        # them. The optimizer state is not frozen: a step is rejected only when its run ends,
        # and nothing reads an ended run's optimizer state (the select would cost a pass over it).
        # The new parameters feed only this select, which XLA fuses into the update.
        frozen = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        merged = Carry(
            jax.tree.map(frozen, optax.apply_updates(carry.params, updates), carry.params),
            jax.tree.map(frozen, rest, carry.rest), opt_state, carry.key,
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

    def _evaluate(self, carry: Carry, arrays):
        def one_batch(batch):
            x, y, w = batch
            # inside: nnx needs one trace level; copy as in _forward_loss
            model = nnx.merge(self.graphdef, carry.params, carry.rest, copy=True)
            model.eval()
            loss, score = loss_and_metrics(self.cell.loss, model(self._inputs(x, arrays)), y)
            return jnp.sum(loss * w), jnp.sum(score * w)

        loss_sum, score_sum = jax.lax.map(one_batch, (arrays["x_test"], arrays["y_test"],
                                                      arrays["w_test"]))
        n = jnp.sum(arrays["w_test"])
        alive = lambda v: jnp.where(carry.alive, v, jnp.nan)  # noqa: E731
        out = {"test_loss": alive(loss_sum.sum() / n)}
        if self.cell.loss == "cross_entropy":
            out["test_accuracy"] = alive(score_sum.sum() / n)
        return out

    @functools.cached_property
    def run_bytes(self) -> int:
        """Bytes one run touches in a training step: the activations its backward pass keeps,
        its parameters four times over (parameters, gradient, update, new parameters) and its
        optimizer state."""
        i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
        idx = jax.ShapeDtypeStruct((self.cell.batch_size,), jnp.int32)
        carry = jax.eval_shape(self._init_run, i32, f32, idx, self.arrays)

        def residuals(carry, idx, arrays):
            x, y = self._inputs(arrays["x_train"][idx], arrays), arrays["y_train"][idx]
            return jax.vjp(lambda p: self._forward_loss(p, carry.rest, x, y), carry.params,
                           has_aux=True)[1]

        kept = jax.eval_shape(residuals, carry, idx, self.arrays)
        return _nbytes(kept) + 4 * _nbytes(carry.params) + _nbytes(carry.opt_state)

    def run_group(self, runs: int) -> int:
        """How many runs a device trains together (vmapped), for a cell of `runs` runs: on
        accelerators, all of a device's share; on CPU, `cpu_group`: groups that fit in cache,
        since memory traffic bounds training there, and at least two runs when one fits: larger
        groups share each operation's fixed cost between more runs, which outweighs the cache for
        such small runs.
        A run's rounding depends on its group's size, so on CPU the group depends on the cell
        only, never on the host's cache, the process's cores or the device count: every executor
        trains a cell to the same bits."""
        if self.group is not None:
            return self.group
        if self.devices[0].platform != "cpu":
            return -(-runs // len(self.devices))
        return cpu_group(self.run_bytes, runs)

    def padded_runs(self, runs: int) -> int:
        """Runs trained for a cell of `runs`: whole groups on every device (copies of the last
        run fill the rest, and are dropped from the results)."""
        whole = self.run_group(runs) * len(self.devices)
        return -(-runs // whole) * whole

    def _on_devices(self, fn, in_axes: tuple, runs: int, group: int, carries: bool):
        """`fn` over the runs axis of the arguments whose in_axes is 0 (the others are shared),
        sharded over the devices, each training its share in groups of `group` (`_in_groups`)."""
        if runs % (group * len(self.devices)):
            raise ValueError(f"{runs} runs are not whole groups of {group} on "
                             f"{len(self.devices)} devices (see padded_runs)")
        grouped = self._in_groups(fn, in_axes, runs // len(self.devices), group, carries)
        specs = tuple(P(DEVICES) if axis == 0 else P() for axis in in_axes)
        return jax.shard_map(grouped, mesh=self.mesh, in_specs=specs, out_specs=P(DEVICES),
                             check_vma=False)

    @staticmethod
    def _in_groups(fn, in_axes: tuple, runs: int, group: int, carries: bool):
        """`fn` vmapped (axis name RUNS) over consecutive groups of `group` runs (which divides
        `runs`), one group after another. With `carries`, the first argument is the state `fn`
        carries, its first output, which a group writes over that group's part of it, so the
        groups need no second copy of every run's state (donated, it is updated in place);
        otherwise the groups' outputs are stacked."""
        batched = jax.vmap(fn, in_axes=in_axes, axis_name=RUNS)
        if group >= runs:
            return batched

        def call(start, args):
            part = lambda a: jax.lax.dynamic_slice_in_dim(a, start, group)  # noqa: E731
            return batched(*(jax.tree.map(part, a) if axis == 0 else a
                             for a, axis in zip(args, in_axes)))

        @functools.wraps(fn)
        def stacked(*args):
            out = jax.lax.map(lambda i: call(i * group, args), jnp.arange(runs // group))
            return jax.tree.map(lambda a: a.reshape(runs, *a.shape[2:]), out)

        @functools.wraps(fn)
        def in_place(state, *args):
            def write(start, whole, part):
                return jax.tree.map(
                    lambda w, p: jax.lax.dynamic_update_slice_in_dim(w, p, start, 0), whole, part)

            def body(i, outs):
                return write(i * group, outs, call(i * group, (outs[0], *args)))

            shapes = jax.eval_shape(lambda s: call(0, (s, *args)), state)
            others = jax.tree.map(lambda s: jnp.zeros((runs, *s.shape[1:]), s.dtype), shapes[1:])
            return jax.lax.fori_loop(0, runs // group, body, (state, *others))

        return in_place if carries else stacked

    def _chunk_run(self, carry, idx, lr, step0, arrays, values=None):
        def body(c, t_idx):
            return self._step(c, *t_idx, lr, arrays, values)

        steps = step0 + jnp.arange(self.chunk, dtype=jnp.int32)
        carry, records = jax.lax.scan(body, carry, (steps, idx))
        return carry, records, self._evaluate(carry, arrays)

    def batch_indices(self, seeds: np.ndarray, step0: int) -> np.ndarray:
        """Training-example indices [runs, chunk, batch] for the chunk starting at step0."""
        n, b = len(self.data.x_train), self.cell.batch_size
        steps = np.arange(step0, step0 + self.chunk)
        out = {}
        for seed in np.unique(seeds):
            pos = steps * b
            orders = {e: epoch_order(int(seed), int(e), n) for e in np.unique(pos // (n // b * b))}
            out[seed] = np.stack([
                orders[p // (n // b * b)][p % (n // b * b):][:b] for p in pos])
        return np.stack([out[s] for s in seeds]).astype(np.int32)

    # ---- compiled programs --------------------------------------------------------------------
    def compile(self, seeds, lrs, values=None, group: int | None = None):
        """Lower and compile the init and chunk programs for these runs (with per-run traced
        values [runs, n], if given), trained in groups of `group` (default: `run_group`);
        returns them and seconds. An engine compiles each shape once."""
        group = group or self.run_group(len(lrs))
        key = (len(lrs), values is not None, group)
        if key in self.programs:
            return *self.programs[key], 0.0
        t0 = time.perf_counter()
        run, rep = self.by_run, self.replicated
        traced = () if values is None else (values,)  # a trailing per-run argument
        per_run = (0,) * len(traced)
        first = jax.ShapeDtypeStruct((len(lrs), self.cell.batch_size), jnp.int32)
        init_run = self._on_devices(self._init_run, (0, 0, 0, None, *per_run), len(lrs), group,
                                    carries=False)
        init = jax.jit(init_run, in_shardings=(run, run, run, rep, *(run,) * len(traced)),
                       out_shardings=run)
        init = init.lower(seeds, lrs, first, self.arrays, *traced).compile()
        carry_shape = jax.eval_shape(init_run, seeds, lrs, first, self.arrays, *traced)
        idx = jax.ShapeDtypeStruct((len(lrs), self.chunk, self.cell.batch_size), jnp.int32)
        chunk_run = self._on_devices(self._chunk_run, (0, 0, 0, None, None, *per_run), len(lrs),
                                     group, carries=True)
        chunk = jax.jit(chunk_run, in_shardings=(run, run, run, rep, rep, *(run,) * len(traced)),
                        out_shardings=run, donate_argnums=(0,)).lower(
            carry_shape, idx, lrs, jax.ShapeDtypeStruct((), jnp.int32), self.arrays,
            *traced).compile()
        self.programs[key] = (init, chunk)
        return init, chunk, time.perf_counter() - t0

    def run(self, seeds, lrs, on_chunk: Callable[[int], None] | None = None,
            values=None) -> CellResult:
        """Train runs (seeds[i], lrs[i]) to completion or until every run has diverged; with
        `values` [runs, len(cell.transform.values)], run i takes values[i] as its methods' traced
        arguments."""
        runs = len(lrs)
        group = self.run_group(runs)
        pad = self.padded_runs(runs) - runs  # copies of the last run, dropped from the results
        host_seeds = np.asarray(np.concatenate([seeds, np.repeat(seeds[-1:], pad)]), np.int32)
        host_lrs = np.asarray(np.concatenate([lrs, np.repeat(lrs[-1:], pad)]), np.float32)
        seeds, lrs = jax.device_put((host_seeds, host_lrs), self.by_run)  # no compile
        traced = ()
        if values is not None:
            values = np.asarray(values, np.float32).reshape(runs, len(self.cell.transform.values))
            traced = (jax.device_put(np.concatenate([values, np.repeat(values[-1:], pad, 0)]),
                                     self.by_run),)
        hits_before = cache_hits()
        init, chunk, compile_s = self.compile(seeds, lrs, *traced, group=group)
        compile_cache_hits = cache_hits() - hits_before

        t0 = time.perf_counter()
        idx = self.batch_indices(host_seeds, 0)
        carry = jax.block_until_ready(init(seeds, lrs, idx[:, 0], self.arrays, *traced))
        init_s = time.perf_counter() - t0

        records, evals = [], []
        compiles_before = backend_compiles()
        t0 = time.perf_counter()
        for i in range(self.n_chunks):
            carry, rec, ev = chunk(carry, idx, lrs, np.int32(i * self.chunk), self.arrays,
                                   *traced)
            if i + 1 < self.n_chunks:  # the next chunk's batches, while this one trains
                idx = self.batch_indices(host_seeds, (i + 1) * self.chunk)
            rec, ev, alive = jax.device_get((rec, ev, carry.alive))
            records.append(rec)
            evals.append(ev)
            if on_chunk:
                on_chunk(self.eval_steps[i])
            if not alive.any():
                break
        diverged_at = np.asarray(jax.device_get(carry.diverged_at))
        steady_s = time.perf_counter() - t0
        steady_compiles = backend_compiles() - compiles_before

        steps = self.cell.steps
        telemetry = {}
        for name in TELEMETRY:
            done = np.concatenate([r[name] for r in records], axis=1)[:runs, :steps]
            full = np.full((runs, steps, *done.shape[2:]), np.nan, np.float32)
            full[:, : done.shape[1]] = done
            telemetry[name] = full
        steps_done = self.eval_steps[len(evals) - 1]
        return CellResult(
            telemetry=telemetry,
            eval_steps=np.asarray(self.eval_steps[:len(evals)]),
            evals={k: np.stack([e[k] for e in evals], axis=1)[:runs] for k in evals[0]},
            diverged_at=diverged_at[:runs],
            layer_names=list(self.layout.names),
            timing={"compile_s": compile_s, "init_s": init_s, "steady_s": steady_s,
                    "steps_done": steps_done, "steady_compiles": steady_compiles,
                    "compile_cache_hits": compile_cache_hits,
                    "run_group": group, "devices": len(self.devices),
                    "samples_per_s": runs * steps_done * self.cell.batch_size / steady_s},
        )

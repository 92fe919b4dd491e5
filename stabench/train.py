"""The compiled engine: every run of a cell (seeds x learning rates) in one program.

`jit(vmap(run))` where each run (the per-run functions of program.py) initializes its own
parameters from its seed and `lax.scan`s over training steps; the scan runs in chunks of
`eval_every` steps so the host can report progress, evaluate, and stop once every run has
diverged. Telemetry is computed inside the program.
The runs axis is sharded over all local devices (a 1-D mesh), padded to a multiple of their count.
Each device trains its runs in groups, one group after another, each vmapped: on CPU a group is
sized from the cell alone so that its working set stays in a core's L2 cache (training there is
bound by memory traffic); on accelerators a group is every run of the device. The groups are the
same on one device or several, so a run's float32 rounding, which depends on how many runs are
vmapped with it, does not depend on the device count (grouping.py).
Given per-run `values` of the methods' traced arguments, runs differ in those too (one program for
a whole search over them); without, the spec's values are constants of the program.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .data import Dataset
from .grouping import batch_indices, cpu_group, in_groups
from .models import activation_stds
from .process import forced_run_group
from .program import Cell, RunProgram

DEVICES = "devices"  # the mesh axis the runs are sharded over
# examples evaluated together: at most this, and at most a training batch, whose forward pass
# fits wherever training does (a 1024-example batch of 512-token IMDB made 4 GB of attention
# logits and evaluated 2.5x slower per example)
EVAL_BATCH = 1024


@dataclass
class CellResult:
    telemetry: dict[str, np.ndarray]  # name -> [runs, steps(, layers)]
    eval_steps: np.ndarray  # [evals]
    evals: dict[str, np.ndarray]  # {val,test}_loss, {val,test}_accuracy -> [runs, evals]
    diverged_at: np.ndarray  # [runs], -1 where the run stayed finite
    layer_names: list[str]
    timing: dict[str, float]

    def take(self, start: int, stop: int) -> CellResult:
        """Runs start..stop of this result (one cell of a program that trained several)."""
        return CellResult({k: v[start:stop] for k, v in self.telemetry.items()}, self.eval_steps,
                          {k: v[start:stop] for k, v in self.evals.items()},
                          self.diverged_at[start:stop], self.layer_names, self.timing)


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


class Engine:
    """Builds and compiles the programs of one cell for a given number of runs."""

    def __init__(self, cell: Cell, data: Dataset, devices: list | None = None,
                 group: int | None = None, program: RunProgram | None = None):
        """group: runs a device trains together; None chooses (see run_group) unless
        STABENCH_RUN_GROUP forces one. program: the cell's per-run functions (default
        RunProgram(cell))."""
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
        self.program = program or RunProgram(cell)
        self.layout = self.program.layout
        self.chunk = min(cell.eval_every, cell.steps)
        self.n_chunks = math.ceil(cell.steps / self.chunk)
        # after each chunk: every eval_every steps and the last
        self.eval_steps = [min((i + 1) * self.chunk, cell.steps) for i in range(self.n_chunks)]
        self.arrays = self._device_data()
        # (runs, traced values, group) -> compiled
        self.programs: dict[tuple[int, bool, int], tuple] = {}

    def _device_data(self) -> dict[str, jax.Array]:
        d = self.data
        arrays = {"x_train": d.x_train, "y_train": d.y_train,
                  **self._eval_batches("test", d.x_test, d.y_test)}
        if d.x_val is not None:
            arrays.update(self._eval_batches("val", d.x_val, d.y_val))
        if d.mean is not None:
            arrays["mean"] = np.asarray(d.mean, np.float32)
            arrays["std"] = np.asarray(d.std, np.float32)
        return jax.device_put(arrays, self.replicated)

    def _eval_batches(self, split: str, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """An evaluation split in batches [batches, eval batch, ...], padded with copies of its
        first example, and the weights (1, 0 for padding) that leave the copies out."""
        n = len(x)
        eval_batch = min(EVAL_BATCH, n, self.cell.batch_size)
        n_pad = -n % eval_batch
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], n_pad, 0)])  # noqa: E731
        return {f"x_{split}": pad(x).reshape(-1, eval_batch, *x.shape[1:]),
                f"y_{split}": pad(y).reshape(-1, eval_batch, *y.shape[1:]),
                f"w_{split}": np.concatenate([np.ones(n), np.zeros(n_pad)]).astype(np.float32)
                .reshape(-1, eval_batch)}

    def activation_stds_at_init(self, seed: int) -> np.ndarray:
        """Per-layer activation std of the seed's initial model on its first training batch."""
        idx = self.batch_indices(np.array([seed]), 0)[0, 0]
        x = self.program.inputs(self.arrays["x_train"][idx], self.arrays)
        return np.asarray(activation_stds(self.program.initial_model(seed, x), x, self.layout))

    @functools.cached_property
    def run_bytes(self) -> int:
        """Bytes one run touches in a training step (see RunProgram.run_bytes)."""
        return self.program.run_bytes(self.arrays)

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
        grouped = in_groups(fn, in_axes, runs // len(self.devices), group, carries)
        specs = tuple(P(DEVICES) if axis == 0 else P() for axis in in_axes)
        return jax.shard_map(grouped, mesh=self.mesh, in_specs=specs, out_specs=P(DEVICES),
                             check_vma=False)

    def _chunk_run(self, carry, idx, lr, step0, arrays, values=None):
        def body(c, t_idx):
            return self.program.step(c, *t_idx, lr, arrays, values)

        steps = step0 + jnp.arange(self.chunk, dtype=jnp.int32)
        carry, records = jax.lax.scan(body, carry, (steps, idx))
        return carry, records, self.program.evaluate(carry, arrays)

    def batch_indices(self, seeds: np.ndarray, step0: int) -> np.ndarray:
        """Training-example indices [runs, chunk, batch] for the chunk starting at step0."""
        return batch_indices(seeds, step0, self.chunk, len(self.data.x_train),
                             self.cell.batch_size)

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
        init_run = self._on_devices(self.program.init_run, (0, 0, 0, None, *per_run), len(lrs),
                                    group, carries=False)
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
        for name in records[0]:  # program.TELEMETRY and the cell's own (logits, sharpness)
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

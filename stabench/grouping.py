"""How an engine lays out a cell's runs: which training examples each step of a run reads, and
how runs are grouped (vmapped together) and spread over devices.

A run's float32 rounding depends on how many runs are vmapped with it, so on CPU a group's size
comes from the cell alone (`cpu_group`), never from the host's cache, the process's cores or the
device count: every process and host trains a cell in the same groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .program import RUNS

# The working set a CPU group of runs is sized to: a constant, not the host's L2, so that every host
# and process trains a cell in the same groups (1 MiB: the smallest L2 per core of the hosts seen).
GROUP_CACHE_BYTES = 1 << 20


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


def in_groups(fn, in_axes: tuple, runs: int, group: int, carries: bool):
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

def batch_indices(seeds: np.ndarray, step0: int, steps: int, n: int, batch: int) -> np.ndarray:
    """Training-example indices [runs, chunk, batch] for the chunk starting at step0."""
    b = batch
    steps = np.arange(step0, step0 + steps)
    out = {}
    for seed in np.unique(seeds):
        pos = steps * b
        orders = {e: epoch_order(int(seed), int(e), n) for e in np.unique(pos // (n // b * b))}
        out[seed] = np.stack([
            orders[p // (n // b * b)][p % (n // b * b):][:b] for p in pos])
    return np.stack([out[s] for s in seeds]).astype(np.int32)

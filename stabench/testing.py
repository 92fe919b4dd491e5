"""Conformance checks for registry entries: the ones stabench's catalog tests run on every
built-in entry, for a plugin's own test suite to run on its entries.

    from stabench.testing import check_method, covers

    @covers("method", "adagc")
    def test_adagc_clips_each_tensor_to_its_threshold():
        ...  # the entry's definition, checked by its math

    def test_adagc_conforms():
        check_method("adagc(warmup=2)")

The checks train tiny cells of the bundled digits task (offline, seconds on a CPU) and raise
AssertionError saying what failed: the entry trains in a compiled cell with no compile after the
first, its runs stay finite and independent of each other under vmap, a method composes with
others by `+`, and a test marked `@covers` checks the entry against its definition.
"""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from . import methods
from .config import RunSpec, build_cell, data_source, make_spec, task_of, trace_first_update
from .data import Dataset
from .inits import INITS
from .optimizers import OPTIMIZERS
from .train import CellResult, Engine

# kind -> the entries that a test marked with `covers` checks against their definition
COVERED: dict[str, set[str]] = {"method": set(), "optimizer": set(), "init": set()}
# A deep residual MLP with layer norm: the structure residual inits need.
RESIDUAL = {"model.residual": True, "model.depth": 6, "model.norm": "layer"}
# Learning rates of a conformance cell's two runs, and the second run's in the rerun that shows
# the first does not depend on it: low enough that every built-in entry stays finite.
LRS, OTHER_LR = (0.05, 0.02), 0.01
# What a method is composed with: a lenient clipper before it and a warmup after it.
COMPOSE = "clip_norm(max_norm=10.0)+{}+warmup(steps=2)"
# The tasks the checks train, made small: digits' MLP, and for entries that need attention a
# Transformer on short generated ListOps.
SMALL = {"digits": {"model.width": 16},
         "listops": {"model.dim": 16, "model.heads": 2, "dataset.max_length": 32,
                     "dataset.n_train": 256, "dataset.n_test": 64}}


def covers(kind: str, *names: str):
    """Mark a test as checking these entries of `kind` against their definition."""
    if kind not in COVERED:
        raise ValueError(f"kind must be one of {', '.join(COVERED)}, got {kind!r}")

    def mark(test):
        COVERED[kind].update(names)
        return test

    return mark


@functools.cache
def digits() -> Dataset:
    """The digits data as the digits task trains on it: its validation split held out."""
    from .config import data_source
    from .tasks import get_task

    return data_source(get_task("digits")).load(None)


def catalog_spec(method: str = "none", init: str = "default", optimizer: str | None = None,
                 steps: int = 8, residual: bool = False, lrs: tuple[float, ...] = (0.05,),
                 task: str = "digits", **overrides) -> RunSpec:
    """A tiny cell of a task of SMALL (digits: width 16), one seed per learning rate: what the
    checks train."""
    overrides = {"train.steps": steps, "train.eval_every": steps, **SMALL[task],
                 **(RESIDUAL if residual else {}), **overrides}
    return make_spec(task, method, init, optimizer, seeds=1, lrs=lrs, overrides=overrides)


def engine_for(spec: RunSpec, data: Dataset | None = None) -> Engine:
    """The cell's engine on `data`, else on its task's data (digits': loaded once)."""
    source = data_source(task_of(spec))
    if data is None:
        data = digits() if spec.task == "digits" else source.load(None)
    return Engine(build_cell(spec, source), data)


def _label(spec: RunSpec) -> str:
    return f"method {spec.method}, init {spec.init}, optimizer {spec.optimizer}"


def _assert_finite(result: CellResult, what: str) -> None:
    tel = result.telemetry
    assert (result.diverged_at == -1).all(), f"{what}: runs diverged at {result.diverged_at}"
    assert np.isfinite(tel["loss"]).all() and np.isfinite(tel["param_norm"]).all(), what
    assert (np.nanmax(tel["update_norm"], axis=1) > 0).all(), f"{what}: a run never moved"
    assert all(np.isfinite(v).all() for v in result.evals.values()), f"{what}: evaluation"
    assert result.timing["steady_compiles"] == 0, f"{what}: compiled while training"


def check_runs_independent(spec: RunSpec, data: Dataset | None = None) -> None:
    """Runs vmapped in one program are independent: two runs of one seed with different learning
    rates train finitely, and changing the second run's seed and learning rate leaves the first
    bit for bit as it was (the same compiled program trains both times)."""
    engine, what = engine_for(spec, data), _label(spec)
    first = engine.run(np.array([0, 0]), np.array(LRS))
    second = engine.run(np.array([0, 1]), np.array([LRS[0], OTHER_LR]))
    for result in (first, second):
        _assert_finite(result, what)
    for name, values in first.telemetry.items():
        np.testing.assert_array_equal(second.telemetry[name][0], values[0],
                                      err_msg=f"{what}: run 0's {name} depends on run 1")
    for name, values in first.evals.items():
        np.testing.assert_array_equal(second.evals[name][0], values[0],
                                      err_msg=f"{what}: run 0's {name} depends on run 1")
    assert not np.array_equal(first.telemetry["loss"][1], second.telemetry["loss"][1]), \
        f"{what}: the second run ignored its seed"


def _check_entry(kind: str, registry, name: str) -> None:
    entry = registry.entry(name)
    assert entry.help and entry.ref, f"{kind} {name} needs help and a reference (ref=...)"
    assert name in COVERED[kind], (f"{kind} {name} has no test against its definition: mark one "
                                   f"with @covers({kind!r}, {name!r})")


def check_method(method: str, data: Dataset | None = None, task: str = "digits") -> None:
    """A registered method (its name, with arguments if its defaults do not fit an 8-step run):
    help, reference and stage; a @covers test; trains alone with independent runs; composes. It
    trains on a task of SMALL (`data`: that task's)."""
    calls = methods.resolve(method)
    assert len(calls) == 1, f"check one method at a time, not {method!r}"
    name = calls[0].name
    _check_entry("method", methods.METHODS, name)
    stage = methods.METHODS.entry(name).meta.get("stage")
    assert stage in methods.STAGES, f"method {name}: stage must be one of {methods.STAGES}"
    check_runs_independent(catalog_spec(method, lrs=LRS, task=task), data)
    check_composes(method, task)


def check_composes(method: str, task: str = "digits") -> None:
    """The method composed by `+` with a clipper before it and a warmup after it: the cell's
    update traces, so its state and arguments fit the others' (traced, not compiled: the method
    alone is what trains)."""
    spec = catalog_spec(COMPOSE.format(method), task=task)
    cell = build_cell(spec, data_source(task_of(spec)))
    trace_first_update(cell, nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0))))


def check_optimizer(name: str, data: Dataset | None = None) -> None:
    """A registered optimizer: help and reference, a @covers test, independent runs."""
    _check_entry("optimizer", OPTIMIZERS, OPTIMIZERS.resolve(name).name)
    check_runs_independent(catalog_spec(optimizer=name, lrs=LRS), data)


def check_init(name: str, data: Dataset | None = None, residual: bool = False) -> None:
    """A registered init (on the deep residual MLP with `residual`): help and reference, a
    @covers test, independent runs."""
    _check_entry("init", INITS, INITS.resolve(name).name)
    check_runs_independent(catalog_spec(init=name, residual=residual, lrs=LRS), data)

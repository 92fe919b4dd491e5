"""The public Python API (re-exported by `stabench`): train a cell, sweep, load, report, diagnose.
The command line is a thin layer over it. Every function validates its input first and raises
`UserError` (one line naming the valid choices) before anything runs or is written."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Sequence

from .registry import UserError

if TYPE_CHECKING:  # the heavy modules load on first use: `python -m stabench` starts fast
    import numpy as np
    import pandas as pd

    from .config import RunSpec
    from .store import Record

DEFAULT_OUT = "runs"


@dataclass(frozen=True)
class Result:
    """A trained (or reused) cell: its record on disk, metrics per run, telemetry per step."""

    record: Record
    trained: bool  # False: the record was already stored and is reused

    @property
    def path(self) -> Path:
        return self.record.path

    @property
    def spec(self) -> RunSpec:
        return self.record.spec

    @property
    def runs(self) -> pd.DataFrame:
        """One row per run (seed, lr and its metrics)."""
        import pandas as pd

        return pd.DataFrame(self.record.runs)

    @property
    def timing(self) -> dict[str, float]:
        return dict(self.record.data["timing"])

    def telemetry(self) -> dict[str, np.ndarray]:
        """Per-step arrays [runs, steps(, layers)]: loss, grad_norm, ..., layer_grad_norm."""
        return self.record.telemetry()


def spec(task: str | Path = "digits", method: str = "none", init: str = "default",
         optimizer: str | None = None, *, seeds: int | None = None,
         lrs: Sequence[float] | None = None, steps: int | None = None,
         batch_size: int | None = None, precision: str | None = None,
         overrides: dict[str, Any] | None = None, fake_data: bool = False) -> RunSpec:
    """A validated cell: the task's file with `overrides` ({"model.depth": 8, ...}), `steps`,
    `batch_size` and `precision` (the compute dtype: fp32, bf16 or fp16) applied, crossed with the
    method, init and optimizer, seeds x lrs runs."""
    overrides = dict(overrides or {})
    for key, value in (("train.steps", steps), ("train.batch_size", batch_size),
                       ("train.precision", precision)):
        if value is not None:
            if overrides.get(key, value) != value:
                raise UserError(f"{key.split('.')[1]}={value} and overrides {key}="
                                f"{overrides[key]} disagree: give one of them")
            overrides[key] = value
    from .config import make_spec

    return make_spec(str(task), method, init, optimizer, seeds,
                     None if lrs is None else tuple(lrs), overrides, fake_data)


def run(task: str | Path | RunSpec = "digits", method: str = "none", init: str = "default",
        optimizer: str | None = None, *, out: str | Path = DEFAULT_OUT, force: bool = False,
        data_dir: str | None = None, on_chunk: Callable[[int], None] | None = None,
        on_wait: Callable[[], None] | None = None, **spec_args) -> Result:
    """Train every run of one cell in one compiled program and store its record under `out`;
    a record already stored is reused unless `force`. `task` may be a RunSpec (from `spec`);
    otherwise `spec_args` are `spec`'s keywords (seeds, lrs, steps, batch_size, overrides,
    fake_data). `on_chunk(step)` is called after each chunk of training steps, `on_wait()` when
    another process is training the cell (this call waits for it and reuses its record)."""
    from .config import RunSpec

    cell = task if isinstance(task, RunSpec) else spec(task, method, init, optimizer, **spec_args)
    return _stored(cell, out, force, data_dir, on_chunk, on_wait)


def _stored(cell: RunSpec, out: str | Path, force: bool, data_dir: str | None,
            on_chunk: Callable[[int], None] | None = None,
            on_wait: Callable[[], None] | None = None) -> Result:
    """`run`'s work on a validated cell: its stored record, or one trained now."""
    from .process import prepare
    from .runner import TRAINED, load_data, train_and_store
    from .store import Store, tidy_dirs

    store = Store(out)
    if not force and (record := store.load(cell)) is not None:
        return Result(record, trained=False)
    data = load_data(cell, data_dir)  # absent data fails here, before anything is written
    prepare()
    with tidy_dirs(store.path_for(cell).parent):
        store.check_writable(cell)
        if on_wait is not None and store.is_claimed(cell):
            on_wait()
        done = train_and_store(cell, store, lambda _: data, on_chunk, force)
    return Result(done.record, trained=done.status == TRAINED)


def load(directory: str | Path, warn: Callable[[str], None] = lambda message: None
         ) -> list[Record]:
    """Every trustworthy record under `directory`; each one that is not (torn, malformed, from
    another format) is named through `warn` and left out."""
    from .store import load_records

    return load_records(directory, warn)[0]


def report(directory: str | Path, warn: Callable[[str], None] = lambda message: None):
    """The leaderboards of every record under `directory`: a Report, whose tables are DataFrames
    (`overall`, `boards` per task variant, `runs`) and whose `write(out)` writes report.md,
    leaderboards.tex, the CSVs, runs.parquet and plots/."""
    from .reports import read_report

    return read_report(directory, warn)


def runs(source: str | Path | list[Record]) -> pd.DataFrame:
    """One row per stored run, of the records under a directory or of a list of records: spec
    fields, metrics, timing, provenance."""
    from .leaderboard import runs_frame

    return runs_frame(source if isinstance(source, list) else load(source))


def sweep(suite: str | None = None, *, tasks: Sequence[str] = (),
          methods: Sequence[str] = ("none",), inits: Sequence[str] = ("default",),
          optimizers: Sequence[str | None] = (None,), seeds: int | None = None,
          lrs: Sequence[float] | None = None, precision: str | Sequence[str] | None = None,
          overrides: dict[str, Any] | None = None,
          fake_data: bool = False, out: str | Path | None = None, workers: int | None = None,
          executor: str = "local", address: str | None = None, data_dir: str | None = None,
          shard: tuple[int, int] | None = None, progress=None,
          warn: Callable[[str], None] = lambda message: None):
    """Train every cell of a suite (tasks/suites/NAME.toml) or of the lists given, skipping those
    stored under `out` (resume), with the local executor (`workers` processes, default one per
    core) or Ray (`executor="ray"`, `address`); returns the sweep's Summary (trained, skipped,
    failed, ...). `precision`: the compute dtype (fp32, bf16, fp16), or a list of them (a grid
    axis), as the override train.precision."""
    if precision is not None:
        value = precision if isinstance(precision, str) else list(precision)
        overrides = {**(overrides or {}), "train.precision": value}
    plan = sweep_plan(suite, tasks=tasks, methods=methods, inits=inits, optimizers=optimizers,
                      seeds=seeds, lrs=lrs, overrides=overrides, fake_data=fake_data, out=out,
                      shard=shard)
    return run_plan(plan, workers, executor, address, data_dir, progress, warn)


@dataclass(frozen=True)
class SweepPlan:
    spec: Any  # the SweepSpec: its grid, or the search that asks for cells as it trains
    out: str
    shard: tuple[int, int] | None = None  # (i, n): the i-th of n parts of the cells

    @property
    def cells(self) -> list[RunSpec]:
        """The cells to train (a grid's or random search's; Optuna asks for them as it trains)."""
        from .sweeps import shard

        cells = self.spec.cells()
        return shard(cells, *self.shard) if self.shard else cells


def sweep_plan(suite: str | None = None, *, tasks: Sequence[str] = (),
               methods: Sequence[str] = ("none",), inits: Sequence[str] = ("default",),
               optimizers: Sequence[str | None] = (None,), seeds: int | None = None,
               lrs: Sequence[float] | None = None, overrides: dict[str, Any] | None = None,
               fake_data: bool = False, search: str | None = None, out: str | Path | None = None,
               shard: tuple[int, int] | None = None) -> SweepPlan:
    """The cells a sweep trains and where (default: results/SUITE, or runs/)."""
    from .sweeps import SweepSpec, TaskEntry, load_suite, suite_spec

    lrs = None if lrs is None else tuple(lrs)
    if suite:
        name, doc = load_suite(suite)
        plan = suite_spec(doc, fake_data, dict(overrides or {}), seeds, lrs)
        if search:
            plan = replace(plan, search=search)
        out = out or f"results/{name}"
    else:
        if not tasks:
            raise UserError("give a suite or at least one task")
        plan = SweepSpec(tasks=tuple(TaskEntry(t) for t in tasks), methods=tuple(methods),
                         inits=tuple(inits), optimizers=tuple(optimizers), seeds=seeds, lrs=lrs,
                         search=search or "grid", fake_data=fake_data,
                         overrides=tuple((overrides or {}).items()))
        out = out or DEFAULT_OUT
    return SweepPlan(plan, str(out), shard)


def run_plan(plan: SweepPlan, workers: int | None = None, executor: str = "local",
             address: str | None = None, data_dir: str | None = None, progress=None,
             warn: Callable[[str], None] = lambda message: None):
    """Train a plan's cells not stored yet; the sweep's Summary."""
    from .executor import make_sweep_executor, run_sweep
    from .process import prepare

    prepare()
    runner = make_sweep_executor(executor, workers, address, data_dir)
    if executor == "local":  # Ray's workers read data directories of their own
        check_data(plan.cells, plan.out, data_dir)
    return run_sweep(plan.cells, plan.out, runner, progress, warn=warn)


def check_data(cells: list[RunSpec], out: str | Path, data_dir: str | None) -> None:
    """Fail before any training when a cell still to train needs data that is not here."""
    from .config import data_source, task_of
    from .store import Store

    store = Store(out)
    for cell in cells:
        source = data_source(task_of(cell))
        if not cell.fake_data and not source.available(data_dir) and store.load(cell) is None:
            source.load(data_dir)  # raises DataMissing, which says how to get the data


def rerun(record: str | Path | Record, data_dir: str | None = None):
    """Retrain a stored record's cell and compare: a Reproduction (exact, within rounding, or
    not, with the evidence)."""
    from .process import prepare
    from .runner import rerun as retrain
    from .store import BadRecord, Record, read_record

    if not isinstance(record, Record):
        try:
            record = read_record(Path(record))
        except BadRecord as err:
            raise UserError(str(err)) from None
    prepare()
    return retrain(record, data_dir)


def diagnosis_spec(task: str | Path = "digits", method: str = "none", init: str = "default",
                   optimizer: str | None = None, *, seed: int = 0, lr: float | None = None,
                   at_init: bool = False, **spec_args) -> RunSpec:
    """The one-run cell a diagnosis trains: seed `seed` at `lr`, else at the task's middle
    learning rate; `at_init`: one step, whose gradients are all a diagnosis at init reads."""
    from .registry import INT_LIMIT

    if not 0 <= seed <= INT_LIMIT:  # the engine's seeds are int32
        raise UserError(f"seed must be >= 0 and at most {INT_LIMIT:,}, got {seed}")
    if at_init:
        spec_args["overrides"] = {**(spec_args.get("overrides") or {}), "train.steps": 1,
                                  "train.eval_every": 1}
    cell = spec(task, method, init, optimizer, seeds=1, lrs=None if lr is None else (lr,),
                **spec_args)
    return replace(cell, seeds=(seed,), lrs=(cell.lrs[len(cell.lrs) // 2],))


def diagnose(record: str | Path | Record | RunSpec, run: int = 0, *,
             results: str | Path | None = "results", out: str | Path = DEFAULT_OUT,
             data_dir: str | None = None, force: bool = False):
    """The Diagnosis of one run of a stored record, or of a cell (a RunSpec, e.g. from
    `diagnosis_spec`) trained and stored now: when the gradient exploded or vanished, in which
    layer, the loss around it, and what to try (the entries of a leaderboard under `results` that
    ranks this task and did not diverge at the run's learning rate, else rules; a lower rate if the
    run broke)."""
    from .config import RunSpec
    from .data import DataMissing
    from .process import prepare
    from .runner import diagnose_run, load_data
    from .store import BadRecord, Record, read_record

    if isinstance(record, RunSpec):
        record = _stored(record, out, force, data_dir).record
    elif not isinstance(record, Record):
        try:
            record = read_record(Path(record))
        except BadRecord as err:
            raise UserError(str(err)) from None
    cell = record.spec
    if not 0 <= run < len(cell.runs):
        raise UserError(f"run must lie in 0..{len(cell.runs) - 1}: the record has "
                        f"{len(cell.runs)} run{'' if len(cell.runs) == 1 else 's'}")
    prepare()
    try:
        data = load_data(cell, data_dir)
    except DataMissing:
        data = None  # activation stds at init are then reported as unavailable
    return diagnose_run(cell, record.telemetry(), record.data["layer_names"], run, data,
                        str(record.path), results=None if results is None else str(results))

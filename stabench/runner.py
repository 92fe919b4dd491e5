"""One cell from spec to stored record: load data, compile and train, compute metrics, save."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from .config import RunSpec, build_cell, data_source, plugin_hashes, task_of
from .data import Dataset, check_finite, fake
from .metrics import run_metrics, stability_threshold
from .optimizers import OPTIMIZERS
from .registry import UserError
from .reproduce import Reproduction, compare
from .store import Record, Store, provenance, tidy_dirs


def load_data(spec: RunSpec, data_dir: str | None = None) -> Dataset:
    source = data_source(task_of(spec))
    data = fake(source.meta) if spec.fake_data else source.load(data_dir)
    return check_finite(data, source.name)


def train_spec(spec: RunSpec, data: Dataset, on_chunk: Callable[[int], None] | None = None):
    """Train every run of the cell; returns the record body and the telemetry arrays."""
    from .train import Engine

    engine = Engine(build_cell(spec, data_source(task_of(spec))), data)
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    return cell_record(spec, engine.run(seeds, lrs, on_chunk))


def cell_record(spec: RunSpec, result):
    """The record body and telemetry arrays of a cell from its trained runs (a CellResult)."""
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    optimizer = OPTIMIZERS.resolve(spec.optimizer)
    runs = []
    for i, (seed, lr) in enumerate(spec.runs):
        tel = {k: v[i] for k, v in result.telemetry.items()}
        ev = {k: v[i] for k, v in result.evals.items()}
        edge = stability_threshold(optimizer.name, dict(optimizer.kwargs), lr)
        metrics = run_metrics(tel, ev, result.eval_steps, int(result.diverged_at[i]), spec.target,
                              edge)
        runs.append({"seed": int(seed), "lr": float(lr), **metrics})
    body = {"runs": runs, "timing": result.timing, "provenance": provenance(),
            "layer_names": result.layer_names, "eval_steps": result.eval_steps.tolist()}
    arrays = {**result.telemetry, **{f"eval_{k}": v for k, v in result.evals.items()},
              "eval_steps": result.eval_steps, "diverged_at": result.diverged_at,
              "seeds": seeds, "lrs": lrs}
    return body, arrays


TRAINED = "trained"  # this call trained the cell and wrote its record
STORED = "stored"  # the record was there: written earlier, or by another process meanwhile
BUSY = "busy"  # another process holds the cell's lock (only when not waiting for it)


@dataclass(frozen=True)
class Stored:
    record: Record | None  # None when BUSY
    status: str


def store_cells(specs: list[RunSpec], store: Store,
                train: Callable[[list[RunSpec]], list[tuple[dict, dict]]], force: bool = False,
                wait: bool = True) -> list[Stored]:
    """The one path from specs to stored records: each cell's lock is held from before its record
    is looked up until it is written, so no cell is trained or written twice, whichever commands
    run at once. `train(todo)` trains the cells not stored yet (or all, with `force`), together if
    it likes, and returns each one's record body and telemetry. Without `wait`, a cell another
    process holds is BUSY."""
    out: dict[str, Stored] = {}
    with contextlib.ExitStack() as held:
        todo = []
        # one lock per distinct cell, taken in one order: two commands never wait on each other
        for spec in sorted({spec.hash: spec for spec in specs}.values(), key=lambda s: s.hash):
            held.enter_context(tidy_dirs(store.path_for(spec).parent))
            if not held.enter_context(store.claim(spec, wait=wait)):
                out[spec.hash] = Stored(None, BUSY)
                continue
            record = None if force else store.load(spec)
            if record is not None:
                out[spec.hash] = Stored(record, STORED)
            else:
                todo.append(spec)
        for spec in todo:  # a record names the plugin code it was trained with, never other code
            if plugin_hashes(spec) != spec.plugins:
                raise UserError(f"the plugins of cell {spec.hash} changed since it was specified "
                                f"({spec.plugins} then, {plugin_hashes(spec)} here): make the "
                                f"spec again where the plugins are those you mean to train")
        if todo:
            for spec, (body, arrays) in zip(todo, train(todo)):
                out[spec.hash] = Stored(store.save(spec, body, arrays), TRAINED)
    return [out[spec.hash] for spec in specs]


def train_and_store(spec: RunSpec, store: Store,
                    load: Callable[[RunSpec], Dataset] = load_data,
                    on_chunk: Callable[[int], None] | None = None, force: bool = False,
                    wait: bool = True) -> Stored:
    """One cell through `store_cells`: trained on `load(spec)` (called only if it must train),
    or found stored."""
    return store_cells([spec], store, lambda todo: [train_spec(spec, load(spec), on_chunk)],
                       force, wait)[0]


def rerun(record: Record, data_dir: str | None = None) -> Reproduction:
    """Retrain a stored record's spec and compare it with what it stored."""
    now = train_spec(record.spec, load_data(record.spec, data_dir))
    return compare((record.data, record.telemetry()), now)


def diagnose_run(spec: RunSpec, arrays: dict[str, np.ndarray], layer_names: list[str], k: int,
                 data: Dataset | None, record: str | None = None, at_init: bool = False,
                 results: str | None = None):
    """The diagnosis of run k of a cell from its telemetry arrays ([runs, steps, ...]); activation
    stds at init need the data (None: reported as unavailable). Recommendations come from the
    leaderboard of a report under `results` that ranks this task variant (its entries that did not
    diverge at the run's learning rate), else from the rules."""
    from dataclasses import replace

    from . import diagnosis
    from .inits import INITS
    from .reports import board_rows_for
    from .methods import METHODS
    from .models import MODELS
    from .train import Engine

    seed, lr = spec.runs[k]
    stds = None
    if data is not None:
        engine = Engine(build_cell(spec, data_source(task_of(spec))), data)
        stds = engine.activation_stds_at_init(seed)
    run = {"task": spec.task, "method": spec.method, "init": spec.init, "optimizer": spec.optimizer,
           "seed": int(seed), "lr": float(lr), "steps": spec.train["steps"],
           "model": dict(spec.task_config["model"]), "record": record, "run": k}
    telemetry = {name: np.asarray(arrays[name][k])
                 for name in ("loss", "grad_norm", "layer_grad_norm")}
    diag = diagnosis.diagnose(telemetry, layer_names, run, int(arrays["diverged_at"][k]), stds,
                              at_init)
    rows, where = board_rows_for(results, spec) if results else ([], None)
    model_args = set(MODELS.entry(spec.task_config["model"]["name"]).parameters())
    recs, notes = diagnosis.recommendations(diag, rows, where, set(METHODS.names()),
                                            set(INITS.names()), model_args)
    return replace(diag, recommendations=recs, notes=notes)

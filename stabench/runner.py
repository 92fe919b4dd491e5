"""One cell from spec to stored record: load data, compile and train, compute metrics, save."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .config import RunSpec, build_cell, data_source, task_of
from .data import Dataset, check_finite, fake
from .metrics import run_metrics
from .reproduce import Reproduction, compare
from .store import Record, Store, provenance


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
    runs = []
    for i, (seed, lr) in enumerate(spec.runs):
        tel = {k: v[i] for k, v in result.telemetry.items()}
        ev = {k: v[i] for k, v in result.evals.items()}
        metrics = run_metrics(tel, ev, result.eval_steps, int(result.diverged_at[i]), spec.target)
        runs.append({"seed": int(seed), "lr": float(lr), **metrics})
    body = {"runs": runs, "timing": result.timing, "provenance": provenance(),
            "layer_names": result.layer_names, "eval_steps": result.eval_steps.tolist()}
    arrays = {**result.telemetry, **{f"eval_{k}": v for k, v in result.evals.items()},
              "eval_steps": result.eval_steps, "diverged_at": result.diverged_at,
              "seeds": seeds, "lrs": lrs}
    return body, arrays


def run_cell(spec: RunSpec, store: Store, data_dir: str | None = None,
             on_chunk: Callable[[int], None] | None = None, data: Dataset | None = None) -> Record:
    if data is None:
        data = load_data(spec, data_dir)
    body, arrays = train_spec(spec, data, on_chunk)
    return store.save(spec, body, arrays)


def rerun(record: Record, data_dir: str | None = None) -> Reproduction:
    """Retrain a stored record's spec and compare it with what it stored."""
    now = train_spec(record.spec, load_data(record.spec, data_dir))
    return compare((record.data, record.telemetry()), now)


def diagnose_run(spec: RunSpec, arrays: dict[str, np.ndarray], layer_names: list[str], k: int,
                 data: Dataset | None, record: str | None = None, at_init: bool = False,
                 results: str | None = None):
    """The diagnosis of run k of a cell from its telemetry arrays ([runs, steps, ...]); activation
    stds at init need the data (None: reported as unavailable). Recommendations come from the
    leaderboard of a report under `results` that ranks this task variant, else from the rules."""
    from dataclasses import replace

    from . import diagnose
    from .inits import INITS
    from .leaderboard import board_rows_for
    from .methods import METHODS
    from .models import MODELS
    from .train import Engine

    seed, lr = spec.runs[k]
    stds = None
    if data is not None:
        stds = Engine(build_cell(spec, data_source(task_of(spec))), data).activation_stds_at_init(seed)
    run = {"task": spec.task, "method": spec.method, "init": spec.init, "optimizer": spec.optimizer,
           "seed": int(seed), "lr": float(lr), "steps": spec.train["steps"],
           "model": dict(spec.task_config["model"]), "record": record, "run": k}
    telemetry = {name: np.asarray(arrays[name][k]) for name in ("loss", "grad_norm", "layer_grad_norm")}
    diag = diagnose.diagnose(telemetry, layer_names, run, int(arrays["diverged_at"][k]), stds, at_init)
    rows, where = board_rows_for(results, spec) if results else ([], None)
    if rows:
        recs = diagnose.board_recommendations(rows, str(where))
    else:
        model_args = set(MODELS.entry(spec.task_config["model"]["name"]).parameters())
        recs = diagnose.rule_recommendations(diag, set(METHODS.names()), set(INITS.names()),
                                             model_args)
    return replace(diag, recommendations=recs)

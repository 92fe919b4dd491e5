"""One cell from spec to stored record: load data, compile and train, compute metrics, save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .config import RunSpec, build_cell, data_source, task_of
from .data import Dataset, check_finite, fake
from .metrics import run_metrics
from .store import Record, Store, provenance

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stabench" / "jax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Persist compiled programs so a re-run recompiles nothing (STABENCH_CACHE_DIR overrides)."""
    import jax

    directory = str(directory or os.environ.get("STABENCH_CACHE_DIR") or DEFAULT_CACHE)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


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


def rerun(record: Record, data_dir: str | None = None) -> list[str]:
    """Retrain a stored record's spec; the differences from what it stored (empty: reproduced)."""
    body, arrays = train_spec(record.spec, load_data(record.spec, data_dir))
    stored = record.telemetry()
    out = []
    for name, values in arrays.items():
        if not np.array_equal(np.asarray(values), stored[name], equal_nan=True):
            with np.errstate(invalid="ignore"):
                diff = np.nanmax(np.abs(np.asarray(values, np.float64) - stored[name]))
            out.append(f"telemetry {name}: max abs difference {diff:.3g}")
    for i, (new, old) in enumerate(zip(body["runs"], record.runs)):
        for key, value in new.items():
            if not (value == old[key] or (np.isnan(value) and np.isnan(old[key]))):
                out.append(f"run {i} {key}: stored {old[key]!r}, now {value!r}")
    return out


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

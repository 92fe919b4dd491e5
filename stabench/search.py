"""Bayesian search that keeps the compiled program: Optuna's TPE asking a batch of trials at a time.

`--search 'optuna(n=K, batch=B)'` makes one study per combination of the sweep's lists (task
variant, optimizer, init, method template; lists stay grid axes). A study searches the ranges of
its methods' traced arguments (`clip_norm(max_norm=loguniform(0.01,10))`, see `methods.Traced`)
and, with `lr=loguniform(a,b)`, the learning rate. Each trial is a cell: the template with the
drawn values (4 significant digits), trained on every seed (and every lr of the cell unless the lr
is searched). Optuna asks B trials; they train as the runs of ONE compiled program, their drawn
values per-run inputs like the learning rate, so a study compiles once per shape (a short last
batch is padded with copies of its last trial). Their objective values (median over seeds, best
learning rate; a diverged run counts as the worst value) are told back; repeat until K.

Trials are stored like any cell, so `report` reads the directory. Re-running the same command
replays the study (the sampler is seeded, the told values are read from the records) and trains
only the batches not stored. A study with nothing to search is its one cell.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .config import RunSpec, build_cell, data_source, make_spec, program_key, task_of
from .methods import METHODS, resolve, traced_values
from .metrics import VALIDATION_OF
from .registry import UserError
from .sweeps import SIGNIFICANT, Optuna, Range, SweepSpec, Template

LR_PARAM = "lr"


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("--search optuna needs Optuna: pip install -e .[scale]") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class Study:
    """A method template whose ranges (and the learning rate, if searched) a study draws."""

    task: str
    overrides: dict
    optimizer: str | None
    init: str
    template: Template
    seeds: int | None
    lrs: tuple[float, ...] | None
    fake_data: bool
    lr: Range | None

    @property
    def dims(self) -> list[tuple[str, tuple[int, str], Range]]:
        """(parameter name, template axis, range) of every searched value, the lr last."""
        out = [(f"{self.template.terms[i].name}.{k}#{i}", (i, k), v)
               for i, k, v in self.template.axes()]
        return out + ([(LR_PARAM, None, self.lr)] if self.lr else [])

    def label(self) -> str:
        parts = [self.task, self.template.text, self.init, self.optimizer or "task optimizer"]
        return " | ".join(parts) + (f" | lr={self.lr}" if self.lr else "")

    def trial_spec(self, params: dict[str, float]) -> RunSpec:
        choice = {axis: params[name] for name, axis, _ in self.dims if axis is not None}
        lrs = (params[LR_PARAM],) if self.lr else self.lrs
        return make_spec(self.task, self.template.render(choice), self.init, self.optimizer,
                         self.seeds, lrs, self.overrides, self.fake_data)


def _traceable(template: Template) -> None:
    for i, k, _ in template.axes():
        entry = METHODS.entry(template.terms[i].name)
        traced = entry.meta.get("traced", ())
        if k not in traced:
            where = f"method '{template.text}'"
            if traced:
                raise UserError(f"{where}: optuna searches {entry.name}'s "
                                f"{', '.join(traced)}, the arguments its compiled program takes "
                                f"as inputs, not {k}; for {k} use a list [a, b] (a grid) or "
                                f"--search 'random(n=K)'")
            searchable = sorted(f"{e.name}.{a}" for e in METHODS.entries()
                                for a in e.meta.get("traced", ()))
            raise UserError(f"{where}: {entry.name} has no argument optuna can search; it "
                            f"searches {', '.join(searchable)} and lr=loguniform(a,b)")


def studies(sweep: SweepSpec, search: Optuna) -> list[Study]:
    """Every study of the sweep, its ranges checked (both bounds must make a valid cell)."""
    out = []
    for entry, variant, opt_s, init_s, method_s in sweep.combinations(search):
        for text, kind in ((opt_s, "optimizer"), (init_s, "init")):
            if text and Template.parse(text, kind).axes():
                raise UserError(f"{kind} '{text}': optuna searches method arguments and the "
                                f"learning rate; for ranges of {kind} arguments use "
                                f"--search 'random(n=K)'")
        template = Template.parse(method_s, "method")
        _traceable(template)
        study = Study(entry.name, variant, opt_s, init_s, template, entry.seeds or sweep.seeds,
                      entry.lrs or sweep.lrs, sweep.fake_data, search.lr)
        for bound in ("low", "high"):
            study.trial_spec({name: getattr(r, bound) for name, _, r in study.dims})
        out.append(study)
    return out


def suggest(trial, study: Study) -> dict[str, float]:
    """Optuna's values for a trial, rounded as random search rounds its draws."""
    out = {}
    for name, _, r in study.dims:
        value = trial.suggest_float(name, r.low, r.high, log=r.kind == "loguniform")
        out[name] = float(f"{value:.{SIGNIFICANT}g}")
    return out


def trial_value(spec: RunSpec, runs: list[dict], objective: str) -> float:
    """A trial's objective: the median over seeds at its best learning rate. A diverged run's
    metrics are already the worst (infinite loss, zero accuracy). The target objective reads the
    validation split, never the test split."""
    metric, sense = (("final_train_loss", "min") if objective == "loss"
                     else (VALIDATION_OF[spec.target[0]], spec.target[2]))
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        by_lr.setdefault(run["lr"], []).append(run[metric])
    medians = [float(np.median(v)) for v in by_lr.values()]
    return min(medians) if sense == "min" else max(medians)


def train_batch(engine, specs: list[RunSpec], size: int, store) -> list:
    """The trials' records: those not stored yet trained as the runs of one program, padded to
    `size` trials, and stored each (through runner.store_cells, under each trial's lock)."""
    from .runner import cell_record, store_cells

    def train(todo: list[RunSpec]) -> list[tuple[dict, dict]]:
        padded = todo + [todo[-1]] * (size - len(todo))
        seeds = np.array([s for spec in padded for s, _ in spec.runs])
        lrs = np.array([lr for spec in padded for _, lr in spec.runs])
        values = np.array([traced_values(resolve(spec.method)) for spec in padded
                           for _ in spec.runs], np.float32).reshape(len(lrs), -1)
        # methods without traced arguments (a study that searches nothing) take no per-run values
        result = engine.run(seeds, lrs, values=values if values.size else None)
        share = 1.0 / len(padded)  # of the program's time, so records' times add up
        timing = {**{k: v * share if k.endswith("_s") else v for k, v in result.timing.items()},
                  "program_runs": len(lrs)}
        cells, start = [], 0
        for spec in todo:
            part = replace(result.take(start, start + len(spec.runs)), timing=timing)
            cells.append(cell_record(spec, part))
            start += len(spec.runs)
        return cells

    return [done.record for done in store_cells(specs, store, train)]


@dataclass
class StudyResult:
    study: Study
    trials: list[tuple[RunSpec, float]]  # every trial asked, in order, with its objective value
    trained: int  # trials trained by this run (the others were stored)
    seconds: float

    def best(self, sense: str) -> tuple[RunSpec, float]:
        return best_trial(self.trials, sense)


def best_trial(trials: list[tuple[RunSpec, float]], sense: str) -> tuple[RunSpec, float]:
    return (min if sense == "min" else max)(trials, key=lambda t: t[1])


def sense_of(study: Study, objective: str) -> str:
    if objective == "loss":
        return "min"
    return study.trial_spec({n: r.low for n, _, r in study.dims}).target[2]


def run_study(study: Study, search: Optuna, store, data, engines: dict,
              log: Callable[[str], None] = lambda _: None) -> StudyResult:
    from .train import Engine

    optuna = import_optuna()
    t0 = time.perf_counter()
    n = search.n if study.dims else 1
    sense = sense_of(study, search.objective)
    with warnings.catch_warnings():  # constant_liar is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=search.seed, constant_liar=True,
                                             n_startup_trials=min(search.batch, n))
    opt = optuna.create_study(direction="minimize" if sense == "min" else "maximize",
                              sampler=sampler)
    trials: list[tuple[RunSpec, float]] = []
    trained = 0
    while len(trials) < n:
        asked = [opt.ask() for _ in range(min(search.batch, n - len(trials)))]
        specs = [study.trial_spec(suggest(t, study)) for t in asked]
        records = [store.load(spec) for spec in specs]
        if any(r is None for r in records):
            key = program_key(specs[0])
            if key not in engines:
                engines[key] = Engine(build_cell(specs[0], data_source(task_of(specs[0]))), data)
            todo = [spec for spec, r in zip(specs, records) if r is None]
            new = iter(train_batch(engines[key], todo, min(search.batch, n), store))
            records = [r if r is not None else next(new) for r in records]
            trained += len(todo)
        for trial, spec, record in zip(asked, specs, records):
            value = trial_value(spec, record.runs, search.objective)
            opt.tell(trial, value)
            trials.append((spec, value))
        best_spec, best = best_trial(trials, sense)
        log(f"  trials {len(trials)}/{n}: best {best:.4g} ({best_spec.method}"
            f"{f', lr {best_spec.lrs[0]:.4g}' if study.lr else ''})")
    return StudyResult(study, trials, trained, time.perf_counter() - t0)


def run_search(sweep: SweepSpec, search: Optuna, out: str, data_dir: str | None = None,
               log: Callable[[str], None] = print) -> list[StudyResult]:
    """Run every study of the sweep in this process; trials are stored in `out`."""
    from .executor import DataCache
    from .process import prepare
    from .store import Store, check_writable
    from .train import backend_compiles

    import_optuna()
    todo = studies(sweep, search)
    check_writable(out)
    prepare()
    store, data, engines = Store(out), DataCache(data_dir), {}
    results = []
    compiles = backend_compiles()
    for k, study in enumerate(todo, 1):
        log(f"study {k}/{len(todo)}: {study.label()}"
            + ("" if study.dims else f" | searches nothing: one cell, not {search.n} trials"))
        probe = study.trial_spec({n: r.low for n, _, r in study.dims})
        results.append(run_study(study, search, store, data(probe), engines, log))
    trained = sum(r.trained for r in results)
    log(f"{len(todo)} studies, {sum(len(r.trials) for r in results)} trials ({trained} trained, "
        f"{sum(len(r.trials) for r in results) - trained} stored); {backend_compiles() - compiles}"
        f" XLA compilations; results in {out}")
    return results

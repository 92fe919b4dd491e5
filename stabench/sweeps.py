"""Sweeps: lists and grids of tasks, methods, inits and optimizers expanded into cells.

A template is a registry string whose arguments may be lists or ranges (benchopt's grid grammar):
`clip_norm(max_norm=[0.25,1,4])` is three cells under `--search grid`;
`clip_norm(max_norm=loguniform(0.01,10))` draws values under `--search random(n=K, seed=S)`, and
Optuna chooses them under `--search optuna(n=K, batch=B)` (lists stay grid axes there; see
`stabench.search`).
Task overrides (`--set model.depth=[4,8]`) with a list for a field that is not itself a list are a
grid of task variants whatever the search. The learning rate is not a cell axis: every cell trains
its whole learning-rate grid in one program.

A suite (`tasks/suites/NAME.toml`) names the same lists in a file; see `load_suite`.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import math
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import methods
from .config import RunSpec, make_spec
from .registry import (Call, Registry, UserError, literal_value, parse_call, parse_expression,
                       split_plus)
from .tasks import TRAIN_BOUNDS, check_lrs, get_task, positive_int, read_toml, task_dir

RANGES = ("loguniform", "uniform")
LIST_OPTIONS = ("method", "init", "optimizer")  # sweep flags taking several values
SIGNIFICANT = 4  # drawn values are rounded to 4 significant digits: readable, reproducible names


@dataclass(frozen=True, repr=False)
class Range:
    """A continuous search range; integer bounds draw integers (e.g. warmup steps)."""

    kind: str
    low: float
    high: float

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def sample(self, rng: np.random.Generator):
        if self.kind == "loguniform":
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        if self.integer:
            return int(min(max(round(x), self.low), self.high))
        return float(f"{x:.{SIGNIFICANT}g}")

    def __str__(self) -> str:
        return f"{self.kind}({self.low!r},{self.high!r})"

    __repr__ = __str__  # a template keeps its ranges when rendered (Optuna)


def _range(node: ast.Call, where: str) -> Range:
    kind = node.func.id
    bounds = []
    for arg in node.args:
        value = literal_value(arg, where)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise UserError(f"{where}: {kind} bounds must be numbers, got '{ast.unparse(arg)}'")
        bounds.append(value)
    if len(bounds) != 2 or node.keywords:
        raise UserError(f"{where}: write {kind}(low, high)")
    low, high = bounds
    if not low < high or (kind == "loguniform" and low <= 0):
        raise UserError(f"{where}: {kind}({low}, {high}) needs "
                        f"{'0 < low < high' if kind == 'loguniform' else 'low < high'}")
    return Range(kind, low, high)


@dataclass(frozen=True)
class Choices:
    """The values of a list argument: a grid axis."""

    values: tuple

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i]


@dataclass(frozen=True)
class Term:
    """One registry name with arguments; an argument is a value, Choices or a Range."""

    name: str
    kwargs: tuple[tuple[str, Any], ...]

    def axes(self) -> list[str]:
        return [k for k, v in self.kwargs if isinstance(v, (Choices, Range))]

    def render(self, choice: dict[str, Any]) -> str:
        if not self.kwargs:
            return self.name
        args = ", ".join(f"{k}={choice.get(k, v)!r}" for k, v in self.kwargs)
        return f"{self.name}({args})"


def parse_term(text: str, kind: str) -> Term:
    """`name(k=v, k2=[a,b], k3=loguniform(lo,hi))`: lists are grid axes, ranges search axes."""
    where = f"{kind} '{text}'"
    node = parse_expression(text, kind)
    if isinstance(node, ast.Tuple) and kind in LIST_OPTIONS:  # --method none,clip_norm
        raise UserError(f"cannot parse {where}: a list option takes space-separated values, e.g. "
                        f"--{kind} {' '.join(shlex.quote(ast.unparse(e)) for e in node.elts)} "
                        f"(--lrs and --set take commas)")
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return Term(*parse_call(text, kind)[:1], ())  # a bare name, or parse_call's own error
    if node.args:
        raise UserError(f"{where}: arguments must be named, e.g. {node.func.id}(key=value)")
    kwargs = []
    for kw in node.keywords:
        if kw.arg is None:
            raise UserError(f"{where}: '**' is not allowed")
        value = kw.value
        if isinstance(value, ast.List):
            if not value.elts:
                raise UserError(f"{where}: the list for '{kw.arg}' is empty")
            distinct = []  # by equality, as values may be unhashable lists
            for item in (literal_value(e, where) for e in value.elts):
                if item not in distinct:
                    distinct.append(item)
            kwargs.append((kw.arg, Choices(tuple(distinct))))
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                and value.func.id in RANGES:
            kwargs.append((kw.arg, _range(value, where)))
        else:
            kwargs.append((kw.arg, literal_value(value, where)))
    return Term(node.func.id, tuple(kwargs))


@dataclass(frozen=True)
class Template:
    """A method, init or optimizer string with grid or search axes; methods compose with '+'."""

    text: str
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, text: str, kind: str) -> Template:
        parts = split_plus(text) if kind == "method" else [text]
        return cls(text, tuple(parse_term(p, kind) for p in parts))

    def axes(self) -> list[tuple[int, str, Any]]:
        return [(i, k, dict(t.kwargs)[k]) for i, t in enumerate(self.terms) for k in t.axes()]

    def render(self, choice: dict[tuple[int, str], Any]) -> str:
        return "+".join(t.render({k: v for (i, k), v in choice.items() if i == n})
                        for n, t in enumerate(self.terms))


# ---- search strategies ---------------------------------------------------------------------------
SEARCHES = Registry("searcher")


class Grid:
    def expand(self, template: Template) -> list[str]:
        axes = template.axes()
        for _, key, values in axes:
            if isinstance(values, Range):
                raise UserError(f"'{template.text}': {key}={values} is a search range; use "
                                f"--search 'random(n=K)' or list the values as [a, b, ...]")
        keys = [(i, k) for i, k, _ in axes]
        return [template.render(dict(zip(keys, combo)))
                for combo in itertools.product(*(v.values for _, _, v in axes))]


@dataclass(frozen=True)
class Random:
    n: int
    seed: int

    def expand(self, template: Template) -> list[str]:
        axes = template.axes()
        if not axes:
            return [template.text]
        # Seeded by the template text: the same draws whatever else the sweep contains.
        digest = int(hashlib.sha256(template.text.encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([self.seed, digest])
        out = []
        for _ in range(self.n):
            choice = {(i, k): v.sample(rng) if isinstance(v, Range) else v[rng.integers(len(v))]
                      for i, k, v in axes}
            out.append(template.render(choice))
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Optuna:
    """Bayesian search (TPE): per combination of the lists, a study of n trials over the ranges of
    the methods' traced arguments (and the learning rate if `lr` is a range), asked `batch` at a
    time and trained as the runs of one compiled program (`stabench.search`)."""

    n: int
    batch: int
    seed: int
    objective: str
    lr: Range | None

    def expand(self, template: Template) -> list[str]:
        """The studies of a template: every combination of its lists, its ranges kept."""
        axes = [(i, k, v) for i, k, v in template.axes() if isinstance(v, Choices)]
        keys = [(i, k) for i, k, _ in axes]
        return [template.render(dict(zip(keys, combo)))
                for combo in itertools.product(*(v.values for _, _, v in axes))]


# Random draws are each validated before anything trains, an Optuna batch is one program's runs:
# a count past this is a typo, not a search.
MAX_TRIALS = 1000


def _check_search(seed: int, **counts: int) -> None:
    for name, count in counts.items():
        if count > MAX_TRIALS:
            raise ValueError(f"{name} must be at most {MAX_TRIALS}")
    if seed < 0:  # numpy's and Optuna's generators take non-negative seeds only
        raise ValueError("seed must be >= 0")


OBJECTIVES = {"loss": "the final training loss",
              "target": "the validation metric that stands for the task's target metric"}


@SEARCHES.register("grid", help="every combination of the listed argument values")
def grid() -> Grid:
    return Grid()


@SEARCHES.register("random", help="n random draws per template: list values uniformly, "
                                  "loguniform(a,b) / uniform(a,b) ranges continuously",
                   ref="Bergstra & Bengio 2012")
def random(n: int = 10, seed: int = 0) -> Random:
    if n <= 0:
        raise ValueError("n must be positive")
    _check_search(seed, n=n)
    return Random(n, seed)


@SEARCHES.register("optuna", help="Optuna's TPE: n trials per combination of the lists, asked "
                                  "`batch` at a time and trained as the runs of one compiled "
                                  "program; ranges of traced method arguments, and "
                                  "lr=loguniform(a,b) to search the learning rate; objective "
                                  "loss or target",
                   ref="Bergstra et al. 2011 (TPE); Akiba et al. 2019 (Optuna)", ranges=("lr",))
def optuna(n: int = 32, batch: int = 8, seed: int = 0, objective: str = "loss",
           lr: Range | None = None) -> Optuna:
    if n <= 0 or batch <= 0:
        raise ValueError("n and batch must be positive")
    _check_search(seed, n=n, batch=batch)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
    if lr is not None and not isinstance(lr, Range):
        raise ValueError("lr must be a range: lr=loguniform(a,b) or lr=uniform(a,b)")
    if lr is not None and lr.low <= 0:
        raise ValueError("the lr range must hold positive rates only")
    return Optuna(n, batch, seed, objective, lr)


def parse_search(text: str):
    """A search strategy from its string; only the arguments an entry names in `ranges` take a
    range, e.g. `optuna(n=32, batch=8, lr=loguniform(0.001,1))`."""
    term = parse_term(text, "search")
    ranges = {k: v for k, v in term.kwargs if isinstance(v, Range)}
    if any(isinstance(v, Choices) for _, v in term.kwargs):
        raise UserError(f"search '{text}': arguments take one value, not a list")
    plain = Term(term.name, tuple((k, v) for k, v in term.kwargs if k not in ranges))
    call = SEARCHES.resolve(plain.render({}))
    allowed = SEARCHES.entry(call.name).meta.get("ranges", ())
    for key in ranges:
        if key not in allowed:
            raise UserError(f"search '{text}': {key} takes a number, not a range"
                            if key in dict(call.kwargs) else
                            f"search '{text}': unknown argument '{key}'. Accepted: "
                            f"{', '.join(k for k, _ in call.kwargs) or 'none'}")
    return SEARCHES.build(Call(call.name, tuple({**dict(call.kwargs), **ranges}.items())))


# ---- sweeps --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskEntry:
    """A task with overrides (lists are grids of variants) and its own lists, if any."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    methods: tuple[str, ...] | None = None
    inits: tuple[str, ...] | None = None
    optimizers: tuple[str, ...] | None = None
    seeds: int | None = None
    lrs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SweepSpec:
    tasks: tuple[TaskEntry, ...]
    methods: tuple[str, ...] = ("none",)
    inits: tuple[str, ...] = ("default",)
    optimizers: tuple[str | None, ...] = (None,)  # None: each task's own optimizer
    seeds: int | None = None  # None: each task's own
    lrs: tuple[float, ...] | None = None
    search: str = "grid"
    fake_data: bool = False
    overrides: tuple[tuple[str, Any], ...] = field(default=())  # applied to every task

    def combinations(self, search) -> Iterator[tuple[TaskEntry, dict, str | None, str, str]]:
        """(task entry, overrides, optimizer, init, method) of every cell in order, the strings
        expanded by the search."""
        expanded: dict[tuple[str, str], list[str]] = {}

        def expand(text: str, kind: str) -> list[str]:
            if (text, kind) not in expanded:
                expanded[(text, kind)] = search.expand(Template.parse(text, kind))
            return expanded[(text, kind)]

        for entry in self.tasks:
            overrides = {**dict(entry.overrides), **dict(self.overrides)}  # the command line wins
            for variant in task_variants(entry.name, overrides):
                for opt in entry.optimizers or self.optimizers:
                    for opt_s in ([None] if opt is None else expand(opt, "optimizer")):
                        for init in entry.inits or self.inits:
                            for init_s in expand(init, "init"):
                                for method in entry.methods or self.methods:
                                    for method_s in expand(method, "method"):
                                        yield entry, variant, opt_s, init_s, method_s

    def cells(self) -> list[RunSpec]:
        """Every cell, validated, in order (task variants outermost), duplicates removed."""
        search = parse_search(self.search)
        if isinstance(search, Optuna):
            raise UserError(f"search '{self.search}' chooses its cells as it trains: use "
                            f"stabench.search.run_search")
        cells: dict[str, RunSpec] = {}
        for entry, variant, opt_s, init_s, method_s in self.combinations(search):
            spec = make_spec(entry.name, method_s, init_s, opt_s, entry.seeds or self.seeds,
                             entry.lrs or self.lrs, variant, self.fake_data)
            cells.setdefault(spec.hash, spec)
        return list(cells.values())


def task_variants(name: str, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Override sets of a task: a list value for a field that is not a list is a grid axis."""
    config = get_task(name).config
    axes, fixed = [], {}
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        current = (config if not section else config.get(section, {})).get(leaf)
        if isinstance(value, list) and not isinstance(current, list):
            if not value:
                raise UserError(f"--set {key}: the list of values is empty")
            axes.append((key, value))
        else:
            fixed[key] = value
    return [{**fixed, **dict(zip((k for k, _ in axes), combo))}
            for combo in itertools.product(*(v for _, v in axes))]


def parse_shard(text: str) -> tuple[int, int]:
    """`i/N` with 1 <= i <= N."""
    i, slash, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = 0
    if not slash or n < 1 or not 1 <= i <= n:
        raise UserError(f"--shard must be i/N with 1 <= i <= N, got '{text}'")
    return i, n


def shard(cells: list[RunSpec], i: int, n: int) -> list[RunSpec]:
    """Shard i of n (1-based): every n-th cell in sweep order, so shards get a similar mix."""
    return cells[i - 1::n]


# ---- suites --------------------------------------------------------------------------------------
SUITE_KEYS = {"description": str, "tasks": list, "methods": list, "inits": list,
              "optimizers": list, "seeds": int, "lrs": list, "search": str, "tuning": int}
ENTRY_KEYS = {"name": str, "set": dict, "methods": list, "inits": list, "optimizers": list,
              "seeds": int, "lrs": list}


def suite_path(name: str) -> Path:
    """A suite name (tasks/suites/NAME.toml) or a path to a suite file."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"suite file {name} does not exist")
        return path
    directory = Path(str(task_dir())) / "suites"
    path = directory / f"{name}.toml"
    if not path.is_file():
        from .registry import closest

        names = sorted(p.name[:-5] for p in directory.glob("*.toml")) if directory.is_dir() else []
        raise UserError(f"unknown suite '{name}'.{closest(name, names)} "
                        f"Valid suites: {', '.join(names) or 'none'}")
    return path


def _check(table: dict, keys: dict, where: str) -> None:
    for key, value in table.items():
        if key not in keys:
            raise UserError(f"{where}: unknown field '{key}'; valid: {', '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, keys[key]):
            raise UserError(f"{where}: field '{key}' must be {keys[key].__name__}, got {value!r}")
        if key == "lrs":
            check_lrs(value, f"{where}: field 'lrs'")
        elif keys[key] is list and key != "tasks" and not all(isinstance(x, str) for x in value):
            raise UserError(f"{where}: field '{key}' must list strings")
        if key == "seeds":
            positive_int(f"{where}: field 'seeds'", value, TRAIN_BOUNDS["seeds"])


def load_suite(name: str) -> tuple[str, dict]:
    """Parse and check a suite file; returns its name and document.

    Top level: description, tasks, and optional methods, inits, optimizers, seeds, lrs, search,
    tuning. `tasks` lists task names or tables {name, set = {"model.depth" = [4, 8]}, and any of
    methods, inits, optimizers, seeds, lrs for that task alone}. `tuning = N` declares the tuning
    budget: on every task, each method run at more than one setting runs at exactly N
    (`check_tuning`).
    """
    path = suite_path(name)
    where = f"suite {path.name}"
    doc = read_toml(path, where)
    _check(doc, SUITE_KEYS, where)
    if not doc.get("tasks"):
        raise UserError(f"{where}: field 'tasks' must list at least one task")
    for i, entry in enumerate(doc["tasks"]):
        if isinstance(entry, dict):
            _check(entry, ENTRY_KEYS, f"{where}, tasks[{i}]")
            if "name" not in entry:
                raise UserError(f"{where}, tasks[{i}]: missing field 'name'")
        elif not isinstance(entry, str):
            raise UserError(f"{where}, tasks[{i}]: write a task name or a table with 'name'")
    if "tuning" in doc:
        check_tuning(doc, where)
    return path.stem, doc


def method_settings(templates: list[str], search) -> dict[tuple[str, ...], list[str]]:
    """The settings a list of method templates expands to, by method family (the call names):
    each setting once, as the method string of its cell (defaults filled in)."""
    families: dict[tuple[str, ...], list[str]] = {}
    for text in templates:
        for method in search.expand(Template.parse(text, "method")):
            calls = methods.resolve(method)
            settings = families.setdefault(tuple(c.name for c in calls), [])
            if methods.canonical(calls) not in settings:
                settings.append(methods.canonical(calls))
    return families


def check_tuning(doc: dict, where: str) -> None:
    """The tuning budget `tuning = N` (AlgoPerf's external tuning: the same budget for every
    method): on every task, each method family run at more than one setting (a list of values,
    and its registered defaults if listed apart) runs at exactly N of them; the error names every
    offender."""
    budget = positive_int(f"{where}: field 'tuning'", doc["tuning"], MAX_TRIALS)
    search = parse_search(doc.get("search", "grid"))
    if isinstance(search, Optuna):
        raise UserError(f"{where}: a tuning budget counts the settings a suite lists; search "
                        f"'{doc['search']}' chooses them as it trains: use grid")
    offenders = []
    for i, entry in enumerate(doc["tasks"]):
        entry = {"name": entry} if isinstance(entry, str) else entry
        templates = entry.get("methods") or doc.get("methods") or ["none"]
        for names, settings in method_settings(templates, search).items():
            if len(settings) > 1 and len(settings) != budget:
                offenders.append(f"tasks[{i}] ({entry['name']}): {'+'.join(names)} has "
                                 f"{len(settings)} ({'; '.join(settings)})")
    if offenders:
        raise UserError(f"{where}: tuning = {budget} settings per tuned method, but "
                        f"{' | '.join(offenders)}. List exactly {budget} values for each, as in "
                        f"clip_norm(max_norm=[...]) with {budget} numbers")


def suite_spec(doc: dict, fake_data: bool = False, overrides: dict | None = None,
               seeds: int | None = None, lrs: tuple[float, ...] | None = None) -> SweepSpec:
    """The sweep a suite document describes; command-line seeds, lrs and overrides win."""
    entries = []
    for entry in doc["tasks"]:
        entry = {"name": entry} if isinstance(entry, str) else entry
        entries.append(TaskEntry(
            entry["name"], tuple(entry.get("set", {}).items()),
            _tuple(entry.get("methods")), _tuple(entry.get("inits")),
            _tuple(entry.get("optimizers")), None if seeds else entry.get("seeds"),
            None if lrs else _tuple(entry.get("lrs"))))
    return SweepSpec(
        tasks=tuple(entries), methods=_tuple(doc.get("methods")) or ("none",),
        inits=_tuple(doc.get("inits")) or ("default",),
        optimizers=_tuple(doc.get("optimizers")) or (None,),
        seeds=seeds or doc.get("seeds"), lrs=lrs or _tuple(doc.get("lrs")),
        search=doc.get("search", "grid"), fake_data=fake_data,
        overrides=tuple((overrides or {}).items()))


def _tuple(x):
    return tuple(x) if x else None

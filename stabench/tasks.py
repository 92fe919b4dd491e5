"""Task specs: one TOML file per task under tasks/, loaded into frozen TaskSpec values.

Users add their own task files without touching the package: STABENCH_TASKS_DIR names one or more
directories (separated like PATH) whose *.toml files are loaded after the built-in tasks.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .registry import (INT_LIMIT, TOO_DEEP, TOO_LARGE, UserError, check_value, closest,
                       parse_call)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOSS_OF = {"classification": "cross_entropy", "regression": "mse"}  # a dataset's task_type
LOSSES = tuple(LOSS_OF.values())
TARGET_METRICS = {"test_accuracy": "max", "test_loss": "min"}

# section -> field -> (type, required)
SCHEMA: dict[str, dict[str, tuple[type | tuple, bool]]] = {
    "": {"description": (str, True), "aliases": (list, False), "expect": (str, False),
         "loss": (str, True)},
    "dataset": {"name": (str, True), "val_fraction": ((int, float), False)},
    "model": {"name": (str, True)},
    "train": {"optimizer": (str, True), "lrs": (list, True), "seeds": (int, True),
              "steps": (int, True), "batch_size": (int, True), "eval_every": (int, True),
              "precision": (str, False)},
    "target": {"metric": (str, True), "value": ((int, float), True)},
    "telemetry": {"sharpness_every": (int, False)},
}
OPEN_SECTIONS = ("dataset", "model")  # their other keys are the factory's arguments
# Sections a task may leave out. A field at its default is dropped, and the section once empty, so
# a cell that sets one to its default is the cell without it (one record, one compiled program).
OPTIONAL_SECTIONS = {"telemetry": {"sharpness_every": 0}}
# The share of a dataset's training split held out for validation (data.hold_out): the learning
# rate and method settings are chosen on it, never on the test split. A task file may set its own.
DEFAULT_VAL_FRACTION = 0.1
SPLIT_FIELDS = ("val_fraction",)  # dataset fields that are not arguments of its factory
# Far above any task's, low enough that a stray digit fails here rather than filling memory (the
# telemetry holds every step of every run); other integers only have to fit JAX's int32.
TRAIN_BOUNDS = {"seeds": 1000, "steps": 1_000_000}
# train.precision: the compute dtype of the forward and backward pass (parameters, optimizer state
# and the loss stay float32). The default is left out of a task's config, so a float32 cell keeps
# the hash it had before precision was a setting.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_PRECISION = "fp32"


def positive_int(name: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        raise UserError(f"{name} must be positive and at most {most:,}, got {value!r}")
    return value


def check_lrs(values, where: str = "") -> tuple[float, ...]:
    """A learning-rate grid, sorted (one grid in any order is one cell): one or more distinct,
    positive, finite numbers. `where` (a flag, a file's field) starts the error message."""
    values = list(values)
    prefix = f"{where}: " if where else ""
    if not values or not all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                             and math.isfinite(x) and x > 0 for x in values):
        raise UserError(f"{prefix}learning rates must be positive finite numbers, got {values}")
    lrs = [float(x) for x in values]
    if len(set(lrs)) < len(lrs):  # a repeated one would train the same runs and count them twice
        raise UserError(f"{prefix}learning rates must be distinct, got {lrs}")
    return tuple(sorted(lrs))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: dict  # the validated TOML document, overrides applied
    source: str

    @property
    def description(self) -> str:
        return self.config["description"]

    @property
    def train(self) -> dict:
        return self.config["train"]

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def val_fraction(self) -> float | None:
        """The share of the training split held out for validation; None in records trained
        before tasks held one out."""
        return self.config["dataset"].get("val_fraction")

    def component(self, section: str) -> str:
        """The dataset or model section as a registry spec string: name(k=v, ...)."""
        fields = dict(self.config[section])
        name = fields.pop("name")
        if section == "dataset":
            for key in SPLIT_FIELDS:
                fields.pop(key, None)
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items()))
        return f"{name}({args})" if args else name


def task_dir():
    """tasks/ of a source checkout (editable installs, `python -m` from the repo), else the copy
    installed as package data `stabench.task_files`."""
    checkout = Path(__file__).resolve().parent.parent / "tasks"
    if checkout.is_dir():
        return checkout
    return resources.files("stabench.task_files")


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def validate(doc: dict, source: str) -> dict:
    """Check a task document against SCHEMA; errors name the file and the field."""
    for section, fields in SCHEMA.items():
        table = doc if section == "" else doc.get(section)
        if section in OPTIONAL_SECTIONS and section not in doc:
            continue
        if not isinstance(table, dict):
            raise UserError(f"{source}: missing section [{section}]")
        for field, (ftype, required) in fields.items():
            key = f"{section}.{field}" if section else field
            if field not in table:
                if required:
                    raise UserError(f"{source}: missing field '{key}'")
                continue
            value = table[field]
            if isinstance(value, bool) or not isinstance(value, ftype):
                raise UserError(
                    f"{source}: field '{key}' must be {_type_name(ftype)}, got {value!r}"
                )
        if section and section not in OPEN_SECTIONS:
            extra = set(table) - set(fields)
            if extra:
                raise UserError(f"{source}: unknown field(s) {sorted(extra)} in [{section}]")
    train = doc["train"]
    check_lrs(train["lrs"], f"{source}: field 'train.lrs'")
    for field in ("seeds", "steps", "batch_size", "eval_every"):
        positive_int(f"{source}: field 'train.{field}'", train[field],
                     TRAIN_BOUNDS.get(field, INT_LIMIT))
    precision = train.get("precision", DEFAULT_PRECISION)
    if precision not in PRECISIONS:
        raise UserError(f"{source}: field 'train.precision' must be one of "
                        f"{', '.join(PRECISIONS)}, got {precision!r}")
    if precision == DEFAULT_PRECISION:
        train.pop("precision", None)
    if doc["loss"] not in LOSSES:
        raise UserError(f"{source}: field 'loss' must be one of {', '.join(LOSSES)}")
    if doc["target"]["metric"] not in TARGET_METRICS:
        raise UserError(
            f"{source}: field 'target.metric' must be one of {', '.join(TARGET_METRICS)}"
        )
    value = doc["target"]["value"]
    if not (0 <= value <= 1 if doc["target"]["metric"] == "test_accuracy" else value > 0):
        raise UserError(f"{source}: field 'target.value' must lie in [0, 1] for test_accuracy and "
                        f"be positive for test_loss, got {value}")
    fraction = doc["dataset"].get("val_fraction")
    if fraction is not None and not 0 < fraction < 1:
        raise UserError(f"{source}: field 'dataset.val_fraction' must lie in (0, 1), got "
                        f"{fraction!r}")
    for section in OPEN_SECTIONS:
        spec = ", ".join(f"{k}={v!r}" for k, v in doc[section].items() if k != "name")
        parse_call(f"{doc[section]['name']}({spec})", section)
    every = doc.get("telemetry", {}).get("sharpness_every", 0)
    if not 0 <= every <= INT_LIMIT:
        raise UserError(f"{source}: field 'telemetry.sharpness_every' must be 0 (off) or a "
                        f"positive number of steps, got {every!r}")
    for section, defaults in OPTIONAL_SECTIONS.items():
        if section in doc:
            for field, default in defaults.items():
                if doc[section].get(field) == default:
                    del doc[section][field]
            if not doc[section]:
                del doc[section]
    return doc


TASKS_DIR_ENV = "STABENCH_TASKS_DIR"


def user_task_dirs() -> list[Path]:
    """The directories of user task files named by STABENCH_TASKS_DIR; each must exist."""
    dirs = [Path(d) for d in os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep) if d]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{TASKS_DIR_ENV}: no directory {d}")
    return dirs


def _load_all(user_dirs: list[Path]) -> dict[str, TaskSpec]:
    tasks = {}
    places = [(task_dir(), "tasks/")] + [(d, f"{d}{os.sep}") for d in user_dirs]
    for directory, label in places:
        for path in sorted(directory.iterdir(), key=lambda p: p.name):
            if not path.name.endswith(".toml"):
                continue
            name = path.name[: -len(".toml")]
            source = f"{label}{path.name}"
            if name in tasks:
                raise UserError(f"{source}: task '{name}' is already defined by "
                                f"{tasks[name].source}; rename one of them")
            tasks[name] = _read_task(path, source)
    return tasks


def read_toml(path: Path, where: str) -> dict:
    """A TOML file's document (task files, suites); `where` names the file in errors."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where}: not valid TOML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: cannot read it ({err.__class__.__name__})") from None


def _read_task(path: Path, source: str) -> TaskSpec:
    """The task a file defines, named by the file's stem; `source` names the file in errors."""
    doc = validate(read_toml(path, source), source)
    doc["dataset"].setdefault("val_fraction", DEFAULT_VAL_FRACTION)  # what runs is recorded
    return TaskSpec(path.name[: -len(".toml")], doc, source)


_CACHE: dict[tuple[Path, ...], dict[str, TaskSpec]] = {}


def all_tasks() -> dict[str, TaskSpec]:
    user_dirs = user_task_dirs()
    key = tuple(user_dirs)
    if key not in _CACHE:
        _CACHE[key] = _load_all(user_dirs)
    return _CACHE[key]


def aliases() -> dict[str, str]:
    return {a: t.name for t in all_tasks().values() for a in t.config.get("aliases", [])}


def get_task(name: str) -> TaskSpec:
    """A task by name or alias, or the task file at a path ending in .toml (a spec holds the
    file's content, so its records reproduce without the file)."""
    tasks = all_tasks()
    if name.endswith(".toml"):
        return _task_file(Path(name), tasks)
    name = aliases().get(name, name)
    if name not in tasks:
        choices = sorted(tasks) + sorted(aliases())
        raise UserError(
            f"unknown task '{name}'.{closest(name, choices)} Valid tasks: "
            f"{', '.join(sorted(tasks))}; or give a task file's path (--task FILE.toml), or name "
            f"directories of task files in {TASKS_DIR_ENV}"
        )
    return tasks[name]


def _task_file(path: Path, tasks: dict[str, TaskSpec]) -> TaskSpec:
    if not path.is_file():
        raise UserError(f"no task file {path}")
    task = _read_task(path, str(path))
    known = tasks.get(task.name)
    # one name, two definitions: their records would share a directory and a leaderboard row
    if known is not None and known.config != task.config:
        raise UserError(f"{path}: task '{task.name}' is already defined by {known.source}; "
                        f"rename the file")
    return task


def parse_value(text: str, where: str = "--set") -> Any:
    """A --set value: a TOML literal (number, bool, list, quoted string); comma-separated literals
    are a list, as in --lrs (model.depth=4,16 is model.depth=[4,16]); else a bare string."""
    for literal in [text, f"[{text}]"] if "," in text else [text]:
        try:
            value = tomllib.loads(f"v = {literal}")["v"]
        except tomllib.TOMLDecodeError:
            continue
        except RecursionError:
            raise UserError(f"{where}: {TOO_DEEP}") from None
        except ValueError:  # an integer past the digits Python converts
            raise UserError(f"{where}: {TOO_LARGE}") from None
        return check_value(value, where)
    return text


def _factory_arguments(doc: dict, section: str) -> set[str]:
    """The arguments the factory named in an open section takes (none if it names no factory)."""
    from .data import DATASETS  # registries import their entries: not at module load
    from .models import MODELS

    registry = {"dataset": DATASETS, "model": MODELS}[section]
    name = doc.get(section, {}).get("name")
    return set(registry.entry(name).parameters()) if name in registry else set()


def flatten(d: dict, prefix: str = "") -> dict:
    """A task document with dotted keys, one level deep: {"model": {"depth": 4}} gives
    {"model.depth": 4}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def with_overrides(task: TaskSpec, overrides: dict[str, Any]) -> TaskSpec:
    """Apply `section.key=value` overrides; keys must exist (open sections accept new args)."""
    doc = copy.deepcopy(task.config)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        optional = field in OPTIONAL_SECTIONS.get(section, {})
        if optional:
            doc.setdefault(section, {})
        table = doc if section == "" else doc.get(section)
        optional = optional or field in SCHEMA.get(section, {})  # a field a file may leave out
        if not isinstance(table, dict) or (field not in table and section not in OPEN_SECTIONS
                                           and not optional):
            valid = sorted(set(
                [k for k, v in doc.items() if not isinstance(v, dict)]
                + [f"{s}.{k}" for s, t in doc.items() if isinstance(t, dict) for k in t]
                + [f"{s}.{k}" for s, fields in OPTIONAL_SECTIONS.items() for k in fields]
                + [f"{s}.{k}" if s else k for s, fields in SCHEMA.items() for k in fields]))
            # the open sections also take any argument of their factory: suggest one that exists
            guesses = valid + [f"{s}.{field}" for s in OPEN_SECTIONS
                               if field in _factory_arguments(doc, s)]
            raise UserError(
                f"--set: no key '{key}' in task {task.name}.{closest(key, guesses)}"
                f" Valid keys: {', '.join(valid)}; and "
                f"{', '.join(f'{s}.ARG' for s in OPEN_SECTIONS)} for any argument of the task's "
                f"dataset or model (see: stabench list datasets, list models)"
            )
        table[field] = value
    return TaskSpec(task.name, validate(doc, f"{task.source} with --set"), task.source)

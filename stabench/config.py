"""Run specs: what a cell is, validated up front, with a stable hash; and building a cell from
one."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import methods, plugins
from .data import DATASETS, Source, fake_sizes, with_validation
from .inits import INITS
from .models import MODELS
from .optimizers import OPTIMIZERS
from .registry import Call, UserError, closest
from .tasks import (DEFAULT_PRECISION, LOSS_OF, PRECISIONS, TARGET_METRICS, TRAIN_BOUNDS,
                    TaskSpec, all_tasks, check_lrs, get_task, positive_int, with_overrides)

FORMAT_VERSION = 3
# The input values of a cell's dataset: over 10 times CIFAR-10's, 8 GB as float32, so a size past
# it is a typo that would exhaust memory while the data loads.
MAX_DATA_VALUES = 2_000_000_000


@dataclass(frozen=True)
class RunSpec:
    """A cell: task (with overrides resolved), method, init, optimizer, and its runs."""

    task: str
    task_config: dict
    method: str
    init: str
    optimizer: str
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    fake_data: bool = False
    # package -> sha256 of its source, for each plugin the cell's entries come from
    plugins: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"format_version": FORMAT_VERSION, **asdict(self)}
        if not self.plugins:  # a cell of built-ins hashes as it did before plugins existed
            del d["plugins"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        d = {k: v for k, v in d.items() if k != "format_version"}
        return cls(**{**d, "seeds": tuple(d["seeds"]), "lrs": tuple(d["lrs"])})

    @property
    def hash(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def runs(self) -> list[tuple[int, float]]:
        """(seed, lr) of every run, learning-rate major."""
        return [(s, lr) for lr in self.lrs for s in self.seeds]

    @property
    def train(self) -> dict:
        return self.task_config["train"]

    @property
    def target(self) -> tuple[str, float, str]:
        t = self.task_config["target"]
        return t["metric"], float(t["value"]), TARGET_METRICS[t["metric"]]


def program_key(spec: RunSpec) -> str:
    """What a cell's Engine and its compiled programs depend on: the spec without its seeds,
    learning rates and the values of its methods' traced arguments (runs of one program differ in
    those), so trials of a search over them share one key."""
    masked = [Call(c.name, tuple((k, "<traced>" if k in methods.traced_args(c) else v)
                                 for k, v in c.kwargs))
              for c in methods.resolve(spec.method)]
    config = {**spec.task_config, "train": {**spec.train, "seeds": None, "lrs": None}}
    d = {**spec.to_dict(), "method": methods.canonical(tuple(masked)), "seeds": None, "lrs": None,
         "task_config": config}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def plugin_hashes(spec: RunSpec) -> dict[str, str]:
    """The source hashes of the plugins that a cell's method, init, optimizer, model and dataset
    come from: part of its identity, so a changed plugin retrains the cells that use it."""
    entries = [methods.METHODS.entry(c.name) for c in methods.resolve(spec.method)]
    entries += [registry.entry(registry.resolve(text).name)
                for registry, text in ((INITS, spec.init), (OPTIMIZERS, spec.optimizer))]
    entries += [registry.entry(spec.task_config[section]["name"])
                for registry, section in ((MODELS, "model"), (DATASETS, "dataset"))]
    return plugins.identity(entry.factory for entry in entries)


def parse_lrs(text: str, flag: str = "--lrs") -> tuple[float, ...]:
    try:
        # an empty entry ("0.1,,1") is a typo, not a value to drop
        lrs = tuple(float(x) for x in text.split(",")) if text.strip() else ()
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got '{text}'") from None
    return check_lrs(lrs, flag)


def make_spec(task: str, method: str = "none", init: str = "default", optimizer: str | None = None,
              seeds: int | None = None, lrs: tuple[float, ...] | None = None,
              overrides: dict[str, Any] | None = None, fake_data: bool = False) -> RunSpec:
    """Validate every part of a cell before anything runs or is written."""
    spec_task = with_overrides(get_task(task), overrides or {})
    train = spec_task.train
    seeds = positive_int("seeds", train["seeds"] if seeds is None else seeds, TRAIN_BOUNDS["seeds"])
    lrs = check_lrs(train["lrs"] if lrs is None else lrs)
    try:  # a wrong dataset or model argument is an error in the task file (or in --set)
        source = data_source(spec_task)
        MODELS.get(spec_task.component("model"))
        _check_loss_fits(spec_task, source.meta)
    except UserError as err:
        fields = ("dataset.", "model.", "loss", "target.")
        by_set = any(k.startswith(fields) for k in overrides or {})
        raise UserError(f"{spec_task.source}{' with --set' if by_set else ''}: {err}") from None
    meta = source.meta
    n_train, n_val, n_test = (fake_sizes(meta) if fake_data
                              else (meta.n_train, meta.n_val, meta.n_test))
    values = (n_train + n_val + n_test) * math.prod(meta.x_shape)
    if values > MAX_DATA_VALUES:
        raise UserError(f"dataset {spec_task.component('dataset')} holds {values:,} input values: "
                        f"at most {MAX_DATA_VALUES:,}")
    if train["batch_size"] > n_train:
        raise UserError(f"batch size {train['batch_size']} exceeds the {n_train} training examples "
                        f"of task {spec_task.name}")
    calls = methods.resolve(method)
    optimizer = str(OPTIMIZERS.resolve(optimizer or train["optimizer"]))
    # the record's task config says what ran, not what the task file proposed
    config = {**spec_task.config,
              "train": {**train, "optimizer": optimizer, "seeds": seeds, "lrs": list(lrs)}}
    spec = RunSpec(
        task=spec_task.name,
        task_config=config,
        method=methods.canonical(calls),
        init=str(INITS.resolve(init)),
        optimizer=optimizer,
        seeds=tuple(range(seeds)),
        lrs=lrs,
        fake_data=fake_data,
    )
    spec = replace(spec, plugins=plugin_hashes(spec))
    cell = build_cell(spec, source)  # factories check their own arguments now, not mid-sweep
    model = _check_model_fits(cell, spec_task)
    # a layer is looked up when the update is traced: trace it now (0.2 s for a ResNet, so only
    # for the methods that name one)
    if any(dict(c.kwargs).get("layer") for c in calls):
        trace_first_update(cell, model)
    return spec


def _check_loss_fits(task: TaskSpec, meta) -> None:
    """Cross-entropy needs class labels, MSE real targets; a regression has no accuracy."""
    kind, wanted, dataset = meta.task_type, LOSS_OF[meta.task_type], task.config["dataset"]["name"]
    if task.loss != wanted:
        raise UserError(f"loss '{task.loss}' does not fit dataset {dataset}, a {kind}: its loss "
                        f"is '{wanted}'")
    if kind == "regression" and task.config["target"]["metric"] == "test_accuracy":
        raise UserError(f"target.metric 'test_accuracy' does not fit dataset {dataset}, a "
                        f"regression: use 'test_loss'")


# A run's parameters: over 100 times the largest task's, and 400 MB per run before gradients
# and optimizer state, so a size past it is a typo that would exhaust memory mid-compile.
MAX_PARAMETERS = 100_000_000


def _check_model_fits(cell, task: TaskSpec):
    """Build the model abstractly (shapes only, no compute) so a model that cannot take the
    dataset's inputs, or is absurdly large, fails here, in one line; returns the abstract model."""
    import jax
    from flax import nnx

    try:
        model = nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0)))
    except ValueError as err:
        raise UserError(f"model {task.component('model')} on task {task.name}: {err}") from None
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if count > MAX_PARAMETERS:
        raise UserError(f"model {task.component('model')} on task {task.name} has {count:,} "
                        f"parameters: at most {MAX_PARAMETERS:,}")
    return model


def trace_first_update(cell, model) -> None:
    """Trace the cell's first update on the abstract model's parameter shapes, compiling nothing:
    a method naming a layer the model lacks, or whose state does not fit the methods composed with
    it, fails here, not once training starts."""
    import jax
    from flax import nnx

    def first_update(params):
        grads = params if cell.fault is None else cell.fault(params, 0)
        tx = cell.transform.build(0.1, jax.random.key(0))
        return tx.update(grads, tx.init(params), params)

    if not cell.transform.needs_value:  # a line search's update also evaluates the loss
        jax.eval_shape(first_update, nnx.state(model, nnx.Param))


def data_source(task: TaskSpec) -> Source:
    """The task's dataset with its validation split held out of the training split (records
    trained before tasks held one out have none)."""
    source = DATASETS.get(task.component("dataset"))
    return source if task.val_fraction is None else with_validation(source, task.val_fraction)


def source_named(name: str) -> Source:
    """A dataset by its own name (cifar10) or by a task that uses it (cifar, deep_plain)."""
    if name in DATASETS:
        return DATASETS.get(name)
    try:
        return data_source(get_task(name))
    except UserError:
        choices = DATASETS.names() + sorted(all_tasks())
        raise UserError(f"no dataset or task named '{name}'.{closest(name, choices)} Datasets: "
                        f"{', '.join(DATASETS.names())}; tasks: {', '.join(sorted(all_tasks()))}"
                        ) from None


def task_of(spec: RunSpec) -> TaskSpec:
    return TaskSpec(spec.task, spec.task_config, f"record of task {spec.task}")


def build_cell(spec: RunSpec, source: Source):
    """The engine's Cell for a spec: model builder with the init, the update (methods and
    optimizer), loss. The model is built abstractly here, so an init that needs structure the
    model lacks fails now with a UserError."""
    from flax import nnx

    from .program import Cell

    task = task_of(spec)
    calls = methods.resolve(spec.method)
    changes = methods.model_args(calls)
    if changes:  # the "model" methods' arguments of the model's builder
        task = with_overrides(task, {f"model.{k}": v for k, v in changes})
        model = task.config["model"]["name"]
        for arg, _ in changes:
            if arg not in MODELS.entry(model).parameters():
                takers = [e.name for e in MODELS.entries() if arg in e.parameters()]
                raise UserError(f"method {spec.method} sets the model argument {arg}, which model "
                                f"{model} does not take (models that do: {', '.join(takers)})")
    init = INITS.get(spec.init)
    model_spec = task.component("model")
    if init.model_args:
        needs = ", ".join(f"{k}={v!r}" for k, v in init.model_args)
        try:
            with_args = with_overrides(task, {f"model.{k}": v for k, v in init.model_args}
                                       ).component("model")
            build_model = MODELS.get(with_args)
        except UserError as err:
            if init.check is not None:  # the structure the model lacks says it more plainly
                init.check(nnx.eval_shape(
                    lambda: MODELS.get(model_spec)(source.meta, None, nnx.Rngs(0))))
            raise UserError(f"init '{spec.init}' needs a model built with {needs}: {err}") from None
        model_spec = with_args
    else:
        build_model = MODELS.get(model_spec)
    meta = source.meta

    def make(rngs):
        return build_model(meta, init.kernel_init, rngs)

    try:
        abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    except ValueError as err:  # an initializer that does not fit a layer's shape
        raise UserError(f"init '{spec.init}' on model '{model_spec}': {err}") from None
    if init.check is not None:
        init.check(abstract)
    train = spec.train
    transform = methods.transform(calls, OPTIMIZERS.get(spec.optimizer),
                                  train["steps"], abstract.layer_order,
                                  getattr(abstract, "stacked_layers", ()))
    if (transform.loss_terms or transform.outputs) and spec.task_config["loss"] != "cross_entropy":
        raise UserError(f"method {spec.method} acts on a classifier's logits: task {spec.task}'s "
                        f"loss is {spec.task_config['loss']}, not cross_entropy")
    return Cell(
        build_model=make,
        transform=transform,
        fault=methods.build_fault(calls),
        loss=spec.task_config["loss"],
        steps=train["steps"],
        batch_size=train["batch_size"],
        eval_every=train["eval_every"],
        after_init=init.after,
        sharpness_every=spec.task_config.get("telemetry", {}).get("sharpness_every", 0),
        adam=adam_hyperparameters(spec.optimizer),
        compute_dtype=PRECISIONS[train.get("precision", DEFAULT_PRECISION)],
    )


def adam_hyperparameters(optimizer: str) -> tuple[float, float, float] | None:
    """(b1, b2, eps) of optax's Adam in the optimizer, whose state the preconditioned sharpness
    reads; None for the others."""
    call = OPTIMIZERS.resolve(optimizer)
    if call.name not in ("adam", "adamw"):
        return None
    kwargs = dict(call.kwargs)
    return kwargs["b1"], kwargs["b2"], kwargs["eps"]

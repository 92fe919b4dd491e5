"""Every task trains a few steps in one compiled cell: TFDS tasks on tfds.testing.mock_data, the
others on their real bundled or generated data. --fake-data has each task's exact shapes."""

import numpy as np
import pytest
from flax import nnx

from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.data import fake, fake_sizes
from stabench.tasks import all_tasks
from stabench.train import Engine, compiled_names

from conftest import run_cli

# Tiny models and problem sizes: the test checks wiring, not accuracy.
TINY_MODEL = {
    "resnet": {"model.depth": 8, "model.width": 4},
    "cnn": {"model.channels": [4, 8], "model.hidden": 16},
    "transformer": {"model.dim": 16, "model.depth": 2, "model.heads": 2},
    "rnn": {"model.hidden": 8},
    "mlp": {"model.width": 16},
}
TINY_DATA = {
    "adding": {"dataset.T": 20, "dataset.n_train": 64, "dataset.n_test": 16},
    "temporal_order": {"dataset.T": 20, "dataset.n_train": 64, "dataset.n_test": 16},
    "listops": {"dataset.max_length": 64, "dataset.n_train": 64, "dataset.n_test": 16},
    "teacher": {"dataset.n_train": 64, "dataset.n_test": 16},
    "imdb_reviews": {"dataset.seq_len": 32},
    "ag_news_subset": {"dataset.seq_len": 32},
}
MOCK_EXAMPLES = 16
TASKS = sorted(all_tasks())


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    """Tasks with identical programs (mnist and fashion_mnist, the CIFAR twins' init) compile
    once."""
    from stabench.process import prepare

    prepare()


def tiny_spec(name, **kw):
    task = all_tasks()[name]
    overrides = {"train.steps": 4, "train.eval_every": 2, "train.batch_size": 8,
                 **TINY_MODEL[task.config["model"]["name"]],
                 **TINY_DATA.get(task.config["dataset"]["name"], {})}
    return make_spec(name, "clip_norm", seeds=1, lrs=(0.01, 0.05), overrides=overrides, **kw)


def load(spec):
    source = data_source(task_of(spec))
    if source.kind != "tfds":
        return source, source.load(None)
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        return source, source.load(None)


def test_catalog_has_at_least_12_tasks_with_descriptions_and_expectations():
    assert len(TASKS) >= 12
    for task in all_tasks().values():
        assert task.description and task.config.get("expect"), task.name
    assert all_tasks()["cifar10"].config["aliases"] == ["cifar"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_every_task_trains_in_one_compiled_cell(name):
    spec = tiny_spec(name)
    source, data = load(spec)
    meta = source.meta
    assert data.x_train.shape[1:] == meta.x_shape and data.x_train.dtype == np.dtype(meta.x_dtype)
    assert data.x_test.shape[1:] == meta.x_shape and data.y_train.shape[1:] == meta.y_shape
    if meta.task_type == "classification":
        assert data.y_train.min() >= 0 and data.y_train.max() < meta.num_outputs
    if meta.vocab_size:
        assert data.x_train.min() >= 0 and data.x_train.max() < meta.vocab_size

    engine = Engine(build_cell(spec, source), data)
    before = compiled_names()
    result = engine.run(np.array([0, 0]), np.array([0.01, 0.05]))
    cell_programs = ["jit(init_run)", "jit(_chunk_run)"]
    programs = [n for n in compiled_names()[len(before):] if n in cell_programs]
    assert programs == cell_programs  # whatever the number of runs
    assert result.timing["steady_compiles"] == 0

    loss = result.telemetry["loss"]
    assert loss.shape == (2, 4) and np.isfinite(loss).all()
    assert result.telemetry["layer_grad_norm"].shape == (2, 4, len(result.layer_names))
    assert np.isfinite(result.telemetry["layer_grad_norm"]).all()
    parts = [n.split("[")[0].split("/")[0] for n in result.layer_names]
    order = nnx.eval_shape(lambda: engine.cell.build_model(nnx.Rngs(0))).layer_order
    assert parts == sorted(parts, key=order.index)  # per-layer telemetry in depth order
    assert list(result.eval_steps) == [2, 4]
    metric = "test_accuracy" if spec.task_config["loss"] == "cross_entropy" else "test_loss"
    assert np.isfinite(result.evals[metric]).all()
    scores = ("loss", "accuracy") if metric == "test_accuracy" else ("loss",)
    assert result.evals.keys() == {f"{split}_{s}" for split in ("val", "test") for s in scores}
    assert np.isfinite(result.evals[metric.replace("test_", "val_")]).all()


@pytest.mark.parametrize("name", TASKS)
def test_fake_data_has_the_tasks_exact_shapes_dtypes_and_classes(name):
    spec = tiny_spec(name, fake_data=True)
    source, real = load(spec)
    fk = fake(source.meta)
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        a, b = getattr(real, split), getattr(fk, split)
        assert a.shape[1:] == b.shape[1:] and a.dtype == b.dtype, split
    assert (real.mean is None) == (fk.mean is None)
    meta = source.meta
    if meta.task_type == "classification":
        assert set(np.unique(fk.y_train)) == set(range(meta.num_outputs))
    if meta.vocab_size:  # every token but 0, which pads (the Transformer masks it)
        assert fk.x_train.max() == meta.vocab_size - 1 and fk.x_train.min() == 1
    assert len(fk.x_train) == fake_sizes(meta)[0] == min(meta.n_train, 8192)


def test_list_tasks_shows_availability():
    proc = run_cli("list", "tasks", "--data-dir", "/nonexistent/stabench-data")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in all_tasks()}
    assert len(lines) == len(TASKS)
    assert lines["digits"] == "bundled" and lines["adding"] == "generated"
    assert lines["cifar10"] == "missing" and lines["imdb"] == "missing"
    assert "python -m stabench data" in proc.stdout and "--fake-data" in proc.stdout


@pytest.mark.parametrize("what", ["models", "datasets"])
def test_list_models_and_datasets_with_help(what):
    from stabench.data import DATASETS
    from stabench.models import MODELS

    proc = run_cli("list", what)
    assert proc.returncode == 0, proc.stderr
    for entry in (MODELS if what == "models" else DATASETS).entries():
        assert entry.name in proc.stdout and entry.help in proc.stdout

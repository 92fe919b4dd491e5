"""The validation split: held out of the training data once per task, evaluated beside the test
split, and the only data the leaderboard reads when it chooses a learning rate."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from stabench import leaderboard as lb
from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.data import DATASETS, Dataset, Meta, fake, hold_out, split_sizes
from stabench.metrics import run_metrics
from stabench.program import TELEMETRY
from stabench.registry import UserError
from stabench.runner import load_data
from stabench.store import Store, provenance
from stabench.tasks import DEFAULT_VAL_FRACTION, get_task
from stabench.train import Engine


# ---- the split ---------------------------------------------------------------------------------
def numbered(n_train=50, n_test=7) -> Dataset:
    """A dataset whose every example carries its own index: x = [index], y = index."""
    meta = Meta((1,), "float32", n_train + n_test, n_train, n_test)
    x = np.arange(n_train + n_test, dtype=np.float32)[:, None]
    y = np.arange(n_train + n_test, dtype=np.int32)
    return Dataset(meta, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def test_hold_out_moves_a_fixed_share_of_training_examples_and_leaves_the_test_split():
    data = numbered()
    split = hold_out(data, 0.2)
    fit, val = split.y_train.tolist(), split.y_val.tolist()
    assert len(val) == 10 and len(fit) == 40
    assert sorted(fit + val) == list(range(50)) and not set(fit) & set(val)
    assert fit == sorted(fit) and val == sorted(val)  # each part keeps the original order
    np.testing.assert_array_equal(split.x_train[:, 0], split.y_train)  # inputs follow targets
    np.testing.assert_array_equal(split.x_val[:, 0], split.y_val)
    assert split.x_test is data.x_test and split.y_test is data.y_test
    assert (split.meta.n_train, split.meta.n_val, split.meta.n_test) == (40, 10, 7)
    # one split for every run: nothing but the data decides it
    assert hold_out(numbered(), 0.2).y_val.tolist() == val
    assert val != list(range(10))  # drawn at random, not the first examples


@pytest.mark.parametrize("fraction, n, message", [
    (0.0, 50, r"val_fraction must lie in \(0, 1\)"),
    (1.0, 50, r"val_fraction must lie in \(0, 1\)"),
    (0.01, 20, "leaves 0 for validation and 20 for training"),
    (0.99, 20, "leaves 20 for validation and 0 for training"),
])
def test_split_sizes_refuse_an_empty_side(fraction, n, message):
    with pytest.raises(UserError, match=message):
        split_sizes(n, fraction)


def test_every_task_holds_out_its_default_share_and_a_task_may_set_its_own():
    assert get_task("adding").config["dataset"]["val_fraction"] == DEFAULT_VAL_FRACTION
    spec = make_spec("digits", seeds=1, lrs=(0.1,))
    raw = DATASETS.get(task_of(spec).component("dataset")).meta  # the factory takes no fraction
    meta = data_source(task_of(spec)).meta
    assert meta.n_val == round(DEFAULT_VAL_FRACTION * raw.n_train)
    assert meta.n_train + meta.n_val == raw.n_train and meta.n_test == raw.n_test
    other = make_spec("digits", seeds=1, lrs=(0.1,), overrides={"dataset.val_fraction": 0.25})
    assert other.hash != spec.hash  # another split is another cell
    assert data_source(task_of(other)).meta.n_val == round(0.25 * raw.n_train)
    with pytest.raises(UserError, match=r"'dataset.val_fraction' must lie in \(0, 1\), got 1.5"):
        make_spec("digits", overrides={"dataset.val_fraction": 1.5})


def test_loaded_and_fake_data_hold_the_sizes_the_meta_announces():
    spec = make_spec("digits", seeds=1, lrs=(0.1,))
    meta = data_source(task_of(spec)).meta
    data = load_data(spec)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (
        meta.n_train, meta.n_val, meta.n_test)
    faked = fake(meta)
    assert len(faked.x_val) == meta.n_val and faked.x_val.shape[1:] == meta.x_shape


def test_a_record_trained_before_the_split_reruns_on_the_whole_training_split():
    spec = make_spec("digits", seeds=1, lrs=(0.1,))
    dataset = {k: v for k, v in spec.task_config["dataset"].items() if k != "val_fraction"}
    old = dataclasses.replace(spec, task_config={**spec.task_config, "dataset": dataset})
    meta = data_source(task_of(old)).meta
    assert meta.n_val == 0 and meta.n_train == DATASETS.get("digits").meta.n_train


# ---- evaluation ----------------------------------------------------------------------------------
def test_the_program_scores_the_validation_split_with_the_runs_parameters():
    """val_loss and val_accuracy after a chunk equal the cross-entropy and accuracy of the run's
    model on the held-out examples, called here on all of them at once (144: the program's last
    batch of 128 is padded)."""
    spec = make_spec("digits", seeds=1, lrs=(0.3,),
                     overrides={"train.steps": 3, "train.eval_every": 3, "model.width": 16})
    data = load_data(spec)
    engine = Engine(build_cell(spec, data_source(task_of(spec))), data)
    seeds, lrs = np.array([0], np.int32), np.array([0.3], np.float32)
    init, chunk, _ = engine.compile(*jax.device_put((seeds, lrs)))
    idx = engine.batch_indices(seeds, 0)
    carry = init(seeds, lrs, idx[:, 0], engine.arrays)
    carry, _, ev = chunk(carry, idx, lrs, np.int32(0), engine.arrays)
    one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[0]), tree)  # noqa: E731
    model = nnx.merge(engine.program.graphdef, one(jax.device_get(carry.params)),
                      one(jax.device_get(carry.model_state)))
    model.eval()
    logits = np.asarray(model(jnp.asarray(data.x_val)), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_p[np.arange(len(data.y_val)), data.y_val].mean()
    accuracy = (logits.argmax(-1) == data.y_val).mean()
    assert len(data.y_val) % engine.cell.batch_size != 0
    assert float(ev["val_loss"][0]) == pytest.approx(loss, rel=1e-5)
    assert float(ev["val_accuracy"][0]) == pytest.approx(accuracy, abs=1e-6)
    assert float(ev["val_loss"][0]) != float(ev["test_loss"][0])  # another split


# ---- choosing the learning rate -----------------------------------------------------------------
LRS = (0.1, 1.0, 10.0)
STEPS = 30


def save_record(store, method, scores, seeds=3, old=False):
    """A digits record whose runs' metrics come from run_metrics on constructed telemetry and
    evaluations: scores(seed, lr) -> {split_metric: final value}, e.g. {"val_accuracy": 0.9};
    unnamed splits score 0.5 (accuracy) and 1.0 (loss). A diverging run: {"diverged": True}.
    `old`: a record of a task without a validation split, whose runs have no val metrics."""
    spec = make_spec("digits", method, seeds=seeds, lrs=LRS,
                     overrides={"train.steps": STEPS, "train.eval_every": 10})
    if old:
        dataset = {k: v for k, v in spec.task_config["dataset"].items() if k != "val_fraction"}
        spec = dataclasses.replace(spec, task_config={**spec.task_config, "dataset": dataset})
    eval_steps = np.array([10, 20, 30])
    runs, losses = [], []
    for seed, lr in spec.runs:
        s = dict(scores(seed, lr))
        frozen = 15 if s.pop("diverged", False) else -1
        tel = {k: np.full(STEPS, 0.5, np.float32) for k in TELEMETRY}
        tel.update(loss=np.linspace(2.0, 0.5, STEPS), nonfinite=np.zeros(STEPS),
                   changed=np.zeros(STEPS), layer_grad_norm=np.ones((STEPS, 1)))
        if frozen >= 0:
            tel["loss"][frozen:] = np.nan
        splits = ("test",) if old else ("val", "test")
        evals = {f"{p}_{m}": np.full(3, s.get(f"{p}_{m}", 0.5 if m == "accuracy" else 1.0))
                 for p in splits for m in ("loss", "accuracy")}
        runs.append({"seed": seed, "lr": lr,
                     **run_metrics(tel, evals, eval_steps, frozen, spec.target)})
        losses.append(tel["loss"])
    arrays = {"loss": np.array(losses, np.float32), "lrs": np.array([lr for _, lr in spec.runs]),
              "seeds": np.array([s for s, _ in spec.runs])}
    body = {"runs": runs, "provenance": provenance(), "layer_names": ["layer"],
            "timing": {"compile_s": 1.0, "steady_s": 1.0, "init_s": 0.0, "steps_done": STEPS,
                       "steady_compiles": 0, "compile_cache_hits": 0, "samples_per_s": 1.0},
            "eval_steps": eval_steps.tolist()}
    return store.save(spec, body, arrays)


def boards_of(store):
    records, bad = store.records()
    assert not bad
    return lb.build_leaderboards(records)


def opposed(seed, lr):
    """Validation is best at lr 0.1, test at lr 1.0 (and test would prefer 10 to 0.1)."""
    val = {0.1: 0.9, 1.0: 0.6, 10.0: 0.5}[lr]
    test = {0.1: 0.7, 1.0: 0.95, 10.0: 0.8}[lr]
    return {"val_accuracy": val + 0.01 * seed, "test_accuracy": test + 0.01 * seed}


def test_the_board_picks_validations_learning_rate_and_reports_test_there(tmp_path):
    store = Store(tmp_path)
    save_record(store, "none", opposed)
    (board,) = boards_of(store).boards.values()
    row = board.iloc[0]
    assert row["best_lr"] == 0.1
    assert row["quality_mean"] == pytest.approx(0.71)  # test accuracy at lr 0.1, seeds 0, 1, 2
    assert "chosen on the validation split" in lb.task_caption("digits", board,
                                                               boards_of(store).used)


def test_selection_reads_no_test_column(tmp_path):
    """The chosen rate survives shuffled, corrupted and removed test columns."""
    store = Store(tmp_path)
    save_record(store, "none", opposed)
    used = boards_of(store).used
    metric, mode = "test_accuracy", "max"
    chosen = lb.select_lr(used, metric, mode)
    rng = np.random.default_rng(0)
    shuffled = used.assign(test_accuracy=rng.permutation(used["test_accuracy"].to_numpy()),
                           test_loss=rng.permutation(used["test_loss"].to_numpy()))
    corrupted = used.assign(test_accuracy=np.where(used["lr"] == 10.0, 1.0, np.nan))
    removed = used.drop(columns=["test_accuracy", "test_loss"])
    assert chosen == 0.1
    assert [lb.select_lr(g, metric, mode) for g in (shuffled, corrupted, removed)] == [0.1] * 3
    assert lb.tune_entries(removed)["method"].tolist() == used["method"].tolist()


def runs_table(rows):
    """A runs table of one entry: rows of (lr, seed, val_loss, diverged)."""
    return pd.DataFrame([{"method": "none", "init": "default", "optimizer": "sgd", "lr": lr,
                          "seed": seed, "val_loss": v, "diverged": float(d),
                          "target_metric": "test_loss", "target_mode": "min"}
                         for lr, seed, v, d in rows])


def test_equal_validation_means_go_to_fewer_diverged_runs_then_the_smaller_rate():
    # lr 1 and 3 tie on the mean val_loss (0.2); 1 has one diverged seed, 3 none: 3 wins
    runs = runs_table([(0.1, 0, 0.5, 0), (0.1, 1, 0.5, 0),
                       (1.0, 0, 0.1, 1), (1.0, 1, 0.3, 0),
                       (3.0, 0, 0.2, 0), (3.0, 1, 0.2, 0)])
    assert lb.select_lr(runs, "test_loss", "min") == 3.0
    # the same divergences too: the smaller rate
    runs.loc[runs["lr"] == 1.0, "diverged"] = 0.0
    assert lb.select_lr(runs, "test_loss", "min") == 1.0
    # a lower loss wins whatever diverged; accuracy is maximized instead
    runs.loc[runs["lr"] == 0.1, "val_loss"] = 0.05
    assert lb.select_lr(runs, "test_loss", "min") == 0.1
    # maximized as accuracy, 0.05 is the worst: 1 and 3 tie again, the smaller wins
    accuracy = runs.rename(columns={"val_loss": "val_accuracy"})
    assert lb.select_lr(accuracy, "test_accuracy", "max") == 1.0


def test_records_without_validation_metrics_are_left_out_and_said_so(tmp_path):
    store = Store(tmp_path)
    save_record(store, "none", opposed)
    save_record(store, "clip_norm", opposed, old=True)
    tables = boards_of(store)
    (variant, board), = tables.boards.items()
    assert variant == "digits"  # labelled among the records that count
    assert board["method"].tolist() == ["none"]
    assert any("1 cell trained before tasks held out a validation split" in n
               for n in tables.notes)
    assert "clip_norm(max_norm=1.0)" in set(tables.runs["method"])  # still in runs.parquet

    only_old = Store(tmp_path / "old")
    save_record(only_old, "none", opposed, old=True)
    with pytest.raises(UserError, match="no learning rate can be chosen without reading the test"):
        boards_of(only_old)


def test_a_diverged_run_scores_the_worst_validation_values():
    tel = {k: np.full(STEPS, 0.5) for k in TELEMETRY}
    tel["loss"][15:] = np.nan
    evals = {"val_loss": np.array([0.3, np.nan, np.nan]),
             "val_accuracy": np.array([0.9, np.nan, np.nan]),
             "test_loss": np.array([0.3, np.nan, np.nan]),
             "test_accuracy": np.array([0.9, np.nan, np.nan])}
    out = run_metrics(tel, evals, np.array([10, 20, 30]), 15, ("test_accuracy", 0.9, "max"))
    assert out["val_loss"] == math.inf and out["val_accuracy"] == 0.0

"""The default suite tests stability on every task variant, and a record says what ran."""

import dataclasses
import json

import numpy as np
import pandas as pd

import stabench
from stabench.leaderboard import baseline_checks
from stabench.sweeps import load_suite, suite_spec


def test_default_suite_grids_span_stable_and_unstable_for_the_baseline(tmp_path):
    """The default suite's own cells of the baseline (none, every seed and rate of the suite):
    on each task variant, two rates where it diverges on some seed, two where it reaches the
    target, 20% to 80% of its runs diverged."""
    _, doc = load_suite("default")
    spec = suite_spec(doc)
    spec = dataclasses.replace(spec, methods=("none",), tasks=tuple(
        dataclasses.replace(t, methods=None, inits=None) for t in spec.tasks))
    cells = spec.cells()
    variants = {(c.task, json.dumps(c.task_config["model"], sort_keys=True)) for c in cells}
    assert len(cells) == len(variants) >= 5
    for cell in cells:
        stabench.run(cell, out=tmp_path)
    checks = baseline_checks(stabench.runs(tmp_path))
    assert len(checks) == len(cells)
    for row in checks.itertuples():
        assert len(row.diverging_lrs) >= 2, row
        assert len(row.reaching_lrs) >= 2, row
        assert 0.2 <= row.diverged_rate <= 0.8, row
        # the grid runs from stable to unstable: the baseline reaches the target below where
        # it diverges
        assert min(row.reaching_lrs) < max(row.diverging_lrs), row


def _suite(tmp_path, text: str) -> dict:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return load_suite(str(path))[1]


def test_a_suite_keeps_each_task_optimizer_unless_it_names_one(tmp_path):
    doc = _suite(tmp_path, """
tasks = ["listops", {name = "digits", optimizers = ["adam"]}, "adding"]
""")
    cells = {c.task: c for c in suite_spec(doc).cells()}
    assert cells["listops"].optimizer.startswith("adam")
    assert cells["adding"].optimizer.startswith("sgd")
    assert cells["digits"].optimizer.startswith("adam")
    for cell in cells.values():  # the record's task config is what ran
        train = cell.task_config["train"]
        assert train["optimizer"] == cell.optimizer
        assert train["lrs"] == list(cell.lrs)
        assert train["seeds"] == len(cell.seeds)


def test_runs_table_shows_the_settings_that_ran(tmp_path):
    result = stabench.run("digits", "none", optimizer="adam", seeds=2, lrs=(0.01, 0.1), steps=4,
                          overrides={"train.eval_every": 2}, out=tmp_path)
    runs = stabench.runs(tmp_path)
    assert (runs["config.train.optimizer"] == result.spec.optimizer).all()
    assert (runs["optimizer"] == result.spec.optimizer).all()
    assert runs["config.train.steps"].unique().tolist() == [4]
    assert json.loads(runs["config.train.lrs"].iloc[0]) == [0.01, 0.1]
    assert sorted(runs["lr"].unique()) == [0.01, 0.1]


def test_baseline_checks_count_rates_and_entries():
    rows = []
    for lr, div, steps in ((0.1, [0, 0], [10, 20]), (1.0, [0, 1], [30, np.inf]),
                           (10.0, [1, 1], [np.inf, np.inf])):
        for seed in (0, 1):
            rows.append({"variant": "t", "method": "none", "init": "default", "optimizer": "sgd",
                         "lr": lr, "seed": seed, "diverged": float(div[seed]),
                         "steps_to_target": float(steps[seed])})
            rows.append({"variant": "t", "method": "clip", "init": "default", "optimizer": "sgd",
                         "lr": lr, "seed": seed, "diverged": 0.0, "steps_to_target": np.inf})
    (row,) = baseline_checks(pd.DataFrame(rows)).itertuples()
    assert row.diverging_lrs == [1.0, 10.0]
    # the median over two seeds of (30, inf) is inf: 1.0 does not count as reaching the target
    assert row.reaching_lrs == [0.1]
    assert (row.diverged_runs, row.runs) == (3, 6)
    assert row.entries_reaching == 1
    assert baseline_checks(pd.DataFrame(rows).query("method != 'none'")).empty

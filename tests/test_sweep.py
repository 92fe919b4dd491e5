"""Sweeps: the grid grammar, random search, suites, shards, merge, the executor's failure handling,
the progress display, and a sweep killed mid-way and resumed giving the uninterrupted report."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from stabench import sweeps as sw
from stabench.registry import UserError

from conftest import ROOT, report_tables


def cells_of(methods=("none",), inits=("default",), tasks=("digits",), search="grid", **kw):
    spec = sw.SweepSpec(tasks=tuple(sw.TaskEntry(t) for t in tasks), methods=tuple(methods),
                        inits=tuple(inits), search=search, seeds=1, lrs=(0.1,),
                        overrides=(("train.steps", 20),), **kw)
    return spec.cells()


# ---- grammar and search --------------------------------------------------------------------------
def test_a_list_argument_is_one_cell_per_value():
    cells = cells_of(["clip_norm(max_norm=[0.25,1,4])"])
    assert [c.method for c in cells] == [f"clip_norm(max_norm={x})" for x in (0.25, 1.0, 4.0)]


def test_lists_multiply_across_terms_methods_and_inits_and_duplicates_collapse():
    cells = cells_of(["clip_value(limit=[0.1,1])+clip_norm(max_norm=[1,2])", "none",
                      "clip_norm", "clip_norm(max_norm=1.0)"],
                     ["default", "normal(std=[0.01,0.1])"])
    methods = {c.method for c in cells}
    assert len(methods) == 2 * 2 + 2  # 4 compositions, none, clip_norm (its spellings collapse)
    assert "clip_value(limit=0.1)+clip_norm(max_norm=2.0)" in methods
    assert len(cells) == 6 * 3 and len({c.hash for c in cells}) == len(cells)


def test_task_overrides_with_lists_are_variants_unless_the_field_is_a_list():
    variants = sw.task_variants("digits", {"model.depth": [1, 2], "model.residual": [False, True],
                                           "train.lrs": [0.1, 1.0], "train.steps": 5})
    assert len(variants) == 4
    assert all(v["train.lrs"] == [0.1, 1.0] and v["train.steps"] == 5 for v in variants)
    assert {(v["model.depth"], v["model.residual"]) for v in variants} == {
        (1, False), (1, True), (2, False), (2, True)}


def test_random_search_draws_in_range_and_is_reproducible():
    template = sw.Template.parse("clip_norm(max_norm=loguniform(0.01,10))+clip_value("
                                 "limit=[0.1,1])", "method")
    draws = sw.SEARCHES.get("random(n=50, seed=3)").expand(template)
    assert draws == sw.SEARCHES.get("random(n=50, seed=3)").expand(template)
    assert draws != sw.SEARCHES.get("random(n=50, seed=4)").expand(template)
    values = [sw.parse_term(d.split("+")[0], "method").kwargs[0][1] for d in draws]
    assert all(0.01 <= v <= 10 for v in values) and min(values) < 0.1 and max(values) > 1
    limits = {sw.parse_term(d.split("+")[1], "method").kwargs[0][1] for d in draws}
    assert limits == {0.1, 1}
    ints = sw.Range("loguniform", 10, 1000)
    import numpy as np
    rng = np.random.default_rng(0)
    assert all(isinstance(x, int) and 10 <= x <= 1000
               for x in (ints.sample(rng) for _ in range(50)))
    assert sw.SEARCHES.get("random(n=5)").expand(sw.Template.parse("none", "method")) == ["none"]


@pytest.mark.parametrize("method, search, message", [
    ("clip_norm(max_norm=loguniform(0.01,10))", "grid", "is a search range; use --search"),
    ("clip_norm(max_norm=loguniform(0,10))", "random(n=2)", "needs 0 < low < high"),
    ("clip_norm(max_norm=uniform(3,1))", "random(n=2)", "needs low < high"),
    ("clip_norm(max_norm=loguniform(a,1))", "random(n=2)", "bounds must be numbers"),
    ("clip_norm(max_norm=[])", "grid", "the list for 'max_norm' is empty"),
    ("clip_norm(max_norm=[1,-1])", "grid", "max_norm must be positive"),
    ("clip_norm(max_norm=(1,2))", "grid", "max_norm must be float"),  # only a list is a grid
    ("clip_norm(max_norm=[1,abc()])", "grid", "'abc()' is not a literal value"),
    ("clip_nrm(max_norm=[1,2])", "grid", "Did you mean 'clip_norm'"),
    ("none", "randm(n=2)", "Did you mean 'random'"),
    ("none", "random(n=0)", "n must be positive"),
    ("none", "random(n=1001)", "n must be at most 1000"),
    ("none", "random(n=2, seed=-1)", "seed must be >= 0"),
    ("clip_norm(max_norm=[[1],[2]])", "grid", "max_norm must be float, got [1]"),
    (f"clip_norm(max_norm=uniform(0,1{'0' * 400}))", "random(n=2)", "integers must lie within"),
])
def test_bad_sweep_input_is_a_user_error(method, search, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cells_of([method], search=search)


def test_shards_partition_the_cells():
    cells = cells_of(["clip_norm(max_norm=[0.5,1,2,4,8])", "none"], ["default", "he_normal"])
    parts = [sw.shard(cells, i, 3) for i in (1, 2, 3)]
    assert sorted(c.hash for p in parts for c in p) == sorted(c.hash for c in cells)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sw.parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "1", "a/b", "1/0"):
        with pytest.raises(UserError, match="--shard must be i/N"):
            sw.parse_shard(bad)


# ---- suites --------------------------------------------------------------------------------------
def test_suite_file_entries_override_suite_lists(tmp_path):
    path = tmp_path / "mini.toml"
    path.write_text('''
description = "two entries"
methods = ["none", "clip_norm(max_norm=[1,2])"]
inits = ["default"]
seeds = 2
lrs = [0.1, 1.0]
[[tasks]]
name = "digits"

[[tasks]]
name = "digits"
set = {"model.depth" = [2, 3], "train.steps" = 30}
methods = ["clip_value"]
seeds = 1
''')
    name, doc = sw.load_suite(str(path))
    assert name == "mini"
    cells = sw.suite_spec(doc).cells()
    first = [c for c in cells if c.task_config["model"]["depth"] == 1]
    assert sorted(c.method for c in first) == ["clip_norm(max_norm=1.0)", "clip_norm(max_norm=2.0)",
                                               "none"]
    assert all(len(c.seeds) == 2 and c.lrs == (0.1, 1.0) for c in first)
    deep = [c for c in cells if c.task_config["model"]["depth"] > 1]
    assert [(c.task_config["model"]["depth"], c.method, len(c.seeds), c.train["steps"])
            for c in deep] == [(2, "clip_value(limit=1.0)", 1, 30),
                               (3, "clip_value(limit=1.0)", 1, 30)]
    # the command line wins over the file
    cli = sw.suite_spec(doc, overrides={"train.steps": 7}, seeds=4).cells()
    assert {(c.train["steps"], len(c.seeds)) for c in cli} == {(7, 4)}


@pytest.mark.slow  # validates each of the suite's cells (model shapes traced)
def test_default_suite_tunes_every_method_on_every_task_family():
    cells = sw.suite_spec(sw.load_suite("default")[1]).cells()
    assert {c.task for c in cells} == {"digits", "deep_plain", "deep_residual", "adding",
                                       "temporal_order"}
    assert all(len(c.seeds) >= 5 and len(c.lrs) >= 5 for c in cells)
    families = {}
    for c in cells:
        key = (c.task, json.dumps(c.task_config["model"], sort_keys=True), c.init)
        families.setdefault(key, {}).setdefault(c.method.split("(")[0], set()).add(c.method)
    for settings in families.values():
        assert set(settings) == {"none", "clip_norm", "clip_value", "agc", "zclip", "warmup_frac"}
        # the same tuning budget for every method with a hyperparameter
        assert {len(v) for k, v in settings.items() if k != "none"} == {3}
    assert {c.init.split("(")[0] for c in cells if c.task == "digits"} == {"default", "he_normal"}
    # each task keeps its own optimizer
    assert all(c.optimizer == c.task_config["train"]["optimizer"] for c in cells)
    assert len({c.task_config["model"]["depth"] for c in cells if c.task == "deep_residual"}) == 2


@pytest.mark.parametrize("text, message", [
    ('tasks = ["digits"]\nmethod = ["none"]', "unknown field 'method'"),
    ('tasks = ["digits"]\nseeds = "3"', "field 'seeds' must be int"),
    ('tasks = []', "must list at least one task"),
    ('tasks = [{set = {}}]', r"tasks\[0\]: missing field 'name'"),
    ('tasks = [3]', r"tasks\[0\]: write a task name"),
    ('tasks = ["digits"]\nlrs = [0.1, -1]', "'lrs': learning rates must be positive finite"),
    ('tasks = ["digits"', "not valid TOML"),
    (b'tasks = ["digits"]\n# caf\xe9 in Latin-1', r"cannot read it \(UnicodeDecodeError\)"),
])
def test_bad_suite_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=message):
        sw.load_suite(str(path))
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        sw.load_suite("nope")


# ---- executor, resume, summary, progress ---------------------------------------------------------
def test_a_failing_cell_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    import numpy as np

    from stabench import executor, runner

    cells = cells_of(["none", "clip_norm", "clip_value"])
    calls = []

    def fake_train_spec(spec, data, on_chunk):
        calls.append(spec.method)
        if spec.method.startswith("clip_norm"):
            raise FloatingPointError("boom")
        if spec.method.startswith("clip_value"):
            raise UserError("no such layer")
        on_chunk(spec.train["steps"])
        runs = [{"seed": 0, "lr": 0.1, "diverged": 1.0}, {"seed": 1, "lr": 0.1, "diverged": 0.0}]
        return ({"runs": runs, "timing": {}, "provenance": {}, "layer_names": []},
                {"loss": np.zeros((len(runs), 3), np.float32)})

    monkeypatch.setattr(runner, "train_spec", fake_train_spec)
    monkeypatch.setattr(runner, "load_data", lambda spec, data_dir=None: None)
    out = io.StringIO()
    summary = executor.run_sweep(cells, str(tmp_path), executor.SerialExecutor(),
                                 executor.Progress(file=out, disable=False))
    assert calls == [c.method for c in cells]
    assert (summary.trained, summary.skipped, len(summary.failed)) == (1, 0, 2)
    assert (summary.runs, summary.diverged) == (2, 1)
    lines = summary.lines(str(tmp_path))
    assert "3 cells: 1 trained, 0 skipped (already stored), 2 failed" in lines[0]
    assert "FloatingPointError: boom (at test_sweep.py:" in lines[1]
    assert "UserError: no such layer" in lines[2]
    # a configuration error fails the same way again; a crash may not
    assert lines[3:] == ["configuration errors (UserError) in 1 of the failed cells: retrying "
                         "repeats them; fix what they name",
                         "run the same command again to retry the failed cells"]
    assert "sweep: 3/3 cells, 2 failed 100%" in out.getvalue()
    assert re.search(r"sweep: 1/3 cells  33%\|.*\| \[\d\d:\d\d<\d\d:\d\d\]", out.getvalue())  # ETA


def run_sweep_cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "stabench", "sweep", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_report(tmp_path, tiny_suite):
    """Two workers; the sweep is killed (SIGKILL to its process group) once its first record
    exists, one stored record is then torn by hand, and the same command finishes the rest: the
    leaderboards equal those of an uninterrupted sweep. Merging shards of it gives them too."""
    suite, whole = tiny_suite
    resumed = tmp_path / "resumed"
    proc = run_sweep_cli("--suite", suite, "--workers", "2", "--out", resumed,
                         start_new_session=True)
    deadline = time.time() + 300
    while not list(resumed.rglob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers: a power cut
    proc.communicate(timeout=60)
    stored = sorted(resumed.rglob("*.json"))
    assert 1 <= len(stored) < 4
    stored[0].write_text(stored[0].read_text()[:50])  # torn: must be trained again

    proc = run_sweep_cli("--suite", suite, "--workers", "2", "--out", resumed)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"4 cells: {5 - len(stored)} trained, {len(stored) - 1} skipped" in out
    assert f"training again: {stored[0]}: unreadable record" in err

    from stabench.store import merge

    # shards of the uninterrupted sweep, merged, are the same records again
    halves = [tmp_path / "a", tmp_path / "b"]
    for i, path in enumerate(sorted(whole.rglob("*.json"))):
        for ext in (".json", ".npz"):
            target = halves[i % 2] / path.parent.name / (path.stem + ext)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path.with_suffix(ext), target)
    merged = tmp_path / "merged"
    assert merge(merged, halves) == (4, 0, [])
    assert merge(merged, halves) == (0, 4, [])

    reports = {name: report_tables(directory, tmp_path / f"report-{name}")
               for name, directory in (("whole", whole), ("resumed", resumed), ("merged", merged))}
    assert reports["resumed"] == reports["whole"]
    assert reports["merged"] == reports["whole"]
    assert "4 cells, 16 runs, 1 task variant." in reports["whole"][0]


SWEEP_TOKENS = ["--task", "--method", "--init", "--optimizer", "--seeds", "--lrs", "--steps",
                "--set", "--search", "--shard", "--workers", "--suite", "digits", "none",
                "clip_norm",
                "clip_norm(max_norm=[0.5,1])", "clip_norm(max_norm=loguniform(0.1,1))",
                "random(n=2)", "grid", "1/2", "3/2", "0", "-1", "2", "model.depth=[1,2]",
                "train.lrs=[0.1]", "default", "he_normal", "nope", "[", "]", "=", "("]


def test_random_sweep_command_lines_never_end_in_a_traceback():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from stabench.cli import main

    @settings(max_examples=150, deadline=None)
    @given(argv=st.lists(st.one_of(st.sampled_from(SWEEP_TOKENS), st.text(max_size=12)),
                         max_size=7))
    def check(argv):
        try:
            status = main(["sweep", *argv, "--dry-run", "--out", os.devnull])
        except SystemExit as exit_:  # --help
            status = exit_.code
        assert status in (0, 2)

    check()

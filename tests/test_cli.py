"""The CLI end to end, in subprocesses, as a user types it."""

import json

import pytest

from conftest import run_cli

FAST = ("--steps", "40", "--seeds", "2", "--lrs", "0.1,3")


def test_run_writes_record_then_reuses_it(tmp_path):
    out = tmp_path / "out"
    first = run_cli("run", "--task", "digits", "--method", "clip_norm", *FAST, "--out", out)
    assert first.returncode == 0, first.stderr
    assert "record written to" in first.stdout and "test acc" in first.stdout
    records = list(out.rglob("*.json"))
    assert len(records) == 1 and records[0].with_suffix(".npz").exists()
    data = json.loads(records[0].read_text())
    assert len(data["runs"]) == 4 and data["timing"]["compile_s"] > 0
    assert data["provenance"]["versions"]["jax"]

    second = run_cli("run", "--task", "digits", "--method", "clip_norm(max_norm=1)", *FAST,
                     "--out", out)
    assert second.returncode == 0, second.stderr
    assert "reused stored record" in second.stdout
    assert records[0].read_bytes() == json.dumps(data, indent=1, sort_keys=True).encode()


@pytest.mark.parametrize("args, expected", [
    (("--task", "cifar-11"), "unknown task 'cifar-11'"),
    (("--method", "clip_nrm"), "Did you mean 'clip_norm'"),
    (("--method", "clip_norm(max_nrm=1)"), "Accepted: max_norm"),
    (("--method", "clip_norm(max_norm=)"), "cannot parse"),
    (("--method", "clip_norm(max_norm=abc)"), "max_norm must be float"),
    (("--method", "clip_norm(max_norm=-1)"), "max_norm must be positive"),
    (("--init", "hee_normal"), "Did you mean 'he_normal'"),
    (("--optimizer", "sgdd"), "Valid optimizers: adagrad, adam, adamw, lbfgs, rmsprop, sgd"),
    (("--lrs", "0.1,-1"), "positive finite"),
    (("--lrs", "0.1,nan"), "positive finite"),
    (("--lrs", ""), "positive finite"),
    (("--lrs", "0.1,,1"), "comma-separated numbers, got '0.1,,1'"),
    (("--lrs", "0.1,0.3,0.1"), "learning rates must be distinct, got [0.1, 0.3, 0.1]"),
    (("--steps", "0"), "--steps must be positive"),
    (("--seeds", "-2"), "--seeds must be positive"),
    (("--batch-size", "5000"), "exceeds the 1294 training examples"),
    (("--set", "model.nope=3"), "unknown argument 'nope'"),
    (("--set", "train.stepz=3"), "Valid keys"),
    (("--set", "model.depth=[2,4]"), "a list is a grid of values: `stabench sweep`"),
    (("--set", "loss=mse"), "loss 'mse' does not fit dataset digits, a classification: its loss "
                            "is 'cross_entropy'"),
    (("--task", "teacher", "--set", "target.metric=test_accuracy"),
     "target.metric 'test_accuracy' does not fit dataset teacher, a regression"),
    (("--set", "target.value=5"), "field 'target.value' must lie in [0, 1] for test_accuracy"),
    (("--set", "modl.residual=true"), "Did you mean 'model.residual'?"),
    (("--steps", "ten"), "invalid int value"),
    (("--method", "clip_norm(max_norm=1, max_norm=2)"), "argument 'max_norm' is given twice"),
    (("--init", "he_normal(x=1)"), "he_normal takes no arguments"),
    (("--set", "residual=true"), "Did you mean 'model.residual'?"),
    (("--set", "model.depth=2,4"), "a list is a grid of values: `stabench sweep`"),
    (("--steps", "7", "--set", "train.steps=5"), "--steps 7 and --set train.steps=5 disagree"),
    # a method that cannot act within the run, or names a layer the model lacks: before training
    (("--method", "accumulate(k=1000)"), "no optimizer update in 500 training steps (one update "
                                         "takes 1000)"),
    (("--method", "inject_spike(step=500)"), "never fires, since step 500 is past the run's 500 "
                                             "training steps"),
    (("--method", "inject_lr_spike(layer='nope')"), "layer 'nope' is not a layer of this model"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, expected):
    out = tmp_path / "out"
    proc = run_cli("run", *args, "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_run_too_short_for_the_loss_rule_of_divergence_says_so(tmp_path):
    proc = run_cli("run", "--steps", "21", "--seeds", "1", "--lrs", "3", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "too short for the loss rule of divergence" in proc.stdout
    longer = run_cli("run", "--steps", "22", "--seeds", "1", "--lrs", "3", "--out", tmp_path)
    assert "too short" not in longer.stdout


def test_list_shows_every_entry_with_help():
    from stabench.methods import METHODS

    proc = run_cli("list", "methods")
    assert proc.returncode == 0
    for entry in METHODS.entries():
        assert entry.name in proc.stdout and entry.help in proc.stdout
    tasks = run_cli("list", "tasks")
    rows = {line.split()[0]: line for line in tasks.stdout.splitlines() if line.strip()}
    assert "digits" in rows
    aliases = {"imdb": "imdb_reviews", "ag_news": "ag_news_subset", "cifar10": "cifar"}
    for task, alias in aliases.items():  # names tfds and papers use: they work as --task too
        assert rows[task].endswith(f"(alias: {alias})")


def test_fresh_process_rerun_hits_persistent_compilation_cache(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "STABENCH_CACHE_DIR": str(tmp_path / "cache")}
    records = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "stabench", "run", *FAST, "--force",
                               "--out", tmp_path / "out"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        records.append(json.loads(next((tmp_path / "out").rglob("*.json")).read_text()))
    assert records[0]["timing"]["compile_cache_hits"] == 0
    assert records[1]["timing"]["compile_cache_hits"] == 2  # the init and the chunk program
    assert records[1]["provenance"]["compilation_cache"] == str(tmp_path / "cache")

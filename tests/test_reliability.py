"""Faults outside a running sweep: Ctrl-C in `run`, determinism and rerun, bad data, bad input to
every command (and random bad input), user task files, unwritable or full disks, the store's
locks and temp files, numerical extremes in telemetry and reports. Faults injected into running
sweeps are in test_sweep_faults.py."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_cli

COMMITTED = sorted((ROOT / "results" / "default" / "adding").glob("*.json"))[0]
COMMITTED_RUNS = len(json.loads(COMMITTED.read_text())["runs"])

FAST = ("--steps", "40", "--seeds", "2", "--lrs", "0.1,3")
ZEROS = "1" + "0" * 400  # past a float's range
HUGE = "99999999999999999999"  # past int64


def test_sigint_stops_within_a_chunk_writes_nothing_and_exits_130(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stabench", "run", "--steps", "200000", "--seeds", "2", "--lrs",
         "0.1", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # wait for training to start: the progress bar reports its first finished chunk
    seen = ""
    deadline = time.time() + 300
    while "100/200000" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    assert "100/200000" in seen, seen[-500:]
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 60  # a chunk of 100 digits steps takes well under a second
    assert proc.returncode == 130
    assert "nothing of this cell was saved" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if p.is_file()]  # no record, no telemetry, no temp file


def test_same_command_twice_is_bit_identical(tmp_path):
    paths = []
    for name in ("a", "b"):
        proc = run_cli("run", *FAST, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        paths.append(next((tmp_path / name).rglob("*.json")))
    a, b = (json.loads(p.read_text()) for p in paths)
    assert a["spec_hash"] == b["spec_hash"] and a["runs"] == b["runs"]
    with np.load(paths[0].with_suffix(".npz")) as za, np.load(paths[1].with_suffix(".npz")) as zb:
        assert sorted(za.files) == sorted(zb.files)
        for key in za.files:
            assert np.array_equal(za[key], zb[key], equal_nan=True), key

    rerun = run_cli("rerun", paths[0])
    assert rerun.returncode == 0 and "reproduced exactly" in rerun.stdout, rerun.stderr

    from stabench.store import content_sha256

    record = json.loads(paths[1].read_text())
    record["runs"][0]["test_accuracy"] += 0.5  # a stored metric that no longer matches training
    paths[1].write_text(json.dumps(record))
    edited = run_cli("rerun", paths[1])
    assert edited.returncode == 2 and "edited after it was written" in edited.stderr
    record["record_sha256"] = content_sha256(record)  # as if training had given that metric
    paths[1].write_text(json.dumps(record))
    tampered = run_cli("rerun", paths[1])
    assert tampered.returncode == 1 and "run 0 test_accuracy" in tampered.stdout


def test_rerun_of_a_bad_record_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    proc = run_cli("rerun", bad)
    assert proc.returncode == 2 and "unreadable record" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataset_with_nan_is_rejected_before_training():
    from stabench.data import check_finite, fake, DATASETS
    from stabench.registry import UserError

    data = fake(DATASETS.get("digits").meta)
    data.x_train[3, 5] = np.nan
    with pytest.raises(UserError, match="dataset digits: train contain NaN"):
        check_finite(data, "digits")


TOKENS = st.sampled_from(["run", "list", "rerun", "report", "merge", "diagnose", "--lr", "--seed",
                          "--run", "--at-init", ".", "x.json", "--no-plots", "--task", "--method",
                          "--init", "--optimizer", "--seeds", "--lrs", "--steps", "--batch-size",
                          "--set", "--out", "--force",
                          "digits", "cifar", "clip_norm", "clip_norm(max_norm=", "(", ")", "=",
                          "-1", "0", "nan", "inf", "1e400", "model.depth=0", "train.x=1", "tasks",
                          "", "--"])
METHOD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_()=+,.[]'\"0123456789-e ", max_size=30)

# Bad values of the shapes that once ended in a traceback or started training: numbers past int32,
# a float's range or Python's 4300-digit limit, deep signs and brackets, unhashable containers.
DIGITS = st.builds(lambda lead, zeros: lead + "0" * zeros, st.sampled_from("123456789"),
                   st.integers(10, 5000))
BAD_VALUE = st.one_of(
    st.builds(str.__add__, st.sampled_from(["", "-"]),
              DIGITS | st.integers(8, 5000).map(lambda n: "0x" + "f" * n)),
    st.builds(str.__add__, st.text("-+~", min_size=2, max_size=5000), st.sampled_from("17")),
    st.integers(2, 300).map(lambda depth: "[" * depth + "1" + "]" * depth),
    st.sampled_from(["{[1]: 2}", "{[1]}", "{(1, [2]): 3}", "{1: {[1]: 2}}"]))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(TOKENS, METHOD, BAD_VALUE), max_size=8))
def test_random_command_lines_never_end_in_a_traceback(argv, monkeypatch, tmp_path):
    """Parsing and validation of any argument list ends in exit 0, 2 or --help's SystemExit,
    never an exception. Training itself is replaced: it is tested elsewhere."""
    from stabench import cli, runner

    monkeypatch.setattr(runner, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(runner, "rerun", lambda *a, **k: [])
    monkeypatch.setattr(runner, "train_spec",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.chdir(tmp_path)  # results directories the command creates stay in the sandbox
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    assert status in (0, 2, 130)


SWEEP = ("sweep", "--task", "digits", "--dry-run")
VALUE_SLOTS = [("run", "--method", "clip_norm(max_norm={})"),
               ("run", "--optimizer", "sgd(momentum={})"),
               ("run", "--init", "normal(std={})"), ("run", "--method", "warmup(steps={})"),
               ("run", "--set", "model.width={}"), ("run", "--set", "train.seeds={}"),
               ("diagnose", "--task", "digits", "--method", "clip_norm(max_norm={})"),
               (*SWEEP, "--method", "clip_norm(max_norm=[{}, 1])"),
               (*SWEEP, "--method", "clip_norm(max_norm=loguniform(0.1, {}))"),
               (*SWEEP, "--method", "clip_norm(max_norm=[1, 2])", "--search", "random(n={})"),
               (*SWEEP, "--method", "clip_norm(max_norm=[1, 2])", "--search",
                "random(n=2, seed={})"),
               (*SWEEP, "--set", "model.depth={}")]
# Integer options and fields with their largest valid value; anything below 0 is bad in each.
INT_SLOTS = [(("run", "--seeds", "{}"), 1000), ((*SWEEP, "--seeds", "{}"), 1000),
             (("run", "--set", "train.seeds={}"), 1000), (("run", "--steps", "{}"), 10**6),
             (("run", "--set", "train.steps={}"), 10**6),
             (("diagnose", "--task", "digits", "--steps", "2", "--seed", "{}"), 2**31 - 1),
             ((*SWEEP, "--workers", "{}"), 1024),
             ((*SWEEP, "--method", "clip_norm(max_norm=[1, 2])", "--search", "random(n={})"), 1000)]


def _filled(slot, value):
    return [arg.replace("{}", value) for arg in slot]


BAD_SHARD = st.sampled_from(["", " ", "0/1", "2/1", "1/0", "-1/2", "1/2/3", "/", "a/b"]) \
    | DIGITS.map("{}/1".format)


def _bad_int(most):
    return st.integers(-10**30, -1).map(str) | st.integers(most + 1, 10**30).map(str) | DIGITS


BAD_ARGV = st.one_of(
    st.builds(_filled, st.sampled_from(VALUE_SLOTS), BAD_VALUE),
    st.sampled_from(INT_SLOTS).flatmap(
        lambda slot: st.builds(_filled, st.just(slot[0]), _bad_int(slot[1]))),
    st.one_of(  # one branch for the rest, so the two above get two thirds of the examples
        st.builds(_filled, st.just((*SWEEP, "--shard", "{}")), BAD_SHARD),
        st.tuples(st.binary(max_size=200), st.binary(max_size=200)).map(
            lambda parts: ("suite", parts[0] + b"\xff" + parts[1])),  # \xff is never UTF-8
        st.just(("read-only record",))))


@pytest.fixture(scope="module")
def read_only_record(tmp_path_factory):
    """A record in a directory no one can write into, or None where that cannot be made."""
    from test_report import fake_record

    from stabench.store import Store

    record = fake_record(Store(tmp_path_factory.mktemp("read-only")), seeds=1)
    with read_only(record.path.parent) as made:
        yield record.path if made else None


@contextlib.contextmanager
def read_only(directory):
    """Yields whether `directory` is read-only now: by its mode, and for root (which ignores the
    mode) by the immutable attribute, where the file system has one."""
    directory.chmod(0o500)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", directory], capture_output=True).returncode == 0
    try:
        yield os.geteuid() != 0 or immutable
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", directory], check=True)
        directory.chmod(0o700)


@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=BAD_ARGV)
def test_random_bad_values_exit_2_with_one_line_before_anything_starts(
        argv, monkeypatch, tmp_path, capsys, read_only_record):
    """Each bad value above, in every option that parses it: exit 2 and one line naming the bound
    or the valid form; no data loaded, nothing trained or diagnosed, nothing written."""
    from stabench import cli, runner

    for name in ("load_data", "train_spec", "diagnose_run", "rerun"):
        monkeypatch.setattr(runner, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran"))
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir(exist_ok=True)
    monkeypatch.chdir(sandbox)  # default results directories would appear here
    if argv[0] == "suite":
        suite = tmp_path / "suite.toml"
        suite.write_bytes(argv[1])
        argv = ["sweep", "--suite", str(suite), "--dry-run"]
    elif argv[0] == "read-only record":
        if read_only_record is None:
            return  # root on a file system without the immutable attribute
        argv = ["diagnose", str(read_only_record)]
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), \
        (argv, err)
    assert not any(sandbox.iterdir())


@settings(max_examples=300, deadline=None)
@given(spec=METHOD)
def test_random_method_strings_raise_only_user_errors(spec):
    import jax

    from stabench import methods
    from stabench.optimizers import OPTIMIZERS
    from stabench.registry import UserError

    try:
        methods.transform(methods.resolve(spec), OPTIMIZERS.get("sgd"), 100).build(
            0.1, jax.random.key(0))
    except UserError:
        pass


# ---- bad input to every command: exit 2, one line, nothing written -------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["sweep"], "give --suite NAME or at least one --task"),
    (["sweep", "--task", "cifar-11"], "unknown task 'cifar-11'"),
    (["sweep", "--task", "digits", "--method", "none", "clip_nrm"], "Did you mean 'clip_norm'"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=)"], "cannot parse"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=[1,2)"], "unbalanced brackets"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=abc)"], "max_norm"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_nrm=[1,2])"], "Accepted: max_norm"),
    (["sweep", "--task", "digits", "--init", "hee_normal"], "Did you mean 'he_normal'"),
    (["sweep", "--task", "digits", "--optimizer", "sgdd"], "Did you mean 'sgd'? Valid optimizers:"),
    (["sweep", "--task", "digits", "--lrs", "0.1,-1"], "positive finite"),
    (["sweep", "--task", "digits", "--lrs", "inf"], "positive finite"),
    (["sweep", "--task", "digits", "--steps", "0"], "--steps must be positive"),
    (["sweep", "--task", "digits", "--seeds", "-1"], "--seeds must be positive"),
    (["sweep", "--task", "digits", "--batch-size", "5000"], "exceeds the 1294 training examples"),
    (["sweep", "--task", "digits", "--set", "train.batch_size=[64,5000]"], "exceeds the 1294"),
    (["sweep", "--task", "digits", "--set", "model.depth=0"], "depth must be positive"),
    (["sweep", "--task", "digits", "--set", "model.depth=[4,-2]"], "depth must be positive"),
    (["sweep", "--task", "digits", "--set", "model.depth=2.5"], "depth must be int"),
    (["sweep", "--task", "digits", "--set", "train.stepz=3"], "Valid keys"),
    (["sweep", "--task", "digits", "--set", "model.nope=3"], "unknown argument 'nope'"),
    (["sweep", "--task", "digits", "--workers", "0"], "--workers must be positive"),
    (["sweep", "--task", "digits", "--shard", "3/2"], "--shard must be i/N"),
    (["sweep", "--task", "digits", "--search", "randm(n=2)"], "Did you mean 'random'"),
    (["sweep", "--suite", "nope"], "unknown suite 'nope'"),
    (["sweep", "--suite", "missing.toml"], "suite file missing.toml does not exist"),
    (["sweep", "--suite", "x", "--task", "digits"], "drop --task or drop --suite"),
    (["run", "--set", "model.depth=0"], "depth must be positive"),
    (["run", "--set", "model.width=-8"], "width and depth must be positive"),
    (["run", "--set", "train.eval_every=0"], "'train.eval_every' must be positive"),
    (["diagnose"], "give a record path (diagnose RECORD) or a task to train"),
    (["diagnose", "--task", "digitz"], "Did you mean 'digits'"),
    (["diagnose", "--task", "digits", "--method", "clip_nrm"], "Did you mean 'clip_norm'"),
    (["diagnose", "--task", "digits", "--set", "model.depth=0"], "depth must be positive"),
    (["diagnose", "--task", "digits", "--lr", "-1"],
     "--lr: learning rates must be positive finite"),
    (["diagnose", "--task", "digits", "--lr", "0.1,1"], "--lr takes one learning rate"),
    (["diagnose", "--task", "digits", "--steps", "0"], "--steps must be positive"),
    (["diagnose", "--task", "digits", "--seed", "-1"], "--seed must be >= 0"),
    (["diagnose", "--task", "digits", "--batch-size", "5000"], "exceeds the 1294 training"),
    (["diagnose", "--task", "digits", "--set", "train.stepz=1"], "Did you mean 'train.steps'"),
    (["diagnose", "nowhere.json"], "nowhere.json: unreadable record"),
    (["diagnose", "--task", "digits", "--results", "nowhere"],
     "--results: no results directory nowhere"),
    (["diagnose", str(COMMITTED), "--run", "999", "--report", "figures"],
     f"--run must lie in 0..{COMMITTED_RUNS - 1}: the record has {COMMITTED_RUNS} runs"),
    (["report", "nowhere"], "no results directory nowhere"),
    (["report", "."], "no usable records in ."),
    (["merge", "merged", "nowhere"], "merge: no results directory nowhere"),
    (["rerun", "nowhere.json"], "nowhere.json: unreadable record"),
    (["list", "taskz"], "invalid choice: 'taskz'"),
    (["sweeep"], "invalid choice: 'sweeep'"),
    # values past what Python, numpy or JAX take: refused where they are parsed, with the bound
    (["run", "--method", f"clip_norm(max_norm={ZEROS})"], "integers must lie within ±2147483647"),
    (["run", "--optimizer", f"sgd(momentum={ZEROS})"], "integers must lie within ±2147483647"),
    (["run", "--method", "clip_norm(max_norm={[1]: 2})"], "'{[1]: 2}' is not a literal value"),
    (["run", "--init", "normal(std={[1]: 1})"], "'{[1]: 1}' is not a literal value"),
    (["run", "--method", f"clip_norm(max_norm={'-' * 3000}1)"], "nest at most 32 deep"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=[[1],[2]])", "--dry-run"],
     "max_norm must be float, got [1]"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=[1,2])", "--search",
      "random(n=2, seed=-1)", "--dry-run"], "seed must be >= 0"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=[1,2])", "--search",
      f"random(n={'9' * 300})", "--dry-run"], "integers must lie within ±2147483647"),
    (["sweep", "--task", "digits", "--method", "clip_norm(max_norm=[1,2])", "--search",
      "random(n=5000)", "--dry-run"], "n must be at most 1000"),
    (["run", "--set", f"model.width={ZEROS}"], "--set model.width: integers must lie within"),
    (["run", "--set", "model.width=2000000000"], "parameters: at most 100,000,000"),
    (["run", "--task", "adding", "--set", "dataset.n_train=2000000000"],
     "input values: at most 2,000,000,000"),
    (["run", "--seeds", HUGE], "--seeds must be positive and at most 1,000, got"),
    (["sweep", "--task", "digits", "--seeds", HUGE, "--dry-run"], "--seeds must be positive and"),
    (["run", "--set", f"train.seeds={HUGE}"], "--set train.seeds: integers must lie within"),
    (["run", "--set", "train.seeds=5000"], "'train.seeds' must be positive and at most 1,000"),
    (["run", "--steps", HUGE], "--steps must be positive and at most 1,000,000, got"),
    (["diagnose", "--task", "digits", "--seed", HUGE, "--steps", "2"],
     "--seed must be >= 0 and at most 2,147,483,647"),
    (["sweep", "--task", "digits", "--shard", ""], "--shard must be i/N"),
    (["sweep", "--task", "digits", "--workers", HUGE], "--workers must be positive and at most"),
    (["sweep", "--task", "digits", "--method", "none,clip_norm(max_norm=1)"],
     "space-separated values, e.g. --method none 'clip_norm(max_norm=1)' (--lrs and --set take "
     "commas)"),
])
def test_bad_input_to_any_command_exits_2_with_one_line_and_writes_nothing(
        tmp_path, monkeypatch, capsys, argv, expected):
    from stabench.cli import main

    monkeypatch.chdir(tmp_path)  # default results directories would appear here
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_merge_names_a_source_without_records(tmp_path, capsys):
    from stabench.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "empty")]) == 0
    out, err = capsys.readouterr()
    assert "0 records copied" in out and f"note: {tmp_path / 'empty'} holds no records" in err


@pytest.mark.parametrize("command", ["run", "diagnose"])
def test_a_layer_the_model_lacks_fails_before_any_directory_is_made(tmp_path, capsys, command):
    """A layer name is checked against the model's parameters when the spec is made (it was once
    found only when the program was traced, after the results directory was made)."""
    from stabench.cli import main

    out = tmp_path / "new" / "results"
    assert main([command, "--task", "digits", "--method", "inject_spike(step=5, layer='nosuch')",
                 "--steps", "10", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: layer 'nosuch' is not a layer of this model"), last
    assert not list(tmp_path.iterdir())


def test_tidy_dirs_removes_only_the_empty_directories_the_block_made(tmp_path):
    from stabench.store import tidy_dirs

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), tidy_dirs(tmp_path / "kept" / "a" / "b"):
        (tmp_path / "kept" / "a" / "b").mkdir(parents=True)
        raise RuntimeError("failed before writing")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert not any((tmp_path / "kept").iterdir())
    with tidy_dirs(tmp_path / "x" / "y"):  # a file was written: everything it needs stays
        (tmp_path / "x" / "y").mkdir(parents=True)
        (tmp_path / "x" / "y" / "record.json").write_text("{}")
    assert (tmp_path / "x" / "y" / "record.json").exists()


# ---- user task files -----------------------------------------------------------------------------
DIGITS_TOML = (ROOT / "tasks" / "digits.toml").read_text()


@pytest.fixture
def user_tasks(tmp_path, monkeypatch):
    """A fresh STABENCH_TASKS_DIR; returns a function writing NAME.toml into it."""
    directory = tmp_path / "my tasks"
    directory.mkdir()
    monkeypatch.setenv("STABENCH_TASKS_DIR", str(directory))

    def write(text, name="mine"):
        (directory / f"{name}.toml").write_text(text)
        return directory / f"{name}.toml"
    return write


def test_user_task_directory_adds_tasks(user_tasks, tmp_path, capsys):
    from stabench.cli import main
    from stabench.config import make_spec

    user_tasks(DIGITS_TOML.replace("width = 128", "width = 16").replace("aliases", "# aliases"))
    spec = make_spec("mine", seeds=1, lrs=(0.1,))
    assert spec.task == "mine" and spec.task_config["model"]["width"] == 16
    assert main(["list", "tasks"]) == 0
    listed = capsys.readouterr().out
    assert "mine" in listed and "digits" in listed
    proc = subprocess.run([sys.executable, "-m", "stabench", "sweep", "--task", "mine", "digits",
                           "--dry-run", "--out", tmp_path / "out"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "to train  mine |" in proc.stdout and "to train  digits |" in proc.stdout


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("steps = 500\n", ""), "missing field 'train.steps'"),
    (lambda t: t.replace("steps = 500", 'steps = "ten"'),
     "field 'train.steps' must be int, got 'ten'"),
    (lambda t: t.replace("steps = 500", "stepz = 500"), "missing field 'train.steps'"),
    (lambda t: t.replace("seeds = 3", "seeds = 3\nsed = 4"),
     "unknown field(s) ['sed'] in [train]"),
    (lambda t: t.replace("batch_size = 128", "batch_size = 0"),
     "'train.batch_size' must be positive"),
    (lambda t: t.replace("[target]", "[targets]"), "missing section [target]"),
    (lambda t: t.replace("depth = 1", "depht = 4"),
     "unknown argument 'depht'. Did you mean 'depth'"),
    (lambda t: t.replace("depth = 1", "depth = 0"), "width and depth must be positive"),
    (lambda t: t.replace('name = "digits"', 'name = "digitz"'), "unknown dataset 'digitz'"),
    (lambda t: t.replace('loss = "cross_entropy"', 'loss = "hinge"'), "'loss' must be one of"),
    (lambda t: t.replace("[model]", "[model"), "not valid TOML"),
])
def test_broken_user_task_file_names_the_file_and_field(user_tasks, tmp_path, capsys, edit,
                                                       expected):
    from stabench.cli import main

    path = user_tasks(edit(DIGITS_TOML.replace("aliases", "# aliases")))
    code = main(["run", "--task", "mine", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}:") and expected in lines[0], err
    assert not (tmp_path / "out").exists()


def test_user_task_named_like_a_builtin_or_missing_directory_is_an_error(user_tasks, monkeypatch):
    from stabench.registry import UserError
    from stabench.tasks import all_tasks

    path = user_tasks(DIGITS_TOML, name="digits")
    with pytest.raises(UserError, match=f"{path}: task 'digits' is already defined by "
                                        f"tasks/digits.toml"):
        all_tasks()
    monkeypatch.setenv("STABENCH_TASKS_DIR", "/no/such/dir")
    with pytest.raises(UserError, match="STABENCH_TASKS_DIR: no directory /no/such/dir"):
        all_tasks()


# ---- disks: unwritable, full ---------------------------------------------------------------------
def unwritable_places(tmp_path) -> list:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    places = [blocker / "results"]  # a file where a directory should be: fails for root too
    if os.geteuid() != 0:  # root writes into read-only directories
        readonly = tmp_path / "read-only"
        readonly.mkdir(mode=0o500)
        places.append(readonly / "results")
    return places


def test_unwritable_output_fails_before_any_training(tmp_path, monkeypatch, capsys, tiny_records):
    from stabench import runner
    from stabench.cli import main

    trained = []
    monkeypatch.setattr(runner, "train_spec", lambda *a, **k: trained.append(a))
    monkeypatch.setattr(runner, "load_data", lambda *a, **k: None)  # reading data is not training
    for place in unwritable_places(tmp_path):
        for argv in (["run", *FAST, "--out", place],
                     ["diagnose", "--task", "digits", "--steps", "40", "--out", tmp_path / "d",
                      "--report", place],
                     ["sweep", "--task", "digits", *FAST, "--workers", "1", "--out", place],
                     ["report", tiny_records, "--out", place, "--no-plots"],
                     ["merge", place, tiny_records]):
            code = main([str(a) for a in argv])
            err = capsys.readouterr().err
            assert code == 2, (argv, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1
            assert lines[0].startswith(f"error: cannot write results to {place}")
    assert trained == []


def test_diagnose_of_a_record_in_a_read_only_directory_fails_before_any_work(
        read_only_record, monkeypatch, capsys):
    """The report goes beside the record, so that directory is checked before the diagnosis."""
    from stabench import runner
    from stabench.cli import main

    if read_only_record is None:
        pytest.skip("root writes here: the file system has no immutable attribute")
    for name in ("load_data", "diagnose_run"):
        monkeypatch.setattr(runner, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran"))
    assert main(["diagnose", str(read_only_record)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot write results to {read_only_record.parent}: ")


@pytest.fixture
def tiny_records(tmp_path):
    """A results directory with one hand-made record."""
    from test_report import fake_record

    from stabench.store import Store

    fake_record(Store(tmp_path / "records"), seeds=2)
    return tmp_path / "records"


def test_disk_full_during_a_record_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from test_report import fake_record

    from stabench.store import Store

    store = Store(tmp_path)
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left") as failed:
        fake_record(store)
    assert failed.value.filename.endswith(".json")  # the error names the file it was writing
    assert not list(tmp_path.rglob("*.*"))  # no record, no telemetry, no temp file
    monkeypatch.setattr(os, "replace", real)
    record = fake_record(store)
    records, bad = Store(tmp_path).records()
    assert [r.path for r in records] == [record.path] and not bad


# ---- the store's locks and temp files ------------------------------------------------------------
HOLD = """
import sys
from stabench.config import make_spec
from stabench.store import Store
spec = make_spec("digits", seeds=1, lrs=(0.1,))
with Store(sys.argv[1]).claim(spec) as mine:
    print(mine, flush=True)
    sys.stdin.read()
"""


def test_a_cell_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    from stabench.config import make_spec
    from stabench.store import Store

    store, spec = Store(tmp_path), make_spec("digits", seeds=1, lrs=(0.1,))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert store.is_claimed(spec)
        with store.claim(spec) as mine:
            assert mine is False
        holder.kill()  # SIGKILL: no chance to release; the kernel does
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert not store.is_claimed(spec)
    with store.claim(spec) as mine:
        assert mine is True
    assert not list(tmp_path.rglob("*.lock"))


def test_a_lock_file_that_cannot_be_removed_does_not_hide_the_cells_own_error(tmp_path,
                                                                              monkeypatch):
    """A results directory that turns read-only mid-sweep: the cell's failure (here its record
    could not be written) is what propagates, and the lock is still released."""
    from pathlib import Path

    from stabench.config import make_spec
    from stabench.store import Store

    store, spec = Store(tmp_path), make_spec("digits", seeds=1, lrs=(0.1,))
    unlink = Path.unlink

    def read_only(path, missing_ok=False):
        if path.suffix == ".lock":
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        with store.claim(spec) as mine:
            assert mine is True
            raise OSError(30, "Read-only file system")
    assert not store.is_claimed(spec)


def stub_cell(spec):
    """The record body and telemetry of `spec` with stub metrics, as train_spec returns them."""
    runs = [{"seed": s, "lr": lr, "diverged": 0.0} for s, lr in spec.runs]
    body = {"runs": runs, "timing": {}, "provenance": {}, "layer_names": []}
    return body, {"loss": np.zeros((len(runs), 3), np.float32)}


def save_stub(store, spec):
    """A record of `spec` with stub metrics, written through the store."""
    return store.save(spec, *stub_cell(spec))


@pytest.mark.parametrize("holder_stores", [True, False])
def test_a_sweep_waits_for_cells_another_process_holds(tmp_path, monkeypatch, holder_stores):
    """Cell 0 is locked by someone else: the sweep trains cell 1, says it waits, then skips cell 0
    if the holder stored it, or trains it if the holder let go without storing (it died)."""
    import threading

    from stabench import executor, runner
    from stabench.store import Store

    from conftest import tiny_spec

    cells = [tiny_spec(method) for method in ("none", "clip_norm")]
    store = Store(tmp_path)
    trained = []

    def fake_train_spec(spec, data, on_chunk):
        trained.append(spec.method)
        return stub_cell(spec)

    monkeypatch.setattr(runner, "train_spec", fake_train_spec)
    monkeypatch.setattr(runner, "load_data", lambda spec, data_dir=None: None)
    held, release = threading.Event(), threading.Event()

    def other_process():
        with store.claim(cells[0]) as mine:
            assert mine
            held.set()
            release.wait(60)
            if holder_stores:
                save_stub(store, cells[0])

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait(60)
    messages = []

    def warn(message):
        messages.append(message)
        release.set()

    summary = executor.run_sweep(cells, str(tmp_path), executor.SerialExecutor(), warn=warn,
                                 poll_s=0.01)
    thread.join()
    assert messages == [f"waiting for 1 cells that another process is training into {tmp_path}"]
    if holder_stores:
        assert trained == ["clip_norm(max_norm=1.0)"]
        assert (summary.trained, summary.skipped, summary.elsewhere) == (1, 1, 1)
        assert "1 skipped (already stored, 1 of them by another process)" in summary.lines("x")[0]
    else:
        assert trained == ["clip_norm(max_norm=1.0)", "none"]
        assert (summary.trained, summary.skipped) == (2, 0)
    assert all(store.load(c) is not None for c in cells)


def test_stale_temp_files_are_removed_only_when_their_writer_is_gone(tmp_path):
    import socket

    from stabench.store import Store

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    (tmp_path / "digits").mkdir()
    stale = tmp_path / "digits" / f".abc.json.{dead}@{host}.tmp"
    live = tmp_path / "digits" / f".abd.json.{os.getpid()}@{host}.tmp"
    remote = tmp_path / "digits" / f".abe.json.{dead}@another.host.tmp"
    for path in (stale, live, remote):
        path.write_text("{")
    assert Store(tmp_path).remove_stale_temps() == [stale]
    assert not stale.exists() and live.exists() and remote.exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(b""), "unreadable record"),
    (lambda p: p.write_bytes(b"\xff\xfe garbage"), "unreadable record"),
    (lambda p: p.write_text("[1, 2]"), "format version ? is not 3"),
    (lambda p: p.rename(p.with_name("0" * 16 + ".json")), "file name does not match its spec hash"),
    (lambda p: edit_json(p, lambda d: d["runs"].pop()), "its runs do not match"),
    (lambda p: edit_json(p, lambda d: d["runs"][0].update(lr=99.0)), "its runs do not match"),
    (lambda p: edit_json(p, lambda d: d["spec"].update(lrs=[0.1, 0.3])),
     "spec hash does not match"),
    (lambda p: edit_json(p, lambda d: d.pop("spec")), "record lacks a valid spec"),
    (lambda p: edit_json(p, lambda d: d["spec"].update(seeds=3)), "record lacks a valid spec"),
    (lambda p: edit_json(p, lambda d: d.update(spec="digits")), "record lacks a valid spec"),
    (lambda p: edit_json(p, lambda d: d.update(spec=[1, 2])), "record lacks a valid spec"),
    (lambda p: edit_json(p, lambda d: d["spec"].update(lrs=["0.1"])),
     "record lacks a valid spec.lrs"),
    (lambda p: edit_json(p, lambda d: d["spec"]["task_config"].pop("train")),
     "record lacks a valid spec.task_config: missing section [train]"),
    (lambda p: edit_json(p, lambda d: d.update(runs={"seed": 0})), "record lacks a valid runs"),
    (lambda p: edit_json(p, lambda d: d.update(timing=[])), "record lacks a valid timing"),
    (lambda p: edit_json(p, lambda d: d.update(layer_names="hidden")),
     "record lacks a valid layer_names"),
    (lambda p: p.write_text("[" * 100_000), "unreadable record"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"PK\x03\x04"), "does not match its checksum"),
    (lambda p: edit_json(p, lambda d: d["runs"][0].update(test_accuracy=1.0)),
     "its content does not match its checksum (edited after it was written)"),
    (lambda p: edit_json(p, lambda d: d["provenance"].update(git_commit="deadbeef")),
     "its content does not match its checksum"),
    (lambda p: edit_json(p, lambda d: d.pop("record_sha256")), "its content does not match"),
    (lambda p: (p.unlink(), p.mkdir()), "unreadable record"),
])
def test_damaged_records_are_named_and_skipped(tmp_path, capsys, damage, problem):
    """Damage beyond torn writes (test_report covers those): each record is named with its
    problem and left out; the report of the rest still works."""
    from test_report import fake_record

    from stabench.cli import main
    from stabench.store import Store

    store = Store(tmp_path)
    good = fake_record(store, "none", seeds=2)
    bad = fake_record(store, "clip_norm", seeds=2)
    damage(bad.path)
    records, messages = store.records()
    assert [r.path for r in records] == [good.path]
    assert len(messages) == 1 and problem in messages[0]
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and problem in err and "Traceback" not in err
    assert store.load(bad.spec) is None  # a sweep trains that cell again


@pytest.mark.parametrize("spec", ["digits", ["digits"]])
def test_a_record_whose_spec_is_not_a_table_is_named_by_every_reader(tmp_path, capsys, spec):
    """report skips it, sweep --dry-run retrains it, rerun and diagnose refuse it in one line."""
    from test_report import LRS, fake_record

    from stabench.cli import main
    from stabench.store import Store, content_sha256

    bad = fake_record(Store(tmp_path), seeds=2)
    fake_record(Store(tmp_path), "clip_norm", seeds=2)  # the report still has a record to show
    data = json.loads(bad.path.read_text())
    data["spec"] = spec
    data["record_sha256"] = content_sha256(data)  # well formed JSON, checksummed, wrong shape
    bad.path.write_text(json.dumps(data))
    problem = f"{bad.path}: record lacks a valid spec"

    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    assert f"skipped {problem}" in capsys.readouterr().err
    assert main(["sweep", "--task", "digits", "--seeds", "2", "--lrs", ",".join(map(str, LRS)),
                 "--set", "train.steps=30", "--set", "train.eval_every=10", "--out", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("to train ") and f"(retrains: {problem})\n1 cells" in out
    for argv in (["rerun", bad.path], ["diagnose", bad.path]):
        assert main([str(a) for a in argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: {problem}\n"


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- numerical extremes --------------------------------------------------------------------------
def test_huge_and_infinite_grad_norms_are_stored_reported_and_plotted(tmp_path):
    """Telemetry at the edge of float32 (1e38, its max, inf, NaN) survives the store bit for bit,
    the metrics, the tables and every figure."""
    from test_report import fake_record, table_metrics

    from stabench import metrics
    from stabench.reports import write_report
    from stabench.store import Store

    store = Store(tmp_path / "records")
    edge = np.float32(np.finfo(np.float32).max)
    huge = {}
    for method, norm in (("none", 1e38), ("clip_norm", edge)):
        record = fake_record(store, method, metrics_fn=lambda s, lr, m=method, n=norm: {
            **table_metrics(m)(s, lr), "max_grad_norm": float(np.float32(n))})
        tel = record.telemetry()
        tel["grad_norm"][:, 5:] = np.float32(norm)
        tel["grad_norm"][0, 10] = np.inf
        tel["grad_norm"][1, 20:] = np.nan
        body = {k: v for k, v in record.data.items()
                if k not in ("format_version", "spec", "spec_hash", "telemetry_sha256",
                             "record_sha256")}
        huge[method] = store.save(record.spec, body, tel)
    for record in huge.values():
        stored = Store(tmp_path / "records").load(record.spec).telemetry()
        assert stored["grad_norm"].dtype == np.float32
        assert np.array_equal(stored["grad_norm"], record.telemetry()["grad_norm"], equal_nan=True)
        row = {k: v[0] for k, v in stored.items() if k in ("loss", "grad_norm")}
        row["changed"] = np.zeros(30, np.float32)
        row["nonfinite"] = np.zeros(30, np.float32)
        # the engine freezes a run at a non-finite gradient that no method skipped: step 10 here
        m = metrics.run_metrics(row, {"test_loss": np.array([1.0]), "test_accuracy": np.array(
            [0.5])}, np.array([30]), 10, ("test_accuracy", 0.95, "max"))
        first = stored["grad_norm"][0]
        assert m["max_grad_norm"] == float(first[np.isfinite(first)].max())
        assert m["diverged"] == 1.0 and m["divergence_step"] == 10
    markdown = write_report(tmp_path / "records", tmp_path / "report", warn=pytest.fail)
    assert "1e+38" in markdown and "3.4e+38" in markdown
    stems = sorted(p.stem for p in (tmp_path / "report" / "plots").glob("*.png"))
    assert "digits-gradnorm" in stems and len(stems) >= 4
    for stem in stems:
        png = tmp_path / "report" / "plots" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_diverged_runs_are_reported_with_their_step_and_counted(tmp_path, tiny_sweep):
    """In a real sweep lr 3 blows up: every diverged run keeps its row, with the step its telemetry
    first went non-finite (or its loss average exploded), and the leaderboard counts it."""
    import pandas as pd

    from stabench import metrics
    from stabench.store import Store

    from conftest import report_tables

    records, bad = Store(tiny_sweep.whole).records()
    assert not bad
    diverged = 0
    for record in records:
        tel = record.telemetry()
        for i, run in enumerate(record.runs):
            frozen = int(tel["diverged_at"][i])
            if run["diverged"]:
                diverged += 1
                step = metrics.divergence_step(tel["loss"][i], frozen)
                assert run["divergence_step"] == step
                if frozen >= 0:
                    # that step's loss came from finite parameters
                    assert step <= frozen and not np.isfinite(tel["loss"][i][frozen + 1:]).any()
                    assert run["test_accuracy"] == 0.0 and run["final_train_loss"] == np.inf
            else:
                assert frozen == -1 and run["divergence_step"] == record.spec.train["steps"] - 1
    assert diverged > 0
    report_tables(tiny_sweep.whole, tmp_path / "report")
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv")
    assert board["diverged_runs"].sum() == diverged and board["runs"].sum() == 16
    runs = pd.read_parquet(tmp_path / "report" / "runs.parquet")
    assert len(runs) == 16 and int(runs["diverged"].sum()) == diverged


def test_run_waits_for_another_process_training_the_same_cell(tmp_path, monkeypatch, capsys):
    """`run` into a directory where another process holds the cell's lock waits for it, then
    reuses the record it stored instead of training and writing the cell a second time."""
    import threading

    from test_report import fake_record

    from stabench import runner
    from stabench.cli import main
    from stabench.config import make_spec
    from stabench.store import Store

    store = Store(tmp_path)
    spec = make_spec("digits", seeds=3, lrs=(0.1, 1.0, 10.0),
                     overrides={"train.steps": 30, "train.eval_every": 10})
    trained = []
    monkeypatch.setattr(runner, "train_spec", lambda *a, **k: trained.append(a))
    monkeypatch.setattr(runner, "load_data", lambda *a, **k: None)
    waiting, held = threading.Event(), threading.Event()

    class Stderr:
        def write(self, text):
            if "waiting for it" in text:
                waiting.set()
            return sys.__stderr__.write(text)

        def flush(self):
            pass

    def other_process():
        with store.claim(spec) as mine:
            assert mine
            held.set()
            waiting.wait(60)
            fake_record(store)

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait(60)
    monkeypatch.setattr(sys, "stderr", Stderr())
    code = main(["run", "--seeds", "3", "--lrs", "0.1,1,10", "--steps", "30", "--set",
                 "train.eval_every=10", "--out", str(tmp_path)])
    thread.join()
    assert code == 0 and waiting.is_set() and trained == []
    assert "reused stored record" in capsys.readouterr().out


def test_a_file_system_error_under_a_command_is_one_line_not_a_traceback(
        tmp_path, monkeypatch, capsys, tiny_records):
    import errno
    from pathlib import Path

    from stabench.cli import main

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    code = main(["report", str(tiny_records), "--out", str(tmp_path / "report"), "--no-plots"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: [Errno 28] No space left on device: '{tmp_path / 'report' / 'report.md'}'"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_that_python_drops_in_a_gc_callback_still_stops_the_sweep(tmp_path, monkeypatch):
    """Ctrl-C arriving while a garbage-collector callback runs (JAX registers one) raises there,
    and Python drops exceptions of such callbacks. The sweep still stops at the next chunk."""
    import gc

    from stabench import executor, runner

    from conftest import tiny_spec

    cells = [tiny_spec(method) for method in ("none", "clip_norm", "clip_value")]
    trained = []

    def ctrl_c_during_gc():
        gc.callbacks.remove(ctrl_c_during_gc_callback)
        signal.raise_signal(signal.SIGINT)  # the handler raises KeyboardInterrupt right here

    def ctrl_c_during_gc_callback(phase, info):
        ctrl_c_during_gc()

    def fake_train_spec(spec, data, on_chunk):
        trained.append(spec.method)
        gc.callbacks.append(ctrl_c_during_gc_callback)
        gc.collect()  # the KeyboardInterrupt is raised in the callback and dropped
        on_chunk(spec.train["steps"] // 2)
        on_chunk(spec.train["steps"])
        return stub_cell(spec)

    monkeypatch.setattr(runner, "train_spec", fake_train_spec)
    monkeypatch.setattr(runner, "load_data", lambda spec, data_dir=None: None)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(executor.SweepInterrupted) as stop:
        executor.run_sweep(cells, str(tmp_path), executor.SerialExecutor())
    assert trained == ["none"] and stop.value.summary.trained == 0
    assert not list(tmp_path.rglob("*.json"))
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_sweep_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, monkeypatch):
    """A background job of a shell without job control starts with SIGINT ignored, so that Ctrl-C
    in the terminal leaves it running; the sweep does not install its Ctrl-C handler over that."""
    from stabench import executor, runner

    from conftest import tiny_spec

    cells = [tiny_spec(method) for method in ("none", "clip_norm")]
    handlers = []

    def fake_train_spec(spec, data, on_chunk):
        handlers.append(signal.getsignal(signal.SIGINT))
        signal.raise_signal(signal.SIGINT)  # ignored: the cell goes on
        on_chunk(spec.train["steps"])
        return stub_cell(spec)

    monkeypatch.setattr(runner, "train_spec", fake_train_spec)
    monkeypatch.setattr(runner, "load_data", lambda spec, data_dir=None: None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        summary = executor.run_sweep(cells, str(tmp_path), executor.SerialExecutor())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert handlers == [signal.SIG_IGN, signal.SIG_IGN]
    assert summary.trained == 2 and len(list(tmp_path.rglob("*.json"))) == 2

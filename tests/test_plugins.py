"""Plugins: the example AdaGC plugin (examples/stabench-adagc), installed as pip would install it,
is swept against none and clip_norm in a fresh process through the local executor; its records
name it, and a change to its source retrains its cells and no others. It loads from an entry
point, from STABENCH_PLUGINS and from --plugin, in every process that trains (local and Ray
workers); one that fails to load is one line naming it. A task file is given by its path.

Every plugin loads in a subprocess: loaded here, its entries would join this test process's
registries."""

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from stabench import cli
from stabench.config import make_spec
from stabench.registry import UserError
from stabench.tasks import DEFAULT_VAL_FRACTION

from conftest import ROOT, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = ROOT / "examples" / "stabench-adagc"
PROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
MODULE = "stabench_adagc"
# a short digits cell per method: AdaGC leaves its warm-up within the run
SWEEP = ["sweep", "--task", "digits", "--seeds", "1", "--lrs", "0.1", "--set", "train.steps=20",
         "--set", "train.eval_every=10", "--workers", "2"]
ADAGC = "adagc(warmup=5)"


def install(tmp_path: Path, entry_point: bool) -> tuple[Path, dict]:
    """A copy of the example's package on PYTHONPATH; with `entry_point`, the metadata pip would
    install beside it (a dist-info naming its version and its entry point). Returns the copy and
    the environment to run stabench in."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "src" / MODULE, site / MODULE)
    if entry_point:
        info = site / f"{MODULE}-{PROJECT['version']}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PROJECT['name']}\n"
                                       f"Version: {PROJECT['version']}\n")
        group = PROJECT["entry-points"]["stabench.plugins"]
        (info / "entry_points.txt").write_text(
            "[stabench.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))
    env = {k: v for k, v in os.environ.items() if k != "STABENCH_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return site / MODULE, env


def source_sha256(package: Path) -> str:
    """A package's source hash as a record names it: each .py file's relative path and sha256."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        name = path.relative_to(package).as_posix()
        digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def records(out: Path) -> dict[str, dict]:
    """The records of a results directory by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))}


def by_method(found: dict[str, dict]) -> dict[str, dict]:
    return {r["spec"]["method"].partition("(")[0]: r for r in found.values()}


@pytest.mark.slow
def test_an_installed_plugin_sweeps_against_the_baselines_and_retrains_only_when_it_changes(
        tmp_path):
    package, env = install(tmp_path, entry_point=True)
    out = tmp_path / "out"
    proc = run_cli(*SWEEP, "--method", "none", "clip_norm", ADAGC, "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 cells: 3 trained, 0 skipped" in proc.stdout
    before = records(out)
    cells = by_method(before)
    assert sorted(cells) == ["adagc", "clip_norm", "none"]
    sha = source_sha256(package)
    plugin = {"module": MODULE, "version": PROJECT["version"], "sha256": sha}
    for record in cells.values():  # every worker loaded it, and a record names it
        assert record["provenance"]["plugins"] == [plugin]
        assert all(run["final_train_loss"] < run["initial_loss"] for run in record["runs"])
    assert cells["adagc"]["spec"]["plugins"] == {MODULE: sha}  # part of the cell's identity
    assert "plugins" not in cells["none"]["spec"] and "plugins" not in cells["clip_norm"]["spec"]

    with open(package / "__init__.py", "a") as source:
        source.write("# a changed plugin\n")
    proc = run_cli(*SWEEP, "--method", "none", "clip_norm", ADAGC, "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 cells: 1 trained, 2 skipped" in proc.stdout
    after = records(out)
    new = by_method({name: r for name, r in after.items() if name not in before})
    assert list(new) == ["adagc"] and set(before) < set(after)
    assert new["adagc"]["spec"]["plugins"] == {MODULE: source_sha256(package)} != {MODULE: sha}


@pytest.mark.slow
@pytest.mark.parametrize("executor", [
    "local", pytest.param("ray", marks=pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="Ray is not installed"))])
def test_the_plugin_flag_reaches_the_sweeps_worker_processes(tmp_path, executor):
    package, env = install(tmp_path, entry_point=False)
    out = tmp_path / "out"
    proc = run_cli(*SWEEP, "--method", ADAGC, "--plugin", MODULE, "--executor", executor,
                   "--out", out, env={**env, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    (record,) = records(out).values()
    (plugin,) = record["provenance"]["plugins"]  # as the worker saw it
    assert plugin["module"] == MODULE and plugin["sha256"] == source_sha256(package)
    assert record["spec"]["plugins"] == {MODULE: plugin["sha256"]}


def test_a_plugin_named_in_the_environment_adds_its_method(tmp_path):
    _, env = install(tmp_path, entry_point=False)
    proc = run_cli("list", "methods", env={**env, "STABENCH_PLUGINS": MODULE})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("adagc("))
    assert "pre: per-tensor adaptive clipping" in line and "Wang et al. 2025" in line


def test_an_unknown_method_says_how_to_load_a_plugin(tmp_path, capsys):
    assert cli.main(["run", "--method", "my_method", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'my_method'" in err[0]
    assert "--plugin MODULE, STABENCH_PLUGINS" in err[0]


DUPLICATE = """import stabench

@stabench.register_method("none", help="again", stage="pre")
def none():
    pass
"""


@pytest.mark.parametrize("source, how, message", [
    (None, "env", ("plugin no_such_plugin failed to load: ModuleNotFoundError: No module named "
                   "'no_such_plugin'")),
    ("raise RuntimeError('no GPU here')\n", "flag",
     "plugin broken_plugin failed to load: RuntimeError: no GPU here"),
    (DUPLICATE, "flag",
     "plugin broken_plugin failed to load: ValueError: duplicate method name 'none'"),
], ids=["missing", "raises", "duplicate name"])
def test_a_plugin_that_fails_to_load_is_one_line_naming_it(tmp_path, source, how, message):
    module = "no_such_plugin" if source is None else "broken_plugin"
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = ["list", "methods"]
    if how == "env":
        env["STABENCH_PLUGINS"] = module
    else:
        args += ["--plugin", module]
    proc = run_cli(*args, env=env)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


def test_run_help_says_how_to_add_plugins_and_task_files(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("--plugin MODULE", "STABENCH_PLUGINS", "entry points of group stabench.plugins",
                 "FILE.toml", "STABENCH_TASKS_DIR"):
        assert said in text


def task_file(directory: Path, name: str, description: str) -> Path:
    path = directory / f"{name}.toml"
    text = (ROOT / "tasks" / "digits.toml").read_text()
    path.write_text(text.replace(tomllib.loads(text)["description"], description))
    return path


def test_a_task_file_is_given_by_its_path(tmp_path, capsys):
    path = task_file(tmp_path, "my_digits", "digits, my way")
    spec = make_spec(str(path), seeds=1, lrs=(0.1,))
    # the spec holds the file's content, with the defaults and the settings that ran filled in
    content = tomllib.loads(path.read_text())
    content["dataset"]["val_fraction"] = DEFAULT_VAL_FRACTION
    content["train"].update(optimizer=spec.optimizer, seeds=1, lrs=[0.1])
    assert spec.task == "my_digits" and spec.task_config == content
    assert spec.task_config["description"] == "digits, my way"  # the spec holds the content
    assert cli.main(["sweep", "--task", str(path), "--dry-run", "--out", str(tmp_path)]) == 0
    assert "to train  my_digits | none" in capsys.readouterr().out


def test_a_task_file_refuses_a_built_in_tasks_name_and_a_missing_file(tmp_path):
    with pytest.raises(UserError, match="task 'digits' is already defined by tasks/digits.toml"):
        make_spec(str(task_file(tmp_path, "digits", "not the bundled digits")))
    with pytest.raises(UserError, match="no task file"):
        make_spec(str(tmp_path / "absent.toml"))
    with pytest.raises(UserError, match=r"task file's path \(--task FILE.toml\).*"
                                        r"STABENCH_TASKS_DIR"):
        make_spec("my_digits")

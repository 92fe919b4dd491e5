"""The Ray executor: a suite on a local Ray instance gives the local executor's report, resumes,
and Ray's retries recover cells whose worker process died; bad options fail before anything runs."""

import importlib.util
import os
import shutil
import tempfile

import pytest

from conftest import ROOT, report_tables, run_cli, tiny_spec

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install -e '.[dev,scale]' runs "
                                      "the Ray executor tests")


@pytest.mark.parametrize("args, message", [
    (["--address", "auto"], "--address needs --executor ray"),
    (["--executor", "ray", "--address", "nohost"], "--address must be auto, HOST:PORT"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "cannot connect to the Ray cluster at "
                                                        "'127.0.0.1:1'"),
    (["--executor", "ray", "--address", "auto", "--workers", "2"], "a cluster at --address has"),
    (["--executor", "dask"], "invalid choice: 'dask'"),
])
def test_bad_executor_options_exit_2_and_write_nothing(args, message, tmp_path, capsys,
                                                       monkeypatch):
    from stabench.cli import main

    monkeypatch.setitem(__import__("sys").modules, "ray", object())  # no Ray needed to refuse
    assert main(["sweep", "--task", "digits", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from stabench.cli import main

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray raises ImportError
    assert main(["sweep", "--task", "digits", "--executor", "ray", "--out", str(tmp_path)]) == 2
    assert "needs Ray: pip install 'stabench[scale]'" in capsys.readouterr().err


@pytest.fixture
def ray_local(monkeypatch):
    """Ray's module, with no auth token written into the home directory."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return __import__("ray")


@needs_ray
@pytest.mark.slow
def test_ray_sweep_gives_the_local_report_and_resumes(tmp_path, tiny_suite, ray_local):
    suite, whole = tiny_suite
    out = tmp_path / "ray"
    proc = run_cli("sweep", "--suite", suite, "--executor", "ray", "--workers", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "4 cells: 4 trained, 0 skipped" in proc.stdout
    assert report_tables(out, tmp_path / "report-ray") == report_tables(whole, tmp_path / "report")

    proc = run_cli("sweep", "--suite", suite, "--executor", "ray", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "4 cells: 0 trained, 4 skipped" in proc.stdout


@needs_ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # ray.init's fork+exec of its servers
def test_ray_retries_a_cell_whose_worker_died(tmp_path, ray_local):
    ray = ray_local
    from stabench.executor import RayExecutor, run_sweep
    from stabench.store import Store

    first, second = (tiny_spec(method, steps=20, seeds=1, lrs=(0.1,))
                     for method in ("none", "clip_norm"))
    markers = tmp_path / "attempted"
    markers.mkdir()
    temp = tempfile.mkdtemp(prefix="sbray-")  # short: Ray's socket paths have a length limit
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path,
                                       "STABENCH_TEST_PREEMPT_DIR": str(markers)},
                          "worker_process_setup_hook": "ray_preempt.install"})
    try:
        # no retries: the lost worker is a failed cell, and nothing is written
        summary = run_sweep([first], str(tmp_path / "out"), RayExecutor(retries=0))
        assert summary.trained == 0 and len(summary.failed) == 1
        assert "WorkerCrashedError" in summary.failed[0][1]
        assert Store(tmp_path / "out").load(first) is None

        # Ray's retry: the second cell's first attempt dies too, its retry stores the record
        summary = run_sweep([first, second], str(tmp_path / "out"), RayExecutor())
        assert (summary.trained, summary.failed) == (2, [])
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert sorted(p.name for p in markers.iterdir()) == sorted([first.hash, second.hash])
    assert all(Store(tmp_path / "out").load(spec) is not None for spec in (first, second))

"""A cell trains to the same bits in every process of a host: `run` or a sweep with one worker or
two, pinned to a core or not, with a warm or a cold compilation cache; `rerun` says how a record
compares when what decides the rounding differs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, assert_same_records, run_cli

# the smoke suite's first cell (tasks/suites/smoke.toml), trained by `run`
SMOKE_CELL = ("--task", "digits", "--method", "none", "--seeds", "2", "--lrs", "0.1,3",
              "--set", "train.steps=30", "--set", "train.eval_every=15")


def test_a_serial_sweep_writes_the_records_of_a_two_worker_sweep(tmp_path, tiny_suite):
    suite, whole = tiny_suite  # two workers, each pinned to its core
    proc = run_cli("sweep", "--suite", suite, "--workers", "1", "--out", tmp_path / "serial")
    assert proc.returncode == 0, proc.stderr
    assert_same_records(tmp_path / "serial", whole)


@pytest.mark.parametrize("pinned", [False, True], ids=["unpinned", "pinned-cold-cache"])
def test_run_writes_the_sweeps_record_pinned_or_not_with_a_cold_cache(tmp_path, tiny_suite,
                                                                      pinned):
    suite, whole = tiny_suite
    command = [sys.executable, "-m", "stabench", "run", *SMOKE_CELL, "--out", tmp_path / "run"]
    env = dict(os.environ)
    if pinned:
        if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
            pytest.skip("needs taskset and two usable cores to pin a process to one of them")
        command = ["taskset", "-c", str(max(os.sched_getaffinity(0))), *command]
        env["STABENCH_CACHE_DIR"] = str(tmp_path / "cold-cache")
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert_same_records(tmp_path / "run", whole)


def test_rerun_says_within_rounding_where_what_decides_the_rounding_differs(tmp_path, tiny_suite):
    suite, whole = tiny_suite
    record = sorted(whole.rglob("*.json"))[0]
    stored = json.loads(record.read_text())["timing"]["run_group"]
    other = 1 if stored != 1 else 2  # another grouping: another rounding
    env = {**os.environ, "STABENCH_RUN_GROUP": str(other)}
    proc = subprocess.run([sys.executable, "-m", "stabench", "rerun", str(record)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "equal within rounding" in first and f"run_group: {stored} -> {other}" in first, (
        proc.stdout)
    assert "first step: largest relative difference" in proc.stdout


def _from_another_host(record, first_loss_scale=1.0):
    """Rewrite a stored record as if trained on another CPU (its first losses scaled), with
    checksums that match."""
    from stabench.store import content_sha256, sha256

    with np.load(record.with_suffix(".npz")) as tel:
        arrays = {k: tel[k] for k in tel.files}
    arrays["loss"] = arrays["loss"].copy()
    arrays["loss"][:, 0] *= first_loss_scale
    np.savez_compressed(record.with_suffix(".npz"), **arrays)
    body = json.loads(record.read_text())
    body["provenance"]["numerics"]["cpu_model"] = "another CPU"
    body["telemetry_sha256"] = sha256(record.with_suffix(".npz").read_bytes())
    body["record_sha256"] = content_sha256(body)
    record.write_text(json.dumps(body))


def test_a_report_says_when_its_records_come_from_different_host_configurations(tmp_path,
                                                                              tiny_sweep):
    from stabench.reports import write_report

    def provenance(directory):
        markdown = write_report(directory, tmp_path / "report", plots=False, warn=pytest.fail)
        return markdown.split("## Provenance")[1]

    assert "rounding:" not in provenance(tiny_sweep.whole)
    shutil.copytree(tiny_sweep.whole, tmp_path / "copy")
    _from_another_host(sorted((tmp_path / "copy").rglob("*.json"))[0])
    assert "- rounding: the records come from 2 different host configurations" in provenance(
        tmp_path / "copy")


def test_rerun_exits_1_for_a_difference_beyond_rounding(tmp_path, tiny_suite):
    suite, whole = tiny_suite
    source = sorted(whole.rglob("*.json"))[0]
    shutil.copytree(whole, tmp_path / "copy")
    record = tmp_path / "copy" / source.relative_to(whole)
    _from_another_host(record, first_loss_scale=1.01)  # a first step 1% off: no rounding does that
    proc = run_cli("rerun", record)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT reproduced" in proc.stdout and "cpu_model: 'another CPU' ->" in proc.stdout
    assert "first step: largest relative difference 0.0099" in proc.stdout, proc.stdout


def _cell(loss0=2.0, diverged_at=(-1, 5), cpu="A"):
    """A two-run record body and telemetry: run 1 diverged at step `diverged_at[1]`."""
    steps = 8
    loss = np.tile(np.linspace(loss0, 1.0, steps, dtype=np.float32), (2, 1))
    runs = [{"seed": 0, "lr": 0.1, "diverged": float(d >= 0),
             "divergence_step": float(d if d >= 0 else steps - 1), "final_train_loss": 1.0}
            for d in diverged_at]
    body = {"runs": runs, "timing": {"run_group": 2, "devices": 1},
            "provenance": {"numerics": {"cpu_model": cpu}}}
    return body, {"loss": loss, "grad_norm": loss * 3, "diverged_at": np.array(diverged_at)}


def test_compare_tells_exact_from_rounding_from_a_real_difference():
    from stabench.reproduce import FIRST_STEP_RTOL, compare

    assert compare(_cell(), _cell()).exact
    # the same host configuration: any difference is real, however small
    same_host = compare(_cell(), _cell(loss0=2.0 * (1 + 1e-7)))
    assert not same_host.exact and not same_host.ok and not same_host.facts_changed
    # another host: a first step within rounding, a divergence 2 steps later, is within rounding
    other = compare(_cell(), _cell(loss0=2.0 * (1 + 1e-6), diverged_at=(-1, 7), cpu="B"))
    assert other.within_rounding and other.facts_changed == {"cpu_model": ("A", "B")}
    assert other.step_shifts == ["run 1 at step 5 in the record, 7 now (+2)"]
    assert 0 < other.first_step_rel_diff < FIRST_STEP_RTOL
    # another host, a first step beyond rounding: a real difference
    assert not compare(_cell(), _cell(loss0=2.0 * (1 + 10 * FIRST_STEP_RTOL), cpu="B")).ok
    # a run whose outcome flipped is reported, not hidden
    flipped = compare(_cell(), _cell(loss0=2.0 * (1 + 1e-6), diverged_at=(-1, -1), cpu="B"))
    assert flipped.within_rounding and "stayed finite now" in flipped.outcome_changes[0]

"""Faults injected into real sweeps in subprocesses (tests/faults.py places them at chosen events):
SIGKILL during compile, mid-cell and between the telemetry write and the record rename; Ctrl-C
with one and with two workers; a corrupted store; two sweeps into one directory at once. Each ends
with the report an uninterrupted sweep gives (the `tiny_sweep` fixture)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, report_tables

FAULTS = Path(__file__).resolve().parent / "faults.py"
pytestmark = pytest.mark.slow


def faulty(args, fault, log, **kw) -> subprocess.Popen:
    """Start `python tests/faults.py ARGS` (the CLI, with the fault) in its own process group."""
    env = {**os.environ, "STABENCH_FAULT": fault, "STABENCH_FAULT_LOG": str(log)}
    return subprocess.Popen([sys.executable, str(FAULTS), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def finish(proc, timeout=600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def events(log) -> list[tuple[str, int, str]]:
    """(event, pid, detail) per line of a tests/faults.py log."""
    if not Path(log).exists():
        return []
    rows = []
    for line in Path(log).read_text().splitlines():
        kind, pid, detail = (line.split(" ", 2) + [""])[:3]
        rows.append((kind, int(pid), detail))
    return rows


def group_gone(pgid, timeout=60.0) -> bool:
    """Whether every process of the group has exited (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def snapshot(out) -> dict[Path, bytes]:
    """Bytes of every verified record and its telemetry."""
    from stabench.store import Store

    records, _ = Store(out).records()
    return {p: p.read_bytes() for r in records for p in (r.path, r.path.with_suffix(".npz"))}


def debris(out) -> list[Path]:
    """Files a clean store never holds: temp files, telemetry without its record."""
    temps = list(Path(out).rglob("*.tmp"))
    orphans = [p for p in Path(out).rglob("*.npz") if not p.with_suffix(".json").exists()]
    return temps + orphans


def test_sweep_killed_in_compile_mid_cell_and_in_a_record_write_resumes_to_the_same_report(
        tmp_path, tiny_sweep):
    """Three SIGKILLs, then the same command once more. Cells stored before a kill keep their
    exact bytes; the cell torn by each kill is trained again; the report equals the reference."""
    out = tmp_path / "out"
    args = ("sweep", "--suite", tiny_sweep.suite, "--out", out)
    kept: dict[Path, bytes] = {}

    # 1. one worker; the second cell's compile is killed (the first cell is stored by then)
    proc = faulty([*args, "--workers", "1"], "kill@compile#2", tmp_path / "1.log")
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err
    assert [e for e, _, _ in events(tmp_path / "1.log")].count("compile") == 2
    kept = snapshot(out)
    assert len(kept) == 2 and not debris(out)  # one record and its telemetry

    # 2. two workers; the sweep's own process (only) is killed mid-cell, at the first finished
    # chunk of the two cells in training: its workers must stop after their chunk in flight, and
    # store nothing (left alone, each would finish its cell)
    proc = faulty([*args, "--workers", "2"], "kill-main@chunk#1", tmp_path / "2.log")
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err
    assert group_gone(proc.pid), "workers outlived the killed sweep"
    chunks = [pid for kind, pid, _ in events(tmp_path / "2.log") if kind == "chunk"]
    assert chunks and proc.pid not in chunks
    assert snapshot(out) == kept and not debris(out)

    # 3. one worker; killed after the next cell's telemetry and record temp file are written,
    # before the record is renamed into place
    proc = faulty([*args, "--workers", "1"], "kill@record#1", tmp_path / "3.log")
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err
    (record,) = [Path(d) for kind, _, d in events(tmp_path / "3.log") if kind == "record"]
    assert not record.exists() and record.with_suffix(".npz").exists()  # torn: no record
    temps = list(out.rglob("*.tmp"))
    assert [t.name.startswith(f".{record.name}.") for t in temps] == [True]
    assert snapshot(out) == kept

    # 4. the same command finishes the sweep
    proc = faulty([*args, "--workers", "1"], "none", tmp_path / "4.log")
    code, stdout, err = finish(proc)
    assert code == 0, err
    stored_before = len(kept) // 2
    assert f"4 cells: {4 - stored_before} trained, {stored_before} skipped" in stdout
    assert f"removed {temps[0]}: left by a writer that was killed" in err
    final = snapshot(out)
    assert len(final) == 8 and all(final[p] == b for p, b in kept.items())
    assert record in final and not debris(out) and not list(out.rglob("*.lock"))
    assert "Traceback" not in err
    assert report_tables(out, tmp_path / "report") == tiny_sweep.report


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_during_a_sweep_stops_within_a_chunk_and_says_how_to_resume(
        tmp_path, tiny_sweep, workers):
    """SIGINT to the sweep's process group (Ctrl-C in a terminal) at the third finished chunk:
    exit 130, no more than one further chunk per worker, no partial file, no process left, a
    message with what is stored and the command that resumes; that command finishes the sweep."""
    out, log = tmp_path / "out", tmp_path / "int.log"
    proc = faulty(["sweep", "--suite", tiny_sweep.suite, "--workers", workers, "--out", out],
                  "int@chunk#3", log)
    code, _, err = finish(proc)
    assert code == 130, err
    assert group_gone(proc.pid, timeout=5), "a worker outlived the interrupted sweep"
    assert "Traceback" not in err
    log_events = events(log)
    at = next(i for i, (kind, _, _) in enumerate(log_events)
              if kind == "chunk" and sum(k == "chunk" for k, _, _ in log_events[:i + 1]) == 3)
    later = [pid for kind, pid, _ in log_events[at + 1:] if kind == "chunk"]
    assert all(later.count(pid) <= 1 for pid in set(later))  # at most the chunk in flight
    if workers == 1:
        assert not later  # one process: it stops in the callback of that very chunk
    stored = len(snapshot(out)) // 2
    assert stored < 4 and not debris(out)
    assert f"interrupted: {stored} of 4 cells are stored in {out}" in err
    resume = err.split("Resume with the same command:\n")[1].strip().splitlines()[0]
    assert resume.startswith("python -m stabench sweep ")

    if workers == 2:  # the printed command resumes the sweep
        argv = shlex.split(resume)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert f"4 cells: {4 - stored} trained, {stored} skipped" in proc.stdout
        assert report_tables(out, tmp_path / "report") == tiny_sweep.report


def test_corrupt_store_is_named_by_report_and_redone_by_sweep(tmp_path, tiny_sweep, capsys):
    """A truncated record, a spec that no longer matches its hash, lost telemetry and an older
    format version: `report` names each file and uses none of them; `sweep` names each and
    trains exactly those cells again, giving the reference report."""
    import shutil

    from stabench.cli import main

    out = tmp_path / "out"
    shutil.copytree(tiny_sweep.whole, out)
    paths = sorted(out.rglob("*.json"))
    truncated, edited, lost, old = paths
    truncated.write_bytes(truncated.read_bytes()[:200])
    data = json.loads(edited.read_text())
    data["spec"]["lrs"] = [0.1, 0.3]  # the spec no longer hashes to spec_hash
    edited.write_text(json.dumps(data))
    lost.with_suffix(".npz").unlink()
    data = json.loads(old.read_text())
    data["format_version"] = 0
    old.write_text(json.dumps(data))
    problems = {truncated: "unreadable record", edited: "spec hash does not match its spec",
                lost: f"telemetry file {lost.stem}.npz is missing",
                old: "format version 0 is not 3"}

    assert main(["report", str(out), "--no-plots"]) == 2  # nothing usable is left
    _, err = capsys.readouterr()
    for path, problem in problems.items():
        assert f"skipped {path}: {problem}" in err
    assert "no usable records" in err and "Traceback" not in err

    proc = subprocess.run([sys.executable, "-m", "stabench", "sweep", "--suite", tiny_sweep.suite,
                           "--workers", "1", "--out", out], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "4 cells: 4 trained, 0 skipped" in proc.stdout
    for path, problem in problems.items():
        assert f"training again: {path}: {problem}" in proc.stderr
    assert report_tables(out, tmp_path / "report") == tiny_sweep.report


def test_two_sweeps_into_one_directory_write_each_record_once(tmp_path, tiny_sweep):
    """The same sweep started twice at once: every cell is trained and written by exactly one of
    them (the record renames logged by both processes), both finish, the report is the reference."""
    out, log = tmp_path / "out", tmp_path / "records.log"
    args = ["sweep", "--suite", tiny_sweep.suite, "--workers", "1", "--out", out]
    procs = [faulty(args, "none", log) for _ in range(2)]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err
    written = [d for kind, _, d in events(log) if kind == "record"]
    assert sorted(written) == sorted(str(p) for p in tiny_sweep_records(out)) and len(written) == 4
    trained = [int(out_.split("4 cells: ")[1].split(" trained")[0]) for _, out_, _ in results]
    assert sum(trained) == 4
    assert not debris(out) and not list(out.rglob("*.lock"))
    assert report_tables(out, tmp_path / "report") == tiny_sweep.report


def tiny_sweep_records(out) -> list[Path]:
    return sorted(Path(out).rglob("*.json"))


def test_a_sweep_record_reruns_exactly(tiny_sweep):
    """A record a pinned sweep worker wrote carries everything `rerun` needs to reproduce it bit
    for bit in a fresh, unpinned process."""
    record = sorted(tiny_sweep.whole.rglob("*.json"))[0]
    proc = subprocess.run([sys.executable, "-m", "stabench", "rerun", str(record)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reproduced exactly" in proc.stdout

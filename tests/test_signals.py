"""Ctrl-C at any moment of a command ends it with exit status 130, one message, no traceback and
nothing partial; sweep workers end within moments of their sweep, one killed with kill -9 too
(stabench/signals.py). Commands run in sessions of their own: a signal to the group is Ctrl-C in
their terminal, and what they leave behind can be killed by the test."""

import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

from stabench import signals

FAULTS = ROOT / "tests" / "faults.py"
RUN = ("run", "--task", "digits", "--steps", "3000", "--seeds", "2", "--lrs", "0.1,1")
SWEEP = ("sweep", "--suite", "smoke", "--workers", "2")


def launch(tmp_path, *args, fault=None) -> subprocess.Popen:
    """`python -m stabench ARGS` (or tests/faults.py ARGS with a fault) in a session of its own;
    its unbuffered stderr goes to tmp_path/stderr, read while it runs by `stderr`."""
    command = [str(FAULTS)] if fault else ["-m", "stabench"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env.update(STABENCH_FAULT=fault, STABENCH_FAULT_LOG=str(tmp_path / "fault.log"))
    with open(tmp_path / "stderr", "wb") as err:
        return subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def stderr(tmp_path) -> str:
    return (tmp_path / "stderr").read_text(errors="replace")


def wait_until(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    """The child processes of `pid` (any of its threads may have started one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended
            pass
    return found


def workers(pid: int) -> list[int]:
    """The sweep workers among the children of `pid` (not multiprocessing's resource tracker)."""
    found = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def stat(pid) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, ppid, pgrp, ... ([]: gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def running(pid) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    return stat(pid)[:1] not in ([], ["Z"], ["X"])


def group(pgid: int) -> list[int]:
    """The processes of a process group that have not exited."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")
            if stat(p.name)[2:3] == [str(pgid)] and running(p.name)]


def kill_group(pgid: int) -> None:
    """SIGKILL to what a test left running of a command: never a process outside its group."""
    for pid in group(pgid):
        os.kill(pid, signal.SIGKILL)


def locks(out) -> list[Path]:
    return list(Path(out).rglob("*.lock"))


def messages(err: str) -> list[str]:
    """stderr's lines without progress bars (tqdm redraws them after \\r, moves with escapes)."""
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)
    return [line.strip() for line in re.split(r"[\r\n]", err) if line.strip() and "|" not in line]


def assert_interrupted(proc, tmp_path, out) -> None:
    """Exit 130; on stderr one message (a sweep's names the command that resumes it) and no
    traceback; no process of the command left; in `out` no partial file: every record verifies
    and has its telemetry, no temp or lock file."""
    from stabench.store import Store

    try:
        code = proc.wait(timeout=120)
        wait_until(lambda: not group(proc.pid), "the command's processes to end", timeout=5)
    finally:
        kill_group(proc.pid)
    err = stderr(tmp_path)
    assert code == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = messages(err)
    assert sum(line.startswith("interrupted") for line in lines) == 1, lines
    assert all(line.startswith(("interrupted", "python -m stabench ")) for line in lines), lines
    records, bad = Store(out).records()
    assert not bad
    files = {p for p in Path(out).rglob("*") if p.is_file()}
    assert files == {p for r in records for p in (r.path, r.path.with_suffix(".npz"))}, files


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["import", "compile", "train", "write"])
def test_ctrl_c_at_any_moment_of_run_exits_130_with_one_message(tmp_path, moment):
    """The issue's command, interrupted while it imports JAX (where a KeyboardInterrupt became
    an ImportError, or was dropped in JAX's gc callback and the run went on to exit 0), while it
    compiles (its bar shows 0 steps), while it trains (100 steps), and between a record's temp
    file and its rename (tests/faults.py): nothing of the cell is written."""
    out = tmp_path / "out"
    if moment == "write":
        proc = launch(tmp_path, *RUN[:4], "300", *RUN[5:], "--out", out, fault="int@record#1")
    else:
        proc = launch(tmp_path, *RUN, "--out", out)
        if moment == "import":
            time.sleep(0.3)
        else:
            shown = "0/3000" if moment == "compile" else "100/3000"
            wait_until(lambda: shown in stderr(tmp_path) or proc.poll() is not None, shown)
        os.killpg(proc.pid, signal.SIGINT)
    assert_interrupted(proc, tmp_path, out)
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["import", "workers", "cells"])
def test_ctrl_c_at_any_moment_of_a_sweep_exits_130_with_one_message(tmp_path, moment):
    """Ctrl-C while the sweep imports, while its workers start (they printed tracebacks), and
    while they train their first cells (each holds a cell's lock): every process ends, with one
    message and nothing partial."""
    out = tmp_path / "out"
    proc = launch(tmp_path, *SWEEP, "--out", out)
    if moment == "import":
        time.sleep(0.3)
    elif moment == "workers":
        wait_until(lambda: workers(proc.pid) or proc.poll() is not None, "a worker")
    else:
        wait_until(lambda: locks(out) or proc.poll() is not None, "a claimed cell")
    os.killpg(proc.pid, signal.SIGINT)
    assert_interrupted(proc, tmp_path, out)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["starting", "training"])
def test_workers_end_within_moments_of_their_sweep_killed_with_kill_9(tmp_path, moment):
    """kill -9 of the sweep's own process while its workers start (importing JAX) and while they
    hold their cells' locks (loading data, compiling or training a chunk of 20000 steps, about a
    minute without a Python signal handler running): every worker is gone within 3 s (they went
    on for up to 22 s, and some were still compiling a minute later)."""
    out = tmp_path / "out"
    proc = launch(tmp_path, *SWEEP, "--steps", 20000, "--set", "train.eval_every=20000",
                  "--out", out)
    try:
        wait_until(lambda: len(workers(proc.pid)) == 2, "two workers")
        if moment == "training":
            wait_until(lambda: len(locks(out)) == 2, "two claimed cells")
        pids = workers(proc.pid)
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        while any(map(running, pids)) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert not any(map(running, pids)), f"workers alive {time.monotonic() - t0:.1f} s on"
        assert time.monotonic() - t0 < 3.0, f"workers ended {time.monotonic() - t0:.1f} s on"
    finally:
        kill_group(proc.pid)


# ---- the mechanism, in this process -----------------------------------------------------------
def test_a_ctrl_c_python_drops_in_a_gc_callback_is_raised_again_with_no_safe_point(capfd):
    """Raised in a garbage-collector callback (JAX registers one), KeyboardInterrupt is dropped
    by Python; with no chunk to raise it at, the handler's thread raises it again in moments,
    and nothing about the dropped one is printed."""
    def ctrl_c_in_gc(phase, info):
        gc.callbacks.remove(ctrl_c_in_gc)
        signal.raise_signal(signal.SIGINT)  # the handler raises right here, and gc drops it

    before, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    raised_after = None
    with signals.handling():
        gc.callbacks.append(ctrl_c_in_gc)
        t0 = time.monotonic()
        try:
            gc.collect()
            time.sleep(10)
        except KeyboardInterrupt:
            raised_after = time.monotonic() - t0
    assert raised_after is not None and raised_after < 1.0
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before and sys.unraisablehook is hook  # restored


def test_a_ctrl_c_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised while an extension module initializes becomes an ImportError
    (or a crash): the handler waits for the import to end, then raises it in moments, also in
    a sleep."""
    (tmp_path / "ctrl_c_while_imported.py").write_text(
        "import signal\nimport time\n\nsignal.raise_signal(signal.SIGINT)\ntime.sleep(0.2)\n"
        "DONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ctrl_c_while_imported", raising=False)
    imported, raised_after = False, None
    with signals.handling():
        try:
            import ctrl_c_while_imported

            imported, t0 = ctrl_c_while_imported.DONE, time.monotonic()
            time.sleep(10)
        except KeyboardInterrupt:
            raised_after = time.monotonic() - t0
    assert imported and raised_after is not None and raised_after < 1.0


def test_a_ctrl_c_in_an_uncut_block_comes_at_its_end_and_later_ones_wait_for_cleanup():
    reached = False
    with signals.handling():
        with pytest.raises(KeyboardInterrupt):
            with signals.uncut():
                signal.raise_signal(signal.SIGINT)
                reached = True
        signal.raise_signal(signal.SIGINT)  # the command is stopping already: absorbed
        time.sleep(0.1)  # and not raised by the handler's thread either
    assert reached


def test_exit_at_once_prints_the_message_and_exits_130():
    """What `python -m stabench` does while it loads and after its command returns: nothing is
    being written, output is flushed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom stabench.signals import exit_at_once\n"
         "exit_at_once()\nprint('output so far', end='')\nprint('ready', file=sys.stderr)\n"
         "time.sleep(60)\n"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=30)
    assert (proc.returncode, stdout, err) == (130, b"output so far",
                                             f"{signals.MESSAGE}\n".encode())

"""Run the stabench CLI with a fault injected at a chosen event, in this process and in the worker
processes it spawns (spawn re-imports this file as their main module, so the hooks apply there too).

    STABENCH_FAULT=ACTION@EVENT#N STABENCH_FAULT_LOG=FILE python tests/faults.py sweep ...

Every process appends one line per event to FILE: "EVENT PID DETAIL".
  compile  a cell's programs start compiling (Engine.compile)
  chunk    a chunk of training steps has finished (the engine's progress callback; DETAIL: step)
  record   a record's temp file is written and fsynced, its telemetry already renamed into place,
           and the record is about to be renamed into place (DETAIL: its path)
At the N-th EVENT over all processes (counted in FILE under a lock), ACTION happens:
  kill       SIGKILL to the whole process group: a power cut, nothing runs after it
  kill-main  SIGKILL to the process that was started (the group leader) only; its workers live on.
             From then on every other process holds at its next event until that process is gone,
             so what a worker does next happens as an orphan, not in a race with the kill
  int        SIGINT to the whole process group: Ctrl-C in a terminal
  none       nothing (N is ignored): the log alone
A `compile` action fires from a timer thread 0.2 s after the compile starts; the compiling thread
waits for it before returning, so the fault lands inside the compile.
The script makes itself a process group leader, so a group signal never reaches the test runner.
"""

import fcntl
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stabench import train  # noqa: E402

LOG = os.environ.get("STABENCH_FAULT_LOG")
ACTION, _, WHERE = os.environ.get("STABENCH_FAULT", "none@none#0").partition("@")
EVENT, _, NTH = WHERE.partition("#")
NTH = int(NTH or 0)
SIGNALS = {"kill": signal.SIGKILL, "kill-main": signal.SIGKILL, "int": signal.SIGINT}
assert ACTION in (*SIGNALS, "none"), f"unknown fault action {ACTION}"


def fire() -> None:
    if ACTION == "kill-main":
        Path(f"{LOG}.fired").touch()
        os.kill(os.getpgrp(), signal.SIGKILL)
        wait_orphaned()
    else:
        os.killpg(os.getpgrp(), SIGNALS[ACTION])


def wait_orphaned(timeout: float = 60.0) -> None:
    """Return once the sweep process (this worker's parent, the group leader) has exited."""
    for _ in range(int(timeout / 0.01)):
        if os.getppid() != os.getpgrp():
            return
        threading.Event().wait(0.01)


def event(kind: str, detail: str = "") -> bool:
    """Log the event; True when it is the one the fault is set for."""
    if not LOG:
        return False
    if ACTION == "kill-main" and os.getpid() != os.getpgrp() and Path(f"{LOG}.fired").exists():
        wait_orphaned()
    with open(LOG, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{kind} {os.getpid()} {detail}\n")
        f.flush()
        f.seek(0)
        n = sum(line.split(" ", 1)[0] == kind for line in f)
    return ACTION != "none" and kind == EVENT and n == NTH


def read_log(path) -> list[tuple[str, int, str]]:
    """The events of a log file as (event, pid, detail)."""
    out = []
    for line in Path(path).read_text().splitlines():
        kind, pid, detail = (line.split(" ", 2) + [""])[:3]
        out.append((kind, int(pid), detail))
    return out


_compile = train.Engine.compile
_run = train.Engine.run
_replace = os.replace


def compile_hook(self, *args, **kwargs):
    if not event("compile"):
        return _compile(self, *args, **kwargs)
    fired = threading.Event()
    threading.Timer(0.2, lambda: (fire(), fired.set())).start()
    result = _compile(self, *args, **kwargs)
    fired.wait()
    return result


def run_hook(self, seeds, lrs, on_chunk=None):
    def chunk(step):
        if event("chunk", str(step)):
            fire()
        if on_chunk:
            on_chunk(step)

    return _run(self, seeds, lrs, chunk)


def replace_hook(src, dst, *args, **kwargs):
    if str(dst).endswith(".json") and event("record", str(dst)):
        fire()
    return _replace(src, dst, *args, **kwargs)


train.Engine.compile = compile_hook
train.Engine.run = run_hook
os.replace = replace_hook

if __name__ == "__main__":
    if os.getpgrp() != os.getpid():
        os.setpgrp()
    from stabench.cli import main

    sys.exit(main(sys.argv[1:]))

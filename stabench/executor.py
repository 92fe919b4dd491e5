"""Running a sweep's cells: the executor interface, the local executors, resume and progress.

An executor takes cells (RunSpecs) and a results directory and yields one `Outcome` per cell as
cells finish; records are written only through `Store.save` (atomic), so a sweep killed at any
instant loses at most its cells in flight. A cell is trained under its store lock (`Store.claim`),
so two sweeps into one directory never train or write a cell twice: the second waits for the
first's cells and takes over those whose holder died. `run_sweep` skips cells already stored
(resume) and counts what happened. Another engine plugs in by implementing `Executor`:
`RayExecutor` runs each cell as a Ray task on a cluster.

On a CPU host one process leaves cores idle at these model sizes (XLA:CPU keeps a second core
mostly idle), so the local executor runs one worker process per core, each pinned to its core
before JAX starts (XLA then sizes its thread pool to that core, and the engine trains the cell's
runs in groups that fit the core's L2 cache). Workers are long-lived: each keeps its loaded
dataset and JAX's in-memory caches across cells and uses the persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import signals
from .config import RunSpec, task_of
from .hardware import code_state, usable_cores
from .plugins import ENV as PLUGINS_ENV
from .registry import UserError
from .runner import BUSY, STORED, TRAINED, train_and_store  # an outcome's status, or failed
from .store import Store, check_writable
STOP_WAIT_S = 20.0  # how long an interrupted worker may take to finish its chunk before a kill


@dataclass(frozen=True)
class Outcome:
    index: int  # position of the cell in the list given to the executor
    path: str | None  # the record written; None when the cell failed
    runs: int
    diverged: int
    seconds: float
    error: str | None = None
    status: str = TRAINED


class Listener(Protocol):
    def started(self, index: int, slot: int) -> None: ...

    def progressed(self, index: int, slot: int, steps: int) -> None: ...


class Executor(Protocol):
    slots: int  # cells trained at once, one progress bar each (0: the executor places cells itself)

    def run(self, cells: Sequence[RunSpec], out: str,
            listener: Listener | None = None) -> Iterator[Outcome]: ...


def default_workers() -> int:
    """One per usable core on a CPU host; one on accelerators (the engine shards its runs over
    every local device)."""
    import jax

    return len(usable_cores()) if jax.default_backend() == "cpu" else 1


class DataCache:
    """The last dataset loaded: consecutive cells of a sweep mostly share their task's data."""

    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self.key, self.data = None, None

    def __call__(self, spec: RunSpec):
        from .runner import load_data

        task = task_of(spec)
        key = (task.component("dataset"), task.val_fraction, spec.fake_data)
        if key != self.key:
            self.key, self.data = None, None  # release the old one before loading
            self.data, self.key = load_data(spec, self.data_dir), key
        return self.data


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def train_one(index: int, spec: RunSpec, store: Store, data: DataCache, on_chunk) -> Outcome:
    """Train and store one cell, not waiting for another process that holds it; a failure
    becomes the outcome's one-line error."""
    t0 = time.perf_counter()
    try:
        done = train_and_store(spec, store, data, on_chunk, wait=False)
    except Exception as err:  # noqa: BLE001  (one cell's failure must not end the sweep)
        return Outcome(index, None, len(spec.runs), 0, time.perf_counter() - t0,
                       f"{type(err).__name__}: {err}{_where(err)}")
    if done.status == BUSY:
        return Outcome(index, None, len(spec.runs), 0, 0.0, status=BUSY)
    if done.status == STORED:
        return Outcome(index, str(done.record.path), len(spec.runs), 0, 0.0, status=STORED)
    diverged = int(sum(run["diverged"] for run in done.record.runs))
    return Outcome(index, str(done.record.path), len(done.record.runs), diverged,
                   time.perf_counter() - t0)


class SerialExecutor:
    """Cells one after another in this process (one worker, or accelerators)."""

    slots = 1

    def __init__(self, data_dir: str | None = None):
        self.data_dir = data_dir

    def run(self, cells, out, listener=None):
        from .process import prepare

        prepare()
        store, data = Store(out), DataCache(self.data_dir)
        for index, spec in enumerate(cells):
            if listener:
                listener.started(index, 0)
            on_chunk = ((lambda steps, i=index: listener.progressed(i, 0, steps)) if listener
                        else None)
            yield train_one(index, spec, store, data, on_chunk)


def train_cells(slot: int, cpu: int | None, out: str, data_dir: str | None, inbox,
                results) -> None:
    """A worker process: pin to its core, then train the cells the parent sends until None."""
    # The parent handles Ctrl-C and stops its workers (SIGINT was blocked from the start: see
    # LocalExecutor.run)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopped: list[int] = []

    def stop(signum, frame):
        # The parent stops its workers: leave at the next safe point, a finished chunk or between
        # cells, having written nothing. Raising here instead could land in a callback whose
        # exceptions Python ignores (a gc callback), and the worker would train on.
        stopped.append(signum)
        results.cancel_join_thread()

    def progress(index: int, steps: int) -> None:
        if stopped:  # the cell in flight is dropped; unwinding releases its lock
            raise SystemExit(128 + stopped[0])
        results.put(("progress", slot, index, steps))

    signal.signal(signal.SIGTERM, stop)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    code_state()  # the code this worker runs, as it starts
    from .process import prepare

    prepare()
    store, data = Store(out), DataCache(data_dir)
    while not stopped:
        try:
            item = inbox.get(timeout=1.0)  # a timeout, to see `stopped`
        except queue.Empty:
            continue
        if item is None:
            return
        index, spec = item
        outcome = train_one(index, spec, store, data, lambda steps: progress(index, steps))
        results.put(("done", slot, outcome))


@dataclass
class _Slot:
    cpu: int | None
    process: mp.Process | None = None
    inbox: object = None
    index: int | None = None  # cell in flight
    started: float = field(default=0.0)


class LocalExecutor:
    """One spawned worker process per slot, each pinned to its own core where the OS allows."""

    def __init__(self, workers: int, data_dir: str | None = None):
        self.slots = workers
        self.data_dir = data_dir
        cores = usable_cores()
        self.cpus = [cores[i % len(cores)] if len(cores) > 1 else None for i in range(workers)]

    def run(self, cells, out, listener=None):
        ctx = mp.get_context("spawn")  # never fork a process that has started JAX's threads
        results = ctx.Queue()
        todo = list(range(len(cells)))[::-1]  # popped from the end: sweep order
        slots = [_Slot(cpu) for cpu in self.cpus[:max(1, min(self.slots, len(cells)))]]

        def start(slot_id: int) -> None:
            slot = slots[slot_id]
            slot.inbox = ctx.Queue()
            slot.process = ctx.Process(target=signals.sweep_worker, daemon=True, args=(
                slot_id, slot.cpu, str(out), self.data_dir, slot.inbox, results))
            # Ctrl-C in a terminal reaches the workers too: each starts with SIGINT blocked, as
            # this thread has it here, so it prints no traceback before it ignores SIGINT; and
            # this process is not interrupted halfway through starting one.
            with signals.uncut(), signals.sigint_blocked():
                slot.process.start()

        def feed(slot_id: int) -> None:
            slot = slots[slot_id]
            slot.index = todo.pop() if todo else None
            slot.inbox.put(None if slot.index is None else (slot.index, cells[slot.index]))
            if slot.index is not None:
                slot.started = time.perf_counter()
                if listener:
                    listener.started(slot.index, slot_id)

        pending = len(cells)
        try:
            for slot_id in range(len(slots)):
                start(slot_id)
                feed(slot_id)
            while pending:
                try:
                    message = results.get(timeout=1.0)
                except queue.Empty:
                    message = None
                if message and message[0] == "progress":
                    _, slot_id, index, steps = message
                    if listener and slots[slot_id].index == index:
                        listener.progressed(index, slot_id, steps)
                elif message:
                    _, slot_id, outcome = message
                    if slots[slot_id].index == outcome.index:
                        pending -= 1
                        feed(slot_id)
                        yield outcome
                for slot_id, slot in enumerate(slots):
                    if slot.index is not None and not slot.process.is_alive():
                        yield Outcome(slot.index, None, len(cells[slot.index].runs), 0,
                                      time.perf_counter() - slot.started,
                                      f"worker process died (exit code {slot.process.exitcode}; "
                                      f"out of memory?)")
                        pending -= 1
                        slot.index = None
                        if todo:
                            start(slot_id)
                            feed(slot_id)
        finally:
            # Every worker is told to stop: an idle one (sent None, or not yet fed: an interrupt)
            # exits, a busy one finishes its chunk and writes nothing; one that does not within
            # STOP_WAIT_S is killed. A Ctrl-C waits for this: cut short, it would leave workers
            # that the kernel kills when this process exits, perhaps in the middle of a write.
            with signals.uncut():
                live = [slot for slot in slots
                        if slot.process is not None and slot.process.is_alive()]
                for slot in live:
                    slot.process.terminate()
                deadline = time.monotonic() + STOP_WAIT_S
                for slot in live:
                    slot.process.join(max(0.0, deadline - time.monotonic()))
                    if slot.process.is_alive():
                        slot.process.kill()
                        slot.process.join()


def make_executor(workers: int | None, data_dir: str | None = None) -> Executor:
    workers = default_workers() if workers is None else workers
    return SerialExecutor(data_dir) if workers == 1 else LocalExecutor(workers, data_dir)


# ---- Ray: each cell a task on a cluster ----------------------------------------------------------
RAY_RETRIES = 3
_RAY_WORKER: dict = {}  # per Ray worker process: its DataCache, kept across the cells it trains


def _ray_cell(index: int, spec: RunSpec, out: str, data_dir: str | None) -> Outcome:
    """A Ray task: train and store one cell in this worker process."""
    if "data" not in _RAY_WORKER or _RAY_WORKER["data"].data_dir != data_dir:
        from .process import prepare

        prepare()
        _RAY_WORKER["data"] = DataCache(data_dir)
    return train_one(index, spec, Store(out), _RAY_WORKER["data"], None)


def _check_reachable(address: str) -> None:
    """Fail at once on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, colon, port = address.rpartition(":")
    if address == "auto" or "://" in address:
        return
    if not colon or not host or not port.isdigit():
        raise UserError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"cannot connect to the Ray cluster at '{address}': "
                        f"{err.strerror or type(err).__name__}") from None


class RayExecutor:
    """Each cell a Ray task: one per GPU where the cluster has GPUs, else one per CPU.

    `address` ("auto", HOST:PORT or ray://HOST:PORT) joins an existing cluster, whose nodes must
    have stabench installed and see `out` at the same path (a shared file system): tasks write
    their records there through the store's atomic protocol. Without an address a local Ray
    instance is started for the sweep (`cpus` CPUs, default: every usable core) and runs this
    process's stabench. Ray retries a task whose worker process or node died (`retries` times);
    a cell that raises is not retried (training is deterministic) but reported, like locally.
    """

    slots = 0  # Ray places cells: progress is counted per finished cell

    def __init__(self, address: str | None = None, data_dir: str | None = None,
                 cpus: int | None = None, retries: int = RAY_RETRIES):
        if address is not None:
            _check_reachable(address)
        self.address, self.data_dir, self.cpus, self.retries = address, data_dir, cpus, retries

    def _connect(self) -> str | None:
        """Join the cluster or start a local instance (returning its temp dir); Ray already
        initialized in this process (a library user's own ray.init) is used as it is."""
        import ray

        if ray.is_initialized():
            return None
        quiet = {"log_to_driver": False, "logging_level": "warning"}
        # Ray's workers load the plugins this process names, wherever they run
        plugin_env = {PLUGINS_ENV: os.environ[PLUGINS_ENV]} if os.environ.get(PLUGINS_ENV) else {}
        if self.address:
            try:
                ray.init(address=self.address, **quiet,
                         **({"runtime_env": {"env_vars": plugin_env}} if plugin_env else {}))
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot connect to the Ray cluster at '{self.address}': "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                                ) from None
            return None
        temp = tempfile.mkdtemp(prefix="stabench-ray-")
        # Workers import the stabench this process runs, wherever it was imported from.
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=self.cpus or len(usable_cores()), _temp_dir=temp,
                 include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, **plugin_env}}, **quiet)
        return temp

    def run(self, cells, out, listener=None):
        import ray

        if not cells:
            return
        temp = self._connect()
        pending: dict = {}
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            # A GPU task's worker is not reused (Ray's default): JAX keeps the GPU it started on.
            task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=self.retries,
                              retry_exceptions=False)(_ray_cell)
            out = os.path.abspath(out)
            t0 = time.perf_counter()
            pending = {task.remote(index, spec, out, self.data_dir): index
                       for index, spec in enumerate(cells)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                try:
                    outcome = ray.get(done[0])
                except ray.exceptions.RayError as err:  # retries exhausted: worker or node lost
                    message = str(err).strip().splitlines()
                    outcome = Outcome(index, None, len(cells[index].runs), 0,
                                      time.perf_counter() - t0,
                                      f"{type(err).__name__}: {message[0] if message else ''}")
                yield outcome
        finally:
            for ref in pending:  # interrupted: cells in flight are not written
                ray.cancel(ref, force=True)
            if temp is not None:
                ray.shutdown()
                shutil.rmtree(temp, ignore_errors=True)


def make_sweep_executor(kind: str, workers: int | None, address: str | None,
                        data_dir: str | None = None) -> Executor:
    """The executor a sweep command asks for: local worker processes, or Ray."""
    if kind == "local":
        if address is not None:
            raise UserError("--address needs --executor ray")
        return make_executor(workers, data_dir)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'stabench[scale]'") from None
    if workers is not None and address is not None:
        raise UserError("--workers sets the CPUs of a local Ray instance; a cluster at --address "
                        "has its own")
    return RayExecutor(address, data_dir, cpus=workers)


# ---- a sweep: resume, run, count -----------------------------------------------------------------
@dataclass
class Summary:
    cells: int = 0
    trained: int = 0
    skipped: int = 0
    elsewhere: int = 0  # of the skipped: stored by another process during this sweep
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    runs: int = 0
    diverged: int = 0
    seconds: float = 0.0

    def lines(self, out: str) -> list[str]:
        by_other = f", {self.elsewhere} of them by another process" if self.elsewhere else ""
        lines = [f"sweep: {self.cells} cells: {self.trained} trained, {self.skipped} skipped "
                 f"(already stored{by_other}), {len(self.failed)} failed | {self.runs} runs "
                 f"trained, {self.diverged} diverged | wall {_duration(self.seconds)} | "
                 f"results in {out}"]
        for spec, error in self.failed:
            lines.append(f"failed: {cell_label(spec)}: {error}")
        bad_input = sum(error.startswith("UserError:") for _, error in self.failed)
        if bad_input:
            lines.append(f"configuration errors (UserError) in {bad_input} of the failed cells: "
                         f"retrying repeats them; fix what they name")
        if len(self.failed) > bad_input:
            lines.append("run the same command again to retry the failed cells")
        return lines


def cell_label(spec: RunSpec) -> str:
    """task[fields changed from its file] | method | init | optimizer."""
    from .registry import UserError
    from .tasks import flatten, get_task

    try:
        base = flatten(get_task(spec.task).config)
    except UserError:  # a task file given by its path: its fields are the task's own
        base = flatten(spec.task_config)
    shown_apart = {"train.optimizer", "train.lrs", "train.seeds"}  # the cell's own axes
    changed = [f"{k.rpartition('.')[2]}={v}" for k, v in flatten(spec.task_config).items()
               if k not in shown_apart and (k not in base or base[k] != v)]
    task = f"{spec.task}[{','.join(changed)}]" if changed else spec.task
    return f"{task} | {spec.method} | {spec.init} | {spec.optimizer}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, with the summary of what it had done."""

    def __init__(self, summary: Summary):
        super().__init__()
        self.summary = summary


class _Relay:
    """The listener an executor gets: passes a subset of the cells on under their indices in the
    whole list, and raises a Ctrl-C that Python dropped or deferred (`signals.check`)."""

    def __init__(self, listener: Listener | None, indices: list[int]):
        self.listener, self.indices = listener, indices

    def started(self, index: int, slot: int) -> None:
        signals.check()
        if self.listener:
            self.listener.started(self.indices[index], slot)

    def progressed(self, index: int, slot: int, steps: int) -> None:
        signals.check()
        if self.listener:
            self.listener.progressed(self.indices[index], slot, steps)


def run_sweep(cells: list[RunSpec], out: str, executor: Executor,
              progress: Progress | None = None, warn=None, poll_s: float = 1.0) -> Summary:
    """Train every cell not already stored in `out`. A stored record that does not verify (torn,
    corrupt, another format version) is named through `warn` and trained again; temp files of
    killed writers are removed. Cells another process is training are waited for, then skipped
    (it stored them) or trained (it died). Ctrl-C raises SweepInterrupted."""
    t0 = time.perf_counter()
    warn = warn or (lambda message: None)
    store = Store(out)
    todo = []
    for spec in cells:
        record, problem = store.lookup(spec)
        if problem:
            warn(f"training again: {problem}")
        if record is None:
            todo.append(spec)
    summary = Summary(cells=len(cells), skipped=len(cells) - len(todo))
    for directory in sorted({store.path_for(spec).parent for spec in todo}):
        check_writable(directory)
    for tmp in store.remove_stale_temps():
        warn(f"removed {tmp}: left by a writer that was killed")
    if progress:
        progress.begin(todo, summary.skipped, executor.slots)

    def count(outcome: Outcome) -> None:
        if outcome.error is not None:
            summary.failed.append((todo[outcome.index], outcome.error))
        elif outcome.status == STORED:
            summary.skipped += 1
            summary.elsewhere += 1
        else:
            summary.trained += 1
            summary.runs += outcome.runs
            summary.diverged += outcome.diverged
        if progress:
            progress.finished(outcome)

    pending, waiting = list(range(len(todo))), []
    try:
        with signals.handling():
            while pending:
                for outcome in executor.run([todo[i] for i in pending], out,
                                            _Relay(progress, pending)):
                    outcome = dataclasses.replace(outcome, index=pending[outcome.index])
                    if outcome.status == BUSY:
                        waiting.append(outcome.index)
                    else:
                        count(outcome)
                    signals.check()
                pending = []
                if waiting:
                    warn(f"waiting for {len(waiting)} cells that another process is training "
                         f"into {out}")
                while waiting and not pending:
                    free = [i for i in waiting if not store.is_claimed(todo[i])]
                    for i in free:
                        record = store.load(todo[i])
                        if record is None:
                            pending.append(i)  # its trainer died: train it here
                        else:
                            count(Outcome(i, str(record.path), len(todo[i].runs), 0, 0.0,
                                          status=STORED))
                    waiting = [i for i in waiting if i not in free]
                    if waiting and not pending:
                        time.sleep(poll_s)
    except KeyboardInterrupt:
        raise SweepInterrupted(summary) from None
    finally:
        if progress:
            progress.close()
        summary.seconds = time.perf_counter() - t0
    return summary


class Progress:
    """A bar over the sweep's cells, weighted by each cell's work (runs x steps x batch) so its
    ETA accounts for cell sizes, and one bar per worker for the cell it trains."""

    def __init__(self, file=None, disable: bool | None = None):
        self.file = file or sys.stderr
        self.disable = disable

    def begin(self, cells: list[RunSpec], skipped: int, slots: int) -> None:
        from tqdm import tqdm

        self.cells = cells
        self.work = [len(s.runs) * s.train["steps"] * s.train["batch_size"] for s in cells]
        self.counted = [0] * len(cells)
        self.finished_cells, self.failed, self.skipped = 0, 0, skipped
        self.total = tqdm(total=max(1, sum(self.work)), file=self.file, disable=self.disable,
                          position=0, dynamic_ncols=True,
                          bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.bars = [tqdm(total=1, file=self.file, disable=self.disable, position=i + 1,
                          leave=False, dynamic_ncols=True, unit="step",
                          bar_format="  {desc} {n_fmt}/{total_fmt} steps |{bar}| "
                                     "[{elapsed}<{remaining}]")
                     for i in range(slots)]
        self._postfix()

    def _postfix(self) -> None:
        text = f"sweep: {self.finished_cells}/{len(self.cells)} cells"
        if self.skipped:
            text += f" (+{self.skipped} stored before)"
        if self.failed:
            text += f", {self.failed} failed"
        self.total.set_description_str(text, refresh=True)

    def _count(self, index: int, work: int) -> None:
        work = min(work, self.work[index])
        self.total.update(work - self.counted[index])
        self.counted[index] = work

    def started(self, index: int, slot: int) -> None:
        spec = self.cells[index]
        bar = self.bars[slot]
        bar.reset(total=spec.train["steps"])
        bar.set_description_str(cell_label(spec)[:70])

    def progressed(self, index: int, slot: int, steps: int) -> None:
        bar = self.bars[slot]
        bar.update(steps - bar.n)
        self._count(index, self.work[index] * steps // self.cells[index].train["steps"])

    def finished(self, outcome: Outcome) -> None:
        self._count(outcome.index, self.work[outcome.index])  # also cells stopped early
        self.finished_cells += 1
        self.failed += outcome.error is not None
        self._postfix()

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
        self.total.close()

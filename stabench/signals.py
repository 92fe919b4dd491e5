"""The signals that end stabench processes: Ctrl-C, and the death of a sweep worker's parent.

Ctrl-C ends a command at any moment with exit status 130, one message and nothing partial.
Python raises KeyboardInterrupt wherever the main thread is when SIGINT's handler runs, and some
places turn that into something else: raised in a callback Python calls for itself (JAX's
garbage-collector callback, a finalizer) it is printed and dropped, and the command trains on;
raised while an extension module initializes it becomes an ImportError, or a crash. The handler of
`handling()` raises only where the exception propagates: during an import, an `uncut()` block or
this module's own code it waits until that is over, and a dropped one (`sys.unraisablehook` sees
it) is raised again. For both, a thread signals the main thread again once it need not wait, and
code that checks (`check()`, at each chunk of a sweep) raises at once. Once raised, further
Ctrl-Cs are absorbed, so the cleanup that removes what a command had begun is never cut short.
`python -m stabench` calls `exit_at_once()` before anything else loads: while the CLI loads and
after the command has returned, nothing is being written, and Ctrl-C ends the process there.

A sweep worker ends within moments of its parent, however that died (`die_with_parent`), from
its first instructions on: this module imports nothing heavy.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

MESSAGE = "interrupted; nothing partial was written"
RETRY_S = 0.02  # how often a deferred Ctrl-C is tried again


class _State:
    active = False  # the handler of `handling()` is installed and may raise
    depth = 0  # nested `handling()` blocks
    uncut = 0  # nested `uncut()` blocks
    arrived = False  # a Ctrl-C came...
    raised = False  # ...and its KeyboardInterrupt was raised where it propagates
    acted = False  # a Ctrl-C was acted on in this process (read by `exit_at_once`)
    handled = 0  # calls of the handler
    wake = -1  # write end of the pipe that asks the retrying thread to try


_state = _State()


def _deferred(frame) -> bool:
    """Whether the main thread, running `frame`, is where a KeyboardInterrupt must wait: an
    import, an `uncut()` block, or this module's code (the hook that reports a dropped one, a
    block's setup and removal)."""
    if _state.uncut:
        return True
    while frame is not None:
        name = frame.f_code.co_filename
        if name == _HERE or name.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _ask_retry() -> None:
    with contextlib.suppress(OSError):  # the pipe is full: the thread is already trying
        os.write(_state.wake, b"r")  # async-signal-safe, unlike a lock or an Event


def _raise() -> None:
    _state.raised = _state.acted = True
    raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    _state.arrived = True
    _state.handled += 1
    if not _state.active or _state.raised:
        return  # being set up or removed (the block raises it) or already stopping
    if _deferred(frame):
        _ask_retry()
        return
    _raise()


def _on_unraisable(unraisable) -> None:
    if _state.active and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _state.arrived, _state.raised = True, False  # Python dropped it: raise it once more
        _ask_retry()
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook
_HERE = _deferred.__code__.co_filename


def _retry(read_fd: int) -> None:
    """Until a `b"q"`: on each request, signal the main thread once it need not wait, until the
    KeyboardInterrupt is raised there; one signal at a time, each after the last was handled."""
    main = threading.main_thread().ident
    while os.read(read_fd, 1) == b"r":
        while _state.active and _state.arrived and not _state.raised:
            if _deferred(sys._current_frames().get(main)):
                time.sleep(RETRY_S)
                continue
            handled = _state.handled
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(main, signal.SIGINT)  # a real one ends a sleep or a wait
            else:
                _thread.interrupt_main()
            while _state.handled == handled and _state.active:
                time.sleep(RETRY_S)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this block, once, where it propagates (see above).
    Nested blocks share the outermost one's handler; the end of any block raises a Ctrl-C still
    waiting. A process started with SIGINT ignored (a background job of a shell without job
    control) keeps ignoring it, and outside the main thread this block does nothing."""
    global _previous_hook
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return
    if not _state.depth:
        read_fd, _state.wake = os.pipe()
        os.set_blocking(_state.wake, False)
        thread = threading.Thread(target=_retry, args=(read_fd,), name="stabench-ctrl-c",
                                  daemon=True)
        thread.start()
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _on_unraisable
        previous = signal.signal(signal.SIGINT, _on_sigint)
    _state.depth += 1
    try:
        _state.active = True
        check()  # a Ctrl-C that came while the block was set up
        yield
    finally:
        _state.depth -= 1
        if not _state.depth:
            _state.active = False  # from here the handler only notes a Ctrl-C
            os.write(_state.wake, b"q")
            thread.join()
            os.close(read_fd)
            os.close(_state.wake)
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = _previous_hook
        pending = _state.arrived and not _state.raised
        _state.raised |= pending  # an outer block's end does not raise it again
        if not _state.depth:
            _state.arrived = _state.raised = False
        if pending:
            _state.acted = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def uncut() -> Iterator[None]:
    """A block a Ctrl-C does not interrupt: it is raised at the block's end instead."""
    if not _state.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.uncut += 1
    try:
        yield
    finally:
        _state.uncut -= 1
    check()


def check() -> None:
    """Raise the KeyboardInterrupt of a Ctrl-C that came and was not raised yet (one dropped,
    or deferred): a point where it is safe to stop, a finished chunk for example."""
    if (_state.active and _state.arrived and not _state.raised
            and threading.current_thread() is threading.main_thread()):
        _raise()


def exit_at_once() -> None:
    """For phases where nothing is being written: Ctrl-C prints the message and ends the process
    with status 130; one after a Ctrl-C that was acted on is absorbed (the command is ending with
    its message and status 130)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return

    def handler(signum, frame):
        if _state.acted:
            return  # the command is already ending with its message and status 130
        with contextlib.suppress(Exception):  # e.g. a reentrant call while stdout was written
            sys.stdout.flush()
        os.write(2, f"{MESSAGE}\n".encode())
        os._exit(130)

    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread: another thread takes one that comes (Python then handles
    it in the main thread as usual), and a process started meanwhile inherits the block."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def die_with_parent() -> None:
    """End this process within moments of its parent's death, kill -9 included: a sweep worker
    left alone would train, for nobody, a cell whose lock it holds.

    Linux: the kernel sends SIGKILL, which ends the worker in any phase (a handler of a gentler
    signal would wait for a compile to finish, for seconds or minutes). Nothing is left half done:
    records are written atomically (the next sweep removes a killed writer's temp file) and the
    kernel releases a dead holder's cell lock. The kernel sends it when the thread that started
    this process ends: for a worker, the one iterating `LocalExecutor.run`, alive as long as the
    sweep. Elsewhere a thread waits for the parent's end of the spawn pipe to close."""
    import multiprocessing as mp

    parent = mp.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if not parent.is_alive():  # it died before the request: no signal will come
            os._exit(1)
    else:
        from multiprocessing.connection import wait

        threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)),
                         daemon=True).start()


def sweep_worker(*args) -> None:
    """A sweep worker process's target: it dies with its parent from here on, then imports JAX
    (seconds) and runs `executor.train_cells(*args)`."""
    die_with_parent()
    from .executor import train_cells

    train_cells(*args)

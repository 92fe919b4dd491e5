"""What every process that trains does first: start JAX with one intra-op thread, and persist
compiled programs. A record names the thread count set here (`store.provenance`)."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from .registry import UserError

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stabench" / "jax"


@functools.cache
def start_backend() -> int | None:
    """Start JAX's backends with one intra-op thread; returns that count, or None where it is
    unknown (the backends had started before, or the OS cannot pin a thread).

    XLA:CPU sizes its intra-op thread pool from the cores the process may use when the backend
    starts, and splits some products over that pool: a pinned sweep worker and an unpinned `run`
    would round differently. Pinning this thread while the backend starts sizes the pool to one
    thread in every process; every thread then gets the process's cores back."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or not hasattr(os, "sched_setaffinity"):
        return None
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        jax.devices()
    finally:
        for thread in os.listdir("/proc/self/task"):  # the pool's threads were made pinned
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(thread), cores)
    return 1


def forced_run_group() -> int | None:
    """STABENCH_RUN_GROUP: runs vmapped together on every device, instead of the cell's own
    choice; a check that results hold whatever the grouping (records store the group used)."""
    text = os.environ.get("STABENCH_RUN_GROUP", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"STABENCH_RUN_GROUP must be a positive whole number, got {text!r}")
    return int(text)


def intra_op_threads() -> int | None:
    """The intra-op thread count this process's JAX runs with, as far as it is known."""
    return start_backend() if start_backend.cache_info().currsize else None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Persist compiled programs so a re-run recompiles nothing (STABENCH_CACHE_DIR overrides)."""
    import jax

    directory = str(directory or os.environ.get("STABENCH_CACHE_DIR") or DEFAULT_CACHE)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def prepare(cache_dir: str | os.PathLike | None = None) -> None:
    """Set up this process to train: one intra-op thread, the persistent compilation cache, and
    the plugins (after the backend: a plugin may use JAX as it loads)."""
    from .plugins import load_plugins

    start_backend()
    enable_compilation_cache(cache_dir)
    load_plugins()

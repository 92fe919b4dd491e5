"""Facts about the host's CPU and the code it runs: what sizing decisions need and what records
name; no JAX here, so the executor can ask them before a worker starts JAX."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@functools.cache
def l2_cache_bytes() -> int:
    """The L2 cache of one core (Linux sysfs, read once per process); 1 MiB where the system does
    not say."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(caches.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            break
    return 1 << 20


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(directory: Path = Path(__file__).parent) -> tuple[str | None, bool | None]:
    """The commit checked out at `directory` and whether the files below it differ from it (changed
    or new files that git does not ignore; by default the package's own code, so results written
    into a checkout do not count); (None, None) outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True,
                              timeout=5)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return None, None
        status = git("status", "--porcelain", "--", ".")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


@functools.cache
def code_state() -> tuple[str | None, bool | None]:
    """`git_state` of the package as this process first asked, which it does at start: the code it
    runs was loaded then, so a checkout that changes during a sweep does not relabel its records."""
    return git_state()

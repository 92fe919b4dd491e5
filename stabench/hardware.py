"""Facts about the host's CPU: what sizing decisions need and what records name; no JAX here, so
the executor can ask them before a worker starts JAX."""

from __future__ import annotations

import functools
import os
import platform
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

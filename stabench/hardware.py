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
def cache_sizes() -> dict[str, int]:
    """Bytes of each cache level one core sees (Linux sysfs, read once per process): "L1d", "L2",
    "L3"; empty where the system does not say. Matrix-product kernels size their blocks from
    these, so they decide part of a program's rounding."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = (index / "level").read_text().strip()
            size = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return sizes


# the vector extensions whose presence changes which kernels XLA:CPU runs
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")


@functools.cache
def cpu_isa() -> list[str]:
    """The CPU's vector extensions among ISA_FLAGS (Linux /proc/cpuinfo); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.partition(":")[2].split())
                return [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


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

"""Results store: one JSON record per cell plus a compressed telemetry file beside it.

Writes are atomic (temp file, fsync, rename), telemetry first, so a record that exists is complete.
A record that does not parse, or whose spec hash or telemetry checksum does not match, is reported
by name and never used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, RunSpec
from .registry import UserError


class BadRecord(Exception):
    """A stored record that cannot be trusted; the message names the file and why."""


@dataclass(frozen=True)
class Record:
    path: Path
    data: dict

    @property
    def spec(self) -> RunSpec:
        return RunSpec.from_dict(self.data["spec"])

    @property
    def runs(self) -> list[dict]:
        return self.data["runs"]

    def telemetry(self) -> dict[str, np.ndarray]:
        tel_path = self.path.with_suffix(".npz")
        with np.load(tel_path) as z:
            return {k: z[k] for k in z.files}


def atomic_write(path: Path, payload: bytes) -> None:
    # host and pid: writers on several hosts may share the directory (a cluster's file system)
    tmp = path.with_name(f".{path.name}.{platform.node()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def read_record(path: Path) -> Record:
    """Parse and verify one record; raises BadRecord naming the file and the problem."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadRecord(f"{path}: unreadable record ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise BadRecord(f"{path}: format version {data.get('format_version') if isinstance(data, dict) else '?'}"
                        f" is not {FORMAT_VERSION}")
    try:
        spec = RunSpec.from_dict(data["spec"])
        ok = spec.hash == data["spec_hash"]
    except (KeyError, TypeError):
        raise BadRecord(f"{path}: record lacks a valid spec") from None
    if not ok:
        raise BadRecord(f"{path}: spec hash does not match its spec")
    tel = path.with_suffix(".npz")
    try:
        digest = sha256(tel.read_bytes())
    except OSError:
        raise BadRecord(f"{path}: telemetry file {tel.name} is missing") from None
    if digest != data.get("telemetry_sha256"):
        raise BadRecord(f"{path}: telemetry file {tel.name} does not match its checksum")
    return Record(path, data)


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, spec: RunSpec) -> Path:
        return self.root / spec.task / f"{spec.hash[:16]}.json"

    def load(self, spec: RunSpec) -> Record | None:
        """The finished record of this spec, or None (absent or untrustworthy: redo it)."""
        path = self.path_for(spec)
        if not path.exists():
            return None
        try:
            return read_record(path)
        except BadRecord:
            return None

    def check_writable(self, spec: RunSpec) -> None:
        """Fail before any training if the record could not be written."""
        directory = self.path_for(spec).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".write-test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write results to {directory}: {err.strerror}") from None

    def save(self, spec: RunSpec, body: dict, arrays: dict[str, np.ndarray]) -> Record:
        path = self.path_for(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tel = buf.getvalue()
        atomic_write(path.with_suffix(".npz"), tel)
        record = {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "spec_hash": spec.hash,
                  **body, "telemetry_sha256": sha256(tel)}
        atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode())
        return Record(path, record)

    def records(self) -> tuple[list[Record], list[str]]:
        """Every trustworthy record under the root, and one message per bad one."""
        good, bad = [], []
        for path in sorted(self.root.rglob("*.json")):
            try:
                good.append(read_record(path))
            except BadRecord as err:
                bad.append(str(err))
        return good, bad


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    import importlib.metadata as md

    import jax

    versions = {}
    for pkg in ("stabench", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def merge(dest: str | os.PathLike, sources: list[str | os.PathLike]) -> tuple[int, int, list[str]]:
    """Copy every trustworthy record (and its telemetry) of the source directories into dest,
    atomically; a cell dest already holds is kept. Returns (copied, already present, problems)."""
    target = Store(dest)
    copied, present, problems = 0, 0, []
    for source in sources:
        if not Path(source).is_dir():
            raise UserError(f"merge: no results directory {source}")
        good, bad = Store(source).records()
        problems += bad
        for record in good:
            if target.load(record.spec) is not None:
                present += 1
                continue
            path = target.path_for(record.spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path.with_suffix(".npz"), record.path.with_suffix(".npz").read_bytes())
            atomic_write(path, record.path.read_bytes())
            copied += 1
    return copied, present, problems

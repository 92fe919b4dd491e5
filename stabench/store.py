"""Results store: one JSON record per cell plus a compressed telemetry file beside it.

Writes are atomic (temp file, fsync, rename), telemetry first, so a record that exists is complete.
A record that does not parse, or whose spec hash, content checksum or telemetry checksum does not
match (a torn file, or one edited after it was written), is reported by name and never used.

Processes writing into one directory at once (two sweeps, a sweep and a run) take a per-cell lock
(`Store.claim`, an flock the kernel releases when its holder dies), so no cell is trained or
written twice. A temporary file left by a killed writer names its host and process; the next sweep
on that host removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import platform
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import FORMAT_VERSION, RunSpec
from .hardware import cache_sizes, code_state, cpu_isa, cpu_model
from .plugins import loaded as loaded_plugins
from .process import intra_op_threads
from .registry import UserError
from .tasks import validate


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


TMP_SUFFIX = ".tmp"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}{TMP_SUFFIX}")


def atomic_write(path: Path, payload: bytes) -> None:
    """Write whole or not at all: a temp file, fsynced, renamed over `path`; the temp file is
    removed if anything fails (disk full, an interrupt)."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            # a failed write, flush or rename names no file: name the one being written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def content_sha256(record: dict) -> str:
    """The checksum of a record's content: every field but this checksum, as canonical JSON."""
    content = {k: v for k, v in record.items() if k != "record_sha256"}
    return sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


@contextlib.contextmanager
def tidy_dirs(directory: str | os.PathLike) -> Iterator[None]:
    """The directories up to `directory` that do not exist yet and are empty when the block ends
    are removed then: a command that fails or is interrupted before writing leaves nothing."""
    directory = Path(directory).absolute()
    new = [d for d in (directory, *directory.parents) if not d.exists()]  # deepest first
    try:
        yield
    finally:
        for d in new:
            with contextlib.suppress(OSError):  # not empty, or gone
                d.rmdir()


def check_writable(directory: str | os.PathLike) -> None:
    """Fail with one line, before any work, if files cannot be created in `directory`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write results to {directory}: {err.strerror or err}") from None


# The fields that readers of a record use, and their types ([t]: a list of t): a record whose
# fields do not fit is named and skipped like a torn one, not an error in the command reading it.
RECORD_FIELDS = {"spec": dict, "spec_hash": str, "runs": [dict], "timing": dict,
                 "provenance": dict, "layer_names": [str]}
SPEC_FIELDS = {"task": str, "task_config": dict, "method": str, "init": str, "optimizer": str,
               "seeds": [int], "lrs": [(int, float)], "fake_data": bool}


def _fits(value, kind) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_fits(x, kind[0]) for x in value)
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def _malformed(data: dict) -> str | None:
    """The first field of a record that does not fit RECORD_FIELDS and SPEC_FIELDS, e.g.
    'spec.seeds', or the task_config's problem; None when every field fits."""
    fields = [(key, data.get(key), kind) for key, kind in RECORD_FIELDS.items()]
    spec = data.get("spec")
    if isinstance(spec, dict):
        fields += [(f"spec.{key}", spec.get(key), kind) for key, kind in SPEC_FIELDS.items()]
    for name, value, kind in fields:
        if not _fits(value, kind):
            return name
    try:
        validate(spec["task_config"], "spec.task_config")
    except UserError as err:
        return str(err)
    return None


def read_record(path: Path) -> Record:
    """Parse and verify one record; raises BadRecord naming the file and the problem."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise BadRecord(f"{path}: unreadable record ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else "?"
        raise BadRecord(f"{path}: format version {version} is not {FORMAT_VERSION}")
    if problem := _malformed(data):
        raise BadRecord(f"{path}: record lacks a valid {problem}")
    try:
        spec = RunSpec.from_dict(data["spec"])
    except TypeError:  # a field RunSpec does not have
        raise BadRecord(f"{path}: record lacks a valid spec") from None
    if spec.hash != data["spec_hash"]:
        raise BadRecord(f"{path}: spec hash does not match its spec")
    if path.stem != spec.hash[:16]:
        raise BadRecord(f"{path}: file name does not match its spec hash {spec.hash[:16]} "
                        f"(a copy under another name would count the cell twice)")
    if [(r.get("seed"), r.get("lr")) for r in data["runs"]] != spec.runs:
        raise BadRecord(f"{path}: its runs do not match the seeds and learning rates of its spec")
    tel = path.with_suffix(".npz")
    try:
        digest = sha256(tel.read_bytes())
    except OSError:
        raise BadRecord(f"{path}: telemetry file {tel.name} is missing") from None
    if digest != data.get("telemetry_sha256"):
        raise BadRecord(f"{path}: telemetry file {tel.name} does not match its checksum")
    if data.get("record_sha256") != content_sha256(data):
        raise BadRecord(f"{path}: its content does not match its checksum (edited after it was "
                        "written)")
    return Record(path, data)


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, spec: RunSpec) -> Path:
        return self.root / spec.task / f"{spec.hash[:16]}.json"

    def lookup(self, spec: RunSpec) -> tuple[Record | None, str | None]:
        """The finished record of this spec, or None and why a stored one cannot be used (None
        when there is none)."""
        path = self.path_for(spec)
        if not path.exists():
            return None, None
        try:
            return read_record(path), None
        except BadRecord as err:
            return None, str(err)

    def load(self, spec: RunSpec) -> Record | None:
        """The finished record of this spec, or None (absent or untrustworthy: redo it)."""
        return self.lookup(spec)[0]

    def check_writable(self, spec: RunSpec) -> None:
        """Fail before any training if the record could not be written."""
        check_writable(self.path_for(spec).parent)

    @contextlib.contextmanager
    def claim(self, spec: RunSpec, wait: bool = False) -> Iterator[bool]:
        """Hold the cell's lock while training and saving it. Yields False when another process
        holds it (or, with `wait`, blocks until it is free). The kernel releases the lock of a
        process that dies, so a killed claimant never blocks a cell."""
        path = self.path_for(spec).with_suffix(".lock")
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a failed claimant removed the directory it had made
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            # The previous holder unlinks the file on release; if it did so after we opened it,
            # our lock is on a file nobody else will open: lock the current one instead.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        try:
            yield True
        finally:
            # Before releasing, so a waiter re-checks (see above). In a directory that turned
            # read-only the file stays (closing still frees the lock) and the cell's own error,
            # if any, is what propagates.
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            os.close(fd)

    def is_claimed(self, spec: RunSpec) -> bool:
        """Whether another process holds the cell's lock now."""
        with self.claim(spec) as mine:
            return not mine

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files whose writer, a process on this host, is gone (killed mid-write);
        returns them. Files of live processes and of other hosts are left alone."""
        removed = []
        host = socket.gethostname()
        for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
            writer, _, where = tmp.name[:-len(TMP_SUFFIX)].rpartition("@")
            pid = writer.rpartition(".")[2]
            if where != host or not pid.isdigit() or _alive(int(pid)):
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed

    def save(self, spec: RunSpec, body: dict, arrays: dict[str, np.ndarray]) -> Record:
        path = self.path_for(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tel = buf.getvalue()
        record = {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "spec_hash": spec.hash,
                  **body, "telemetry_sha256": sha256(tel)}
        record["record_sha256"] = content_sha256(record)
        payload = json.dumps(record, indent=1, sort_keys=True).encode()
        try:
            atomic_write(path.with_suffix(".npz"), tel)
            atomic_write(path, payload)
        except BaseException:
            path.with_suffix(".npz").unlink(missing_ok=True)  # telemetry without its record
            raise
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


def load_records(directory: str | os.PathLike,
                 warn: Callable[[str], None]) -> tuple[list[Record], list[str]]:
    """Every trustworthy record under an existing results `directory`, and one message per record
    that is not (torn, malformed, from another format), each also named through `warn`."""
    if not Path(directory).is_dir():
        raise UserError(f"no results directory {directory}")
    records, bad = Store(directory).records()
    for message in bad:
        warn(f"skipped {message}")
    return records, bad


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def commit_label(commit, dirty) -> str:
    """A short commit, marked when the code that ran had changes not in it."""
    label = str(commit)[:10]
    return f"{label} with uncommitted changes" if dirty is True or dirty is np.True_ else label


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
    commit, dirty = code_state()
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "numerics": {  # with the cell's run_group and devices: what decides the rounding
            "cpu_model": cpu_model(), "cpu_isa": cpu_isa(), "caches": cache_sizes(),
            "intra_op_threads": intra_op_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": versions["jax"], "jaxlib": versions["jaxlib"], "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind,
        },
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "plugins": loaded_plugins(),  # module, version, source sha256 of each
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def merge(dest: str | os.PathLike, sources: list[str | os.PathLike]) -> tuple[int, int, list[str]]:
    """Copy every trustworthy record (and its telemetry) of the source directories into dest,
    atomically; a cell dest already holds is kept. Returns (copied, already present, problems)."""
    target = Store(dest)
    for source in sources:
        if not Path(source).is_dir():
            raise UserError(f"merge: no results directory {source}")
    check_writable(dest)
    copied, present, problems = 0, 0, []
    for source in sources:
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

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Compiled programs are cached per test session, not in the user's cache; the process that made
# the directory removes it (test workers and the CLI processes they start inherit it).
if "STABENCH_CACHE_DIR" not in os.environ:
    os.environ["STABENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="stabench-test-cache-")
    atexit.register(shutil.rmtree, os.environ["STABENCH_CACHE_DIR"], ignore_errors=True)
# Tests compile many tiny programs and run them a few steps: XLA's backend optimizations cost more
# than they save (a digits cell compiled in 2.5 s instead of 6 s on a 2-core CPU).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# One intra-op thread, as every stabench process that trains has (stabench.process), so records
# trained in a test process equal those of the CLI processes it starts.
from stabench.process import start_backend  # noqa: E402

start_backend()
# Definition tests mark the registry entries they check with `covers`; the catalog's conformance
# checks (stabench.testing, which a plugin's tests use too) fail for an entry without one.
from stabench.testing import (RESIDUAL, catalog_spec, covers, digits,  # noqa: E402,F401
                              engine_for)
# Tests send SIGINT to the processes they start, as Ctrl-C in a terminal would. A test runner
# started as a background job of a shell without job control inherits SIGINT ignored, and so would
# every process it starts; Ctrl-C semantics are those of a foreground session.
signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python -m stabench ARGS` in a subprocess (in `env`, default this process's
    environment); returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "stabench", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def digits_data():
    return digits()


def tiny_spec(method="none", steps=40, seeds=2, lrs=(0.05, 0.2), **kw):
    from stabench.config import make_spec

    overrides = {"train.steps": steps, "train.eval_every": 20, **kw.pop("overrides", {})}
    return make_spec("digits", method, seeds=seeds, lrs=lrs, overrides=overrides, **kw)


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """The smoke suite (tasks/suites/smoke.toml: four tiny digits cells) and its records from an
    uninterrupted local sweep (two workers)."""
    suite, whole = "smoke", tmp_path_factory.mktemp("tiny-suite") / "whole"
    proc = run_cli("sweep", "--suite", suite, "--workers", "2", "--out", whole)
    assert proc.returncode == 0, proc.stderr
    assert "4 cells: 4 trained, 0 skipped" in proc.stdout
    return suite, whole


def report_tables(directory, out):
    """The leaderboards of a results directory (Markdown above the provenance, both CSVs)."""
    from stabench.reports import write_report

    markdown = write_report(directory, out, plots=False, warn=pytest.fail)
    return (markdown.split("## Provenance")[0], (Path(out) / "leaderboard.csv").read_text(),
            (Path(out) / "overall.csv").read_text())


@pytest.fixture(scope="session")
def tiny_sweep(tiny_suite, tmp_path_factory):
    """The tiny suite swept without interruption, with its report tables: the reference for every
    interrupted or damaged sweep."""
    suite, whole = tiny_suite
    report = report_tables(whole, tmp_path_factory.mktemp("tiny-report"))
    return SimpleNamespace(suite=suite, whole=whole, report=report)


def assert_same_records(directory, reference):
    """Every record of `directory` is bit for bit the one `reference` holds for its cell: the same
    metrics and the same telemetry bytes (timing and provenance aside)."""
    import json

    import numpy as np

    paths = sorted(Path(directory).rglob("*.json"))
    assert paths, f"no records in {directory}"
    for path in paths:
        twin = Path(reference) / path.relative_to(directory)
        assert twin.exists(), f"{reference} has no record for {path.name}"
        runs = [json.dumps(json.loads(p.read_text())["runs"]) for p in (path, twin)]
        assert runs[0] == runs[1], f"{path.name}: metrics differ"
        with np.load(path.with_suffix(".npz")) as ours, np.load(twin.with_suffix(".npz")) as theirs:
            assert sorted(ours.files) == sorted(theirs.files)
            for name in ours.files:
                assert ours[name].tobytes() == theirs[name].tobytes(), f"{path.name}: {name}"

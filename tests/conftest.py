import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Compiled programs are cached per test session, not in the user's cache.
os.environ.setdefault("STABENCH_CACHE_DIR", tempfile.mkdtemp(prefix="stabench-test-cache-"))


def run_cli(*args, cwd=None, timeout=600):
    """Run `python -m stabench ARGS` in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "stabench", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def digits_data():
    from stabench.data import DATASETS

    return DATASETS.get("digits").load(None)


def tiny_spec(method="none", steps=40, seeds=2, lrs=(0.05, 0.2), **kw):
    from stabench.config import make_spec

    overrides = {"train.steps": steps, "train.eval_every": 20, **kw.pop("overrides", {})}
    return make_spec("digits", method, seeds=seeds, lrs=lrs, overrides=overrides, **kw)

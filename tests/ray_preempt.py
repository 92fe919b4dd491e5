"""A Ray worker setup hook for tests: the first attempt of every cell kills its worker process
mid-cell, as a preempted node would; later attempts train normally."""

import os
from pathlib import Path


def install() -> None:
    from stabench import runner

    real = runner.train_spec

    def train_spec(spec, *args, **kwargs):
        marker = Path(os.environ["STABENCH_TEST_PREEMPT_DIR"]) / spec.hash
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return real(spec, *args, **kwargs)

    runner.train_spec = train_spec

"""A Ray worker setup hook for tests: the first attempt of every cell kills its worker process
mid-cell, as a preempted node would; later attempts train normally."""

import os
from pathlib import Path


def install() -> None:
    from stabench import runner

    real = runner.run_cell

    def run_cell(spec, store, *args, **kwargs):
        marker = Path(os.environ["STABENCH_TEST_PREEMPT_DIR"]) / spec.hash
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return real(spec, store, *args, **kwargs)

    runner.run_cell = run_cell

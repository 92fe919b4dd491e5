"""The runs axis sharded over several devices gives the single-device results (fake CPU devices)."""

import subprocess
import sys
import textwrap

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    from conftest import tiny_spec
    from stabench.config import build_cell, data_source, task_of
    from stabench.runner import load_data
    from stabench.train import Engine

    assert len(jax.devices()) == 4
    spec = tiny_spec("clip_norm", steps=40, seeds=3, lrs=(0.01, 0.05))  # 6 runs: padded to 8
    data = load_data(spec)
    cell = build_cell(spec, data_source(task_of(spec)))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    sharded = Engine(cell, data).run(seeds, lrs)
    single = Engine(cell, data, devices=jax.devices()[:1]).run(seeds, lrs)
    assert sharded.telemetry["loss"].shape == (6, 40), sharded.telemetry["loss"].shape
    assert sharded.diverged_at.shape == (6,)
    assert sharded.timing["run_group"] == 8  # over several devices: every run in one batch
    for name in ("loss", "grad_norm", "layer_grad_norm"):
        np.testing.assert_allclose(sharded.telemetry[name], single.telemetry[name], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(sharded.evals["test_accuracy"], single.evals["test_accuracy"],
                               atol=1e-6)
    print("devices", len(Engine(cell, data).devices))
""")


def test_sharded_runs_equal_single_device_runs():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT / "tests", capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices 4" in proc.stdout

"""The runs axis sharded over several devices: every device trains its share in the cell's groups,
so the device count changes a run's numbers only by float32 rounding (fake CPU devices)."""

import os
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
    from stabench.reproduce import FIRST_STEP_RTOL
    from stabench.runner import load_data
    from stabench.train import Engine

    assert len(jax.devices()) == 4
    steps = 40
    spec = tiny_spec("clip_norm", steps=steps, seeds=3, lrs=(0.01, 0.05))  # 6 runs: padded
    data = load_data(spec)
    cell = build_cell(spec, data_source(task_of(spec)))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    sharded = Engine(cell, data).run(seeds, lrs)
    three = Engine(cell, data, devices=jax.devices()[:3]).run(seeds, lrs)
    single = Engine(cell, data, devices=jax.devices()[:1]).run(seeds, lrs)
    assert sharded.telemetry["loss"].shape == (6, steps), sharded.telemetry["loss"].shape
    assert sharded.diverged_at.shape == (6,)
    # every device trains in the groups one device would: the cell's, whatever the device count
    assert sharded.timing["run_group"] == three.timing["run_group"] == single.timing["run_group"]
    assert (sharded.timing["devices"], three.timing["devices"]) == (4, 3)
    for name, values in sharded.telemetry.items():
        # several devices run one partitioned program, whatever their number: the same bits
        np.testing.assert_array_equal(three.telemetry[name], values, err_msg=name)
        if name in ("nonfinite", "changed"):
            np.testing.assert_array_equal(single.telemetry[name], values, err_msg=name)
            continue
        # one device runs an unpartitioned program, which rounds differently: within the
        # rounding of one step at step 0, of the steps so far after it (moderate rates)
        np.testing.assert_allclose(values[:, 0], single.telemetry[name][:, 0],
                                   rtol=FIRST_STEP_RTOL, err_msg=name)
        np.testing.assert_allclose(values, single.telemetry[name], rtol=FIRST_STEP_RTOL * steps,
                                   err_msg=name)
    np.testing.assert_array_equal(sharded.evals["test_accuracy"], three.evals["test_accuracy"])
    np.testing.assert_allclose(sharded.evals["test_accuracy"], single.evals["test_accuracy"],
                               atol=2 / len(data.x_test))  # a prediction or two may flip
    np.testing.assert_array_equal(sharded.diverged_at, single.diverged_at)
    print("devices", len(Engine(cell, data).devices))
""")


def test_sharded_runs_equal_single_device_runs_within_rounding():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT / "tests", capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "devices 4" in proc.stdout

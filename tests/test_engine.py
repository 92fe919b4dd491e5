"""The compiled engine: vmapped = one at a time, lane isolation, one compile, clipping bounds."""

import numpy as np
import pytest

from stabench.train import compiled_names

from conftest import engine_for, tiny_spec


def test_vmapped_runs_equal_runs_trained_one_at_a_time(digits_data):
    spec = tiny_spec("clip_norm(max_norm=1.0)", steps=40, seeds=2, lrs=(0.01, 0.05))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    together = engine_for(spec, digits_data).run(seeds, lrs).telemetry["loss"][:, -1]
    alone = [engine_for(spec, digits_data).run(seeds[i:i + 1], lrs[i:i + 1]).telemetry["loss"][0, -1]
             for i in range(len(seeds))]
    assert np.isfinite(together).all()
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_divergent_lane_leaves_other_lanes_bit_identical(digits_data):
    spec = tiny_spec("none", steps=40)
    engine = engine_for(spec, digits_data)
    seeds = np.array([0, 1, 0])
    calm = engine.run(seeds, np.array([0.05, 0.1, 0.05]))
    wild = engine.run(seeds, np.array([0.05, 0.1, 1e5]))
    for name, values in wild.telemetry.items():
        np.testing.assert_array_equal(values[:2], calm.telemetry[name][:2], err_msg=name)
    for name, values in wild.evals.items():
        np.testing.assert_array_equal(values[:2], calm.evals[name][:2], err_msg=name)
    assert list(calm.diverged_at) == [-1, -1, -1]
    d = wild.diverged_at[2]
    assert list(wild.diverged_at[:2]) == [-1, -1] and 0 <= d < 40
    loss = wild.telemetry["loss"][2]
    # Recorded up to and including the step that broke it, nothing after: the run is frozen there.
    assert np.isfinite(loss[:d]).all() and np.isnan(loss[d + 1:]).all()
    # The same lane trained for exactly d steps stays finite; one step more breaks it at step d.
    short = engine_for(tiny_spec("none", steps=int(d), overrides={"train.eval_every": 40}),
                       digits_data).run(seeds, np.array([0.05, 0.1, 1e5])) if d > 0 else None
    if short is not None:
        assert short.diverged_at[2] == -1


def test_cell_compiles_once_whatever_the_number_of_runs(digits_data):
    spec = tiny_spec("clip_norm", steps=60)  # 3 chunks of 20 steps
    engine_for(spec, digits_data).run(np.arange(2), np.full(2, 0.1))  # process-wide warm-up
    for n in (1, 6):
        before = compiled_names()
        result = engine_for(spec, digits_data).run(np.arange(n) % 3, np.full(n, 0.1))
        # one init program and one chunk program, whatever the number of runs and chunks
        assert compiled_names()[len(before):] == ["jit(_init_run)", "jit(_chunk_run)"]
        assert result.timing["steady_compiles"] == 0


@pytest.mark.parametrize("max_norm, clipped", [(0.01, True), (1e6, False)])
def test_clip_norm_bounds_post_transform_norm(digits_data, max_norm, clipped):
    spec = tiny_spec(f"clip_norm(max_norm={max_norm})", steps=40, lrs=(0.1, 0.5))
    result = engine_for(spec, digits_data).run(np.array([0, 0]), np.array([0.1, 0.5]))
    post, pre = result.telemetry["grad_norm_post"], result.telemetry["grad_norm"]
    assert np.isfinite(post).all()
    assert (post <= max_norm * (1 + 1e-6)).all()
    share = np.mean(result.telemetry["changed"])
    if clipped:
        assert share > 0.9 and np.all(post[pre > max_norm] > max_norm * 0.999)
    else:
        assert share == 0.0  # exact: no element changed
        np.testing.assert_allclose(post, pre, rtol=1e-6)  # two separately fused reductions


def test_per_layer_grad_norms_add_up_to_global_norm(digits_data):
    spec = tiny_spec("none", steps=20)
    result = engine_for(spec, digits_data).run(np.array([0]), np.array([0.1]))
    layers = result.telemetry["layer_grad_norm"][0]
    assert result.layer_names == ["input", "blocks[0]", "head"]
    np.testing.assert_allclose(np.sqrt((layers ** 2).sum(-1)), result.telemetry["grad_norm"][0],
                               rtol=1e-5)


def test_same_seed_same_data_order_across_learning_rates(digits_data):
    engine = engine_for(tiny_spec(), digits_data)
    idx = engine.batch_indices(np.array([3, 3, 4]), 0)
    assert np.array_equal(idx[0], idx[1]) and not np.array_equal(idx[0], idx[2])
    # each epoch visits every example at most once
    per_epoch = len(digits_data.x_train) // engine.cell.batch_size
    first_epoch = idx[0][:per_epoch].ravel()
    assert len(np.unique(first_epoch)) == first_epoch.size

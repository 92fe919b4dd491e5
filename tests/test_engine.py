"""The compiled engine: vmapped = one at a time = in cache-sized groups, lane isolation, one
compile, clipping bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabench import hardware
from stabench.config import build_cell, data_source, task_of
from stabench.reproduce import FIRST_STEP_RTOL
from stabench.grouping import GROUP_CACHE_BYTES, cpu_group
from stabench.program import RUNS, new_state_finite
from stabench.train import Engine, compiled_names

from conftest import engine_for, tiny_spec


def test_vmapped_runs_equal_runs_trained_one_at_a_time(digits_data):
    spec = tiny_spec("clip_norm(max_norm=1.0)", steps=40, seeds=2, lrs=(0.01, 0.05))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    together = engine_for(spec, digits_data).run(seeds, lrs).telemetry["loss"][:, -1]
    alone = [engine_for(spec, digits_data).run(seeds[i:i + 1], lrs[i:i + 1])
             .telemetry["loss"][0, -1] for i in range(len(seeds))]
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


def test_finite_check_is_exact_when_a_sum_overflows_and_for_a_group_of_runs():
    """new_state_finite(params, updates, ...) says whether params + updates and the state are all
    finite, whichever of its cheap sums or its exact check decides."""
    big = np.float32(3e38)  # finite, but two of them sum to inf
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    cases = {  # old params, updates, state; whether the new params and state are finite
        "small": ([1, -2], [0.5, 0.1], [1, 1], True),
        "updates whose squares overflow": ([0, 0], [big, -big], [1, 1], True),
        "params + updates overflow": ([big, 0], [big, 0], [1, 1], False),
        "nan update": ([1, 1], [nan, 0], [1, 1], False),
        "inf update": ([1, 1], [0, -inf], [1, 1], False),
        "state whose sum overflows": ([1, 1], [0, 0], [big, big], True),
        "nan state": ([1, 1], [0, 0], [1, nan], False),
        "inf and -inf state": ([1, 1], [0, 0], [inf, -inf], False),
        "zeros": ([0, 0], [0, 0], [0, 0], True),
    }
    params, updates, state, expected = (np.array(x, np.float32) for x in zip(*cases.values()))
    expected = expected.astype(bool).tolist()
    state = {"m": state, "count": np.full(len(cases), 2**31 - 1, np.int32)}  # counters skipped

    def check(group, first=False):
        def one(p, u, s, k):
            return new_state_finite(p, u, jnp.sum(u * u), s, k, jnp.array(first), group)

        def batch(p, u, s, k=None):
            k = np.ones(len(p), bool) if k is None else k
            return jax.jit(jax.vmap(one, axis_name=RUNS))(p, u, s, k).tolist()
        return batch

    assert check(None)(params, updates, state) == expected
    # runs checked together, all at once and in pairs: in the first pair the cheap sums are all
    # finite and decide; in the others only the exact check tells an overflowing sum from a
    # non-finite element
    together = check(RUNS)
    assert together(params, updates, state) == expected
    for start in range(0, len(cases), 2):
        pair = jax.tree.map(lambda a: a[start:start + 2], (params, updates, state))
        assert together(*pair) == expected[start:start + 2], list(cases)[start:start + 2]
    # a run that is not kept (it ended) does not send its group down the exact path: here its
    # overflowing state sum answers for it (an answer the engine does not use), not the exact check
    ended = {"m": np.array([[1, 1], [big, big]], np.float32), "count": np.zeros(2, np.int32)}
    pair = (np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32), ended)
    assert together(*pair, np.array([True, False])) == [True, False]
    assert together(*pair, np.array([True, True])) == [True, True]
    # the init's parameters are checked, not assumed finite, on the first step
    inf_params = np.array([[1, 1], [inf, 1]], np.float32)
    first = check(RUNS, first=True)
    assert first(inf_params, np.zeros((2, 2), np.float32), {"m": np.ones((2, 2), np.float32)}) == [
        True, False]


def test_cell_compiles_once_whatever_the_number_of_runs(digits_data):
    spec = tiny_spec("clip_norm", steps=60)  # 3 chunks of 20 steps
    engine_for(spec, digits_data).run(np.arange(2), np.full(2, 0.1))  # process-wide warm-up
    for n in (1, 6):
        before = compiled_names()
        result = engine_for(spec, digits_data).run(np.arange(n) % 3, np.full(n, 0.1))
        # one init program and one chunk program, whatever the number of runs and chunks
        assert compiled_names()[len(before):] == ["jit(init_run)", "jit(_chunk_run)"]
        assert result.timing["steady_compiles"] == 0


def test_a_cell_evaluates_every_eval_every_steps_and_after_the_last_until_every_run_diverged(
        digits_data):
    spec = tiny_spec("none", steps=25, overrides={"train.eval_every": 10})
    engine = engine_for(spec, digits_data)
    assert engine.eval_steps == [10, 20, 25]
    result = engine.run(np.array([0]), np.array([0.1]))
    assert list(result.eval_steps) == [10, 20, 25] and result.evals["test_loss"].shape == (1, 3)
    assert result.timing["steps_done"] == 25 and np.isfinite(result.telemetry["loss"]).all()
    # the only run breaks at step 3: training stops after the first chunk, evaluated once
    broken = engine_for(tiny_spec("inject_spike(step=3, factor=1e38)", steps=25,
                                  overrides={"train.eval_every": 10}), digits_data)
    result = broken.run(np.array([0]), np.array([0.1]))
    assert list(result.diverged_at) == [3] and list(result.eval_steps) == [10]
    assert result.timing["steps_done"] == 10 and np.isnan(result.evals["test_loss"]).all()


def test_without_gradient_methods_the_optimizer_sees_the_raw_gradient(digits_data):
    """'none' (and a cell of only learning-rate methods) skips comparing the gradient with
    itself: nothing changed, and the norm the optimizer saw is the gradient's."""
    for method in ("none", "warmup(steps=5)"):
        spec = tiny_spec(method, steps=20, lrs=(0.1,))
        tel = engine_for(spec, digits_data).run(np.array([0]), np.array([0.1])).telemetry
        assert (tel["changed"] == 0).all()
        np.testing.assert_allclose(tel["grad_norm_post"], tel["grad_norm"], rtol=1e-6)


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


def rounding_bound(steps: int) -> float:
    """The relative difference float32 rounding alone explains after `steps` steps of a run that
    does not amplify differences (a moderate learning rate): each step's forward and backward pass
    rounds to within FIRST_STEP_RTOL, and such a run's differences add up at most linearly."""
    return FIRST_STEP_RTOL * steps


def test_runs_of_a_cell_train_to_the_same_bits_in_any_order_and_any_number_of_groups(digits_data):
    """A run's bits depend on its cell and group size only: not on which runs share its group,
    their order, or the copies that fill the last group."""
    spec = tiny_spec("clip_norm(max_norm=1.0)", steps=30, seeds=2, lrs=(0.01, 0.05, 0.2))
    cell = build_cell(spec, data_source(task_of(spec)))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    for group in (1, 2, 4):  # 4: six runs fill two groups, padded with copies
        engine = Engine(cell, digits_data, group=group)
        forward = engine.run(seeds, lrs)
        order = np.arange(len(lrs))[::-1]
        backward = engine.run(seeds[order], lrs[order])
        first = engine.run(seeds[:1], lrs[:1])
        assert forward.timing["run_group"] == group
        for name, values in forward.telemetry.items():
            np.testing.assert_array_equal(backward.telemetry[name][order], values,
                                          err_msg=f"{name}, group {group}")
            np.testing.assert_array_equal(first.telemetry[name][0], values[0], err_msg=name)
        for name, values in forward.evals.items():
            np.testing.assert_array_equal(backward.evals[name][order], values, err_msg=name)


def test_runs_trained_in_groups_of_other_sizes_agree_within_rounding(digits_data):
    # moderate rates: at chaotic ones the rounding differences of batched and single matmuls grow
    spec = tiny_spec("clip_norm(max_norm=1.0)", steps=30, seeds=2, lrs=(0.01, 0.05, 0.2))
    cell = build_cell(spec, data_source(task_of(spec)))
    seeds, lrs = (np.array(x) for x in zip(*spec.runs))
    together = Engine(cell, digits_data, group=6).run(seeds, lrs)
    assert together.timing["run_group"] == 6
    for group in (1, 2, 4):
        grouped = Engine(cell, digits_data, group=group).run(seeds, lrs)
        for name in ("loss", "grad_norm", "grad_norm_post", "update_norm", "layer_grad_norm"):
            np.testing.assert_allclose(grouped.telemetry[name][:, 0],
                                       together.telemetry[name][:, 0],
                                       rtol=FIRST_STEP_RTOL, err_msg=f"{name}, group {group}")
            np.testing.assert_allclose(grouped.telemetry[name], together.telemetry[name],
                                       rtol=rounding_bound(30), err_msg=f"{name}, group {group}")
        np.testing.assert_array_equal(grouped.telemetry["changed"], together.telemetry["changed"])
        np.testing.assert_array_equal(grouped.diverged_at, together.diverged_at)


def test_cpu_group_is_the_largest_divisor_of_the_runs_fitting_the_budget():
    per_run = 1000
    budget = 3 * per_run + 1  # 3 runs fit
    assert [cpu_group(per_run, r, budget) for r in (12, 10, 7, 2, 1)] == [3, 2, 1, 2, 1]
    budget = per_run + 1  # one fits: pairs
    assert [cpu_group(per_run, r, budget) for r in (12, 7, 1)] == [2, 1, 1]
    assert cpu_group(per_run, 12, per_run - 1) == 1  # none fits: one at a time


def test_a_cells_group_depends_on_the_cell_not_on_the_host(digits_data, monkeypatch):
    monkeypatch.delenv("STABENCH_RUN_GROUP", raising=False)
    engine = engine_for(tiny_spec(), digits_data)
    chosen = engine.run_group(12)
    assert chosen == cpu_group(engine.run_bytes, 12, GROUP_CACHE_BYTES)
    for sizes in ({"L2": 256 << 10}, {"L2": 4 << 20, "L3": 1 << 30}, {}):
        monkeypatch.setattr(hardware, "cache_sizes", lambda sizes=sizes: sizes)
        assert engine_for(tiny_spec(), digits_data).run_group(12) == chosen
    monkeypatch.setenv("STABENCH_RUN_GROUP", "3")  # forced, as CI does to check the tests
    assert engine_for(tiny_spec(), digits_data).run_group(12) == 3


def test_run_bytes_counts_parameters_state_and_activations_linear_in_the_batch(digits_data):
    def run_bytes(batch):
        return engine_for(tiny_spec(overrides={"train.batch_size": batch}), digits_data).run_bytes

    params = 4 * (64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10)  # digits MLP 64-128-128-10
    per_example = (run_bytes(64) - run_bytes(32)) / 32
    assert run_bytes(128) - run_bytes(64) == 64 * per_example  # activations: linear in the batch
    # at least the input and the three layers' outputs are kept per example
    assert per_example >= 4 * (64 + 128 + 128 + 10)
    # momentum SGD: the parameters four times over and one momentum buffer, plus the weights the
    # backward pass keeps (at most one more copy) and a few scalars
    fixed = run_bytes(32) - 32 * per_example
    assert 5 * params <= fixed <= 6 * params + 64

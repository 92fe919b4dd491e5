"""Each method against its definition, on a small parameter tree shaped like a model's (an input
layer, a stack of 3 blocks along a leading layer axis, a head), and in the engine where the
definition is about training (skipping, accumulating)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stabench import methods
from stabench.metrics import run_metrics
from stabench.methods import METHODS, Context
from stabench.optimizers import OPTIMIZERS

from conftest import catalog_spec, covers, engine_for

LAYERS = ("input", "blocks", "head")
STACKED = ("blocks",)
KEY = jax.random.key(0)


def make_tree(key, scale=1.0):
    shapes = {"input": {"kernel": (8, 16), "bias": (16,)},
              "blocks": {"linear": {"kernel": (3, 16, 16), "bias": (3, 16)}},
              "head": {"kernel": (16, 4), "bias": (4,)}}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef,
                              [scale * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


PARAMS = make_tree(jax.random.key(1))


def per_layer(tree):
    """(part, array) for each parameter of each layer: stacked leaves split along their first
    axis."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        part = path[0].key
        out += [(part, x) for x in leaf] if part in STACKED else [(part, leaf)]
    return out


def pre(spec, steps=100, key=KEY):
    made = METHODS.get(spec)
    return made(Context(steps, key, LAYERS, STACKED)) if callable(made) else made


def cell_transform(spec, optimizer="sgd", steps=100):
    return methods.transform(methods.resolve(spec), OPTIMIZERS.get(optimizer), steps, LAYERS,
                             STACKED)


def norm(tree):
    return float(optax.tree.norm(tree))


def assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_any_changed_is_true_iff_some_element_differs_nan_in_both_counting_as_equal():
    base = {"w": jnp.array([[1.0, jnp.nan], [jnp.inf, -2.0]]), "b": jnp.array([0.0, 3.0])}
    same = jax.tree.map(jnp.copy, base)
    assert not methods.any_changed(base, same)  # NaN in both places, inf equal to inf
    assert not methods.any_changed(base, {**same, "b": jnp.array([-0.0, 3.0])})  # -0 == 0
    one = {**same, "b": jnp.array([0.0, np.nextafter(np.float32(3.0), np.float32(4.0))])}
    assert methods.any_changed(base, one)  # a single element, by one ulp
    assert methods.any_changed(base, {**same, "w": same["w"].at[0, 1].set(5.0)})  # NaN -> number
    # number -> NaN
    assert methods.any_changed(base, {**same, "w": same["w"].at[0, 0].set(jnp.nan)})
    assert methods.any_changed(base, {**same, "w": same["w"].at[1, 0].set(-jnp.inf)})


@pytest.mark.parametrize("spec", ["clip_norm(max_norm=2.0)", "zclip(z=1.0, alpha=0.5, warmup=2)"])
def test_global_norm_clippers_report_a_change_iff_an_element_changed(spec):
    tx = pre(spec)
    unit = jax.tree.map(lambda x: x / norm(PARAMS), PARAMS)
    state, reported = tx.init(PARAMS), []
    for scale in [1.0, 3.0, 1.5, 9.0, 0.5, 40.0, 2.5, 1.0]:  # below and above each threshold
        g = jax.tree.map(lambda x: scale * x, unit)
        out, state = tx.update(g, state, PARAMS)
        assert bool(state.changed) == bool(methods.any_changed(g, out))
        assert float(state.out_norm) == pytest.approx(norm(out), rel=1e-6)
        reported.append(bool(state.changed))
    assert any(reported) and not all(reported)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    assert np.isnan(tx.update(nan, state, PARAMS)[1].out_norm)


def test_a_cell_compares_the_gradient_unless_every_method_reports_its_change():
    """The engine's `changed` is the methods' own flags when all of them report one, else the
    comparison of every element: they differ on an all-NaN gradient, which the comparison counts
    as unchanged (NaN in both) and clipping counts as rescaled (its norm is not finite)."""
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    big = jax.tree.map(lambda x: 10.0 * x, PARAMS)
    for spec, g, changed in [("clip_norm(max_norm=1.0)", nan, True),
                             ("clip_norm(max_norm=1.0)+clip_norm(max_norm=1e9)", nan, True),
                             ("clip_norm(max_norm=1e9)", big, False),
                             ("clip_norm(max_norm=1.0)+clip_value(limit=1e9)", nan, False),
                             ("clip_norm(max_norm=1e9)+clip_value(limit=1.0)", big, True)]:
        ct = cell_transform(spec)
        tx = ct.build(0.1, KEY)
        state = tx.init(PARAMS)
        _, new_state = tx.update(g, state, PARAMS)
        assert bool(ct.observe(state, new_state).changed) == changed, spec


def test_the_norm_the_optimizer_sees_is_the_last_methods_own_when_it_reports_one():
    """clip_norm reports min(norm, max_norm), exact where the measured norm of its rescaled
    result is off by rounding; followed by a method that does not report, the norm is measured."""
    g = jax.tree.map(lambda x: 10.0 * x, PARAMS)
    for spec, exact in [("clip_norm(max_norm=1.0)", True),
                        ("clip_value(limit=1.0)+clip_norm(max_norm=1.0)", True),
                        ("clip_norm(max_norm=1.0)+clip_value(limit=1e9)", False)]:
        ct = cell_transform(spec)
        tx = ct.build(0.1, KEY)
        state = tx.init(PARAMS)
        update, new_state = tx.update(g, state, PARAMS)
        seen = float(ct.observe(state, new_state).seen_norm)
        measured = float(optax.tree.norm(jax.tree.map(lambda u: u / -0.1, update)))
        assert seen == pytest.approx(1.0, rel=1e-6) and seen == pytest.approx(measured, rel=1e-5)
        assert (seen == 1.0) == exact, spec


# ---- gradient methods ------------------------------------------------------------------------
@covers("method", "none")
def test_none_hands_the_raw_gradient_to_the_optimizer():
    g = make_tree(jax.random.key(2))
    ct = cell_transform("none")
    tx = ct.build(0.1, KEY)
    state = tx.init(PARAMS)
    update, new_state = tx.update(g, state, PARAMS)
    assert_tree_equal(update, jax.tree.map(lambda x: -0.1 * x, g))
    seen = ct.observe(state, new_state)
    assert seen.ran and not seen.changed and not seen.skipped
    assert float(seen.seen_norm) == pytest.approx(norm(g), rel=1e-6)


@covers("method", "clip_value")
def test_clip_value_bounds_every_element():
    g = make_tree(jax.random.key(2), scale=3.0)
    out, _ = pre("clip_value(limit=0.5)").update(g, None, PARAMS)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out)):
        assert np.abs(y).max() <= 0.5
        inside = np.abs(x) <= 0.5
        assert 0 < inside.mean() < 1  # some elements clipped, some not
        np.testing.assert_array_equal(y[inside], x[inside])
        np.testing.assert_array_equal(y[~inside], 0.5 * np.sign(x[~inside]))


@covers("method", "clip_norm")
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_norm_rescales_to_the_global_norm(max_norm):
    g = make_tree(jax.random.key(2))
    out, _ = pre(f"clip_norm(max_norm={max_norm})").update(g, None, PARAMS)
    factor = min(1.0, max_norm / norm(g))
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out)):
        np.testing.assert_allclose(y, factor * x, rtol=1e-5)


@covers("method", "clip_block_rms")
def test_clip_block_rms_bounds_each_layers_rms():
    g = make_tree(jax.random.key(2))
    # blow up one layer of the stack: only that one may be clipped among the stack's kernels
    g["blocks"]["linear"]["kernel"] = g["blocks"]["linear"]["kernel"].at[1].multiply(10.0)
    out, _ = pre("clip_block_rms(threshold=2.0)").update(g, None, PARAMS)
    clipped = 0
    for (_, x), (_, y) in zip(per_layer(g), per_layer(out)):
        rms = float(jnp.sqrt(jnp.mean(x ** 2)))
        assert float(jnp.sqrt(jnp.mean(y ** 2))) <= 2.0 * (1 + 1e-6)
        if rms <= 2.0:
            np.testing.assert_array_equal(y, x)
        else:
            clipped += 1
            np.testing.assert_allclose(y, x * 2.0 / rms, rtol=1e-5)
    assert clipped == 1


def units(x):
    """Unit norms of one layer's parameter: columns of a kernel, the whole of a vector."""
    return jnp.sqrt(jnp.sum(x ** 2, axis=tuple(range(x.ndim - 1)))) if x.ndim > 1 else \
        jnp.sqrt(jnp.sum(x ** 2))[None]


@covers("method", "agc")
def test_agc_bounds_every_units_ratio_except_the_final_layer():
    clip, eps = 0.05, 1e-3
    g = make_tree(jax.random.key(2), scale=0.05)  # some units over their limit, some under
    out, _ = pre(f"agc(clip={clip}, eps={eps})").update(g, optax.MaskedState(optax.EmptyState()),
                                                        PARAMS)
    assert_tree_equal(out["head"], g["head"])  # the final layer is excluded
    clipped = kept_units = 0
    for (part, x), (_, y), (_, w) in zip(per_layer(g), per_layer(out), per_layer(PARAMS)):
        if part == "head":
            continue
        limit = clip * jnp.maximum(units(w), eps)
        before, after = units(x), units(y)
        assert (after <= limit * (1 + 1e-5)).all()
        kept = before <= limit
        np.testing.assert_allclose(after[kept], before[kept], rtol=1e-6)
        np.testing.assert_allclose(after[~kept], limit[~kept], rtol=1e-5)
        clipped += int((~kept).sum())
        kept_units += int(kept.sum())
    assert clipped > 0 and kept_units > 0


@covers("method", "autoclip")
def test_autoclip_threshold_is_the_percentile_of_its_recorded_history():
    tx = pre("autoclip(percentile=25, history=5)")
    unit = jax.tree.map(lambda x: x / norm(make_tree(jax.random.key(2))),
                        make_tree(jax.random.key(2)))
    state = tx.init(PARAMS)
    seen = []
    for scale in [1.0, 3.0, 2.0, 8.0, 5.0, 0.5, 7.0, 4.0]:  # wraps around the 5-entry history
        g = jax.tree.map(lambda x: scale * x, unit)
        out, state = tx.update(g, state, PARAMS)
        seen.append(norm(g))
        recorded = np.asarray(state.history)[:min(len(seen), 5)]
        np.testing.assert_allclose(np.sort(recorded), np.sort(seen[-5:]), rtol=1e-6)
        threshold = np.percentile(recorded, 25)
        assert norm(out) == pytest.approx(min(norm(g), threshold), rel=1e-5)


@covers("method", "zclip")
def test_zclip_leaves_normal_steps_and_clips_a_spike():
    z, alpha = 2.5, 0.9
    tx = pre(f"zclip(z={z}, alpha={alpha}, warmup=5)")
    base = make_tree(jax.random.key(2))
    unit = jax.tree.map(lambda x: x / norm(base), base)
    state = tx.init(PARAMS)
    warm = [9.0, 11.0, 10.0, 9.5, 10.5]
    normal = [10.2, 9.8, 10.4, 9.7]
    mean, var = np.mean(warm), np.var(warm)
    for i, n in enumerate(warm + normal):
        g = jax.tree.map(lambda x: n * x, unit)
        out, state = tx.update(g, state, PARAMS)
        assert_tree_equal(out, g)  # warm-up and normal steps are untouched
        if i >= len(warm):  # the EMA of the definition
            mean = alpha * mean + (1 - alpha) * n
            var = alpha * var + (1 - alpha) * (n - mean) ** 2
        if i >= len(warm) - 1:  # statistics of the warm-up, then of the EMA
            np.testing.assert_allclose([state.mean, state.var], [mean, var], rtol=1e-5)
    spike = jax.tree.map(lambda x: 50.0 * x, unit)
    out, state = tx.update(spike, state, PARAMS)
    score = (50.0 - mean) / np.sqrt(var)
    assert score > z
    clipped = mean + z * z * np.sqrt(var) / score
    assert norm(out) == pytest.approx(clipped, rel=1e-4)
    for x, y in zip(jax.tree.leaves(spike), jax.tree.leaves(out)):
        np.testing.assert_allclose(y, x * clipped / 50.0, rtol=1e-4, atol=1e-7)
    # the statistics absorb the clipped norm, not the spike
    assert float(state.mean) == pytest.approx(alpha * mean + (1 - alpha) * clipped, rel=1e-5)


@covers("method", "lars")
def test_lars_rescales_each_layers_gradient_to_trust_times_weight_norm():
    g = make_tree(jax.random.key(2))
    out, _ = pre("lars(trust=0.01)").update(g, None, PARAMS)
    for (_, y), (_, w) in zip(per_layer(out), per_layer(PARAMS)):
        assert float(jnp.linalg.norm(y)) == pytest.approx(0.01 * float(jnp.linalg.norm(w)),
                                                          rel=1e-5)
    for (_, x), (_, y) in zip(per_layer(g), per_layer(out)):  # direction kept
        cos = jnp.vdot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y))
        assert float(cos) == pytest.approx(1.0, abs=1e-5)


@covers("method", "centralize")
def test_centralize_gives_each_output_unit_a_zero_mean_gradient():
    g = make_tree(jax.random.key(2))
    tx = pre("centralize")
    out, _ = tx.update(g, tx.init(PARAMS), PARAMS)
    for (_, x), (_, y) in zip(per_layer(g), per_layer(out)):
        if x.ndim == 1:
            np.testing.assert_array_equal(y, x)  # biases are left alone
        else:
            np.testing.assert_allclose(y, x - x.mean(0, keepdims=True), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-6)
    # lookup tables are not weights of output units: one token's gradient stays that token's
    tables = {"embed": {"tokens": {"embedding": jnp.zeros((5, 3)).at[3].set(1.0)},
                        "positions": jnp.zeros((4, 3)).at[0].set(2.0)}}
    out, _ = tx.update(tables, tx.init(tables), tables)
    jax.tree.map(np.testing.assert_array_equal, out, tables)
    # the engine's trees are nnx states, whose key paths end in each Variable's `.value`
    from flax import nnx

    state = nnx.State({"embed": {"tokens": {"embedding": nnx.Param(tables["embed"]["tokens"][
        "embedding"])}, "positions": nnx.Param(tables["embed"]["positions"])}})
    out, _ = tx.update(state, tx.init(state), state)
    jax.tree.map(np.testing.assert_array_equal, out, state)


@covers("method", "grad_noise")
def test_grad_noise_variance_anneals_as_eta_over_t_to_the_gamma():
    eta, gamma = 0.1, 0.55
    zeros = {"w": jnp.zeros((200, 500))}
    tx = pre(f"grad_noise(eta={eta}, gamma={gamma})", key=jax.random.key(7))
    state = tx.init(zeros)
    stds = []
    for _ in range(10):
        out, state = tx.update(zeros, state, zeros)
        stds.append(float(jnp.std(out["w"])))
    for t in (0, 9):
        assert stds[t] == pytest.approx(np.sqrt(eta / (1 + t) ** gamma), rel=0.02)
    # the noise is the run's own: the same key repeats it, another key does not
    def first_noise(seed):
        tx = pre(f"grad_noise(eta={eta})", key=jax.random.key(seed))
        return np.asarray(tx.update(zeros, tx.init(zeros), zeros)[0]["w"])

    np.testing.assert_array_equal(first_noise(7), first_noise(7))
    assert np.abs(first_noise(7) - first_noise(8)).mean() > 0.1


# ---- on the optimizer's direction ------------------------------------------------------------
@covers("method", "lamb")
def test_lamb_scales_each_layers_adam_step_to_trust_times_weight_norm():
    lr, trust = 0.1, 0.5
    g = make_tree(jax.random.key(2))
    tx = cell_transform(f"lamb(trust={trust})", optimizer="adam").build(lr, KEY)
    update, _ = tx.update(g, tx.init(PARAMS), PARAMS)
    adam = optax.scale_by_adam()
    direction, _ = adam.update(g, adam.init(PARAMS), PARAMS)
    for (_, u), (_, d), (_, w) in zip(per_layer(update), per_layer(direction), per_layer(PARAMS)):
        expected = -lr * trust * jnp.linalg.norm(w) / jnp.linalg.norm(d) * d
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-8)


@covers("method", "weight_decay")
def test_weight_decay_is_decoupled_adam_plus_it_equals_adamw():
    lr, wd = 0.1, 0.05
    ours = cell_transform(f"weight_decay(wd={wd})", optimizer="adam").build(lr, KEY)
    reference = optax.adamw(lr, weight_decay=wd)
    s1, s2, params = ours.init(PARAMS), reference.init(PARAMS), PARAMS
    for i in range(3):
        g = make_tree(jax.random.key(10 + i))
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = reference.update(g, s2, params)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
        params = optax.apply_updates(params, u1)
    # with plain SGD: -lr * (g + wd * W)
    sgd = cell_transform(f"weight_decay(wd={wd})").build(lr, KEY)
    g = make_tree(jax.random.key(2))
    u, _ = sgd.update(g, sgd.init(PARAMS), PARAMS)
    for x, gx, w in zip(jax.tree.leaves(u), jax.tree.leaves(g), jax.tree.leaves(PARAMS)):
        np.testing.assert_allclose(x, -lr * (gx + wd * w), rtol=1e-6)


# ---- learning-rate multipliers ---------------------------------------------------------------
def multipliers(spec, n, lr=0.2, steps=100):
    """The learning-rate multiplier of the first n updates under plain SGD."""
    tx = cell_transform(spec, steps=steps).build(lr, KEY)
    g = {"w": jnp.ones(3)}
    state = tx.init(g)
    out = []
    for _ in range(n):
        u, state = tx.update(g, state, g)
        out.append(float(-u["w"][0] / lr))
    return np.array(out)


@covers("method", "warmup")
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_gives_the_stated_learning_rate(shape):
    m = multipliers(f"warmup(steps=20, shape={shape})", 25)
    np.testing.assert_allclose(m[[0, 10, 20, 24]], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    quarter = 0.25 if shape == "linear" else 0.5 * (1 - np.cos(np.pi / 4))
    assert m[5] == pytest.approx(quarter, abs=1e-6)


@covers("method", "warmup_frac")
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_frac_warms_up_over_its_fraction_of_the_runs_updates(shape):
    steps20 = multipliers(f"warmup(steps=20, shape={shape})", 25)
    np.testing.assert_allclose(multipliers(f"warmup_frac(fraction=0.2, shape={shape})", 25),
                               steps20, atol=1e-6)
    np.testing.assert_allclose(multipliers(f"warmup_frac(fraction=0.5, shape={shape})", 25,
                                           steps=40), steps20, atol=1e-6)


@covers("method", "schedule")
def test_schedules_decay_over_the_runs_updates():
    cos = multipliers("schedule(kind=cosine)", 21, steps=20)
    np.testing.assert_allclose(cos[[0, 10, 20]], [1.0, 0.5, 0.0], atol=1e-6)
    step = multipliers("schedule(kind=step)", 20, steps=20)
    np.testing.assert_allclose(step[[0, 9, 10, 14, 15, 19]], [1, 1, 0.1, 0.1, 0.01, 0.01],
                               rtol=1e-6)
    np.testing.assert_allclose(multipliers("schedule(kind=constant)", 5), 1.0)
    # with accumulation the schedule counts optimizer updates: 20 steps of 4 batches = 5 updates
    assert cell_transform("accumulate(k=4)+schedule", steps=20).updates == 5
    warm_decay = multipliers("warmup(steps=4)+schedule(kind=cosine)", 9, steps=8)
    assert warm_decay[2] == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 2 / 8)), abs=1e-6)


# ---- wrappers --------------------------------------------------------------------------------
def nan_tree():
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), make_tree(jax.random.key(3)))


@covers("method", "skip_nonfinite")
def test_skip_nonfinite_drops_a_nan_gradient_and_keeps_the_state():
    ct = cell_transform("skip_nonfinite(max_skips=2)", optimizer="sgd(momentum=0.9)")
    tx = ct.build(0.1, KEY)
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    _, state = step(make_tree(jax.random.key(2)), state, PARAMS)
    for _ in range(2):
        update, new_state = step(nan_tree(), state, PARAMS)
        assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(update))
        seen = ct.observe(state, new_state)
        assert seen.skipped and not seen.ran
        assert_tree_equal(new_state.inner_state, state.inner_state)  # momentum untouched
        state = new_state
    assert int(state.total_notfinite) == 2
    update, _ = step(nan_tree(), state, PARAMS)  # a third in a row: it gives up
    assert not np.isfinite(np.asarray(update["head"]["kernel"])).all()


def with_nan_example(data, engine, step):
    """The data with the first example of the seed-0 batch at `step` set to NaN."""
    i = engine.batch_indices(np.array([0]), 0)[0, step, 0]
    x = data.x_train.copy()
    x[i] = np.nan
    return dataclasses.replace(data, x_train=x)


@covers("method", "skip_nonfinite")
@pytest.mark.slow
def test_skip_nonfinite_in_the_engine_counts_the_step_and_the_run_goes_on(digits_data):
    spec = catalog_spec("skip_nonfinite")
    data = with_nan_example(digits_data, engine_for(spec, digits_data), step=3)
    result = engine_for(spec, data).run(np.array([0]), np.array([0.05]))
    tel = {k: v[0] for k, v in result.telemetry.items()}
    assert result.diverged_at[0] == -1
    assert tel["nonfinite"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert tel["param_norm"][3] == tel["param_norm"][2]  # parameters unchanged
    assert tel["update_norm"][3] == 0 and tel["changed"][3] == 1
    assert np.isnan(tel["grad_norm_post"][3]) and np.isfinite(tel["loss"][4:]).all()
    ev = {k: v[0] for k, v in result.evals.items()}
    m = run_metrics(tel, ev, result.eval_steps, int(result.diverged_at[0]),
                    spec.target)
    assert m["nonfinite_steps"] == 1 and m["diverged"] == 0 and m["test_accuracy"] > 0
    # without the method the same step ends the run
    plain = engine_for(catalog_spec("none"), data).run(np.array([0]), np.array([0.05]))
    assert plain.diverged_at[0] == 3


@covers("method", "skip_large_updates")
def test_skip_large_updates_drops_steps_at_or_above_max_sq_norm():
    g = make_tree(jax.random.key(2))
    sq = norm(g) ** 2
    for limit, skipped in [(sq * 1.01, False), (sq * 0.99, True)]:
        ct = cell_transform(f"skip_large_updates(max_sq_norm={limit})")
        tx = ct.build(0.1, KEY)
        state = tx.init(PARAMS)
        update, new_state = tx.update(g, state, PARAMS)
        assert bool(ct.observe(state, new_state).skipped) == skipped
        expected = 0.0 if skipped else -0.1
        for u, x in zip(jax.tree.leaves(update), jax.tree.leaves(g)):
            np.testing.assert_allclose(u, expected * x, rtol=1e-6)


@covers("method", "accumulate")
def test_accumulate_equals_one_step_on_the_k_times_batch():
    k, batch = 4, 8
    kx, ky = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (k * batch, 6))
    y = jax.random.randint(ky, (k * batch,), 0, 3)
    w0 = {"w": 0.1 * jax.random.normal(jax.random.key(6), (6, 3)), "b": jnp.zeros(3)}

    def loss(p, x, y):  # a linear model
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    # plain SGD: its step is proportional to the gradient, so a sum of the k micro-batch
    # gradients instead of their mean shows (Adam's first step is about lr * sign(g))
    ct = cell_transform(f"accumulate(k={k})", optimizer="sgd(momentum=0.0)")
    tx = ct.build(0.1, KEY)
    step = jax.jit(lambda p, s, x, y: tx.update(jax.grad(loss)(p, x, y), s, p))
    state, params = tx.init(w0), w0
    for i in range(k):
        sl = slice(i * batch, (i + 1) * batch)
        update, new_state = step(params, state, x[sl], y[sl])
        seen = ct.observe(state, new_state)
        assert bool(seen.ran) == (i == k - 1) and not seen.skipped
        params, state = optax.apply_updates(params, update), new_state
    big = optax.sgd(0.1)
    update, _ = big.update(jax.grad(loss)(w0, x, y), big.init(w0), w0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(optax.apply_updates(w0, update))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@covers("method", "accumulate")
@pytest.mark.slow
def test_accumulate_in_the_engine_updates_every_k_steps(digits_data):
    result = engine_for(catalog_spec("accumulate(k=4)"), digits_data).run(
        np.array([0]), np.array([0.05]))
    tel = {k: v[0] for k, v in result.telemetry.items()}
    emit = np.arange(8) % 4 == 3
    assert (tel["update_norm"][emit] > 0).all() and (tel["update_norm"][~emit] == 0).all()
    # the optimizer saw a gradient only when it updated
    assert np.isfinite(tel["grad_norm_post"][emit]).all()
    assert np.isnan(tel["grad_norm_post"][~emit]).all() and np.isnan(tel["changed"][~emit]).all()
    assert result.diverged_at[0] == -1

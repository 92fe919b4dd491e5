"""The stabilizers of today's large models (z-loss, logit and attention soft-capping, SAM, update
clipping) and low-precision training (the precision setting, dynamic loss scaling), each against
its definition: on a small parameter tree, on the cell program's own forward pass and steps, and
in the engine where the definition is about training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import stabench
from stabench import cli
from stabench.config import build_cell, data_source, program_key, task_of
from stabench.methods import METHODS
from stabench.models import MUTABLE
from stabench.models.transformer import Block
from stabench.program import RUNS, Carry, RunProgram
from stabench.registry import UserError
from stabench.sweeps import task_variants

from conftest import catalog_spec, covers, digits, engine_for
from test_methods import KEY, PARAMS, STACKED, assert_tree_equal, cell_transform, make_tree


def program(spec) -> RunProgram:
    return RunProgram(build_cell(spec, data_source(task_of(spec))))


def start(prog: RunProgram, n: int = 32):
    """A model of the program at init (seed 0) as parameters and state, and n digits examples."""
    d = digits()
    x, y = jnp.asarray(d.x_train[:n]), jnp.asarray(d.y_train[:n])
    _, params, state = nnx.split(prog.initial_model(0, x), nnx.Param, MUTABLE)
    return params, state, x, y


def train_steps(spec, n: int, lr: float):
    """One run (seed 0) of the cell program for n steps on successive digits batches: the carry
    before and after each step, and each step's telemetry."""
    prog, d = program(spec), digits()
    arrays = {"x_train": jnp.asarray(d.x_train), "y_train": jnp.asarray(d.y_train)}
    size = prog.cell.batch_size

    def batch(t):
        return (jnp.arange(size) + t * size) % d.x_train.shape[0]

    init = jax.jit(jax.vmap(lambda s: prog.init_run(s, lr, batch(0), arrays), axis_name=RUNS))
    step = jax.jit(jax.vmap(lambda c, t: prog.step(c, t, batch(t), lr, arrays),
                            in_axes=(0, None), axis_name=RUNS))
    carries, records = [init(jnp.zeros(1, jnp.int32))], []
    for t in range(n):
        carry, record = step(carries[-1], t)
        carries.append(carry)
        records.append({k: np.asarray(v[0]) for k, v in record.items()})
    return carries, records


def log_partition(logits) -> np.ndarray:
    return np.logaddexp.reduce(np.asarray(logits, np.float64), axis=-1)


def cross_entropy(logits, y) -> np.ndarray:
    return log_partition(logits) - np.take_along_axis(np.asarray(logits, np.float64),
                                                      np.asarray(y)[:, None], -1)[:, 0]


# ---- the loss and the model --------------------------------------------------------------------
@covers("method", "z_loss")
def test_z_loss_adds_coef_times_the_squared_log_partition_to_each_examples_loss():
    coef = 0.01
    logits = np.array([[0.0, 0.0, 0.0], [100.0, 99.0, -50.0], [-3.0, 2.0, 1.0]], np.float32)
    np.testing.assert_allclose(METHODS.get(f"z_loss(coef={coef})").term(jnp.asarray(logits)),
                               coef * log_partition(logits) ** 2, rtol=1e-6)
    # the program's training loss: cross-entropy plus the term, from the model's own logits
    with_z, plain = program(catalog_spec(f"z_loss(coef={coef})")), program(catalog_spec())
    params, state, x, y = start(plain)
    logits = plain.logits(plain.model(params, state), x)
    expected = np.mean(cross_entropy(logits, y) + coef * log_partition(logits) ** 2)
    np.testing.assert_allclose(with_z.forward_loss(params, state, x, y)[0], expected, rtol=1e-5)
    with pytest.raises(UserError, match="classifier's logits.*mse"):
        stabench.spec("adding", "z_loss")


@covers("method", "logit_softcap")
def test_logit_softcap_caps_the_output_logits_in_training_and_evaluation():
    cap = 0.5
    capped, plain = program(catalog_spec(f"logit_softcap(cap={cap})")), program(catalog_spec())
    params, state, x, y = start(plain)
    raw = plain.logits(plain.model(params, state), x)
    out = capped.logits(capped.model(params, state), x)
    np.testing.assert_allclose(out, cap * np.tanh(np.asarray(raw, np.float64) / cap), rtol=1e-6)
    assert np.abs(raw).max() > cap > np.abs(out).max()
    np.testing.assert_allclose(capped.forward_loss(params, state, x, y)[0],
                               cross_entropy(out, y).mean(), rtol=1e-5)
    carry = Carry(params, state, None, None, jnp.array(True), jnp.array(-1))
    batches = {"x_test": x.reshape(2, 16, -1), "y_test": y.reshape(2, 16),
               "w_test": jnp.ones((2, 16))}
    np.testing.assert_allclose(capped.evaluate(carry, batches)["test_loss"],
                               cross_entropy(out, y).mean(), rtol=1e-5)


@covers("method", "attn_softcap")
def test_attn_softcap_caps_the_attention_logits_before_the_softmax():
    cap, dim, heads = 0.5, 8, 2
    block = Block(dim, heads, 2, False, None, None, nnx.Rngs(0), attn_softcap=cap)
    plain = Block(dim, heads, 2, False, None, None, nnx.Rngs(0))
    z = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, dim))
    mask = jnp.ones((2, 5), bool).at[0, 4].set(False)
    q, k, v = jnp.split(block.qkv(z).reshape(2, 5, 3 * heads, -1), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // heads)
    weights = jax.nn.softmax(jnp.where(mask[:, None, None, :], cap * jnp.tanh(logits / cap),
                                       -jnp.inf), axis=-1)
    expected = block.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, dim))
    np.testing.assert_allclose(block.attention(z, mask), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(plain.attention(z, mask) - expected)).max() > 1e-3
    # the method sets the Transformer's argument, and fails on a model without attention
    cell = build_cell(catalog_spec(f"attn_softcap(cap={cap})", task="listops"),
                      data_source(task_of(catalog_spec(task="listops"))))
    assert nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0))).blocks.attn_softcap == cap
    with pytest.raises(UserError, match="model mlp does not take.*transformer"):
        catalog_spec("attn_softcap")


# ---- the gradient and the update ---------------------------------------------------------------
@covers("method", "sam")
def test_sam_steps_with_the_gradient_at_the_normalized_ascent_point():
    lr, rho = 0.1, 0.05
    a = jnp.diag(jnp.array([3.0, 1.0, 0.5]))

    def loss(p):
        return 0.5 * p["w"] @ a @ p["w"]

    ct = cell_transform(f"sam(rho={rho})")
    assert ct.needs_value
    tx = ct.build(lr, KEY)
    for w in (jnp.array([1.0, -2.0, 0.5]), jnp.zeros(3)):
        params = {"w": w}
        g = jax.grad(loss)(params)
        state = tx.init(params)
        update, new_state = tx.update(g, state, params, value=loss(params), grad=g, value_fn=loss)
        norm = jnp.linalg.norm(g["w"])
        ascent = w + (rho * g["w"] / norm if norm > 0 else 0.0)  # a zero gradient: w itself
        np.testing.assert_allclose(update["w"], -lr * a @ ascent, rtol=1e-6)
        assert ct.observe(state, new_state).ran  # one optimizer update per step


def stable_adamw(grads, params, lr, b1, b2, eps, wd):
    """Wortsman et al. 2023, Algorithm 2 (StableAdamW) in numpy, per tensor: bias-corrected
    moments m, v of this step's gradient, RMS = sqrt(mean(g^2 / max(v, eps^2))),
    eta = lr / max(1, RMS), w -= eta * (m / (sqrt(v) + eps) + wd * w). The RMS of each step."""
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    params, rms_seen = [np.array(p, np.float64) for p in params], []
    for t, step in enumerate(grads, start=1):
        rms_seen.append([])
        for i, g in enumerate(step):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            rms = np.sqrt(np.mean(g * g / np.maximum(v_hat, eps * eps)))
            params[i] = params[i] - lr / max(1.0, rms) * (m_hat / (np.sqrt(v_hat) + eps)
                                                           + wd * params[i])
            rms_seen[-1].append(rms)
    return params, np.array(rms_seen)


def tensors(tree) -> list[np.ndarray]:
    """Each parameter tensor of a tree: a stacked leaf is one tensor per layer."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf, np.float64)
        out += list(leaf) if path[0].key in STACKED else [leaf]
    return out


@covers("method", "update_clip")
def test_update_clip_with_adamw_is_stableadamw():
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    ct = cell_transform(f"update_clip(b2={b2}, eps={eps})",
                        optimizer=f"adamw(b1={b1}, b2={b2}, eps={eps}, weight_decay={wd})")
    tx = ct.build(lr, KEY)
    # four ordinary gradients, then a spike that update clipping scales down
    grads = [make_tree(jax.random.key(20 + i), scale=30.0 if i == 4 else 1.0) for i in range(5)]
    params, state = PARAMS, tx.init(PARAMS)
    for g in grads:
        update, state = tx.update(g, state, params)
        params = optax.apply_updates(params, update)
    expected, rms = stable_adamw([tensors(g) for g in grads], tensors(PARAMS), lr, b1, b2, eps, wd)
    for ours, theirs in zip(tensors(params), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    # the first step's RMS is 1 (v = g^2), and the spike is clipped: the test reaches both cases
    np.testing.assert_allclose(rms[0], 1.0, rtol=1e-6)
    assert (rms[4] > 2).all()


# ---- low precision and dynamic loss scaling ----------------------------------------------------
def nan_tree():
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), make_tree(jax.random.key(3)))


@covers("method", "loss_scale")
def test_loss_scale_halves_and_skips_on_overflow_and_doubles_after_period_finite_steps():
    period = 2
    ct = cell_transform(f"loss_scale(scale=8.0, period={period})", optimizer="sgd(momentum=0.9)")
    plain = cell_transform("none", optimizer="sgd(momentum=0.9)").build(0.1, KEY)
    tx = ct.build(0.1, KEY)
    state, plain_state = tx.init(PARAMS), plain.init(PARAMS)
    good = make_tree(jax.random.key(2))
    # (gradient, overflows, the scale after it)
    for g, bad, scale in [(good, False, 8), (good, False, 16), (nan_tree(), True, 8),
                          (good, False, 8), (nan_tree(), True, 4), (good, False, 4),
                          (good, False, 8)]:
        update, new_state = tx.update(g, state, PARAMS)
        seen = ct.observe(state, new_state)
        if bad:  # skipped: no update, the optimizer's state as it was
            assert seen.skipped and not seen.ran
            assert all((np.asarray(u) == 0).all() for u in jax.tree.leaves(update))
            assert_tree_equal(new_state.inner, state.inner)
        else:  # the gradient it gets is the unscaled one: the update is the plain optimizer's
            assert seen.ran and not seen.skipped
            expected, plain_state = plain.update(g, plain_state, PARAMS)
            assert_tree_equal(update, expected)
        assert float(ct.loss_scale(new_state)) == scale
        state = new_state
    # at S = 1 an overflow is the model's: the update goes on (and the run ends)
    ct = cell_transform("loss_scale(scale=1.0)")
    tx = ct.build(0.1, KEY)
    state = tx.init(PARAMS)
    update, new_state = tx.update(nan_tree(), state, PARAMS)
    assert ct.observe(state, new_state).ran and not np.isfinite(update["head"]["kernel"]).all()
    for bad, match in [("loss_scale(scale=3.0)", "power of 2"),
                       ("loss_scale+loss_scale(period=4)", "one loss scaler")]:
        with pytest.raises(UserError, match=match):
            cell_transform(bad)


@covers("method", "loss_scale")
@pytest.mark.slow
def test_loss_scale_in_fp16_skips_the_overflowing_steps_and_adapts_the_scale():
    period, steps = 3, 12
    # S = 2^24 overflows float16's backward pass (max 65504) until halved a few times
    spec = catalog_spec(f"loss_scale(scale={2.0 ** 24}, period={period})", steps=steps,
                        **{"train.precision": "fp16"})
    carries, records = train_steps(spec, steps, 0.05)
    scales = [float(c.opt_state.scale[0]) for c in carries]
    good, kinds = 0, set()
    for t, record in enumerate(records):
        before, after = carries[t], carries[t + 1]
        assert after.alive[0] and np.isfinite(record["loss"])
        if record["nonfinite"] == 1:  # the gradient overflowed: skipped, S halved
            assert_tree_equal(after.params, before.params)
            assert scales[t + 1] == scales[t] / 2 and record["changed"] == 1
            good, kind = 0, "halved"
        else:
            assert np.isfinite(record["grad_norm"]) and record["update_norm"] > 0
            good += 1
            kind = "doubled" if good == period else "kept"
            assert scales[t + 1] == scales[t] * (2 if kind == "doubled" else 1)
            good %= period
        kinds.add(kind)
    assert kinds == {"halved", "kept", "doubled"}


@covers("method", "loss_scale")
@pytest.mark.slow
def test_loss_scale_leaves_float32_training_bit_for_bit_unchanged():
    # scaling by a power of 2 and back is exact where nothing overflows or underflows
    runs = [train_steps(catalog_spec(m), 4, 0.05) for m in ("none", "loss_scale(scale=1024.0)")]
    (plain_carries, plain), (scaled_carries, scaled) = runs
    for a, b in zip(plain, scaled):
        for name in ("loss", "grad_norm", "update_norm", "param_norm"):
            assert a[name] == b[name], name
    assert_tree_equal(plain_carries[-1].params, scaled_carries[-1].params)


def test_precision_is_a_validated_task_setting_and_fp32_keeps_a_cells_identity():
    base = catalog_spec()
    fp32, bf16 = (catalog_spec(**{"train.precision": p}) for p in ("fp32", "bf16"))
    assert "precision" not in base.train and "precision" not in fp32.train
    assert fp32.hash == base.hash and program_key(fp32) == program_key(base)
    assert bf16.train["precision"] == "bf16"
    assert bf16.hash != base.hash and program_key(bf16) != program_key(base)
    with pytest.raises(UserError, match="train.precision' must be one of fp32, bf16, fp16"):
        catalog_spec(**{"train.precision": "fp8"})
    # a sweep axis: a list is a grid of variants, as --precision gives it
    assert task_variants("digits", {"train.precision": ["bf16", "fp16"]}) == [
        {"train.precision": "bf16"}, {"train.precision": "fp16"}]
    parser = cli.build_parser()
    assert cli._overrides(parser.parse_args(["run", "--precision", "bf16"])) == {
        "train.precision": "bf16"}
    assert cli._overrides(parser.parse_args(["sweep", "--precision", "bf16,fp16"])) == {
        "train.precision": ["bf16", "fp16"]}
    assert stabench.spec("digits", precision="fp16").train["precision"] == "fp16"


@pytest.mark.parametrize("precision, dtype", [("bf16", jnp.bfloat16), ("fp16", jnp.float16)])
def test_low_precision_computes_in_its_dtype_and_keeps_parameters_and_state_float32(precision,
                                                                                     dtype):
    spec = catalog_spec("none", **{"train.precision": precision, "model.norm": "batch"})
    prog = program(spec)
    params, state, x, y = start(prog)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(prog.forward_loss, has_aux=True))(params, state,
                                                                                  x, y)
    products = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert products and all(v.aval.dtype == dtype for e in products for v in e.invars)
    (loss, new_state), grads = jax.value_and_grad(prog.forward_loss, has_aux=True)(params, state,
                                                                                   x, y)
    assert loss.dtype == jnp.float32
    for tree in (grads, new_state, state):
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(tree))
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                        jax.tree.leaves(new_state)))


@pytest.mark.slow
def test_fp16_overflows_where_float32_does_not_and_the_telemetry_names_the_step():
    lr = 10.0  # digits at lr 10: activations past float16's 65504 within a few steps
    results = {p: engine_for(catalog_spec(lrs=(lr,), **{"train.precision": p})).run(
        np.array([0]), np.array([lr])) for p in ("fp32", "fp16")}
    fp32, fp16 = results["fp32"], results["fp16"]
    assert fp32.diverged_at[0] == -1 and (fp32.telemetry["nonfinite"][0] == 0).all()
    t = fp16.diverged_at[0]
    assert t >= 0
    nonfinite = fp16.telemetry["nonfinite"][0]
    assert nonfinite[t] == 1 and (nonfinite[:t] == 0).all()

"""Models against their definitions: twins, layer order, recurrences, masking, batch norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stabench.config import build_cell, data_source, make_spec, task_of
from stabench.data import Meta
from stabench.models import MODELS, LayerLayout, activation_stds, dense
from stabench.models.conv import NHWC, conv_general_dilated
from stabench.tasks import get_task
from stabench.train import Engine

IMAGE = Meta(x_shape=(16, 16, 3), x_dtype="uint8", num_outputs=10, n_train=64, n_test=16)
TOKENS = Meta((8,), "int32", 3, 8, 8, vocab_size=12)
# Tests that need parameter values build these few shapes only (each new shape compiles its init).
RESNET = "resnet(depth=14, width=4, norm='none'"
TRANSFORMER = "transformer(dim=8, depth=2, heads=2"


def build(spec, meta=IMAGE, seed=0):
    return MODELS.get(spec)(meta, None, nnx.Rngs(seed))


def param_tree(model):
    return nnx.state(model, nnx.Param)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(param_tree(model)))


def layout(model):
    return LayerLayout(param_tree(model), model.layer_order, getattr(model, "stacked_layers", ()))


# ---- plain and residual twins -----------------------------------------------------------------
def test_resnet20_has_he_et_al_parameter_count():
    """He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A shortcuts, batch norm)."""
    meta = Meta((32, 32, 3), "uint8", 10, 64, 16)
    convs = 3 * 3 * 3 * 16 + sum(3 * 3 * cin * cout * 2 for cin, cout in
                                 [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)]
                                 + [(64, 64)] * 2)
    convs -= 3 * 3 * 16 * 32 + 3 * 3 * 32 * 64  # a downsampling block's second conv is c -> c
    convs += 3 * 3 * 32 * 32 + 3 * 3 * 64 * 64
    norms = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    head = 64 * 10 + 10
    model = nnx.eval_shape(lambda: build("resnet(depth=20)", meta))
    assert n_params(model) == convs + norms + head == 269722


@pytest.mark.parametrize("plain, residual", [
    ("resnet(depth=56, residual=False)", "resnet(depth=56, residual=True)"),
    ("mlp(depth=200, norm='batch', residual=False)", "mlp(depth=200, norm='batch', residual=True)"),
])
def test_twins_have_the_same_layers_and_parameter_count(plain, residual):
    meta = IMAGE if plain.startswith("resnet") else Meta((64,), "float32", 10, 64, 16)
    a, b = (nnx.eval_shape(lambda s=s: build(s, meta)) for s in (plain, residual))
    shapes = lambda m: [(p, v.shape) for p, v in nnx.to_flat_state(param_tree(m))]  # noqa: E731
    assert shapes(a) == shapes(b)
    assert n_params(a) == n_params(b) and layout(a).names == layout(b).names


@pytest.mark.parametrize("plain, residual, meta", [
    (f"{RESNET}, residual=False)", f"{RESNET}, residual=True)", IMAGE),
    ("mlp(width=8, depth=3, residual=False)", "mlp(width=8, depth=3, residual=True)",
     Meta((8,), "float32", 3, 64, 16)),
])
def test_twins_initialize_identical_parameters(plain, residual, meta):
    flat_a, flat_b = (nnx.to_flat_state(param_tree(build(s, meta))) for s in (plain, residual))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, va), (_, vb) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(path))


def test_mlp_twins_differ_by_the_skip_exactly():
    meta = Meta((8,), "float32", 3, 64, 16)
    plain = build("mlp(width=8, depth=1, residual=False)", meta)
    residual = build("mlp(width=8, depth=1, residual=True)", meta)

    def first_block(model):
        graphdef, state = nnx.split(model.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

    h = jax.random.normal(jax.random.key(1), (5, 8))
    np.testing.assert_allclose(first_block(residual)(h) - first_block(plain)(h), h, atol=1e-6)


def test_resnet_twins_differ_only_by_the_shortcuts():
    """With the residual branches switched off (branch_scale=0) the residual net still carries the
    stem's features to the head through the shortcuts; the plain net carries nothing."""
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3)) * 255
    res = build(f"{RESNET}, residual=True, branch_scale=0.0)")
    plain = build(f"{RESNET}, residual=False, branch_scale=0.0)")
    stem = res.stem(x)
    w = stem.shape[-1]
    carried = jnp.pad(stem[:, ::4, ::4, :], ((0, 0), (0, 0), (0, 0), (0, 3 * w)))
    expected = res.head(carried.mean(axis=(1, 2)))
    np.testing.assert_allclose(res(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain(x), jnp.broadcast_to(plain.head.bias[...], (4, 10)))
    assert np.abs(np.asarray(res(x)) - np.asarray(plain(x))).max() > 1e-3


def test_twin_task_files_differ_only_in_the_residual_switch():
    for a, b in (("deep_plain", "deep_residual"), ("deep_plain_cifar", "deep_residual_cifar")):
        ca, cb = get_task(a).config, get_task(b).config
        assert ca["model"] == {**cb["model"], "residual": False} and cb["model"]["residual"]
        for section in ("dataset", "train", "target", "loss"):
            assert ca[section] == cb[section]
        assert "He et al. 2016" in ca["expect"] and ca["expect"] == cb["expect"]


@pytest.mark.parametrize("depth, bad", [(20, False), (56, False), (21, True), (2, True)])
def test_resnet_depth_must_be_6n_plus_2(depth, bad):
    from stabench.registry import UserError

    if bad:
        with pytest.raises(UserError, match="6n\\+2"):
            MODELS.get(f"resnet(depth={depth})")
    else:
        model = nnx.eval_shape(lambda: build(f"resnet(depth={depth})"))
        weight_layers = sum(v.shape[0] if p[0] in model.stacked_layers else 1
                            for p, v in nnx.to_flat_state(param_tree(model)) if p[-1] == "kernel")
        assert weight_layers == depth  # the convolutions and the head: 6n + 2


# ---- layer order ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, meta, names", [
    (f"{RESNET})", IMAGE, ["stem", "stage1[0]", "stage1[1]", "down2", "stage2[0]", "down3",
                                 "stage3[0]", "head"]),
    ("cnn(channels=[4, 8])", IMAGE, ["convs/0", "convs/1", "dense", "head"]),
    ("rnn(hidden=4)", Meta((7, 2), "float32", 1, 8, 8, "regression"),
     ["input", "recurrent", "head"]),
    (f"{TRANSFORMER})", TOKENS, ["embed", "blocks[0]", "blocks[1]", "final_norm", "head"]),
    ("mlp(depth=2, norm='layer')", Meta((5,), "float32", 2, 8, 8),
     ["input", "blocks[0]", "blocks[1]", "final_norm", "head"]),
])
def test_layers_reported_in_depth_order_with_activation_stds(spec, meta, names):
    model = build(spec, meta)
    lay = layout(model)
    assert lay.names == names
    if meta.vocab_size:
        x = jax.random.randint(jax.random.key(0), (4, *meta.x_shape), 1, meta.vocab_size)
    else:
        x = jax.random.normal(jax.random.key(0), (4, *meta.x_shape))
    stds = np.asarray(activation_stds(model, x, lay))
    assert stds.shape == (len(names),) and np.isfinite(stds).all() and (stds > 0).all()


def test_deep_mlp_reaches_depth_200_and_stays_finite_with_residual_scaling():
    meta = Meta((16,), "float32", 4, 8, 8)
    model = build("mlp(width=16, depth=200, residual=True, norm='layer', branch_scale=0.1)", meta)
    assert len(layout(model)) == 203
    out = model(jax.random.normal(jax.random.key(0), (3, 16)))
    assert out.shape == (3, 4) and np.isfinite(np.asarray(out)).all()


# ---- recurrences against a numpy reference ----------------------------------------------------
def _weights(model):
    get = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    return (get(model.input.kernel), get(model.input.bias), get(model.recurrent.kernel),
            get(model.head.kernel), get(model.head.bias))


def test_tanh_rnn_matches_its_recurrence():
    meta = Meta((9, 3), "float32", 2, 8, 8)
    model = build("rnn(hidden=5)", meta)
    x = np.random.default_rng(0).standard_normal((4, 9, 3))
    w_in, b_in, w_rec, w_out, b_out = _weights(model)
    h = np.zeros((4, 5))
    for t in range(9):
        h = np.tanh(x[:, t] @ w_in + b_in + h @ w_rec)
    np.testing.assert_allclose(model(jnp.asarray(x, jnp.float32)), h @ w_out + b_out, atol=1e-5)


def test_lstm_matches_its_recurrence():
    meta = Meta((6, 3), "float32", 2, 8, 8)
    model = build("lstm(hidden=4, forget_bias=1.0)", meta)
    x = np.random.default_rng(0).standard_normal((2, 6, 3))
    w_in, b_in, w_rec, w_out, b_out = _weights(model)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h, c = np.zeros((2, 4)), np.zeros((2, 4))
    for t in range(6):
        z = x[:, t] @ w_in + b_in + h @ w_rec
        i, f, g, o = np.split(z, 4, axis=-1)
        c = sig(f + 1.0) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
    np.testing.assert_allclose(model(jnp.asarray(x, jnp.float32)), h @ w_out + b_out, atol=1e-5)


# ---- transformer ------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_transformer_ignores_padding(qk_norm):
    model = build(f"{TRANSFORMER}, qk_norm={qk_norm})", TOKENS)
    x = jnp.array([[3, 5, 7, 2, 0, 0, 0, 0], [4, 4, 9, 1, 6, 11, 2, 0]])
    before = model(x)
    # the padding token's embedding and the padded positions can be anything
    model.embed.tokens.embedding[...] = model.embed.tokens.embedding[...].at[0].set(50.0)
    pos = model.embed.positions[...]
    model.embed.positions[...] = pos.at[7].set(-30.0)
    after = model(x)
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)
    np.testing.assert_allclose(after[1], before[1], atol=1e-5)
    assert np.abs(np.asarray(model(x.at[0, 1].set(8))) - np.asarray(after)).max() > 1e-4


def test_qk_norm_adds_one_layernorm_per_query_and_key():
    plain, normed = (nnx.eval_shape(lambda q=q: build(f"{TRANSFORMER}, qk_norm={q})", TOKENS))
                     for q in (False, True))
    head_dim = 4
    # blocks x (q, k) x (scale, bias)
    assert n_params(normed) - n_params(plain) == 2 * 2 * (2 * head_dim)


# ---- the canonical-layout convolution -----------------------------------------------------------
@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "SAME"), (2, "VALID"),
                                             (1, ((2, 0), (1, 1)))])
@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0)])
def test_conv_values_and_gradients_match_lax_under_vmap(stride, padding, axes):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 9, 9, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)), jnp.float32)
    x, k = (x if axes[0] == 0 else x[0]), (k if axes[1] == 0 else k[0])
    ref = lambda a, b: jax.lax.conv_general_dilated(a, b, (stride,) * 2, padding,  # noqa: E731
                                                    dimension_numbers=NHWC)
    ours = lambda a, b: conv_general_dilated(a, b, (stride,) * 2, padding,  # noqa: E731
                                             dimension_numbers=NHWC)
    out = jax.vmap(ref, in_axes=axes)(x, k)
    w = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    loss = lambda conv: lambda a, b: (jax.vmap(conv, in_axes=axes)(a, b) * w).sum()  # noqa: E731
    np.testing.assert_allclose(jax.jit(jax.vmap(ours, in_axes=axes))(x, k), out, atol=1e-4)
    for g_ref, g_ours in zip(jax.grad(loss(ref), (0, 1))(x, k),
                             jax.jit(jax.grad(loss(ours), (0, 1)))(x, k)):
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-4, rtol=1e-5)


# ---- the dense product with a transposed kernel gradient ----------------------------------------
@pytest.mark.parametrize("outputs", [1, 10, dense.FEW_OUTPUTS, dense.FEW_OUTPUTS + 1])
@pytest.mark.parametrize("x_shape", [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0)])
def test_dense_product_and_gradients_match_their_definition_under_vmap(outputs, x_shape, axes):
    """y = x @ k over the last axis of x; with loss sum(y * w): dx = w k^T, dk = sum x^T w over
    every leading axis, computed here in float64."""
    rng = np.random.default_rng(0)
    runs = 2
    x = rng.standard_normal((runs, *x_shape)).astype(np.float32)
    k = rng.standard_normal((runs, x_shape[-1], outputs)).astype(np.float32)
    w = rng.standard_normal((runs, *x_shape[:-1], outputs)).astype(np.float32)
    x, k = (x if axes[0] == 0 else x[:1]), (k if axes[1] == 0 else k[:1])
    dims = (((len(x_shape) - 1,), (0,)), ((), ()))

    def loss(a, b):
        product = lambda a, b: dense.dot_general(a, b, dims)  # noqa: E731
        return (jax.vmap(product, in_axes=axes)(a, b) * w).sum()

    args = (x if axes[0] == 0 else x[0], k if axes[1] == 0 else k[0])
    value, (dx, dk) = jax.jit(jax.value_and_grad(loss, (0, 1)))(*args)
    x64, k64, w64 = (np.broadcast_to(a, (runs, *a.shape[1:])).astype(np.float64) for a in (x, k, w))
    np.testing.assert_allclose(value, (np.einsum("r...i,rio->r...o", x64, k64) * w64).sum(),
                               rtol=1e-5)
    dx_ref = np.einsum("r...o,rio->r...i", w64, k64)
    dk_ref = np.einsum("rbi,rbo->rio", x64.reshape(runs, -1, x_shape[-1]),
                       w64.reshape(runs, -1, outputs))  # summed over every leading axis
    np.testing.assert_allclose(dx, dx_ref if axes[0] == 0 else dx_ref.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, dk_ref if axes[1] == 0 else dk_ref.sum(0), rtol=1e-5, atol=1e-5)


# ---- batch norm in the engine -----------------------------------------------------------------
def test_batch_statistics_update_in_training_and_serve_evaluation(digits_data):
    spec = make_spec("deep_residual", "none", seeds=1, lrs=(0.05,),
                     overrides={"model.depth": 2, "model.width": 16, "train.steps": 2,
                                "train.eval_every": 1, "train.batch_size": 32})
    engine = Engine(build_cell(spec, data_source(task_of(spec))), digits_data)
    seeds, lrs = np.array([0], np.int32), np.array([0.05], np.float32)
    init, chunk, _ = engine.compile(*jax.device_put((seeds, lrs)))
    idx = engine.batch_indices(seeds, 0)
    carry0 = init(seeds, lrs, idx[:, 0], engine.arrays)
    params0, rest0 = jax.device_get((carry0.params, carry0.model_state))
    carry, _, ev = chunk(carry0, idx, lrs, np.int32(0), engine.arrays)
    rest = jax.device_get(carry.model_state)

    # one step of momentum 0.9: running mean = 0.1 x the batch mean of the first norm's input,
    # computed with the parameters before the update
    x = digits_data.x_train[idx[0, 0]]
    lin = params0["input"]
    h = x @ np.asarray(lin["kernel"].get_value())[0] + np.asarray(lin["bias"].get_value())[0]
    mean = np.asarray(rest["blocks"]["norm"]["mean"].get_value())[0, 0]
    np.testing.assert_allclose(mean, 0.1 * h.mean(0), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(rest0["blocks"]["norm"]["mean"].get_value()) == 0)

    # evaluation uses the running averages, not the test batch's own statistics
    one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a[0]), tree)  # noqa: E731
    model = nnx.merge(engine.program.graphdef, one(jax.device_get(carry.params)), one(rest))
    xt, yt = digits_data.x_test, digits_data.y_test
    loss = lambda m: float(optax_ce(m(xt), yt))  # noqa: E731
    model.eval()
    assert float(ev["test_loss"][0]) == pytest.approx(loss(model), rel=1e-5)
    model.train()
    assert abs(loss(model) - float(ev["test_loss"][0])) > 1e-3


def optax_ce(logits, labels):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

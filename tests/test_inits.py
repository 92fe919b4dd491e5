"""Each init against its definition: variances on large layers, orthogonality, residual blocks
that start as the identity, LSUV's unit output variance on its calibration batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stabench.config import build_cell, data_source, task_of
from stabench.data import Meta
from stabench.inits import INITS
from stabench.models import MODELS, LayerLayout, activation_stds
from stabench.registry import UserError

from conftest import RESIDUAL, catalog_spec, covers, engine_for

FAN_IN, FAN_OUT = 400, 600
VARIANCE = {  # theory for a (fan_in, fan_out) kernel
    "lecun_normal": 1 / FAN_IN,
    "glorot_uniform": 2 / (FAN_IN + FAN_OUT),
    "glorot_normal": 2 / (FAN_IN + FAN_OUT),
    "he_normal": 2 / FAN_IN,
    "he_uniform": 2 / FAN_IN,
    "normal(std=0.03)": 0.03 ** 2,
    "uniform(scale=0.2)": 0.2 ** 2 / 3,
}


@covers("init", "lecun_normal", "glorot_uniform", "glorot_normal", "he_normal", "he_uniform",
        "normal", "uniform")
@pytest.mark.parametrize("spec", sorted(VARIANCE))
def test_variance_matches_the_fan_formula(spec):
    w = np.asarray(INITS.get(spec).kernel_init(jax.random.key(0), (FAN_IN, FAN_OUT)), np.float64)
    assert w.var() == pytest.approx(VARIANCE[spec], rel=0.05)
    assert abs(w.mean()) < 0.05 * w.std()
    if spec.startswith("uniform"):
        assert np.abs(w).max() <= 0.2 and w.min() < -0.19  # symmetric U(-scale, scale)


def model_with(spec, x=None):
    """A cell's model built as the engine builds it (init hook included, on batch x)."""
    cell = build_cell(spec, data_source(task_of(spec)))
    model = cell.build_model(nnx.Rngs(0))
    if cell.after_init is not None:
        cell.after_init(model, x)
    return model


@covers("init", "default")
def test_default_keeps_flax_lecun_normal_kernels_and_zero_biases():
    model = model_with(catalog_spec(**{"model.width": 512, "model.depth": 2}))
    kernel = np.asarray(model.blocks.linear.kernel[...])  # [depth, 512, 512]
    assert kernel.var() == pytest.approx(1 / 512, rel=0.05)
    assert not np.asarray(model.blocks.linear.bias[...]).any()
    # the init reaches every layer of the stack: he_normal doubles the variance
    he = model_with(catalog_spec(init="he_normal", **{"model.width": 512, "model.depth": 2}))
    assert np.asarray(he.blocks.linear.kernel[...]).var() == pytest.approx(2 / 512, rel=0.05)


@covers("init", "orthogonal")
def test_orthogonal_gives_gain_squared_identity():
    w = np.asarray(INITS.get("orthogonal(gain=1.7)").kernel_init(jax.random.key(0), (512, 256)),
                   np.float64)
    np.testing.assert_allclose(w.T @ w, 1.7 ** 2 * np.eye(256), atol=1e-5)
    model = model_with(catalog_spec(init="orthogonal", **{"model.depth": 3}))
    for k in np.asarray(model.blocks.linear.kernel[...], np.float64):  # each layer of the stack
        np.testing.assert_allclose(k.T @ k, np.eye(16), atol=1e-5)


@covers("init", "delta_orthogonal")
@pytest.mark.parametrize("shape", [(3, 3, 64, 128), (5, 32, 32), (64, 64)])
def test_delta_orthogonal_has_only_an_orthogonal_centre_tap(shape):
    w = np.asarray(INITS.get("delta_orthogonal(gain=2.0)").kernel_init(jax.random.key(0), shape),
                   np.float64)
    centre = tuple((k - 1) // 2 for k in shape[:-2])
    tap = w[centre]
    if centre:  # a convolution: every tap but the centre is zero
        others = w.copy()
        others[centre] = 0.0
        assert not others.any()
    np.testing.assert_allclose(tap @ tap.T, 4.0 * np.eye(shape[-2]), atol=1e-5)


def assert_blocks_are_identity(model, depth):
    graphdef, state = nnx.split(model.blocks)
    h = jax.random.normal(jax.random.key(3), (32, model.input.out_features))
    for i in range(depth):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        np.testing.assert_array_equal(block(h), h)


@covers("init", "fixup")
def test_fixup_starts_every_block_as_the_identity_with_a_zero_classifier():
    model = model_with(catalog_spec(init="fixup", residual=True))
    assert_blocks_are_identity(model, RESIDUAL["model.depth"])
    assert not np.asarray(model.head.kernel[...]).any()
    assert np.asarray(model.input.kernel[...]).any()


class TwoLayerBlock(nnx.Module):
    branches = (("fc1", "fc2"),)

    def __init__(self, width, kernel_init, rngs):
        self.fc1 = nnx.Linear(width, width, kernel_init=kernel_init, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, h):
        return h + self.fc2(jax.nn.relu(self.fc1(h)))


class ThreeBlockNet(nnx.Module):
    """The residual protocol with m = 2 layers per branch and L = 3 branches."""

    layer_order = ("b0", "b1", "b2", "head")
    residual_parts = ("b0", "b1", "b2")

    def __init__(self, kernel_init, rngs):
        for name in self.residual_parts:
            setattr(self, name, TwoLayerBlock(8, kernel_init, rngs))
        self.head = nnx.Linear(8, 3, kernel_init=kernel_init, rngs=rngs)


@covers("init", "fixup")
def test_fixup_scales_inner_branch_layers_by_depth_to_the_minus_one_over_2m_minus_2():
    init = INITS.get("fixup")
    model = ThreeBlockNet(init.kernel_init, nnx.Rngs(0))
    before = {n: np.asarray(getattr(model, n).fc1.kernel[...]) for n in model.residual_parts}
    init.check(model)
    init.after(model, None)
    h = jax.random.normal(jax.random.key(1), (4, 8))
    for name in model.residual_parts:
        block = getattr(model, name)
        np.testing.assert_allclose(block.fc1.kernel[...], before[name] * 3 ** -0.5, rtol=1e-6)
        assert not np.asarray(block.fc2.kernel[...]).any()
        np.testing.assert_array_equal(block(h), h)
    assert not np.asarray(model.head.kernel[...]).any()


@covers("init", "skipinit", "rezero")
@pytest.mark.parametrize("name", ["skipinit", "rezero"])
def test_zero_branch_gain_makes_blocks_the_identity_and_is_learnable(name, digits_data):
    spec = catalog_spec(init=name, residual=True)
    model = model_with(spec)
    depth = RESIDUAL["model.depth"]
    np.testing.assert_array_equal(model.blocks.branch_gain[...], np.zeros(depth))
    assert_blocks_are_identity(model, depth)
    grads = init_grads(model, digits_data.x_train[:64])
    assert np.abs(np.asarray(grads["blocks"]["branch_gain"][...])).min() > 0


def init_grads(model, x):
    """The gradient of a cross-entropy loss (every label 0) at the model's initial parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(x))
        return jax.nn.logsumexp(logits, -1).mean() - logits[:, 0].mean()

    return jax.grad(loss)(params)


@covers("init", "zero_init_residual")
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_zero_init_residual_zeroes_the_last_layer_of_a_pre_activation_branch(norm, digits_data):
    """The MLP's blocks are h + linear(relu(norm(h))): zeroing the norm's scale there would give
    relu(0) = 0 and no gradient to any layer of the branch, ever; zeroing `linear` starts the block
    as the identity and the branch still learns."""
    depth = RESIDUAL["model.depth"]
    model = model_with(catalog_spec(init="zero_init_residual", residual=True,
                                    **{"model.norm": norm}))
    assert not np.asarray(model.blocks.linear.kernel[...]).any()
    if norm == "layer":
        np.testing.assert_array_equal(model.blocks.norm.scale[...], 1.0)
    assert_blocks_are_identity(model, depth)
    kernel_grads = np.asarray(init_grads(model, digits_data.x_train[:64])["blocks"]["linear"]
                              ["kernel"][...])
    assert (np.abs(kernel_grads).reshape(depth, -1).max(axis=1) > 0).all()


IMAGE = Meta(x_shape=(8, 8, 3), x_dtype="uint8", num_outputs=10, n_train=64, n_test=16)
TOKENS = Meta((8,), "int32", 3, 8, 8, vocab_size=12)
RESNET = "resnet(depth=14, width=4"  # n = 2: 6 residual blocks (two of them downsample)


def built(model_spec, init_name, meta=IMAGE):
    """The model as a cell builds it: the init's kernels, its structure check and its hook."""
    init = INITS.get(init_name)
    model = MODELS.get(model_spec)(meta, init.kernel_init, nnx.Rngs(0))
    init.check(model)
    if init.after is not None:
        init.after(model, None)
    return model


def resnet_blocks(model):
    """(block, input) for every residual block of a ResNet, each fed a non-negative input (the
    output of a ReLU) of its width."""
    out = []
    for part in ("stage1", "down2", "stage2", "down3", "stage3"):
        module = getattr(model, part)
        graphdef, state = nnx.split(module)
        stacked = part in model.stacked_layers
        for i in range(jax.tree.leaves(state)[0].shape[0] if stacked else 1):
            block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) if stacked else module
            width = block.conv1.in_features
            h = jax.nn.relu(jax.random.normal(jax.random.key(i), (2, 8, 8, width)))
            out.append((block, h))
    return out


@covers("init", "zero_init_residual")
def test_zero_init_residual_zeroes_the_last_norm_scale_of_a_resnet_block():
    """Goyal et al.: each post-activation block relu(x + norm2(conv2(...))) starts as its
    shortcut, with conv2 intact so that the scale learns."""
    model = built(RESNET + ")", "zero_init_residual")
    blocks = resnet_blocks(model)
    assert len(blocks) == 6
    for block, h in blocks:
        assert not np.asarray(block.norm2.scale[...]).any()
        assert np.asarray(block.conv2.kernel[...]).any()
        np.testing.assert_array_equal(block(h), block.shortcut(h))


@covers("init", "fixup")
def test_fixup_on_a_resnet_scales_conv1_by_the_inverse_square_root_of_its_blocks():
    """Zhang et al.'s own setting: a ResNet without normalization, m = 2 layers per branch, L = 6
    branches: conv1 x 6^(-1/2), conv2 and the classifier zeroed."""
    spec = RESNET + ", norm='none')"
    plain = MODELS.get(spec)(IMAGE, INITS.get("fixup").kernel_init, nnx.Rngs(0))
    before = [np.asarray(block.conv1.kernel[...]) for block, _ in resnet_blocks(plain)]
    model = built(spec, "fixup")
    for (block, h), kernel in zip(resnet_blocks(model), before, strict=True):
        np.testing.assert_allclose(block.conv1.kernel[...], kernel * 6 ** -0.5, rtol=1e-6)
        assert not np.asarray(block.conv2.kernel[...]).any()
        np.testing.assert_array_equal(block(h), block.shortcut(h))
    assert not np.asarray(model.head.kernel[...]).any()
    with pytest.raises(UserError, match="fixup.*end in a norm layer.*model.norm=none"):
        built(RESNET + ")", "fixup")


@covers("init", "skipinit", "rezero", "zero_init_residual")
@pytest.mark.parametrize("name", ["skipinit", "rezero", "zero_init_residual"])
def test_transformer_blocks_start_as_the_identity(name):
    gain = ", branch_gain=0.0" if name != "zero_init_residual" else ""
    model = built(f"transformer(dim=8, depth=2, heads=2{gain})", name, TOKENS)
    graphdef, state = nnx.split(model.blocks)
    h = jax.random.normal(jax.random.key(0), (2, 8, 8))
    mask = jnp.ones((2, 8), bool)
    for i in range(2):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        np.testing.assert_array_equal(block(h, mask), h)
        if name == "zero_init_residual":
            assert not np.asarray(block.out.kernel[...]).any()
            assert not np.asarray(block.mlp_out.kernel[...]).any()
    with pytest.raises(UserError, match="fixup.*one residual branch.*have 2"):
        built("transformer(dim=8, depth=2, heads=2)", "fixup", TOKENS)


@covers("init", "skipinit", "rezero")
def test_resnet_branch_gain_at_zero_makes_its_blocks_their_shortcuts():
    model = built(RESNET + ", branch_gain=0.0)", "skipinit")
    for block, h in resnet_blocks(model):
        assert block.branch_gain[...].shape == ()
        np.testing.assert_array_equal(block(h), block.shortcut(h))


@pytest.mark.parametrize("name", sorted(["fixup", "skipinit", "rezero", "zero_init_residual"]))
def test_residual_inits_need_residual_blocks(name):
    with pytest.raises(UserError) as err:
        catalog_spec(init=name)
    assert str(err.value) == (f"init '{name}' needs residual blocks; this MLP has none (e.g. set "
                              "model.residual=true)")
    with pytest.raises(UserError, match=f"init '{name}' needs residual blocks; this ResNet"):
        built(RESNET + ", residual=False)", name)


def test_lsuv_calibrates_a_plain_resnet_whose_blocks_hold_two_convolutions():
    """Scaling both kernels of a block by s scales its output by s^2: LSUV takes the square root
    of its correction there, or it overshoots to 1/std and back forever."""
    init = INITS.get("lsuv")
    model = MODELS.get("resnet(depth=8, width=8, residual=False, norm='none')")(
        IMAGE, init.kernel_init, nnx.Rngs(0))
    init.check(model)
    x = jax.random.normal(jax.random.key(1), (32, *IMAGE.x_shape))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    layout = LayerLayout(params, model.layer_order, model.stacked_layers)
    assert layout.leaf_counts(params).tolist() == [1, 2, 2, 2, 1]  # stem, 3 blocks, head
    assert not np.allclose(activation_stds(model, x, layout), 1.0, atol=0.1)
    init.after(model, x)
    np.testing.assert_allclose(activation_stds(model, x, layout) ** 2, 1.0, atol=0.01)
    with pytest.raises(UserError, match="lsuv.*normalization layer undoes.*model.norm=none"):
        built("resnet(depth=8, width=8, residual=False)", "lsuv")  # batch norm by default


@covers("init", "lsuv")
@pytest.mark.slow
def test_lsuv_gives_unit_output_variance_on_its_calibration_batch(digits_data):
    spec = catalog_spec(init="lsuv", **{"model.depth": 4, "model.width": 64})
    engine = engine_for(spec, digits_data)
    seeds = np.array([0, 1], np.int32)
    first = engine.batch_indices(seeds, 0)[:, 0]
    init = jax.jit(jax.vmap(engine.program.init_run, in_axes=(0, 0, 0, None)))  # as the engine's
    carry = init(seeds, np.full(2, 0.05, np.float32), first, engine.arrays)
    for run in range(2):
        params, state = jax.tree.map(lambda a: a[run], (carry.params, carry.model_state))
        model = nnx.merge(engine.program.graphdef, params, state)
        stds = np.asarray(activation_stds(model, jnp.asarray(digits_data.x_train[first[run]]),
                                          engine.layout))
        assert len(stds) == 6 and np.isfinite(stds).all()  # input, 4 blocks, head
        np.testing.assert_allclose(stds ** 2, 1.0, atol=0.05)
    with pytest.raises(UserError, match="lsuv.*residual blocks"):
        catalog_spec(init="lsuv", residual=True)
    for model in ("rnn", "lstm"):  # a tanh-bounded hidden state never reaches unit variance
        with pytest.raises(UserError, match="lsuv.*Recurrent's recurrent output is bounded"):
            built(model, "lsuv", TOKENS)
    with pytest.raises(UserError, match="lsuv.*residual blocks"):
        built("transformer(dim=8, depth=2, heads=2)", "lsuv", TOKENS)

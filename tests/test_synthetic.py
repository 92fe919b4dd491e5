"""Generated tasks against their definitions."""

import numpy as np
import pytest

from stabench.data import DATASETS, synthetic
from stabench.registry import UserError


def test_adding_constant_prediction_scores_one_sixth():
    x, y = synthetic.adding_examples(np.random.default_rng(1), 20000, 50)
    assert x.shape == (20000, 50, 2) and x.dtype == np.float32
    markers = x[..., 1]
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :25].sum(1) == 1).all() and (markers[:, 25:].sum(1) == 1).all()
    np.testing.assert_allclose(y, (x[..., 0] * markers).sum(1), rtol=1e-6)
    assert np.mean((y - 1.0) ** 2) == pytest.approx(1 / 6, abs=0.01)


def test_temporal_order_classes_balanced_and_decided_by_the_two_symbols():
    T = 60
    x, y = synthetic.temporal_order_examples(np.random.default_rng(2), 20000, T)
    assert x.shape == (20000, T, 6) and (x.sum(-1) == 1).all()  # one-hot
    shares = np.bincount(y, minlength=4) / len(y)
    assert np.all(np.abs(shares - 0.25) < 0.02), shares
    symbols = x.argmax(-1)
    informative = symbols >= synthetic.X_SYMBOL
    assert (informative.sum(1) == 2).all()
    pos = np.sort(np.argwhere(informative)[:, 1].reshape(-1, 2), axis=1)
    assert (pos[:, 0] >= 0.1 * T).all() and (pos[:, 0] < 0.2 * T).all()
    assert (pos[:, 1] >= 0.5 * T).all() and (pos[:, 1] < 0.6 * T).all()
    rows = np.arange(len(y))
    first = symbols[rows, pos[:, 0]] - synthetic.X_SYMBOL
    second = symbols[rows, pos[:, 1]] - synthetic.X_SYMBOL
    np.testing.assert_array_equal(y, 2 * first + second)


def _python_value(tokens):
    """A second, independent reading: the tokens as a Python expression."""
    funcs = {"[MIN": "min", "[MAX": "max", "[MED": "med", "[SM": "sm"}
    text = ""
    for tok in tokens:
        if tok in funcs:
            text += f"{funcs[tok]}(["
        elif tok == "]":
            text += "]),"
        else:
            text += tok + ","
    env = {"min": min, "max": max, "sm": lambda a: sum(a) % 10,
           "med": lambda a: int(sorted(a)[len(a) // 2] if len(a) % 2
                                else (sorted(a)[len(a) // 2 - 1] + sorted(a)[len(a) // 2]) // 2)}
    return eval(text.rstrip(","), env)  # noqa: S307  (tokens from our own generator)


def test_listops_labels_match_reference_evaluators_on_1000_expressions():
    exprs = synthetic.listops_expressions(np.random.default_rng(3), 1000, max_depth=5,
                                          max_args=10, min_length=5, max_length=256)
    assert len({" ".join(t) for t, _ in exprs}) == 1000  # distinct
    for tokens, value in exprs:
        assert 5 <= len(tokens) <= 256
        assert synthetic.evaluate_listops(tokens) == value
        assert _python_value(tokens) == value
    values = np.array([v for _, v in exprs])
    assert set(values) == set(range(10))


@pytest.mark.parametrize("tokens, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[SM 5 6 [MAX 1 2 ] ]", 3),
    ("[MED 1 2 3 4 ]", 2),  # median 2.5, truncated as in Long Range Arena
    ("[MIN [SM 9 9 ] [MED 7 1 5 ] ]", 5),
])
def test_listops_evaluator_known_values(tokens, value):
    assert synthetic.evaluate_listops(tokens.split()) == value


def test_listops_dataset_tokens_decode_to_their_labels():
    data = DATASETS.get("listops(n_train=200, n_test=50, max_length=128)").load(None)
    assert data.x_train.shape == (200, 128) and data.x_train.dtype == np.int32
    vocab = synthetic.LISTOPS_VOCAB
    for row, label in zip(data.x_train[:100], data.y_train[:100]):
        tokens = [vocab[i] for i in row if i != 0]
        assert synthetic.evaluate_listops(tokens) == label
    train = {r.tobytes() for r in data.x_train}
    assert not any(r.tobytes() in train for r in data.x_test)  # no test expression seen in training


def test_teacher_targets_standardized_and_learnable_by_the_teacher_form():
    data = DATASETS.get("teacher(n_train=4096, n_test=512, outputs=2)").load(None)
    assert data.y_train.shape == (4096, 2)
    np.testing.assert_allclose(data.y_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(data.y_train.std(0), 1, atol=1e-4)
    # a deterministic function of x: a linear fit explains part of it, not all (tanh layers)
    x = np.c_[data.x_train, np.ones(len(data.x_train))]
    coef, *_ = np.linalg.lstsq(x, data.y_train, rcond=None)
    r2 = 1 - np.mean((x @ coef - data.y_train) ** 2)
    assert 0.2 < r2 < 0.99


@pytest.mark.parametrize("spec", ["adding(T=30)", "temporal_order(T=30)", "listops(n_train=50)",
                                  "teacher(n_train=100)"])
def test_generators_are_deterministic_and_match_their_meta(spec):
    source = DATASETS.get(spec)
    a, b = source.load(None), source.load(None)
    for split in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    meta = source.meta
    assert a.x_train.shape == (meta.n_train, *meta.x_shape)
    assert a.x_test.shape == (meta.n_test, *meta.x_shape)
    assert a.y_train.shape == (meta.n_train, *meta.y_shape)
    assert source.availability() == "generated"
    seeded = DATASETS.get(spec[:-1] + ", seed=1)").load(None)
    assert not np.array_equal(seeded.x_train, a.x_train)


@pytest.mark.parametrize("spec, message", [
    ("adding(T=1)", "T must be at least 2"),
    ("temporal_order(T=5)", "T must be at least 10"),
    ("listops(min_length=300)", "min_length <= max_length"),
    ("listops(min_length=3, max_length=3)", "max_length must be at least 4"),
    ("listops(max_depth=2)", r"max_depth=2 and max_args=10 has 12 tokens, fewer than "
                             "min_length=16"),
    ("teacher(noise=-1.0)", "noise must be non-negative"),
    ("adding(n_train=0)", "must be positive"),
])
def test_bad_generator_arguments_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        DATASETS.get(spec)


def test_listops_lengths_reach_the_longest_expression_and_no_further():
    assert synthetic.listops_longest(max_depth=2, max_args=10) == 12  # [OP + 10 values + ]
    assert synthetic.listops_longest(max_depth=3, max_args=2) == 2 + 2 * 4
    longest = synthetic.listops_longest(3, 3)
    exprs = synthetic.listops_expressions(np.random.default_rng(0), 40, max_depth=3, max_args=3,
                                          min_length=longest, max_length=longest)
    assert {len(tokens) for tokens, _ in exprs} == {longest}


def test_listops_settings_with_too_few_distinct_expressions_fail_instead_of_looping():
    # two arguments at depth 2: 4 operators x 10 x 10 values = 400 expressions of 4 tokens
    source = DATASETS.get("listops(max_depth=2, max_args=2, min_length=4, max_length=4, "
                          "n_train=395, n_test=5)")
    assert len(source.load(None).x_train) == 395
    with pytest.raises(ValueError, match="found only 400 of 401 distinct expressions"):
        DATASETS.get("listops(max_depth=2, max_args=2, min_length=4, max_length=4, n_train=396, "
                     "n_test=5)").load(None)

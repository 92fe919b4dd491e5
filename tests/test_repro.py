"""The reproduction scripts: each one's tiny version writes its report and figure, and the verdict
in the report is what its checks compute from the table the report shows. The checks themselves are
tested on hand-made tables where the claim clearly holds or clearly fails."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import stabench

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import _repro  # noqa: E402
import repro_he2015_init  # noqa: E402
import repro_he2016_depth  # noqa: E402
import repro_pascanu  # noqa: E402
import repro_wortsman  # noqa: E402

# module, rows of its tiny table, cells of its tiny run
SCRIPTS = {"pascanu": (repro_pascanu, 4, 4), "he2016": (repro_he2016_depth, 4, 4),
           "he2015": (repro_he2015_init, 3, 3), "wortsman": (repro_wortsman, 7, 4)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_tiny_run_writes_a_report_whose_verdict_follows_from_its_table(name, tmp_path):
    module, rows, cells = SCRIPTS[name]
    held = module.main(["--tiny", "--out", str(tmp_path)])
    text = (tmp_path / f"{module.NAME}.md").read_text()
    png = (tmp_path / f"{module.NAME}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert f"![{module.NAME}]({module.NAME}.png)" in text
    assert f"`python scripts/{module.__name__}.py --tiny`" in text
    table = _repro.parse_markdown_table(text, _repro.TABLE_HEADING)
    assert len(table) == rows
    checks = module.evaluate(table)  # recomputed from the numbers as printed
    for c in checks:
        assert f"- [{'x' if c.held else ' '}] {c.text}" in text
    assert _repro.read_verdict(text) == all(c.held for c in checks) == held
    for line in ("- Wall time: ", "- Hardware: ", "- Versions: python "):
        assert line in text
    # a second run reuses every stored cell
    module.main(["--tiny", "--out", str(tmp_path)])
    assert f"{cells} cells, 0 trained now" in (tmp_path / f"{module.NAME}.md").read_text()


def test_markdown_table_round_trip():
    df = pd.DataFrame({"a": ["x", "y"], "n": [3, 40], "v": [0.1234567, float("inf")],
                       "p": [float("nan"), 1e-7], "ok": [True, False]})
    back = _repro.parse_markdown_table(f"## T\n\n{_repro.to_markdown(df)}\n\nafter", "## T")
    assert list(back.columns) == list(df.columns)
    assert back["a"].tolist() == ["x", "y"] and back["n"].tolist() == [3, 40]
    assert back["v"].tolist() == [0.1235, float("inf")]
    assert pd.isna(back["p"][0]) and back["p"][1] == 1e-7
    assert back["ok"].tolist() == [True, False]


def test_verdict_is_held_only_below_alpha():
    assert _repro.verdict_of(0.049) == _repro.HELD
    for p in (0.05, 0.3, float("nan")):
        assert _repro.verdict_of(p) == _repro.NOT_REPRODUCED
    assert _repro.as_printed(0.0499996) == 0.05  # the verdict reads the p-value as printed


def fisher_tail(k1, n1, k2, n2):
    """P(first group gets >= k1 of the k1 + k2 events) given the margins: the hypergeometric
    tail, from its definition."""
    k, n = k1 + k2, n1 + n2
    return sum(math.comb(n1, i) * math.comb(n2, k - i) for i in range(k1, min(k, n1) + 1)) \
        / math.comb(n, k)


def welch_lower(a, b):
    """One-sided Welch p-value that mean(a) < mean(b), from the t statistic and the
    Welch-Satterthwaite degrees of freedom."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return stats.t.cdf(t, df)


@pytest.mark.parametrize("k1,n1,k2,n2", [(1, 20, 0, 20), (12, 40, 2, 40), (0, 10, 5, 10)])
def test_one_sided_tests_follow_their_definitions(k1, n1, k2, n2):
    assert _repro.fisher_greater(k1, n1, k2, n2) == pytest.approx(fisher_tail(k1, n1, k2, n2))
    rng = np.random.default_rng(k1)
    a, b = rng.normal(0, 1, n1), rng.normal(0.5, 2, n2)
    assert _repro.welch_less(a, b) == pytest.approx(welch_lower(a, b))
    assert math.isnan(_repro.welch_less([1.0, 1.0], [2.0, 2.0]))  # no variance: no test


def pascanu_table(successes, diverged, runs=10, lrs=(0.1, 0.3, 1.0)):
    """A per-learning-rate table: successes[method] and diverged[method] per lr."""
    return pd.DataFrame([{"problem": "temporal_order", "T": 50, "method": method, "lr": lr,
                          "runs": runs, "successes": successes[method][i],
                          "diverged": diverged[method][i]}
                         for method in ("plain SGD", "clip_norm(1)") for i, lr in enumerate(lrs)])


def test_pascanu_verdicts_follow_one_sided_fisher_tests():
    # clipping succeeds at every rate and never diverges; plain SGD the opposite: held
    tests = repro_pascanu.tests_from(pascanu_table(
        {"clip_norm(1)": [8, 7, 6], "plain SGD": [1, 0, 0]},
        {"clip_norm(1)": [0, 0, 0], "plain SGD": [0, 10, 10]}))
    assert tests["verdict"].tolist() == [_repro.HELD] * 2
    assert tests["p"].tolist() == [_repro.as_printed(fisher_tail(21, 30, 1, 30)),
                                   _repro.as_printed(fisher_tail(20, 30, 0, 30))]
    assert [c.held for c in repro_pascanu.evaluate(tests)] == [True, True]
    # one success in 10 seeds against none, as the earlier 5-seed run read "held": not here
    tests = repro_pascanu.tests_from(pascanu_table(
        {"clip_norm(1)": [1, 0, 0], "plain SGD": [0, 0, 0]},
        {"clip_norm(1)": [0, 0, 10], "plain SGD": [0, 4, 10]}))
    assert tests["verdict"].tolist() == [_repro.NOT_REPRODUCED] * 2
    assert tests["p"].tolist() == [_repro.as_printed(fisher_tail(1, 30, 0, 30)),
                                   _repro.as_printed(fisher_tail(14, 30, 10, 30))]
    assert "clipped 1/30 [" in tests["a"][0] and "plain 0/30 [" in tests["b"][0]
    assert [c.held for c in repro_pascanu.evaluate(tests)] == [False, False]


def depth_table(plain_loss, res_loss, p_pr, p_shallow_plain, p_shallow_res):
    rows = []
    for model, losses, p_shallow in [("plain", plain_loss, p_shallow_plain),
                                     ("residual", res_loss, p_shallow_res)]:
        for i, (depth, loss) in enumerate(zip((8, 20, 56), losses)):
            rows.append({"model": model, "depth": depth, "train loss": loss,
                         "p plain vs residual": p_pr[i],
                         "p vs shallowest": float("nan") if i == 0 else p_shallow[i - 1]})
    return pd.DataFrame(rows)


def test_he2016_checks():
    nan = float("nan")
    degrading = depth_table([0.01, 0.1, 2.0], [0.01, 0.01, 0.012], [0.5, 0.01, 1e-5],
                            [0.02, 1e-4], [0.9, 0.4])
    assert [c.held for c in repro_he2016_depth.evaluate(degrading)] == [True, True, True]
    # plain improves with depth; residual degrades significantly
    flat = depth_table([0.1, 0.05, 0.01], [0.01, 0.1, 0.5], [nan, 0.5, 0.5],
                       [0.2, 0.01], [0.01, 0.001])
    assert [c.held for c in repro_he2016_depth.evaluate(flat)] == [False, False, False]


def test_he2015_checks():
    table = pd.DataFrame({"init": ["He", "Glorot", "normal(0.01)"],
                          "loss removed": [0.9, 0.05, 0.0]})
    assert [c.held for c in repro_he2015_init.evaluate(table)] == [True, True]
    table["loss removed"] = [0.3, 0.05, 0.2]
    assert [c.held for c in repro_he2015_init.evaluate(table)] == [False, False]


def wortsman_per_seed(sensitivity, logits, seeds=10, spread=0.02):
    """Per-seed rows: sensitivity[(warmup, qk)] and logits[(warmup, qk)] = (low lr, high lr)
    centres, seeds spread evenly around them."""
    rows = []
    for (warm, qk), centre in sensitivity.items():
        for s in range(seeds):
            jitter = spread * (s - (seeds - 1) / 2)
            rows.append({"warmup": warm, "qk_norm": qk, "seed": s,
                         "sensitivity": centre + jitter,
                         "log_logit_low": logits[warm, qk][0] + jitter,
                         "log_logit_high": logits[warm, qk][1] + jitter})
    return pd.DataFrame(rows)


VARIANTS = [("no", "no"), ("no", "yes"), ("yes", "no"), ("yes", "yes")]


def test_wortsman_verdicts_follow_one_sided_welch_tests():
    # the paper's picture: each fix lowers sensitivity; logits grow with lr unless qk-normed
    clear = wortsman_per_seed(dict(zip(VARIANTS, [0.4, 0.2, 0.2, 0.1])),
                              dict(zip(VARIANTS, [(0.5, 3.0), (0.5, 1.0), (0.5, 2.5),
                                                  (0.5, 1.0)])))
    tests = repro_wortsman.tests_from(clear, top_lr=0.3, low_lr=0.001)
    assert tests["verdict"].tolist() == [_repro.HELD] * 7
    assert [c.held for c in repro_wortsman.evaluate(tests)] == [True] * 7
    # the first test compares warmup's seeds with no warmup's, both without qk_norm
    sel = lambda w, q: clear.loc[(clear["warmup"] == w) & (clear["qk_norm"] == q),  # noqa: E731
                                 "sensitivity"]
    assert tests["p"][0] == _repro.as_printed(welch_lower(sel("yes", "no"), sel("no", "no")))
    # the earlier 2-seed reading: differences within the seed scatter, qk_norm raising the
    # logit: nothing held
    noisy = wortsman_per_seed(dict(zip(VARIANTS, [0.32, 0.30, 0.31, 0.33])),
                              dict(zip(VARIANTS, [(0.5, 0.5), (0.5, 0.9), (0.5, 0.5),
                                                  (0.5, 0.9)])), spread=0.05)
    tests = repro_wortsman.tests_from(noisy, top_lr=0.3, low_lr=0.001)
    assert tests["verdict"].tolist() == [_repro.NOT_REPRODUCED] * 7
    assert not any(c.held for c in repro_wortsman.evaluate(tests))


def test_wortsman_per_seed_sensitivity_uses_each_seeds_own_grid():
    runs = pd.DataFrame({"warmup": "no", "qk_norm": "no", "seed": [0, 0, 1, 1],
                         "lr": [0.1, 1.0, 0.1, 1.0], "final_train_loss": [1.0, 2.0, 0.5, 0.7],
                         "init_loss": 2.3, "logit_final": [1.0, 100.0, 10.0, 10.0]})
    t = repro_wortsman.per_seed_table(runs).set_index("seed")
    # seed 0: losses 1, 2 -> mean excess over the best = 0.5; seed 1: 0.5, 0.7 -> 0.1
    assert t["sensitivity"].tolist() == pytest.approx([0.5, 0.1])
    assert t["log_logit_high"].tolist() == pytest.approx([2.0, 1.0])
    assert t["log_logit_low"].tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_logits_are_the_models(qk_norm):
    """block_logits, masked and softmaxed, rebuild Block.attention's output; the largest logit
    is taken over pairs of real tokens."""
    from flax import nnx

    spec = stabench.spec("listops", seeds=1, lrs=(0.1,), overrides={
        "model.dim": 16, "model.heads": 2, "model.depth": 1, "model.qk_norm": qk_norm,
        "dataset.max_length": 12, "dataset.min_length": 4, "dataset.n_train": 64,
        "dataset.n_test": 16})
    from stabench.config import build_cell, data_source, task_of

    model = build_cell(spec, data_source(task_of(spec))).build_model(nnx.Rngs(3))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(1, 10, (4, 12)))
    x = x.at[:, 9:].set(0)  # padding at the end
    mask = x != 0
    graphdef, stacked = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    z = block.norm1(model.embed(x))
    logits = repro_wortsman.block_logits(block, z)
    weights = jax.nn.softmax(jnp.where(mask[:, None, None, :], logits, -1e9), axis=-1)
    b, n, dim = z.shape
    v = jnp.split(block.qkv(z).reshape(b, n, 3 * block.heads, -1), 3, axis=2)[2]
    rebuilt = block.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, dim))
    np.testing.assert_allclose(rebuilt, block.attention(z, mask), rtol=1e-5, atol=1e-6)
    # one block: the peak is its largest |logit| between real tokens, pairs with padding left out
    real = np.asarray(mask[:, None, :, None] & mask[:, None, None, :])
    real = np.broadcast_to(real, logits.shape)
    expected = np.abs(np.asarray(logits))[real].max()
    assert float(repro_wortsman.max_attention_logit(model, x)) == pytest.approx(expected)


def test_wortsman_table_sensitivity():
    # the table's sensitivity is the metric's: per-lr seed means of min(final, L0) minus the best
    runs = pd.DataFrame({"warmup": "no", "qk_norm": "no", "lr": [0.1, 0.1, 1.0, 1.0],
                         "final_train_loss": [1.0, 2.0, float("inf"), 0.5],
                         "init_loss": [2.3, 2.3, 2.3, 2.3], "diverged": [0, 0, 1, 0],
                         "test_accuracy": [0.5, 0.4, 0.0, 0.6]})
    row = repro_wortsman.table_from(repro_wortsman.with_variant(
        runs.assign(method="none", **{"config.model.qk_norm": False}))).iloc[0]
    # lr 0.1: (1 + 2) / 2 = 1.5; lr 1: (2.3 + 0.5) / 2 = 1.4; mean excess over 1.4 = 0.05
    assert row["LR sensitivity"] == pytest.approx(0.05)
    assert row["best lr"] == 1.0 and row["max stable lr"] == 0.1 and row["diverged"] == 1

"""The reproduction scripts: each one's tiny version writes its report and figure, and the verdict
in the report is what its checks compute from the table the report shows. The checks themselves are
tested on hand-made tables where the claim clearly holds or clearly fails."""

import sys

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import _repro  # noqa: E402
import repro_he2015_init  # noqa: E402
import repro_he2016_depth  # noqa: E402
import repro_pascanu  # noqa: E402
import repro_wortsman  # noqa: E402

# module, rows of its tiny table, cells of its tiny run
SCRIPTS = {"pascanu": (repro_pascanu, 8, 4), "he2016": (repro_he2016_depth, 4, 4),
           "he2015": (repro_he2015_init, 3, 3), "wortsman": (repro_wortsman, 4, 4)}
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


def pascanu_table(plain_success, clip_success, plain_div, clip_div):
    rows = []
    for method, succ, div in [("plain SGD", plain_success, plain_div),
                              ("clip_norm(1)", clip_success, clip_div)]:
        for lr, k, d in zip((0.1, 1.0), succ, div):
            rows.append({"problem": "temporal_order", "T": 50, "method": method, "lr": lr,
                         "runs": 5, "successes": k, "diverged": d})
    return pd.DataFrame(rows)


def test_pascanu_checks():
    held = [c.held for c in repro_pascanu.evaluate(pascanu_table([0, 0], [3, 1], [0, 5], [0, 0]))]
    assert held == [True, True, True]
    # plain SGD solves it too, at as many rates, and is as stable: no check holds
    held = [c.held for c in repro_pascanu.evaluate(pascanu_table([2, 1], [3, 1], [0, 0], [0, 0]))]
    assert held == [False, False, False]


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


def test_wortsman_checks_and_sensitivity():
    def table(s):
        return pd.DataFrame([{"warmup": w, "qk_norm": q, "LR sensitivity": s[i]}
                             for i, (w, q) in enumerate([("no", "no"), ("no", "yes"),
                                                         ("yes", "no"), ("yes", "yes")])])

    assert [c.held for c in repro_wortsman.evaluate(table([0.8, 0.5, 0.4, 0.1]))] == [True] * 4
    assert [c.held for c in repro_wortsman.evaluate(table([0.1, 0.4, 0.5, 0.8]))] == [False] * 4
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

"""The Transformer study's conclusion (scripts/study_transformer.py), computed from a constructed
per-learning-rate table whose every number is known."""

import math
import sys

import pandas as pd

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import study_transformer as study  # noqa: E402

NAN = math.nan


def table(qk_diverges_at_top: bool) -> pd.DataFrame:
    # (entry, lr, diverged of 3, median logit, runs crossing, first crossing, divergence, above)
    rows = [("none", 0.1, 0, 50.0, 0, NAN, NAN, 0.1), ("none", 1.0, 0, 1e4, 3, 40.0, NAN, 0.6),
            ("none", 3.0, 2, 1e6, 3, 20.0, 60.0, 1.0),
            ("qk_norm", 0.1, 0, 5.0, 0, NAN, NAN, 0.0), ("qk_norm", 1.0, 0, 10.0, 0, NAN, NAN, 0.2),
            ("qk_norm", 3.0, 3 if qk_diverges_at_top else 0, 20.0, 1, 80.0, 90.0, 0.3)]
    return pd.DataFrame([{"entry": e, "lr": lr, "runs": 3, "diverged": d, "logit": logit,
                          "threshold": 38 / lr, "crossed": c, "cross_step": cs, "div_step": ds,
                          "above": a, "loss": 1.0} for e, lr, d, logit, c, cs, ds, a in rows])


def test_the_conclusion_states_the_numbers_of_the_table():
    lines = study.conclusion(table(qk_diverges_at_top=True), every=20)
    assert lines[0] == ("Divergence: none first diverges at lr 3 (2/3 runs); qk_norm first "
                        "diverges at lr 3 (3/3 runs).")
    assert lines[1].startswith("Largest attention logit at lr 1 (the largest rate where none "
                               "never diverges")
    assert "none 1e+04; qk_norm 10 (1e+03x lower)" in lines[1]
    assert "at lr 3 (the top of the grid" in lines[2] and "qk_norm 20 (5e+04x lower)" in lines[2]
    assert study.relative(2.0, 1.0) == "2x higher" and study.relative(1.0, 4.0) == "4x lower"
    assert lines[3] == ("Sharpness: at lr 3 the preconditioned sharpness of none crosses Adam's "
                        "threshold (12.7) at step 20 (median over the 3 runs that cross), before "
                        "its diverged runs diverge (median step 60).")
    assert "within one estimate interval" not in lines[3]
    assert lines[4].startswith("Edge of stability: none's preconditioned sharpness is at or above "
                               "the threshold for most estimates from lr 1 up")
    assert "0.10 at lr 0.1 (loss 1)" in lines[4]
    assert lines[5].startswith("Edge of stability: qk_norm's preconditioned sharpness is at or "
                               "above the threshold for most estimates at no rate")
    assert "not what decides divergence" in lines[6]
    # qk-layernorm that never diverges on the grid: the mechanism is visible and moves divergence
    lines = study.conclusion(table(qk_diverges_at_top=False), every=50)
    assert "qk_norm never diverges on the grid (up to lr 3)" in lines[0]
    assert lines[3].endswith("but within one estimate interval (50 steps) of it: the order is not "
                             "resolved.")
    assert lines[-1].endswith("moves the first diverging rate from 3 to beyond the grid.")

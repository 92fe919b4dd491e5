"""Tables from stored records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .metrics import mean_ci


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(lo):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def lr_table(runs: list[dict]) -> pd.DataFrame:
    """One row per learning rate: diverged/total, final loss, test accuracy (mean, 95% t-interval
    over seeds), median steps to target."""
    df = pd.DataFrame(runs)
    rows = []
    for lr, g in df.groupby("lr", sort=True):
        row = {"lr": _fmt(lr), "diverged": f"{int(g['diverged'].sum())}/{len(g)}",
               "final loss": _fmt(float(np.median(g["final_train_loss"])))}
        if "test_accuracy" in g:
            row["test acc (95% CI)"] = _ci(*mean_ci(g["test_accuracy"]))
        else:
            row["test loss (95% CI)"] = _ci(*mean_ci(g["test_loss"]))
        row["steps to target"] = _fmt(float(np.median(g["steps_to_target"])))
        row["clipped share"] = _fmt(float(g["clipped_share"].mean()), 2)
        rows.append(row)
    return pd.DataFrame(rows)

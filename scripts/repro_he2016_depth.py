"""He et al. 2016 in small form: a plain deep net trains worse as depth grows, its residual twin
does not.

The twin tasks `deep_plain` and `deep_residual` (digits, a batch-normalized ReLU MLP of width 128
whose hidden blocks are identical except for the identity shortcut) at several depths
(`model.depth`); per model and depth, the best learning rate's final training loss and test
accuracy over seeds, with Welch tests across seeds.

    python scripts/repro_he2016_depth.py          # full (minutes)
    python scripts/repro_he2016_depth.py --tiny   # smoke version (seconds)
"""

from __future__ import annotations

import time

import pandas as pd

import _repro
from _repro import Check
from stabench.metrics import welch_p

NAME = "he2016_depth"
PAPER = "He, Zhang, Ren & Sun 2016, Deep Residual Learning for Image Recognition (CVPR)"
CLAIM = ("A plain network's training loss gets worse as depth grows (the degradation problem), "
         "while the residual network of the same depth does not degrade.")
ALPHA = 0.05


def config(tiny: bool) -> dict:
    if tiny:
        return dict(depths=(2, 4), seeds=2, lrs=(0.1,), steps=20, eval_every=10)
    return dict(depths=(8, 20, 56), seeds=5, lrs=(0.01, 0.1), steps=500, eval_every=100)


def specs(c: dict) -> list:
    return [_repro.spec(task, seeds=c["seeds"], lrs=c["lrs"], model__depth=d,
                        train__steps=c["steps"], train__eval_every=c["eval_every"])
            for task in ("deep_plain", "deep_residual") for d in c["depths"]]


def table_from(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, depth) at its best learning rate (lowest mean final training loss)."""
    runs = runs.assign(model=runs["task"].map({"deep_plain": "plain", "deep_residual": "residual"}),
                       depth=runs["config.model.depth"].astype(int))
    best = {}
    for (model, depth), g in runs.groupby(["model", "depth"]):
        lr = g.groupby("lr")["final_train_loss"].mean().idxmin()
        best[model, depth] = g[g["lr"] == lr].sort_values("seed")
    shallow = min(d for _, d in best)
    rows = []
    for (model, depth), g in sorted(best.items()):
        other = best["residual" if model == "plain" else "plain", depth]
        loss = g["final_train_loss"].to_numpy()
        rows.append({
            "model": model, "depth": depth, "best lr": float(g["lr"].iloc[0]), "seeds": len(g),
            "train loss": float(loss.mean()), "train loss sd": float(loss.std(ddof=1)),
            "test acc": float(g["test_accuracy"].mean()),
            "diverged": int(g["diverged"].sum()),
            "p plain vs residual": welch_p(loss, other["final_train_loss"].to_numpy()),
            "p vs shallowest": welch_p(loss, best[model, shallow]["final_train_loss"].to_numpy())
            if depth != shallow else float("nan"),
        })
    return pd.DataFrame(rows)


def evaluate(table: pd.DataFrame) -> list[Check]:
    plain = table[table["model"] == "plain"].sort_values("depth")
    res = table[table["model"] == "residual"].sort_values("depth")
    deep, shallow = plain["depth"].max(), plain["depth"].min()
    p_loss = plain["train loss"].to_numpy()
    p_deep, r_deep = plain.iloc[-1], res.iloc[-1]
    r_shallow = res.iloc[0]
    worse = bool((p_loss[1:] > p_loss[:-1]).all())
    return [
        Check(f"plain: training loss rises with every depth step "
              f"({' -> '.join(_repro.fmt(x) for x in p_loss)}), depth {deep} vs {shallow} Welch "
              f"p = {_repro.fmt(p_deep['p vs shallowest'])} < {ALPHA}",
              worse and p_deep["p vs shallowest"] < ALPHA),
        Check(f"depth {deep}: residual training loss {_repro.fmt(r_deep['train loss'])} below "
              f"plain {_repro.fmt(p_deep['train loss'])}, Welch p = "
              f"{_repro.fmt(r_deep['p plain vs residual'])} < {ALPHA}",
              r_deep["train loss"] < p_deep["train loss"]
              and r_deep["p plain vs residual"] < ALPHA),
        Check(f"residual does not degrade: depth {deep} training loss "
              f"{_repro.fmt(r_deep['train loss'])} not significantly above depth {shallow}'s "
              f"{_repro.fmt(r_shallow['train loss'])} (lower, or Welch p = "
              f"{_repro.fmt(r_deep['p vs shallowest'])} >= {ALPHA})",
              bool(r_deep["train loss"] <= r_shallow["train loss"]
                   or r_deep["p vs shallowest"] >= ALPHA)),
    ]


def figure(runs: pd.DataFrame, table: pd.DataFrame):
    import seaborn as sns
    from matplotlib.figure import Figure

    best = runs.assign(model=runs["task"].map({"deep_plain": "plain", "deep_residual": "residual"}),
                       depth=runs["config.model.depth"].astype(int))
    keep = best.merge(table[["model", "depth", "best lr"]], on=["model", "depth"])
    keep = keep[keep["lr"] == keep["best lr"]]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for ax, col, label in [(ax1, "final_train_loss", "final training loss (log)"),
                           (ax2, "test_accuracy", "test accuracy")]:
        sns.pointplot(data=keep, x="depth", y=col, hue="model", ax=ax, palette="colorblind",
                      errorbar=("ci", 95), dodge=0.2, markers=["o", "s"], linestyles=["--", "-"])
        sns.stripplot(data=keep, x="depth", y=col, hue="model", ax=ax, palette="colorblind",
                      dodge=True, alpha=0.4, size=3, legend=False)
        ax.set_ylabel(label)
        ax.set_xlabel("hidden blocks (model.depth)")
    ax1.set_yscale("log")
    ax2.get_legend().remove()
    fig.suptitle("digits, batch-norm ReLU MLP: plain vs residual twin (best lr per point, seeds "
                 "as dots)")
    return fig


def main(argv=None) -> bool:
    args, c, t0, cells, records, trained = _repro.start(__doc__, argv, config, specs)
    runs = _repro.frame(records)
    table = table_from(runs)
    checks = evaluate(table)
    path = _repro.save_figure(figure(runs, table), args.out, NAME)
    _repro.write_report(
        args.out, NAME, command=_repro.command(__file__, args.tiny),
        title="Plain vs residual depth (He et al. 2016)", paper=PAPER, claim=CLAIM,
        setup=["Tasks `deep_plain` and `deep_residual` (sklearn digits): MLP width 128, ReLU, "
               "batch norm, pre-activation blocks; the residual twin adds the identity shortcut",
               f"Depths (`model.depth`, hidden blocks): {', '.join(map(str, c['depths']))}",
               f"Optimizer `sgd(momentum=0.9)`, batch 128, {c['steps']} steps, learning rates "
               f"{', '.join(map(str, c['lrs']))}, {c['seeds']} seeds; each row is the learning "
               "rate with the lowest mean final training loss",
               "Train loss: mean of the last 20 training-batch losses; test acc: held-out split; "
               "p values: Welch t-tests over seeds of the final training loss"],
        table=table, checks=checks, wall_s=time.perf_counter() - t0, trained=trained,
        records=records, figure=path)
    return _repro.verdict(checks)


if __name__ == "__main__":
    main()

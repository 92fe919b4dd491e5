"""Wortsman et al. 2023 in small form: warmup and qk-layernorm lower a Transformer's LR sensitivity.

A small pre-LN Transformer on generated ListOps, trained with Adam over a log grid of learning rates
from 3e-4 to 3e-1, with and without linear warmup (`warmup(...)`) and with and without LayerNorm
on queries and keys (`model.qk_norm`); LR sensitivity as the benchmark defines it (DESIGN.md
section 4): the mean over the grid of min(final loss, L0) minus the best of those.

    python scripts/repro_wortsman.py          # full (minutes)
    python scripts/repro_wortsman.py --tiny   # smoke version (seconds)
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

import _repro
from _repro import Check
from stabench.metrics import lr_sensitivity

NAME = "wortsman2023"
PAPER = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
         "instabilities (ICLR 2024)")
CLAIM = ("Learning-rate warmup and qk-layernorm each lower the learning-rate sensitivity of "
         "Transformer training.")


def config(tiny: bool) -> dict:
    if tiny:
        return dict(seeds=2, lrs=(1e-3, 1e-1), steps=20, eval_every=20, warmup=5, max_length=24,
                    min_length=8, n_train=200, n_test=50, dim=16, heads=2, depth=1, batch=16)
    return dict(seeds=2, lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), steps=300,
                eval_every=300, warmup=75, max_length=32, min_length=8, n_train=5000,
                n_test=500, dim=32, heads=2, depth=2, batch=16)


def methods(c: dict) -> dict[str, str]:
    return {"no": "none", "yes": f"warmup(steps={c['warmup']})"}


def specs(c: dict) -> list:
    return [_repro.spec("listops", method, seeds=c["seeds"], lrs=c["lrs"],
                        dataset__max_length=c["max_length"], dataset__min_length=c["min_length"],
                        dataset__n_train=c["n_train"], dataset__n_test=c["n_test"],
                        model__dim=c["dim"], model__heads=c["heads"], model__depth=c["depth"],
                        model__qk_norm=qk, train__steps=c["steps"],
                        train__eval_every=c["eval_every"], train__batch_size=c["batch"])
            for method in methods(c).values() for qk in (False, True)]


def parameter_count(spec) -> int:
    """Parameters of the cell's model, from its abstract build (shapes only)."""
    import jax
    from flax import nnx

    from stabench.config import build_cell, data_source, task_of

    cell = build_cell(spec, data_source(task_of(spec)))
    model = nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def with_variant(runs: pd.DataFrame) -> pd.DataFrame:
    # the stored method is canonical (every argument spelled out): warmup(steps=.., shape=..)
    return runs.assign(warmup=runs["method"].str.startswith("warmup(").map({True: "yes",
                                                                            False: "no"}),
                       qk_norm=runs["config.model.qk_norm"].map({True: "yes", False: "no"}),
                       capped=np.minimum(runs["final_train_loss"], runs["init_loss"]))


def table_from(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (warm, qk), g in runs.groupby(["warmup", "qk_norm"], sort=True):
        per_lr = g.groupby("lr")["capped"].mean()
        stable = g.groupby("lr")["diverged"].max() == 0
        rows.append({
            "warmup": warm, "qk_norm": qk,
            "LR sensitivity": lr_sensitivity(g["lr"], g["final_train_loss"], g["init_loss"]),
            "best final loss": float(per_lr.min()), "best lr": float(per_lr.idxmin()),
            "diverged": int(g["diverged"].sum()), "runs": len(g),
            "max stable lr": float(stable[stable].index.max()) if stable.any() else float("nan"),
            "best test acc": float(g.groupby("lr")["test_accuracy"].mean().max()),
        })
    return pd.DataFrame(rows)


def per_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """min(final training loss, L0) per learning rate (columns) and variant (rows), seed means."""
    t = runs.groupby(["warmup", "qk_norm", "lr"])["capped"].mean().unstack("lr")
    t.columns = [f"lr {x:g}" for x in t.columns]
    return t.reset_index()


def evaluate(table: pd.DataFrame) -> list[Check]:
    f = _repro.fmt  # also spells a table parsed back from Markdown (True/False) as yes/no
    s = {(f(r["warmup"]), f(r["qk_norm"])): r["LR sensitivity"] for _, r in table.iterrows()}
    return [
        *[Check(f"warmup lowers LR sensitivity with qk_norm={qk}: {f(s['yes', qk])} vs "
                f"{f(s['no', qk])} without", s["yes", qk] < s["no", qk]) for qk in ("no", "yes")],
        *[Check(f"qk-layernorm lowers LR sensitivity with warmup={w}: {f(s[w, 'yes'])} vs "
                f"{f(s[w, 'no'])} without", s[w, "yes"] < s[w, "no"]) for w in ("no", "yes")],
    ]


def figure(runs: pd.DataFrame):
    import seaborn as sns
    from matplotlib.figure import Figure

    runs = runs.assign(variant="warmup " + runs["warmup"] + ", qk_norm " + runs["qk_norm"])
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(data=runs, x="lr", y="capped", hue="variant", style="variant", markers=True,
                 dashes=True, errorbar=None, palette="colorblind", ax=ax)
    sns.scatterplot(data=runs, x="lr", y="capped", hue="variant", palette="colorblind", ax=ax,
                    alpha=0.35, s=14, legend=False)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (Adam)")
    ax.set_ylabel("final training loss, capped at L0 (diverged = L0)")
    ax.set_title("ListOps, small pre-LN Transformer: final loss vs learning rate (mean, seeds as "
                 "dots)", fontsize="medium")
    ax.legend(frameon=False, fontsize="small")
    return fig


def main(argv=None) -> bool:
    args, c, t0, cells, records, trained = _repro.start(__doc__, argv, config, specs)
    runs = with_variant(_repro.frame(records))
    table = table_from(runs)
    checks = evaluate(table)
    path = _repro.save_figure(figure(runs), args.out, NAME)
    n_plain, n_qk = (parameter_count(s) for s in cells[:2])
    _repro.write_report(
        args.out, NAME, command=_repro.command(__file__, args.tiny),
        title="Warmup and qk-layernorm vs LR sensitivity (Wortsman et al. 2023)",
        paper=PAPER, claim=CLAIM,
        setup=[f"Task `listops` (generated; expressions of {c['min_length']}-{c['max_length']} "
               f"tokens, {c['n_train']} training and {c['n_test']} held-out examples)",
               f"Model `transformer`: pre-LN encoder, dim {c['dim']}, depth {c['depth']}, "
               f"{c['heads']} heads, mean pooling; {n_plain} parameters ({n_qk} with qk_norm, "
               "LayerNorm on queries and keys per head)",
               f"Optimizer `adam`, batch {c['batch']}, {c['steps']} steps, learning rates "
               f"{', '.join(f'{x:g}' for x in c['lrs'])}, {c['seeds']} seeds each",
               f"Warmup: `{methods(c)['yes']}` (linear, from 0) vs `none`",
               "LR sensitivity: `stabench.metrics.lr_sensitivity`, the leaderboard's column: mean "
               "over the grid of min(final training loss, L0) minus its minimum over the grid; "
               "final loss = mean of the last 20 training batches, L0 = loss before any update"],
        table=table, checks=checks, wall_s=time.perf_counter() - t0, trained=trained,
        records=records, figure=path,
        extra="min(final training loss, L0) per learning rate (seed means):\n\n"
              + _repro.to_markdown(per_lr_table(runs)))
    return _repro.verdict(checks)


if __name__ == "__main__":
    main()

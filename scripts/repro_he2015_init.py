"""He et al. 2015 in small form: He init trains a 30-layer ReLU net where a naive small init stalls.

The `digits` task with a plain ReLU MLP of 30 weight layers (input layer, 28 hidden blocks, head;
no normalization) under `he_normal`, `glorot_normal` and `normal(std=0.01)`; per init, the best
learning rate's share of the initial loss removed after training, and the per-layer gradient norms
at initialization (the ratio of the first layer's to the last layer's).

    python scripts/repro_he2015_init.py          # full (minutes)
    python scripts/repro_he2015_init.py --tiny   # smoke version (seconds)
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

import _repro
from _repro import Check
from stabench.metrics import improvement

NAME = "he2015_init"
PAPER = ("He, Zhang, Ren & Sun 2015, Delving Deep into Rectifiers: Surpassing Human-Level "
         "Performance on ImageNet Classification (ICCV)")
CLAIM = ("With He initialization (Var = 2/fan_in) a 30-layer ReLU network trains; a naive "
         "small-variance initialization stalls.")
INITS = {"he_normal": "He", "glorot_normal": "Glorot", "normal(std=0.01)": "normal(0.01)"}
TRAINS, STALLS = 0.5, 0.1  # share of the initial loss removed


def config(tiny: bool) -> dict:
    if tiny:
        return dict(depth=4, seeds=2, lrs=(0.01,), steps=20, eval_every=10)
    return dict(depth=28, seeds=5, lrs=(0.01, 0.1), steps=300, eval_every=100)


def specs(c: dict) -> list:
    return [_repro.spec("digits", init=init, seeds=c["seeds"], lrs=c["lrs"],
                        model__depth=c["depth"], train__steps=c["steps"],
                        train__eval_every=c["eval_every"])
            for init in INITS]


def grads_at_init(records) -> pd.DataFrame:
    """Per run: the first (input) and last (head) layer's gradient norm at step 0."""
    rows = []
    for rec in records:
        g = rec.telemetry()["layer_grad_norm"][:, 0, :]  # [runs, layers] at step 0
        for (seed, lr), norms in zip(rec.spec.runs, g):
            rows.append({"init": rec.spec.init, "seed": seed, "lr": lr, "first_grad": norms[0],
                         "last_grad": norms[-1]})
    return pd.DataFrame(rows)


def layer_count(records) -> int:
    counts = {len(rec.data["layer_names"]) for rec in records}
    assert len(counts) == 1, counts
    return counts.pop()


def table_from(runs: pd.DataFrame, grads: pd.DataFrame) -> pd.DataFrame:
    runs = runs.merge(grads, on=["init", "seed", "lr"])
    runs = runs.assign(removed=improvement(runs["final_train_loss"], runs["init_loss"])
                       / runs["init_loss"])
    rows = []
    for init, g in runs.groupby("init", sort=False):
        lr = g.groupby("lr")["removed"].mean().idxmax()
        b = g[g["lr"] == lr]
        at0 = g.drop_duplicates("seed")  # step 0 comes before any update: the same for every lr
        with np.errstate(divide="ignore", invalid="ignore"):  # a gradient that underflowed to 0
            first = float(np.exp(np.log(at0["first_grad"]).mean()))
            ratio = float(np.exp(np.log(at0["first_grad"] / at0["last_grad"]).mean()))
        rows.append({
            "init": INITS[init], "best lr": lr, "seeds": len(b),
            "initial loss": float(b["init_loss"].mean()),
            "final train loss": float(b["final_train_loss"].mean()),
            "loss removed": float(b["removed"].mean()),
            "test acc": float(b["test_accuracy"].mean()),
            "diverged": int(b["diverged"].sum()),
            "first-layer grad at init": first, "first/last grad at init": ratio,
            "zero first-layer grads": int((at0["first_grad"] == 0).sum()),
        })
    order = {v: i for i, v in enumerate(INITS.values())}
    return pd.DataFrame(rows).sort_values("init", key=lambda s: s.map(order)).reset_index(drop=True)


def evaluate(table: pd.DataFrame) -> list[Check]:
    row = {r["init"]: r for _, r in table.iterrows()}
    he, naive = row["He"], row["normal(0.01)"]
    return [
        Check(f"He trains: it removes {_repro.fmt(he['loss removed'])} of the initial loss "
              f"(>= {TRAINS})", he["loss removed"] >= TRAINS),
        Check(f"normal(0.01) stalls: it removes {_repro.fmt(naive['loss removed'])} of the "
              f"initial loss (< {STALLS})", naive["loss removed"] < STALLS),
    ]


def figure(records, table: pd.DataFrame):
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    palette = dict(zip(INITS.values(), sns.color_palette("colorblind", len(INITS))))
    best = dict(zip(table["init"], table["best lr"]))
    for rec in records:
        label = INITS[rec.spec.init]
        tel = rec.telemetry()
        lrs = np.asarray(tel["lrs"])
        loss = tel["loss"][lrs == best[label]]
        steps = np.arange(loss.shape[1])
        for i, run in enumerate(loss):
            ax1.plot(steps, run, color=palette[label], lw=0.8, alpha=0.7,
                     label=f"{label} (lr {best[label]:g})" if i == 0 else None)
        norms = tel["layer_grad_norm"][:, 0, :]
        gm = np.exp(np.log(np.maximum(norms, 1e-38)).mean(0))
        ax2.plot(np.arange(len(gm)), gm, marker=".", color=palette[label], label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss, every seed at each init's best lr", fontsize="medium")
    ax1.legend(frameon=False, fontsize="small")
    ax2.set_yscale("log")
    ax2.set_xlabel("layer (0 = input, last = head)")
    ax2.set_ylabel("gradient norm at init (0 drawn at 1e-38)")
    ax2.set_title("per-layer gradient norm at step 0 (geometric mean over runs)",
                  fontsize="medium")
    ax2.legend(frameon=False, fontsize="small")
    return fig


def main(argv=None) -> bool:
    args, c, t0, cells, records, trained = _repro.start(__doc__, argv, config, specs)
    table = table_from(_repro.frame(records), grads_at_init(records))
    checks = evaluate(table)
    path = _repro.save_figure(figure(records, table), args.out, NAME)
    glorot = table[table["init"] == "Glorot"].iloc[0]
    n_layers = layer_count(records)
    _repro.write_report(
        args.out, NAME, command=_repro.command(__file__, args.tiny),
        title="He vs Glorot vs naive init, deep ReLU MLP (He et al. 2015)",
        paper=PAPER, claim=CLAIM,
        setup=[f"Task `digits` with `model.depth={c['depth']}`: a ReLU MLP of width 128 with "
               f"{n_layers} weight layers (counted from the model's layers), no normalization",
               "Inits: " + ", ".join(f"`{k}`" for k in INITS),
               f"Optimizer `sgd(momentum=0.9)`, batch 128, {c['steps']} steps, learning rates "
               f"{', '.join(map(str, c['lrs']))}, {c['seeds']} seeds; each row is the learning "
               "rate removing the largest share of the initial loss",
               "Loss removed: (L0 - min(final, L0)) / L0 with L0 the loss before any update and "
               "the final loss the mean of the last 20 training batches (a diverged run removes 0)",
               "Gradients at init: per-layer gradient norms of step 0 from the telemetry, "
               "geometric means over seeds; zero first-layer grads: seeds whose first-layer "
               "gradient norm underflowed to exactly 0 in float32"],
        table=table, checks=checks, wall_s=time.perf_counter() - t0, trained=trained,
        records=records, figure=path,
        notes=[f"Glorot (Var = 2/(fan_in + fan_out)) removes "
               f"{_repro.fmt(glorot['loss removed'])} of the initial loss; the paper reports that "
               f"Xavier init stalls at 30 layers "
               f"({'held' if glorot['loss removed'] < STALLS else 'not seen'} "
               f"here by the same < {STALLS} criterion)."])
    return _repro.verdict(checks)


if __name__ == "__main__":
    main()

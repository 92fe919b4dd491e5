"""Pascanu, Mikolov & Bengio 2013 in small form: gradient-norm clipping on a tanh RNN.

A 50-unit tanh RNN trained with plain SGD (batch 20) on the adding problem and the temporal order
problem at sequence lengths 50 and 100, with and without clip_norm; the success rate over seeds at
each learning rate (adding: test MSE < 0.04 on held-out sequences; temporal order: test error < 1%).

    python scripts/repro_pascanu.py          # full (minutes)
    python scripts/repro_pascanu.py --tiny   # smoke version (seconds)
"""

from __future__ import annotations

import time

import _repro
from _repro import Check

NAME = "pascanu2013"
PAPER = ("Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks "
         "(ICML)")
CLAIM = ("Clipping the gradient norm lets a tanh RNN trained with SGD solve sequence lengths at "
         "which plain SGD fails, and widens the range of learning rates that work.")
PLAIN, CLIP = "none", "clip_norm(max_norm=1.0)"
ADDING_SOLVED = 0.04  # test MSE (predicting the mean scores 1/6)
ORDER_ERROR = 0.01  # test error (1 - accuracy)


def config(tiny: bool) -> dict:
    if tiny:
        return dict(lengths=(10,), seeds=2, lrs=(0.1, 1.0), steps=20, eval_every=10, n_train=200,
                    n_test=100)
    return dict(lengths=(50, 100), seeds=5, lrs=(0.03, 0.1, 0.3, 1.0), steps=2500, eval_every=500,
                n_train=10000, n_test=1000)


def specs(c: dict) -> list:
    return [_repro.spec(task, method, optimizer="sgd", seeds=c["seeds"], lrs=c["lrs"],
                        dataset__T=T, dataset__n_train=c["n_train"], dataset__n_test=c["n_test"],
                        model__hidden=50, train__batch_size=20, train__steps=c["steps"],
                        train__eval_every=c["eval_every"])
            for task in ("adding", "temporal_order") for T in c["lengths"]
            for method in (PLAIN, CLIP)]


def table_from(runs):
    """One row per (problem, T, method, lr): successes, divergences, best held-out score."""
    runs = runs.copy()
    adding = runs["task"] == "adding"
    runs["score"] = runs["test_loss"].where(adding, 1.0 - runs["test_accuracy"])
    runs["success"] = (runs["score"] < ADDING_SOLVED).where(adding, runs["score"] < ORDER_ERROR)
    runs["method"] = runs["method"].map({PLAIN: "plain SGD", CLIP: "clip_norm(1)"})
    rows = []
    keys = ["task", "config.dataset.T", "method", "lr"]
    for (task, T, method, lr), g in runs.groupby(keys, sort=True):
        rows.append({"problem": task, "T": int(T), "method": method, "lr": lr, "runs": len(g),
                     "successes": int(g["success"].sum()), "diverged": int(g["diverged"].sum()),
                     "best score": float(g["score"].min()),
                     "median score": float(g["score"].median())})
    import pandas as pd

    return pd.DataFrame(rows)


def evaluate(table) -> list[Check]:
    by = {m: table[table["method"] == m] for m in ("plain SGD", "clip_norm(1)")}
    solved = {m: {(p, t) for (p, t), g in d.groupby(["problem", "T"]) if g["successes"].sum() > 0}
              for m, d in by.items()}
    only_clip = sorted(solved["clip_norm(1)"] - solved["plain SGD"])
    ok_lrs = {m: int((d["successes"] > 0).sum()) for m, d in by.items()}
    stable_lrs = {m: int((d["diverged"] == 0).sum()) for m, d in by.items()}
    total = {m: len(d) for m, d in by.items()}
    return [
        Check(f"clipping solves (some seed succeeds) a problem and length that plain SGD never "
              f"solves: {', '.join(f'{p} T={t}' for p, t in only_clip) or 'none'}",
              bool(only_clip)),
        Check(f"clipping works at more learning rates (problem, length, lr with a success): "
              f"{ok_lrs['clip_norm(1)']} of {total['clip_norm(1)']} clipped vs "
              f"{ok_lrs['plain SGD']} of {total['plain SGD']} plain",
              ok_lrs["clip_norm(1)"] > ok_lrs["plain SGD"]),
        Check(f"clipping stays stable at more learning rates (problem, length, lr with no diverged "
              f"seed): {stable_lrs['clip_norm(1)']} clipped vs {stable_lrs['plain SGD']} plain",
              stable_lrs["clip_norm(1)"] > stable_lrs["plain SGD"]),
    ]


def figure(table):
    import seaborn as sns
    from matplotlib.figure import Figure

    t = table.assign(problem_T=table["problem"] + " T=" + table["T"].astype(str),
                     success_rate=table["successes"] / table["runs"],
                     divergence_rate=table["diverged"] / table["runs"])
    panels = list(dict.fromkeys(t.sort_values(["problem", "T"])["problem_T"]))
    fig = Figure(figsize=(3.0 * len(panels), 5.2), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, sharey=True)
    palette = dict(zip(["plain SGD", "clip_norm(1)"], sns.color_palette("colorblind", 2)))
    for j, panel in enumerate(panels):
        d = t[t["problem_T"] == panel]
        for i, (col, label) in enumerate([("success_rate", "success rate"),
                                          ("divergence_rate", "diverged share")]):
            ax = axes[i, j]
            for method, g in d.groupby("method"):
                ax.plot(g["lr"], g[col], marker="o", color=palette[method], label=method,
                        ls="-" if method == "clip_norm(1)" else "--")
            ax.set_xscale("log")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(panel if i == 0 else "", fontsize="medium")
            ax.set_ylabel(label if j == 0 else "")
            ax.set_xlabel("learning rate" if i == 1 else "")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle("tanh RNN (50 units), SGD batch 20: success and divergence over seeds")
    return fig


def main(argv=None) -> bool:
    args, c, t0, cells, records, trained = _repro.start(__doc__, argv, config, specs)
    table = table_from(_repro.frame(records))
    checks = evaluate(table)
    path = _repro.save_figure(figure(table), args.out, NAME)
    methods = table["method"].unique()
    n_div = {m: int(table.loc[table["method"] == m, "diverged"].sum()) for m in methods}
    n_runs = {m: int(table.loc[table["method"] == m, "runs"].sum()) for m in methods}
    from stabench.metrics import fisher_p

    p = fisher_p(n_div["clip_norm(1)"], n_runs["clip_norm(1)"], n_div["plain SGD"],
                 n_runs["plain SGD"])
    _repro.write_report(
        args.out, NAME, command=_repro.command(__file__, args.tiny),
        title="Gradient clipping on a tanh RNN (Pascanu et al. 2013)", paper=PAPER,
        claim=CLAIM,
        setup=[f"Tasks `adding` and `temporal_order` (generated; {c['n_train']} training and "
               f"{c['n_test']} held-out sequences), T = {', '.join(map(str, c['lengths']))}",
               "Model `rnn(hidden=50)`: h_t = tanh(W_in x_t + W_rec h_(t-1) + b), default init",
               f"Optimizer `sgd` (no momentum), batch 20, {c['steps']} steps, learning rates "
               f"{', '.join(map(str, c['lrs']))}, {c['seeds']} seeds each",
               f"Methods: `{PLAIN}` (plain SGD) and `{CLIP}`",
               f"Success: adding test MSE < {ADDING_SOLVED}; temporal order test error < "
               f"{ORDER_ERROR:.0%}. Score: test MSE (adding) or test error (temporal order)",
               "Diverged: the benchmark's definition (non-finite, or the loss's 20-step average "
               "above max(2 L0, L0 + 1))"],
        table=table, checks=checks, wall_s=time.perf_counter() - t0, trained=trained,
        records=records, figure=path,
        notes=[f"Divergences over all runs: clipped "
               f"{n_div['clip_norm(1)']}/{n_runs['clip_norm(1)']}, plain "
               f"{n_div['plain SGD']}/{n_runs['plain SGD']} (Fisher exact p = {p:.3g})",
               f"The paper trains for up to millions of sequences; here each run sees "
               f"{c['steps'] * 20} sequences, so only the easier settings can be solved."])
    return _repro.verdict(checks)


if __name__ == "__main__":
    main()

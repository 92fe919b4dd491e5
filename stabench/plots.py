"""Figures (seaborn styling on matplotlib `Figure`s; no pyplot state) drawn from tables, at a size
that prints in one column of a paper. Nothing here writes a file: report.py saves them.

Bands are the same 95% Student-t intervals over seeds that the tables report.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.ticker import NullLocator, ScalarFormatter

from .metrics import METRIC_RANGES, mean_ci, performance_profile

WIDTH = 7.0  # inches
PROFILE_ENTRIES = 12  # more lines than this are unreadable in print


@contextmanager
def style():
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.0):
        yield


def _palette(labels) -> dict:
    """Colors by sorted label, so a method keeps its color across a report's figures."""
    labels = sorted(set(labels))
    return dict(zip(labels, sns.color_palette("colorblind", len(labels))))


DASHES = ["-", "--", "-.", ":"]  # with colors, keeps overlapping lines apart


def _legend(fig: Figure, handles, labels) -> None:
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
               fontsize="small", frameon=False)


def _band(ax, x, groups: pd.core.groupby.DataFrameGroupBy, column: str, bounds, color,
          label) -> None:
    stats = np.array([mean_ci(g[column].to_numpy(), bounds=bounds) for _, g in groups])
    m, lo, hi = stats.T
    keep = np.isfinite(m)
    ax.plot(np.asarray(x)[keep], m[keep], marker="o", ms=3, color=color, label=label)
    band = keep & np.isfinite(lo) & np.isfinite(hi)
    ax.fill_between(np.asarray(x)[band], lo[band], hi[band], color=color, alpha=0.2, lw=0)


def _entry_label(df: pd.DataFrame) -> pd.Series:
    label = df["method"]
    if df["optimizer"].nunique() > 1:
        label = label + " / " + df["optimizer"]
    return label


def lr_curves(runs: pd.DataFrame, title: str) -> Figure:
    """Final training loss (capped at the loss at initialization, as LR sensitivity counts it) and
    the target metric against learning rate: one line per method, one column per init."""
    metric = runs["target_metric"].iloc[0]
    runs = runs.assign(capped_loss=np.minimum(runs["final_train_loss"], runs["init_loss"]),
                       entry=_entry_label(runs))
    inits = sorted(runs["init"].unique())
    colors = _palette(sorted(runs["entry"].unique()))
    with style():
        fig = Figure(figsize=(WIDTH, 4.6 if len(inits) == 1 else 5.2), layout="constrained")
        axes = fig.subplots(2, len(inits), squeeze=False, sharex=True)
        for j, init in enumerate(inits):
            sub = runs[runs["init"] == init]
            for entry, g in sub.groupby("entry", sort=True):
                by_lr = g.groupby("lr", sort=True)
                for ax, column, bounds in zip(axes[:, j], ("capped_loss", metric), (
                        METRIC_RANGES["final_train_loss"], METRIC_RANGES[metric])):
                    _band(ax, list(by_lr.groups), by_lr, column, bounds, colors[entry], entry)
            axes[0, j].set_title(f"init {init}" if len(inits) > 1 else "")
            for ax in axes[:, j]:
                ax.set_xscale("log")
            axes[1, j].set_xlabel("learning rate")
        axes[0, 0].set_ylabel("final train loss\n(capped at step-0 loss)")
        axes[1, 0].set_ylabel(metric.replace("_", " "))
        if metric == "test_loss":
            for ax in axes[1]:
                ax.set_yscale("log")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        _legend(fig, handles, labels)
        fig.suptitle(f"{title}: mean over seeds, 95% t-interval bands")
    return fig


def divergence_heatmap(runs: pd.DataFrame, title: str) -> Figure:
    """Share of seeds that diverged, per entry (rows) and learning rate (columns)."""
    label = _entry_label(runs)
    if runs["init"].nunique() > 1:
        label = label + " / " + runs["init"]
    table = runs.assign(entry=label).pivot_table(index="entry", columns="lr", values="diverged",
                                                 aggfunc="mean")
    table.columns = [f"{x:g}" for x in table.columns]
    # long entry labels would squeeze the cells: widen the figure so each keeps ~0.45 in
    width = max(WIDTH, 0.065 * max(map(len, table.index)) + 0.45 * table.shape[1] + 1.4)
    with style():
        fig = Figure(figsize=(width, 1.0 + 0.28 * len(table)), layout="constrained")
        ax = fig.subplots()
        sns.heatmap(table, ax=ax, vmin=0, vmax=1, cmap="rocket_r", annot=True, fmt=".2g",
                    annot_kws={"fontsize": 7}, cbar_kws={"label": "diverged share"},
                    linewidths=0.5)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("")
        ax.set_title(f"{title}: divergence rate")
    return fig


def depth_accuracy(points: pd.DataFrame, metric: str) -> Figure:
    """Best-LR target metric against depth, plain vs residual twins; one panel per method.
    `points`: depth, family_label, architecture, method, init, quality_mean, quality_lo,
    quality_hi."""
    methods = sorted(points["method"].unique())
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    colors = _palette(["plain", "residual"])
    inits = sorted(points["init"].unique())
    families = points["family"].unique()
    dashes = dict(zip(inits, DASHES * len(inits)))
    with style():
        fig = Figure(figsize=(WIDTH, 0.6 + 1.9 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
        for k, method in enumerate(methods):
            ax = axes[k // cols, k % cols]
            for (_, arch, init), g in points[points["method"] == method].groupby(
                    ["family", "architecture", "init"], sort=True):
                g = g.sort_values("depth")
                label = ", ".join([g["family_label"].iloc[0]] * (len(families) > 1) + [arch]
                                  + [init] * (len(inits) > 1))
                ax.plot(g["depth"], g["quality_mean"], marker="o", ms=3, color=colors[arch],
                        ls=dashes[init], label=label)
                ax.fill_between(g["depth"], g["quality_lo"], g["quality_hi"], color=colors[arch],
                                alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(points["depth"].unique()))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(textwrap.fill(method, 30), fontsize="small")
        for k in range(len(methods), rows * cols):
            axes[k // cols, k % cols].set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(metric.replace("_", " "))
        for ax in axes[-1]:
            ax.set_xlabel("depth")
        _legend(fig, *axes[0, 0].get_legend_handles_labels())
        fig.suptitle("depth vs best-LR result: plain vs residual (mean over seeds, 95% bands)")
    return fig


def performance_profiles(labels: list[str], ratios: np.ndarray, weights: np.ndarray,
                         scores: np.ndarray) -> Figure:
    """rho(tau) for tau in [1, 4] (AlgoPerf), the best-scoring entries first."""
    order = np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")[:PROFILE_ENTRIES]
    taus = np.linspace(1.0, 4.0, 301)
    rho = performance_profile(ratios[order], taus, weights)
    colors = _palette([labels[i] for i in order])
    with style():
        fig = Figure(figsize=(WIDTH, 3.4), layout="constrained")
        ax = fig.subplots()
        for k, i in enumerate(order):
            ax.step(taus, rho[k], where="post", color=colors[labels[i]], ls=DASHES[k % 4],
                    label=f"{labels[i]} ({scores[i]:.2f})")
        ax.set_xlim(1, 4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r"$\tau$ (steps to target / fewest steps of any entry)")
        ax.set_ylabel(r"$\rho(\tau)$: share of tasks")
        shown = f" (best {len(order)} of {len(labels)})" if len(labels) > len(order) else ""
        ax.set_title(f"performance profiles{shown}; legend: profile score")
        _legend(fig, *ax.get_legend_handles_labels())
    return fig


def grad_norm_traces(traces: dict[str, np.ndarray], title: str) -> Figure:
    """Pre-transform gradient norm per step: median over seeds and the inter-quartile band.
    `traces`: label -> [seeds, steps] (NaN after a run diverged)."""
    colors = _palette(traces)
    with style():
        fig = Figure(figsize=(WIDTH, 3.0), layout="constrained")
        ax = fig.subplots()
        for label, values in traces.items():
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            steps = np.arange(values.shape[1])
            with warnings.catch_warnings():  # a step after every run diverged has no median
                warnings.simplefilter("ignore", RuntimeWarning)
                q25, med, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
            ax.plot(steps, med, color=colors[label], lw=1, label=label)
            ax.fill_between(steps, q25, q75, color=colors[label], alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("grad norm (before the method)")
        ax.set_title(f"{title}: median over seeds, inter-quartile band")
        _legend(fig, *ax.get_legend_handles_labels())
    return fig


# ---- diagnose: one run's per-layer gradient norms over training ---------------------------------
HEATMAP_LABELS = 16  # layer names on the heatmap's axis; more are thinned out


def diagnosis_figure(diag, loss: np.ndarray, layer_grad_norm: np.ndarray) -> Figure:
    """The loss per step (and its 20-step mean) above a heatmap of every layer's gradient norm over
    steps (log colour scale; grey where not finite or zero), with the diagnosis's events marked:
    lines on the loss and triangles above the heatmap for transient spikes, the explosion, the step
    its first layers jumped, recovery and divergence; arrows at the layers where it started (of the
    first spike if nothing exploded). Layers with vanishing gradients have blue names."""
    from matplotlib.colors import LogNorm

    from .diagnosis import AROUND
    from .metrics import moving_average

    names = list(diag.signal.layers)
    norms = np.asarray(layer_grad_norm, np.float64)
    steps = np.arange(len(loss))
    positive = norms[np.isfinite(norms) & (norms > 0)]
    with style():
        fig = Figure(figsize=(WIDTH, 2.2 + 0.12 * min(len(names), 60)), layout="constrained")
        grid = fig.add_gridspec(2, 2, height_ratios=[1, 2.2], width_ratios=[1, 0.025])
        ax_loss = fig.add_subplot(grid[0, 0])
        ax_heat = fig.add_subplot(grid[1, 0], sharex=ax_loss)
        ax_bar = fig.add_subplot(grid[1, 1])
        fig.add_subplot(grid[0, 1]).set_axis_off()

        finite = np.where(np.isfinite(loss), loss, np.nan)
        ax_loss.plot(steps, finite, lw=0.6, color="0.6", label="loss")
        ax_loss.plot(steps, moving_average(np.nan_to_num(finite, nan=np.inf), AROUND), lw=1.2,
                     color="C0", label=f"{AROUND}-step mean")
        if np.nanmin(finite[finite > 0], initial=np.inf) < np.nanmax(finite, initial=0) / 20:
            ax_loss.set_yscale("log")
            ax_loss.yaxis.set_minor_formatter(NullFormatter())  # the short panel has no room
        ax_loss.set_ylabel("train loss")
        ax_loss.tick_params(labelbottom=False)

        cmap = sns.color_palette("rocket", as_cmap=True).with_extremes(bad="0.85")
        shown = np.ma.masked_where(~(np.isfinite(norms) & (norms > 0)), norms).T
        if positive.size:
            lo, hi = float(positive.min()), float(positive.max())
            image = ax_heat.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap,
                                   norm=LogNorm(lo, hi if hi > lo else lo * 10),
                                   extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5))
            fig.colorbar(image, cax=ax_bar, label="grad norm (log scale)")
        else:
            ax_bar.set_axis_off()
            ax_heat.text(0.5, 0.5, "no finite non-zero gradient norm", ha="center",
                         transform=ax_heat.transAxes)
        every = max(1, math.ceil(len(names) / HEATMAP_LABELS))
        ticks = list(range(0, len(names), every))
        ax_heat.set_yticks(ticks, [names[i] for i in ticks], fontsize="x-small")
        ax_heat.tick_params(axis="y", pad=9)  # room for the arrows
        vanishing = {n for n, _ in (diag.vanishing.layers if diag.vanishing else ())}
        for label, i in zip(ax_heat.get_yticklabels(), ticks):
            if names[i] in vanishing:
                label.set_color("tab:blue")
        ax_heat.set_xlabel("step")
        ax_heat.set_ylabel("layer (input at top)")
        ax_heat.grid(False)

        events = []  # (step, colour, line style, label or None)
        for i, spike in enumerate(e for e in diag.events if e.transient):
            events.append((spike.step, "tab:orange", ":", None if i else "transient spike"))
        e = diag.harmful
        if e is not None:
            events.append((e.step, "tab:red", "--", f"explosion, step {e.step}"))
            if e.onset != e.step:
                events.append((e.onset, "tab:red", ":", f"first layer jump, step {e.onset}"))
            if e.recovered_at is not None:
                events.append((e.recovered_at, "tab:green", ":",
                               f"recovered, step {e.recovered_at}"))
        first = e or diag.explosion
        if first is not None:
            # where it started: arrows in the left margin, so the heatmap cells stay visible
            rows = [names.index(n) for n in first.layers]
            ax_heat.scatter([-0.012] * len(rows), rows, marker=">", s=30, zorder=3, clip_on=False,
                            transform=ax_heat.get_yaxis_transform(),
                            color="tab:red" if e is not None else "tab:orange")
        if diag.divergence is not None:
            events.append((diag.divergence, "black", "-", f"diverged, step {diag.divergence}"))
        for step, color, ls, label in events:
            ax_loss.axvline(step, color=color, ls=ls, lw=1, label=label)
            ax_heat.scatter([step], [1.0], marker="v", s=30, color=color, zorder=3,
                            clip_on=False, transform=ax_heat.get_xaxis_transform())
        # a run stopped early (non-finite) has nothing to show after its last recorded step
        last = int(np.flatnonzero(np.isfinite(loss))[-1]) if np.isfinite(loss).any() else 0
        ax_loss.set_xlim(-0.5, min(len(steps), last + 1 + max(5, last // 10)) - 0.5)
        ax_loss.legend(fontsize="x-small", loc="upper right", ncols=2)
        run = diag.run
        ax_loss.set_title(textwrap.fill(f"{run['task']}, {run['method']}, init {run['init']}, "
                                        f"lr {run['lr']:g}, seed {run['seed']}", 110),
                          fontsize="small")
    return fig

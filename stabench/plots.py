"""Figures (seaborn styling on matplotlib `Figure`s; no pyplot state) drawn from tables, sized for
a paper: `COLUMN` inches wide for one column, `WIDTH` for the full text width, with fonts that
print at 7-8 pt there. Nothing here writes a file: reports.py saves them.

Every figure of a report draws an entry (method, init, optimizer) in the one `EntryStyle` that
`entry_styles` gives it from the report's sorted entry list: a colour-blind-safe colour, a marker,
and a line style once the palette's colours run out. Bands are the same intervals the tables
report: 95% Student-t over seeds for means, 95% Wilson for divergence shares.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from .metrics import METRIC_RANGES, mean_ci, performance_profile, wilson

WIDTH = 6.5  # inches: the text width of a one-column article with 1 in margins
COLUMN = 3.3  # inches: one column of a two-column paper
PROFILE_ENTRIES = 12  # more lines than this are unreadable in print
LOSS_CAP = 3.0  # loss axes end at this many times the median loss at initialization
PALETTE = tuple(sns.color_palette("colorblind"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINESTYLES = ("-", "--", ":", "-.")
FONTS = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
         "lines.linewidth": 1.1, "lines.markersize": 3.5}


@contextmanager
def style():
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", rc=FONTS):
        yield


# ---- one style per entry across a report --------------------------------------------------------
@dataclass(frozen=True)
class EntryStyle:
    label: str
    color: tuple
    marker: str
    linestyle: str

    def line(self, **kw) -> dict:
        return {"color": self.color, "marker": self.marker, "ls": self.linestyle,
                "label": self.label, **kw}


def entry_styles(entries, name=None) -> dict[tuple, EntryStyle]:
    """(method, init, optimizer) -> its style, assigned in sorted order: the k-th entry takes
    colour k mod 10; past the palette's 10 colours the line style changes and the marker shifts,
    so two entries sharing a colour still differ in both. `name` maps an entry to its legend
    label (a report passes the tables' display labels, `paper.entry_labels`); by default the label
    is the specs of the fields that differ between entries."""
    entries = sorted({tuple(e) for e in entries})
    varying = [i for i in range(3) if len({e[i] for e in entries}) > 1] or [0]
    name = name or (lambda entry: " / ".join(entry[i] for i in varying))
    styles = {}
    for k, entry in enumerate(entries):
        lap = k // len(PALETTE)
        styles[entry] = EntryStyle(name(entry), PALETTE[k % len(PALETTE)],
                                   MARKERS[(k + lap) % len(MARKERS)],
                                   LINESTYLES[lap % len(LINESTYLES)])
    return styles


def _entries(runs: pd.DataFrame):
    """(entry key, its runs) in sorted order."""
    return [(tuple(k), g) for k, g in runs.groupby(["method", "init", "optimizer"], sort=True)]


def _fixed(runs: pd.DataFrame) -> str:
    """', init X, optimizer Y' for the entry fields one value covers."""
    parts = [f"{c} {runs[c].iloc[0]}" for c in ("init", "optimizer") if runs[c].nunique() == 1]
    return "".join(f", {p}" for p in parts)


# ---- axes ---------------------------------------------------------------------------------------
def _lr_axis(ax, lrs) -> None:
    """Log axis with a labelled tick at every learning rate of the grid."""
    lrs = sorted(set(float(x) for x in lrs))
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{x:g}" for x in lrs], rotation=45 if len(lrs) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lrs[0] / 10 ** 0.2, lrs[-1] * 10 ** 0.2)


def _dodge(k: int, m: int) -> float:
    """Factor that shifts entry k of m sideways on a log axis (at most +-0.1 decades), so entries
    with equal values do not hide each other."""
    step = min(0.025, 0.2 / max(m - 1, 1))
    return 10 ** ((k - (m - 1) / 2) * step)


def _log_y(ax, lo: float, hi: float) -> None:
    """Log y axis from lo to hi, with labelled ticks at 1-2-5 (every integer mantissa within a
    decade) where the range spans few decades."""
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    decades = math.log10(hi / lo)
    subs = tuple(range(1, 10)) if decades < 1 else (1, 2, 5) if decades <= 3 else (1,)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _robust_range(values, pad: float = 1.5, q=(1, 99)) -> tuple[float, float] | None:
    """The q-percentile range of the finite positive values, widened by `pad` on a log scale: one
    exploded or underflowed step does not decide the axis."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return None
    lo, hi = np.percentile(v, q)
    hi = hi if hi > lo else lo * 10
    return float(lo / pad), float(hi * pad)


def _legend(fig: Figure, handles, labels, ncols: int | None = None) -> None:
    """Below the axes, outside the data; long labels wrap so the legend is no wider than the
    figure."""
    if not handles:
        return
    ncols = ncols or min(3 if fig.get_figwidth() > COLUMN + 1 else 2, len(labels))
    chars = max(12, int(fig.get_figwidth() * 17 / ncols) - 6)  # ~17 characters per inch at 7 pt
    labels = [textwrap.fill(label, chars) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", frameon=False, ncols=ncols)
    # the figure grows by the legend's height (~0.14 in a line at 7 pt), so the axes keep theirs
    lines = sum(label.count("\n") + 1 for label in labels)
    fig.set_figheight(fig.get_figheight() + 0.14 * math.ceil(lines / ncols) + 0.1)


def _title(fig: Figure, text: str) -> None:
    chars = int(fig.get_figwidth() * 15)  # ~15 characters per inch at 8 pt
    fig.suptitle(textwrap.fill(text, chars), fontsize=8)


def _unique_legend(axes) -> tuple[list, list]:
    seen = {}
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


# ---- per task: against the learning rate --------------------------------------------------------
def _loss_cap(runs: pd.DataFrame) -> float:
    start = runs["init_loss"].to_numpy(np.float64)
    start = start[np.isfinite(start)]
    return LOSS_CAP * float(np.median(start)) if start.size else math.nan


def _capped_points(ax, g: pd.DataFrame, column: str, cap: float, style: EntryStyle,
                   shift: float) -> list[float]:
    """Mean and 95% t-interval over the seeds that did not diverge, per learning rate, drawn at
    most at `cap`; a learning rate where a seed diverged gets an x at the top edge. Returns the
    drawn values (for the axis range)."""
    xs, m, lo, hi, blown = [], [], [], [], []
    for lr, at in g.groupby("lr", sort=True):
        values = at[column].to_numpy(np.float64)
        ok = (at["diverged"].to_numpy() == 0) & np.isfinite(values)
        if (~ok).any():
            blown.append(lr * shift)
        stats = mean_ci(values[ok], bounds=METRIC_RANGES.get(column, (0.0, math.inf)))
        xs.append(lr * shift)
        m.append(stats[0])
        lo.append(stats[1] if np.isfinite(stats[1]) else stats[0])
        hi.append(stats[2] if np.isfinite(stats[2]) else stats[0])
    m, lo, hi = (np.minimum(np.asarray(a, np.float64), cap) for a in (m, lo, hi))
    keep = np.isfinite(m)
    xs = np.asarray(xs)[keep]
    ax.errorbar(xs, m[keep], yerr=[m[keep] - lo[keep], hi[keep] - m[keep]], capsize=1.5,
                elinewidth=0.7, **style.line())
    if blown:
        ax.scatter(blown, [cap] * len(blown), marker="x", s=18, color=style.color, clip_on=False,
                   zorder=4, lw=1.1)
    return [*m[keep], *lo[keep]]


def _capped_axis(ax, drawn: list[float], cap: float) -> None:
    """Top edge at the cap, whatever diverged; log scale where the losses span 20x or more."""
    positive = [v for v in drawn if np.isfinite(v) and v > 0]
    low = min(positive, default=cap)
    if low < cap / 20:
        _log_y(ax, low / 1.5, cap)
    else:
        ax.set_ylim(0, cap)


def loss_vs_lr(runs: pd.DataFrame, styles: dict[tuple, EntryStyle], title: str) -> Figure:
    """Final training loss (top) and the target metric (bottom) against learning rate: one line
    per entry, one column per init. Losses: mean over the seeds that did not diverge with its 95%
    t-interval, on an axis capped at LOSS_CAP times the median loss at initialization; a learning
    rate where a seed diverged has an x at the top edge instead of a point that stretches the
    axis. An accuracy-like metric: mean over every seed."""
    from matplotlib.lines import Line2D

    metric = runs["target_metric"].iloc[0]
    cap = _loss_cap(runs)
    inits = sorted(runs["init"].unique())
    capped = (("final_train_loss", True), (metric, metric.endswith("loss")))
    with style():
        fig = Figure(figsize=(COLUMN if len(inits) == 1 else WIDTH, 3.6), layout="constrained")
        axes = fig.subplots(2, len(inits), squeeze=False, sharex=True, sharey="row")
        drawn: dict[int, list[float]] = {0: [], 1: []}
        for j, init in enumerate(inits):
            entries = _entries(runs[runs["init"] == init])
            for row, (column, is_loss) in enumerate(capped):
                ax = axes[row, j]
                for k, (entry, g) in enumerate(entries):
                    shift = _dodge(k, len(entries))
                    if is_loss:
                        drawn[row] += _capped_points(ax, g, column, cap, styles[entry], shift)
                        continue
                    by_lr = g.groupby("lr", sort=True)
                    stats = np.array([mean_ci(at[column], bounds=METRIC_RANGES[column])
                                      for _, at in by_lr])
                    m, lo, hi = stats.T
                    lo, hi = np.where(np.isfinite(lo), lo, m), np.where(np.isfinite(hi), hi, m)
                    ax.errorbar(np.array(list(by_lr.groups)) * shift, m, yerr=[m - lo, hi - m],
                                capsize=1.5, elinewidth=0.7, **styles[entry].line())
                _lr_axis(ax, runs["lr"])
            if len(inits) > 1:
                axes[0, j].set_title(f"init {init}")
            axes[1, j].set_xlabel("learning rate")
        for row, (_, is_loss) in enumerate(capped):
            if is_loss:  # the rows share their y axis: set once, from every panel's values
                _capped_axis(axes[row, 0], drawn[row], cap)
        axes[0, 0].set_ylabel("final train loss")
        axes[1, 0].set_ylabel(metric.replace("_", " "))
        handles, labels = _unique_legend(axes)
        handles.append(Line2D([], [], ls="", marker="x", color="0.3"))
        labels.append(f"a seed diverged (axis capped at {LOSS_CAP:g}x the initial loss)")
        _legend(fig, handles, labels, ncols=1 if len(inits) == 1 else 3)
        _title(fig, f"{title}{_fixed(runs)}: final loss and {metric.replace('_', ' ')} vs "
                    f"learning rate (mean over seeds that did not diverge, 95% t-interval)")
    return fig


def divergence_vs_lr(runs: pd.DataFrame, styles: dict[tuple, EntryStyle],
                     title: str) -> Figure | None:
    """Share of seeds that diverged against learning rate with its 95% Wilson band: one line per
    entry, one panel per init. None when no run diverged (a figure of zeros says nothing)."""
    if not (runs["diverged"] > 0).any():
        return None
    inits = sorted(runs["init"].unique())
    with style():
        fig = Figure(figsize=(COLUMN if len(inits) == 1 else WIDTH, 2.5), layout="constrained")
        axes = fig.subplots(1, len(inits), squeeze=False, sharey=True)[0]
        for ax, init in zip(axes, inits):
            entries = _entries(runs[runs["init"] == init])
            for k, (entry, g) in enumerate(entries):
                by_lr = [(lr, wilson(int((at["diverged"] > 0).sum()), len(at)))
                         for lr, at in g.groupby("lr", sort=True)]
                x = np.array([lr for lr, _ in by_lr]) * _dodge(k, len(entries))
                p, lo, hi = np.array([s for _, s in by_lr]).T
                s = styles[entry]
                ax.plot(x, p, **s.line())
                ax.fill_between(x, lo, hi, color=s.color, alpha=0.08, lw=0)
            _lr_axis(ax, runs["lr"])
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("learning rate")
            if len(inits) > 1:
                ax.set_title(f"init {init}")
        axes[0].set_ylabel("share of seeds diverged")
        _legend(fig, *_unique_legend(axes))
        _title(fig, f"{title}{_fixed(runs)}: divergence vs learning rate "
                    f"({runs['seed'].nunique()} seeds, 95% Wilson bands)")
    return fig


# ---- per task: over the steps of training -------------------------------------------------------
def _quartiles(values: np.ndarray) -> np.ndarray:
    """[25th, 50th, 75th percentile] over seeds per step, of the finite positive values (a run
    that diverged has none after it did)."""
    values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    with warnings.catch_warnings():  # a step after every run diverged has no median
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(values, [25, 50, 75], axis=0)


def _median_band(ax, values: np.ndarray, style: EntryStyle, steps: np.ndarray | None = None,
                 **line) -> np.ndarray:
    """Median over seeds and the inter-quartile band of `values` [seeds, steps], at `steps`
    only where given (a series recorded every K steps); returns the quartiles drawn."""
    if steps is None:
        steps = np.arange(values.shape[1])
    else:
        values = values[:, steps]
    q25, med, q75 = q = _quartiles(values)
    ax.plot(steps, med, **style.line(**{"marker": None, "lw": 0.9, **line}))
    ax.fill_between(steps, q25, q75, color=style.color, alpha=0.18, lw=0)
    return q


def grad_norm_traces(traces: dict[tuple, np.ndarray], styles: dict[tuple, EntryStyle],
                     title: str) -> Figure:
    """Pre-transform gradient norm per step: median over seeds and the inter-quartile band.
    `traces`: entry -> [seeds, steps] (NaN after a run diverged). The y range covers the 1st to
    99th percentile of the drawn values, so one exploded step does not flatten the rest."""
    with style():
        fig = Figure(figsize=(COLUMN, 2.4), layout="constrained")
        ax = fig.subplots()
        drawn = [_median_band(ax, values, styles[entry]) for entry, values in traces.items()]
        span = _robust_range(drawn)
        if span:
            _log_y(ax, *span)
        ax.set_xlabel("step")
        ax.set_ylabel("grad norm (before the method)")
        _legend(fig, *ax.get_legend_handles_labels())
        _title(fig, f"{title}: median over seeds, inter-quartile band")
    return fig



def _lr_panels(lrs: list[float]) -> tuple[Figure, np.ndarray]:
    """A grid of up to three panels a row, one per learning rate, sharing both axes; the cells
    past the last rate hidden."""
    cols = min(3, len(lrs))
    rows = math.ceil(len(lrs) / cols)
    fig = Figure(figsize=(WIDTH, 0.6 + 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(lrs):]:
        ax.set_visible(False)
    return fig, axes

def loss_traces(traces: dict[float, dict[tuple, np.ndarray]], styles: dict[tuple, EntryStyle],
                title: str, cap: float) -> Figure:
    """Training loss per step, one panel per learning rate: median over seeds and the
    inter-quartile band per entry. `traces`: lr -> entry -> [seeds, steps]. Shared y axis from the
    1st percentile of the drawn values to `cap` at most."""
    lrs = sorted(traces)
    with style():
        fig, axes = _lr_panels(lrs)
        drawn = []
        for i, lr in enumerate(lrs):
            ax = axes.flat[i]
            for entry, values in traces[lr].items():
                drawn.append(_median_band(ax, values, styles[entry]))
            ax.set_title(f"lr {lr:g}")
        span = _robust_range(drawn)
        if span:
            _log_y(axes[0, 0], span[0], min(span[1], cap) if np.isfinite(cap) else span[1])
        for ax in axes[:, 0]:
            ax.set_ylabel("train loss")
        for ax in axes[-1]:
            ax.set_xlabel("step")
        _legend(fig, *_unique_legend(axes))
        _title(fig, f"{title}: training loss per learning rate (median over seeds, "
                    f"inter-quartile band)")
    return fig


# ---- across tasks -------------------------------------------------------------------------------
def depth_figure(points: pd.DataFrame, styles: dict[tuple, EntryStyle]) -> Figure:
    """Final training loss (left) and the target metric (right) at each entry's best learning rate
    against depth: colour and marker per entry, solid plain and dashed residual twins; one row per
    model family. `points`: depth, family, family_label, architecture, method, init, optimizer,
    metric, quality_mean/lo/hi, loss_mean/lo/hi."""
    families = sorted(points["family"].unique())
    metric = points["metric"].iloc[0]
    dashes = {"plain": "-", "residual": "--"}
    depths = sorted(points["depth"].unique())
    with style():
        fig = Figure(figsize=(WIDTH, 0.7 + 2.2 * len(families)), layout="constrained")
        axes = fig.subplots(len(families), 2, squeeze=False, sharex=True)
        for row, family in enumerate(families):
            sub = points[points["family"] == family]
            for col, column in enumerate(("loss", "quality")):
                ax = axes[row, col]
                for (*entry, arch), g in sub.groupby(["method", "init", "optimizer",
                                                      "architecture"], sort=True):
                    g = g.sort_values("depth")
                    s = styles[tuple(entry)]
                    ax.plot(g["depth"], g[f"{column}_mean"], **s.line(ls=dashes[arch]))
                    ax.fill_between(g["depth"], g[f"{column}_lo"], g[f"{column}_hi"],
                                    color=s.color, alpha=0.06, lw=0)
                ax.set_xscale("log", base=2)
                ax.set_xticks(depths, [str(d) for d in depths])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_title(sub["family_label"].iloc[0] if len(families) > 1 else "")
            axes[row, 0].set_ylabel("final train loss\n(capped at step-0 loss)")
            axes[row, 1].set_ylabel(metric.replace("_", " "))
        for ax in axes[-1]:
            ax.set_xlabel("depth")
        from matplotlib.lines import Line2D

        handles, labels = _unique_legend(axes)
        handles = [Line2D([], [], color=h.get_color(), marker=h.get_marker()) for h in handles]
        handles += [Line2D([], [], color="0.3", ls=ls) for ls in dashes.values()]
        labels += list(dashes)
        _legend(fig, handles, labels)
        _title(fig, "depth vs result at each entry's best learning rate: plain (solid) vs "
                    "residual (dashed) twins; mean over seeds, 95% t-interval bands")
    return fig


def _cell_text(values: np.ndarray) -> np.ndarray:
    """Two decimals without the leading zero (".97" fits a narrow cell at 5.5 pt); "" for NaN."""
    return np.vectorize(lambda x: "" if np.isnan(x) else f"{x:.2f}".replace("0.", ".", 1))(
        values).astype(object)


def stability_by_task(table: pd.DataFrame, overall: pd.Series,
                      styles: dict[tuple, EntryStyle]) -> Figure | None:
    """Heatmap of the per-task stability scores (columns: task variants) behind the overall score
    (last column), one row per entry in the overall board's order; blank where an entry did not run
    a task or the task has no score. None when no score exists."""
    if table.isna().all(axis=None):
        return None
    from matplotlib.colors import Normalize

    values = table.to_numpy(np.float64)
    top = max(1.0, float(np.nanmax(values)))
    labels = [textwrap.fill(styles[e].label, 36) for e in table.index]
    lines = sum(label.count("\n") + 1 for label in labels)
    cmap = sns.color_palette("viridis", as_cmap=True).with_extremes(bad="0.92")
    kw = dict(cmap=cmap, norm=Normalize(0, top), fmt="", linewidths=0.4,
              annot_kws={"fontsize": 5.5})
    with style():
        # room for the rotated task names below the cells (~0.055 in per character at 6 pt)
        below = 0.055 * max(len(str(c)) for c in [*table.columns, "overall"])
        fig = Figure(figsize=(WIDTH, 1.0 + below + 0.14 * lines), layout="constrained")
        grid = fig.add_gridspec(1, 3, width_ratios=[table.shape[1], 1.2, 0.35])
        ax, ax_all, ax_bar = (fig.add_subplot(grid[0, i]) for i in range(3))
        sns.heatmap(values, ax=ax, cbar=False, annot=_cell_text(values),
                    xticklabels=list(table.columns), yticklabels=labels, **kw)
        whole = overall.to_numpy(np.float64)[:, None]
        sns.heatmap(whole, ax=ax_all, cbar_ax=ax_bar, annot=_cell_text(whole),
                    xticklabels=["overall"], yticklabels=False,
                    cbar_kws={"label": "stability"}, **kw)
        ax.tick_params(axis="x", labelrotation=90, labelsize=6)
        ax.tick_params(axis="y", labelsize=6)
        ax_all.tick_params(axis="x", labelrotation=90, labelsize=6)
        _title(fig, "stability per task variant behind the overall score (a task's variants "
                    "share its weight; blank: not run, or no entry improved)")
    return fig


def performance_profiles(entries: list[tuple], ratios: np.ndarray, weights: np.ndarray,
                         scores: np.ndarray, styles: dict[tuple, EntryStyle]) -> Figure:
    """rho(tau) for tau in [1, 4] (AlgoPerf), the best-scoring entries first."""
    order = np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")[:PROFILE_ENTRIES]
    taus = np.linspace(1.0, 4.0, 301)
    rho = performance_profile(ratios[order], taus, weights)
    with style():
        fig = Figure(figsize=(COLUMN, 2.8), layout="constrained")
        ax = fig.subplots()
        for k, i in enumerate(order):
            s = styles[tuple(entries[i])]
            ax.step(taus, rho[k], where="post", color=s.color, ls=s.linestyle,
                    label=f"{s.label} ({scores[i]:.2f})")
            ax.plot(taus[::50], rho[k][::50], ls="", marker=s.marker, color=s.color)
        ax.set_xlim(1, 4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r"$\tau$ (steps to target / fewest of any entry)")
        ax.set_ylabel(r"$\rho(\tau)$: share of tasks")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=h.get_color(), ls=h.get_linestyle(),
                          marker=styles[tuple(entries[i])].marker)
                   for h, i in zip(ax.get_lines()[::2], order)]
        _legend(fig, handles, [h.get_label() for h in ax.get_lines()[::2]], ncols=1)
        shown = f", best {len(order)} of {len(entries)}" if len(entries) > len(order) else ""
        _title(fig, f"performance profiles{shown} (legend: profile score)")
    return fig


# ---- diagnose: one run's per-layer gradient norms over training ---------------------------------
HEATMAP_LABELS = 16  # layer names on the heatmap's axis; more are thinned out


def layer_heatmap(telemetry: dict[str, np.ndarray], layer_names: list[str], run: dict,
                  frozen_at: int, title: str) -> Figure:
    """`diagnosis_figure` of one run of a sweep: its telemetry rows (loss, grad_norm,
    layer_grad_norm; no run axis) diagnosed as `diagnose` does, without activation statistics."""
    from .diagnosis import diagnose

    diag = diagnose(telemetry, layer_names, run, frozen_at)
    return diagnosis_figure(diag, telemetry["loss"], telemetry["layer_grad_norm"], title)


def diagnosis_figure(diag, loss: np.ndarray, layer_grad_norm: np.ndarray,
                     title: str | None = None) -> Figure:
    """The loss per step (and its 20-step mean) above a heatmap of every layer's gradient norm over
    steps (log colour scale; grey where not finite or zero), with the diagnosis's events marked:
    lines on the loss and triangles above the heatmap for transient spikes, the explosion, the step
    its first layers jumped, recovery and divergence; arrows at the layers where it started (of the
    first spike if nothing exploded). Layers with vanishing gradients have blue names. `title`
    (default: the run's task, entry, learning rate and seed) heads the figure; the legend sits
    between it and the loss panel, outside the data."""
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
        ax_loss.legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncols=4, frameon=False,
                       borderaxespad=0)
        run = diag.run
        _title(fig, title or f"{run['task']}, {run['method']}, init {run['init']}, "
                             f"lr {run['lr']:g}, seed {run['seed']}")
    return fig


# ---- curvature ----------------------------------------------------------------------------------
def sharpness_traces(traces: dict[float, dict[tuple, np.ndarray]], edges: dict[float, float],
                     styles: dict[tuple, EntryStyle], title: str,
                     series: str = "sharpness") -> Figure:
    """λ_max against step, one panel per learning rate: median over seeds and the inter-quartile
    band per entry at the steps it was estimated, with the learning rate's stability threshold
    (`metrics.stability_threshold`: 2/η for SGD) as a dashed line. `traces`: lr -> entry ->
    [seeds, steps] of the `series` telemetry (NaN between estimates and after a run diverged);
    `edges`: lr -> threshold."""
    lrs = sorted(traces)
    with style():
        fig, axes = _lr_panels(lrs)
        drawn = []
        for i, lr in enumerate(lrs):
            ax = axes.flat[i]
            for entry, values in traces[lr].items():
                steps = np.flatnonzero(np.isfinite(values).any(axis=0))
                if not steps.size:
                    continue
                drawn.append(_median_band(ax, values, styles[entry], steps,
                                          marker=styles[entry].marker))
            if lr in edges:
                ax.axhline(edges[lr], color="0.3", ls="--", lw=0.8, label="stability threshold")
                drawn.append(np.array([edges[lr]]))
            ax.set_title(f"lr {lr:g}")
        span = _robust_range(np.concatenate([np.ravel(d) for d in drawn]) if drawn else [],
                             q=(0, 100))
        if span:
            _log_y(axes[0, 0], *span)
        for ax in axes[:, 0]:
            ax.set_ylabel(series.replace("_", " "))
        for ax in axes[-1]:
            ax.set_xlabel("step")
        _legend(fig, *_unique_legend(axes))
        _title(fig, f"{title}: {series.replace('_', ' ')} per learning rate (median over seeds, "
                    f"inter-quartile band) and the threshold of stable steps")
    return fig

"""Figures: what each draws, read back from the matplotlib artists (data, axis limits, colours),
against the definitions: one style per entry across a report's figures, a loss axis capped so a
diverged run cannot stretch it, Wilson bands, robust grad-norm ranges, no figure of zeros."""

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from stabench import plots

LRS = (0.01, 0.1, 1.0)
OPT = "sgd"


def runs_frame(entries, final=lambda method, lr, seed: 0.5, diverged=lambda m, lr, s: False,
               seeds=3, init_loss=2.0):
    rows = []
    for method, init in entries:
        for lr in LRS:
            for seed in range(seeds):
                d = diverged(method, lr, seed)
                rows.append({"method": method, "init": init, "optimizer": OPT, "lr": lr,
                             "seed": seed, "diverged": float(d),
                             "final_train_loss": 1e24 if d else final(method, lr, seed),
                             "init_loss": init_loss, "target_metric": "test_accuracy",
                             "test_accuracy": 0.1 if d else 0.9})
    return pd.DataFrame(rows)


def lines_by_label(ax):
    """Label -> the data line of each plotted entry (an errorbar's line carries its label on its
    container)."""
    lines = {line.get_label(): line for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    lines.update({c.get_label(): c.lines[0] for c in ax.containers if c.lines[0] is not None})
    return lines


def wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


# ---- styles -------------------------------------------------------------------------------------
def test_every_entry_has_its_own_style_whatever_the_order_it_comes_in():
    entries = [(f"m{k:02d}", "default", OPT) for k in range(23)]
    styles = plots.entry_styles(entries)
    assert plots.entry_styles(reversed(entries)) == styles
    looks = {(s.color, s.marker, s.linestyle) for s in styles.values()}
    assert len(looks) == len(entries)
    # past the palette's colours, an entry sharing a colour differs in marker and line style
    first, eleventh = styles[entries[0]], styles[entries[len(plots.PALETTE)]]
    assert first.color == eleventh.color
    assert first.marker != eleventh.marker and first.linestyle != eleventh.linestyle
    # the palette: seaborn's colour-blind-safe one
    import seaborn as sns
    assert [s.color for s in list(styles.values())[:10]] == list(sns.color_palette("colorblind"))
    # labels name only what differs between entries
    assert styles[entries[3]].label == "m03"


def test_an_entry_keeps_its_colour_and_marker_across_figures():
    entries = [("none", "default"), ("clip", "default"), ("agc", "default"), ("zclip", "default")]
    runs = runs_frame(entries, diverged=lambda m, lr, s: m == "none" and lr == 1.0)
    styles = plots.entry_styles(runs[["method", "init", "optimizer"]].drop_duplicates()
                                .itertuples(index=False))
    # two figures drawing different subsets of the entries
    loss = plots.loss_vs_lr(runs[runs["method"] != "agc"], styles, "t")
    div = plots.divergence_vs_lr(runs[runs["method"] != "clip"], styles, "t")
    for method in ("none", "zclip"):
        s = styles[(method, "default", OPT)]
        for fig in (loss, div):
            line = lines_by_label(fig.axes[0])[s.label]
            assert to_rgb(line.get_color()) == to_rgb(s.color)
            assert line.get_marker() == s.marker
    assert "clip" not in lines_by_label(div.axes[0])


# ---- against the learning rate ------------------------------------------------------------------
def test_a_diverged_run_does_not_set_the_loss_axis():
    runs = runs_frame([("none", "default"), ("clip", "default")],
                      final=lambda m, lr, s: 0.1 * (1 + s) if lr == 1.0 else 0.5,
                      diverged=lambda m, lr, s: m == "none" and lr == 1.0 and s == 0)
    fig = plots.loss_vs_lr(runs, plots.entry_styles([("none", "default", OPT),
                                                     ("clip", "default", OPT)]), "t")
    ax = fig.axes[0]
    cap = plots.LOSS_CAP * 2.0
    assert ax.get_ylim()[1] == pytest.approx(cap)  # not 1e24
    # the diverged seed is left out of the mean at its learning rate ...
    line = lines_by_label(ax)["none"]
    x, y = line.get_data()
    assert y[np.argmin(np.abs(np.log(x)))] == pytest.approx(np.mean([0.2, 0.3]))
    # ... and marked by an x at the top edge, at that learning rate only
    (marks,) = [c for c in ax.collections if c.get_offsets().size and
                np.allclose(c.get_offsets()[:, 1], cap)]
    assert np.allclose(marks.get_offsets()[:, 0], 1.0, rtol=0.3)
    assert len(marks.get_offsets()) == 1
    # the x axis has a labelled tick at every learning rate of the grid
    np.testing.assert_allclose(ax.get_xticks(), LRS)
    bottom = fig.axes[1]  # the panels share the x axis: the bottom one carries the labels
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0.01", "0.1", "1"]


def test_the_loss_interval_is_the_t_interval_over_seeds():
    losses = {0: 0.4, 1: 0.5, 2: 0.65}
    runs = runs_frame([("none", "default")], final=lambda m, lr, s: losses[s])
    fig = plots.loss_vs_lr(runs, plots.entry_styles([("none", "default", OPT)]), "t")
    ax = fig.axes[0]
    line = lines_by_label(ax)["none"]
    assert np.allclose(line.get_ydata(), np.mean(list(losses.values())))
    from scipy import stats
    v = np.array(list(losses.values()))
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / math.sqrt(3)
    bars = [c for c in ax.collections if hasattr(c, "get_segments") and c.get_segments()]
    ys = np.array([seg[:, 1] for c in bars for seg in c.get_segments()])
    np.testing.assert_allclose(np.sort(ys, axis=1),
                               [[v.mean() - half, v.mean() + half]] * len(LRS))


def test_no_divergence_figure_when_no_run_diverged():
    runs = runs_frame([("none", "default"), ("clip", "default")])
    styles = plots.entry_styles([("none", "default", OPT), ("clip", "default", OPT)])
    assert plots.divergence_vs_lr(runs, styles, "t") is None


def test_divergence_share_and_its_wilson_band():
    runs = runs_frame([("none", "default")], seeds=5,
                      diverged=lambda m, lr, s: s < {0.01: 0, 0.1: 2, 1.0: 5}[lr])
    fig = plots.divergence_vs_lr(runs, plots.entry_styles([("none", "default", OPT)]), "t")
    ax = fig.axes[0]
    expected = np.array([wilson_by_hand(k, 5) for k in (0, 2, 5)])
    np.testing.assert_allclose(lines_by_label(ax)["none"].get_ydata(), expected[:, 0])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    for lo, hi in expected[:, 1:]:
        assert np.isclose(band, lo, atol=1e-9).any() and np.isclose(band, hi, atol=1e-9).any()
    assert ax.get_ylim() == pytest.approx((-0.03, 1.03))


# ---- over steps ---------------------------------------------------------------------------------
def test_grad_norm_traces_draw_the_median_and_quartiles_on_a_robust_axis():
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=(5, 200))
    values[4, 20:] = np.nan  # a seed that diverged at step 20
    values[:, 150] = 1e15  # one step where every seed exploded
    values[:3, 160] = 1e-20  # one where the gradient underflowed
    entry = ("none", "default", OPT)
    fig = plots.grad_norm_traces({entry: values}, plots.entry_styles([entry]), "t")
    ax = fig.axes[0]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_ydata(), np.nanmedian(values, axis=0))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    q25, q75 = np.nanpercentile(values, [25, 75], axis=0)
    assert np.isclose(band[:, None], q25[None]).any(axis=0).all()
    assert np.isclose(band[:, None], q75[None]).any(axis=0).all()
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and 1e-3 < lo < 1 < 5 < hi < 1e3  # not 1e-20..1e15
    assert len(ax.get_yticks()) >= 3


def test_loss_traces_draw_one_panel_per_learning_rate():
    entries = [("none", "default", OPT), ("clip", "default", OPT)]
    rng = np.random.default_rng(1)
    traces = {lr: {e: rng.uniform(0.5, 2.0, (3, 50)) for e in entries} for lr in LRS}
    fig = plots.loss_traces(traces, plots.entry_styles(entries), "t", cap=6.0)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["lr 0.01", "lr 0.1", "lr 1"]
    for ax, lr in zip(panels, LRS):
        by_label = lines_by_label(ax)
        for e in entries:
            np.testing.assert_allclose(by_label[e[0]].get_ydata(),
                                       np.median(traces[lr][e], axis=0))
    assert panels[0].get_ylim()[1] <= 6.0


# ---- across tasks -------------------------------------------------------------------------------
def test_stability_breakdown_shows_each_task_and_the_overall_score():
    entries = [("none", "default", OPT), ("clip", "default", OPT)]
    table = pd.DataFrame({"a": [0.25, 0.5], "b": [np.nan, 0.75]},
                         index=pd.MultiIndex.from_tuples(entries))
    overall = pd.Series([0.25, 0.625])
    fig = plots.stability_by_task(table, overall, plots.entry_styles(entries))
    main, whole = fig.axes[0], fig.axes[1]
    assert sorted(t.get_text() for t in main.texts if t.get_text()) == [".25", ".50", ".75"]
    assert sorted(t.get_text() for t in whole.texts) == [".25", ".62"]
    assert [t.get_text() for t in main.get_yticklabels()] == ["none", "clip"]
    all_nan = table.assign(a=np.nan, b=np.nan)
    assert plots.stability_by_task(all_nan, overall, plots.entry_styles(entries)) is None


def test_report_legends_name_entries_as_the_tables_do(tmp_path, monkeypatch):
    from test_report import fake_record, table_metrics

    from stabench import reports
    from stabench.store import Store

    store = Store(tmp_path / "records")
    for method, behaves_as in (("none", "none"), ("clip_norm(max_norm=0.5)", "clip_norm")):
        fake_record(store, method, metrics_fn=table_metrics(behaves_as))
    legends, save = [], reports.save_figure

    def record(fig, stem):  # each figure's legend texts, as it is saved
        boxes = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
        legends.extend(t.get_text() for box in boxes if box for t in box.get_texts())
        return save(fig, stem)

    monkeypatch.setattr(reports, "save_figure", record)
    reports.write_report(tmp_path / "records", tmp_path / "out", warn=lambda _: None)
    assert "clip-norm (0.5)" in legends and "none" in legends
    assert not any("max_norm" in text for text in legends)

"""The report of a results directory: reads its records, builds the leaderboards (leaderboard.py)
and figures (plots.py), and writes every file: report.md, leaderboards.tex, leaderboard.csv,
overall.csv, runs.parquet and plots/*.png (and .pdf). Also reads a written report back
(`board_rows_for`: what did best on a task).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from PIL import Image

from .leaderboard import (ALPHA, ENTRY, Leaderboards, baseline_checks, build_leaderboards,
                          depth_points, render_baseline_checks,
                          render_overall, render_task, slug, task_weights, to_markdown)
from .paper import (INTERVALS, MAIN_METRICS, definitions, definitions_markdown, entry_labels,
                    latex_files, main_table, split_entries, to_frame)
from .paper import to_markdown as paper_markdown
from .html import Section, write_html
from .metrics import mean_ci
from .plots import (LOSS_CAP, depth_figure, divergence_vs_lr, entry_styles, grad_norm_traces,
                    layer_heatmap, loss_traces, loss_vs_lr, performance_profiles,
                    stability_by_task)
from .registry import UserError
from .store import Record, check_writable, commit_label, load_records
from .tasks import flatten
from .text import plural

# what the figures show, for the HTML report's definitions
FIGURE_DEFINITIONS = [
    "Figures draw each entry (method, init, optimizer) in one colour and marker across the "
    "report (a colour-blind-safe palette; past its 10 colours the line style changes too); "
    "entries are shifted slightly sideways on learning-rate axes so equal values stay visible.",
    f"Final loss vs learning rate: mean over the seeds that did not diverge with a 95% "
    f"Student-t interval; the axis ends at {LOSS_CAP:g} times the median loss at "
    f"initialization, and an x at its top edge marks a learning rate where a seed diverged.",
    "Divergence vs learning rate: share of seeds that diverged with a 95% Wilson band; a task "
    "where no run diverged has no such figure.",
    "Training loss and gradient norm per step: median over seeds with the inter-quartile band, "
    "for one init (default where it ran); the gradient-norm and per-layer figures show the "
    "smallest learning rate at which the baseline (method none) diverged, else the largest.",
]
# report.html embeds every figure: at half the files' 200 dpi, sharp on a screen, a report of a
# few dozen figures stays a few MB instead of over ten
SCREEN_DPI = 100
CSV_DROP = ("quality_seeds", "stability_seeds")  # per-seed arrays: no CSV cell holds them


def save_figure(fig: Figure, stem: Path) -> Path:
    """Write stem.png and stem.pdf; returns the stem."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=200, bbox_inches="tight")
    # TrueType fonts in the PDF: journals' checks (IEEE PDF eXpress, ACM) reject Type 3 fonts.
    # No creation date: the same figure gives the same bytes, so regenerated results diff cleanly.
    with rc_context({"pdf.fonttype": 42}):
        fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight",
                    metadata={"CreationDate": None})
    return stem


def screen_png(fig: Figure) -> bytes:
    """The figure as a PNG at SCREEN_DPI in 256 colours (a third of the bytes of full colour;
    plots, and colour maps of 256 entries, lose nothing visible), for report.html."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=SCREEN_DPI, bbox_inches="tight")
    image = Image.open(buffer).convert("RGB").quantize(256, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def save_png(fig: Figure, path: Path) -> Path:
    """Write the figure as one PNG (a diagnosis's, beside its Markdown); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


@dataclass
class Report(Leaderboards):
    """The leaderboards (DataFrames) of the records under `directory`; `write` renders them and
    their figures into files."""

    directory: Path
    records: list[Record]

    def write(self, out: str | Path | None = None, plots: bool = True,
              main_metric: str = "stability", interval: str = "brackets") -> str:
        """Write the report's files to `out` (default: the records' directory); returns the
        Markdown. `main_metric`: what the main table shows (stability or target); `interval`: how
        intervals read (brackets: 0.97 [0.96, 0.98], pm: 0.97 ± 0.01)."""
        check_choices(main_metric, interval)
        out = Path(out or self.directory)
        check_writable(out)
        figures, figure_notes = _draw_figures(self, out / "plots") if plots else ({}, {})
        tables = [render_overall(self.overall, self.unsolved, len(self.boards))]
        tables += [render_task(v, b, self.used[self.used["variant"] == v])
                   for v, b in self.boards.items()]
        lines = ["# stabench report", ""]
        lines += [f"> Note: {n}" for n in self.notes] + ([""] if self.notes else [])
        repeats = len(self.runs) - len(self.used)
        counted = (f" counted ({len(self.runs)} stored, {repeats} of them repeats)" if repeats
                   else "")
        counts = (f"{plural(self.runs['spec_hash'].nunique(), 'cell')}, "
                  f"{plural(len(self.used), 'run')}{counted}, "
                  f"{plural(len(self.boards), 'task variant')}.")
        lines += [counts, ""]
        checks = baseline_checks(self.used)
        check_table = render_baseline_checks(checks) if len(checks) else None
        if check_table is not None:
            lines += ["## Baseline checks", "", to_markdown(check_table), "",
                      check_table.caption, ""]
        complete, partial = split_entries(self)
        mains = []  # (heading, table): report.md's and report.html's first sections
        for entries, full in ((complete, True), (partial, False)):
            if len(entries):
                main = main_table(self, entries, main_metric, full)
                title = "Main table" if full else "Main table: entries that did not run every task"
                mains.append((title, main))
                lines += [f"## {title}", "", paper_markdown(main, interval), "", main.caption, ""]
        for table, key in zip(tables, ["overall", *self.boards]):
            lines += [f"## {'Overall' if key == 'overall' else key}", "", to_markdown(table), "",
                      table.caption, ""]
            lines += [*figure_notes[key], ""] if figure_notes.get(key) else []
            lines += [f"![{title}]({path.relative_to(out).as_posix()}.png)"
                      for title, path, _ in figures.get(key, [])]
            lines += [""] if figures.get(key) else []
        lines += ["## Definitions", "", definitions_markdown(ALPHA), ""]
        lines += ["## Provenance", "", *_provenance(self.runs, self.directory), ""]
        markdown = "\n".join(lines)
        (out / "report.md").write_text(markdown)
        sections = [Section(title, [to_frame(main, interval)]) for title, main in mains]
        if check_table is not None:
            sections.insert(0, Section("Baseline checks", [check_table]))
        sections += [Section("Overall" if key == "overall" else key, [table],
                             figure_notes.get(key, []),
                             [(t, png) for t, _, png in figures.get(key, [])])
                     for table, key in zip(tables, ["overall", *self.boards])]
        terms = [f"**{term}**: {text}" for term, text in definitions(ALPHA)]
        write_html(out / "report.html", "stabench report",
                   [f"Note: {n}" for n in self.notes] + [counts], sections,
                   terms + (FIGURE_DEFINITIONS if plots else []),
                   _provenance(self.runs, self.directory))
        latex = latex_files(self, main_metric, interval)
        (out / "tables").mkdir(exist_ok=True)
        for name, text in latex.items():
            (out / "tables" / name).write_text(text)
        (out / "leaderboards.tex").write_text("\n".join(
            text for name, text in latex.items() if name != "definitions.tex"))
        pd.concat([b.drop(columns=list(CSV_DROP)).assign(variant=v)
                   for v, b in self.boards.items()],
                  ignore_index=True).to_csv(out / "leaderboard.csv", index=False)
        self.overall.to_csv(out / "overall.csv", index=False)
        parquet = self.runs.assign(record=[str(Path(p).relative_to(self.directory))
                                           for p in self.runs["record"]])
        parquet.to_parquet(out / "runs.parquet", index=False)
        return markdown


def check_choices(main_metric: str, interval: str) -> None:
    """Refuse, in one line, a main metric or interval style the tables do not know."""
    if main_metric not in MAIN_METRICS:
        raise UserError(f"main metric '{main_metric}': choose one of {', '.join(MAIN_METRICS)}")
    if interval not in INTERVALS:
        raise UserError(f"interval style '{interval}': choose one of {', '.join(INTERVALS)}")


def read_report(directory: str | Path, warn: Callable[[str], None] = print) -> Report:
    """The report of every record under `directory`. Untrustworthy records are named through
    `warn` and left out, and the report's notes go to `warn` too; a directory with no usable
    record is a UserError."""
    directory = Path(directory)
    return _tabulate(directory, _usable_records(directory, warn), warn)


def write_report(directory: str | Path, out: str | Path | None = None, plots: bool = True,
                 warn: Callable[[str], None] = print, main_metric: str = "stability",
                 interval: str = "brackets") -> str:
    """Read every record under `directory`, write the report files to `out` (default: the same
    directory) and return the Markdown (see `read_report` for what is left out, `Report.write`
    for the options)."""
    check_choices(main_metric, interval)
    directory = Path(directory)
    records = _usable_records(directory, warn)
    check_writable(Path(out or directory))  # before the tables take their seconds
    return _tabulate(directory, records, warn).write(out, plots, main_metric, interval)


def _usable_records(directory: Path, warn: Callable[[str], None]) -> list[Record]:
    records, bad = load_records(directory, warn)
    if not records:
        raise UserError(f"no usable records in {directory}"
                        + (f" ({len(bad)} skipped, listed above)" if bad else "")
                        + f"; write some with: python -m stabench sweep ... --out {directory}")
    return records


def _tabulate(directory: Path, records: list[Record], warn: Callable[[str], None]) -> Report:
    report = Report(**vars(build_leaderboards(records)), directory=directory, records=records)
    for note in report.notes:
        warn(f"note: {note}")
    return report


def _provenance(runs: pd.DataFrame, directory: Path) -> list[str]:
    cells = runs.drop_duplicates("spec_hash")
    # records written before provenance had cpu_model read None (NaN in the frame)
    model = [f" ({m})" if isinstance(m, str) else "" for m in cells["cpu_model"]]
    devices = sorted({f"{n}x {k} ({b}), {c} CPU cores{m}" for n, k, b, c, m in zip(
        cells["device_count"], cells["device_kind"], cells["backend"], cells["cpu_count"], model)})
    versions = sorted({f"jax {j}, flax {f}, optax {o}" for j, f, o in zip(
        cells["version.jax"], cells["version.flax"], cells["version.optax"])})
    commits = sorted({commit_label(c, d)
                      for c, d in zip(cells["git_commit"], cells["git_dirty"])})
    setups = cells["numerics"].nunique() if "numerics" in cells else 1
    rounding = [] if setups <= 1 else [
        f"- rounding: the records come from {setups} different host configurations (CPU, caches, "
        f"threads, flags, versions, devices or run group; see Reproducibility in the README): "
        f"their numbers agree within float32 rounding, not bit for bit"]
    return [
        f"- records: {len(cells)} cells, {len(runs)} runs stored, read from `{directory}`",
        *rounding,
        f"- hardware: {'; '.join(devices)}",
        f"- software: {'; '.join(versions)}; stabench git {', '.join(commits)}",
        f"- trained: {cells['date'].min()} to {cells['date'].max()}; compile "
        f"{cells['timing.compile_s'].sum():.0f} s, training {cells['timing.steady_s'].sum():.0f} s "
        f"(summed over cells)",
    ]


# ---- the report's figures ----------------------------------------------------------------------
def _trace_lr(runs: pd.DataFrame) -> tuple[float, str]:
    """The learning rate whose traces separate methods best, and why it is the one shown: the
    smallest at which the baseline (method none) diverged, else the largest of the grid."""
    base = runs[runs["method"] == "none"]
    if base.empty:
        return float(runs["lr"].max()), "the largest of the grid; no baseline (method none) ran"
    bad = base.groupby("lr")["diverged"].max()
    bad = bad[bad > 0]
    if len(bad):
        return float(bad.index.min()), "the smallest at which the baseline (none) diverged"
    return float(runs["lr"].max()), "the largest of the grid; the baseline (none) never diverged"


def _trace_init(runs: pd.DataFrame) -> str:
    """The init whose runs the per-step figures show: default if it ran."""
    return "default" if "default" in set(runs["init"]) else sorted(runs["init"].unique())[0]


def _traces(runs: pd.DataFrame, telemetry: Callable[[str], dict], lr: float,
            name: str = "grad_norm") -> dict[tuple, np.ndarray]:
    """Entry -> its telemetry array `name` at `lr` ([seeds, steps]), for the runs given."""
    traces: dict[tuple, list[np.ndarray]] = {}
    for (h, *entry), _ in runs[runs["lr"] == lr].groupby(["spec_hash", *ENTRY], sort=True):
        tel = telemetry(h)
        traces.setdefault(tuple(entry), []).append(tel[name][np.isclose(tel["lrs"], lr)])
    return {e: np.concatenate(parts) for e, parts in sorted(traces.items())}


def _layer_figure(runs: pd.DataFrame, by_hash: dict, telemetry: Callable[[str], dict], lr: float,
                  why: str, title: str) -> Figure | None:
    """Per-layer gradient norms of one run at `lr`: the baseline's (method none; else the first
    entry's) first seed that diverged there, else its first seed. None without per-layer
    telemetry."""
    at = runs[runs["lr"] == lr]
    pick = at[at["method"] == "none"] if (at["method"] == "none").any() else at
    pick = pick.sort_values(["method", "optimizer", "seed"])
    diverged = pick[pick["diverged"] > 0]
    row = (diverged if len(diverged) else pick).iloc[0]
    names = by_hash[row["spec_hash"]].data.get("layer_names") or []
    tel = telemetry(row["spec_hash"])
    if not names or "layer_grad_norm" not in tel:
        return None
    k = int(np.flatnonzero((tel["seeds"] == row["seed"]) & np.isclose(tel["lrs"], lr))[0])
    seed = (f"seed {row['seed']}, the first that diverged" if len(diverged)
            else f"seed {row['seed']}; no seed diverged")
    run = {k_: row[k_] for k_ in ("task", "method", "init", "optimizer", "seed", "lr")}
    return layer_heatmap({n: tel[n][k] for n in ("loss", "grad_norm", "layer_grad_norm")}, names,
                         run, int(tel["diverged_at"][k]),
                         f"{title}: per-layer grad norm of {row['method']}, init {row['init']}, "
                         f"{row['optimizer']}, lr {lr:g} ({why}), {seed}")


def _depth_losses(points: pd.DataFrame, used: pd.DataFrame) -> pd.DataFrame:
    """Adds loss_mean/lo/hi: the final training loss at each point's best learning rate, capped at
    its run's loss at initialization (a diverged run learned nothing), mean and 95% t-interval."""
    stats = []
    for p in points.itertuples(index=False):
        at = used[(used["variant"] == p.variant) & (used["method"] == p.method)
                  & (used["init"] == p.init) & (used["optimizer"] == p.optimizer)
                  & (used["lr"] == p.best_lr)]
        stats.append(mean_ci(np.minimum(at["final_train_loss"], at["init_loss"]),
                             bounds=(0.0, math.inf)))
    m, lo, hi = np.array(stats, np.float64).reshape(-1, 3).T
    return points.assign(loss_mean=m, loss_lo=lo, loss_hi=hi)


def _draw_figures(report: Report, directory: Path) -> tuple[
        dict[str, list[tuple[str, Path, bytes]]], dict[str, list[str]]]:
    """Draw the report's figures into `directory`; returns section -> [(title, path stem, PNG
    for the screen)] and section -> notes that stand in for a figure with nothing to show."""
    figures: dict[str, list[tuple[str, Path, bytes]]] = {"overall": []}
    notes: dict[str, list[str]] = {}
    by_hash = {r.spec.hash: r for r in report.records}
    # legends name entries as the tables do
    styles = entry_styles(report.overall[ENTRY].itertuples(index=False),
                          name=entry_labels(report.overall[ENTRY]).get)
    loaded: dict[str, dict] = {}

    def saved(title: str, fig: Figure, stem: Path) -> tuple[str, Path, bytes]:
        return title, save_figure(fig, stem), screen_png(fig)

    def telemetry(spec_hash: str) -> dict:
        if spec_hash not in loaded:
            loaded[spec_hash] = by_hash[spec_hash].telemetry()
        return loaded[spec_hash]

    for variant in report.boards:
        runs = report.ranked[report.ranked["variant"] == variant]
        name = slug(variant)
        out = figures.setdefault(variant, [])
        out.append(saved("final loss and result vs learning rate",
                         loss_vs_lr(runs, styles, variant), directory / f"{name}-lr"))
        fig = divergence_vs_lr(runs, styles, variant)
        if fig is None:
            notes.setdefault(variant, []).append(
                f"No run diverged on this task ({plural(len(runs), 'run')}), so it has no "
                f"divergence figure.")
        else:
            out.append(saved("divergence vs learning rate", fig, directory / f"{name}-divergence"))
        init = _trace_init(runs)
        shown = runs[runs["init"] == init]
        title = f"{variant}, init {init}" + (f", {shown['optimizer'].iloc[0]}"
                                             if shown["optimizer"].nunique() == 1 else "")
        losses = {lr: _traces(shown, telemetry, lr, "loss") for lr in sorted(shown["lr"].unique())}
        out.append(saved("training loss per step", loss_traces(
            losses, styles, title, LOSS_CAP * float(np.nanmedian(runs["init_loss"]))),
            directory / f"{name}-loss-steps"))
        lr, why = _trace_lr(shown)
        traces = _traces(shown, telemetry, lr)
        if traces:
            out.append(saved(f"grad norm at lr {lr:g}", grad_norm_traces(
                traces, styles, f"{title}, lr {lr:g} ({why})"), directory / f"{name}-gradnorm"))
        fig = _layer_figure(shown, by_hash, telemetry, lr, why, variant)
        if fig is not None:
            out.append(saved(f"per-layer grad norm at lr {lr:g}", fig,
                             directory / f"{name}-layers"))
        loaded.clear()  # one task's telemetry at a time
    overall = report.overall
    entries = [tuple(e) for e in overall[ENTRY].itertuples(index=False)]
    variants = sorted(report.boards)
    table = pd.DataFrame({v: report.boards[v].set_index(ENTRY)["stability"].reindex(entries)
                          for v in variants}, index=pd.MultiIndex.from_tuples(entries))
    fig = stability_by_task(table, overall["stability"], styles)
    if fig is not None:
        figures["overall"].append(saved("stability per task", fig,
                                        directory / "stability-by-task"))
    if len(report.unsolved) < len(report.boards):
        task_of = dict(zip(report.used["variant"], report.used["task"]))
        figures["overall"].append(saved("performance profiles", performance_profiles(
            entries, report.ratios, task_weights(variants, task_of),
            overall["profile_score"].to_numpy(), styles), directory / "profiles"))
    points = depth_points(report, {h: r.spec for h, r in by_hash.items()})
    if points is not None:
        for metric, g in points.groupby("metric"):
            figures["overall"].append(saved(
                f"depth vs training loss and {metric}",
                depth_figure(_depth_losses(g, report.ranked), styles),
                directory / f"depth-{slug(metric)}"))
    return figures, notes


# ---- reading a report back: what did best on a task ----------------------------------------------
# the config fields that make two variants the same problem
PROBLEM = ("loss", "dataset.", "model.")


def _same_value(stored, value) -> bool:
    """A runs.parquet cell (lists and dicts as JSON, mixed-type columns as text) vs a config
    value."""
    if isinstance(value, (list, dict)):
        return stored == json.dumps(value)
    return stored == value or str(stored) == str(value)


def board_rows_for(directory: str | Path, spec) -> tuple[list[dict], Path | None]:
    """Leaderboard rows (a report's leaderboard.csv) of the task variant that is this spec's
    problem: same task, data (real or fake), loss, dataset and model, found through the report's
    runs.parquet beside it (the first such variant by name if there are several), each with
    `lr_runs`: {learning rate: (runs that diverged, runs)} of its entry, read from runs.parquet.
    ([], None) if no report under `directory` ranks it."""
    root = Path(directory)
    if not root.is_dir():
        return [], None
    wanted = {k: v for k, v in flatten(spec.task_config).items() if k.startswith(PROBLEM)}
    for path in sorted(root.rglob("leaderboard.csv")):
        try:
            board = pd.read_csv(path)
            runs = pd.read_parquet(path.with_name("runs.parquet"))
        except (OSError, ValueError, ImportError):
            continue
        if not {"variant", *ENTRY, "rank"} <= set(board.columns):
            continue
        cells = runs[(runs["task"] == spec.task) & (runs["fake_data"] == spec.fake_data)]
        variants = {row["variant"] for _, row in cells.drop_duplicates("variant").iterrows()
                    if all(f"config.{k}" in row and _same_value(row[f"config.{k}"], v)
                           for k, v in wanted.items())}
        ranked = sorted(variants & set(board["variant"]))
        if ranked:  # several variants of one problem (other steps, batch sizes): the first
            rows = board[board["variant"] == ranked[0]].to_dict("records")
            mine = cells[cells["variant"] == ranked[0]]
            # what diagnose checks its advice against: an entry's divergence at each rate
            failed = (mine["diverged"] != 0).groupby([mine[k] for k in (*ENTRY, "lr")]).agg(
                ["sum", "size"])
            for row in rows:
                entry = tuple(row[k] for k in ENTRY)
                row["lr_runs"] = {float(key[-1]): (int(n_failed), int(n))
                                  for key, (n_failed, n) in failed.iterrows()
                                  if tuple(key[:-1]) == entry}
            return rows, path
    return [], None

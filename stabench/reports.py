"""The report of a results directory: reads its records, builds the leaderboards (leaderboard.py)
and figures (plots.py), and writes every file: report.md, leaderboards.tex, leaderboard.csv,
overall.csv, runs.parquet and plots/*.png (and .pdf). Also reads a written report back
(`board_rows_for`: what did best on a task).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .leaderboard import (ENTRY, Leaderboards, build_leaderboards, depth_points, profile_weights,
                          render_overall, render_task, slug, to_latex, to_markdown)
from .plots import (depth_accuracy, divergence_heatmap, grad_norm_traces, lr_curves,
                    performance_profiles)
from .registry import UserError
from .store import Record, check_writable, commit_label, load_records
from .tasks import flatten
from .text import plural

CSV_DROP = ("quality_seeds", "stability_seeds")  # per-seed arrays: no CSV cell holds them


def save_figure(fig: Figure, stem: Path) -> Path:
    """Write stem.png and stem.pdf; returns the stem."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=150, bbox_inches="tight")
    # no creation date: the same figure gives the same bytes, so regenerated results diff cleanly
    fig.savefig(stem.with_suffix(".pdf"), bbox_inches="tight", metadata={"CreationDate": None})
    return stem


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

    def write(self, out: str | Path | None = None, plots: bool = True) -> str:
        """Write the report's files to `out` (default: the records' directory); returns the
        Markdown."""
        out = Path(out or self.directory)
        check_writable(out)
        figures = _draw_figures(self, out / "plots") if plots else {}
        tables = [render_overall(self.overall, self.unsolved, len(self.boards))]
        tables += [render_task(v, b, self.used[self.used["variant"] == v])
                   for v, b in self.boards.items()]
        lines = ["# stabench report", ""]
        lines += [f"> Note: {n}" for n in self.notes] + ([""] if self.notes else [])
        repeats = len(self.runs) - len(self.used)
        counted = (f" counted ({len(self.runs)} stored, {repeats} of them repeats)" if repeats
                   else "")
        lines += [f"{plural(self.runs['spec_hash'].nunique(), 'cell')}, "
                  f"{plural(len(self.used), 'run')}{counted}, "
                  f"{plural(len(self.boards), 'task variant')}.", ""]
        for table, key in zip(tables, ["overall", *self.boards]):
            lines += [f"## {'Overall' if key == 'overall' else key}", "", to_markdown(table), "",
                      table.caption, ""]
            lines += [f"![{title}]({path.relative_to(out).as_posix()}.png)" for title, path in
                      figures.get(key, [])]
            lines += [""] if figures.get(key) else []
        lines += ["## Provenance", "", *_provenance(self.runs, self.directory), ""]
        markdown = "\n".join(lines)
        (out / "report.md").write_text(markdown)
        (out / "leaderboards.tex").write_text(
            "% needs \\usepackage{booktabs}\n" + "\n".join(to_latex(t) for t in tables))
        pd.concat([b.drop(columns=list(CSV_DROP)).assign(variant=v)
                   for v, b in self.boards.items()],
                  ignore_index=True).to_csv(out / "leaderboard.csv", index=False)
        self.overall.to_csv(out / "overall.csv", index=False)
        parquet = self.runs.assign(record=[str(Path(p).relative_to(self.directory))
                                           for p in self.runs["record"]])
        parquet.to_parquet(out / "runs.parquet", index=False)
        return markdown


def read_report(directory: str | Path, warn: Callable[[str], None] = print) -> Report:
    """The report of every record under `directory`. Untrustworthy records are named through
    `warn` and left out, and the report's notes go to `warn` too; a directory with no usable
    record is a UserError."""
    directory = Path(directory)
    return _tabulate(directory, _usable_records(directory, warn), warn)


def write_report(directory: str | Path, out: str | Path | None = None, plots: bool = True,
                 warn: Callable[[str], None] = print) -> str:
    """Read every record under `directory`, write the report files to `out` (default: the same
    directory) and return the Markdown (see `read_report` for what is left out)."""
    directory = Path(directory)
    records = _usable_records(directory, warn)
    check_writable(Path(out or directory))  # before the tables take their seconds
    return _tabulate(directory, records, warn).write(out, plots)


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
def _trace_lr(runs: pd.DataFrame) -> float:
    """The learning rate whose traces separate methods best: the smallest at which the baseline
    (method none) diverged, else the largest of the grid."""
    base = runs[runs["method"] == "none"]
    bad = base.groupby("lr")["diverged"].max()
    bad = bad[bad > 0]
    return float(bad.index.min()) if len(bad) else float(runs["lr"].max())


def _traces(runs: pd.DataFrame, records_by_hash: dict, lr: float) -> dict[str, np.ndarray]:
    """Entry label -> its pre-transform grad norms at `lr` ([seeds, steps]), from the telemetry
    files, for one init (default if it ran)."""
    init = "default" if "default" in set(runs["init"]) else sorted(runs["init"].unique())[0]
    sub = runs[(runs["init"] == init) & (runs["lr"] == lr)]
    traces = {}
    for (h, method, optimizer), _ in sub.groupby(["spec_hash", "method", "optimizer"], sort=True):
        tel = records_by_hash[h].telemetry()
        rows = np.flatnonzero(np.isclose(tel["lrs"], lr))
        label = method if sub["optimizer"].nunique() == 1 else f"{method} / {optimizer}"
        traces[label] = tel["grad_norm"][rows]
    return traces


def _draw_figures(report: Report, directory: Path) -> dict[str, list[tuple[str, Path]]]:
    """Draw the report's figures into `directory`; returns section -> [(title, path stem)]."""
    figures: dict[str, list[tuple[str, Path]]] = {"overall": []}
    by_hash = {r.spec.hash: r for r in report.records}
    for variant in report.boards:
        runs = report.used[report.used["variant"] == variant]
        name = slug(variant)
        out = figures.setdefault(variant, [])
        out.append(("loss and result vs learning rate",
                    save_figure(lr_curves(runs, variant), directory / f"{name}-lr")))
        out.append(("divergence rate", save_figure(divergence_heatmap(runs, variant),
                                                   directory / f"{name}-divergence")))
        lr = _trace_lr(runs)
        traces = _traces(runs, by_hash, lr)
        if traces:
            out.append((f"grad norm at lr {lr:g}", save_figure(grad_norm_traces(
                traces, f"{variant}, lr {lr:g}"), directory / f"{name}-gradnorm")))
    overall = report.overall
    if len(report.unsolved) < len(report.boards):
        labels = [" / ".join(str(r[c]) for c in ENTRY if overall[c].nunique() > 1) or r["method"]
                  for _, r in overall.iterrows()]
        variants = sorted(report.boards)
        task_of = dict(zip(report.used["variant"], report.used["task"]))
        figures["overall"].append(("performance profiles", save_figure(performance_profiles(
            labels, report.ratios, profile_weights(variants, task_of, report.ratios),
            overall["profile_score"].to_numpy()), directory / "profiles")))
    points = depth_points(report, {h: r.spec for h, r in by_hash.items()})
    if points is not None:
        for metric, g in points.groupby("metric"):
            figures["overall"].append((f"depth vs {metric}", save_figure(
                depth_accuracy(g, metric), directory / f"depth-{slug(metric)}")))
    return figures


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
    runs.parquet beside it (the first such variant by name if there are several).
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
            return board[board["variant"] == ranked[0]].to_dict("records"), path
    return [], None

"""Tables a paper can \\input as they are: the main table (entries x task variants, one number with
its interval per cell), per-task tables of at most 7 numeric columns with an appendix table for the
rest, the overall scores, the key from display labels to full specs, and the shared definitions.
Rendered as LaTeX (booktabs, siunitx `S` columns: numbers aligned on the decimal point) and as
Markdown. Captions stay short; what every table shares is defined once (`definitions`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .leaderboard import ALPHA, ENTRY, Leaderboards, Table, entry_names, slug, task_weights
from .metrics import METRIC_RANGES, mean_ci
from .text import format_number, plural

MAIN_METRICS = ("stability", "target")
INTERVALS = ("brackets", "pm")


@dataclass(frozen=True)
class Cell:
    value: float = math.nan  # NaN: no value (-); inf: the text of the column's `inf_text`
    lo: float = math.nan  # NaN: no interval
    hi: float = math.nan
    bold: bool = False
    tie: bool = False  # not significantly different from the column's best (a dagger)


@dataclass
class Column:
    header: tuple[str, ...]  # lines, bottom-aligned
    cells: list[Cell]
    group: str = ""  # a heading spanning the neighbouring columns of the same group
    decimals: int | None = None  # None: from `digits` significant digits of the column's largest
    digits: int = 2
    each: bool = False  # `digits` significant digits per value (grids spanning decades: LRs)
    inf_text: str = "inf"

    def has_interval(self) -> bool:
        return any(not math.isnan(c.lo) for c in self.cells)

    def places(self) -> int:
        if self.decimals is not None:
            return self.decimals
        finite = [abs(c.value) for c in self.cells if np.isfinite(c.value) and c.value != 0]
        if not finite:
            return max(self.digits - 1, 0)
        return int(np.clip(self.digits - 1 - math.floor(math.log10(max(finite))), 0, 6))

    def number(self, x: float) -> str | None:
        """The number as the table shows it; None where it is text (missing or infinite)."""
        if not np.isfinite(x):
            return None
        if self.each:
            text = f"{x:.{self.digits}g}"
            mantissa, _, exponent = text.partition("e")
            return mantissa + (f"e{int(exponent)}" if exponent else "")
        return f"{x:.{self.places()}f}"

    def text(self, x: float) -> str:
        return self.number(x) or ("-" if math.isnan(x) else self.inf_text if x > 0
                                  else "-" + self.inf_text)


@dataclass
class PaperTable:
    names: pd.DataFrame  # text columns (the entry's label parts), one row per entry
    columns: list[Column]
    caption: str  # plain text; LaTeX and Markdown escape it
    label: str  # \label, also the file name


# ---- labels --------------------------------------------------------------------------------------
def entry_labels(entries: pd.DataFrame) -> dict[tuple, str]:
    """(method, init, optimizer) -> the entry's display label as one line, " / " between its
    parts: what figure legends show, so they name entries as the tables do."""
    names = entry_names(entries)
    return {tuple(key): " / ".join(label) for key, label in zip(
        entries[ENTRY].itertuples(index=False), names.itertuples(index=False))}


def _parse_variant(variant: str) -> tuple[str, list[tuple[str, str]], bool]:
    """A variant label's task, its settings as (name, value), and whether it ran on fake data."""
    task, _, rest = variant.partition("[")
    fake = task.endswith(" (fake data)") or rest.endswith(" (fake data)")
    task, rest = task.removesuffix(" (fake data)"), rest.removesuffix(" (fake data)")
    settings = [p.partition("=") for p in rest.removesuffix("]").split(",") if p]
    return task, [(name.replace("_", " "), value) for name, _, value in settings], fake


def variant_header(variant: str) -> tuple[str, ...]:
    """A task variant's label as header lines: the task's words, then each varying setting."""
    task, settings, fake = _parse_variant(variant)
    lines: list[str] = []
    for word in task.split("_"):  # a long name breaks at its underscores
        if lines and len(lines[-1]) + 1 + len(word) <= 9:
            lines[-1] += " " + word
        else:
            lines.append(word)
    lines += [f"{name} {value}" for name, value in settings]
    return (*lines, *(["fake data"] if fake else []))


def variant_headers(variants: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(group, header lines) of each variant's column: a task shown in several variants is a group
    named once over its columns, each column showing only what tells its variant apart (`depth
    6`; `10/100` under `temporal order (seq len/steps)` where several settings vary), so a
    column is as narrow as its numbers; a task shown once is its own column."""
    parsed = [_parse_variant(v) for v in variants]
    shown = [(task, fake) for task, _, fake in parsed]
    out = []
    for variant, (task, settings, fake) in zip(variants, parsed):
        if shown.count((task, fake)) == 1:
            out.append(("", variant_header(variant)))
            continue
        group = task.replace("_", " ") + (" (fake data)" if fake else "")
        if len(settings) == 1:
            out.append((group, (" ".join(settings[0]),)))
        else:
            names = "/".join(name for name, _ in settings)
            out.append((f"{group} ({names})", ("/".join(value for _, value in settings),)))
    return out


def _natural(text: str) -> list:
    """Sort key reading digit runs as numbers: depth=2 before depth=18."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


# ---- the tables ----------------------------------------------------------------------------------
def _learned(board: pd.DataFrame) -> pd.Series:
    """Entries whose runs improved on the loss at initialization (stability > 0): only these can be
    best in a column."""
    return board["stability"].fillna(0) > 0


def _bold(values: list[float], mode: str | None, eligible: list[bool]) -> list[bool]:
    v = np.array([x if ok else np.nan for x, ok in zip(values, eligible)], float)
    if mode is None or np.isnan(v).all():
        return [False] * len(values)
    best = np.nanmax(v) if mode == "max" else np.nanmin(v)
    return [bool(np.isfinite(best) and x == best) for x in v]


def _column(header, values, lo=None, hi=None, mode=None, eligible=None, ties=None,
            **fmt) -> Column:
    n = len(values)
    lo = [math.nan] * n if lo is None else list(lo)
    hi = [math.nan] * n if hi is None else list(hi)
    bold = _bold(list(values), mode, [True] * n if eligible is None else list(eligible))
    ties = [False] * n if ties is None else [t is True for t in ties]
    cells = [Cell(float(v), float(a), float(b), bb, t)
             for v, a, b, bb, t in zip(values, lo, hi, bold, ties)]
    return Column(tuple(header) if isinstance(header, tuple) else (header,), cells, **fmt)


def _stability_ci(seeds) -> tuple[float, float, float]:
    # a seed's stability is its mean improvement over the best mean: above 1 is possible
    return mean_ci(seeds, bounds=(0.0, math.inf))


def _quality_format(metric: str) -> dict:
    low, high = METRIC_RANGES.get(metric, (-math.inf, math.inf))
    return {"decimals": 3} if (low, high) == (0.0, 1.0) else {"digits": 3}


def _metric_name(metric: str) -> str:
    return metric.replace("test_", "test ").replace("accuracy", "acc.")


def split_entries(tables: Leaderboards) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The overall board's entries that ran every task variant, and the others."""
    complete = tables.overall["tasks"] == len(tables.boards)
    return tables.overall[complete], tables.overall[~complete]


def main_table(tables: Leaderboards, entries: pd.DataFrame, metric: str = "stability",
               complete: bool = True) -> PaperTable:
    """Entries as rows, task variants as columns: the stability score (or the target metric) with
    its interval, bold the best among entries that learned; and an overall column."""
    if metric not in MAIN_METRICS:
        raise ValueError(f"main metric '{metric}': choose one of {', '.join(MAIN_METRICS)}")
    keys = [tuple(r) for r in entries[ENTRY].itertuples(index=False)]
    variants = [v for v in sorted(tables.boards, key=_natural) if any(
        k in set(map(tuple, tables.boards[v][ENTRY].itertuples(index=False))) for k in keys)]
    columns = []
    for v, (group, header) in zip(variants, variant_headers(variants)):
        board = tables.boards[v].set_index(ENTRY).reindex(keys)
        learned = _learned(board).to_list()
        if metric == "stability":
            stats = [_stability_ci(s) if isinstance(s, np.ndarray) else (math.nan,) * 3
                     for s in board["stability_seeds"]]
            columns.append(_column(header, [s[0] for s in stats], [s[1] for s in stats],
                                   [s[2] for s in stats], "max", learned, decimals=2,
                                   group=group))
        else:
            q_metric = tables.boards[v]["quality_metric"].iloc[0]
            mode = tables.boards[v]["quality_mode"].iloc[0]
            columns.append(_column(header, board["quality_mean"], board["quality_lo"],
                                   board["quality_hi"], mode, learned, group=group,
                                   **_quality_format(q_metric)))
    ranked = complete  # scores over different task sets do not compare: no best among them
    if metric == "stability":
        overall = [_overall_stability(tables, k, variants) for k in keys]
        columns.append(_column(("overall",), [o[0] for o in overall], [o[1] for o in overall],
                               [o[2] for o in overall], "max" if ranked else None,
                               (entries["stability"].fillna(0) > 0).to_list(), decimals=2))
    else:
        columns.append(_column(("profile", "score"), entries["profile_score"],
                               mode="max" if ranked else None, decimals=2))
    what = "Stability score" if metric == "stability" else "Target metric at the best LR"
    who = ("entries that ran every task variant" if complete
           else "entries that ran only some task variants (-: not run)")
    last = ("overall: task-weighted mean" if metric == "stability"
            else "profile score: AlgoPerf's")
    caption = (f"{what} (mean over seeds, 95% interval) of the {who}; {last}. Bold: best in the "
               f"column among entries that learned.")
    label = "tab:main" if complete else "tab:main-partial"
    return PaperTable(entry_names(entries).reset_index(drop=True), columns, caption, label)


def _overall_stability(tables: Leaderboards, key, variants) -> tuple[float, float, float]:
    """The task-weighted mean stability, with a t-interval over seeds of each seed's weighted mean
    (where every task ran the same number of seeds)."""
    row = tables.overall.set_index(ENTRY).loc[key]
    arrays, names = [], []
    for v in variants:
        board = tables.boards[v].set_index(ENTRY)
        if key in board.index and not math.isnan(board.at[key, "stability"]):
            arrays.append(np.asarray(board.at[key, "stability_seeds"], float))
            names.append(v)
    task_of = dict(zip(tables.used["variant"], tables.used["task"]))
    value = float(row["stability"])
    if not arrays or len({a.size for a in arrays}) != 1 or arrays[0].size < 2:
        return value, math.nan, math.nan
    w = task_weights(names, task_of)
    _, lo, hi = _stability_ci(np.average(np.stack(arrays), axis=0, weights=w))
    return value, lo, hi


# per-task columns in the order shown: key -> (header lines, board column, bold direction, format);
# the first TASK_COLUMNS go to the task's table, the rest to its appendix table
TASK_SPECS = {
    "stability": (("stability",), "stability", "max", {"decimals": 2}),
    "quality": (None, "quality_mean", None, {}),  # header, direction, format from the target
    "diverged": (("diverged",), "diverged_rate", "min", {"decimals": 2}),
    "best_lr": (("best", "LR"), "best_lr", None, {"each": True}),
    "max_stable_lr": (("max stable", "LR"), "max_stable_lr", "max", {"each": True}),
    "steps_to_target": (("steps to", "target"), "steps_to_target", "min",
                        {"decimals": 0, "inf_text": "never"}),
    "lr_sensitivity": (("LR", "sensitivity"), "lr_sensitivity", "min", {"digits": 2}),
    "rank": (("rank",), "rank", None, {"decimals": 0}),
    "spiked": (("spiked",), "spiked_rate", None, {"decimals": 2}),
    "stable_width": (("stable", "width"), "stable_width", "max", {"digits": 2}),
    "clipped_share": (("clipped", "share"), "clipped_share", None, {"decimals": 2}),
    "max_grad_norm": (("max grad", "norm"), "max_grad_norm", "min", {"each": True}),
}
TASK_COLUMNS = 7
INTERVAL_OF = {"stability": None, "quality": ("quality_lo", "quality_hi"),
               "diverged": ("diverged_lo", "diverged_hi"), "spiked": ("spiked_lo", "spiked_hi")}
TIE_OF = {"stability": "stability_tie", "quality": "quality_tie", "diverged": "diverged_tie"}


def task_tables(variant: str, board: pd.DataFrame, runs: pd.DataFrame) -> tuple[PaperTable,
                                                                                 PaperTable]:
    """A task variant's table (the first TASK_COLUMNS columns of TASK_SPECS) and its appendix
    table (the rest); columns the board lacks are left out."""
    metric, mode = board["quality_metric"].iloc[0], board["quality_mode"].iloc[0]
    learned = _learned(board).to_list()
    columns = []
    for key, (header, col, direction, fmt) in TASK_SPECS.items():
        if col not in board:
            continue
        values, lo, hi = board[col].astype(float), None, None
        if key == "quality":
            header, direction, fmt = (*_metric_name(metric).split(" ", 1),), mode, \
                _quality_format(metric)
        if key == "stability":
            stats = [_stability_ci(s) for s in board["stability_seeds"]]
            lo, hi = [s[1] for s in stats], [s[2] for s in stats]
        elif INTERVAL_OF.get(key) and all(c in board for c in INTERVAL_OF[key]):
            lo, hi = board[INTERVAL_OF[key][0]], board[INTERVAL_OF[key][1]]
        ties = board[TIE_OF[key]] if key in TIE_OF and TIE_OF[key] in board else None
        columns.append(_column(header, values, lo, hi, direction, learned, ties, **fmt))
    names = entry_names(board, chosen=True).reset_index(drop=True)
    seeds, lrs = runs["seed"].nunique(), runs["lr"].nunique()
    value = format_number(float(runs["target_value"].iloc[0]))
    target = f"{_metric_name(metric)} {'≥' if mode == 'max' else '≤'} {value}"
    setup = (f"{plural(len(board), 'entry', 'entries')}, {plural(seeds, 'seed')} × "
             f"{plural(lrs, 'learning rate')}, {int(runs['steps'].max())} steps, target {target}")
    main = PaperTable(names, columns[:TASK_COLUMNS], (
        f"Task {variant} ({setup}). Bold: best among entries that learned; †: not significantly "
        f"different from the best (Holm-corrected, α = 0.05)."), f"tab:{slug(variant)}")
    appendix = PaperTable(names, columns[TASK_COLUMNS:], (
        f"Task {variant}, further columns. Bold: best among entries that learned."),
        f"tab:{slug(variant)}-more")
    return main, appendix


def overall_table(tables: Leaderboards, entries: pd.DataFrame, complete: bool) -> PaperTable:
    """The overall scores of one set of entries (those that ran every variant, or the others)."""
    learned = (entries["stability"].fillna(0) > 0).to_list()
    best = "max" if complete else None
    columns = [
        _column(("stability",), entries["stability"], mode=best, eligible=learned, decimals=2),
        _column(("profile", "score"), entries["profile_score"], mode=best, eligible=learned,
                decimals=2),
        _column(("mean", "rank"), entries["mean_rank"], mode="min" if complete else None,
                eligible=learned, digits=2),
        _column(("diverged",), entries["diverged_rate"], entries["diverged_lo"],
                entries["diverged_hi"], "min" if complete else None, learned, decimals=2),
    ]
    if not complete:
        columns.insert(0, _column(("tasks",), entries["tasks"], decimals=0))
    who = "entries that ran every task variant" if complete else "the other entries (unranked)"
    caption = (f"Overall scores of the {who}, over {plural(len(tables.boards), 'task variant')}. "
               f"Bold: best among entries that learned.")
    return PaperTable(entry_names(entries).reset_index(drop=True), columns, caption,
                      "tab:overall" if complete else "tab:overall-partial")


def key_rows(tables: Leaderboards) -> pd.DataFrame:
    """Each entry's display labels beside its full specs (method, init, optimizer)."""
    entries = tables.overall[ENTRY].reset_index(drop=True)
    names = entry_names(entries)
    return pd.DataFrame({**{f"{c} label": names[c] for c in names},
                         **{c: entries[c].astype(str) for c in names}})


# ---- what every table shares ---------------------------------------------------------------------
def definitions(alpha: float) -> list[tuple[str, str]]:
    """(term, definition) of every number the tables show: written once, here."""
    return [
        ("Stability score", "per task variant, the mean over seeds of the mean over an entry's "
         "runs (every learning rate of the grid) of the loss improvement (the median loss at "
         "initialization over the task's runs, one start for every entry, minus the final "
         "training loss, at least 0), divided by the best mean improvement any entry reaches at "
         "one learning rate on the task. 1: every learning rate trains as well as the best "
         "entry's best; 0: no run improved. Overall: the mean over task variants, each task "
         "weighing 1 and its variants sharing that weight."),
        ("Learned", "an entry learned on a task when its stability score is above 0 (some run "
         "improved on the loss at initialization). Bold marks the best value of a column among "
         "the entries that learned only."),
        ("Diverged", "the share of all runs (every learning rate and seed) that diverged: frozen "
         "(a non-finite loss, gradient or parameter that no method skipped), or with the mean "
         "of its last 20 training losses above max(2 L0, L0 + 1), L0 the initial loss."),
        ("Spiked", "the share of runs whose 20-step moving average of the loss went above that "
         "threshold during training (after step 20) and is back below it at the end: a loss "
         "spike the run recovered from, not a divergence."),
        ("Target metric", "the task's test metric at the entry's learning rate, chosen on the "
         "validation split held out of the training data: the rate with the best mean over "
         "seeds of the matching validation metric; ties go to fewer diverged runs, then the "
         "smaller rate. The test split is never read to choose."),
        ("Tuned", "an entry NAME tuned is a method run at several settings of its own "
         "hyperparameter (the same number for every method of the suite): the setting and "
         "learning rate with the best validation metric, chosen as for the target metric; the "
         "registered defaults stay an entry of their own."),
        ("Intervals", "95%: Student-t over seeds for means (cut to the values the metric can "
         "take), Wilson score for shares. Written as value [low, high], or value ± h, h the "
         "larger distance from the value to an end of the interval; where neither fits the "
         "width of a main table, compactly as value(h), h in units of the value's last digit: "
         "0.97(2) is 0.97 ± 0.02."),
        ("Tests", f"†: not significantly different from the column's best entry of the task "
         f"(two-sided Welch t-test over seeds for the stability score and target metric, "
         f"Fisher's exact test for divergence), Holm-corrected over the column's comparisons; "
         f"α = {alpha}."),
        ("Max stable LR", "the largest learning rate at which no seed diverged."),
        ("Steps to target", "the fewest, over learning rates, of the median over seeds of the "
         "steps to reach the target (never: no learning rate reached it on every seed)."),
        ("LR sensitivity", "(Wortsman et al. 2023) the mean over the grid of the final training "
         "loss, capped at the loss at initialization, minus its minimum over the grid."),
        ("Stable width", "the log10 span of consecutive learning rates where every seed stays "
         "stable and reaches the target."),
        ("Clipped share, max grad norm", "the mean share of steps whose gradient a method "
         "changed, and the median largest gradient norm, over the seeds at the best learning "
         "rate."),
        ("Profile score", "(AlgoPerf) 1/3 of the integral over τ from 1 to 4 of ρ(τ), the "
         "task-weighted share of all task variants an entry brings to its target within τ times "
         "the fewest steps any entry needs (a variant no entry solves counts as unsolved for "
         "every entry)."),
        ("Mean rank", "the task-weighted mean of the per-task ranks by stability score, ranked "
         "among the entries that ran every task variant only."),
    ]


# ---- LaTeX ---------------------------------------------------------------------------------------
LATEX_CHARS = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&",
               "#": r"\#", "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%",
               "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}",
               "|": r"\textbar{}", '"': r"\textquotedbl{}", "×": r"$\times$", "≥": r"$\geq$",
               "≤": r"$\leq$", "†": r"$^{\dagger}$", "α": r"$\alpha$", "±": r"$\pm$",
               "τ": r"$\tau$", "ρ": r"$\rho$", "–": "--"}
# straight quotes in typewriter type: the OT1 font's own, with no extra font needed
CODE_CHARS = {**LATEX_CHARS, "'": r"{\char13}", "`": r"{\char18}"}
PACKAGES = r"\usepackage{booktabs}, \usepackage{siunitx} (version 3)"


def escape_latex(text: str, chars: dict[str, str] = LATEX_CHARS) -> str:
    """Text as LaTeX typesets it: special characters escaped, the few symbols captions use in
    math mode."""
    return "".join(chars.get(ch, ch) for ch in str(text))


def code_latex(text: str) -> str:
    """Code (a spec) in typewriter type with straight quotes."""
    return r"\texttt{" + escape_latex(text, CODE_CHARS) + "}"


def _table_format(numbers: list[str]) -> str:
    """siunitx's table-format reserving room for every number of a column (with its compact
    uncertainty, `0.97(12)`, where it has one)."""
    sign = integer = decimals = uncertainty = exp_digits = 0
    exp_sign = False
    for s in numbers:
        m = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?(?:\((\d+)\))?(?:e(-?)(\d+))?", s)
        sign = max(sign, len(m[1]))
        integer, decimals = max(integer, len(m[2])), max(decimals, len(m[3] or ""))
        uncertainty = max(uncertainty, len(m[4] or ""))
        exp_digits, exp_sign = max(exp_digits, len(m[6] or "")), exp_sign or bool(m[5])
    fmt = f"{'-' if sign else ''}{max(integer, 1)}.{decimals}"
    fmt += f"({uncertainty})" if uncertainty else ""
    return fmt + (f"e{'-' if exp_sign else ''}{exp_digits}" if exp_digits else "")


def _halves(column: Column) -> list[float]:
    return [max(c.value - c.lo, c.hi - c.value) for c in column.cells]


def _compact(column: Column, cell: Cell) -> str:
    """`0.97(2)`: the value and the interval's larger half-width in units of its last digit."""
    value = column.number(cell.value)
    if value is None or math.isnan(cell.lo):
        return value
    places = len(value.partition(".")[2])
    half = max(cell.value - cell.lo, cell.hi - cell.value)
    return f"{value}({round(half * 10 ** places)})"


# Widths (pt) of text as TeX sets it, from Computer Modern's glyph widths at 10pt (cmr10's TFM;
# bold, cmbx, about 15% wider) scaled to the table's size: enough to choose a table's size and
# notation, or to split it into panels, before TeX sees it (the compile test measures the real ones)
TEXT_WIDTH = 469.75  # a one-column article, 10pt, 1 in margins
TABCOLSEP = 3.0
GLYPHS = {**dict.fromkeys("0123456789/abgov", 5.0), **dict.fromkeys(" -", 3.33),
          **dict.fromkeys(".,:;[]il'!", 2.78), **dict.fromkeys("()", 3.89),
          **dict.fromkeys("+=±", 7.78), **dict.fromkeys("%m", 8.33), "w": 7.22,
          **dict.fromkeys("ftj", 3.06), "r": 3.92, "s": 3.94,
          **dict.fromkeys("cexz", 4.44), **dict.fromkeys("dhnpu", 5.56),
          **dict.fromkeys("kqy", 5.28)}
CAPITAL, OTHER, BOLD = 7.5, 5.0, 1.15
SIZES = {"small": 0.925, "footnotesize": 0.85}  # cmr9's and cmr8's digits against cmr10's
COMPACT_NOTE = " 0.97(2): 0.97 ± 0.02, the interval's larger half-width."
MIN_WRAP = 60.0  # the narrowest a wrapped label column is made


def _width(text: str, size: str = "small", bold: bool = False) -> float:
    width = sum(GLYPHS.get(ch, CAPITAL if ch.isupper() else OTHER) for ch in text)
    return SIZES[size] * width * (BOLD if bold else 1.0)


def _column_width(column: Column, interval: str, size: str) -> float:
    numbers = max((_width(_markdown_cell(column, c, interval).replace("**", ""), size, c.bold)
                   for c in column.cells), default=0.0)
    header = max(_width(line, size) for line in column.header)
    return max(numbers, header) + 2 * TABCOLSEP


def _name_widths(table: PaperTable, size: str) -> list[float]:
    return [max(_width(n, size) for n in [c, *table.names[c]]) + 2 * TABCOLSEP
            for c in table.names.columns]


def _runs(columns: list[Column]) -> list[tuple[str, int]]:
    """(group, how many columns) of each run of neighbouring columns sharing a group."""
    runs: list[tuple[str, int]] = []
    for c in columns:
        if runs and c.group and runs[-1][0] == c.group:
            runs[-1] = (c.group, runs[-1][1] + 1)
        else:
            runs.append((c.group, 1))
    return runs


def _panel_width(table: PaperTable, panel: list[int], widths: list[float], size: str) -> float:
    """The width of some neighbouring columns (`widths`: every column's)."""
    total, start = 0.0, panel[0]
    for group, n in _runs([table.columns[j] for j in panel]):
        spanned = sum(widths[start:start + n])
        # a group heading wider than its columns widens them
        total += max(spanned, _width(group, size) + 2 * TABCOLSEP if group else 0.0)
        start += n
    return total


def _panels(table: PaperTable, interval: str, size: str = "small",
            wrap: float | None = None) -> list[list[int]]:
    """Columns per tabular: as many as fit the text width beside the row labels (the widest
    label column `wrap` pt wide where given), balanced."""
    names = _name_widths(table, size)
    if wrap is not None:
        names[int(np.argmax(names))] = wrap + 2 * TABCOLSEP
    widths = [_column_width(c, interval, size) for c in table.columns]
    room = TEXT_WIDTH - sum(names)
    for count in range(1, len(widths) + 1):  # the fewest panels whose balanced split fits
        per = math.ceil(len(widths) / count)
        panels = [list(range(i, min(i + per, len(widths)))) for i in range(0, len(widths), per)]
        if all(_panel_width(table, panel, widths, size) <= room for panel in panels):
            return panels
    return [[j] for j in range(len(widths))]


def _layout(column: Column, interval: str) -> tuple[str, list[list[str]], int]:
    """A column's tabular preamble, its number strings per part, and its physical width: the
    value, its interval's numbers (or the value with its compact uncertainty), and a column for
    the dagger where the column has one."""
    values = [column.number(c.value) for c in column.cells]
    if not column.has_interval():
        parts = [values]
    elif interval == "compact":
        parts = [[_compact(column, c) for c in column.cells]]
    elif interval == "pm":
        parts = [values, [column.number(h) for h in _halves(column)]]
    else:
        parts = [values, [column.number(c.lo) for c in column.cells],
                 [column.number(c.hi) for c in column.cells]]
    seps = {1: [], 2: [r"@{${}\pm{}$}"], 3: [r"@{\,[}", r"@{,\,}"]}[len(parts)]
    specs = [f"S[table-format={_table_format([s for s in p if s is not None] or ['0'])}]"
             for p in parts]
    preamble = specs[0] + "".join(sep + spec for sep, spec in zip(seps, specs[1:]))
    marks = any(c.tie for c in column.cells)
    if len(parts) == 3:  # the closing bracket takes the place of the column's right padding
        preamble += r"@{]\hspace{\tabcolsep}}" if not marks else r"@{]}l"
    elif marks:
        preamble += "@{}l"
    return preamble, parts, len(parts) + marks


def _latex_cell(column: Column, i: int, parts: list[list[str]], width: int) -> str:
    cell = column.cells[i]
    mark = r"$^{\dagger}$" if cell.tie else ""
    value = parts[0][i]
    if value is None or (len(parts) > 1 and any(p[i] is None for p in parts[1:])):
        # text, or a number without its interval: centred across the column
        text = escape_latex(column.text(cell.value))
        text = r"\textbf{" + text + "}" if cell.bold and value is not None else text
        return rf"\multicolumn{{{width}}}{{c}}{{{text}{mark}}}"
    first = (r"\bfseries " if cell.bold else "") + value
    return " & ".join([first, *[p[i] for p in parts[1:]]]
                      + ([mark] if width > len(parts) else []))


def _group_row(columns: list[Column], widths: list[int], offset: int) -> list[str]:
    """The row naming each group over its columns, a rule under each name; none without
    groups. `widths`: each column's physical width; `offset`: the label columns before them."""
    if not any(c.group for c in columns):
        return []
    cells, rules, start, k = [""] * offset, [], offset + 1, 0
    for group, n in _runs(columns):
        span = sum(widths[k:k + n])
        cells.append(rf"\multicolumn{{{span}}}{{c}}{{{escape_latex(group)}}}")
        rules += [rf"\cmidrule(lr){{{start}-{start + span - 1}}}"] if group else []
        start, k = start + span, k + n
    return [" & ".join(cells) + r" \\" + "".join(rules)]


def to_latex(table: PaperTable, interval: str = "brackets", size: str = "small",
             wrap: float | None = None) -> str:
    """A table float (booktabs, siunitx S columns) with caption and label, set in `size`; a table
    too wide for the text is set as stacked panels, each a tabular of the row labels and some
    columns. `interval`: brackets, pm or compact (`0.97(2)`, which the caption then reads);
    `wrap`: the widest label column's width (pt), its longer labels broken into lines."""
    if interval not in (*INTERVALS, "compact"):
        raise ValueError(f"interval style '{interval}': choose one of {', '.join(INTERVALS)}")
    caption = table.caption + (COMPACT_NOTE if interval == "compact" else "")
    compact = ", uncertainty-mode=compact" if interval == "compact" else ""
    lines = [f"% needs {PACKAGES}", r"\begin{table}[tbp]", r"\centering",
             rf"\caption{{{escape_latex(caption)}}}", rf"\label{{{table.label}}}",
             f"\\{size}",
             rf"\sisetup{{detect-weight, mode=text, table-alignment-mode=format{compact}}}",
             rf"\setlength{{\tabcolsep}}{{{TABCOLSEP:g}pt}}"]
    names = list(table.names.columns)
    specs = ["l"] * len(names)
    if wrap is not None:  # ragged right, a broken label's further lines indented
        specs[int(np.argmax(_name_widths(table, size)))] = (
            rf">{{\raggedright\hangindent=1em\hangafter=1\arraybackslash}}p{{{wrap:.1f}pt}}")
    for p, panel in enumerate(_panels(table, interval, size, wrap)):
        layouts = [_layout(table.columns[j], interval) for j in panel]
        preamble = "@{}" + "".join(specs) + "".join(lay[0] for lay in layouts) + "@{}"
        lines += ([r"\\[2ex]"] if p else []) + [rf"\begin{{tabular}}{{{preamble}}}", r"\toprule"]
        lines += _group_row([table.columns[j] for j in panel], [lay[2] for lay in layouts],
                            len(names))
        height = max([len(table.columns[j].header) for j in panel] + [1])
        for row in range(height):
            cells = [escape_latex(n) if row == height - 1 else "" for n in names]
            for j, lay in zip(panel, layouts):
                header = table.columns[j].header
                k = row - (height - len(header))
                cells.append(rf"\multicolumn{{{lay[2]}}}{{c}}{{{escape_latex(header[k])}}}"
                             if k >= 0 else rf"\multicolumn{{{lay[2]}}}{{c}}{{}}")
            lines.append(" & ".join(cells) + r" \\")
        lines.append(r"\midrule")
        for i in range(len(table.names)):
            cells = [escape_latex(v) for v in table.names.iloc[i]]
            cells += [_latex_cell(table.columns[j], i, lay[1], lay[2])
                      for j, lay in zip(panel, layouts)]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def main_latex(table: PaperTable, interval: str = "brackets") -> str:
    """The main table as one block where it can be: in `interval`'s style at \\small if that fits
    the text width, else in the compact notation `0.97(2)` (the caption says so) at \\small, else
    at \\footnotesize, its widest label column broken into lines where it must; stacked panels
    only where even that does not fit."""
    tries = [(interval, "small"), ("compact", "small"), ("compact", "footnotesize")]
    for style, size in tries:
        if len(_panels(table, style, size)) == 1:
            return to_latex(table, style, size)
    # the widest label column (long composite labels) takes the width the numbers leave it
    style, size = tries[-1]
    names = _name_widths(table, size)
    widths = [_column_width(c, style, size) for c in table.columns]
    wrap = (TEXT_WIDTH - sum(names) + max(names) - 2 * TABCOLSEP
            - _panel_width(table, list(range(len(widths))), widths, size))
    return to_latex(table, style, size, wrap if wrap >= MIN_WRAP else None)


def key_latex(rows: pd.DataFrame) -> str:
    """The key from display labels to full specs: one row per distinct label of each kind."""
    lines = [f"% needs {PACKAGES}", r"\begin{table}[tbp]", r"\centering",
             r"\caption{Entries: the labels the tables use and the specs they stand for.}",
             r"\label{tab:entries}", r"\small", r"\begin{tabular}{@{}lll@{}}", r"\toprule",
             r"& label & spec \\", r"\midrule"]
    for kind in [c for c in rows.columns if not c.endswith(" label")]:
        pairs = rows[[f"{kind} label", kind]].drop_duplicates()
        for n, (label, spec) in enumerate(pairs.itertuples(index=False)):
            lines.append(f"{kind if n == 0 else ''} & {escape_latex(label)} & {code_latex(spec)} "
                         + r"\\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def definitions_latex(alpha: float) -> str:
    """The shared definitions as a description list a paper can \\input."""
    items = [rf"\item[{escape_latex(term)}] {escape_latex(text)}"
             for term, text in definitions(alpha)]
    return "\n".join([r"\begin{description}", *items, r"\end{description}"]) + "\n"


# ---- Markdown ------------------------------------------------------------------------------------
def _markdown_cell(column: Column, cell: Cell, interval: str) -> str:
    value = column.text(cell.value)
    value = f"**{value}**" if cell.bold else value
    if column.number(cell.value) is not None and not math.isnan(cell.lo):
        if interval == "compact":  # the uncertainty as the LaTeX main table sets it
            value += _compact(column, cell).removeprefix(column.number(cell.value))
        elif interval == "pm":
            value += f" ± {column.text(max(cell.value - cell.lo, cell.hi - cell.value))}"
        else:
            value += f" [{column.text(cell.lo)}, {column.text(cell.hi)}]"
    return value + ("†" if cell.tie else "")


def _header_text(column: Column) -> str:
    return " ".join(filter(None, (column.group, *column.header)))


def to_markdown(table: PaperTable, interval: str = "brackets") -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    headers = list(table.names.columns) + [_header_text(c) for c in table.columns]
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for i in range(len(table.names)):
        cells = list(table.names.iloc[i]) + [_markdown_cell(c, c.cells[i], interval)
                                             for c in table.columns]
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines)


def to_frame(table: PaperTable, interval: str = "brackets") -> Table:
    """The table as display strings and bold flags (the HTML report's sortable tables)."""
    headers = list(table.names.columns) + [_header_text(c) for c in table.columns]
    cells = {h: table.names[h].astype(str).to_list() for h in table.names.columns}
    cells |= {h: [_markdown_cell(c, cell, interval).replace("**", "") for cell in c.cells]
              for h, c in zip(headers[len(table.names.columns):], table.columns)}
    bold = {h: [False] * len(table.names) for h in table.names.columns}
    bold |= {h: [cell.bold for cell in c.cells]
             for h, c in zip(headers[len(table.names.columns):], table.columns)}
    return Table(pd.DataFrame(cells), pd.DataFrame(bold), table.caption, table.label)


def definitions_markdown(alpha: float) -> str:
    return "\n".join(f"- **{term}**: {text}" for term, text in definitions(alpha))


# ---- every file ----------------------------------------------------------------------------------
def latex_files(tables: Leaderboards, metric: str = "stability",
                interval: str = "brackets") -> dict[str, str]:
    """File name -> LaTeX: main.tex (and main-partial.tex), one task-*.tex and appendix-*.tex per
    task variant, overall.tex (and overall-partial.tex), entries.tex, definitions.tex."""
    complete, partial = split_entries(tables)
    files = {}
    for name, entries, full in (("main", complete, True), ("main-partial", partial, False)):
        if len(entries):
            files[f"{name}.tex"] = main_latex(main_table(tables, entries, metric, full), interval)
    for variant, board in tables.boards.items():
        runs = tables.used[tables.used["variant"] == variant]
        main, appendix = task_tables(variant, board, runs)
        files[f"task-{slug(variant)}.tex"] = to_latex(main, interval)
        if appendix.columns:
            files[f"appendix-{slug(variant)}.tex"] = to_latex(appendix, interval)
    for name, entries, full in (("overall", complete, True), ("overall-partial", partial, False)):
        if len(entries):
            files[f"{name}.tex"] = to_latex(overall_table(tables, entries, full), interval)
    files["entries.tex"] = key_latex(key_rows(tables))
    files["definitions.tex"] = definitions_latex(ALPHA)
    return files

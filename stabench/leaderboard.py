"""Tables from stored records: a cell's per-learning-rate table, per-task and overall leaderboards
(DataFrames), and their renderings as Markdown and LaTeX (via pandas Styler) text. Writing them to
files is report.py's job.

Definitions of every column are in the captions the tables carry (and in the README).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .inits import INITS
from .methods import METHODS
from .metrics import (MA_START, METRIC_RANGES, VALIDATION_OF, fisher_p, holm, improvement,
                      lr_sensitivity, mean_ci, performance_ratios, profile_score, stable_width,
                      welch_p, wilson)
from .reproduce import numerics_facts
from .optimizers import OPTIMIZERS
from .store import commit_label
from .registry import UserError, parse_call, split_plus
from .tasks import DEFAULT_PRECISION, OPTIONAL_SECTIONS, flatten
from .text import format_number, plural


def _ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(lo):
        return format_number(mean, digits)
    low, high = format_number(lo, digits), format_number(hi, digits)
    return f"{format_number(mean, digits)} [{low}, {high}]"


def short_run_note(steps: int) -> str:
    """Why runs of `steps` steps can only diverge by going non-finite ("": long enough)."""
    if steps > MA_START + 1:
        return ""
    return (f"These runs are too short for the loss rule of divergence (a moving average after "
            f"step {MA_START}): only a run that went non-finite counts as diverged.")


def lr_table(runs: list[dict]) -> pd.DataFrame:
    """One row per learning rate: diverged/total, spiked (recovered)/total, final loss, test
    accuracy (mean, 95% t-interval over seeds), median steps to target."""
    df = pd.DataFrame(runs)
    rows = []
    for lr, g in df.groupby("lr", sort=True):
        row = {"lr": format_number(lr), "diverged": f"{int(g['diverged'].sum())}/{len(g)}",
               "spiked": f"{int(g['spiked'].sum())}/{len(g)}",
               "final loss": format_number(float(np.median(g["final_train_loss"])))}
        metric, label = (("test_accuracy", "test acc") if "test_accuracy" in g
                         else ("test_loss", "test loss"))
        row[f"{label} (95% CI)"] = _ci(*mean_ci(g[metric], bounds=METRIC_RANGES[metric]))
        row["steps to target"] = _steps_text(float(np.median(g["steps_to_target"])))
        row["clipped share"] = format_number(float(g["clipped_share"].mean()), 2)
        rows.append(row)
    return pd.DataFrame(rows)


# ---- long form: one row per run ----------------------------------------------------------------
ALPHA = 0.05
MARK = "\u2020"  # dagger: not significantly different from the column's best
ENTRY = ["method", "init", "optimizer"]
PROVENANCE = ("git_commit", "git_dirty", "device_kind", "backend", "device_count", "cpu_count",
              "cpu_model", "date")


UNRECORDED_DEFAULTS = {"train.precision": DEFAULT_PRECISION,
                       **{f"{section}.{key}": value for section, fields in OPTIONAL_SECTIONS.items()
                          for key, value in fields.items()}}


def variant_labels(specs: list) -> dict[str, str]:
    """Spec hash -> task label: the task name plus the config fields that differ between records
    of that task (learning rates and seeds are within-cell axes, not variants)."""
    by_task: dict[str, list] = {}
    for spec in specs:
        by_task.setdefault(spec.task, []).append(spec)
    skip = {"train.lrs", "train.seeds", "train.optimizer", "description", "expect", "aliases"}
    labels = {}
    for task, group in by_task.items():
        # a setting at its default is left out of the record (so old hashes hold): label it so
        flat = [{**UNRECORDED_DEFAULTS, **flatten(s.task_config)} for s in group]
        keys = sorted({k for f in flat for k in f} - skip)
        varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
        leaves = [k.rpartition(".")[2] for k in varying]
        names = [leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(varying, leaves)]
        for spec, f in zip(group, flat):
            parts = [f"{n}={_short(f.get(k))}" for n, k in zip(names, varying)]
            label = f"{task}[{','.join(parts)}]" if parts else task
            labels[spec.hash] = label + (" (fake data)" if spec.fake_data else "")
    return labels


def _short(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def runs_frame(records: list) -> pd.DataFrame:
    """One row per run: every spec field (task config flattened as config.*), the run's metrics,
    the cell's timing and provenance."""
    labels = variant_labels([r.spec for r in records])
    rows = []
    for rec in records:
        spec, data = rec.spec, rec.data
        metric, value, mode = spec.target
        prov = data["provenance"]
        cell = {
            "spec_hash": spec.hash, "record": str(rec.path), "task": spec.task,
            "variant": labels[spec.hash], "method": spec.method, "init": spec.init,
            "optimizer": spec.optimizer, "fake_data": spec.fake_data, "n_seeds": len(spec.seeds),
            "lr_grid": json.dumps(list(spec.lrs)), "steps": spec.train["steps"],
            "target_metric": metric, "target_value": value, "target_mode": mode,
            **{f"config.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
               for k, v in flatten(spec.task_config).items()},
            **{f"timing.{k}": v for k, v in data["timing"].items()},
            **{f"version.{k}": v for k, v in prov["versions"].items()},
            **{k: prov.get(k) for k in PROVENANCE},
            "numerics": json.dumps(numerics_facts(data), sort_keys=True),
        }
        # The loss before any update (step 0) is the same for every LR of a seed; the mean of the
        # first 10 finite losses (initial_loss) is not when a large LR blows up within them.
        with np.load(rec.path.with_suffix(".npz")) as tel:
            at_init = tel["loss"][:, 0].astype(np.float64)
        for run, loss0 in zip(rec.runs, at_init):
            rows.append({**cell, **run, "init_loss": float(loss0)})
    df = pd.DataFrame(rows)
    for col in df.columns:  # a field typed differently by different tasks: keep it as text
        types = {type(v) for v in df[col]
                 if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(types) > 1 and not types <= {int, float}:
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def dedupe_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One run per (task variant, entry, seed, lr): a cell trained twice counts once (the
    newest)."""
    key = ["variant", *ENTRY, "seed", "lr"]
    ordered = df.sort_values("date", kind="stable")
    kept = ordered.drop_duplicates(key, keep="last").sort_index()
    return kept, len(df) - len(kept)


# ---- choosing on the validation split -----------------------------------------------------------
def _choice_order(g: pd.DataFrame, keys: list[str], metric: str, mode: str) -> pd.DataFrame:
    """The (keys) groups of runs, best first by the mean over seeds of the validation metric that
    stands for the target `metric`; equal means: fewer diverged runs first, then the smaller
    learning rate, then the method string that sorts first. Reads no test column."""
    val = VALIDATION_OF[metric]
    order = g.groupby(keys, sort=True).agg(score=(val, "mean"), diverged=("diverged", "sum"))
    order["rank_score"] = -order["score"] if mode == "max" else order["score"]
    order = order.reset_index()
    by = ["rank_score", "diverged", *[k for k in ("lr", "method") if k in keys]]
    return order.sort_values(by, kind="stable", na_position="last")


def select_lr(g: pd.DataFrame, metric: str, mode: str) -> float:
    """An entry's learning rate: the best mean validation metric over seeds (see
    `_choice_order` for ties)."""
    return float(_choice_order(g, ["lr"], metric, mode)["lr"].iloc[0])


def undecided(g: pd.DataFrame, metric: str) -> bool:
    """Whether no learning rate of a grid of several is better than another on validation or on
    divergence (every run diverged, say): the choice is then the smallest by convention alone."""
    scores = g.groupby("lr").agg(score=(VALIDATION_OF[metric], "mean"),
                                 diverged=("diverged", "sum"))
    return len(scores) > 1 and len(scores.drop_duplicates()) == 1


TUNED = "tuned"  # an entry's label: its method family's call names, then this


def _calls(method: str) -> list[tuple[str, dict]]:
    return [parse_call(term, "method") for term in split_plus(method)]


def _default_setting(names: tuple[str, ...]) -> str | None:
    """The method string of a family's registered defaults; None where the registry lacks a name
    (a plugin not loaded here)."""
    from . import methods

    try:
        return methods.canonical(methods.resolve("+".join(names)))
    except UserError:
        return None


def setting_label(method: str, settings: list[str]) -> str:
    """The arguments of `method` that differ among the family's `settings`: 'max_norm=0.25' (the
    call's name first where two calls share an argument name)."""
    parsed = [_calls(m) for m in settings]
    mine = _calls(method)
    varying = [(i, k) for i, (_, kwargs) in enumerate(mine) for k in kwargs
               if len({repr(p[i][1].get(k)) for p in parsed}) > 1]
    keys = [k for _, k in varying]
    return ", ".join(f"{k if keys.count(k) == 1 else f'{mine[i][0]}.{k}'}={_short(mine[i][1][k])}"
                     for i, k in varying)


def tune_entries(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs of one task variant with each method family tuned (AlgoPerf's external tuning):
    entries whose methods have the same calls with different arguments, under the same init and
    optimizer, become one tuned entry `NAMES tuned`, whose runs are those of the setting with the
    best validation metric at its best learning rate (ties as in `_choice_order`); the setting of
    the registered defaults stays as its own entry beside it, and the other settings are left out.
    Adds `setting` (the method string that ran), `tuned` (the chosen arguments, '' for an entry
    that was not tuned) and `settings` (how many settings the entry was chosen among)."""
    metric, mode = runs["target_metric"].iloc[0], runs["target_mode"].iloc[0]
    runs = runs.assign(setting=runs["method"], tuned="", settings=1)
    family = runs["method"].map(lambda m: tuple(name for name, _ in _calls(m)))
    parts = []
    for _, g in runs.groupby([family, runs["init"], runs["optimizer"]], sort=True):
        settings = sorted(g["method"].unique())
        if len(settings) < 2:
            parts.append(g)
            continue
        names = tuple(name for name, _ in _calls(settings[0]))
        chosen = _choice_order(g, ["method", "lr"], metric, mode)["method"].iloc[0]
        parts.append(g[g["method"] == chosen].assign(
            method=f"{'+'.join(names)} {TUNED}", tuned=setting_label(chosen, settings),
            settings=len(settings)))
        parts.append(g[g["method"] == _default_setting(names)])
    return pd.concat(parts, ignore_index=True)


def budget_notes(variant: str, tuned: pd.DataFrame) -> list[str]:
    """A note where the tuned entries of a variant were chosen among different numbers of
    settings: their tuning budgets differ, so the comparison favours the larger."""
    counts = tuned[tuned["tuned"] != ""].drop_duplicates(ENTRY).set_index("method")["settings"]
    if counts.nunique() < 2:
        return []
    listed = ", ".join(f"{m} {n}" for m, n in counts.sort_index().items())
    return [f"{variant}: its tuned entries were chosen among different numbers of settings "
            f"({listed}): unequal tuning budgets."]


# ---- per-task leaderboard ----------------------------------------------------------------------
def _entry_stats(g: pd.DataFrame, metric: str, mode: str) -> dict:
    by_lr = g.groupby("lr", sort=True)
    quality = by_lr[metric].mean()
    best_lr = select_lr(g, metric, mode)
    at_best = g[g["lr"] == best_lr].sort_values("seed")
    k, n = int(g["diverged"].sum()), len(g)
    _, d_lo, d_hi = wilson(k, n)
    spiked = int(g["spiked"].sum())
    s_rate, s_lo, s_hi = wilson(spiked, n)
    if undecided(g, metric):
        best_lr = math.nan  # shown as -: the columns take the smallest rate, the convention's
    stable = by_lr["diverged"].max() == 0
    reached = by_lr["steps_to_target"].apply(lambda s: bool(np.isfinite(s).all()))
    stable_lrs = stable[stable].index
    return {
        "runs": n, "seeds": g["seed"].nunique(), "lrs": len(quality), "best_lr": best_lr,
        "quality_seeds": at_best[metric].to_numpy(np.float64),
        "diverged_runs": k, "diverged_rate": k / n, "diverged_lo": d_lo, "diverged_hi": d_hi,
        "spiked_runs": spiked, "spiked_rate": s_rate, "spiked_lo": s_lo, "spiked_hi": s_hi,
        "lr_sensitivity": lr_sensitivity(g["lr"], g["final_train_loss"], g["init_loss"]),
        "max_stable_lr": float(stable_lrs.max()) if len(stable_lrs) else math.nan,
        "stable_width": stable_width(quality.index, (stable & reached).to_numpy()),
        "steps_to_target": float(by_lr["steps_to_target"].median().min()),
        "clipped_share": float(at_best["clipped_share"].mean()),
        "max_grad_norm": float(at_best["max_grad_norm"].median()),
    }


def task_board(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per entry (method, init, optimizer) of one task variant; numeric columns, per-seed
    samples (`*_seeds`) and significance flags (`*_tie`: not distinguishable from the best)."""
    metric, mode = runs["target_metric"].iloc[0], runs["target_mode"].iloc[0]
    # One starting point for every entry: from each run's own, an init that starts higher would
    # gain credit for the loss it added.
    start = float(np.nanmedian(runs["init_loss"])) if runs["init_loss"].notna().any() else math.nan
    gain = improvement(runs["final_train_loss"], start)
    runs = runs.assign(_gain=gain)
    groups = list(runs.groupby(ENTRY, sort=True))
    best_gain = max(g.groupby("lr")["_gain"].mean().max() for _, g in groups)
    rows = []
    for key, g in groups:
        row = dict(zip(ENTRY, key))
        row.update(_entry_stats(g, metric, mode))
        m, lo, hi = mean_ci(row["quality_seeds"], bounds=METRIC_RANGES[metric])
        row.update(quality_metric=metric, quality_mode=mode, quality_mean=m, quality_lo=lo,
                   quality_hi=hi)
        if best_gain > 0:
            # the mean of the per-seed values the significance test compares (with every seed
            # on every learning rate, the mean over all runs)
            per_seed = g.groupby("seed")["_gain"].mean() / best_gain
            row.update(stability=float(per_seed.mean()),
                       stability_seeds=per_seed.to_numpy(np.float64))
        else:  # nothing improved on this task: no scale to measure stability against
            row.update(stability=math.nan, stability_seeds=np.array([]))
        rows.append(row)
    board = pd.DataFrame(rows)
    board["rank"] = board["stability"].rank(ascending=False, method="min")
    _mark_ties(board)
    return board.sort_values(["rank", "quality_mean"], ascending=[True, mode == "min"],
                             na_position="last", kind="stable").reset_index(drop=True)


def _best_index(values: pd.Series, mode: str):
    v = values.astype(float)
    if v.isna().all():
        return None
    return v.idxmax() if mode == "max" else v.idxmin()


def _mark_ties(board: pd.DataFrame) -> None:
    """Flag entries not significantly different from the column's best: Welch t-test over seeds
    for quality and stability, Fisher's exact test for divergence, each entry against the best,
    Holm-corrected over the comparisons of the column (alpha 0.05). NaN: not testable, or equal to
    the best (those are bold)."""
    mode = board["quality_mode"].iloc[0]
    for col, samples, col_mode in (("quality", "quality_seeds", mode),
                                   ("stability", "stability_seeds", "max")):
        values = board[f"{col}_mean" if col == "quality" else col]
        best = _best_index(values, col_mode)
        board[f"{col}_tie"] = _holm_ties([
            math.nan if best is None or values[i] == values[best] else welch_p(
                board.at[best, samples], board.at[i, samples]) for i in board.index])
    rate = board["diverged_rate"]
    best = _best_index(rate, "min")
    board["diverged_tie"] = _holm_ties([
        math.nan if rate[i] == rate[best] else fisher_p(
            board.at[best, "diverged_runs"], board.at[best, "runs"], board.at[i, "diverged_runs"],
            board.at[i, "runs"])
        for i in board.index])


def _holm_ties(pvalues: list[float]) -> list:
    """True where Holm's procedure keeps the null (no significant difference), False where it
    rejects it, NaN where there was no test."""
    reject = holm(pvalues, ALPHA)
    return [math.nan if math.isnan(p) else not r for p, r in zip(pvalues, reject)]


# ---- overall leaderboard -----------------------------------------------------------------------
def task_weights(variants: list[str], task_of_variant: dict[str, str], used=None) -> np.ndarray:
    """Each task counts once; its variants (depths, sizes) share its weight. Only the `used`
    variants (a mask; default all) count: a task's weight goes to those of its variants that have
    a value, the others weigh 0."""
    used = np.ones(len(variants), bool) if used is None else np.asarray(used, bool)
    names = [task_of_variant[v] for v in variants]
    counts = {n: sum(u for m, u in zip(names, used) if m == n) for n in names}
    return np.array([1.0 / counts[n] if u else 0.0 for n, u in zip(names, used)])


def overall_board(boards: dict[str, pd.DataFrame], task_of_variant: dict[str, str]) -> tuple[
        pd.DataFrame, np.ndarray, list[str]]:
    """One row per entry across task variants; also the [entries, variants] performance ratios and
    the variants no entry brought to its target (in the profiles, a task no entry solved)."""
    variants = sorted(boards)
    entries = sorted({tuple(r) for b in boards.values() for r in b[ENTRY].itertuples(index=False)})
    shape = (len(entries), len(variants))
    steps, stability, rank = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    div_k, div_n = np.zeros(len(entries), int), np.zeros(len(entries), int)
    spike_k = np.zeros(len(entries), int)
    present = np.zeros(shape, bool)
    for j, v in enumerate(variants):
        b = boards[v].set_index(ENTRY)
        for i, e in enumerate(entries):
            if e in b.index:
                present[i, j] = True
                steps[i, j] = b.at[e, "steps_to_target"]
                stability[i, j] = b.at[e, "stability"]
                div_k[i] += b.at[e, "diverged_runs"]
                spike_k[i] += b.at[e, "spiked_runs"]
                div_n[i] += b.at[e, "runs"]
    ratios = performance_ratios(steps)
    unsolved = [v for j, v in enumerate(variants) if np.isinf(ratios[:, j]).all()]
    weigh = functools.partial(task_weights, variants, task_of_variant)
    scores = profile_score(ratios, weigh())
    # Scores averaged over different task sets do not compare: only entries that ran every task
    # variant are ranked, and their per-task ranks are taken among themselves (a task others also
    # ran would otherwise rank out of more entries than the rest).
    complete = present.all(axis=1)
    for j in range(len(variants)):
        rank[complete, j] = pd.Series(stability[complete, j]).rank(
            ascending=False, method="min").to_numpy()
    rows = []
    for i, e in enumerate(entries):
        # a task where no entry improved has no stability and no rank, yet the entry ran it
        ran, has_rank = present[i], ~np.isnan(rank[i])
        ok = ran & ~np.isnan(stability[i])
        p, lo, hi = wilson(int(div_k[i]), int(div_n[i]))
        sp, s_lo, s_hi = wilson(int(spike_k[i]), int(div_n[i]))
        rows.append({
            **dict(zip(ENTRY, e)), "tasks": int(ran.sum()),
            "stability": float(np.average(stability[i][ok], weights=weigh(ok)[ok])) if ok.any()
            else math.nan,
            "profile_score": float(scores[i]),
            "mean_rank": float(np.average(rank[i][has_rank], weights=weigh(has_rank)[has_rank]))
            if has_rank.any() else math.nan,
            "diverged_runs": int(div_k[i]), "runs": int(div_n[i]),
            "diverged_rate": p, "diverged_lo": lo, "diverged_hi": hi,
            "spiked_runs": int(spike_k[i]), "spiked_rate": sp, "spiked_lo": s_lo,
            "spiked_hi": s_hi,
        })
    board = pd.DataFrame(rows)
    # the unranked follow the ranked, by stability
    board["rank"] = board["stability"].where(complete).rank(ascending=False, method="min")
    ranked = board[complete].sort_values(["rank", "profile_score"], ascending=[True, False],
                                         na_position="last", kind="stable")
    unranked = board[~complete].sort_values("stability", ascending=False, na_position="last",
                                            kind="stable")
    order = np.concatenate([ranked.index, unranked.index]).astype(int)
    return board.loc[order].reset_index(drop=True), ratios[order], unsolved


# ---- rendering ---------------------------------------------------------------------------------
COLUMNS = {  # column -> (header, direction for bold: max, min or None)
    "rank": ("rank", "min"),
    "quality": (None, None),  # header and direction from the task's target
    "diverged": ("diverged (95% CI)", "min"),
    # fewer recovered spikes is no merit where the runs diverged instead: no best
    "spiked": ("spiked (95% CI)", None),
    "lr_sensitivity": ("LR sensitivity", "min"),
    "max_stable_lr": ("max stable LR", "max"),
    "stable_width": ("stable width", "max"),
    "steps_to_target": ("steps to target", "min"),
    "clipped_share": ("clipped share", None),
    "max_grad_norm": ("max grad norm", "min"),
    "stability": ("stability", "max"),
}
OVERALL = {
    "rank": ("rank", "min"), "tasks": ("tasks", None), "stability": ("stability", "max"),
    "profile_score": ("profile score", "max"), "mean_rank": ("mean rank", "min"),
    "diverged": ("diverged (95% CI)", "min"), "spiked": ("spiked (95% CI)", None),
}


@dataclass
class Table:
    """Display strings with bold and significance flags, ready for Markdown and LaTeX."""

    frame: pd.DataFrame  # strings
    bold: pd.DataFrame  # bool, same shape
    caption: str
    label: str


def _bold_mask(values: pd.Series, direction: str | None) -> pd.Series:
    v = pd.to_numeric(values, errors="coerce").astype(float)
    if direction is None or v.isna().all():
        return pd.Series(False, index=values.index)
    best = v.max() if direction == "max" else v.min()
    if not np.isfinite(best):  # every entry "never" reached it: nothing to single out
        return pd.Series(False, index=values.index)
    return v == best


LABELLERS = {"method": METHODS.label, "init": INITS.label, "optimizer": OPTIMIZERS.label}


def entry_names(entries: pd.DataFrame, chosen: bool = False) -> pd.DataFrame:
    """Display labels of entries (rows holding ENTRY columns): the method's, and the init's and
    optimizer's where they vary. Labels that coincide get the full spec's arguments appended.
    `chosen`: a tuned entry of one task names the setting chosen there (`setting`, `tuned`)."""
    names = pd.DataFrame(index=entries.index)
    for c in ENTRY:
        if c == "method" or entries[c].nunique() > 1:
            label = LABELLERS.get(c, str)
            names[c] = [label(str(v)) for v in entries[c]]
    if chosen and "tuned" in entries:
        picked = entries["tuned"].fillna("").astype(str) != ""
        names.loc[picked, "method"] = [f"{METHODS.label(s)} {TUNED}"
                                       for s in entries.loc[picked, "setting"]]
    for c in names.columns:  # two specs with one label: tell them apart by their spec
        specs = entries[c].astype(str)
        clash = specs.groupby(names[c]).transform("nunique") > 1
        names.loc[clash, c] = [f"{n} [{s}]" for n, s in zip(names.loc[clash, c], specs[clash])]
    return names


def _rank_and_entry(board: pd.DataFrame) -> pd.DataFrame:
    """A table's first columns: rank and the entry's display labels (a tuned entry with the
    setting chosen on the task); leaderboard.csv keeps the full specs."""
    frame = pd.DataFrame({"rank": board["rank"].map(format_number)})
    return frame.join(entry_names(board, chosen=True))
def _marked(text: str, tie) -> str:
    return text + MARK if tie is True else text


def _steps_text(x: float) -> str:
    return "never" if math.isinf(x) else format_number(x, 6)


def render_task(variant: str, board: pd.DataFrame, runs: pd.DataFrame) -> Table:
    metric, mode = board["quality_metric"].iloc[0], board["quality_mode"].iloc[0]
    quality_header = f"{metric.replace('test_', 'test ')} (95% CI)"
    frame = _rank_and_entry(board)
    frame[quality_header] = [
        _marked(_ci(m, lo, hi), t) for m, lo, hi, t in
        zip(board["quality_mean"], board["quality_lo"], board["quality_hi"], board["quality_tie"])]
    frame["best LR"] = board["best_lr"].map(format_number)
    frame[COLUMNS["diverged"][0]] = [
        _marked(_ci(p, lo, hi, 2), t) for p, lo, hi, t in zip(
            board["diverged_rate"], board["diverged_lo"], board["diverged_hi"],
            board["diverged_tie"])]
    frame[COLUMNS["spiked"][0]] = [_ci(p, lo, hi, 2) for p, lo, hi in zip(
        board["spiked_rate"], board["spiked_lo"], board["spiked_hi"])]
    for col in ("lr_sensitivity", "max_stable_lr", "stable_width"):
        frame[COLUMNS[col][0]] = board[col].map(format_number)
    frame[COLUMNS["steps_to_target"][0]] = board["steps_to_target"].map(_steps_text)
    frame[COLUMNS["clipped_share"][0]] = board["clipped_share"].map(lambda x: format_number(x, 2))
    frame[COLUMNS["max_grad_norm"][0]] = board["max_grad_norm"].map(format_number)
    frame[COLUMNS["stability"][0]] = [_marked(format_number(s), t) for s, t in
                                      zip(board["stability"], board["stability_tie"])]
    numeric = {"rank": board["rank"], quality_header: board["quality_mean"],
               COLUMNS["diverged"][0]: board["diverged_rate"]}
    directions = {"rank": "min", quality_header: mode, COLUMNS["diverged"][0]: "min"}
    for col in ("lr_sensitivity", "max_stable_lr", "stable_width", "steps_to_target",
                "clipped_share", "max_grad_norm", "stability"):
        numeric[COLUMNS[col][0]] = board[col]
        directions[COLUMNS[col][0]] = COLUMNS[col][1]
    bold = pd.DataFrame({c: _bold_mask(numeric[c], directions[c]) if c in numeric
                         else pd.Series(False, index=frame.index) for c in frame.columns})
    return Table(frame, bold, task_caption(variant, board, runs), f"tab:{slug(variant)}")


def task_caption(variant: str, board: pd.DataFrame, runs: pd.DataFrame) -> str:
    metric, mode = board["quality_metric"].iloc[0], board["quality_mode"].iloc[0]
    value = runs["target_value"].iloc[0]
    lrs = sorted(runs["lr"].unique())
    fixed = [f"{c} {board[c].iloc[0]}" for c in ("init", "optimizer") if board[c].nunique() == 1]
    one_seed = "; with one seed none is possible, so no mark" if runs["seed"].nunique() < 2 else ""
    short = f" {note}" if (note := short_run_note(int(runs["steps"].max()))) else ""
    return (
        f"Task {variant}: {_entries(len(board))}, {runs['seed'].nunique()} seeds x {len(lrs)} "
        f"learning rates ({', '.join(format_number(x) for x in lrs)}), "
        f"{int(runs['steps'].max())} steps"
        f"{'; ' + ', '.join(fixed) if fixed else ''}. Target: {metric} "
        f"{'at least' if mode == 'max' else 'at most'} {format_number(value)}. "
        f"{metric} at each entry's best learning rate: mean over seeds with a 95% Student-t "
        f"interval. {selection_text(metric)}{tuning_text(board, metric)} Diverged: share of all "
        f"runs (every learning rate and seed) that went non-finite or ended training with the loss "
        f"(its last 20-step mean) above max(2 L0, L0 + 1), L0 the loss at the start; spiked: share "
        f"that rose above that threshold (20-step mean, after step {MA_START}) and came back below "
        f"it by the end; both with a 95% Wilson interval. LR sensitivity (Wortsman et "
        f"al. 2023): mean over the grid of the final training loss, capped at the loss at "
        f"initialization, minus its minimum over the grid (- for one learning rate or where no "
        f"run got below the loss at initialization). Max stable LR: largest learning rate where "
        f"no seed diverged (a spike that recovered does not count). Stable width: log10 span of "
        f"consecutive learning rates where every seed stays stable and reaches the target. "
        f"Steps to target: minimum over learning rates of the median over seeds. Clipped share "
        f"(mean) and max grad norm (median) over the seeds at the best learning rate. "
        f"Stability: mean over seeds of the mean over their runs (all runs, on a full grid) of "
        f"the loss improvement (the median loss at initialization over this task's runs, one "
        f"start for every entry, minus the final loss, at least 0) divided by the best mean "
        f"improvement any entry reaches at one learning rate on this task; rank by stability. "
        f"Bold: best in the column. {MARK}: not significantly different from the best (two-sided "
        f"Welch t-test over seeds for {metric} and stability, Fisher's exact test for divergence; "
        f"each entry against the column's best, Holm-corrected over the column's comparisons, "
        f"alpha = {ALPHA}{one_seed}).{short}")


def selection_text(metric: str) -> str:
    """How an entry's learning rate is chosen, for captions."""
    val = VALIDATION_OF[metric]
    return (f"The best learning rate is chosen on the validation split held out of the training "
            f"data, never on the test split: the best mean {val} over seeds; equal means go to "
            f"fewer diverged runs, then the smaller rate (shown as -, where no rate is better on "
            f"either, as when every run diverged).")


def tuning_text(board: pd.DataFrame, metric: str) -> str:
    """What a tuned entry is, for captions of boards that have one ('' otherwise)."""
    if "tuned" not in board or not (board["tuned"] != "").any():
        return ""
    counts = sorted(set(board.loc[board["tuned"] != "", "settings"].astype(int)))
    return (f" A tuned entry (NAME {TUNED} (chosen values)) is the setting of its method's "
            f"arguments, among the {' or '.join(map(str, counts))} settings run, whose best "
            f"learning rate has the best mean {VALIDATION_OF[metric]} (the same ties, then the "
            f"first method string); its columns are that setting's. The registered defaults are "
            f"their own entry; the other settings are in runs.parquet only.")


def render_overall(board: pd.DataFrame, unsolved: list[str], n_variants: int) -> Table:
    frame = _rank_and_entry(board)
    frame["tasks"] = board["tasks"].astype(str)
    frame["stability"] = board["stability"].map(format_number)
    frame["profile score"] = board["profile_score"].map(format_number)
    frame["mean rank"] = board["mean_rank"].map(lambda x: format_number(x, 3))
    frame[OVERALL["diverged"][0]] = [
        _ci(p, lo, hi, 2) for p, lo, hi in
        zip(board["diverged_rate"], board["diverged_lo"], board["diverged_hi"])]
    frame[OVERALL["spiked"][0]] = [
        _ci(p, lo, hi, 2) for p, lo, hi in
        zip(board["spiked_rate"], board["spiked_lo"], board["spiked_hi"])]
    numeric = {"rank": board["rank"], "stability": board["stability"],
               "profile score": board["profile_score"], "mean rank": board["mean_rank"],
               OVERALL["diverged"][0]: board["diverged_rate"]}
    directions = {"rank": "min", "stability": "max", "profile score": "max", "mean rank": "min",
                  OVERALL["diverged"][0]: "min"}
    ranked = board["rank"].notna()  # the best of a column is the best among ranked entries
    bold = pd.DataFrame({c: _bold_mask(numeric[c].where(ranked), directions[c]) if c in numeric
                         else pd.Series(False, index=frame.index) for c in frame.columns})
    caption = (
        f"Overall, across {plural(n_variants, 'task variant')} (each task counts once; its "
        f"variants share its weight). Tasks: the task variants an entry ran. Stability: weighted "
        f"mean of the per-task stability scores. Profile score (AlgoPerf): (1/3) times the "
        f"integral from 1 to 4 of rho(tau), the weighted share of all tasks an entry brings to the "
        f"target within tau times the fewest steps any entry needs; an entry that never reaches "
        f"the target, or did not run the task, counts as infinitely slow, and a task no entry "
        f"brought to the target counts for every entry as one it did not solve. Mean rank: "
        f"weighted mean of the per-task stability ranks, each taken among the ranked entries "
        f"only. Diverged and spiked (a loss spike that recovered): shares of all runs, as in the "
        f"task tables, with 95% Wilson intervals. Rank by stability; bold: best in the column "
        f"among ranked entries.")
    partial = int((board["tasks"] < n_variants).sum())
    if partial:
        caption += (f" Unranked (rank -): {_entries(partial)} that did not run every task "
                    f"variant; their stability averages over the tasks they ran, they have no "
                    f"mean rank, and their profile score counts the others as never reaching "
                    f"the target.")
    failed = int((board["rank"].isna() & (board["tasks"] == n_variants)).sum())
    if failed:
        caption += (f" Unranked (rank -): {_entries(failed)} with no stability score: on "
                    f"every task it ran, no entry improved on the loss at initialization.")
    if unsolved:
        caption += (f" No entry reached the target on {', '.join(unsolved)}: "
                    f"no entry's profile reaches 1.")
    return Table(frame, bold, caption, "tab:overall")


def _entries(n: int) -> str:
    return plural(n, "entry", "entries")


def slug(text: str) -> str:
    """Lower-case letters and digits joined by '-': a LaTeX label or a file name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_markdown(table: Table) -> str:
    cells = table.frame.copy()
    for col in cells.columns:
        cells[col] = [f"**{v}**" if b else str(v) for v, b in zip(cells[col], table.bold[col])]
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cells.columns) + " |",
             "|" + "|".join("---" for _ in cells.columns) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |"
              for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def to_latex(table: Table) -> str:
    """booktabs table with caption and label; every value and header LaTeX-escaped by the Styler,
    the significance mark added after escaping."""
    styler = table.frame.style.format(
        escape="latex", formatter=lambda s: str(s).replace(MARK, r"$^{\dagger}$"))
    styler = styler.format_index(escape="latex", axis=1).hide(axis="index")
    bold = table.bold.to_numpy()
    styler = styler.apply(lambda df: pd.DataFrame(
        np.where(bold, "textbf:--rwrap;", ""), index=df.index, columns=df.columns), axis=None)
    caption = escape_latex(table.caption).replace(MARK, r"$^{\dagger}$")
    return styler.to_latex(hrules=True, caption=caption, label=table.label,
                           position_float="centering", column_format="l" * table.frame.shape[1])


def escape_latex(text: str) -> str:
    """The Styler's own LaTeX escaping, for text outside a table cell (captions)."""
    return pd.DataFrame([[text]]).style.format(escape="latex").hide(axis="index").hide(
        axis="columns").to_latex().split("\n")[1].rsplit(" \\\\", 1)[0]


# ---- every table of a set of records -------------------------------------------------------------
@dataclass
class Leaderboards:
    runs: pd.DataFrame  # every run, as stored
    used: pd.DataFrame  # duplicates removed: what the tables count
    boards: dict[str, pd.DataFrame]  # variant -> task board
    overall: pd.DataFrame
    ratios: np.ndarray  # [overall entries, sorted variants]
    unsolved: list[str]
    notes: list[str]
    # the runs the boards count: each tuned method family as its chosen setting (`tune_entries`)
    ranked: pd.DataFrame


def build_leaderboards(records: list) -> Leaderboards:
    runs = runs_frame(records)
    used, duplicates = dedupe_runs(runs)
    notes = []
    if duplicates:
        notes.append(f"{duplicates} runs were trained more than once (same task, entry, seed and "
                     f"learning rate); the newest of each counts.")
    versions = sorted({f"stabench {v} (git {commit_label(c, d)})" for v, c, d in
                       zip(runs["version.stabench"], runs["git_commit"], runs["git_dirty"])})
    if len(versions) > 1:
        notes.append(f"records come from {len(versions)} code versions ({'; '.join(versions)}): "
                     f"compare entries trained by different versions with care.")
    used, lacking = _with_validation(records, used)
    if lacking:
        notes.append(f"left out of the leaderboards, kept in runs.parquet: {lacking} trained "
                     f"before tasks held out a validation split, whose learning rate could only "
                     f"be chosen on the test data; retrain them to rank them.")
    notes += grid_notes(used)
    boards, ranked = {}, []
    for variant, g in used.groupby("variant", sort=True):
        tuned = tune_entries(g)
        ranked.append(tuned)
        notes += budget_notes(variant, tuned)
        settings = tuned.drop_duplicates(ENTRY)[[*ENTRY, "setting", "tuned", "settings"]]
        boards[variant] = task_board(tuned).merge(settings, on=ENTRY, how="left")
    task_of_variant = dict(zip(used["variant"], used["task"]))
    overall, ratios, unsolved = overall_board(boards, task_of_variant)
    return Leaderboards(runs, used, boards, overall, ratios, unsolved, notes,
                        pd.concat(ranked, ignore_index=True))


def _with_validation(records: list, used: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs of the records that hold the validation metric their target needs, their variants
    labelled among themselves; and how many cells lack it ('' if none). Only runs of such records
    remain: none is a UserError."""
    fair = [r for r in records
            if all(VALIDATION_OF[r.spec.target[0]] in run for run in r.runs)]
    lacking = len(records) - len(fair)
    if not fair:
        raise UserError(f"none of the {plural(len(records), 'record')} holds validation metrics "
                        f"(they were trained before tasks held out a validation split), so no "
                        f"learning rate can be chosen without reading the test data: retrain them")
    labels = variant_labels([r.spec for r in fair])
    kept = used[used["spec_hash"].isin(labels)]
    return kept.assign(variant=kept["spec_hash"].map(labels)), (
        plural(lacking, "cell") if lacking else "")


def grid_notes(used: pd.DataFrame) -> list[str]:
    """One note per task variant whose entries ran different (seed, learning rate) grids: its
    divergence shares and stability then average over different runs."""
    notes = []
    for variant, g in used.groupby("variant", sort=True):
        grids: dict[frozenset, list[str]] = {}
        for entry, runs in g.groupby(ENTRY, sort=True):
            grid = frozenset(zip(runs["seed"], runs["lr"]))
            grids.setdefault(grid, []).append(" / ".join(entry))
        if len(grids) < 2:
            continue
        parts = []
        for grid, entries in sorted(grids.items(), key=lambda kv: -len(kv[1])):
            seeds, lrs = {s for s, _ in grid}, sorted({lr for _, lr in grid})
            parts.append(f"{len(grid)} runs ({len(seeds)} seeds, learning rates "
                         f"{', '.join(format_number(lr) for lr in lrs)}) for {'; '.join(entries)}")
        notes.append(f"{variant}: its entries ran different grids of seeds and learning rates, so "
                     f"its columns compare different runs: {' | '.join(parts)}.")
    return notes


def depth_points(tables: Leaderboards, specs: dict) -> pd.DataFrame | None:
    """Best-LR results of the task variants whose model has `depth` and `residual` arguments, for
    the model families (dataset and model but depth and residual) run plain and residual: one row
    per (variant, entry). `specs`: spec hash -> RunSpec. None without two depths of such twins."""
    from .config import task_of
    from .models import MODELS
    from .registry import UserError

    rows = []
    for variant, board in tables.boards.items():
        spec = specs[tables.used.loc[tables.used["variant"] == variant, "spec_hash"].iloc[0]]
        try:
            args = dict(MODELS.resolve(task_of(spec).component("model")).kwargs)
        except UserError:  # a model this version no longer has: no depth to read
            continue
        if "depth" not in args or "residual" not in args:
            continue
        family = json.dumps([spec.task_config.get("dataset"), {
            k: v for k, v in spec.task_config["model"].items() if k not in ("depth", "residual")}],
            sort_keys=True, default=str)
        for _, r in board.iterrows():
            rows.append({"depth": args["depth"], "family": family,
                         "family_label": f"{spec.task_config['dataset']['name']} "
                                         f"{spec.task_config['model']['name']}",
                         "architecture": "residual" if args["residual"] else "plain",
                         "variant": variant, "method": r["method"], "init": r["init"],
                         "optimizer": r["optimizer"], "best_lr": r["best_lr"],
                         "metric": r["quality_metric"],
                         "quality_mean": r["quality_mean"], "quality_lo": r["quality_lo"],
                         "quality_hi": r["quality_hi"]})
    points = pd.DataFrame(rows)
    if points.empty:
        return None
    # twins only: a model family with both architectures, and methods run on both
    keep = points.groupby(["family", "method"])["architecture"].transform("nunique") == 2
    points = points[keep]
    if points.empty or points["depth"].nunique() < 2:
        return None
    return points


BASELINE = "none"  # the unstabilized entry a task must challenge


def baseline_checks(runs: pd.DataFrame) -> pd.DataFrame:
    """Whether each task variant tests stability: over its grid, the baseline's (method `none`,
    each init and optimizer it ran with) share of diverged runs with its Wilson interval, the
    learning rates where it diverged on some seed and where it reached the target (the median
    over seeds of the steps to target is finite, as in the board's steps-to-target column), and
    how many entries reached the target at some rate. The default suite asks for
    two rates of each kind, a diverged share between 20% and 80%, and one entry reaching the
    target."""
    rows = []
    for (variant, init, optimizer), g in runs[runs["method"] == BASELINE].groupby(
            ["variant", "init", "optimizer"], sort=True):
        by_lr = g.groupby("lr")
        reached = np.isfinite(by_lr["steps_to_target"].median())
        diverged = by_lr["diverged"].max() > 0
        k, n = int(g["diverged"].sum()), len(g)
        rate, lo, hi = wilson(k, n)
        task = runs[runs["variant"] == variant]
        solved = np.isfinite(task.groupby([*ENTRY, "lr"])["steps_to_target"].median())
        solvers = {key[:-1] for key, ok in solved.items() if ok}
        rows.append({"variant": variant, "init": init, "optimizer": optimizer,
                     "diverged_runs": k, "runs": n, "diverged_rate": rate, "diverged_lo": lo,
                     "diverged_hi": hi,
                     "diverging_lrs": [float(x) for x in diverged.index[diverged]],
                     "reaching_lrs": [float(x) for x in reached.index[reached]],
                     "entries_reaching": len(solvers)})
    return pd.DataFrame(rows)


def render_baseline_checks(checks: pd.DataFrame) -> Table:
    """The per-variant figures of `baseline_checks`, with whether each meets the default suite's
    rules (bold: a rule it breaks)."""
    rates = lambda lrs: ", ".join(format_number(x) for x in lrs) or "none"  # noqa: E731
    frame = pd.DataFrame({
        "task": checks["variant"],
        "entry": checks["init"] + " / " + checks["optimizer"],
        "none diverged (95% CI)": [
            f"{r.diverged_runs}/{r.runs} = {_ci(r.diverged_rate, r.diverged_lo, r.diverged_hi, 2)}"
            for r in checks.itertuples()],
        "LRs where none diverged": [rates(x) for x in checks["diverging_lrs"]],
        "LRs where none reached the target": [rates(x) for x in checks["reaching_lrs"]],
        "entries reaching the target": checks["entries_reaching"].astype(str),
    })
    bold = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    bold["none diverged (95% CI)"] = ~checks["diverged_rate"].between(0.2, 0.8)
    bold["LRs where none diverged"] = checks["diverging_lrs"].map(len) < 2
    bold["LRs where none reached the target"] = checks["reaching_lrs"].map(len) < 2
    bold["entries reaching the target"] = checks["entries_reaching"] < 1
    caption = ("Does each task variant test stability? The baseline (none) over its grid: share of "
               "runs diverged (Wilson interval), rates where some seed diverged, rates where it "
               "reached the target (median over seeds). The default suite asks for 20% to 80% "
               "diverged, two rates of each kind and one entry reaching the target; bold: a rule "
               "broken.")
    return Table(frame, bold, caption, "baseline-checks")

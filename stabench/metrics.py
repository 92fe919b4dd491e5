"""Stability and accuracy metrics from telemetry (pure numpy), as the README's Metrics section and
the leaderboard captions define them."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

INITIAL_STEPS = 10  # initial loss L0: mean of the first 10 finite losses
MA_WINDOW = 20  # divergence: 20-step moving average of the loss ...
MA_START = 20  # ... above max(2 L0, L0 + 1) after step 20
# the values a metric can take; its intervals are cut to them
METRIC_RANGES = {"test_accuracy": (0.0, 1.0), "test_loss": (0.0, math.inf),
                 "final_train_loss": (0.0, math.inf)}
UNBOUNDED = (-math.inf, math.inf)
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 50  # loss spike: loss > 1.5x its 50-step mean; once per 50 steps


def initial_loss(loss: np.ndarray) -> float:
    """Mean of the first 10 finite losses, but never above the first of them (the loss before any
    update, unless a method skipped the steps before it): a large learning rate can blow the loss
    up within those steps, and an L0 inflated by that would hide the divergence it measures.
    Skipped non-finite steps leave the parameters as they were, so they are passed over; inf for a
    run without a finite loss."""
    head = loss[np.isfinite(loss)][:INITIAL_STEPS]
    if not head.size:
        return math.inf
    return min(float(head.mean()), float(head[0]))


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the finite values over `window` steps: entry t averages the finite ones of
    x[t-window+1 .. t]; inf where there are none; NaN before step window-1."""
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        finite = np.isfinite(x)
        c = np.cumsum(np.concatenate([[0.0], np.where(finite, x, 0.0).astype(np.float64)]))
        n = np.cumsum(np.concatenate([[0], finite]))
        count = n[window:] - n[:-window]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[window - 1:] = np.where(count > 0, (c[window:] - c[:-window]) / count, np.inf)
    return out


def divergence_step(loss: np.ndarray, frozen_at: int) -> int | None:
    """First step at which the engine froze the run (a non-finite loss or gradient that no method
    skipped, or non-finite parameters or state), or whose 20-step average of the finite losses
    exceeds max(2 L0, L0 + 1) after step 20 (a window without a finite loss counts as above);
    None when neither happens. A non-finite step that a method skipped is not a divergence: it
    counts in `nonfinite_steps`."""
    bad = np.zeros(len(loss), bool)
    if frozen_at >= 0:
        bad[frozen_at:] = True
    l0 = initial_loss(loss)
    limit = max(2 * l0, l0 + 1)
    with np.errstate(invalid="ignore"):
        ma = moving_average(loss, MA_WINDOW)
        high = (ma > limit) | (ma == math.inf)  # inf: a window without a finite loss
    high[: MA_START + 1] = False
    hits = np.flatnonzero(bad | high)
    return int(hits[0]) if hits.size else None


def loss_spikes(loss: np.ndarray) -> int:
    """Steps whose loss exceeds 1.5x the mean of the previous 50; spikes within 50 steps count
    once."""
    count, last = 0, -SPIKE_WINDOW - 1
    finite = np.where(np.isfinite(loss), loss, np.nan)
    c = np.concatenate([[0.0], np.nancumsum(finite)])
    n = np.concatenate([[0], np.cumsum(np.isfinite(finite))])
    for t in range(SPIKE_WINDOW, len(loss)):
        k = n[t] - n[t - SPIKE_WINDOW]
        if k == 0 or not np.isfinite(finite[t]):
            continue
        mean = (c[t] - c[t - SPIKE_WINDOW]) / k
        if finite[t] > SPIKE_FACTOR * mean and t - last > SPIKE_WINDOW:
            count, last = count + 1, t
    return count


def first_reaching(values: np.ndarray, steps: np.ndarray, target: float, mode: str) -> float:
    """First evaluation step whose value reaches the target (max: >=, min: <=); inf if never."""
    with np.errstate(invalid="ignore"):
        hit = values >= target if mode == "max" else values <= target
    idx = np.flatnonzero(hit)
    return float(steps[idx[0]]) if idx.size else math.inf


def run_metrics(tel: dict[str, np.ndarray], evals: dict[str, np.ndarray], eval_steps: np.ndarray,
                frozen_at: int, target: tuple[str, float, str]) -> dict[str, float]:
    """Metrics of one run from its telemetry rows ([steps]) and evaluations ([evals])."""
    loss, gnorm = tel["loss"], tel["grad_norm"]
    steps = len(loss)
    div = divergence_step(loss, frozen_at)
    failed = frozen_at >= 0  # non-finite: no usable model
    tail = loss[max(0, steps - MA_WINDOW):]
    finite_tail = tail[np.isfinite(tail)]  # steps a method skipped have no loss to average
    finite_g = gnorm[np.isfinite(gnorm)]
    active = np.isfinite(tel["changed"])
    metric, value, mode = target
    out = {
        "initial_loss": initial_loss(loss),
        "diverged": float(div is not None),
        "divergence_step": float(div if div is not None else steps - 1),
        "final_train_loss": math.inf if failed or not finite_tail.size
        else float(finite_tail.mean()),
        "test_loss": math.inf if failed else float(evals["test_loss"][-1]),
        "max_grad_norm": float(finite_g.max()) if finite_g.size else math.inf,
        "p99_grad_norm": float(np.percentile(finite_g, 99)) if finite_g.size else math.inf,
        "clipped_share": float(tel["changed"][active].mean()) if active.any() else 0.0,
        "nonfinite_steps": float(np.nansum(tel["nonfinite"])),
        "loss_spikes": float(loss_spikes(loss)),
    }
    if "test_accuracy" in evals:
        out["test_accuracy"] = 0.0 if failed else float(evals["test_accuracy"][-1])
    out["steps_to_target"] = math.inf if failed else first_reaching(
        evals[metric], eval_steps, value, mode)
    return out


def mean_ci(x, level: float = 0.95,
            bounds: tuple[float, float] = UNBOUNDED) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds, cut to `bounds`, the values the quantity can take
    (the mean lies among them, so the cut keeps the interval's coverage, and an accuracy's interval
    never reaches below 0). NaN values (nothing measured) are left out; NaN bounds where no
    interval exists (one value left, or an infinite one: a diverged run's loss)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size == 1 or not np.isfinite(x).all():
        return m, math.nan, math.nan
    # symmetric: the upper bound of the standard t interval sets both sides (the lower bound, in
    # floating point, is not exactly its negative)
    _, t_upper = stats.t.interval(level, x.size - 1)
    half = float(t_upper * x.std(ddof=1) / math.sqrt(x.size))
    return m, max(bounds[0], m - half), min(bounds[1], m + half)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Proportion k/n with its Wilson score interval (0 and 1 exactly at k = 0 and k = n)."""
    if n == 0:
        return math.nan, 0.0, 1.0
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return k / n, float(ci.low), float(ci.high)


# ---- across runs: learning-rate grids, tasks, comparisons (the leaderboard's statistics) ---------
def lr_sensitivity(lrs, final_loss, initial) -> float:
    """Wortsman et al. 2023: mean over the LR grid of (min(final loss, start) - best of those over
    the grid). Each run's final loss is capped at its own starting loss `initial` (the leaderboard
    passes its loss at step 0; a diverged run counts as that) and averaged over the seeds of its
    LR. NaN for a grid of one LR, and where no run got below its start: a grid that failed
    everywhere is not insensitive to the learning rate."""
    initial = np.asarray(initial, np.float64)
    capped = np.minimum(np.asarray(final_loss, np.float64), initial)
    lrs = np.asarray(lrs)
    grid = np.unique(lrs)
    if len(grid) < 2 or not (capped < initial).any():
        return math.nan
    per_lr = np.array([capped[lrs == lr].mean() for lr in grid])
    return float((per_lr - per_lr.min()).mean())


def improvement(final_loss, initial) -> np.ndarray:
    """Loss improvement of each run, L0 - min(final loss, L0): zero for a run that diverged (an
    infinite or NaN final loss) or never got below its start."""
    initial = np.asarray(initial, np.float64)
    final = np.asarray(final_loss, np.float64)
    return initial - np.minimum(np.where(np.isnan(final), np.inf, final), initial)


def stable_width(lrs, ok) -> float:
    """log10(max/min) of the widest run of consecutive grid LRs that are all ok (stable and reaching
    the target); 0 for a single ok LR, NaN when none is."""
    lrs, ok = np.asarray(lrs, np.float64), np.asarray(ok, bool)
    order = np.argsort(lrs)
    lrs, ok = lrs[order], ok[order]
    best, start = math.nan, None
    for i in range(len(lrs) + 1):
        if i < len(lrs) and ok[i]:
            start = i if start is None else start
        elif start is not None:
            width = math.log10(lrs[i - 1] / lrs[start])
            best = width if math.isnan(best) else max(best, width)
            start = None
    return best


PROFILE_TAU_MAX = 4.0  # AlgoPerf integrates the profile from tau = 1 to 4


def performance_ratios(steps: np.ndarray) -> np.ndarray:
    """[entries, tasks] steps to target -> r = steps / best steps on that task (inf: never
    reached). A task no entry reaches gives NaN ratios (it says nothing about the entries)."""
    steps = np.asarray(steps, np.float64)
    best = np.min(np.where(np.isnan(steps), np.inf, steps), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(np.isfinite(best), steps / best, np.nan)
    return np.where(np.isnan(steps) & np.isfinite(best), np.inf, r)


def performance_profile(ratios: np.ndarray, taus: np.ndarray, weights=None) -> np.ndarray:
    """rho(tau) = (weighted) share of tasks with r <= tau, for each entry: [entries, taus]. Tasks
    with NaN ratios (no entry reached the target) are left out."""
    ratios = np.asarray(ratios, np.float64)
    w = np.ones(ratios.shape[1]) if weights is None else np.asarray(weights, np.float64)
    keep = ~np.isnan(ratios).all(axis=0)
    ratios, w = ratios[:, keep], w[keep] / w[keep].sum()
    return np.stack([(w * (ratios <= tau)).sum(axis=1) for tau in np.asarray(taus)], axis=1)


def profile_score(ratios: np.ndarray, weights=None) -> np.ndarray:
    """AlgoPerf score (1/3) * integral of rho(tau) from 1 to 4, exactly: a task with ratio r adds
    its weight times (4 - max(r, 1)) / 3 when r <= 4."""
    ratios = np.asarray(ratios, np.float64)
    w = np.ones(ratios.shape[1]) if weights is None else np.asarray(weights, np.float64)
    keep = ~np.isnan(ratios).all(axis=0)
    ratios, w = ratios[:, keep], w[keep] / w[keep].sum()
    area = np.clip(PROFILE_TAU_MAX - np.maximum(ratios, 1.0), 0.0, PROFILE_TAU_MAX - 1.0)
    area = np.where(np.isfinite(ratios), area, 0.0)
    return (w * area).sum(axis=1) / (PROFILE_TAU_MAX - 1.0)


def welch_p(a, b) -> float:
    """Two-sided Welch t-test p-value of equal means. Two constant samples give 1 if equal, else 0;
    NaN when a sample has fewer than 2 values or a non-finite one (no test possible)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    if a.var() == 0 and b.var() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    with warnings.catch_warnings():  # nearly equal samples: scipy warns, the p-value is still ~1
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test p-value of equal proportions k1/n1 and k2/n2."""
    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)

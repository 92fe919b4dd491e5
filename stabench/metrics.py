"""Stability and accuracy metrics from telemetry (pure numpy), as the README's Metrics section and
the leaderboard captions define them."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

INITIAL_STEPS = 10  # initial loss L0: mean of the first 10 finite losses
MA_WINDOW = 20  # divergence threshold: 20-step moving average of the loss ...
MA_START = 20  # ... above max(2 L0, L0 + 1) after step 20
# the values a metric can take; its intervals are cut to them
METRIC_RANGES = {"test_accuracy": (0.0, 1.0), "test_loss": (0.0, math.inf),
                 "val_accuracy": (0.0, 1.0), "val_loss": (0.0, math.inf),
                 "final_train_loss": (0.0, math.inf)}
# the validation metric that stands for a test metric wherever a setting is chosen
VALIDATION_OF = {"test_accuracy": "val_accuracy", "test_loss": "val_loss"}
UNBOUNDED = (-math.inf, math.inf)
JUMP_FACTOR, JUMP_WINDOW = 1.5, 50  # loss jump: loss > 1.5x its 50-step mean; once per 50 steps


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


def above_threshold(loss: np.ndarray, frozen_at: int) -> np.ndarray:
    """Per step: the run is frozen (the engine stopped it at a non-finite loss or gradient that no
    method skipped, or at non-finite parameters or state), or, after step 20, the 20-step average
    of its finite losses is above max(2 L0, L0 + 1) (a window without a finite loss counts as
    above). A non-finite step that a method skipped is not above: it counts in
    `nonfinite_steps`."""
    above = np.zeros(len(loss), bool)
    if frozen_at >= 0:
        above[frozen_at:] = True
    l0 = initial_loss(loss)
    limit = max(2 * l0, l0 + 1)
    with np.errstate(invalid="ignore"):
        ma = moving_average(loss, MA_WINDOW)
        high = (ma > limit) | (ma == math.inf)
    high[: MA_START + 1] = False
    return above | high


def first_unstable_step(loss: np.ndarray, frozen_at: int) -> int | None:
    """First step above the divergence threshold (`above_threshold`), whether or not the run came
    back below it; None when it never went above."""
    hits = np.flatnonzero(above_threshold(loss, frozen_at))
    return int(hits[0]) if hits.size else None


def divergence_step(loss: np.ndarray, frozen_at: int) -> int | None:
    """Step from which the run stayed above the divergence threshold to the end of training (the
    start of its last excursion, or the step it froze at): a run diverged when it was frozen or its
    final moving average, the training loss at the end, is above the threshold. None for a run
    that ends below it, including one that went above and recovered (a loss spike)."""
    above = above_threshold(loss, frozen_at)
    if not above.size or not above[-1]:
        return None
    below = np.flatnonzero(~above)
    return int(below[-1]) + 1 if below.size else 0


def loss_jumps(loss: np.ndarray) -> int:
    """Steps whose loss exceeds 1.5x the mean of the previous 50; jumps within 50 steps count once.
    A local measure of roughness, unrelated to the divergence threshold."""
    count, last = 0, -JUMP_WINDOW - 1
    finite = np.where(np.isfinite(loss), loss, np.nan)
    c = np.concatenate([[0.0], np.nancumsum(finite)])
    n = np.concatenate([[0], np.cumsum(np.isfinite(finite))])
    for t in range(JUMP_WINDOW, len(loss)):
        k = n[t] - n[t - JUMP_WINDOW]
        if k == 0 or not np.isfinite(finite[t]):
            continue
        mean = (c[t] - c[t - JUMP_WINDOW]) / k
        if finite[t] > JUMP_FACTOR * mean and t - last > JUMP_WINDOW:
            count, last = count + 1, t
    return count


def first_reaching(values: np.ndarray, steps: np.ndarray, target: float, mode: str) -> float:
    """First evaluation step whose value reaches the target (max: >=, min: <=); inf if never."""
    with np.errstate(invalid="ignore"):
        hit = values >= target if mode == "max" else values <= target
    idx = np.flatnonzero(hit)
    return float(steps[idx[0]]) if idx.size else math.inf


def run_metrics(tel: dict[str, np.ndarray], evals: dict[str, np.ndarray], eval_steps: np.ndarray,
                frozen_at: int, target: tuple[str, float, str],
                edge: tuple[str, float] | None = None) -> dict[str, float]:
    """Metrics of one run from its telemetry rows ([steps]) and evaluations ([evals]).
    `divergence_step` is the step the run diverged for good (`divergence_step`), the last step for
    one that did not; `first_unstable_step` the first step above the threshold (NaN: never).
    A run that recorded its sharpness also gets `sharpness_metrics` (`edge`: the run's
    `stability_threshold`)."""
    loss, gnorm = tel["loss"], tel["grad_norm"]
    steps = len(loss)
    div = divergence_step(loss, frozen_at)
    unstable = first_unstable_step(loss, frozen_at)
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
        # above the threshold during training, below it at the end (and not frozen)
        "spiked": float(unstable is not None and div is None),
        "first_unstable_step": math.nan if unstable is None else float(unstable),
        "final_train_loss": math.inf if failed or not finite_tail.size
        else float(finite_tail.mean()),
        "test_loss": math.inf if failed else float(evals["test_loss"][-1]),
        "max_grad_norm": float(finite_g.max()) if finite_g.size else math.inf,
        "p99_grad_norm": float(np.percentile(finite_g, 99)) if finite_g.size else math.inf,
        "clipped_share": float(tel["changed"][active].mean()) if active.any() else 0.0,
        "nonfinite_steps": float(np.nansum(tel["nonfinite"])),
        "loss_jumps": float(loss_jumps(loss)),
    }
    if "test_accuracy" in evals:
        out["test_accuracy"] = 0.0 if failed else float(evals["test_accuracy"][-1])
    if "val_loss" in evals:  # the data held out a validation split: scored as the test split
        out["val_loss"] = math.inf if failed else float(evals["val_loss"][-1])
    if "val_accuracy" in evals:
        out["val_accuracy"] = 0.0 if failed else float(evals["val_accuracy"][-1])
    out["steps_to_target"] = math.inf if failed else first_reaching(
        evals[metric], eval_steps, value, mode)
    if "sharpness" in tel:
        out.update(sharpness_metrics(tel, div, edge))
    return out


def stability_threshold(optimizer: str, args: dict, lr: float) -> tuple[str, float] | None:
    """(series, level): the sharpness above which the optimizer's step diverges on a quadratic,
    the level the edge of stability hovers at (Cohen et al. 2021, 2022). Gradient descent: 2/lr;
    heavy-ball momentum b (optax.trace): (2 + 2b)/lr; Nesterov: (2 + 2b)/((1 + 2b) lr); Adam and
    AdamW: (2 + 2 b1)/((1 - b1) lr) on the preconditioned sharpness. None for other optimizers."""
    if optimizer == "sgd":
        b = args.get("momentum", 0.0)
        return "sharpness", (2 + 2 * b) / ((1 + 2 * b if args.get("nesterov") else 1) * lr)
    if optimizer in ("adam", "adamw"):
        b1 = args.get("b1", 0.9)
        return "precond_sharpness", (2 + 2 * b1) / ((1 - b1) * lr)
    return None


def sharpness_metrics(tel: dict[str, np.ndarray], divergence: int | None,
                      edge: tuple[str, float] | None) -> dict[str, float]:
    """From the estimated steps of a run's `sharpness` (and `precond_sharpness`) series (finite;
    NaN elsewhere): its last estimate (`sharpness_final`) and largest (`sharpness_max`); the last
    estimate before the step the run diverged at (`sharpness_at_divergence`, NaN for a run that did
    not); the share of estimates at or above the stability threshold `edge` (`eos_share`, NaN
    without one)."""
    out = {}
    for name in ("sharpness", "precond_sharpness"):
        if name not in tel:
            continue
        values = np.asarray(tel[name], np.float64)
        estimated = values[np.isfinite(values)]
        out[f"{name}_final"] = float(estimated[-1]) if estimated.size else math.nan
        out[f"{name}_max"] = float(estimated.max()) if estimated.size else math.nan
    values = np.asarray(tel["sharpness"], np.float64)
    before = values[:divergence][np.isfinite(values[:divergence])] if divergence else []
    out["sharpness_at_divergence"] = float(before[-1]) if len(before) else math.nan
    share = math.nan
    if edge is not None and edge[0] in tel:
        series = np.asarray(tel[edge[0]], np.float64)
        estimated = series[np.isfinite(series)]
        share = float((estimated >= edge[1]).mean()) if estimated.size else math.nan
    out["eos_share"] = share
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
    """[entries, tasks] steps to target -> r = steps / fewest steps of any entry on that task. inf
    where the entry never reached the target or did not run the task (NaN steps), and for every
    entry on a task no entry reached: as in AlgoPerf, such a task still counts in every entry's
    profile, as one it did not solve."""
    steps = np.asarray(steps, np.float64)
    steps = np.where(np.isnan(steps), np.inf, steps)
    best = steps.min(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(best), steps / best, np.inf)


def _task_shares(n_tasks: int, weights) -> np.ndarray:
    w = np.ones(n_tasks) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n_tasks,) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"task weights must be {n_tasks} non-negative numbers, not all zero; "
                         f"got {w.tolist()}")
    return w / w.sum()


def performance_profile(ratios: np.ndarray, taus: np.ndarray, weights=None) -> np.ndarray:
    """rho(tau) = share of all tasks (weighted) with r <= tau, for each entry: [entries, taus]."""
    ratios = np.asarray(ratios, np.float64)
    w = _task_shares(ratios.shape[1], weights)
    return np.stack([(w * (ratios <= tau)).sum(axis=1) for tau in np.asarray(taus)], axis=1)


def profile_score(ratios: np.ndarray, weights=None) -> np.ndarray:
    """AlgoPerf's score, (1/3) * integral of rho(tau) from 1 to 4, computed exactly (AlgoPerf's
    trapezoid rule on 100 points approximates it within 1/198): a task with ratio r adds its share
    of the weight times (4 - max(r, 1)) / 3 when r <= 4, nothing otherwise."""
    ratios = np.asarray(ratios, np.float64)
    w = _task_shares(ratios.shape[1], weights)
    area = np.clip(PROFILE_TAU_MAX - np.maximum(ratios, 1.0), 0.0, PROFILE_TAU_MAX - 1.0)
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


def holm(pvalues, alpha: float = 0.05) -> np.ndarray:
    """Holm's step-down procedure over one family of tests: True where the null is rejected.
    Sorted ascending, p_(k) (k = 1..m) is rejected while p_(j) <= alpha / (m - j + 1) for every
    j <= k; the first that fails and all larger p-values are kept. NaN p-values (no test) are not
    in the family and come back False."""
    p = np.asarray(pvalues, np.float64)
    tested = np.flatnonzero(~np.isnan(p))
    reject = np.zeros(p.shape, bool)
    m = tested.size
    for k, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        if p[i] > alpha / (m - k):
            break
        reject[i] = True
    return reject

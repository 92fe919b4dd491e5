"""Stability and accuracy metrics from telemetry (pure numpy), as DESIGN.md section 4 defines them."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

INITIAL_STEPS = 10  # initial loss L0: mean of the first 10 steps
MA_WINDOW = 20  # divergence: 20-step moving average of the loss ...
MA_START = 20  # ... above max(2 L0, L0 + 1) after step 20
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 50  # loss spike: loss > 1.5x its 50-step mean; once per 50 steps


def initial_loss(loss: np.ndarray) -> float:
    head = loss[:INITIAL_STEPS]
    head = head[np.isfinite(head)]
    return float(head.mean()) if head.size else math.inf


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps; entry t averages x[t-window+1 .. t] (NaN before that)."""
    out = np.full(len(x), np.nan)
    if len(x) >= window:
        c = np.cumsum(np.concatenate([[0.0], x.astype(np.float64)]))
        out[window - 1:] = (c[window:] - c[:-window]) / window
    return out


def divergence_step(loss: np.ndarray, grad_norm: np.ndarray, frozen_at: int) -> int | None:
    """First step with a non-finite loss or grad, or whose 20-step loss average exceeds
    max(2 L0, L0 + 1) after step 20; None when neither happens."""
    bad = ~np.isfinite(loss) | ~np.isfinite(grad_norm)
    if frozen_at >= 0:
        bad[frozen_at:] = True
    l0 = initial_loss(loss)
    limit = max(2 * l0, l0 + 1)
    with np.errstate(invalid="ignore"):
        ma = moving_average(np.where(np.isfinite(loss), loss, np.inf), MA_WINDOW)
        high = ma > limit
    high[: MA_START + 1] = False
    hits = np.flatnonzero(bad | high)
    return int(hits[0]) if hits.size else None


def loss_spikes(loss: np.ndarray) -> int:
    """Steps whose loss exceeds 1.5x the mean of the previous 50; spikes within 50 steps count once."""
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
    div = divergence_step(loss, gnorm, frozen_at)
    failed = frozen_at >= 0  # non-finite: no usable model
    finite_tail = loss[max(0, steps - MA_WINDOW):]
    finite_g = gnorm[np.isfinite(gnorm)]
    active = np.isfinite(tel["changed"])
    metric, value, mode = target
    out = {
        "initial_loss": initial_loss(loss),
        "diverged": float(div is not None),
        "divergence_step": float(div if div is not None else steps - 1),
        "final_train_loss": math.inf if failed or not np.isfinite(finite_tail).all()
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


def mean_ci(x, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds; NaN bounds where no interval exists (one seed, or a
    non-finite value)."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size == 1 or not np.isfinite(x).all():
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Proportion k/n with its Wilson score interval."""
    if n == 0:
        return math.nan, 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)

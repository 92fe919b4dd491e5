"""Where and when gradients exploded or vanished, what it did to the loss, and what to try.

Pure functions of one run's telemetry (per-step arrays `[steps]` and per-layer `[steps, layers]`
as the engine records them): `explosion(s)`, `vanishing`, `diagnose`, the recommendations, and the
Markdown report. Nothing here trains, reads or writes.
"""

from __future__ import annotations

import math
import shlex
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .metrics import divergence_step
from .registry import parse_call, split_plus
from .text import format_number, plural

EXPLODE_FACTOR = 10.0  # explosion: grad norm above 10x ...
MEDIAN_WINDOW = 50  # ... its median over the previous 50 steps
# Every step after the first is judged: training that blows up at a high learning rate often does
# so within its first few steps, against a baseline of the steps before it
MIN_HISTORY = 1
AROUND = 20  # loss mean over the 20 steps before and the 20 steps from the event
RECOVER_TOL = 0.10  # recovered: a 10-step loss mean back within 10% of the pre-event mean
RECOVER_WINDOW = 10
VANISH_REL, VANISH_ABS = 1e-3, 1e-7  # vanishing layer: below 1e-3 x the largest layer, or 1e-7
VANISH_SHARE = 0.5  # ... on more than half of the recorded steps
SHOW_LAYERS = 5  # layers named in one line of the report
# An origin layer is named only when its jump ratio at the onset is at least LEAD_FACTOR x the next
# layer's. A fault in one layer leaves the others near their medians (30x and 100x gradient spikes
# planted in one layer of a depth-3 digits MLP: the leader 19x to 110x the next layer), while a
# learning rate too large lifts every layer at once through the shared step and the coupled
# backward pass (the explosions of digits at depth 1 to 6, deep_plain, teacher and temporal_order
# at their unstable rates: 1.01x to 4.8x)
LEAD_FACTOR = 10.0
LR_FACTOR = 10  # without a measured stable rate: this many times lower


def running_median(x: np.ndarray, window: int = MEDIAN_WINDOW,
                   min_history: int = MIN_HISTORY) -> np.ndarray:
    """Entry t: median of the finite values among x[t-window .. t-1] (per column for 2-D x);
    NaN where fewer than `min_history` of them are finite."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(len(x), -1)
    padded = np.concatenate([np.full((window, flat.shape[1]), np.nan),
                             np.where(np.isfinite(flat), flat, np.nan)])
    out = np.empty_like(flat)
    for j in range(flat.shape[1]):
        windows = np.lib.stride_tricks.sliding_window_view(padded[:-1, j], window)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: NaN
            med = np.nanmedian(windows, axis=1)
        enough = np.sum(np.isfinite(windows), axis=1) >= min_history
        out[:, j] = np.where(enough, med, np.nan)
    return out.reshape(x.shape)


def jump_ratios(x: np.ndarray) -> np.ndarray:
    """x over its running median; +inf where x is not finite, NaN where there is no median."""
    med = running_median(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(x, np.float64) / med
    return np.where(np.isfinite(x), ratio, np.where(np.isnan(med), np.nan, np.inf))


@dataclass(frozen=True)
class Explosion:
    step: int
    cause: str  # "non-finite" or "grad norm"
    grad_norm: float
    median: float  # running median of the grad norm before the step (NaN: no history)
    layers: tuple[str, ...]  # where it started: the earliest layers to jump, largest ratio first
    onset: int  # the step those layers first jumped (<= step)
    layer_ratios: tuple[tuple[str, float], ...]  # every layer's ratio at `onset`, largest first
    loss_before: float  # mean of the finite losses of the AROUND steps before `step` (NaN: none)
    loss_after: float  # mean of the finite losses of the AROUND steps from `step` (inf: the
    # run froze there)
    recovered_at: int | None  # first step from which a RECOVER_WINDOW mean is within RECOVER_TOL
    # the layers above EXPLODE_FACTOR x their own running median (or non-finite) at `step`
    exploded: tuple[str, ...] = ()

    @property
    def lead(self) -> float:
        """The first layer's ratio at `onset` over the next layer's (NaN: no comparison)."""
        if len(self.layer_ratios) < 2:
            return math.nan
        first, second = self.layer_ratios[0][1], self.layer_ratios[1][1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(first) / np.float64(second))

    @property
    def origin(self) -> str | None:
        """The layer the explosion started in: the first to jump, when it clearly leads (its ratio
        at least LEAD_FACTOR x the next layer's; a model's only layer trivially)."""
        if not self.layers:
            return None
        if len(self.layer_ratios) == 1 or self.lead >= LEAD_FACTOR:
            return self.layers[0]
        return None

    @property
    def together(self) -> bool:
        """Every layer exploded by the event and none clearly led: the step size's signature."""
        return (len(self.layer_ratios) > 1 and self.origin is None
                and len(self.exploded) == len(self.layer_ratios))

    @property
    def ratio(self) -> float:
        if self.median > 0:
            return self.grad_norm / self.median
        return math.inf if self.median == 0 and self.grad_norm > 0 else math.nan

    @property
    def transient(self) -> bool:
        """The loss was back within RECOVER_TOL of its pre-event mean within AROUND steps."""
        return self.recovered_at is not None and self.recovered_at <= self.step + AROUND


def explosion(loss: np.ndarray, grad_norm: np.ndarray, layer_grad_norm: np.ndarray,
              layer_names: list[str], frozen_at: int = -1) -> Explosion | None:
    """The first step whose global grad norm exceeds EXPLODE_FACTOR x its running median over the
    previous MEDIAN_WINDOW steps, or whose loss, grad norm or parameters are non-finite (the engine
    freezes a run there: `frozen_at`); None if there is none."""
    return _Series(loss, grad_norm, layer_grad_norm, layer_names, frozen_at).event(0)


def explosions(loss: np.ndarray, grad_norm: np.ndarray, layer_grad_norm: np.ndarray,
               layer_names: list[str], frozen_at: int = -1) -> tuple[Explosion, ...]:
    """The first event (`explosion`) and, while they are transient, the next ones, each searched
    from AROUND steps after the last (or after its recovery, if later); ends with the first event
    the loss did not recover from, if any."""
    series = _Series(loss, grad_norm, layer_grad_norm, layer_names, frozen_at)
    out, start = [], 0
    while (e := series.event(start)) is not None:
        out.append(e)
        if not e.transient:
            break
        start = max(e.step + AROUND, e.recovered_at + 1)
    return tuple(out)


class _Series:
    """One run's telemetry with its running medians, searched for events from a given step."""

    def __init__(self, loss, grad_norm, layer_grad_norm, layer_names, frozen_at):
        self.loss = np.asarray(loss, np.float64)
        self.grad_norm = np.asarray(grad_norm, np.float64)
        self.bad = ~np.isfinite(self.loss) | ~np.isfinite(self.grad_norm)
        self.frozen_at = frozen_at
        if frozen_at >= 0:
            self.bad[frozen_at:] = True
        self.median = running_median(self.grad_norm)
        with np.errstate(invalid="ignore"):
            self.high = jump_ratios(self.grad_norm) > EXPLODE_FACTOR
        self.layer_ratios = jump_ratios(layer_grad_norm)
        self.names = list(layer_names)

    def event(self, start: int) -> Explosion | None:
        steps = len(self.loss)
        bad = np.flatnonzero(self.bad[start:])
        first_bad = start + int(bad[0]) if bad.size else steps
        high = np.flatnonzero(self.high[start:first_bad])
        step = start + int(high[0]) if high.size else first_bad
        if step >= steps:
            return None
        layers, onset, ratios = self._origin(step, start)
        with np.errstate(invalid="ignore"):
            exploded = self.layer_ratios[step] > EXPLODE_FACTOR
        loss = self.loss
        before = loss[max(0, step - AROUND):step]
        before = before[np.isfinite(before)]  # steps a method skipped
        loss_before = float(before.mean()) if before.size else math.nan
        # a skipped non-finite step is left out; a run that froze has no loss after
        after = loss[step:step + AROUND]
        after = after[np.isfinite(after)]
        froze = 0 <= self.frozen_at < step + AROUND
        loss_after = math.inf if froze or not after.size else float(after.mean())
        return Explosion(step, "non-finite" if step == first_bad else "grad norm",
                         float(self.grad_norm[step]), float(self.median[step]), layers, onset,
                         ratios, loss_before, loss_after,
                         _recovery(loss, self.bad, step, loss_before),
                         tuple(self.names[j] for j in np.flatnonzero(exploded)))

    def _origin(self, step: int, start: int):
        """The layers whose own grad norm jumped first: in the unbroken stretch of steps that ends
        at `step` (at most MEDIAN_WINDOW long, none before `start`) where some layer exceeds
        EXPLODE_FACTOR x its own running median, the layers above it at the stretch's first step;
        ties ordered by that ratio, then by the ratio one step earlier. A blip that subsided
        before the stretch is not the origin. None when no layer is above it at `step`."""
        ratios, names = self.layer_ratios, self.names
        lo = max(start, step - MEDIAN_WINDOW)
        with np.errstate(invalid="ignore"):
            jumped = ratios[lo:step + 1] > EXPLODE_FACTOR
        some = jumped.any(axis=1)
        if some[-1]:
            quiet = np.flatnonzero(~some)
            first = int(quiet[-1]) + 1 if quiet.size else 0
            onset, chosen = lo + first, np.flatnonzero(jumped[first])
        else:
            onset, chosen = step, np.array([], int)
        now = np.nan_to_num(ratios[onset], nan=-np.inf)
        prev = np.nan_to_num(ratios[onset - 1], nan=-np.inf) if onset > 0 else np.zeros(len(names))
        order = sorted(chosen, key=lambda j: (-now[j], -prev[j]))
        everyone = sorted(range(len(names)), key=lambda j: (-now[j], -prev[j]))
        return (tuple(names[j] for j in order), onset,
                tuple((names[j], float(ratios[onset, j])) for j in everyone))


def _recovery(loss: np.ndarray, bad: np.ndarray, step: int, before: float) -> int | None:
    if not np.isfinite(before):
        return None
    limit = (1 + RECOVER_TOL) * before
    for t in range(step, len(loss) - RECOVER_WINDOW + 1):
        # a window holding a non-finite step says nothing yet: a method may have skipped it and
        # trained on (a frozen run has no clean window left)
        if bad[t:t + RECOVER_WINDOW].any():
            continue
        if loss[t:t + RECOVER_WINDOW].mean() <= limit:
            return t
    return None


@dataclass(frozen=True)
class Vanishing:
    layers: tuple[tuple[str, float], ...]  # (layer, share of steps below the thresholds)
    ratio_init: float  # first-layer over last-layer grad norm at step 0
    ratio_end: float  # the same, median over the last 10 finite steps
    steps: int  # steps with every layer's norm finite, the basis of the shares
    # an explosion before which no layer was vanishing: the vanishing is its consequence (dead
    # units after the blow-up), not a cause
    after_explosion: int | None = None


def vanishing(layer_grad_norm: np.ndarray, layer_names: list[str]) -> Vanishing:
    """Layers whose grad norm is below VANISH_REL x the largest layer's, or below VANISH_ABS, on
    more than VANISH_SHARE of the steps; and the first-to-last layer grad-norm ratio."""
    norms = np.asarray(layer_grad_norm, np.float64)
    rows = norms[np.isfinite(norms).all(axis=1)]
    if not len(rows):
        return Vanishing((), math.nan, math.nan, 0)
    low = (rows < VANISH_REL * rows.max(axis=1, keepdims=True)) | (rows < VANISH_ABS)
    share = low.mean(axis=0)
    flagged = tuple((layer_names[j], float(share[j])) for j in np.flatnonzero(share > VANISH_SHARE))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = rows[:, 0] / rows[:, -1]
        ratio_init = float(norms[0, 0] / norms[0, -1]) if np.isfinite(norms[0]).all() else math.nan
    return Vanishing(flagged, ratio_init, float(np.median(ratio[-10:])), len(rows))


@dataclass(frozen=True)
class Signal:
    """Signal propagation at initialization: per layer, activation std and grad norm at step 0."""

    layers: tuple[str, ...]
    activation_std: tuple[float, ...] | None  # None: not available (e.g. data missing)
    grad_norm: tuple[float, ...]


@dataclass(frozen=True)
class Recommendation:
    action: str  # what to pass: a method, an init, a --set override
    reason: str  # one line


@dataclass(frozen=True)
class Diagnosis:
    run: dict  # task, method, init, optimizer, seed, lr, steps, record
    steps_recorded: int  # steps with a finite loss (training stops at a non-finite one)
    signal: Signal
    at_init_only: bool = False
    events: tuple[Explosion, ...] = ()  # see `explosions`
    divergence: int | None = None  # metrics.divergence_step; None: did not diverge
    vanishing: Vanishing | None = None
    recommendations: tuple[Recommendation, ...] = field(default=())
    notes: tuple[str, ...] = ()  # what the recommendations could not offer, and why

    @property
    def explosion(self) -> Explosion | None:
        """The first event."""
        return self.events[0] if self.events else None

    @property
    def harmful(self) -> Explosion | None:
        """The first event the loss did not recover from."""
        return next((e for e in self.events if not e.transient), None)

    @property
    def healthy(self) -> bool:
        """No event at all: no explosion (not even a transient spike), divergence or vanishing."""
        return not self.events and not self.needs_fix

    @property
    def needs_fix(self) -> bool:
        """A divergence, an explosion the loss did not recover from, or vanishing gradients."""
        return (self.divergence is not None or self.harmful is not None
                or bool(self.vanishing and self.vanishing.layers))


def diagnose(telemetry: dict[str, np.ndarray], layer_names: list[str], run: dict,
             frozen_at: int = -1, activation_std: np.ndarray | None = None,
             at_init: bool = False) -> Diagnosis:
    """Everything the report says about one run, from its telemetry rows (no run axis)."""
    loss, gnorm, norms = telemetry["loss"], telemetry["grad_norm"], telemetry["layer_grad_norm"]
    signal = Signal(tuple(layer_names),
                    None if activation_std is None else tuple(float(v) for v in activation_std),
                    tuple(float(v) for v in norms[0]))
    recorded = int(np.isfinite(loss).sum())
    if at_init:
        return Diagnosis(run, recorded, signal, at_init_only=True,
                         vanishing=vanishing(norms[:1], layer_names))
    events = explosions(loss, gnorm, norms, layer_names, frozen_at)
    harmful = events[-1] if events and not events[-1].transient else None
    vanish = vanishing(norms, layer_names)
    if vanish.layers and harmful is not None \
            and not vanishing(norms[:harmful.step], layer_names).layers:
        vanish = replace(vanish, after_explosion=harmful.step)
    return Diagnosis(run, recorded, signal, False, events, divergence_step(loss, frozen_at),
                     vanish)


# ---- recommendations ---------------------------------------------------------------------------
EXPLOSION_ADVICE = (
    ("clip_norm", "bounds every update when the global gradient norm spikes, as it did here"),
    ("agc", "clips each layer's gradient relative to its weight norm, so a layer that jumps is "
            "held back without slowing the others"),
    ("warmup", "small steps while early curvature is high; explosions early in training are the "
               "typical case"),
)
VANISHING_ADVICE = (
    ("init", "he_normal", None, "variance 2/fan_in keeps each layer's signal from shrinking with "
                                "depth"),
    ("model", "residual", True, "identity paths carry the gradient past layers where it shrinks"),
    ("model", "norm", "layer", "normalization rescales every layer's input to unit variance"),
)


def _broke(diag: Diagnosis) -> bool:
    return diag.divergence is not None or diag.harmful is not None


def _step_size(diag: Diagnosis) -> bool:
    """The event that broke the run shows the step size's signature (every layer at once)."""
    e = diag.harmful or diag.explosion
    return e is not None and e.together


def rule_recommendations(diag: Diagnosis, methods: set[str], inits: set[str],
                         model_args: set[str]) -> tuple[Recommendation, ...]:
    """Rule-based advice: explosion or divergence -> clipping, AGC, warmup, a lower learning rate
    (first when every layer exploded together); vanishing -> He init, residual connections,
    normalization. Only what this installation has (registered methods and inits, arguments the
    task's model accepts) and the run does not use."""
    run = diag.run
    used = {parse_call(term)[0] for term in split_plus(run["method"])}
    out = []
    if _broke(diag):
        out += [Recommendation(f"--method {name}", reason) for name, reason in EXPLOSION_ADVICE
                if name in methods and name not in used]
        out.insert(0 if _step_size(diag) else len(out), lr_recommendation(diag))
    v = diag.vanishing
    if v is not None and v.layers and v.after_explosion is None:
        for kind, name, value, reason in VANISHING_ADVICE:
            if kind == "init" and name in inits and parse_call(run["init"])[0] != name:
                out.append(Recommendation(f"--init {name}", reason))
            elif kind == "model" and name in model_args and run["model"].get(name) != value:
                text = str(value).lower() if isinstance(value, bool) else value
                out.append(Recommendation(f"--set model.{name}={text}", reason))
    return tuple(out)


# A leaderboard row read by `reports.board_rows_for` carries `lr_runs`: for each learning rate of
# the entry's grid, (runs that diverged, runs)
def _at_or_above(lr_runs: dict, lr: float) -> float | None:
    """The grid rate that speaks for `lr`: `lr` itself, else the next rate above it (between two
    rates of the grid, the higher one: instability grows with the rate); None past the grid."""
    rates = [r for r in lr_runs if r >= lr or math.isclose(r, lr, rel_tol=1e-6)]
    return min(rates) if rates else None


def stable_at(row: dict, lr: float) -> bool:
    """No run of the entry diverged at `lr` (or the next rate of its grid above it)."""
    lr_runs = row.get("lr_runs") or {}
    rate = _at_or_above(lr_runs, lr)
    return rate is not None and lr_runs[rate][0] == 0


def stable_below(lr_runs: dict, lr: float) -> float | None:
    """The largest rate of the grid below `lr` at which, and at every lower rate, no run
    diverged; None if there is none."""
    best = None
    for rate in sorted(lr_runs):
        if rate >= lr or math.isclose(rate, lr, rel_tol=1e-6) or lr_runs[rate][0]:
            break
        best = rate
    return best


def _entry(r: dict) -> tuple:
    return tuple(str(r[k]) for k in ("method", "init", "optimizer"))


def board_recommendations(board_rows: list[dict], where: str, lr: float, own: tuple = (),
                          top: int = 3) -> tuple[Recommendation, ...]:
    """The best entries of a task's leaderboard rows (as the report's leaderboard.csv writes them:
    variant, method, init, optimizer, rank, stability, quality_*; with `lr_runs`), best rank first,
    among those that did not diverge at the run's learning rate `lr` (see `stable_at`), other than
    the run's own entry `own` (method, init, optimizer)."""
    rows = sorted(board_rows, key=lambda r: (_num(r.get("rank")), -_num(r.get("stability"))))
    out = []
    for r in [r for r in rows if stable_at(r, lr) and _entry(r) != own][:top]:
        rate = _at_or_above(r["lr_runs"], lr)
        at = f"lr {rate:g}" + ("" if math.isclose(rate, lr, rel_tol=1e-6) else
                               f", the next rate of its grid above {lr:g}")
        quality = f"{r.get('quality_metric', 'quality')} {_num(r.get('quality_mean')):.3g}"
        out.append(Recommendation(
            " ".join(f"--{k} {shlex.quote(str(r[k]))}" for k in ("method", "init", "optimizer")),
            f"rank {_num(r.get('rank')):g} of {len(rows)} on {r['variant']} in {where} "
            f"(stability {_num(r.get('stability')):.3g}, {quality}); none of its "
            f"{plural(r['lr_runs'][rate][1], 'run')} at {at} diverged"))
    return tuple(out)


def no_stable_entry(board_rows: list[dict], where: str, lr: float) -> str:
    """Why a leaderboard has no entry to recommend at `lr`."""
    variant = board_rows[0]["variant"]
    ran = sum(_at_or_above(r.get("lr_runs") or {}, lr) is not None for r in board_rows)
    if not ran:
        return (f"no entry of {variant} in {where} ran at lr {lr:g} or above: none is known to "
                f"train there without diverging")
    return (f"no entry of {variant} in {where} trained without diverging at lr {lr:g} (or the "
            f"next rate of its grid above it): each of the {plural(ran, 'entry', 'entries')} "
            f"that ran there diverged on at least one seed")


def lr_recommendation(diag: Diagnosis, board_rows: list[dict] = (), where: str | None = None
                      ) -> Recommendation:
    """A lower learning rate: the largest rate below the run's at which its own entry in the
    leaderboard never diverged (nor below it), else at which no entry of the leaderboard did, else
    LR_FACTOR x lower."""
    run, lr = diag.run, diag.run["lr"]
    cause = ("every layer exploded together, the signature of a step size too large, not of one "
             "layer; " if _step_size(diag) else "")
    own = [r for r in board_rows
           if _entry(r) == tuple(str(run[k]) for k in ("method", "init", "optimizer"))]
    if own and (rate := stable_below(own[0].get("lr_runs") or {}, lr)) is not None:
        n = own[0]["lr_runs"][rate][1]
        return Recommendation(f"--lr {rate:g}", f"{cause}the largest rate below {lr:g} at which "
                              f"no run of this entry diverged (0 of {n} there, none at a lower "
                              f"rate) on {own[0]['variant']} in {where}")
    pooled: dict[float, list[int]] = {}
    for r in board_rows:
        for rate, (failed, n) in (r.get("lr_runs") or {}).items():
            pooled.setdefault(rate, [0, 0])
            pooled[rate][0] += failed
            pooled[rate][1] += n
    if (rate := stable_below(pooled, lr)) is not None:
        return Recommendation(f"--lr {rate:g}", f"{cause}the largest rate below {lr:g} at which "
                              f"no entry of {board_rows[0]['variant']} in {where} diverged (nor "
                              f"at a lower rate)")
    return Recommendation(f"--lr {lr / LR_FACTOR:g}", f"{cause}{LR_FACTOR}x lower: the size of "
                          f"the step that blew up scales with the learning rate")


def recommendations(diag: Diagnosis, board_rows: list[dict], where: str | None,
                    methods: set[str], inits: set[str], model_args: set[str]
                    ) -> tuple[tuple[Recommendation, ...], tuple[str, ...]]:
    """(advice, notes): with leaderboard rows, the best entries that did not diverge at the run's
    learning rate (a note if there is none) and, if the run broke, a lower rate (first when the
    step size is the cause); without, the rules."""
    if not board_rows:
        return rule_recommendations(diag, methods, inits, model_args), ()
    run = diag.run
    own = tuple(str(run[k]) for k in ("method", "init", "optimizer"))
    out = list(board_recommendations(board_rows, str(where), run["lr"], own))
    notes = () if out else (no_stable_entry(board_rows, str(where), run["lr"]),)
    if _broke(diag):
        out.insert(0 if _step_size(diag) else len(out), lr_recommendation(diag, board_rows,
                                                                             str(where)))
    return tuple(out), notes


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(v) else v


# ---- the report ----------------------------------------------------------------------------------
def _names(items, limit: int = SHOW_LAYERS) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _what(e: Explosion) -> str:
    if e.cause == "non-finite":
        return "non-finite values"
    return f"grad norm {format_number(e.ratio)}x its median"


def _where(e: Explosion, start: str) -> str:
    if e.origin is not None:
        return f", {start} {e.origin}"
    if e.together:
        return ", in every layer at once: the step size, not a layer"
    return ", no layer clearly first" if e.layers else ""


def summary(diag: Diagnosis) -> str:
    """One line: the verdict."""
    if diag.at_init_only:
        v = diag.vanishing
        return f"at init: first/last layer grad-norm ratio {format_number(v.ratio_init)}"
    parts = []
    spikes = [e for e in diag.events if e.transient]
    if spikes:
        e = spikes[0]
        first = "first at step" if len(spikes) > 1 else "at step"
        parts.append(f"{plural(len(spikes), 'transient gradient spike')} the loss recovered from "
                     f"({first} {e.step}, {_what(e)}{_where(e, 'in')})")
    e = diag.harmful
    if e is not None:
        parts.append(f"explosion at step {e.step} ({_what(e)}){_where(e, 'starting in')}")
    if diag.divergence is not None:
        parts.append(f"diverged at step {diag.divergence}")
    if diag.vanishing.layers:
        after = " after the explosion" if diag.vanishing.after_explosion is not None else ""
        parts.append(f"vanishing gradients in {len(diag.vanishing.layers)} of "
                     f"{len(diag.signal.layers)} layers{after}")
    return "; ".join(parts) if parts else "healthy: no explosion, divergence or vanishing gradients"


def to_markdown(diag: Diagnosis, figure: str | None = None) -> str:
    run = diag.run
    lines = [f"# Diagnosis: {run['task']}, method {run['method']}", "",
             f"init {run['init']} | optimizer {run['optimizer']} | lr {format_number(run['lr'])} | "
             f"seed {run['seed']} | {run['steps']} steps"
             + (f" | record `{run['record']}` run {run['run']}" if run.get("record") else ""),
             "", f"**{summary(diag)}**", ""]
    if not diag.at_init_only:
        lines += _explosion_lines(diag) + _vanishing_lines(diag.vanishing, len(diag.signal.layers))
    lines += _signal_lines(diag)
    lines += ["## Recommendation", ""]
    lines += [f"- `{r.action}`: {r.reason}" for r in diag.recommendations]
    lines += [f"- {note}" for note in diag.notes]
    if not (diag.recommendations or diag.notes):
        lines += ["- nothing to fix: no explosion, divergence or vanishing gradients"
                  if diag.healthy else
                  f"- nothing to fix: every spike was transient (the loss recovered within "
                  f"{AROUND} steps) and nothing diverged or vanished"
                  if not diag.needs_fix else
                  "- no registered technique left to suggest beyond what this run already uses"]
    lines.append("")
    if figure:
        lines += [f"![per-layer gradient norms and loss]({figure})", ""]
    return "\n".join(lines)


def _explosion_lines(diag: Diagnosis) -> list[str]:
    lines = ["## Explosion", ""]
    spikes = [e for e in diag.events if e.transient]
    if not diag.events:
        lines += [f"No step's gradient norm exceeded {EXPLODE_FACTOR:g}x its median over the "
                  f"previous {MEDIAN_WINDOW} steps, and every value stayed finite.", ""]
    if spikes:
        later = [str(e.step) for e in spikes[1:]]
        then = f" (then at step{'s' if len(later) > 1 else ''} {', '.join(later)})" if later else ""
        lines += [f"### {plural(len(spikes), 'transient spike')}: the loss recovered within "
                  f"{AROUND} steps", "", f"The first, at step {spikes[0].step}{then}:", ""]
        lines += _event_lines(spikes[0]) + [""]
    if diag.harmful is not None:
        lines += [f"### Explosion at step {diag.harmful.step}", ""]
        lines += _event_lines(diag.harmful) + [""]
    if diag.divergence is not None:
        lines += [f"Diverged at step {diag.divergence} (from there to the end of training, a "
                  f"non-finite loss or gradient froze the run or the 20-step mean loss stayed "
                  f"above max(2 L0, L0 + 1)).", ""]
    else:
        lines += ["Did not diverge (no non-finite loss or gradient froze the run, and the 20-step "
                  "mean loss at the end of training is at most max(2 L0, L0 + 1)).", ""]
    return lines


def _event_lines(e: Explosion) -> list[str]:
    lines = []
    if e.cause == "non-finite":
        lines.append(f"- step {e.step}: first non-finite loss, gradient or parameters "
                     f"(grad norm {format_number(e.grad_norm)}, running median "
                     f"{format_number(e.median)})")
    else:
        window = min(e.step, MEDIAN_WINDOW)
        lines.append(f"- step {e.step}: global grad norm {format_number(e.grad_norm)} = "
                     f"{format_number(e.ratio)}x its median over the previous "
                     f"{plural(window, 'step')} ({format_number(e.median)})")
    lines += _origin_lines(e)
    top = ", ".join(f"{n} {format_number(r)}x" for n, r in e.layer_ratios[:SHOW_LAYERS])
    lines.append(f"- layer ratios to their own median at step {e.onset}: {top}")
    lines.append(f"- loss: mean {format_number(e.loss_before)} over the {AROUND} steps before, "
                 f"{format_number(e.loss_after)} over the {AROUND} steps from it")
    if e.recovered_at is not None:
        lines.append(f"- recovered: a {RECOVER_WINDOW}-step loss mean is back within "
                     f"{RECOVER_TOL:.0%} of the pre-event mean from step {e.recovered_at}")
    else:
        lines.append(f"- not recovered: no later {RECOVER_WINDOW}-step loss mean came back "
                     f"within {RECOVER_TOL:.0%} of the pre-event mean")
    return lines


def _origin_lines(e: Explosion) -> list[str]:
    when = "at that step" if e.onset == e.step else f"at step {e.onset}"
    first = f"first to exceed {EXPLODE_FACTOR:g}x its own median, {when}"
    if not e.layers:
        history = any(math.isfinite(r) for _, r in e.layer_ratios)
        return [f"- started in: undetermined (no layer's grad norm exceeded {EXPLODE_FACTOR:g}x "
                f"its own median at the step)" if history else
                "- started in: undetermined (too little history before the step)"]
    if len(e.layer_ratios) == 1:
        return [f"- started in: {e.origin} (the model's only layer; {first})"]
    (lead, r0), (nxt, r1) = e.layer_ratios[:2]
    margin = (f"{lead} leads: {format_number(r0)}x vs {format_number(r1)}x next ({nxt}) at step "
              f"{e.onset}, {format_number(e.lead)} times the next layer's ratio")
    if e.origin is not None:
        lines = [f"- started in: {e.origin} ({first}; {margin}, a clear lead: at least "
                 f"{LEAD_FACTOR:g})"]
    else:
        lines = [f"- started in: no single layer ({_names(e.layers)} {first}; {margin}, not a "
                 f"clear lead: that needs at least {LEAD_FACTOR:g})"]
    if e.together:
        lines.append(f"- every layer's grad norm was above {EXPLODE_FACTOR:g}x its own median at "
                     f"step {e.step}: they rose together, the signature of a step size too large, "
                     f"not of one layer")
    return lines


def _vanishing_lines(v: Vanishing, n_layers: int) -> list[str]:
    lines = ["## Vanishing gradients", ""]
    if v.layers:
        shown = ", ".join(f"{n} ({s:.0%})" for n, s in v.layers[:SHOW_LAYERS])
        more = f" and {len(v.layers) - SHOW_LAYERS} more" if len(v.layers) > SHOW_LAYERS else ""
        lines.append(f"- {len(v.layers)} of {n_layers} layers had a grad norm below "
                     f"{VANISH_REL:g}x the largest layer's or below {VANISH_ABS:g} on most steps "
                     f"(share of steps): {shown}{more}")
        if v.after_explosion is not None:
            lines.append(f"- none of them was vanishing before the explosion at step "
                         f"{v.after_explosion}: a consequence of it (dead units), not a cause")
    else:
        lines.append(f"- no layer's grad norm stayed below {VANISH_REL:g}x the largest layer's "
                     f"(or {VANISH_ABS:g}) for most of the {v.steps} finite steps")
    lines += [f"- first/last layer grad-norm ratio: {format_number(v.ratio_init)} at init, "
              f"{format_number(v.ratio_end)} at the end", ""]
    return lines


def _signal_lines(diag: Diagnosis) -> list[str]:
    s = diag.signal
    lines = ["## Signal propagation at init", ""]
    if diag.at_init_only:
        lines += [f"- first/last layer grad-norm ratio at step 0: "
                  f"{format_number(diag.vanishing.ratio_init)}", ""]
    lines += ["| layer | activation std | grad norm at step 0 |", "|---|---|---|"]
    stds = s.activation_std or (None,) * len(s.layers)
    lines += [f"| {n} | {format_number(a)} | {format_number(g)} |"
              for n, a, g in zip(s.layers, stds, s.grad_norm)]
    if s.activation_std is None:
        lines += ["", "Activation stds need the task's data, which is not available here."]
    lines.append("")
    return lines

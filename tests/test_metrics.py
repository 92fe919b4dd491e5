import math

import numpy as np
import pytest

from stabench import metrics


def above_by_definition(loss, frozen_at):
    """The divergence threshold read off its definition, window by window: frozen, or after step
    20 the mean of the finite losses of the last 20 steps (inf if none) above max(2 L0, L0 + 1)."""
    l0 = metrics.initial_loss(loss)
    above = []
    for t in range(len(loss)):
        window = loss[max(0, t - 19):t + 1]
        finite = window[np.isfinite(window)]
        ma = finite.mean() if finite.size else math.inf
        above.append(0 <= frozen_at <= t or (t > 20 and ma > max(2 * l0, l0 + 1)))
    return np.array(above)


def outcome(loss, frozen_at=-1):
    return metrics.divergence_step(loss, frozen_at), metrics.first_unstable_step(loss, frozen_at)


# L0 = 2.3, threshold max(4.6, 3.3) = 4.6: over a base of 2.3 a 20-step mean passes it once 6 of
# its 20 losses are 10 ((6 * 10 + 14 * 2.3) / 20 = 4.61; 5 of 20 give 4.23); over a base of 1.0,
# once 9 are ((9 * 10 + 11) / 20 = 5.05; 8 of 20 give 4.6, not above)
def test_a_spike_that_recovers_is_a_spike_not_a_divergence():
    loss = np.concatenate([np.full(50, 2.3), np.full(30, 10.0), np.full(70, 1.0)])
    assert outcome(loss) == (None, 55)
    # the moving average came back below: mean of steps 130-149 is 1.0
    assert not above_by_definition(loss, -1)[-1]


def test_a_run_that_ends_above_the_threshold_diverged():
    loss = np.concatenate([np.full(50, 2.3), np.full(50, 10.0)])
    assert outcome(loss) == (55, 55)
    # an earlier spike it recovered from: diverged from the start of the last excursion
    loss = np.concatenate([np.full(50, 2.3), np.full(30, 10.0), np.full(70, 1.0),
                           np.full(50, 10.0)])
    assert outcome(loss) == (150 + 8, 55)


def test_a_frozen_run_diverged_at_its_freeze_or_earlier():
    assert outcome(np.full(100, 1.0), 70) == (70, 70)
    # the loss was already above the threshold when it froze: diverged from there
    loss = np.concatenate([np.full(50, 2.3), np.full(20, 10.0), np.full(30, np.nan)])
    assert outcome(loss, 70) == (55, 55)
    # frozen after a spike it had recovered from: diverged at the freeze
    loss = np.concatenate([np.full(50, 2.3), np.full(30, 10.0), np.full(70, 1.0)])
    assert outcome(loss, 140) == (140, 55)


@pytest.mark.parametrize("loss", [np.full(100, 2.3), np.linspace(2.3, 0.1, 300),
                                  np.linspace(2.3, 4.5, 100)])  # rises, but stays below 4.6
def test_flat_or_decreasing_is_neither(loss):
    assert outcome(loss) == (None, None)


def test_skipped_nonfinite_steps_are_no_divergence_unless_they_last_a_window():
    loss = np.full(100, 1.0)
    loss[30] = np.nan
    assert outcome(loss) == (None, None)
    # a window of 20 steps without one finite loss is above; training resumed: a spike
    loss[30:50] = np.nan
    assert outcome(loss) == (None, 49)
    # ... and at the end of training, a divergence
    loss = np.concatenate([np.full(80, 1.0), np.full(20, np.nan)])
    assert outcome(loss) == (99, 99)


def test_skipped_non_finite_steps_at_the_start_neither_set_nor_hide_l0():
    # skip_large_updates skipped the first 10 steps (NaN loss, parameters unchanged): L0 is the
    # mean of the first 10 finite losses, so a later blow-up still counts
    loss = np.concatenate([np.full(10, np.nan), np.full(40, 2.0), np.full(50, 50.0)])
    assert metrics.initial_loss(loss) == 2.0
    assert outcome(loss) == (50, 50)  # limit max(4, 3); (50 + 19*2)/20 = 4.4
    # a run that skipped every step never trained: every window lacks a finite loss
    assert metrics.initial_loss(np.full(100, np.nan)) == math.inf
    assert outcome(np.full(100, np.nan)) == (21, 21)


def test_blow_up_within_the_first_ten_steps_sets_no_high_l0():
    # the loss explodes at steps 3-9, then settles near its start: the mean of the first 10 steps
    # (about 20) would hide it; L0 stays the step-0 loss, so the spike's moving average counts
    loss = np.concatenate([[2.3, 2.3, 2.3], np.full(7, 30.0), np.full(90, 2.6)])
    assert metrics.initial_loss(loss) == 2.3
    # at step 21 the 20-step mean still holds the spike: above 4.6; the run ends at 2.6, below
    assert outcome(loss) == (None, 21)
    calm = np.linspace(2.3, 1.0, 100)
    assert metrics.initial_loss(calm) == pytest.approx(calm[:10].mean())


def test_moving_average_criterion_starts_after_step_20():
    loss = np.concatenate([np.full(10, 1.0), np.full(11, 50.0), np.full(79, 1.0)])
    # the 20-step mean already exceeds the limit at step 19 and 20, but counts only after step 20
    assert outcome(loss) == (None, 21)


def test_divergence_agrees_with_its_definition_on_random_curves():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        n = int(rng.integers(15, 120))
        loss = np.exp(rng.normal(0.0, 0.25, n).cumsum())  # wanders up and down
        loss[rng.random(n) < 0.05] = np.nan
        frozen = int(rng.integers(0, n)) if rng.random() < 0.2 else -1
        above = above_by_definition(loss, frozen)
        div, first = outcome(loss, frozen)
        seen.add("diverged" if div is not None else "spiked" if first is not None else "neither")
        assert (div is not None) == bool(above[-1])  # diverged: above at the end of training
        assert first == (int(np.flatnonzero(above)[0]) if above.any() else None)
        if div is not None:  # above from div to the end, and div is where that began
            assert above[div:].all() and (div == 0 or not above[div - 1])
    assert seen == {"diverged", "spiked", "neither"}  # the curves tried every outcome


def test_moving_average_of_finite_values():
    x = np.array([1.0, np.nan, 3.0, np.inf, np.nan, np.nan])
    np.testing.assert_array_equal(metrics.moving_average(x, 2),
                                  [np.nan, 1.0, 3.0, 3.0, np.inf, np.inf])


def test_loss_jumps_count_once_per_window():
    loss = np.ones(300)
    loss[100] = loss[120] = 5.0  # one event
    loss[250] = 5.0  # another
    assert metrics.loss_jumps(loss) == 2


def run_of(loss, frozen_at=-1):
    steps = len(loss)
    tel = {"loss": np.asarray(loss, np.float64), "grad_norm": np.ones(steps),
           "changed": np.zeros(steps), "nonfinite": np.zeros(steps)}
    ev = {"test_loss": np.array([0.5, 0.4]), "test_accuracy": np.array([0.8, 0.9])}
    return metrics.run_metrics(tel, ev, np.array([steps // 2, steps]), frozen_at,
                               ("test_accuracy", 0.95, "max"))


def test_run_metrics_records_divergence_and_spikes_apart():
    flat = np.full(50, 2.3)
    recovered = run_of(np.concatenate([flat, np.full(30, 10.0), np.full(70, 1.0)]))
    assert (recovered["diverged"], recovered["spiked"]) == (0.0, 1.0)
    assert recovered["first_unstable_step"] == 55 and recovered["divergence_step"] == 149
    assert recovered["final_train_loss"] == 1.0  # what the reader sees: it ended well
    high = run_of(np.concatenate([flat, np.full(50, 10.0)]))
    assert (high["diverged"], high["spiked"], high["divergence_step"]) == (1.0, 0.0, 55)
    # not frozen: diverged exactly when the final training loss is above the threshold
    assert high["final_train_loss"] > 4.6 > recovered["final_train_loss"]
    calm = run_of(np.linspace(2.3, 0.5, 100))
    assert (calm["diverged"], calm["spiked"]) == (0.0, 0.0)
    assert math.isnan(calm["first_unstable_step"])


def test_wilson_bounds_are_exact_at_none_and_all():
    for n in range(1, 200):  # computed, the bound at k = 0 can round to 2.8e-17 (n = 6)
        assert metrics.wilson(0, n)[1] == 0.0 and metrics.wilson(n, n)[2] == 1.0


@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634)])
def test_wilson_interval_known_values(k, n, lo, hi):
    p, a, b = metrics.wilson(k, n)
    assert p == k / n
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_mean_ci_student_t():
    m, lo, hi = metrics.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(metrics.mean_ci([1.0])[1])


def test_mean_ci_is_cut_to_the_values_the_metric_can_take():
    accuracies = [0.0, 0.0, 0.4]  # two seeds diverged early: the t-interval reaches below 0
    m, lo, hi = metrics.mean_ci(accuracies)
    assert lo < 0 < m < hi < 1
    accuracy = metrics.METRIC_RANGES["test_accuracy"]
    assert metrics.mean_ci(accuracies, bounds=accuracy) == (m, 0.0, hi)
    m, lo, hi = metrics.mean_ci([0.6, 1.0, 1.0])
    assert hi > 1
    assert metrics.mean_ci([0.6, 1.0, 1.0], bounds=(0.0, 1.0)) == (m, lo, 1.0)


def test_first_reaching_target():
    steps = np.array([100, 200, 300])
    assert metrics.first_reaching(np.array([0.5, 0.96, 0.97]), steps, 0.95, "max") == 200
    assert metrics.first_reaching(np.array([0.5, 0.6, 0.7]), steps, 0.95, "max") == math.inf
    assert metrics.first_reaching(np.array([0.5, 0.03, 0.01]), steps, 0.04, "min") == 200


def test_run_metrics_failed_run_scores_zero():
    steps = 50
    tel = {"loss": np.full(steps, 1.0), "grad_norm": np.ones(steps), "changed": np.zeros(steps),
           "nonfinite": np.zeros(steps)}
    tel["loss"][25:] = np.nan
    tel["grad_norm"][25:] = np.nan
    tel["nonfinite"][24] = 1.0
    ev = {"test_loss": np.array([0.5, np.nan]), "test_accuracy": np.array([0.9, np.nan])}
    out = metrics.run_metrics(tel, ev, np.array([25, 50]), 24, ("test_accuracy", 0.95, "max"))
    assert out["diverged"] == 1.0 and out["divergence_step"] == 24
    assert out["test_accuracy"] == 0.0 and out["final_train_loss"] == math.inf
    assert out["nonfinite_steps"] == 1.0 and out["steps_to_target"] == math.inf

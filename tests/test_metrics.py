import math

import numpy as np
import pytest

from stabench import metrics


def test_divergence_by_moving_average():
    loss = np.concatenate([np.full(50, 2.3), np.full(50, 10.0)])
    # L0 = 2.3, limit max(4.6, 3.3) = 4.6; the 20-step mean passes 4.6 when 6 of 20 values are 10
    assert metrics.divergence_step(loss, -1) == 50 + 5
    assert metrics.divergence_step(np.full(100, 2.3), -1) is None


def test_divergence_by_freeze_not_by_a_skipped_nonfinite_step():
    assert metrics.divergence_step(np.full(100, 1.0), 70) == 70
    # a non-finite step the run survived (a method skipped it) is no divergence...
    loss = np.full(100, 1.0)
    loss[30] = np.nan
    assert metrics.divergence_step(loss, -1) is None
    # ...but a window of 20 steps without one finite loss is
    loss[30:50] = np.nan
    assert metrics.divergence_step(loss, -1) == 49


def test_skipped_non_finite_steps_at_the_start_neither_set_nor_hide_l0():
    # skip_large_updates skipped the first 10 steps (NaN loss, parameters unchanged): L0 is the
    # mean of the first 10 finite losses, so a later blow-up still counts
    loss = np.concatenate([np.full(10, np.nan), np.full(40, 2.0), np.full(50, 50.0)])
    assert metrics.initial_loss(loss) == 2.0
    assert metrics.divergence_step(loss, -1) == 50  # limit max(4, 3); (50 + 19*2)/20 = 4.4
    # a run that skipped every step never trained: every window lacks a finite loss
    assert metrics.initial_loss(np.full(100, np.nan)) == math.inf
    assert metrics.divergence_step(np.full(100, np.nan), -1) == 21


def test_moving_average_of_finite_values():
    x = np.array([1.0, np.nan, 3.0, np.inf, np.nan, np.nan])
    np.testing.assert_array_equal(metrics.moving_average(x, 2),
                                  [np.nan, 1.0, 3.0, 3.0, np.inf, np.inf])


def test_blow_up_within_the_first_ten_steps_is_divergence():
    # the loss explodes at steps 3-9, then settles near its start: the mean of the first 10 steps
    # (about 20) would hide it; L0 stays the step-0 loss, so the spike's moving average counts
    loss = np.concatenate([[2.3, 2.3, 2.3], np.full(7, 30.0), np.full(90, 2.6)])
    assert metrics.initial_loss(loss) == 2.3
    # limit max(4.6, 3.3) = 4.6; the 20-step mean at step 21 still holds 6 spikes: (6*30+14*2.6)/20
    assert metrics.divergence_step(loss, -1) == 21
    calm = np.linspace(2.3, 1.0, 100)
    assert metrics.initial_loss(calm) == pytest.approx(calm[:10].mean())


def test_moving_average_criterion_starts_after_step_20():
    loss = np.concatenate([np.full(10, 1.0), np.full(11, 50.0), np.full(79, 1.0)])
    # the 20-step mean already exceeds the limit at step 19 and 20, but counts only after step 20
    assert metrics.divergence_step(loss, -1) == 21


def test_loss_spikes_count_once_per_window():
    loss = np.ones(300)
    loss[100] = loss[120] = 5.0  # one event
    loss[250] = 5.0  # another
    assert metrics.loss_spikes(loss) == 2


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

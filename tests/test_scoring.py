"""The overall scores against their definitions: the performance-profile score against a
reimplementation of AlgoPerf's own scoring code, Holm's step-down procedure and the daggers it sets,
and mean ranks taken among entries that ran the same tasks."""

import math

import numpy as np
import pandas as pd
import pytest

from stabench import leaderboard as lb
from stabench import metrics

INF = math.inf


# ---- AlgoPerf's scoring (mlcommons/algorithmic-efficiency, scoring/performance_profile.py) -------
def algoperf_performance_profiles(times: pd.DataFrame, min_tau=1.0, max_tau=4.0,
                                  num_points=100) -> pd.DataFrame:
    """`compute_performance_profiles` from its table of times to target (rows submissions, columns
    base workloads; inf where a submission missed the target, NaN where it has no result), with
    the arguments score_submissions.py passes (min_tau 1, max_tau 4, 100 linear points).
    NUM_BASE_WORKLOADS is every workload, solved or not."""
    df = times.copy()
    num_base_workloads = df.shape[1]
    best_scores = df.min(axis=0)
    df[df.apply(lambda x: x > 4 * best_scores, axis=1)] = np.inf
    # Divide by the fastest (update keeps the inf where inf / inf gives NaN)
    df.update(df.div(df.min(axis=0), axis=1))
    points = np.linspace(min_tau, max_tau, num=num_points)

    def rho(r, tau):
        return (r <= tau).sum(axis=1) / num_base_workloads

    perf_df = pd.concat([rho(df, tau) for tau in points], axis=1)
    perf_df.columns = points
    return perf_df


def algoperf_leaderboard_score(df: pd.DataFrame, normalize=True) -> pd.DataFrame:
    """`compute_leaderboard_score` of score_submissions.py (normalize defaults to True there).
    AlgoPerf calls np.trapz, which numpy 2.4 removed; np.trapezoid is the same rule."""
    scores = np.trapezoid(df, x=df.columns)
    if normalize:
        scores /= df.columns.max() - df.columns.min()
    return pd.DataFrame(scores, columns=["score"], index=df.index)


def algoperf_score(steps: np.ndarray, num_points=100) -> np.ndarray:
    return algoperf_leaderboard_score(algoperf_performance_profiles(
        pd.DataFrame(steps), num_points=num_points))["score"].to_numpy()


# The trapezoid rule on a step function errs by at most half a grid interval per task, where the
# step falls: h / 2 with h = 3 / (num_points - 1), so the normalised score by at most h / 6.
TRAPEZOID_BOUND = 3 / 99 / 6

TABLES = {  # [entries, tasks] steps to target; inf: never reached, NaN: did not run the task
    "mixed ratios": np.array([[100.0, 300, 50, 700],
                              [150, 310, 80, 100],
                              [320, INF, 210, 390]]),
    "an unsolved task": np.array([[100.0, 300, INF],
                                  [200, INF, INF],
                                  [400, np.nan, INF]]),
    "an entry that did not run a task": np.array([[100.0, np.nan, 60],
                                                  [130, 90, 60],
                                                  [350, 95, np.nan]]),
}


@pytest.mark.parametrize("name", TABLES)
def test_profile_score_is_algoperfs(name):
    steps = TABLES[name]
    ours = metrics.profile_score(metrics.performance_ratios(steps))
    np.testing.assert_allclose(ours, algoperf_score(steps), atol=TRAPEZOID_BOUND, rtol=0)
    # a finer grid closes in on our exact integral
    np.testing.assert_allclose(ours, algoperf_score(steps, 3001), atol=3 / 3000 / 6, rtol=0)


def test_profile_score_equals_algoperfs_where_its_trapezoid_rule_is_exact():
    """Ratios on AlgoPerf's tau grid midpoints (1 + (k + 1/2) 3/99), at 1, or past 4: there the
    trapezoid rule integrates each step exactly."""
    best = 198.0  # ratio (201 + 6k) / 198 is the midpoint of interval k
    steps = np.array([[best, best, best, INF],  # no entry solves the last task
                      [201, 201 + 6 * 40, INF, INF],
                      [201 + 6 * 98, best, 201 + 6 * 10, INF],
                      [INF, 201 + 6 * 70, best, np.nan]])
    ours = metrics.profile_score(metrics.performance_ratios(steps))
    np.testing.assert_allclose(ours, algoperf_score(steps), rtol=0, atol=1e-12)
    # AlgoPerf counts the unsolved task in every entry's share: leaving it out, as a score over the
    # solved tasks only would, reads higher by a third
    solved_only = metrics.profile_score(metrics.performance_ratios(steps[:, :3]))
    np.testing.assert_allclose(solved_only * 3 / 4, ours, rtol=0, atol=1e-12)
    assert (solved_only - ours).max() > 0.2


def test_profile_equals_algoperfs_rho_at_its_taus():
    for steps in TABLES.values():
        rho = algoperf_performance_profiles(pd.DataFrame(steps))
        ours = metrics.performance_profile(metrics.performance_ratios(steps), rho.columns)
        np.testing.assert_allclose(ours, rho.to_numpy(), rtol=0, atol=1e-12)


def test_weighted_profile_score_is_algoperfs_with_tasks_repeated():
    """Task weights with integer ratios are AlgoPerf's unweighted score with each task repeated in
    proportion: variants a[1], a[2] of task a share its weight, so a, b, c count once each ==
    AlgoPerf over (a[1], a[2], b, b, c, c)."""
    variants = ["a[1]", "a[2]", "b", "c"]
    weights = lb.task_weights(variants, {"a[1]": "a", "a[2]": "a", "b": "b", "c": "c"})
    np.testing.assert_allclose(weights, [0.5, 0.5, 1, 1])
    steps = np.array([[100.0, 400, 50, INF],
                      [130, 100, 180, INF],
                      [INF, 160, 60, INF]])
    ours = metrics.profile_score(metrics.performance_ratios(steps), weights)
    repeated = steps[:, [0, 1, 2, 2, 3, 3]]
    np.testing.assert_allclose(ours, algoperf_score(repeated), atol=TRAPEZOID_BOUND, rtol=0)
    np.testing.assert_allclose(ours, algoperf_score(repeated, 3001), atol=3 / 3000 / 6, rtol=0)


def board_of(rows):
    return pd.DataFrame([dict(zip(["method", "init", "optimizer", "steps_to_target", "stability",
                                   "diverged_runs", "spiked_runs", "runs"], r)) for r in rows])


def test_overall_board_profile_score_is_algoperfs():
    """The leaderboard's path: per-variant steps, variants of one task sharing its weight, an
    unsolved variant, and an entry that ran one task only."""
    boards = {"a[1]": board_of([("x", "d", "o", 100, 0.8, 0, 0, 10),
                                ("y", "d", "o", 250, 0.4, 0, 0, 10)]),
              "a[2]": board_of([("x", "d", "o", INF, 0.1, 0, 0, 10),
                                ("y", "d", "o", INF, 0.2, 0, 0, 10)]),
              "b": board_of([("x", "d", "o", 90, 0.6, 0, 0, 10),
                             ("y", "d", "o", 60, 1.0, 0, 0, 10),
                             ("z", "d", "o", 200, 0.9, 0, 0, 10)])}
    overall, _, unsolved = lb.overall_board(boards, {"a[1]": "a", "a[2]": "a", "b": "b"})
    assert unsolved == ["a[2]"]
    # AlgoPerf's workloads in the same proportion: a[1], a[2], b, b
    steps = np.array([[100.0, INF, 90], [250, INF, 60], [np.nan, np.nan, 200]])
    expected = dict(zip("xyz", algoperf_score(steps[:, [0, 1, 2, 2]])))
    for _, row in overall.iterrows():
        assert row["profile_score"] == pytest.approx(expected[row["method"]],
                                                     abs=TRAPEZOID_BOUND)


# ---- Holm --------------------------------------------------------------------------------------
def holm_by_adjusted_p(p, alpha):
    """Holm's rejections through his adjusted p-values: the k-th smallest of m gets
    max over j <= k of min(1, (m - j + 1) p_(j)); rejected where that is <= alpha."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    reject = np.zeros(m, bool)
    reject[order] = adjusted <= alpha
    return reject


def test_holm_hand_computed():
    # sorted: 0.005 <= 0.05/4 rejected; 0.01 <= 0.05/3 rejected; 0.03 > 0.05/2 kept, so is 0.04
    # (uncorrected, all four are below 0.05)
    assert metrics.holm([0.01, 0.04, 0.03, 0.005], 0.05).tolist() == [True, False, False, True]
    # NaN: no test, not in the family: m = 2, so 0.04 <= 0.05/1 after 0.02 <= 0.05/2
    assert metrics.holm([math.nan, 0.02, 0.04], 0.05).tolist() == [False, True, True]
    assert metrics.holm([], 0.05).tolist() == []


def test_holm_agrees_with_adjusted_p_values():
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = rng.uniform(0, 0.1, int(rng.integers(1, 8))) ** rng.uniform(0.5, 2)
        if rng.random() < 0.3:
            p[0] = p[-1]  # ties
        assert metrics.holm(p, 0.05).tolist() == holm_by_adjusted_p(p, 0.05).tolist()


def fisher_two_sided_none_vs_k(k, n):
    """Fisher's two-sided p of 0/n against k/n: the two extreme tables, C(n, k) / C(2n, k) each."""
    return 2 * math.comb(n, k) / math.comb(2 * n, k)


def test_daggers_are_holm_corrected_over_a_column():
    """Divergence 0/20 (best) against 5/20, 5/20 and 8/20: Fisher p 0.047, 0.047, 0.0033, each
    significant alone. Holm over the three: 0.0033 <= 0.05/3 rejected, then 0.047 > 0.05/2: both
    5/20 entries keep the dagger."""
    p5, p8 = fisher_two_sided_none_vs_k(5, 20), fisher_two_sided_none_vs_k(8, 20)
    assert p8 < 0.05 / 3 < 0.05 / 2 < p5 < 0.05
    assert metrics.fisher_p(0, 20, 5, 20) == pytest.approx(p5)
    board = pd.DataFrame({
        "quality_mode": "max", "quality_mean": 0.5, "stability": 0.5, "runs": 20,
        "diverged_runs": [0, 5, 5, 8]})
    board["diverged_rate"] = board["diverged_runs"] / 20
    board["quality_seeds"] = board["stability_seeds"] = [np.full(3, 0.5)] * 4
    lb._mark_ties(board)
    assert math.isnan(board.at[0, "diverged_tie"])  # the best: bold, no test
    assert board["diverged_tie"].tolist()[1:] == [True, True, False]
    assert board[["quality_tie", "stability_tie"]].isna().all(axis=None)  # all equal the best


# ---- mean rank ---------------------------------------------------------------------------------
def test_mean_rank_is_taken_among_the_entries_that_ran_every_task():
    """p and q ran task a only, where both beat x and y: ranked among all four, x and y would rank
    3 and 4 there; among the ranked entries (x, y), x ranks 1 on a and 2 on b."""
    boards = {"a": board_of([("x", "d", "o", 100, 0.6, 0, 0, 10),
                             ("y", "d", "o", 100, 0.5, 0, 0, 10),
                             ("p", "d", "o", 100, 0.9, 0, 0, 10),
                             ("q", "d", "o", 100, 0.8, 0, 0, 10)]),
              "b": board_of([("x", "d", "o", 100, 0.4, 0, 0, 10),
                             ("y", "d", "o", 100, 0.7, 0, 0, 10)])}
    overall, _, _ = lb.overall_board(boards, {"a": "a", "b": "b"})
    o = overall.set_index("method")
    assert o.at["x", "mean_rank"] == pytest.approx((1 + 2) / 2)
    assert o.at["y", "mean_rank"] == pytest.approx((2 + 1) / 2)
    assert o.loc[["p", "q"], ["mean_rank", "rank"]].isna().all(axis=None)
    # every ranked entry's ranks run from 1 to the number of ranked entries
    assert sorted(o["rank"].dropna()) == [1, 2]


def test_overall_board_counts_spikes_apart_from_divergences():
    boards = {"a": board_of([("x", "d", "o", 100, 0.6, 2, 3, 10)]),
              "b": board_of([("x", "d", "o", 100, 0.4, 1, 0, 20)])}
    (row,) = lb.overall_board(boards, {"a": "a", "b": "b"})[0].to_dict("records")
    assert (row["diverged_runs"], row["spiked_runs"], row["runs"]) == (3, 3, 30)
    assert (row["spiked_rate"], row["spiked_lo"], row["spiked_hi"]) == metrics.wilson(3, 30)

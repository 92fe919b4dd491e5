"""Leaderboards and reports: statistics against hand-computed answers, LaTeX escaping, and the
report command on empty, partial and mixed-version directories. Records here are written through
the store with hand-made metrics, so every expected number is known without training."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from stabench import leaderboard as lb
from stabench import metrics
from stabench.config import make_spec
from stabench.hardware import cpu_model
from stabench.reports import write_report
from stabench.store import Store, content_sha256, provenance

RUN_DEFAULTS = {"initial_loss": 2.0, "diverged": 0.0, "divergence_step": 29.0,
                "final_train_loss": 1.0, "test_loss": 1.0, "max_grad_norm": 1.0,
                "p99_grad_norm": 1.0, "clipped_share": 0.0,
                "nonfinite_steps": 0.0, "loss_jumps": 0.0, "test_accuracy": 0.5,
                "spiked": 0.0, "first_unstable_step": math.nan,
                "val_loss": 1.0, "val_accuracy": 0.5,
                "steps_to_target": math.inf}
LRS = (0.1, 1.0, 10.0)
INF = math.inf

# Three entries on one task, 3 seeds x 3 learning rates; loss at initialization 2.0 everywhere.
# per lr: (test accuracy per seed, final train loss, diverged, steps to target per seed)
TABLE = {
    "none": {0.1: ([0.90, 0.91, 0.92], 0.5, 0, [100, 100, 200]),
             1.0: ([0.95, 0.96, 0.97], 0.2, 0, [50, 50, 50]),
             10.0: ([0.0, 0.0, 0.0], INF, 1, [INF, INF, INF])},
    "clip_norm": {0.1: ([0.90, 0.90, 0.90], 0.6, 0, [INF, INF, INF]),
                  1.0: ([0.94, 0.95, 0.96], 0.1, 0, [60, 60, 60]),
                  10.0: ([0.93, 0.93, 0.93], 0.4, 0, [80, 80, 80])},
    "clip_value": {lr: ([0.5, 0.5, 0.5], 1.5, 0, [INF, INF, INF]) for lr in LRS},
}


def table_metrics(method):
    def fn(seed, lr):
        acc, final, div, steps = TABLE[method][lr]
        # validation agrees with test here: test_validation.py separates them
        return {"test_accuracy": acc[seed], "val_accuracy": acc[seed], "final_train_loss": final,
                "diverged": float(div), "steps_to_target": float(steps[seed]),
                "clipped_share": 0.1 * seed, "max_grad_norm": 1.0 + seed}
    return fn


def fake_record(store, method="none", init="default", metrics_fn=None, seeds=3, lrs=LRS, steps=30,
                overrides=None, init_loss=2.0, prov=None):
    """Save a record of digits with hand-made per-run metrics through the store's own protocol."""
    spec = make_spec("digits", method, init, seeds=seeds, lrs=lrs,
                     overrides={"train.steps": steps, "train.eval_every": 10, **(overrides or {})})
    runs = [{"seed": s, "lr": lr, **RUN_DEFAULTS, **(metrics_fn(s, lr) if metrics_fn else {})}
            for s, lr in spec.runs]
    n = len(runs)
    rng = np.random.default_rng(len(method))
    loss = np.full((n, steps), 1.0, np.float32)
    loss[:, 0] = init_loss
    arrays = {"loss": loss, "grad_norm": rng.uniform(0.5, 2.0, (n, steps)).astype(np.float32),
              "lrs": np.array([lr for _, lr in spec.runs], np.float32),
              "seeds": np.array([s for s, _ in spec.runs])}
    body = {"runs": runs, "provenance": {**provenance(), **(prov or {})}, "layer_names": [],
            "timing": {"compile_s": 1.0, "steady_s": 2.0, "init_s": 0.0, "steps_done": steps,
                       "steady_compiles": 0, "compile_cache_hits": 0, "samples_per_s": 1.0},
            "eval_steps": list(range(10, steps + 1, 10))}
    return store.save(spec, body, arrays)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    store = Store(root)
    for method in TABLE:
        fake_record(store, method, metrics_fn=table_metrics(method))
    return root


@pytest.fixture(scope="module")
def board(task_dir):
    records, bad = Store(task_dir).records()
    assert not bad
    report = lb.build_leaderboards(records)
    (variant, b), = report.boards.items()
    assert variant == "digits"
    return b.set_index(pd.Index(short(b["method"])))


def short(methods):
    """clip_norm(max_norm=1.0) -> clip_norm: the names TABLE uses."""
    return [m.split("(")[0] for m in methods]


# ---- statistics, each against a hand computation ------------------------------------------------
def test_lr_table_accuracy_interval_stays_within_0_and_1():
    runs = [{"lr": 1.0, "diverged": True, "spiked": False, "final_train_loss": 2.3,
             "test_accuracy": acc, "steps_to_target": math.inf, "clipped_share": 1.0}
            for acc in (0.0, 0.0, 0.4)]
    table = lb.lr_table(runs)
    assert table["test acc (95% CI)"].iloc[0] == "0.133 [0, 0.707]"
    assert table["steps to target"].iloc[0] == "never"  # as the report's boards say it


def test_lr_sensitivity_known_answer():
    # per-LR means of the final loss capped at L0 = 2: 0.5, 0.2, 2 (inf capped) -> mean gap 0.7
    lrs = np.repeat(LRS, 3)
    final = np.repeat([0.5, 0.2, INF], 3)
    assert metrics.lr_sensitivity(lrs, final, np.full(9, 2.0)) == pytest.approx(0.7)
    assert metrics.lr_sensitivity(lrs, np.full(9, 0.3), np.full(9, 2.0)) == 0.0
    assert math.isnan(metrics.lr_sensitivity(np.ones(3), [0.5, 0.2, 0.3], np.full(3, 2.0)))
    # nothing got below L0 anywhere: failing everywhere is not insensitivity
    assert math.isnan(metrics.lr_sensitivity(lrs, np.repeat([2.0, 3.0, INF], 3), np.full(9, 2.0)))


def test_stable_width_takes_the_widest_consecutive_run():
    lrs = [0.001, 0.01, 0.1, 1.0, 10.0]
    assert metrics.stable_width(lrs, [True, False, True, True, True]) == pytest.approx(2.0)
    assert metrics.stable_width(lrs, [False, True, False, False, False]) == 0.0
    assert math.isnan(metrics.stable_width(lrs, [False] * 5))


def test_performance_profile_score_known_answers():
    # entries x tasks; task 3 is reached by nobody and counts, for everyone, as not solved (as in
    # AlgoPerf); NaN = entry did not run it
    steps = np.array([[100.0, 300.0, INF],
                      [200.0, INF, INF],
                      [400.0, np.nan, INF]])
    r = metrics.performance_ratios(steps)
    np.testing.assert_array_equal(r, [[1, 1, INF], [2, INF, INF], [4, INF, INF]])
    # X: r = 1 on two tasks of three -> 2/3; Y: (4 - 2) / 3 on one task of three -> 2/9; Z: 0
    np.testing.assert_allclose(metrics.profile_score(r), [2 / 3, 2 / 9, 0.0])
    # weights: task 1 counts 3x task 2 and 3 -> Y gets 3/5 of 2/3
    np.testing.assert_allclose(metrics.profile_score(r, [3.0, 1.0, 1.0]), [0.8, 0.4, 0.0])
    rho = metrics.performance_profile(r, [1.0, 1.99, 2.0, 4.0])
    np.testing.assert_allclose(rho, np.array([[2, 2, 2, 2], [0, 0, 1, 1], [0, 0, 0, 1]]) / 3)
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        metrics.profile_score(r, [1.0, 1.0])


def test_welch_and_fisher_known_answers():
    # t = 3 / sqrt(1/3 + 1/3) = 3.674, df = 4 (equal variances): two-sided p = 0.02131
    assert metrics.welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.021312, abs=1e-6)
    assert metrics.welch_p([1, 1, 1], [1, 1, 1]) == 1.0
    assert metrics.welch_p([1, 1, 1], [2, 2, 2]) == 0.0
    assert math.isnan(metrics.welch_p([1.0], [1.0, 2.0]))
    assert math.isnan(metrics.welch_p([1.0, INF], [1.0, 2.0]))
    # 0/10 vs 5/10: P(table) = C(15,10) / C(20,10); the other tail is as likely -> twice that
    p_table = math.comb(15, 10) / math.comb(20, 10)
    assert metrics.fisher_p(0, 10, 5, 10) == pytest.approx(2 * p_table)


def test_task_board_columns_match_hand_computation(board):
    a, b, c = board.loc["none"], board.loc["clip_norm"], board.loc["clip_value"]
    assert a["best_lr"] == 1.0 and b["best_lr"] == 1.0
    assert a["quality_mean"] == pytest.approx(0.96)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert (a["quality_lo"], a["quality_hi"]) == pytest.approx((0.96 - half, 0.96 + half))
    assert (a["diverged_runs"], a["runs"]) == (3, 9)
    assert (a["diverged_lo"], a["diverged_hi"]) == pytest.approx(metrics.wilson(3, 9)[1:])
    assert a["lr_sensitivity"] == pytest.approx(0.7)
    assert b["lr_sensitivity"] == pytest.approx((0.5 + 0.0 + 0.3) / 3)
    assert c["lr_sensitivity"] == 0.0
    assert (a["max_stable_lr"], b["max_stable_lr"], c["max_stable_lr"]) == (1.0, 10.0, 10.0)
    # ok = no diverged seed and every seed reaches the target
    assert a["stable_width"] == pytest.approx(1.0) and b["stable_width"] == pytest.approx(1.0)
    assert math.isnan(c["stable_width"])
    assert (a["steps_to_target"], b["steps_to_target"], c["steps_to_target"]) == (50, 60, INF)
    # at the best LR: clipped share is the mean of 0, .1, .2; max grad norm the median of 1, 2, 3
    assert a["clipped_share"] == pytest.approx(0.1) and a["max_grad_norm"] == 2.0
    # stability: mean improvement / best per-LR mean improvement on the task (clip_norm at lr 1:
    # 2 - 0.1 = 1.9); none: (1.5 + 1.8 + 0) / 3, clip_norm: (1.4 + 1.9 + 1.6) / 3, clip_value: 0.5
    assert a["stability"] == pytest.approx(1.1 / 1.9)
    assert b["stability"] == pytest.approx((4.9 / 3) / 1.9)
    assert c["stability"] == pytest.approx(0.5 / 1.9)
    assert (b["rank"], a["rank"], c["rank"]) == (1, 2, 3)


def test_significance_marks(board):
    a, b, c = board.loc["none"], board.loc["clip_norm"], board.loc["clip_value"]
    # accuracy: best is none (0.96); clip_norm 0.95 with the same spread: Welch p = 0.29 -> tie
    assert (metrics.welch_p(b["quality_seeds"], a["quality_seeds"])
            == pytest.approx(0.2879, abs=1e-3))
    assert b["quality_tie"] is True and c["quality_tie"] is False
    assert math.isnan(a["quality_tie"])  # the best itself is bold, not marked
    # divergence: best 0/9 (clip_norm, clip_value: both bold); none 3/9, Fisher p = 0.206 -> tie
    assert a["diverged_tie"] is True
    assert math.isnan(b["diverged_tie"]) and math.isnan(c["diverged_tie"])
    # stability: every seed scores the same within an entry, so the differences are certain
    assert a["stability_tie"] is False and c["stability_tie"] is False


def test_no_bold_where_every_entry_never_reached_the_target():
    never = pd.Series([math.inf, math.inf])
    assert not lb._bold_mask(never, "min").any()
    assert lb._bold_mask(pd.Series([math.inf, 30.0]), "min").tolist() == [False, True]


def test_rendered_table_bolds_the_best_and_marks_ties(board, task_dir):
    records, _ = Store(task_dir).records()
    report = lb.build_leaderboards(records)
    table = lb.render_task("digits", report.boards["digits"], report.used)
    # the table's rows are the board's, labelled for display
    names = pd.Index(short(report.boards["digits"]["method"]))
    rows, bold = table.frame.set_index(names), table.bold.set_index(names)
    acc = "test accuracy (95% CI)"
    assert bold.at["none", acc] and not bold.at["clip_norm", acc]
    assert rows.at["clip_norm", acc].endswith(lb.MARK)
    assert not rows.at["clip_value", acc].endswith(lb.MARK)
    assert bold.at["clip_norm", "diverged (95% CI)"] and bold.at["clip_value", "diverged (95% CI)"]
    assert rows.at["none", "diverged (95% CI)"].endswith(lb.MARK)
    assert rows.at["clip_value", "steps to target"] == "never"
    assert list(table.frame["rank"]) == ["1", "2", "3"]
    md = lb.to_markdown(table)
    assert "| **1** | clip-norm (1) |" in md and "Welch t-test" in table.caption


def test_stability_measures_every_entry_from_one_starting_loss(tmp_path):
    """An init whose loss starts higher (4 against 2) and ends where the other's does gains no
    credit for the loss it added: both improve on the task's median start (3) by 2."""
    store = Store(tmp_path)
    fake_record(store, init="default", init_loss=2.0)
    fake_record(store, init="he_normal", init_loss=4.0)
    records, _ = store.records()
    (board,) = lb.build_leaderboards(records).boards.values()
    assert board["stability"].tolist() == [1.0, 1.0] and board["rank"].tolist() == [1, 1]


def test_improvement_counts_a_nan_or_infinite_final_loss_as_none():
    assert metrics.improvement([math.nan, INF, 0.5, 3.0], 2.0).tolist() == [0.0, 0.0, 1.5, 0.0]


def test_overall_board_weights_each_task_once():
    def board(rows):
        return pd.DataFrame([dict(zip(["method", "init", "optimizer", "steps_to_target",
                                       "stability", "rank", "diverged_runs", "runs"], r))
                             for r in rows]).assign(spiked_runs=0)
    boards = {  # two variants of task "a" share one weight; task "b" has the other
        "a[depth=1]": board([("x", "d", "o", 100, 0.8, 1, 0, 10),
                             ("y", "d", "o", 200, 0.4, 2, 5, 10)]),
        "a[depth=2]": board([("x", "d", "o", 100, 0.6, 2, 0, 10),
                             ("y", "d", "o", 100, 0.8, 1, 0, 10)]),
        "b": board([("x", "d", "o", INF, 0.2, 2, 1, 10), ("y", "d", "o", 50, 1.0, 1, 0, 10)]),
    }
    overall, ratios, unsolved = lb.overall_board(
        boards, {"a[depth=1]": "a", "a[depth=2]": "a", "b": "b"})
    o = overall.set_index("method")
    assert o.at["x", "stability"] == pytest.approx(0.5 * (0.8 + 0.6) / 2 + 0.5 * 0.2)
    assert o.at["y", "stability"] == pytest.approx(0.5 * (0.4 + 0.8) / 2 + 0.5 * 1.0)
    # ratios x: 1, 1, inf; y: 2, 1, 1 -> scores x: .25 + .25 + 0; y: .25 * 2/3 + .25 + .5
    assert o.at["x", "profile_score"] == pytest.approx(0.5)
    assert o.at["y", "profile_score"] == pytest.approx(0.25 * 2 / 3 + 0.75)
    assert o.at["x", "mean_rank"] == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 2)
    assert (o.at["x", "diverged_runs"], o.at["x", "runs"]) == (1, 30)
    assert list(overall["method"]) == ["y", "x"] and unsolved == []

    # an entry that ran only task b is listed after the ranked ones, unranked, whatever its score
    boards["b"] = pd.concat([boards["b"], board([("z", "d", "o", 50, 1.0, 1, 0, 10)])])
    overall, ratios, _ = lb.overall_board(boards, {"a[depth=1]": "a", "a[depth=2]": "a", "b": "b"})
    assert list(overall["method"]) == ["y", "x", "z"]
    assert overall["rank"].tolist()[:2] == [1, 2] and np.isnan(overall["rank"].iloc[2])
    assert overall.set_index("method").at["z", "tasks"] == 1
    assert ratios.shape == (3, 3)
    table = lb.render_overall(overall, [], 3)
    assert table.frame["rank"].tolist() == ["1", "2", "-"]
    assert not table.bold.iloc[2].any()  # z's top stability is not the ranked best
    assert table.bold.at[0, "stability"]
    assert "Unranked (rank -): 1 entry that did not run every task variant" in table.caption


def test_a_task_keeps_its_weight_when_one_of_its_variants_has_no_value():
    """Variant a[2] was brought to the target by no entry and improved by none: task a's weight
    goes to a[1] alone, so a and b still count once each."""
    def board(rows):
        return pd.DataFrame([dict(zip(["method", "init", "optimizer", "steps_to_target",
                                       "stability", "rank", "diverged_runs", "runs"], r))
                             for r in rows]).assign(spiked_runs=0)
    boards = {"a[1]": board([("x", "d", "o", 100, 0.8, 1, 0, 10),
                             ("y", "d", "o", INF, 0.4, 2, 0, 10)]),
              "a[2]": board([("x", "d", "o", INF, math.nan, math.nan, 10, 10),
                             ("y", "d", "o", INF, math.nan, math.nan, 10, 10)]),
              "b": board([("x", "d", "o", INF, 0.2, 2, 0, 10), ("y", "d", "o", 50, 1.0, 1, 0, 10)])}
    overall, _, unsolved = lb.overall_board(boards, {"a[1]": "a", "a[2]": "a", "b": "b"})
    o = overall.set_index("method")
    assert unsolved == ["a[2]"]
    # a[2] solved by no entry still counts: x solves a[1] (weight 1/4), y solves b (1/2)
    assert o.at["x", "profile_score"] == pytest.approx(0.25)
    assert o.at["y", "profile_score"] == pytest.approx(0.5)
    assert o.at["x", "stability"] == pytest.approx((0.8 + 0.2) / 2)
    assert o.at["y", "mean_rank"] == pytest.approx((2 + 1) / 2)


# ---- the report command --------------------------------------------------------------------------
def cli(capsys, *args):
    from stabench.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_on_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    code, out, err = cli(capsys, "report", tmp_path)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: no usable records in {tmp_path}; write some with: python -m stabench sweep ... "
        f"--out {tmp_path}"]
    code, _, err = cli(capsys, "report", tmp_path / "nope")
    assert code == 2 and "no results directory" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_git_state_names_the_commit_and_whether_the_code_differs_from_it(tmp_path):
    import subprocess

    from stabench.hardware import git_state

    assert git_state(tmp_path) == (None, None)  # not a checkout
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "code.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", "pkg")
    git("commit", "-qm", "code")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(package) == (head, False)
    (tmp_path / "results.md").write_text("outside the package: not its code\n")
    assert git_state(package) == (head, False)
    (package / "new.py").write_text("y = 2\n")
    assert git_state(package) == (head, True)
    (package / "new.py").unlink()
    (package / "code.py").write_text("x = 2\n")
    assert git_state(package) == (head, True)


def test_report_on_partial_and_mixed_version_records(tmp_path, task_dir, capsys):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(task_dir, root)
    store = Store(root)
    other = fake_record(store, "clip_norm(max_norm=2.0)", metrics_fn=table_metrics("clip_norm"),
                        prov={"git_commit": "0123456789abcdef", "git_dirty": True,
                              "cpu_model": "Test CPU 9000"})
    # a record from before provenance named the CPU
    before_cpu_model = next(r.path for r in store.records()[0] if r.path != other.path)
    data = json.loads(before_cpu_model.read_text())
    del data["provenance"]["cpu_model"]
    data["record_sha256"] = content_sha256(data)
    before_cpu_model.write_text(json.dumps(data))
    torn = fake_record(store, "clip_norm(max_norm=3.0)")
    torn.path.write_text(torn.path.read_text()[:100])  # killed mid-write by something else
    lost = fake_record(store, "clip_norm(max_norm=4.0)")
    lost.path.with_suffix(".npz").unlink()
    old = fake_record(store, "clip_norm(max_norm=5.0)")
    data = json.loads(old.path.read_text())
    data["format_version"] = 0
    old.path.write_text(json.dumps(data))

    code, out, err = cli(capsys, "report", root, "--no-plots")
    assert code == 0, err
    assert out.startswith("# stabench report")
    assert f"skipped {torn.path}: unreadable record" in err
    assert f"skipped {lost.path}: telemetry file {lost.path.stem}.npz is missing" in err
    assert f"skipped {old.path}: format version 0 is not 3" in err
    assert "note: records come from 2 code versions" in err
    assert "(git 0123456789 with uncommitted changes)" in err
    assert "Traceback" not in err
    csv = pd.read_csv(root / "leaderboard.csv")
    # clip_norm at max_norm 2 beside its default 1: one tuned entry, the default kept beside it
    expected = [r.spec.method for r in Store(task_dir).records()[0]] + ["clip_norm tuned"]
    assert sorted(csv["method"]) == sorted(expected)
    report = (root / "report.md").read_text()
    assert "records come from 2 code versions" in report
    hardware = next(line for line in report.splitlines() if line.startswith("- hardware: "))
    cores = f"1x cpu (cpu), {os.cpu_count()} CPU cores"
    assert sorted(hardware.removeprefix("- hardware: ").split("; ")) == sorted(
        [cores, f"{cores} ({cpu_model()})", f"{cores} (Test CPU 9000)"])
    runs = pd.read_parquet(root / "runs.parquet")
    assert len(runs) == 4 * 9 and {"config.model.width", "config.train.steps", "seed", "lr",
                                   "test_accuracy", "git_commit", "git_dirty",
                                   "version.jax"} <= set(runs.columns)
    tables = [t for t in (root / "tables").glob("*.tex") if t.name != "definitions.tex"]
    assert (root / "leaderboards.tex").read_text().count(r"\begin{table}") == len(tables)


# ---- plots ---------------------------------------------------------------------------------------
def test_report_draws_every_figure_as_png_and_pdf(tmp_path):
    store = Store(tmp_path / "depth")
    for depth in (1, 2):
        for residual in (False, True):
            for method in ("none", "clip_norm"):
                fake_record(store, method, metrics_fn=table_metrics(method), seeds=3,
                            overrides={"model.depth": depth, "model.residual": residual})
    markdown = write_report(tmp_path / "depth", tmp_path / "out", warn=pytest.fail)
    plots = tmp_path / "out" / "plots"
    stems = sorted(p.stem for p in plots.glob("*.png"))
    variants = [f"digits-depth-{d}-residual-{r}" for d in (1, 2) for r in ("false", "true")]
    # no per-layer figure: these records hold no per-layer telemetry
    assert stems == sorted(["profiles", "depth-test-accuracy", "stability-by-task"]
                           + [f"{v}-{kind}" for v in variants
                              for kind in ("lr", "divergence", "loss-steps", "gradnorm")])
    for stem in stems:
        assert (plots / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (plots / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert f"(plots/{stem}.png)" in markdown


def test_saved_figures_do_not_depend_on_when_they_were_drawn(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from stabench.reports import save_figure

    def draw(stem, epoch):  # matplotlib dates a PDF by SOURCE_DATE_EPOCH when it is set
        monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
        fig = Figure()
        fig.subplots().plot([0, 1], [1, 0])
        return save_figure(fig, tmp_path / stem)

    first, second = draw("first", "0"), draw("second", "1000000000")
    for suffix in (".png", ".pdf"):
        assert (first.with_suffix(suffix).read_bytes()
                == second.with_suffix(suffix).read_bytes())


def test_readme_leaderboard_is_the_committed_reports():
    """The README quotes the main table and the baseline checks of results/default: they must
    be that report's."""
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    report = (ROOT / "results" / "default" / "report.md").read_text()
    for head in ("| method | adding |", "| task | entry | none diverged"):
        start = readme.index(head)
        quoted = readme[start:readme.index("\n\n", start)]
        assert quoted.count("\n") >= 3
        assert quoted in report


def test_entries_on_different_grids_are_named_in_a_note(tmp_path):
    """Divergence shares and stability average over an entry's runs: entries of one task that ran
    different seeds or learning rates are not compared on the same runs, and the report says so."""
    store = Store(tmp_path)
    same = [fake_record(store, m, seeds=2, lrs=(0.1, 1.0)) for m in ("none", "clip_norm")]
    assert lb.grid_notes(lb.build_leaderboards(same).used) == []
    wider = fake_record(store, "clip_value", seeds=3, lrs=(0.1, 1.0, 10.0))
    notes = lb.grid_notes(lb.build_leaderboards([*same, wider]).used)
    none, clip_norm, clip_value = (f"{r.spec.method} / default / {r.spec.optimizer}"
                                   for r in (*same, wider))
    assert notes == [
        "digits: its entries ran different grids of seeds and learning rates, so its columns "
        f"compare different runs: 4 runs (2 seeds, learning rates 0.1, 1) for {clip_norm}; {none}"
        f" | 9 runs (3 seeds, learning rates 0.1, 1, 10) for {clip_value}."]
    assert notes[0] in lb.build_leaderboards([*same, wider]).notes


def test_report_of_a_task_where_every_run_diverged(tmp_path):
    """Nothing improved, so no entry has a stability or a rank there: the overall board still
    counts the task as run and leaves those columns empty (it divided by zero weights)."""
    from stabench.cli import main

    assert main(["run", "--task", "digits", "--steps", "20", "--seeds", "2", "--lrs", "100,1000",
                 "--out", str(tmp_path)]) == 0
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    overall = pd.read_csv(tmp_path / "overall.csv")
    assert overall["tasks"].tolist() == [1] and overall["diverged_rate"].tolist() == [1.0]
    assert overall[["stability", "mean_rank", "rank"]].isna().all(axis=None)
    (task,) = pd.read_csv(tmp_path / "leaderboard.csv").to_dict("records")
    # no learning rate is best and failing everywhere is not insensitivity to it
    assert math.isnan(task["best_lr"]) and math.isnan(task["lr_sensitivity"])
    report = (tmp_path / "report.md").read_text()
    assert "1 entry with no stability score" in report and "did not run every" not in report
    assert "These runs are too short for the loss rule of divergence" in report  # 20 steps



def test_a_variant_at_a_setting_left_out_of_its_record_is_labelled_with_the_default():
    # fp32 and sharpness_every=0 are not stored (old hashes hold), yet they name a variant
    specs = [make_spec("digits", overrides={"train.precision": p, "telemetry.sharpness_every": k})
             for p, k in (("fp32", 0), ("fp16", 10))]
    assert sorted(lb.variant_labels(specs).values()) == [
        "digits[sharpness_every=0,precision=fp32]", "digits[sharpness_every=10,precision=fp16]"]

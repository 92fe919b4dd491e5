"""diagnose: the detectors on telemetry built to trigger them (by hand, and by planting faults in
real training), the report read back from a stored record, recommendations, and the figure."""

import math
from dataclasses import replace

import numpy as np
import pytest

from stabench import diagnosis as dg
from stabench.config import make_spec

from conftest import covers, run_cli

LAYERS = ["input", "blocks[0]", "blocks[1]", "head"]


def noisy(steps, layers=len(LAYERS), seed=0, scale=1.0):
    """Stationary per-layer grad norms (log-normal, sigma 0.2) and their global norm."""
    rng = np.random.default_rng(seed)
    norms = scale * np.exp(rng.normal(0, 0.2, (steps, layers)))
    return norms, np.sqrt((norms ** 2).sum(1))


# ---- pure functions on hand-made telemetry -------------------------------------------------------
def test_running_median_is_the_median_of_the_previous_window():
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=120)
    x[[5, 30, 31, 90]] = np.nan
    got = dg.running_median(x, window=50, min_history=10)
    for t in range(len(x)):
        prev = x[max(0, t - 50):t]
        prev = prev[np.isfinite(prev)]
        want = np.median(prev) if len(prev) >= 10 else np.nan
        np.testing.assert_equal(got[t], want)


def test_spike_in_one_layer_is_found_at_its_step_and_layer():
    norms, _ = noisy(200)
    norms[120, 2] *= 60  # blocks[1] jumps 60x; the global norm goes up ~30x
    grad = np.sqrt((norms ** 2).sum(1))
    loss = np.ones(200)
    loss[120:130] = 3.0  # the loss triples for 10 steps, then is back
    e = dg.explosion(loss, grad, norms, LAYERS)
    assert (e.step, e.onset, e.layers, e.cause) == (120, 120, ("blocks[1]",), "grad norm")
    assert e.layer_ratios[0][0] == "blocks[1]" and e.layer_ratios[0][1] > 40
    assert all(r < 2 for _, r in e.layer_ratios[1:])
    assert e.origin == "blocks[1]" and not e.together
    assert e.ratio == pytest.approx(grad[120] / np.median(grad[70:120]))
    assert e.loss_before == 1.0 and e.loss_after == pytest.approx((10 * 3 + 10 * 1) / 20)
    assert e.recovered_at == 130 and e.transient  # first 10-step window back within 10%


def test_the_layer_that_jumped_earliest_is_named_first():
    norms, _ = noisy(200)
    norms[100:104] = 1.0
    norms[100:104, 0] = [14, 15, 60, 300]  # input jumps from step 100 ...
    norms[103, 1:] = 20  # ... the rest follow at 103
    grad = np.sqrt((norms ** 2).sum(1))
    e = dg.explosion(np.ones(200), grad, norms, LAYERS)
    # the global norm (about 2 before) crosses 10x only once input is 60x (step 102)
    assert e.step == 102 and e.onset == 100 and e.layers == ("input",)


def test_a_layer_blip_that_subsided_before_the_explosion_is_not_its_origin():
    norms, _ = noisy(200)
    norms[100, 2] *= 15  # blocks[1] blips alone; the global norm stays well below 10x
    norms[130:, 1] *= 100  # then blocks[0] explodes and stays up
    grad = np.sqrt((norms ** 2).sum(1))
    e = dg.explosion(np.ones(200), grad, norms, LAYERS)
    assert (e.step, e.onset, e.layers) == (130, 130, ("blocks[0]",))


def test_an_event_no_layer_explains_names_no_origin():
    """The loss went NaN while every layer's gradient stayed ordinary: no layer is blamed."""
    norms, grad = noisy(100)
    loss = np.ones(100)
    loss[70:] = np.nan
    e = dg.explosion(loss, grad, norms, LAYERS, frozen_at=70)
    assert (e.step, e.cause, e.layers) == (70, "non-finite", ())
    assert "- started in: undetermined (no layer's grad norm exceeded 10x its own median at " \
           "the step)" in "\n".join(dg._event_lines(e))


def test_a_gradient_rising_from_a_zero_median_has_an_infinite_ratio():
    norms = np.zeros((100, len(LAYERS)))
    norms[80:] = 1e-9
    grad = np.sqrt((norms ** 2).sum(1))
    e = dg.explosion(np.ones(100), grad, norms, LAYERS)
    assert (e.step, e.cause, e.median, e.ratio) == (80, "grad norm", 0.0, math.inf)
    assert "= infx its median" in "\n".join(dg._event_lines(e))


def test_non_finite_and_frozen_runs():
    norms, grad = noisy(100)
    loss = np.ones(100)
    loss[70:] = np.nan  # the engine stops recording at the step that broke the run
    grad[70:] = np.nan
    norms[70:] = np.nan
    e = dg.explosion(loss, grad, norms, LAYERS, frozen_at=70)
    assert (e.step, e.cause, e.loss_after, e.recovered_at) == (70, "non-finite", math.inf, None)
    assert not e.transient
    assert set(e.layers) == set(LAYERS)  # every layer's norm is non-finite at once
    # parameters went non-finite at step 40 while its loss and gradient were still finite
    _, grad = noisy(100)
    e = dg.explosion(np.ones(100), grad, noisy(100)[0], LAYERS, frozen_at=40)
    assert (e.step, e.cause) == (40, "non-finite")


def test_a_skipped_non_finite_step_is_a_transient_event_not_a_lasting_explosion():
    """skip_nonfinite drops a step whose loss and gradient are NaN and trains on: the run is not
    frozen, so the event is transient and the loss after it is that of the steps it kept."""
    norms, grad = noisy(200)
    loss = np.ones(200)
    loss[100], grad[100], norms[100] = np.nan, np.nan, np.nan
    diag = dg.diagnose({"loss": loss, "grad_norm": grad, "layer_grad_norm": norms}, LAYERS, RUN)
    e = diag.explosion
    assert (e.step, e.cause, e.loss_after, e.recovered_at) == (100, "non-finite", 1.0, 101)
    assert e.transient and diag.harmful is None and not diag.needs_fix
    assert diag.divergence is None
    grad[125] *= 100  # a spike after it: the skipped step leaves the loss before it measured
    e = dg.explosions(loss, grad, norms, LAYERS)[1]
    assert (e.step, e.loss_before, e.recovered_at) == (125, 1.0, 125) and e.transient


def test_no_event_on_stationary_noise_or_slow_growth():
    norms, grad = noisy(400)
    assert dg.explosion(np.ones(400), grad, norms, LAYERS) is None
    growth = np.exp(np.linspace(0, np.log(1e4), 400))  # 10^4 over training, 2.3% a step
    assert dg.explosion(np.ones(400), grad * growth, norms * growth[:, None], LAYERS) is None


def test_a_blow_up_in_the_first_steps_is_found_where_it_starts():
    # a high learning rate: the gradient grows 30x, then 400x a step, the loss with it, until the
    # ReLUs die and the gradient is 0 for the rest of training (every value stays finite)
    norms, _ = noisy(200)
    norms[1:6] *= np.array([30.0, 1.3e4, 5e8, 3e16, 1e17])[:, None]
    norms[6:, :3] = 0.0
    grad = np.sqrt((norms ** 2).sum(1))
    loss = np.full(200, 9e23)
    loss[:6] = [2.9, 9.5, 3e3, 1e8, 1e15, 1e20]
    diag = dg.diagnose({"loss": loss, "grad_norm": grad, "layer_grad_norm": norms}, LAYERS, RUN)
    e = diag.explosion
    assert (e.step, e.cause, e.median, e.transient) == (1, "grad norm", grad[0], False)
    assert e.ratio == pytest.approx(grad[1] / grad[0])
    assert diag.vanishing.after_explosion == 1  # the dead layers are its consequence
    assert "median over the previous 1 step (" in dg.to_markdown(diag)
    # stationary noise from the first step on: the short early baselines raise no event
    for seed in range(20):
        norms, grad = noisy(60, seed=seed)
        assert dg.explosion(np.ones(60), grad, norms, LAYERS) is None


def test_transient_spikes_are_listed_and_the_explosion_that_mattered_is_found():
    norms, _ = noisy(300)
    norms[100, 2] *= 60  # two spikes the loss does not notice ...
    norms[150, 0] *= 60
    norms[220:, 3] *= 100  # ... then the head's gradient stays 100x up and the loss with it
    grad = np.sqrt((norms ** 2).sum(1))
    loss = np.ones(300)
    loss[220:] = 5.0
    diag = dg.diagnose({"loss": loss, "grad_norm": grad, "layer_grad_norm": norms}, LAYERS, RUN)
    assert [(e.step, e.layers, e.transient) for e in diag.events] == [
        (100, ("blocks[1]",), True), (150, ("input",), True), (220, ("head",), False)]
    assert diag.explosion.step == 100 and diag.harmful.step == 220 and diag.needs_fix
    assert dg.summary(diag).startswith(
        "2 transient gradient spikes the loss recovered from (first at step 100, grad norm")
    assert "; explosion at step 220 (grad norm" in dg.summary(diag)
    text = dg.to_markdown(diag)
    assert "### 2 transient spikes" in text and "The first, at step 100 (then at step 150):" in text
    assert "### Explosion at step 220" in text and "- started in: head" in text
    quiet = dg.diagnose({"loss": np.ones(200), "grad_norm": grad[:200],
                         "layer_grad_norm": norms[:200]}, LAYERS, RUN)
    assert len(quiet.events) == 2 and quiet.harmful is None and not quiet.needs_fix


def test_vanishing_flags_layers_below_the_thresholds_for_most_steps():
    norms, _ = noisy(100)
    norms[:, 1] *= 1e-4  # relative: 1e-4 of the largest layer, always
    norms[:60, 2] = 5e-8  # absolute, for 60% of steps, then healthy
    norms[:40, 3] *= 1e-4  # only 40% of steps: not most of training
    v = dg.vanishing(norms, LAYERS)
    assert [n for n, _ in v.layers] == ["blocks[0]", "blocks[1]"]
    assert dict(v.layers)["blocks[1]"] == pytest.approx(0.6)
    assert v.ratio_init == pytest.approx(norms[0, 0] / norms[0, 3])
    assert v.ratio_end == pytest.approx(np.median(norms[-10:, 0] / norms[-10:, 3]))
    healthy = dg.vanishing(noisy(100)[0], LAYERS)
    assert healthy.layers == () and healthy.steps == 100


def test_vanishing_after_an_explosion_is_its_consequence():
    norms, grad = noisy(200)
    norms[80:, :2] = 0.0  # dead units after the blow-up at step 80
    norms[80, 2:] *= 100
    grad = np.sqrt((norms ** 2).sum(1))
    loss = np.ones(200)
    loss[80:] = 5.0
    diag = dg.diagnose({"loss": loss, "grad_norm": grad, "layer_grad_norm": norms}, LAYERS,
                       RUN)
    assert diag.explosion.step == 80 and not diag.explosion.transient
    assert [n for n, _ in diag.vanishing.layers] == LAYERS[:2]
    assert diag.vanishing.after_explosion == 80
    recs = dg.rule_recommendations(diag, {"clip_norm"}, {"he_normal"}, {"residual", "norm"})
    assert [r.action for r in recs] == ["--method clip_norm", "--lr 0.01"]  # nothing for vanishing


RUN = {"task": "digits", "method": "none", "init": "default", "optimizer": "sgd", "seed": 0,
       "lr": 0.1, "steps": 200, "model": {"name": "mlp", "residual": False, "norm": "none"},
       "record": None, "run": 0}


def test_rules_recommend_what_exists_and_is_not_already_used():
    norms, _ = noisy(200)
    norms[:, 1:3] *= 1e-5
    norms[150, 0] *= 1e4
    grad = np.sqrt((norms ** 2).sum(1))
    loss = np.ones(200)
    loss[150:] = 4.0
    tel = {"loss": loss, "grad_norm": grad, "layer_grad_norm": norms}
    diag = dg.diagnose(tel, LAYERS, RUN)
    assert diag.explosion.step == 150 and diag.vanishing.layers and diag.needs_fix
    recs = dg.rule_recommendations(diag, {"none", "clip_norm", "agc"}, {"default", "he_normal"},
                                   {"residual", "norm", "width"})
    assert [r.action for r in recs] == ["--method clip_norm", "--method agc", "--lr 0.01",
                                        "--init he_normal", "--set model.residual=true",
                                        "--set model.norm=layer"]
    assert all(r.reason for r in recs)
    used = dg.diagnose(tel, LAYERS, {**RUN, "method": "clip_norm(max_norm=1.0)",
                                     "init": "he_normal", "model": {"residual": True}})
    recs = dg.rule_recommendations(used, {"clip_norm", "agc"}, {"he_normal"}, {"residual"})
    assert [r.action for r in recs] == ["--method agc", "--lr 0.01"]
    calm = dg.diagnose({**tel, "loss": np.ones(200), "grad_norm": noisy(200)[1],
                        "layer_grad_norm": noisy(200)[0]}, LAYERS, RUN)
    assert calm.healthy and dg.rule_recommendations(calm, {"clip_norm"}, {"he_normal"}, set()) == ()
    assert "nothing to fix" in dg.to_markdown(calm)


def test_recommendations_from_a_report_of_the_same_problem(tmp_path):
    from stabench.reports import board_rows_for, write_report
    from stabench.store import Store

    from test_report import TABLE, fake_record, table_metrics

    store = Store(tmp_path / "results")
    for method in TABLE:
        fake_record(store, method, metrics_fn=table_metrics(method))
    fake_record(store, "none", overrides={"model.depth": 3}, metrics_fn=table_metrics("none"))
    write_report(tmp_path / "results", plots=False, warn=lambda m: None)

    spec = make_spec("digits", "none", seeds=1, lrs=(0.1,))
    rows, where = board_rows_for(tmp_path / "results", spec)
    assert where == tmp_path / "results" / "leaderboard.csv"
    assert {r["variant"] for r in rows} == {"digits[depth=1]"} and len(rows) == 3
    # each row carries its entry's divergence per rate, as TABLE made the runs
    lr_runs = {r["method"].split("(")[0]: r["lr_runs"] for r in rows}
    assert lr_runs == {m: {lr: (3 * div, 3) for lr, (_, _, div, _) in TABLE[m].items()}
                       for m in TABLE}
    recs = dg.board_recommendations(rows, str(where), 0.1)
    # TABLE: clip_norm improves the loss at every lr (most stable), none diverges at lr 10,
    # clip_value barely trains
    assert [r.action for r in recs] == [
        f"--method {m} --init default --optimizer 'sgd(momentum=0.9, nesterov=False)'"
        for m in ("'clip_norm(max_norm=1.0)'", "none", "'clip_value(limit=1.0)'")]
    assert recs[0].reason.startswith(f"rank 1 of 3 on digits[depth=1] in {where} (stability 0.86")
    assert recs[0].reason.endswith("none of its 3 runs at lr 0.1 diverged")
    # at lr 10, where every seed of none diverged, none is not offered; between 1 and 10 the
    # grid's rate above (10) decides
    for lr in (10.0, 3.0):
        assert [r.action.split()[1] for r in dg.board_recommendations(rows, str(where), lr)] == [
            "'clip_norm(max_norm=1.0)'", "'clip_value(limit=1.0)'"]
    # a run of none that diverged at lr 10: the rate its entry never diverged at, then the entries
    diverged = dg.diagnose(blow_up(), LAYERS, {**RUN, "lr": 10.0, "optimizer": spec.optimizer})
    recs, notes = dg.recommendations(diverged, rows, str(where), set(), set(), set())
    assert [r.action.split()[:2] for r in recs] == [
        ["--lr", "1"], ["--method", "'clip_norm(max_norm=1.0)'"],
        ["--method", "'clip_value(limit=1.0)'"]] and notes == ()
    deep = make_spec("digits", "none", seeds=1, lrs=(0.1,), overrides={"model.depth": 3})
    assert {r["variant"] for r in board_rows_for(tmp_path / "results", deep)[0]} == {
        "digits[depth=3]"}
    other = make_spec("digits", "none", seeds=1, lrs=(0.1,), overrides={"model.width": 8})
    assert board_rows_for(tmp_path / "results", other) == ([], None)
    assert board_rows_for(tmp_path / "nothing", spec) == ([], None)


OPT = "sgd(momentum=0.9, nesterov=False)"


def board_row(method, rank, lr_runs, init="default"):
    """A leaderboard row as `reports.board_rows_for` returns it: {lr: (diverged runs, runs)}."""
    return {"variant": "digits", "method": method, "init": init, "optimizer": OPT, "rank": rank,
            "stability": 1 - rank / 10, "quality_metric": "test_accuracy", "quality_mean": 0.9,
            "lr_runs": lr_runs}


GRID = (0.1, 0.3, 1.0, 3.0)


def fails_from(first, seeds=3, failed=2):
    """An entry stable below `first` and diverging on `failed` of its seeds from it on."""
    return {lr: (failed if lr >= first else 0, seeds) for lr in GRID}


def test_the_board_never_recommends_an_entry_that_diverged_at_the_runs_rate():
    """The leaderboard's top three entries diverge at lr 3 (as agc and autoclip did on digits):
    at lr 3 only entries with no diverged run there are offered, in rank order; at lr 2 (between
    the grid's 1 and 3) the rate above decides."""
    rows = [board_row("agc", 1, fails_from(3.0)),
            board_row("autoclip", 2, fails_from(3.0, failed=3)),
            board_row("autoclip", 3, fails_from(3.0), init="he_normal"),
            board_row("clip_norm", 4, fails_from(1.0, failed=1) | {3.0: (0, 3)}),  # not monotone
            board_row("warmup", 5, fails_from(10.0)),
            board_row("none", 6, fails_from(0.3)),
            board_row("zclip", 7, {lr: (0, 3) for lr in GRID[:3]}),  # never ran at 3
            board_row("skip", 8, fails_from(10.0))]
    for lr in (3.0, 2.0):
        recs = dg.board_recommendations(rows, "board", lr)
        assert [r.action.split()[1] for r in recs] == ["clip_norm", "warmup", "skip"]
        assert all("none of its 3 runs at lr 3" in r.reason for r in recs)
    assert "the next rate of its grid above 2" in dg.board_recommendations(rows, "b", 2.0)[0].reason
    # at lr 1 every entry stable there qualifies, the best three by rank
    assert [r.action.split()[1] for r in dg.board_recommendations(rows, "board", 1.0)] == [
        "agc", "autoclip", "autoclip"]
    # the run's own entry is not advice
    own = ("warmup", "default", OPT)
    assert [r.action.split()[1] for r in dg.board_recommendations(rows, "b", 3.0, own)] == [
        "clip_norm", "skip"]


def test_no_stable_entry_is_said_and_the_learning_rate_advice_stays():
    rows = [board_row("agc", 1, fails_from(3.0)), board_row("none", 2, fails_from(1.0))]
    run = {**RUN, "lr": 3.0, "optimizer": OPT}
    diag = dg.diagnose(blow_up(), LAYERS, run)
    assert diag.divergence is not None
    recs, notes = dg.recommendations(diag, rows, "board", {"clip_norm", "agc"}, set(), set())
    # the run's entry (none) never diverged at 0.3 or below; agc not offered at 3
    assert [r.action for r in recs] == ["--lr 0.3"]
    assert "0 of 3 there, none at a lower rate" in recs[0].reason
    assert notes == ("no entry of digits in board trained without diverging at lr 3 (or the next "
                     "rate of its grid above it): each of the 2 entries that ran there diverged "
                     "on at least one seed",)
    assert f"- {notes[0]}" in dg.to_markdown(replace(diag, recommendations=recs, notes=notes))
    # past every entry's grid: nothing is known there
    _, notes = dg.recommendations(replace(diag, run={**run, "lr": 30.0}), rows, "board", set(),
                                  set(), set())
    assert notes[0].startswith("no entry of digits in board ran at lr 30 or above")
    # the run's own entry absent: the largest rate at which no entry diverged (nor below it)
    others = [board_row("agc", 1, fails_from(3.0)), board_row("zclip", 2, fails_from(1.0))]
    recs, _ = dg.recommendations(diag, others, "board", set(), set(), set())
    assert recs[0].action == "--lr 0.3" and "no entry of digits in board diverged" in \
        recs[0].reason
    # no rate known to be stable: LR_FACTOR lower, from the rules as from a board
    unstable = [board_row("agc", 1, fails_from(0.1))]
    recs, _ = dg.recommendations(diag, unstable, "board", set(), set(), set())
    assert recs[0].action == f"--lr {3.0 / dg.LR_FACTOR:g}"
    recs, notes = dg.recommendations(diag, [], None, {"clip_norm"}, set(), set())
    assert [r.action for r in recs] == [f"--lr {3.0 / dg.LR_FACTOR:g}", "--method clip_norm"]
    assert notes == ()
    # a run that did not diverge gets no learning-rate advice
    calm = dg.diagnose({"loss": np.ones(200), "grad_norm": noisy(200)[1],
                        "layer_grad_norm": noisy(200)[0]}, LAYERS, {**run, "lr": 0.3})
    recs, _ = dg.recommendations(calm, rows, "board", set(), set(), set())
    assert [r.action.split()[:2] for r in recs] == [["--method", "agc"]]


def blow_up(steps=60, start=20, rate=3.0, spread=None, seed=0):
    """A run whose layers all grow `rate`x a step from `start` on (each layer's factor scaled by
    `spread`), the loss with them, until it is non-finite: a learning rate too large."""
    norms, _ = noisy(steps, seed=seed)
    spread = np.ones(len(LAYERS)) if spread is None else np.asarray(spread)
    k = np.clip(np.arange(steps) - start + 1, 0, None)[:, None]
    norms = norms * (rate * spread) ** k
    loss = np.where(k[:, 0] > 0, 2.0 * rate ** k[:, 0], 2.0)
    frozen = start + 15
    norms[frozen:], loss[frozen:] = np.nan, np.nan
    grad = np.sqrt((norms ** 2).sum(1))
    return {"loss": loss, "grad_norm": grad, "layer_grad_norm": norms, "frozen_at": frozen}


def test_every_layer_rising_together_is_the_step_size_not_a_layer():
    tel = blow_up()
    frozen = tel.pop("frozen_at")
    diag = dg.diagnose(tel, LAYERS, {**RUN, "lr": 3.0}, frozen_at=frozen)
    e = diag.harmful
    ratios = dg.jump_ratios(tel["layer_grad_norm"])
    assert e.step == 22  # 3x then 9x: the global norm passes 10x its median at the second step
    assert (ratios[e.step] > dg.EXPLODE_FACTOR).all() and set(e.exploded) == set(LAYERS)
    # the noise decides which layer is first, by far less than LEAD_FACTOR
    top, second = sorted(ratios[e.onset], reverse=True)[:2]
    assert e.lead == pytest.approx(top / second) and e.lead < 1.5
    assert e.origin is None and e.together
    assert "in every layer at once: the step size, not a layer" in dg.summary(diag)
    assert "starting in" not in dg.summary(diag)
    text = "\n".join(dg._event_lines(e))
    assert f"{e.layer_ratios[0][0]} leads: " in text and "not a clear lead" in text
    assert "they rose together, the signature of a step size too large" in text
    # the learning rate first, ahead of the methods
    recs = dg.rule_recommendations(diag, {"clip_norm", "agc"}, set(), set())
    assert [r.action for r in recs] == ["--lr 0.3", "--method clip_norm", "--method agc"]
    assert recs[0].reason.startswith("every layer exploded together")


def test_a_layer_that_clearly_leads_is_named_and_a_near_tie_is_not():
    # blocks[1] grows 60x a step, the others 3x: it leads by 20x at the onset
    tel = blow_up(rate=3.0, spread=[1, 1, 20, 1])
    frozen = tel.pop("frozen_at")
    diag = dg.diagnose(tel, LAYERS, RUN, frozen_at=frozen)
    e = diag.harmful
    assert e.onset == 20 and e.layers == ("blocks[1]",)
    assert e.lead >= dg.LEAD_FACTOR and e.origin == "blocks[1]" and not e.together
    assert "starting in blocks[1]" in dg.summary(diag)
    text = "\n".join(dg._event_lines(e))
    assert "- started in: blocks[1] (first to exceed 10x its own median, at that step; " \
           "blocks[1] leads: " in text and "a clear lead: at least 10" in text
    recs = dg.rule_recommendations(diag, {"clip_norm"}, set(), set())
    assert [r.action for r in recs] == ["--method clip_norm", "--lr 0.01"]
    # blocks[1] 25x, 5x ahead of the rest, which stay under 10x: no origin, no step-size verdict
    norms, _ = noisy(200)
    norms[120:] *= 5
    norms[120:, 2] *= 5
    grad = np.sqrt((norms ** 2).sum(1))
    e = dg.explosion(np.ones(200), grad, norms, LAYERS)
    assert e.layers == ("blocks[1]",) and 2 < e.lead < dg.LEAD_FACTOR
    assert e.origin is None and not e.together
    diag = dg.diagnose({"loss": np.where(np.arange(200) < 120, 1.0, 5.0), "grad_norm": grad,
                        "layer_grad_norm": norms}, LAYERS, RUN)
    assert "no layer clearly first" in dg.summary(diag)
    assert "- started in: no single layer (blocks[1] first to exceed" in dg.to_markdown(diag)


# ---- planted faults in real training -------------------------------------------------------------
SMALL = {"train.steps": 120, "train.eval_every": 60, "model.width": 16, "model.depth": 3}
SPIKE = 80


def train(method, seeds, lr, data, overrides=SMALL, init="default"):
    """Train a cell through the runner; returns (spec, arrays, layer names)."""
    from stabench.runner import train_spec

    spec = make_spec("digits", method, init, seeds=seeds, lrs=(lr,), overrides=overrides)
    body, arrays = train_spec(spec, data)
    return spec, arrays, body["layer_names"]


def diagnoses(spec, arrays, names, data=None, **kw):
    from stabench.runner import diagnose_run

    return [diagnose_run(spec, arrays, names, k, data, **kw) for k in range(len(spec.runs))]


@pytest.fixture(scope="module")
def unplanted(digits_data):
    """The runs the planted tests corrupt, without the fault: no event at all."""
    spec, arrays, names = train("none", 3, 0.05, digits_data)
    assert all(d.healthy for d in diagnoses(spec, arrays, names))
    return arrays


def same_until_the_fault(arrays, unplanted, step):
    """The fault leaves every run untouched before it fires (loss and per-layer norms bit for bit;
    the global norm is reduced in another fusion)."""
    for name in ("loss", "layer_grad_norm"):
        np.testing.assert_array_equal(arrays[name][:, :step], unplanted[name][:, :step])
    np.testing.assert_allclose(arrays["grad_norm"][:, :step], unplanted["grad_norm"][:, :step],
                               rtol=1e-6)


@covers("method", "inject_spike")
@pytest.mark.slow
@pytest.mark.parametrize("layer", ["input", "blocks[1]"])
def test_planted_gradient_spike_is_found_at_its_step_in_its_layer(digits_data, unplanted, layer):
    spec, arrays, names = train(f"inject_spike(step={SPIKE}, factor=100.0, layer='{layer}')", 3,
                                0.05, digits_data)
    assert names == ["input", "blocks[0]", "blocks[1]", "blocks[2]", "head"]
    same_until_the_fault(arrays, unplanted, SPIKE)
    for diag in diagnoses(spec, arrays, names):
        e = diag.explosion
        assert e is not None and SPIKE <= e.step <= SPIKE + 5, e
        assert e.layers[0] == layer and e.layer_ratios[0][0] == layer


@covers("method", "inject_lr_spike")
@pytest.mark.slow
def test_planted_learning_rate_spike_is_found_within_5_steps(digits_data, unplanted):
    spec, arrays, names = train(f"inject_lr_spike(step={SPIKE}, factor=100.0)", 3, 0.05,
                                digits_data)
    # the step-80 update is the first it changes: step 80's gradients are as without it
    same_until_the_fault(arrays, unplanted, SPIKE + 1)
    for diag in diagnoses(spec, arrays, names):
        e = diag.explosion
        assert e is not None and SPIKE < e.step <= SPIKE + 5, e
        assert e.loss_after > e.loss_before


@pytest.mark.slow
def test_healthy_digits_run_with_clipping_reports_no_event_over_5_seeds(digits_data):
    spec, arrays, names = train("clip_norm(max_norm=1.0)", 5, 0.1, digits_data, overrides={})
    assert spec.train["steps"] == 500
    for diag in diagnoses(spec, arrays, names):
        assert diag.healthy, dg.summary(diag)
        assert "healthy" in dg.summary(diag)


DEEP = {"train.steps": 60, "train.eval_every": 60, "model.width": 16, "model.depth": 30,
        "model.activation": "tanh"}


@pytest.mark.slow
def test_deep_tanh_with_small_init_vanishes_and_its_residual_he_twin_does_not(digits_data, tmp_path,
                                                                            capsys):
    from stabench.runner import load_data

    spec, arrays, names = train("none", 1, 0.1, digits_data, DEEP, init="normal(std=0.01)")
    small, = diagnoses(spec, arrays, names, data=load_data(spec))  # the data the command reads
    # --at-init stops after the step-0 gradients: the same signal, nothing stored, no figure
    code, out, err = cli(capsys, "diagnose", "--task", "digits", "--init", "normal(std=0.01)",
                         "--lr", "0.1", "--at-init", *[f"--set={k}={v}" for k, v in DEEP.items()],
                         "--out", tmp_path)
    assert code == 0, err
    assert "at init: first/last layer grad-norm ratio" in out and "## Explosion" not in out
    (report,) = tmp_path.rglob("*.md")
    assert report.name.endswith(".at-init.diagnosis.md")
    assert report.read_text() == out.strip() + "\n"
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.png"))
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| blocks[")]
    np.testing.assert_allclose([float(r[1]) for r in rows], small.signal.activation_std[1:31],
                               rtol=5e-3)  # printed to 3 significant digits: within 0.5%
    np.testing.assert_allclose([float(r[2].strip(" |")) for r in rows],
                               small.signal.grad_norm[1:31], rtol=5e-3)
    assert len(names) == 32
    # Each layer back from the head multiplies the backward signal by about 0.01 * sqrt(16), so
    # the last two hidden layers' norms (their biases) stay above 1e-3 of the head's; all the
    # others vanish.
    flagged = {n for n, _ in small.vanishing.layers}
    assert {"input"} | {f"blocks[{i}]" for i in range(28)} <= flagged and "head" not in flagged
    assert small.vanishing.ratio_init < 1e-3 and small.needs_fix
    std = np.array(small.signal.activation_std)
    assert std[-2] < 1e-6 * std[0]  # the signal is gone before the head
    assert "--init he_normal" in [r.action for r in small.recommendations]

    spec, arrays, names = train("none", 1, 0.1, digits_data,
                                {**DEEP, "model.residual": True}, init="he_normal")
    twin, = diagnoses(spec, arrays, names, data=digits_data)
    assert twin.vanishing.layers == () and twin.explosion is None and twin.divergence is None
    std = np.array(twin.signal.activation_std)
    assert np.all((std > 0.1) & (std < 100))
    assert 1e-2 < twin.vanishing.ratio_init < 1e2


# ---- the command: train, store, report; read the record back -------------------------------------
def cli(capsys, *args):
    from stabench.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_diagnose_command_report_and_figure_then_the_same_report_from_the_record(tmp_path, capsys):
    out = tmp_path / "runs"
    (tmp_path / "no-results").mkdir()  # holds no report: rule-based recommendations
    method = f"inject_spike(step={SPIKE}, layer='blocks[1]')"
    proc = run_cli("diagnose", "--task", "digits", "--method", method, "--lr", "0.05",
                   *[f"--set={k}={v}" for k, v in SMALL.items()], "--out", out,
                   "--results", tmp_path / "no-results")
    assert proc.returncode == 0, proc.stderr
    record, = out.rglob("*.json")
    report = record.with_name(f"{record.stem}.run0.diagnosis.md")
    figure = report.with_suffix(".png")
    trained = report.read_text()
    assert proc.stdout.strip() == trained.strip()
    verdict = next(line for line in trained.splitlines() if line.startswith("**"))
    assert f"at step {SPIKE}" in verdict and "in blocks[1]" in verdict  # or "starting in"
    assert "- started in: blocks[1] (first to exceed 10x" in trained and "a clear lead" in trained
    assert f"![per-layer gradient norms and loss]({figure.name})" in trained
    assert "| blocks[2] |" in trained and "| - |" not in trained  # activation stds present
    png = figure.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

    code, _, err = cli(capsys, "diagnose", record, "--report", tmp_path / "again",
                       "--results", tmp_path / "no-results")
    assert code == 0, err
    assert (tmp_path / "again" / report.name).read_text() == trained
    assert (tmp_path / "again" / figure.name).read_bytes()[:8] == png[:8]
    # the step-0 signal of the stored run goes beside its full diagnosis, not over it
    code, _, err = cli(capsys, "diagnose", record, "--at-init")
    assert code == 0, err
    assert report.read_text() == trained
    at_init = report.with_name(f"{record.stem}.run0.at-init.diagnosis.md").read_text()
    assert at_init != trained and "![per-layer gradient norms" not in at_init  # no figure


@pytest.mark.parametrize("args, expected", [
    ((), "give a record path (diagnose RECORD) or a task to train (--task NAME)"),
    (("nope.json",), "nope.json: unreadable record"),
    (("--task", "digits", "--lr", "0.1,1"), "--lr takes one learning rate"),
    (("--task", "digits", "--seed", "-1"), "--seed must be >= 0"),
    (("--task", "digits", "--steps", "0"), "--steps must be positive"),
    (("--task", "digits", "--batch-size", "-4"), "--batch-size must be positive"),
    (("--task", "digits", "--set", "train.steps"), "--set expects key=value"),
    (("--task", "digits", "--method", "inject_spike(layer='a[b')"), "unbalanced brackets"),
    (("--task", "digits", "--method", "inject_spike(layer='x[y]')"), "is not a layer name"),
    (("--task", "digits", "--method", "inject_spike(factor=0)"), "factor positive"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, expected):
    code, out, err = cli(capsys, "diagnose", *args, "--out", tmp_path / "out")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()

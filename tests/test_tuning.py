"""Fair tuning: a suite declares one tuning budget for every method; the leaderboard shows each
tuned method at the setting chosen on validation data, beside its registered defaults."""

import pandas as pd
import pytest
from test_validation import boards_of, save_record

from stabench import leaderboard as lb
from stabench import sweeps as sw
from stabench.registry import UserError
from stabench.store import Store

CLIP = {v: f"clip_norm(max_norm={v})" for v in (0.25, 1.0, 4.0)}  # 1.0: the registered default


def runs_table(rows):
    """Runs of one task variant: rows of (method, init, lr, seed, val_accuracy, test_accuracy,
    diverged)."""
    return pd.DataFrame([{"method": m, "init": i, "optimizer": "sgd", "lr": lr, "seed": s,
                          "val_accuracy": v, "test_accuracy": t, "diverged": float(d),
                          "target_metric": "test_accuracy", "target_mode": "max"}
                         for m, i, lr, s, v, t, d in rows])


def per_lr(method, init, by_lr, seeds=(0, 1)):
    """Rows for every seed of each lr: by_lr = {lr: (val_accuracy, test_accuracy, diverged)}."""
    return [(method, init, lr, s, v, t, d) for lr, (v, t, d) in by_lr.items() for s in seeds]


# 0.25 has the best validation score at one rate (0.9 at lr 1), 4.0 the best mean over rates and
# the best test scores, the default neither; clip_norm under he_normal ran one setting only.
FAMILY = runs_table(
    per_lr(CLIP[0.25], "default", {0.1: (0.3, 0.3, 0), 1.0: (0.9, 0.5, 0)})
    + per_lr(CLIP[1.0], "default", {0.1: (0.7, 0.7, 0), 1.0: (0.6, 0.6, 0)})
    + per_lr(CLIP[4.0], "default", {0.1: (0.85, 0.99, 0), 1.0: (0.8, 0.99, 0)})
    + per_lr(CLIP[4.0], "he_normal", {0.1: (0.1, 0.1, 0), 1.0: (0.2, 0.2, 0)})
    + per_lr("none", "default", {0.1: (0.5, 0.5, 0), 1.0: (0.4, 0.4, 1)}))


def test_a_family_becomes_its_validation_choice_beside_its_defaults():
    tuned = lb.tune_entries(FAMILY)
    entries = tuned.drop_duplicates(["method", "init"]).set_index(["method", "init"])
    assert sorted(entries.index) == [("clip_norm tuned", "default"),
                                     (CLIP[1.0], "default"), (CLIP[4.0], "he_normal"),
                                     ("none", "default")]
    chosen = entries.loc[("clip_norm tuned", "default")]
    assert (chosen["setting"], chosen["tuned"], chosen["settings"]) == (
        CLIP[0.25], "max_norm=0.25", 3)
    # its runs are the chosen setting's, at every learning rate
    runs = tuned[tuned["method"] == "clip_norm tuned"]
    expected = FAMILY[FAMILY["method"] == CLIP[0.25]]
    assert sorted(zip(runs["lr"], runs["seed"], runs["val_accuracy"])) == sorted(
        zip(expected["lr"], expected["seed"], expected["val_accuracy"]))
    for untouched in [(CLIP[1.0], "default"), (CLIP[4.0], "he_normal"), ("none", "default")]:
        assert (entries.loc[untouched, "tuned"], entries.loc[untouched, "settings"]) == ("", 1)
    assert len(tuned[tuned["method"] == CLIP[1.0]]) == 4


def test_the_tuned_choice_never_reads_test_columns():
    shuffled = FAMILY.assign(test_accuracy=FAMILY["test_accuracy"].to_numpy()[::-1])
    for runs in (shuffled, FAMILY.drop(columns=["test_accuracy"])):
        tuned = lb.tune_entries(runs)
        assert set(tuned.loc[tuned["method"] == "clip_norm tuned", "setting"]) == {CLIP[0.25]}


def test_ties_between_settings_go_to_fewer_diverged_runs_then_the_smaller_rate_then_the_name():
    def chosen(rows):
        tuned = lb.tune_entries(runs_table(rows))
        return tuned.loc[tuned["method"] == "clip_norm tuned", "setting"].iloc[0]

    same = {0.1: (0.8, 0.5, 0)}
    assert chosen(per_lr(CLIP[4.0], "default", same) + per_lr(CLIP[0.25], "default", same)) \
        == CLIP[0.25]  # the method string that sorts first
    assert chosen(per_lr(CLIP[4.0], "default", same)
                  + per_lr(CLIP[0.25], "default", {0.1: (0.8, 0.5, 1)})) == CLIP[4.0]
    assert chosen(per_lr(CLIP[0.25], "default", {1.0: (0.8, 0.5, 0)})
                  + per_lr(CLIP[4.0], "default", {0.1: (0.8, 0.5, 0), 1.0: (0.1, 0.5, 0)})) \
        == CLIP[4.0]  # its lr 0.1 ties 0.25's lr 1.0 and is smaller


def test_labels_name_the_arguments_that_vary_within_the_family():
    settings = ["warmup_frac(fraction=0.1, shape='linear')+clip_norm(max_norm=1.0)",
                "warmup_frac(fraction=0.2, shape='linear')+clip_norm(max_norm=1.0)",
                "warmup_frac(fraction=0.2, shape='linear')+clip_norm(max_norm=4.0)"]
    assert lb.setting_label(settings[2], settings) == "fraction=0.2, max_norm=4"
    assert lb.setting_label(settings[0], settings[:1]) == ""  # nothing varies
    # two calls with an argument of one name: each named by its call
    assert lb.setting_label("a(x=1)+b(x=2)", ["a(x=1)+b(x=2)", "a(x=3)+b(x=4)"]) == "a.x=1, b.x=2"


def test_the_board_shows_the_tuned_entry_once_per_task_beside_the_defaults(tmp_path):
    def accuracy(best):
        # validation peaks at lr 1 for `best`, test would rank the settings the other way
        def scores(seed, lr):
            val = (0.9 if best else 0.6) if lr == 1.0 else 0.5
            return {"val_accuracy": val, "test_accuracy": 1.4 - val}
        return scores

    store = Store(tmp_path)
    save_record(store, "none", accuracy(False))
    for value in (0.25, 1.0, 4.0):
        save_record(store, CLIP[value], accuracy(value == 4.0))
    tables = boards_of(store)
    (board,) = tables.boards.values()
    assert sorted(board["method"]) == sorted(["none", "clip_norm tuned", CLIP[1.0]])
    row = board.set_index("method").loc["clip_norm tuned"]
    assert (row["setting"], row["tuned"], row["settings"], row["best_lr"]) == (
        CLIP[4.0], "max_norm=4", 3, 1.0)
    assert row["quality_mean"] == pytest.approx(0.5)  # the test score at the chosen setting
    table = lb.render_task("digits", board, tables.used)
    # displayed as the chosen setting's label, tuned
    assert "clip-norm (4) tuned" in set(table.frame["method"])
    assert "settings run" in table.caption
    assert sorted(tables.overall["method"]) == sorted(board["method"])
    assert set(tables.runs["method"]) == {"none", *CLIP.values()}  # every setting stays stored
    assert not any("unequal tuning budgets" in n for n in tables.notes)

    for value in (0.005, 0.01):  # agc tuned over 2 settings against clip_norm's 3
        save_record(store, f"agc(clip={value}, eps=0.001)", accuracy(False))
    notes = boards_of(store).notes
    assert any("agc tuned 2, clip_norm tuned 3): unequal tuning budgets" in n for n in notes)


# ---- the suite's budget --------------------------------------------------------------------------
def suite(tmp_path, text):
    path = tmp_path / "tuned.toml"
    path.write_text(text)
    return str(path)


def test_a_suite_with_one_budget_for_every_method_loads_and_expands(tmp_path):
    path = suite(tmp_path, '''
tuning = 3
seeds = 1
lrs = [0.1]
methods = ["none", "clip_norm(max_norm=[0.25, 1.0, 4.0])", "clip_norm",
           "warmup_frac(fraction=[0.05, 0.1, 0.2])"]
tasks = [{name = "digits", set = {"train.steps" = 20}}]
''')
    _, doc = sw.load_suite(path)
    methods = [c.method for c in sw.suite_spec(doc).cells()]
    assert sorted(m for m in methods if m.startswith("warmup_frac")) == [
        f"warmup_frac(fraction={f}, shape='linear')" for f in (0.05, 0.1, 0.2)]
    assert len(methods) == 7  # none, 3 clip_norm (the default listed twice), 3 warmup_frac


def test_a_suite_names_every_method_off_its_tuning_budget(tmp_path):
    path = suite(tmp_path, '''
tuning = 3
methods = ["agc(clip=[0.005, 0.01])", "clip_norm(max_norm=[0.25, 4.0])", "clip_norm"]
[[tasks]]
name = "digits"
[[tasks]]
name = "adding"
methods = ["none", "zclip(z=[2.0, 2.5, 3.0, 3.5])", "clip_value(limit=[0.5, 1.0, 2.0])"]
''')
    with pytest.raises(UserError) as err:
        sw.load_suite(path)
    message = str(err.value)
    assert "tuning = 3 settings per tuned method" in message
    assert "tasks[0] (digits): agc has 2" in message
    assert "tasks[1] (adding): zclip has 4" in message
    assert "clip_norm has" not in message and "clip_value has" not in message


@pytest.mark.parametrize("text, message", [
    ('tuning = 0\ntasks = ["digits"]', "field 'tuning' must be positive"),
    ('tuning = 3\nsearch = "optuna(n=4)"\ntasks = ["digits"]', "use grid"),
])
def test_bad_tuning_budgets_are_refused(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        sw.load_suite(suite(tmp_path, text))

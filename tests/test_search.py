"""Optuna search over traced method arguments: one compile per cell shape, traced values equal to
the same values baked into the program, trials stored and replayed, clear errors."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stabench import cli
from stabench.methods import METHODS
from stabench.registry import UserError
from stabench.store import Store
from stabench.sweeps import Optuna, SweepSpec, TaskEntry, parse_search
from stabench.train import backend_compiles, compiled_names

from conftest import engine_for, tiny_spec
from test_methods import KEY, PARAMS, cell_transform, make_tree

TRACED = [(e.name, a) for e in METHODS.entries() for a in e.meta.get("traced", ())]
TINY = (("train.steps", 20), ("train.eval_every", 20), ("model.width", 16))


def _quadratic(params):
    return 0.5 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params))


def _updates(tx, grads, n=2, **extra):
    state = tx.init(PARAMS)
    for _ in range(n):
        u, state = tx.update(grads, state, PARAMS, **extra)
    return u


@pytest.mark.parametrize("name, arg", TRACED, ids=[f"{n}.{a}" for n, a in TRACED])
def test_a_traced_argument_updates_as_the_same_value_baked_in(name, arg):
    default = METHODS.entry(name).parameters()[arg].default
    grads = make_tree(jax.random.key(2), scale=10.0)  # large enough for every clip to act
    # a method that evaluates the loss (sam) gets one whose gradient is the parameters
    extra = {"value_fn": _quadratic} if METHODS.entry(name).meta.get("needs_value") else {}
    out = {}
    for value in (default, 10 * default):
        ct = cell_transform(f"{name}({arg}={value!r})")
        assert ct.values == (value,)
        baked = jax.jit(lambda: _updates(ct.build(0.1, KEY), grads, **extra))()
        traced = jax.jit(lambda v: _updates(ct.build(0.1, KEY, v), grads, **extra))(
            jnp.array([value]))
        for b, t in zip(jax.tree.leaves(baked), jax.tree.leaves(traced)):
            np.testing.assert_allclose(t, b, rtol=1e-6, atol=1e-7)
        out[value] = baked
    # the argument matters: the two values give different updates
    a, b = (np.concatenate([x.ravel() for x in jax.tree.leaves(u)]) for u in out.values())
    assert not np.allclose(a, b, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_traced_runs_of_one_program_equal_their_values_baked_into_their_own(digits_data):
    template = "warmup_frac(fraction={})+clip_norm(max_norm={})+weight_decay(wd={})"
    sets = [(0.3, 0.5, 1e-3), (0.1, 2.0, 0.05)]
    specs = [tiny_spec(template.format(*v), steps=30, seeds=1, lrs=(0.3,),
                       overrides={"model.width": 16}) for v in sets]
    seeds, lrs = np.zeros(2, int), np.full(2, 0.3)
    traced = engine_for(specs[0], digits_data).run(seeds, lrs, values=np.array(sets))
    for lane, spec in enumerate(specs):
        # the same lane of a 2-run program with the values baked in
        baked = engine_for(spec, digits_data).run(seeds, lrs)
        for name in ("loss", "grad_norm", "grad_norm_post", "update_norm", "param_norm"):
            np.testing.assert_allclose(traced.telemetry[name][lane], baked.telemetry[name][lane],
                                       rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(traced.evals["test_loss"][lane], baked.evals["test_loss"][lane],
                                   rtol=1e-5)
    assert not np.allclose(traced.telemetry["loss"][0], traced.telemetry["loss"][1], rtol=1e-3)


def test_an_optuna_study_that_searches_nothing_trains_its_one_cell(tmp_path):
    """A method without ranges (a baseline beside searched ones) has no traced values to take."""
    pytest.importorskip("optuna")
    from stabench.search import run_search

    sweep = SweepSpec(tasks=(TaskEntry("digits", TINY),), methods=("none",), seeds=1,
                      search="optuna(n=4, batch=2)")
    lines = []
    [result] = run_search(sweep, parse_search(sweep.search), str(tmp_path), log=lines.append)
    assert result.trained == 1 and len(result.trials) == 1 and np.isfinite(result.trials[0][1])
    assert lines[0].endswith("searches nothing: one cell, not 4 trials"), lines[0]


@pytest.mark.slow
def test_optuna_batches_of_8_compile_each_cell_shape_once_and_replay_from_the_store(tmp_path):
    pytest.importorskip("optuna")
    from stabench.search import run_search

    methods = ("clip_norm(max_norm=loguniform(0.01,10))",
               "warmup_frac(fraction=uniform(0.05,0.5))+weight_decay(wd=loguniform(1e-5,0.01))")
    sweep = SweepSpec(tasks=(TaskEntry("digits", TINY),), methods=methods, seeds=1,
                      search="optuna(n=12, batch=8, lr=loguniform(0.01,1))")
    search = parse_search(sweep.search)
    names, before = len(compiled_names()), backend_compiles()
    results = run_search(sweep, search, str(tmp_path), log=lambda _: None)
    # 2 studies x (8 trials, then 4 padded to 8): one init and one chunk program per study
    assert backend_compiles() - before == 4
    assert compiled_names()[names:] == ["jit(init_run)", "jit(_chunk_run)"] * 2
    assert [len(r.trials) for r in results] == [12, 12] and sum(r.trained for r in results) == 24
    records, bad = Store(tmp_path).records()
    assert not bad and len(records) == len({spec.hash for r in results for spec, _ in r.trials})
    for record in records:
        spec = record.spec
        assert len(spec.lrs) == 1 and 0.01 <= spec.lrs[0] <= 1
        assert record.data["timing"]["program_runs"] == 8
    clip = [spec for spec, _ in results[0].trials]
    assert all(0.01 <= float(s.method.split("=")[1].rstrip(")")) <= 10 for s in clip)
    assert len({s.method for s in clip}) == 12

    before = backend_compiles()
    again = run_search(sweep, search, str(tmp_path), log=lambda _: None)
    assert backend_compiles() == before and sum(r.trained for r in again) == 0
    assert [r.trials for r in again] == [r.trials for r in results]


@pytest.mark.parametrize("text, message", [
    ("optuna(n=0)", "n and batch must be positive"),
    ("optuna(batch=-2)", "n and batch must be positive"),
    ("optuna(batch=5000)", "batch must be at most 1000"),
    ("optuna(seed=-1)", "seed must be >= 0"),
    ("optuna(n=8, lr=0.1)", "lr must be a range: lr=loguniform(a,b)"),
    ("optuna(n=loguniform(1,9))", "n takes a number, not a range"),
    ("optuna(n=[4,8])", "arguments take one value, not a list"),
    ("optuna(objective=speed)", "objective must be one of loss, target"),
    ("optuna(trials=8)", "unknown argument 'trials'"),
    ("optuna(lr=loguniform(0,1))", "needs 0 < low < high"),
    ("optima(n=8)", "Did you mean 'optuna'?"),
])
def test_bad_search_strings_are_clear_errors(text, message):
    with pytest.raises(UserError) as err:
        parse_search(text)
    assert message in str(err.value)


@pytest.mark.parametrize("method, init, message", [
    ("zclip(z=uniform(1,3))", "default", "zclip has no argument optuna can search; it searches "),
    ("agc(eps=loguniform(1e-4,1e-2))", "default", "optuna searches agc's clip"),
    ("warmup_frac(fraction=uniform(0.5,2))", "default", "fraction must lie in (0, 1]"),
    ("none", "normal(std=loguniform(0.01,0.1))", "for ranges of init arguments use --search"),
])
def test_ranges_optuna_cannot_trace_are_clear_errors(method, init, message):
    from stabench.search import studies

    sweep = SweepSpec(tasks=(TaskEntry("digits", TINY),), methods=(method,), inits=(init,),
                      search="optuna(n=4)")
    with pytest.raises(UserError) as err:
        studies(sweep, parse_search(sweep.search))
    assert message in str(err.value)


def test_optuna_names_its_install_and_refuses_sharding(monkeypatch, capsys):
    args = ["sweep", "--task", "digits", "--method", "clip_norm(max_norm=loguniform(0.1,1))",
            "--search", "optuna(n=4)", "--out", "unused"]
    assert cli.main([*args, "--shard", "1/2"]) == 2
    assert "--shard does not apply to --search optuna" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert cli.main(args) == 2
    assert "pip install -e .[scale]" in capsys.readouterr().err


def test_optuna_dry_run_lists_one_study_per_combination_of_the_lists(capsys):
    assert cli.main(["sweep", "--task", "digits", "--method",
                     "clip_norm(max_norm=loguniform(0.1,1))+warmup(steps=[10,20])", "none",
                     "--search", "optuna(n=6, batch=3)", "--dry-run", "--out", "unused"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[-1].startswith(
        "3 studies: 2 of 6 trials, 1 of one cell; 3 trials per compiled batch")
    assert "searches clip_norm.max_norm#0" in out[0] and "warmup(steps=10)" in out[0]
    assert "searches nothing (one cell)" in out[2]
    assert isinstance(parse_search("optuna(n=6, batch=3)"), Optuna)

import pytest

from stabench import tasks
from stabench.registry import UserError


def test_digits_task_loads_with_alias():
    task = tasks.get_task("sklearn_digits")
    assert task.name == "digits"
    assert task.component("model").startswith("mlp(")
    assert task.train["steps"] > 0


def test_unknown_task_lists_valid_ones():
    with pytest.raises(UserError,
                       match=r"unknown task 'digts'.*Did you mean 'digits'.*Valid tasks: .*digits"):
        tasks.get_task("digts")


def test_overrides_apply_and_unknown_keys_fail():
    task = tasks.with_overrides(tasks.get_task("digits"), {"model.depth": 3, "train.steps": 7})
    assert task.config["model"]["depth"] == 3 and task.train["steps"] == 7
    assert tasks.get_task("digits").train["steps"] != 7  # the registered task is untouched
    with pytest.raises(UserError, match="no key 'train.stepz'.*Did you mean 'train.steps'"):
        tasks.with_overrides(tasks.get_task("digits"), {"train.stepz": 7})
    with pytest.raises(UserError, match="train.steps' must be positive"):
        tasks.with_overrides(tasks.get_task("digits"), {"train.steps": 0})


def test_validation_names_file_and_field():
    good = tasks.get_task("digits").config
    bad = {**good, "train": {k: v for k, v in good["train"].items() if k != "steps"}}
    with pytest.raises(UserError, match=r"tasks/x.toml: missing field 'train.steps'"):
        tasks.validate(bad, "tasks/x.toml")
    bad = {**good, "train": {**good["train"], "batch_size": "128"}}
    with pytest.raises(UserError, match=r"tasks/x.toml: field 'train.batch_size' must be int"):
        tasks.validate(bad, "tasks/x.toml")


def test_parse_value():
    assert tasks.parse_value("3") == 3 and tasks.parse_value("0.5") == 0.5
    assert tasks.parse_value("true") is True and tasks.parse_value("[1, 2]") == [1, 2]
    assert tasks.parse_value("tanh") == "tanh"
    # comma-separated literals are a list, as --lrs takes them; other text stays a string
    assert tasks.parse_value("4,16,64") == [4, 16, 64] and tasks.parse_value("0.1,1") == [0.1, 1]
    assert tasks.parse_value("a,b") == "a,b" and tasks.parse_value('"x,y"') == "x,y"


def test_an_unknown_key_suggests_only_a_factory_argument_that_exists():
    digits = tasks.get_task("digits")
    with pytest.raises(UserError, match="no key 'residual'.*Did you mean 'model.residual'"):
        tasks.with_overrides(digits, {"residual": True})
    with pytest.raises(UserError, match="no key 'foo' in task digits. Valid keys") as err:
        tasks.with_overrides(digits, {"foo": 3})
    assert "Did you mean" not in str(err.value)


def test_a_grid_written_in_any_order_is_one_cell():
    from stabench.config import make_spec

    a, b = make_spec("digits", lrs=(1.0, 0.1, 0.3)), make_spec("digits", lrs=(0.1, 0.3, 1.0))
    assert a.lrs == (0.1, 0.3, 1.0) and a.hash == b.hash

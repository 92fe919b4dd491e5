import pytest

from stabench import tasks
from stabench.registry import UserError


def test_digits_task_loads_with_alias():
    task = tasks.get_task("sklearn_digits")
    assert task.name == "digits"
    assert task.component("model").startswith("mlp(")
    assert task.train["steps"] > 0


def test_unknown_task_lists_valid_ones():
    with pytest.raises(UserError, match=r"unknown task 'digts'.*Did you mean 'digits'.*Valid tasks: .*digits"):
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

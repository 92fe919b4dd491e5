import warnings

import pytest

from stabench.methods import METHODS, canonical, resolve
from stabench.registry import Registry, UserError, parse_call, split_plus


def make_registry():
    reg = Registry("thing")

    @reg.register("scale", help="multiply", ref="nobody 2020")
    def scale(factor: float = 1.0, name: str = "x", flag: bool = False, sizes: list = ()):
        return factor, name, flag, sizes

    @reg.register("needs", help="required argument")
    def needs(k: int):
        return k

    return reg


def test_get_parses_literals_and_fills_defaults():
    reg = make_registry()
    assert reg.get("scale") == (1.0, "x", False, ())
    assert (reg.get("scale(factor=2, name=y, flag=True, sizes=[1, 2.5])")
            == (2.0, "y", True, [1, 2.5]))
    assert reg.get("scale(name='quoted')")[1] == "quoted"
    assert isinstance(reg.get("scale(factor=3)")[0], float)  # int literal widened to float
    assert (str(reg.resolve("scale(factor=2)"))
            == "scale(factor=2.0, name='x', flag=False, sizes=())")


def test_duplicate_name_is_an_error():
    reg = make_registry()
    with pytest.raises(ValueError, match="duplicate thing name 'scale'"):
        reg.register("scale", help="again")(lambda: None)


def test_unknown_name_lists_choices_and_closest():
    with pytest.raises(UserError) as err:
        make_registry().get("scal(factor=1)")
    msg = str(err.value)
    assert "unknown thing 'scal'" in msg and "Did you mean 'scale'" in msg
    assert "Valid things: needs, scale" in msg


def test_wrong_argument_lists_accepted_ones():
    with pytest.raises(UserError,
                       match=r"unknown argument 'factr'.*Accepted: factor, name, flag, sizes"):
        make_registry().get("scale(factr=2)")


@pytest.mark.parametrize("spec, message", [
    ("scale(factor=abc)", "factor must be float"),
    ("scale(factor=)", "cannot parse"),
    ("scale(factor=1", "cannot parse"),
    ("scale(2)", "arguments must be named"),
    ("scale(flag=1)", "flag must be bool"),
    ("needs", "missing argument"),
    ("scale(factor=os.system('x'))", "not a literal"),
])
def test_malformed_specs_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        make_registry().get(spec)


def test_a_typo_python_only_warns_about_is_a_user_error_without_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="cannot parse"):
            make_registry().get("scale(factor=1or)")
    assert not caught


def test_split_plus_respects_brackets_and_exponents():
    assert split_plus("a(x=1e+3)+b(y=[1,2])") == ["a(x=1e+3)", "b(y=[1,2])"]
    with pytest.raises(UserError, match="unbalanced"):
        split_plus("a(x=1))+b")
    with pytest.raises(UserError, match="empty term"):
        split_plus("a+")


def test_method_strings_compose_and_canonicalize():
    calls = resolve("clip_norm(max_norm=0.5)+clip_value")
    assert canonical(calls) == "clip_norm(max_norm=0.5)+clip_value(limit=1.0)"
    assert canonical(resolve("clip_norm")) == canonical(resolve("clip_norm(max_norm=1)"))


def test_parse_call_bare_words_are_strings():
    assert parse_call("f(shape=cosine, on=True)") == ("f", {"shape": "cosine", "on": True})


def test_every_method_has_help():
    assert all(e.help for e in METHODS.entries())

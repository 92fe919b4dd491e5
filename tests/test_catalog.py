"""Every built-in method, optimizer and init passes stabench.testing's conformance checks (trains
in a compiled cell, independent runs, methods compose, a test against its definition), has help
and a reference, and is listed by the CLI."""

import pytest

import test_diagnose  # noqa: F401  (their @covers marks)
import test_inits  # noqa: F401
import test_methods  # noqa: F401
import test_optimizers  # noqa: F401
import test_stabilizers  # noqa: F401
from stabench import cli
from stabench.inits import INITS
from stabench.methods import FIRES_BY, METHODS
from stabench.optimizers import OPTIMIZERS
from stabench.testing import check_init, check_method, check_optimizer

REGISTRIES = {"method": METHODS, "optimizer": OPTIMIZERS, "init": INITS}
# inits that need residual blocks run on the deep residual MLP (and fail on the plain one)
RESIDUAL_INITS = {"fixup", "skipinit", "rezero", "zero_init_residual"}
# methods that need a model with attention train on a small Transformer (stabench.testing.SMALL)
ON_TASK = {"attn_softcap": "listops"}


def built_in(registry) -> list[str]:
    """The registry's own entries: a plugin installed here is checked by its own tests."""
    return [e.name for e in registry.entries() if e.factory.__module__.startswith("stabench.")]


@pytest.mark.slow
@pytest.mark.parametrize("name", built_in(METHODS))
def test_every_method_conforms(digits_data, name):
    # a planted fault fires within the short run (its default step is past it, an error)
    task = ON_TASK.get(name, "digits")
    check_method(f"{name}(step=2)" if name in FIRES_BY else name,
                 digits_data if task == "digits" else None, task)


@pytest.mark.slow
@pytest.mark.parametrize("name", built_in(OPTIMIZERS))
def test_every_optimizer_conforms(digits_data, name):
    check_optimizer(name, digits_data)


@pytest.mark.slow
@pytest.mark.parametrize("name", built_in(INITS))
def test_every_init_conforms(digits_data, name):
    check_init(name, digits_data, residual=name in RESIDUAL_INITS)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_entry_has_help_and_reference_and_is_listed(kind, capsys):
    assert cli.main(["list", f"{kind}s"]) == 0
    out = capsys.readouterr().out
    for entry in REGISTRIES[kind].entries():
        assert entry.help and entry.ref, entry.name
        line = next(line for line in out.splitlines()
                    if line.startswith(entry.signature_text() + " "))
        assert entry.help in line and entry.ref in line
        if kind == "method":  # the stage says where in the step it acts
            assert f" {entry.meta['stage']}: {entry.help}" in line

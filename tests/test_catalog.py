"""Every method, optimizer and init trains in a compiled cell, has help and a reference, is listed
by the CLI, and has a test of its own against its definition."""

import numpy as np
import pytest

import test_diagnose  # noqa: F401  (their @covers marks)
import test_inits  # noqa: F401
import test_methods  # noqa: F401
import test_optimizers  # noqa: F401
from stabench import cli
from stabench.inits import INITS
from stabench.methods import FIRES_BY, METHODS, STAGES
from stabench.optimizers import OPTIMIZERS

from conftest import COVERED, catalog_spec, engine_for

REGISTRIES = {"method": METHODS, "optimizer": OPTIMIZERS, "init": INITS}
# inits that need residual blocks run on the deep residual MLP (and fail on the plain one)
RESIDUAL_INITS = {"fixup", "skipinit", "rezero", "zero_init_residual"}


def _train(spec, data):
    result = engine_for(spec, data).run(np.array([0]), np.array(spec.lrs))
    tel = result.telemetry
    assert result.diverged_at[0] == -1
    assert np.isfinite(tel["loss"]).all() and np.isfinite(tel["param_norm"]).all()
    assert np.nanmax(tel["update_norm"]) > 0  # the update moved the parameters
    assert np.isfinite(result.evals["test_accuracy"]).all()
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_in_a_compiled_cell(digits_data, name):
    # a planted fault fires within the short run (its default step is past it, an error)
    _train(catalog_spec(method=f"{name}(step=2)" if name in FIRES_BY else name), digits_data)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_trains_in_a_compiled_cell(digits_data, name):
    _train(catalog_spec(optimizer=name), digits_data)


@pytest.mark.slow
@pytest.mark.parametrize("name", INITS.names())
def test_every_init_trains_in_a_compiled_cell(digits_data, name):
    _train(catalog_spec(init=name, residual=name in RESIDUAL_INITS), digits_data)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_entry_has_a_definition_test(kind):
    missing = set(REGISTRIES[kind].names()) - COVERED[kind]
    assert not missing, f"{kind}s without a test against their definition: {sorted(missing)}"


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


def test_every_method_has_a_stage():
    assert all(e.meta.get("stage") in STAGES for e in METHODS.entries())

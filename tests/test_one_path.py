"""One path from a spec to its stored record (runner.store_cells), under the cell's lock, for
every command that trains: two of them started on one cell at once train it once."""

import itertools
import threading
import time

import numpy as np
import pytest

from conftest import tiny_spec

ENTRY_POINTS = ("run", "sweep", "diagnose", "search")


def _train_via(entry: str, spec, out: str):
    """The record `entry` leaves for `spec` in `out`, trained through that command's own code."""
    import stabench
    from stabench import executor, search
    from stabench.store import Store

    if entry == "run":
        return stabench.run(spec, out=out).record
    if entry == "sweep":
        outcome = executor.train_one(0, spec, Store(out), executor.DataCache(None), None)
        return Store(out).load(spec) if outcome.status == executor.BUSY else outcome
    if entry == "diagnose":
        stabench.diagnose(spec, out=out, results=None)
        return Store(out).load(spec)
    return search.train_batch(None, [spec], 1, Store(out))[0]


@pytest.mark.parametrize("first, second", list(itertools.combinations(ENTRY_POINTS, 2)))
def test_two_commands_on_one_cell_train_it_once(first, second, tmp_path, monkeypatch):
    from stabench import runner

    from test_reliability import stub_cell

    spec = tiny_spec("none", seeds=1, lrs=(0.1,))
    trained = []

    def slow_train(todo):
        trained.extend(s.hash for s in todo)
        time.sleep(0.5)  # long enough for the other command to arrive while this one trains
        return [stub_cell(s) for s in todo]

    real_store_cells = runner.store_cells
    monkeypatch.setattr(runner, "store_cells", lambda specs, store, train, *a, **k:
                        real_store_cells(specs, store, slow_train, *a, **k))
    monkeypatch.setattr(runner, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(runner, "diagnose_run", lambda *a, **k: None)
    errors = []

    def call(entry):
        try:
            _train_via(entry, spec, str(tmp_path))
        except Exception as err:  # noqa: BLE001  (reported below, with the entry that raised)
            errors.append(f"{entry}: {err!r}")

    threads = [threading.Thread(target=call, args=(entry,)) for entry in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert trained == [spec.hash]  # once, by whichever came first
    assert len(list(tmp_path.rglob("*.json"))) == 1
    from stabench.store import Store

    assert np.array_equal(Store(tmp_path).load(spec).telemetry()["loss"],
                          stub_cell(spec)[1]["loss"])

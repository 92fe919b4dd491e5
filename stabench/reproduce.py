"""Whether a retrained cell reproduces a stored one: bit for bit, within float32 rounding, or not.

On one host configuration (the facts in `numerics_facts`) a cell trains to the same bits in every
process, so there any difference is a real one. Where those facts differ, the programs round
differently: they start the same to within rounding and then, at high learning rates, training
amplifies a 1e-7 difference chaotically, so later steps are reported (largest difference, shifted
and changed divergences), not held to a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Step 0 runs one forward and backward pass from the same parameters and batch: two programs that
# differ only in the order of float32 sums agree there to a few hundred units in the last place
# (2^-23 = 1.2e-7 each), so 1e-4 (~840 ulps) bounds rounding; a change of code, data or spec moves
# the first step by far more.
FIRST_STEP_RTOL = 1e-4


def numerics_facts(body: dict) -> dict:
    """What decides a record's float32 rounding: the host's CPU and caches, JAX's versions,
    flags, backend, devices and intra-op threads, and how many runs were vmapped together."""
    facts = dict(body.get("provenance", {}).get("numerics", {}))
    timing = body.get("timing", {})
    facts["run_group"] = timing.get("run_group")
    facts["devices"] = timing.get("devices")
    # a search trains trials as the runs of one program, their methods' arguments traced
    facts["program_runs"] = timing.get("program_runs")
    return facts


@dataclass
class Reproduction:
    runs: int
    exact: bool
    within_rounding: bool
    facts_changed: dict = field(default_factory=dict)  # name -> (stored, now)
    max_rel_diff: float = 0.0  # over the telemetry and metrics of runs finite in both
    first_step_rel_diff: float = 0.0
    # runs that diverged in one only: chaotic runs whose outcome rounding decided
    outcome_changes: list[str] = field(default_factory=list)
    step_shifts: list[str] = field(default_factory=list)  # runs that diverged at other steps
    differences: list[str] = field(default_factory=list)  # what is not bit-identical

    @property
    def ok(self) -> bool:
        return self.exact or self.within_rounding

    def summary(self) -> list[str]:
        """The verdict and its evidence, one line each."""
        runs = self.runs
        if self.exact:
            return [f"reproduced exactly ({runs} runs: every metric equal, telemetry "
                    f"bit-identical)"]
        facts = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in
                          sorted(self.facts_changed.items())) or "none"
        lines = [("equal within rounding" if self.within_rounding else "NOT reproduced")
                 + f" ({runs} runs; what decides the rounding changed: {facts})",
                 f"first step: largest relative difference {self.first_step_rel_diff:.2g} "
                 f"(rounding allows {FIRST_STEP_RTOL:g})",
                 f"runs finite in both: largest relative difference {self.max_rel_diff:.2g}"]
        lines.append("diverged runs: " + ("; ".join(self.step_shifts) if self.step_shifts
                                          else "the same runs, at the same steps"))
        if self.outcome_changes:
            lines.append("runs whose outcome differs (at a chaotic learning rate rounding "
                         "decides it): " + "; ".join(self.outcome_changes))
        if not self.facts_changed:
            lines.append("the host configuration is the same, so nothing but a change of code, "
                         "data or spec explains a difference:")
            lines += self.differences[:20]
        return lines


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        return 0.0
    scale = np.maximum(np.abs(a[both]), np.abs(b[both]))
    diff = np.abs(a[both] - b[both])
    return float(np.max(np.where(scale > 0, diff / np.where(scale > 0, scale, 1), 0.0)))


def compare(stored: tuple[dict, dict], now: tuple[dict, dict]) -> Reproduction:
    """A cell's stored (record body, telemetry arrays) against a retraining's."""
    (old_body, old_arrays), (new_body, new_arrays) = stored, now
    differences = []
    for name, values in new_arrays.items():
        if name not in old_arrays:  # telemetry added since the record was trained (log_z)
            continue
        if not np.array_equal(np.asarray(values), old_arrays[name], equal_nan=True):
            differences.append(f"telemetry {name}: largest relative difference "
                               f"{_rel_diff(values, old_arrays[name]):.3g}")
    for i, (new, old) in enumerate(zip(new_body["runs"], old_body["runs"])):
        for key, value in new.items():
            if not (value == old[key] or (np.isnan(value) and np.isnan(old[key]))):
                differences.append(f"run {i} {key}: stored {old[key]!r}, now {value!r}")
    if not differences:
        return Reproduction(len(new_body["runs"]), exact=True, within_rounding=True)

    old_facts, new_facts = numerics_facts(old_body), numerics_facts(new_body)
    changed = {k: (old_facts.get(k), new_facts.get(k)) for k in sorted({*old_facts, *new_facts})
               if old_facts.get(k) != new_facts.get(k)}
    old_div, new_div = np.asarray(old_arrays["diverged_at"]), np.asarray(new_arrays["diverged_at"])
    outcome_changes, shifts, finite = [], [], []
    for i, (old, new) in enumerate(zip(old_body["runs"], new_body["runs"])):
        if bool(old["diverged"]) != bool(new["diverged"]):
            outcome_changes.append(f"run {i} (seed {old['seed']}, lr {old['lr']:g}): "
                                   f"{'diverged' if old['diverged'] else 'stayed finite'} in the "
                                   f"record, {'diverged' if new['diverged'] else 'stayed finite'}"
                                   " now")
        elif old["diverged"]:
            step_old, step_new = int(old["divergence_step"]), int(new["divergence_step"])
            if step_old != step_new or old_div[i] != new_div[i]:
                shifts.append(f"run {i} at step {step_old} in the record, {step_new} now "
                              f"({step_new - step_old:+d})")
        else:
            finite.append(i)
    first_step = max((_rel_diff(new_arrays[name][:, :1], old_arrays[name][:, :1])
                      for name in ("loss", "grad_norm", "update_norm", "param_norm")
                      if name in new_arrays), default=0.0)
    largest = 0.0
    if finite:
        largest = max(_rel_diff(np.asarray(v)[finite], np.asarray(old_arrays[k])[finite])
                      for k, v in new_arrays.items()
                      if np.ndim(v) >= 2 and len(v) == len(old_body["runs"]))
        largest = max(largest, *(_rel_diff(new_body["runs"][i][k], old_body["runs"][i][k])
                                 for i in finite for k in new_body["runs"][i]))
    return Reproduction(
        len(new_body["runs"]), exact=False,
        within_rounding=bool(changed) and first_step <= FIRST_STEP_RTOL,
        facts_changed=changed, max_rel_diff=largest, first_step_rel_diff=first_step,
        outcome_changes=outcome_changes, step_shifts=shifts, differences=differences)

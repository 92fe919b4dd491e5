"""Shared parts of the reproduction scripts (scripts/repro_*.py): run cells into a results store
through the public API, and write a Markdown report (setup, table, the paper's claim, whether it
held, wall time, hardware, package versions) beside a PNG figure.

Each script defines `evaluate(table) -> list[Check]` over the table it prints, so the verdict is
computed from the numbers the report shows (and a reader, or a test, can recompute it from them).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/repro_x.py` from a checkout imports its stabench
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from stabench.config import RunSpec  # noqa: E402
from stabench.metrics import UNBOUNDED, mean_ci, wilson  # noqa: E402
import stabench  # noqa: E402
from stabench.store import Record  # noqa: E402

DEFAULT_OUT = ROOT / "results" / "repro"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "pandas", "matplotlib", "seaborn")


@dataclass(frozen=True)
class Check:
    """One computed statement of the claim and whether the numbers bear it out."""

    text: str
    held: bool


# ---- the tests behind a verdict ------------------------------------------------------------------
ALPHA = 0.05
HELD, NOT_REPRODUCED = "held", "not reproduced at this scale"


def as_printed(p: float) -> float:
    """A p-value rounded as the report prints it (4 significant digits), so that the verdict a
    reader recomputes from the table is the one the script computed."""
    return p if math.isnan(p) else float(f"{p:.4g}")


def verdict_of(p: float, alpha: float = ALPHA) -> str:
    """The verdict of one test in the paper's direction: held only when it rejects at `alpha`;
    a test that could not be made (NaN) is not a reproduction."""
    return HELD if p < alpha else NOT_REPRODUCED


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact p-value against k1/n1 <= k2/n2 (small: the first rate is higher)."""
    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]],
                                    alternative="greater").pvalue)


def welch_less(a, b) -> float:
    """One-sided Welch t-test p-value against mean(a) >= mean(b) (small: a is lower); NaN when a
    sample has fewer than 2 values or a non-finite one, or both are constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    if a.var() == 0 and b.var() == 0:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)


def rate(k: int, n: int) -> str:
    """k/n with its 95% Wilson interval, as a table cell."""
    _, lo, hi = wilson(k, n)
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}]"


def mean_interval(x, digits: int = 3, bounds: tuple[float, float] = UNBOUNDED) -> str:
    """Mean over seeds with its 95% Student-t interval (cut to `bounds`), as a table cell."""
    m, lo, hi = mean_ci(x, bounds=bounds)
    return f"{m:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def checks_from(tests: pd.DataFrame) -> list[Check]:
    """One check per row of a tests table (columns claim, a, b, test, p): held when its
    one-sided p-value, as printed, is below ALPHA."""
    return [Check(f"{r['claim']}: {r['a']} vs {r['b']}; {r['test']} p = {fmt(r['p'])} -> "
                  f"{verdict_of(r['p'])}", verdict_of(r['p']) == HELD)
            for _, r in tests.iterrows()]


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"where NAME.md and NAME.png go (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--store", type=Path, default=None,
                   help="results store of the cells (default OUT/store); finished cells are reused")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long smoke version: 2 seeds, few steps, small models")
    return p


def spec(task: str, method: str = "none", init: str = "default", optimizer: str | None = None,
         seeds: int = 5, lrs=(0.1,), **overrides) -> RunSpec:
    """A validated cell; overrides use the task file's dotted keys with '__' for '.'
    (model__depth=20 sets model.depth)."""
    return stabench.spec(task, method, init, optimizer, seeds=seeds, lrs=tuple(lrs),
                         overrides={k.replace("__", "."): v for k, v in overrides.items()})


def start(doc: str, argv, config, specs):
    """A script's common opening: parse its command line, build its configuration (tiny or full)
    and cells, and train or load them. Returns args, config, start time, cells, records and how
    many cells were trained now."""
    args = parser(doc).parse_args(argv)
    c = config(args.tiny)
    t0 = time.perf_counter()
    cells = specs(c)
    records, trained = run_cells(cells, args.store or args.out / "store")
    return args, c, t0, cells, records, trained


def run_cells(specs: list[RunSpec], store_dir: Path, log=print) -> tuple[list[Record], int]:
    """Each cell's record, trained now or loaded from the store; also how many were trained."""
    records, trained = [], 0
    for i, s in enumerate(specs, 1):
        t0 = time.perf_counter()
        result = stabench.run(s, out=store_dir)
        if result.trained:
            trained += 1
            log(f"[{i}/{len(specs)}] {s.task} {s.method} {s.init} "
                f"{model_args(s)}: {time.perf_counter() - t0:.1f} s")
        records.append(result.record)
    return records, trained


def model_args(s: RunSpec) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(s.task_config["model"].items()) if k != "name")


def frame(records: list[Record]) -> pd.DataFrame:
    """One row per run (the leaderboard's run table: spec fields as config.*, metrics,
    init_loss)."""
    return stabench.runs(records)


def cell_seconds(records: list[Record]) -> float:
    return sum(r.data["timing"][k] for r in records for k in ("compile_s", "init_s", "steady_s"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    import jax

    return (f"{cpu_model()}, {os.cpu_count()} cores; JAX backend {jax.default_backend()} "
            f"({jax.devices()[0].device_kind})")


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in PACKAGES:
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    return ", ".join(out)


def fmt(x) -> str:
    """A table cell: 4 significant digits for floats (inf and nan spelled out), text as is."""
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.4g}"
    return str(x)


def to_markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def parse_value(text: str):
    text = text.strip()
    if text in ("yes", "no"):
        return text == "yes"
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def parse_markdown_table(text: str, after: str) -> pd.DataFrame:
    """The first Markdown table after the line starting with `after` (values parsed back as
    numbers or yes/no where they are)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    return pd.DataFrame([[parse_value(c) for c in row] for row in body], columns=header)


TABLE_HEADING = "## Results"
VERDICT = "**Claim held: "


def verdict(checks: list[Check]) -> bool:
    return all(c.held for c in checks)


def write_report(out: Path, name: str, *, command: str, title: str, paper: str, claim: str,
                 setup: list[str], table: pd.DataFrame, checks: list[Check], wall_s: float,
                 trained: int,
                 records: list[Record], figure: Path, notes: list[str] = (),
                 extra: str = "") -> Path:
    """results/repro/NAME.md: setup, the table, the claim and each computed check, provenance."""
    lines = [f"# {title}", "", f"Paper: {paper}", "", "## Setup", "",
             *[f"- {s}" for s in setup], "",
             f"Command: `{command}`", "",
             TABLE_HEADING, "", to_markdown(table), "", *( [extra, ""] if extra else []),
             f"![{name}]({figure.name})", "",
             "## Claim", "", f"> {claim}", "",
             *[f"- [{'x' if c.held else ' '}] {c.text}" for c in checks], "",
             f"{VERDICT}{'yes' if verdict(checks) else 'no'}** (every check above, computed from "
             "the table)", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Run", "",
              f"- Wall time: {wall_s:.0f} s ({len(records)} cells, {trained} trained now, "
              f"{len(records) - trained} loaded from the store)",
              f"- The cells' own time when they were trained (compile, init, training and "
              f"evaluation, from their records): {cell_seconds(records):.0f} s",
              f"- Hardware: {hardware()}",
              f"- Versions: {versions()}", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def command(script: str, tiny: bool) -> str:
    return f"python scripts/{Path(script).name}{' --tiny' if tiny else ''}"


def read_verdict(text: str) -> bool:
    line = next(x for x in text.splitlines() if x.startswith(VERDICT))
    return line[len(VERDICT):].startswith("yes")


def save_figure(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path

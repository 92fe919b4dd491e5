"""Paper tables: display labels, escaping, number formats, bold only among entries that learned, and
every emitted .tex compiled with a real pdflatex in a one-column article (1 in margins, 10pt) with
no table wider than the text."""

import math
import re
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from stabench import paper
from stabench.inits import INITS
from stabench.methods import METHODS
from stabench.reports import write_report
from stabench.store import Store

PDFLATEX = shutil.which("pdflatex")
needs_tex = pytest.mark.skipif(
    PDFLATEX is None, reason="pdflatex not found: install Debian's texlive-latex-base, "
    "texlive-latex-recommended and texlive-science (siunitx) to compile the tables")
PREAMBLE = (r"\documentclass[10pt]{article}" "\n" r"\usepackage[margin=1in]{geometry}" "\n"
            r"\usepackage{booktabs}" "\n" r"\usepackage{siunitx}" "\n")


def compile_tex(directory, body: str) -> str:
    """Compile a document of `body` in `directory`; returns its log, failing on a TeX error."""
    (directory / "doc.tex").write_text(PREAMBLE + "\\begin{document}\n" + body
                                       + "\n\\end{document}\n")
    run = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                         cwd=directory, capture_output=True, text=True, timeout=120)
    log = (directory / "doc.log").read_text(errors="replace")
    assert run.returncode == 0, "\n".join(line for line in log.splitlines()
                                          if line.startswith("!"))
    return log


def overfull(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]


# ---- labels and text -----------------------------------------------------------------------------
def test_display_labels_are_registered_with_the_method():
    assert METHODS.label("clip_norm(max_norm=0.5)") == "clip-norm (0.5)"
    assert METHODS.label("agc(clip=0.01, eps=0.001)") == "AGC (0.01)"
    assert METHODS.label("warmup_frac(fraction=0.1)") == "warmup 10%"
    assert METHODS.label("warmup(steps=100, shape='linear')+clip_norm(max_norm=1.0)") == (
        "warmup 100 steps + clip-norm (1)")
    assert METHODS.label("warmup(steps=50, shape='cosine')") == "warmup 50 steps (cosine)"
    # no label registered: the name and the arguments that differ from the defaults
    assert INITS.label("normal(std=0.5)") == "normal (std=0.5)"
    assert INITS.label("normal") == "normal"
    # a method no loaded module registers (a plugin's) keeps what was written
    assert METHODS.label("adagc(beta=0.9)") == "adagc (beta=0.9)"
    # a tuned entry: its family's words, without the settings it was chosen among
    assert METHODS.label("clip_norm tuned") == "clip-norm tuned"
    assert METHODS.label("warmup_frac tuned") == "warmup tuned"
    assert METHODS.label("warmup+clip_norm tuned") == "warmup + clip-norm tuned"


def test_labels_that_coincide_are_told_apart_by_their_spec():
    entries = pd.DataFrame({"method": ["agc(clip=0.01, eps=0.001)", "agc(clip=0.01, eps=0.1)",
                                       "none", "none"],
                            "init": ["default", "default", "default", "he_normal"],
                            "optimizer": ["sgd"] * 4})
    names = paper.entry_names(entries)
    assert list(names.columns) == ["method", "init"]
    assert names["method"].tolist() == ["AGC (0.01) [agc(clip=0.01, eps=0.001)]",
                                        "AGC (0.01) [agc(clip=0.01, eps=0.1)]", "none", "none"]


def test_escaping_leaves_no_special_character_and_code_keeps_straight_quotes():
    assert paper.escape_latex("a_b 50% & {c} #1 $x ~ ^") == (
        r"a\_b 50\% \& \{c\} \#1 \$x \textasciitilde{} \textasciicircum{}")
    assert paper.escape_latex("n ≥ 3 × 2, α †") == r"n $\geq$ 3 $\times$ 2, $\alpha$ $^{\dagger}$"
    code = paper.code_latex("warmup(shape='linear')")
    assert "'" not in code and code.count(r"{\char13}") == 2


def test_a_column_shows_one_number_of_decimals():
    col = paper.Column(("x",), [paper.Cell(v) for v in (12.34, 0.5, 0.0123, math.nan, math.inf)],
                       digits=3)
    # 3 significant digits of the largest, 12.34: one decimal for every value
    assert [col.text(c.value) for c in col.cells] == ["12.3", "0.5", "0.0", "-", "inf"]
    each = paper.Column(("lr",), [paper.Cell(v) for v in (0.003, 3.0, 1e-5)], each=True)
    assert [each.number(c.value) for c in each.cells] == ["0.003", "3", "1e-5"]
    assert paper._table_format(["0.003", "3", "1e-5", "-12.5"]) == "-2.3e-1"


# ---- bold ----------------------------------------------------------------------------------------
def board(stability, lr_sensitivity, diverged):
    n = len(stability)
    return pd.DataFrame({
        "method": [f"clip_norm(max_norm={i + 1}.0)" for i in range(n)], "init": "default",
        "optimizer": "sgd", "stability": stability,
        "stability_seeds": [np.array([s, s]) for s in stability],
        "quality_metric": "test_accuracy", "quality_mode": "max",
        "quality_mean": [0.5] * n, "quality_lo": [0.4] * n, "quality_hi": [0.6] * n,
        "diverged_rate": diverged, "diverged_lo": [0.0] * n, "diverged_hi": [0.5] * n,
        "lr_sensitivity": lr_sensitivity, "best_lr": [0.1] * n, "max_stable_lr": [1.0] * n,
        "steps_to_target": [math.inf] * n, "rank": range(1, n + 1)})


RUNS = pd.DataFrame({"target_value": [0.9], "seed": [0], "lr": [0.1], "steps": [30]})


def test_bold_goes_only_to_entries_that_learned():
    # the first entry learned nothing (stability 0): it has the lowest LR sensitivity and the
    # fewest divergences, yet neither is bold; among the others the best is
    table, _ = paper.task_tables("t", board([0.0, 0.9, 0.5], [0.01, 0.3, 0.2], [0.0, 0.4, 0.2]),
                                 RUNS)
    cols = {" ".join(c.header): c for c in table.columns}
    assert [c.bold for c in cols["LR sensitivity"].cells] == [False, False, True]
    assert [c.bold for c in cols["diverged"].cells] == [False, False, True]
    assert [c.bold for c in cols["stability"].cells] == [False, True, False]
    # nobody learned: no bold at all
    table, _ = paper.task_tables("t", board([0.0, 0.0], [0.1, 0.2], [0.0, 0.5]), RUNS)
    assert not any(c.bold for col in table.columns for c in col.cells)


def test_task_tables_hold_at_most_seven_columns_and_the_rest_in_the_appendix():
    b = board([0.2, 0.9], [0.1, 0.3], [0.0, 0.4]).assign(stable_width=[1.0, 2.0],
                                                           clipped_share=[0.1, 0.2])
    main, appendix = paper.task_tables("t", b, RUNS)
    assert len(main.columns) == paper.TASK_COLUMNS == 7
    assert [c.header for c in appendix.columns] == [("rank",), ("stable", "width"),
                                                    ("clipped", "share")]


# ---- compiled -----------------------------------------------------------------------------------
def wide_tables(n_variants=8, n_methods=12):
    """Leaderboards of n_methods entries on n_variants task variants with long names and labels."""
    rng = np.random.default_rng(0)
    methods = ["none", "clip_norm(max_norm=1.0)", "clip_value(limit=1.0)", "agc(clip=0.01)",
               "zclip(z=2.5)", "autoclip(percentile=10.0)", "warmup_frac(fraction=0.05)",
               "warmup(steps=100)+clip_norm(max_norm=1.0)", "clip_block_rms(threshold=1.0)",
               "lars(trust=0.001)", "grad_noise(eta=0.01)", "skip_nonfinite(max_skips=10)"]
    methods = methods[:n_methods]
    variants = [f"temporal_order[seq_len={10 * (i + 1)},steps={100 * (i + 1)}]"
                for i in range(n_variants)]
    boards = {}
    for v in variants:
        seeds = rng.uniform(0, 1, (len(methods), 5))
        acc = rng.uniform(0.3, 0.99, len(methods))
        boards[v] = pd.DataFrame({
            "method": methods, "init": "default", "optimizer": "sgd(momentum=0.9)",
            "stability": seeds.mean(1), "stability_seeds": list(seeds),
            "quality_metric": "test_accuracy", "quality_mode": "max", "quality_mean": acc,
            "quality_lo": acc - 0.05, "quality_hi": np.minimum(acc + 0.05, 1)})
    overall = pd.DataFrame({"method": methods, "init": "default", "optimizer": "sgd(momentum=0.9)",
                            "tasks": n_variants, "profile_score": rng.uniform(0, 1, len(methods)),
                            "stability": np.mean([b["stability"] for b in boards.values()], 0)})
    used = pd.DataFrame({"variant": variants, "task": "temporal_order"})
    return SimpleNamespace(boards=boards, overall=overall, used=used)


def caption_fits_three_lines(caption: str) -> bool:
    # a 10pt line of the text width holds about 90 characters, "Table 1: " included
    return len(paper.escape_latex(caption)) <= 3 * 90 - 10 or len(caption) <= 3 * 90 - 10


@needs_tex
@pytest.mark.parametrize("metric", paper.MAIN_METRICS)
@pytest.mark.parametrize("interval", paper.INTERVALS)
def test_main_table_of_8_tasks_and_12_methods_fits_the_text_width(tmp_path, metric, interval):
    tables = wide_tables()
    main = paper.main_table(tables, tables.overall, metric, complete=True)
    tex = paper.main_latex(main, interval)
    # one block: neither form of the interval fits 9 columns, so the compact notation, read out
    # in the caption; the task is named once over its 8 columns
    assert tex.count(r"\begin{tabular}") == 1 and r"\resizebox" not in tex
    assert "uncertainty-mode=compact" in tex
    assert r"\multicolumn{8}{c}{temporal order (seq len/steps)}" in tex
    (tmp_path / "main.tex").write_text(tex)
    log = compile_tex(tmp_path, r"\input{main.tex}")
    assert max(overfull(log), default=0.0) <= 1.0
    caption = re.search(r"\\caption\{(.*)\}", tex)[1]
    assert "0.97(2)" in caption and caption_fits_three_lines(caption)


@needs_tex
def test_a_main_table_that_fits_keeps_the_chosen_interval_style(tmp_path):
    tables = wide_tables(n_variants=2, n_methods=4)
    main = paper.main_table(tables, tables.overall, "stability", complete=True)
    tex = paper.main_latex(main, "brackets")
    assert tex.count(r"\begin{tabular}") == 1 and "compact" not in tex and r"@{\,[}" in tex
    (tmp_path / "main.tex").write_text(tex)
    assert max(overfull(compile_tex(tmp_path, r"\input{main.tex}")), default=0.0) <= 1.0


def test_compact_notation_gives_the_larger_half_width_in_units_of_the_last_digit():
    col = paper.Column(("x",), [paper.Cell(0.97, 0.955, 0.99), paper.Cell(0.5, 0.2, 0.6),
                                paper.Cell(0.4), paper.Cell(math.nan, 0.1, 0.2)], decimals=2)
    assert [paper._compact(col, c) for c in col.cells] == ["0.97(2)", "0.50(30)", "0.40", None]
    assert paper._table_format(["0.97(2)", "0.50(30)", "0.40"]) == "1.2(2)"


def test_variants_of_one_task_share_a_heading_and_show_only_what_differs():
    variants = ["adding", "deep_plain[depth=2]", "deep_plain[depth=18]", "digits (fake data)",
                "temporal_order[seq_len=10,steps=100]", "temporal_order[seq_len=20,steps=200]"]
    assert paper.variant_headers(sorted(variants, key=paper._natural)) == [
        ("", ("adding",)), ("deep plain", ("depth 2",)), ("deep plain", ("depth 18",)),
        ("", ("digits", "fake data")),
        ("temporal order (seq len/steps)", ("10/100",)),
        ("temporal order (seq len/steps)", ("20/200",))]
    # shown alone (a partial table), a variant is its own column with its settings
    assert paper.variant_headers(["deep_plain[depth=2]"]) == [("", ("deep", "plain", "depth 2"))]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A report of hand-made records (tests/test_report.py's): three entries on digits, none and
    one more on another variant, so some entries did not run every task variant."""
    from test_report import fake_record, table_metrics, TABLE

    root = tmp_path_factory.mktemp("latex")
    store = Store(root)
    for method in TABLE:
        fake_record(store, method, metrics_fn=table_metrics(method))
    for method in ("none", "warmup(steps=10, shape='linear')"):  # none runs both variants
        fake_record(store, method, metrics_fn=table_metrics("none"),
                    overrides={"model.width": 16})
    write_report(root, root / "out", plots=False, warn=lambda m: None)
    return root / "out"


def test_report_writes_the_paper_tables(report_dir):
    names = {p.name for p in (report_dir / "tables").glob("*.tex")}
    assert {"main.tex", "definitions.tex", "entries.tex"} <= names
    assert any(n.startswith("task-") for n in names) and any(n.startswith("main-partial")
                                                             for n in names)
    markdown = (report_dir / "report.md").read_text()
    assert "## Main table" in markdown and "## Definitions" in markdown
    for path in (report_dir / "tables").glob("*.tex"):
        text = path.read_text()
        assert not re.search(r"'\w+'", text), path.name  # quoted code would come out curly
        for caption in re.findall(r"\\caption\{(.*)\}", text):
            assert caption_fits_three_lines(caption), path.name


@needs_tex
def test_every_emitted_tex_and_a_paper_compile_without_overfull_tables(report_dir, tmp_path):
    files = sorted((report_dir / "tables").glob("*.tex"))
    for path in files:
        shutil.copy(path, tmp_path / path.name)
        log = compile_tex(tmp_path, rf"\input{{{path.name}}}")
        assert max(overfull(log), default=0.0) <= 1.0, path.name
    shutil.copy(report_dir / "leaderboards.tex", tmp_path)
    log = compile_tex(tmp_path, r"\input{leaderboards.tex}")
    assert max(overfull(log), default=0.0) <= 1.0
    task = next(p.name for p in files if p.name.startswith("task-"))
    paper_body = (r"\section{Results}" "\nTable~\\ref{tab:main} shows the stability score.\n"
                  rf"\input{{main.tex}}\input{{{task}}}" "\n"
                  r"\section{Definitions}" "\n" r"\input{definitions.tex}")
    log = compile_tex(tmp_path, paper_body)
    assert max(overfull(log), default=0.0) <= 1.0
    assert (tmp_path / "doc.pdf").stat().st_size > 0

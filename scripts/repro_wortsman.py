"""Wortsman et al. 2023 in small form: warmup and qk-layernorm lower a Transformer's LR sensitivity,
and qk-layernorm keeps attention logits from growing at large learning rates.

A small pre-LN Transformer on generated ListOps, trained with Adam over a log grid of learning rates
from 1e-3 to 3e-1, with and without linear warmup (`warmup(...)`) and with and without LayerNorm
on queries and keys (`model.qk_norm`), 10 seeds each. LR sensitivity as the benchmark defines it
(`stabench.metrics.lr_sensitivity`: the mean over the grid of min(final loss, L0) minus the best
of those), per seed over that seed's own grid, compared by one-sided Welch tests. The largest
attention logit of each trained run is computed after training from its final parameters on a
fixed batch of held-out inputs (the engine does not record it).

    python scripts/repro_wortsman.py          # full (11 minutes on 2 cores shared with other jobs)
    python scripts/repro_wortsman.py --tiny   # smoke version (seconds)
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

import _repro
from _repro import Check
from stabench.config import build_cell, data_source, task_of
from stabench.metrics import lr_sensitivity, mean_ci
from stabench.process import prepare
from stabench.runner import cell_record, load_data, store_cells
from stabench.store import Store, atomic_write
from stabench.train import Engine

NAME = "wortsman2023"
PAPER = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
         "instabilities (ICLR 2024)")
CLAIM = ("Learning-rate warmup and qk-layernorm each lower the learning-rate sensitivity of "
         "Transformer training; without qk-layernorm the attention logits grow large at large "
         "learning rates, and qk-layernorm keeps them small.")
LOGIT_BATCH = 64  # held-out inputs the largest attention logit is taken over
LOGITS_DIR = "attention_logits"  # beside the records in the store: one JSON per cell


def config(tiny: bool) -> dict:
    if tiny:
        return dict(seeds=2, lrs=(1e-3, 1e-1), steps=20, eval_every=20, warmup=5, max_length=24,
                    min_length=8, n_train=200, n_test=50, dim=16, heads=2, depth=1, batch=16)
    # 4 variants x 6 rates x 10 seeds: 240 runs of 200 steps
    return dict(seeds=10, lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), steps=200,
                eval_every=200, warmup=50, max_length=32, min_length=8, n_train=5000,
                n_test=500, dim=32, heads=2, depth=2, batch=16)


def methods(c: dict) -> dict[str, str]:
    return {"no": "none", "yes": f"warmup(steps={c['warmup']})"}


def specs(c: dict) -> list:
    return [_repro.spec("listops", method, seeds=c["seeds"], lrs=c["lrs"],
                        dataset__max_length=c["max_length"], dataset__min_length=c["min_length"],
                        dataset__n_train=c["n_train"], dataset__n_test=c["n_test"],
                        model__dim=c["dim"], model__heads=c["heads"], model__depth=c["depth"],
                        model__qk_norm=qk, train__steps=c["steps"],
                        train__eval_every=c["eval_every"], train__batch_size=c["batch"])
            for method in methods(c).values() for qk in (False, True)]


def parameter_count(spec) -> int:
    """Parameters of the cell's model, from its abstract build (shapes only)."""
    cell = build_cell(spec, data_source(task_of(spec)))
    model = nnx.eval_shape(lambda: cell.build_model(nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ---- the largest attention logit, from a run's parameters --------------------------------------
def block_logits(block, z: jax.Array) -> jax.Array:
    """A Transformer block's attention logits [batch, heads, query, key] on its normalized input
    z, before the padding mask: the computation of `Block.attention` up to its softmax (a test
    checks the two agree)."""
    batch, length, _ = z.shape
    q, k, _ = jnp.split(block.qkv(z).reshape(batch, length, 3 * block.heads, -1), 3, axis=2)
    if block.q_norm is not None:
        q, k = block.q_norm(q), block.k_norm(k)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])


def max_attention_logit(model, x: jax.Array) -> jax.Array:
    """The largest |attention logit| over every block, head and pair of non-padding tokens of the
    inputs x [batch, length] (token 0 pads), as the model computes them."""
    mask = x != 0
    pairs = mask[:, None, :, None] & mask[:, None, None, :]
    h = model.embed(x)
    graphdef, stacked = nnx.split(model.blocks)
    peak = jnp.float32(0)
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        logits = block_logits(block, block.norm1(h))
        peak = jnp.maximum(peak, jnp.max(jnp.where(pairs, jnp.abs(logits), 0.0)))
        h = block(h, mask)
    return peak


class FinalEngine(Engine):
    """The engine, unchanged, keeping the carry its last chunk returned: the runs' final
    parameters, which its results do not include."""

    def compile(self, *args, **kwargs):
        init, chunk, seconds = super().compile(*args, **kwargs)

        def chunk_keeping(*chunk_args):
            out = chunk(*chunk_args)
            self.final = out[0]
            return out

        return init, chunk_keeping, seconds


def train_measuring(spec):
    """Train a cell as the runner does (the same engine and compiled programs); returns its
    CellResult and each run's largest attention logit at initialization and after training, on
    the first LOGIT_BATCH held-out inputs."""
    data = load_data(spec)
    engine = FinalEngine(build_cell(spec, data_source(task_of(spec))), data)
    seeds, lrs = (np.array(v) for v in zip(*spec.runs))
    result = engine.run(seeds, lrs)
    program, x = engine.program, jnp.asarray(data.x_test[:LOGIT_BATCH])

    @jax.jit
    def final(params, model_state):
        return max_attention_logit(nnx.merge(program.graphdef, params, model_state), x)

    def first_batch(seed):
        idx = engine.batch_indices(np.array([seed]), 0)[0, 0]
        return program.inputs(engine.arrays["x_train"][idx], engine.arrays)

    carry = engine.final
    pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    return result, {
        "initial": [float(max_attention_logit(program.initial_model(int(s), first_batch(int(s))),
                                              x)) for s in seeds],
        "final": [float(final(pick(carry.params, i), pick(carry.model_state, i)))
                  for i in range(len(seeds))]}


def run_measured(specs, store_dir, log=print):
    """Each cell's record and its runs' attention logits. A cell not stored yet is trained once,
    through the runner's one path to a record (`store_cells`), and measured from that training;
    a cell stored without its logits is trained again for them (the same program: its loss
    curves are compared with the record's). Returns records, logits per cell, cells trained."""
    prepare()
    store, folder = Store(store_dir), store_dir / LOGITS_DIR

    def save(spec, logits):
        atomic_write(folder / f"{spec.hash}.json", json.dumps(logits).encode())

    def train(todo):
        out = []
        for spec in todo:
            t0 = time.perf_counter()
            result, logits = train_measuring(spec)
            save(spec, {**logits, "same_as_record": True})
            out.append(cell_record(spec, result))
            log(f"{spec.method} qk_norm={spec.task_config['model']['qk_norm']}: "
                f"{time.perf_counter() - t0:.1f} s")
        return out

    folder.mkdir(parents=True, exist_ok=True)
    stored = store_cells(specs, store, train)
    for spec, done in zip(specs, stored):
        if not (folder / f"{spec.hash}.json").exists():
            result, logits = train_measuring(spec)
            same = np.array_equal(result.telemetry["loss"], done.record.telemetry()["loss"],
                                  equal_nan=True)
            save(spec, {**logits, "same_as_record": bool(same)})
    logits = {s.hash: json.loads((folder / f"{s.hash}.json").read_text()) for s in specs}
    return [d.record for d in stored], logits, sum(d.status == "trained" for d in stored)


def logit_frame(specs, logits) -> pd.DataFrame:
    """One row per run: variant, seed, lr and its largest attention logit before and after
    training."""
    rows = []
    for spec in specs:
        for i, (seed, lr) in enumerate(spec.runs):
            rows.append({"warmup": "no" if spec.method == "none" else "yes",
                         "qk_norm": "yes" if spec.task_config["model"]["qk_norm"] else "no",
                         "seed": seed, "lr": lr, "logit_initial": logits[spec.hash]["initial"][i],
                         "logit_final": logits[spec.hash]["final"][i]})
    return pd.DataFrame(rows)


def with_variant(runs: pd.DataFrame) -> pd.DataFrame:
    # the stored method is canonical (every argument spelled out): warmup(steps=.., shape=..)
    return runs.assign(warmup=runs["method"].str.startswith("warmup(").map({True: "yes",
                                                                            False: "no"}),
                       qk_norm=runs["config.model.qk_norm"].map({True: "yes", False: "no"}),
                       capped=np.minimum(runs["final_train_loss"], runs["init_loss"]))


def table_from(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (warm, qk), g in runs.groupby(["warmup", "qk_norm"], sort=True):
        per_lr = g.groupby("lr")["capped"].mean()
        stable = g.groupby("lr")["diverged"].max() == 0
        rows.append({
            "warmup": warm, "qk_norm": qk,
            "LR sensitivity": lr_sensitivity(g["lr"], g["final_train_loss"], g["init_loss"]),
            "best final loss": float(per_lr.min()), "best lr": float(per_lr.idxmin()),
            "diverged": int(g["diverged"].sum()), "runs": len(g),
            "max stable lr": float(stable[stable].index.max()) if stable.any() else float("nan"),
            "best test acc": float(g.groupby("lr")["test_accuracy"].mean().max()),
        })
    return pd.DataFrame(rows)


def per_seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant and seed: LR sensitivity over that seed's own grid, and log10 of the
    largest attention logit at the smallest and at the largest learning rate."""
    lo, hi = runs["lr"].min(), runs["lr"].max()
    rows = []
    for (warm, qk, seed), g in runs.groupby(["warmup", "qk_norm", "seed"], sort=True):
        at = g.set_index("lr")["logit_final"]
        rows.append({"warmup": warm, "qk_norm": qk, "seed": seed,
                     "sensitivity": lr_sensitivity(g["lr"], g["final_train_loss"],
                                                   g["init_loss"]),
                     "log_logit_low": math.log10(at[lo]), "log_logit_high": math.log10(at[hi])})
    return pd.DataFrame(rows)


def geometric(log10s) -> str:
    """10 ** (mean of log10 values) with its 95% t interval, as a table cell."""
    m, a, b = mean_ci(log10s)
    return f"{10 ** m:.3g} [{10 ** a:.3g}, {10 ** b:.3g}]"


def tests_from(per_seed: pd.DataFrame, top_lr: float, low_lr: float) -> pd.DataFrame:
    """The claim's tests over seeds, each a one-sided Welch t-test in the paper's direction:
    warmup, and qk-layernorm, each lower the LR sensitivity (with the other off and on); without
    qk-layernorm the largest attention logit is higher at the top of the grid than at its bottom;
    qk-layernorm lowers it at the top (logits compared on a log scale)."""
    def sel(warm, qk, col):
        return per_seed.loc[(per_seed["warmup"] == warm) & (per_seed["qk_norm"] == qk), col]

    rows = []

    def add(claim, a, b, a_label, b_label, cell):
        p = _repro.as_printed(_repro.welch_less(a, b))
        rows.append({"claim": claim, "a": f"{a_label} {cell(a)}", "b": f"{b_label} {cell(b)}",
                     "test": "Welch t, one-sided", "p": p, "verdict": _repro.verdict_of(p)})

    def sens(x):  # an LR sensitivity is never negative
        return _repro.mean_interval(x, bounds=(0.0, math.inf))

    for qk in ("no", "yes"):
        add(f"warmup lowers LR sensitivity, qk_norm {qk}", sel("yes", qk, "sensitivity"),
            sel("no", qk, "sensitivity"), "warmup", "none", sens)
    for warm in ("no", "yes"):
        add(f"qk-layernorm lowers LR sensitivity, warmup {warm}", sel(warm, "yes", "sensitivity"),
            sel(warm, "no", "sensitivity"), "qk_norm", "none", sens)
    add(f"without qk-layernorm or warmup the largest attention logit grows with the learning "
        f"rate (lr {low_lr:g} vs {top_lr:g})", sel("no", "no", "log_logit_low"),
        sel("no", "no", "log_logit_high"), f"lr {low_lr:g}", f"lr {top_lr:g}", geometric)
    for warm in ("no", "yes"):
        add(f"qk-layernorm lowers the largest attention logit at lr {top_lr:g}, warmup {warm}",
            sel(warm, "yes", "log_logit_high"), sel(warm, "no", "log_logit_high"), "qk_norm",
            "none", geometric)
    return pd.DataFrame(rows)


def evaluate(tests: pd.DataFrame) -> list[Check]:
    return _repro.checks_from(tests)


def per_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant and learning rate over seeds: min(final training loss, L0) (mean and 95% t
    interval), diverged runs (95% Wilson interval), the largest attention logit at init and
    after training (geometric means)."""
    rows = []
    for (warm, qk, lr), g in runs.groupby(["warmup", "qk_norm", "lr"], sort=True):
        rows.append({"warmup": warm, "qk_norm": qk, "lr": lr,
                     "min(final loss, L0)": _repro.mean_interval(g["capped"]),
                     "diverged": _repro.rate(int(g["diverged"].sum()), len(g)),
                     "max logit at init": geometric(np.log10(g["logit_initial"])),
                     "max logit trained": geometric(np.log10(g["logit_final"]))})
    return pd.DataFrame(rows)


def figure(runs: pd.DataFrame):
    import seaborn as sns
    from matplotlib.figure import Figure

    runs = runs.assign(variant="warmup " + runs["warmup"] + ", qk_norm " + runs["qk_norm"])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for ax, col, label in [(ax1, "capped", "final training loss, capped at L0 (diverged = L0)"),
                           (ax2, "logit_final", "largest |attention logit| after training")]:
        sns.lineplot(data=runs, x="lr", y=col, hue="variant", style="variant", markers=True,
                     dashes=True, errorbar=("ci", 95), palette="colorblind", ax=ax,
                     legend=ax is ax1)
        sns.scatterplot(data=runs, x="lr", y=col, hue="variant", palette="colorblind", ax=ax,
                        alpha=0.35, s=14, legend=False)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (Adam)")
        ax.set_ylabel(label)
    ax2.set_yscale("log")
    ax1.legend(frameon=False, fontsize="small")
    fig.suptitle("ListOps, small pre-LN Transformer: mean and 95% CI over seeds, seeds as dots",
                 fontsize="medium")
    return fig


def main(argv=None) -> bool:
    args = _repro.parser(__doc__).parse_args(argv)
    c = config(args.tiny)
    t0 = time.perf_counter()
    cells = specs(c)
    records, logits, trained = run_measured(cells, args.store or args.out / "store")
    runs = with_variant(_repro.frame(records)).merge(
        logit_frame(cells, logits), on=["warmup", "qk_norm", "seed", "lr"], validate="1:1")
    tests = tests_from(per_seed_table(runs), max(c["lrs"]), min(c["lrs"]))
    checks = evaluate(tests)
    path = _repro.save_figure(figure(runs), args.out, NAME)
    n_plain, n_qk = (parameter_count(s) for s in cells[:2])
    retrained = [s for s in cells if not logits[s.hash]["same_as_record"]]
    _repro.write_report(
        args.out, NAME, command=_repro.command(__file__, args.tiny),
        title="Warmup and qk-layernorm vs LR sensitivity (Wortsman et al. 2023)",
        paper=PAPER, claim=CLAIM,
        setup=[f"Task `listops` (generated; expressions of {c['min_length']}-{c['max_length']} "
               f"tokens, {c['n_train']} training and {c['n_test']} held-out examples)",
               f"Model `transformer`: pre-LN encoder, dim {c['dim']}, depth {c['depth']}, "
               f"{c['heads']} heads, mean pooling; {n_plain} parameters ({n_qk} with qk_norm, "
               "LayerNorm on queries and keys per head)",
               f"Optimizer `adam`, batch {c['batch']}, {c['steps']} steps, learning rates "
               f"{', '.join(f'{x:g}' for x in c['lrs'])}, {c['seeds']} seeds each",
               f"Warmup: `{methods(c)['yes']}` (linear, from 0) vs `none`",
               "LR sensitivity: `stabench.metrics.lr_sensitivity` (the leaderboard's column: mean "
               "over the grid of min(final training loss, L0) minus its minimum over the grid; "
               "final loss = mean of the last 20 training batches, L0 = loss before any update), "
               "computed per seed over that seed's own grid",
               f"Largest attention logit: max |q.k/sqrt(d)| over blocks, heads and non-padding "
               f"token pairs of the first {LOGIT_BATCH} held-out inputs, from each run's "
               "parameters at init and at the end of training (a diverged run's are those of "
               "its last finite step); compared on a log10 scale, shown as geometric means",
               f"Tests: one-sided Welch t-tests over seeds in the paper's direction, 95% "
               f"intervals in brackets. A row's verdict is '{_repro.HELD}' only when p < "
               f"{_repro.ALPHA}, else '{_repro.NOT_REPRODUCED}'; the claim holds when every row "
               "does (each row is its own hypothesis, so the conjunction needs no multiplicity "
               "correction)"],
        table=tests, checks=checks, wall_s=time.perf_counter() - t0, trained=trained,
        records=records, figure=path,
        extra="Per learning rate (seeds):\n\n" + _repro.to_markdown(per_lr_table(runs))
              + "\n\nPer variant, on seed means (the leaderboard's LR sensitivity; max stable "
                "lr: the largest rate with no diverged seed):\n\n"
              + _repro.to_markdown(table_from(runs)),
        notes=[f"Attention logits of {len(cells) - len(retrained)} of {len(cells)} cells come "
               "from the final parameters of the recorded runs (trained once, or trained again "
               "to loss curves identical to the record's)"
               + (f"; {len(retrained)} were trained again to loss curves that differ from their "
                  "records'" if retrained else "")])
    return _repro.verdict(checks)


if __name__ == "__main__":
    main()

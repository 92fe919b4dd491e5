"""Command line: parse, validate, call. Bad input exits 2 with one line; no traceback."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import signals
from .api import DEFAULT_OUT
from .registry import INT_LIMIT, UserError

MAX_WORKERS = 1024  # more processes than any host has cores


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _parse_set(items: list[str]) -> dict:
    from .tasks import parse_value

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = parse_value(value.strip(), f"--set {key.strip()}")
    return out


def _overrides(args) -> dict:
    """--set items plus --steps, --batch-size and --precision; checks --seeds where the command
    has it."""
    from .tasks import TRAIN_BOUNDS, positive_int

    overrides = _parse_set(args.set)
    if args.precision is not None:
        # a list is a grid axis in a sweep, as --set train.precision=bf16,fp16 is
        values = args.precision.split(",")
        value = values if len(values) > 1 else values[0]
        if overrides.get("train.precision", value) != value:
            raise UserError(f"--precision {args.precision} and --set train.precision="
                            f"{overrides['train.precision']} disagree: give one of them")
        overrides["train.precision"] = value
    for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size")):
        value = getattr(args, flag)
        if value is not None:
            option = f"--{flag.replace('_', '-')}"
            positive_int(option, value, TRAIN_BOUNDS.get(flag, INT_LIMIT))
            if overrides.get(key, value) != value:
                raise UserError(f"{option} {value} and --set {key}={overrides[key]} disagree: "
                                f"give one of them")
            overrides[key] = value
    seeds = getattr(args, "seeds", None)  # diagnose takes one --seed instead
    if seeds is not None:
        positive_int("--seeds", seeds, TRAIN_BOUNDS["seeds"])
    return overrides


def _spec_from_args(args):
    from .config import make_spec, parse_lrs

    overrides = _overrides(args)
    lrs = parse_lrs(args.lrs) if args.lrs is not None else None
    return make_spec(args.task, args.method, args.init, args.optimizer, args.seeds, lrs, overrides,
                     args.fake_data)


def print_record(record, reused: bool) -> None:
    from .leaderboard import lr_table, short_run_note

    spec, timing = record.spec, record.data["timing"]
    print(f"task {spec.task}{' (fake data)' if spec.fake_data else ''} | method {spec.method} | "
          f"init {spec.init} | optimizer {spec.optimizer} | {len(spec.seeds)} seeds x "
          f"{len(spec.lrs)} lrs | {spec.train['steps']} steps")
    print(lr_table(record.runs).to_string(index=False))
    if note := short_run_note(spec.train["steps"]):
        print(note)
    prov = record.data["provenance"]
    print(f"compile {timing['compile_s']:.2f} s | steady {timing['steady_s']:.2f} s (training "
          f"and evaluation) | {timing['samples_per_s']:,.0f} training samples/s | "
          f"{prov['device_count']}x {prov['device_kind']}")
    if reused:
        print(f"reused stored record {record.path} (trained {prov['date']}); --force retrains")
    else:
        print(f"record written to {record.path}")


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .api import run

    spec = _spec_from_args(args)
    steps = spec.train["steps"]
    bars = []  # made at the first chunk: a reused record shows none

    def progress(step: int) -> None:
        if not bars:
            bars.append(tqdm(total=steps, desc=f"{spec.task} {spec.method}", unit="step",
                             file=sys.stderr, leave=False))
        bars[0].update(step - bars[0].n)

    def waiting() -> None:
        print(f"another process is training this cell into {args.out}; waiting for it",
              file=sys.stderr)

    try:
        result = run(spec, out=args.out, force=args.force, data_dir=args.data_dir,
                     on_chunk=progress, on_wait=waiting)
    except KeyboardInterrupt:
        done = bars[0].n if bars else 0
        for bar in bars:  # before the message, which would otherwise follow the bar's line
            bar.close()
        print(f"interrupted at step {done} of {steps}: nothing of this cell was saved (records "
              f"are written whole or not at all); run the same command again to train it",
              file=sys.stderr)
        return 130
    for bar in bars:
        bar.close()
    print_record(result.record, reused=not result.trained)
    return 0


def cmd_rerun(args) -> int:
    from .api import rerun

    outcome = rerun(args.record, args.data_dir)
    lines = outcome.summary()
    print(f"{args.record}: {lines[0]}", *lines[1:], sep="\n")
    return 0 if outcome.ok else 1


def _sweep_from_args(args):
    """The sweep's plan: a suite, or lists given on the command line."""
    from .api import sweep_plan
    from .config import parse_lrs
    from .sweeps import parse_shard

    if args.suite:
        given = [f"--{f}" for f in ("task", "method", "init", "optimizer") if getattr(args, f)]
        if given:
            raise UserError(f"--suite names the tasks, methods, inits and optimizers; drop "
                            f"{', '.join(given)} or drop --suite")
    elif not args.task:
        raise UserError("give --suite NAME or at least one --task")
    return sweep_plan(args.suite, tasks=args.task or (), methods=args.method or ("none",),
                      inits=args.init or ("default",), optimizers=args.optimizer or (None,),
                      seeds=args.seeds, lrs=parse_lrs(args.lrs) if args.lrs is not None else None,
                      overrides=_overrides(args), fake_data=args.fake_data, search=args.search,
                      out=args.out,
                      shard=parse_shard(args.shard) if args.shard is not None else None)


def cmd_sweep(args) -> int:
    from .api import run_plan
    from .executor import Progress, SweepInterrupted, cell_label
    from .store import Store
    from .sweeps import Optuna, parse_search
    from .tasks import positive_int

    if args.workers is not None:
        positive_int("--workers", args.workers, MAX_WORKERS)
    plan = _sweep_from_args(args)
    search = parse_search(plan.spec.search)
    if isinstance(search, Optuna):
        return _optuna_sweep(args, plan.spec, search, plan.out)
    cells, out = plan.cells, plan.out
    if args.dry_run:
        store = Store(out)
        for cell in cells:
            record, unusable = store.lookup(cell)
            state = "stored" if record is not None else "to train"
            why = f" (retrains: {unusable})" if unusable else ""
            print(f"{state:9s} {cell_label(cell)} | {len(cell.seeds)} seeds x {len(cell.lrs)} lrs"
                  f" | {cell.train['steps']} steps{why}")
        print(f"{len(cells)} cells; results in {out}")
        return 0
    try:
        summary = run_plan(plan, args.workers, args.executor, args.address, args.data_dir,
                           Progress(), warn=lambda message: print(message, file=sys.stderr))
    except SweepInterrupted as stop:
        stored = sum(Store(out).load(cell) is not None for cell in cells)
        print(f"interrupted: {stored} of {len(cells)} cells are stored in {out} "
              f"({stop.summary.trained} trained by this run); the cells in flight were discarded, "
              f"nothing partial was written. Resume with the same command:\n"
              f"  python -m stabench {shlex.join(args.argv)}", file=sys.stderr)
        return 130
    print("\n".join(summary.lines(out)))
    return 1 if summary.failed else 0


def _optuna_sweep(args, spec, search, out: str) -> int:
    """A Bayesian search: its trials depend on each other, so they train in this process."""
    from .search import run_search, studies

    for flag, given in (("--shard", args.shard is not None),
                        ("--executor ray", args.executor == "ray"),
                        ("--workers", args.workers), ("--address", args.address)):
        if given:
            raise UserError(f"{flag} does not apply to --search optuna: a study asks each batch "
                            f"of trials from the results of the last, in this process")
    if args.dry_run:
        found = studies(spec, search)
        for study in found:
            dims = ", ".join(name for name, _, _ in study.dims) or "nothing (one cell)"
            print(f"study {study.label()} | searches {dims}")
        searched = sum(bool(study.dims) for study in found)
        sizes = [f"{searched} of {search.n} trials"] * bool(searched) + \
            [f"{len(found) - searched} of one cell"] * bool(len(found) - searched)
        print(f"{len(found)} {'study' if len(found) == 1 else 'studies'}: {', '.join(sizes)}; "
              f"{search.batch} trials per compiled batch; results in {out}")
        return 0
    run_search(spec, search, out, args.data_dir)
    return 0


def cmd_report(args) -> int:
    from .reports import write_report

    markdown = write_report(args.directory, args.out, plots=not args.no_plots,
                            warn=lambda m: print(m, file=sys.stderr),
                            main_metric=args.main_metric, interval=args.interval)
    print(markdown)
    print(f"report written to {args.out or args.directory}: report.md, leaderboards.tex, "
          f"tables/*.tex (main, per task, appendix, definitions), "
          f"leaderboard.csv, overall.csv, runs.parquet"
          f"{', plots/' if not args.no_plots else ''}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from .store import merge

    copied, present, bad = merge(args.out, args.sources)
    for message in bad:
        print(f"skipped {message}", file=sys.stderr)
    for source in args.sources:  # a shard with no cells, or a mistyped directory
        if not any(Path(source).rglob("*.json")):
            print(f"note: {source} holds no records", file=sys.stderr)
    print(f"merged into {args.out}: {copied} records copied, {present} already there, "
          f"{len(bad)} skipped")
    return 0


def _diagnose_spec(args):
    """The one-run cell `diagnose --task ...` trains: the task's middle learning rate by default."""
    from .api import diagnosis_spec
    from .config import parse_lrs

    lrs = parse_lrs(args.lr, "--lr") if args.lr is not None else None
    if lrs is not None and len(lrs) != 1:
        raise UserError(f"--lr takes one learning rate, got '{args.lr}'")
    if not 0 <= args.seed <= INT_LIMIT:  # the engine's seeds are int32
        raise UserError(f"--seed must be >= 0 and at most {INT_LIMIT:,}, got {args.seed}")
    return diagnosis_spec(args.task, args.method or "none", args.init or "default",
                          args.optimizer, seed=args.seed, lr=lrs[0] if lrs else None,
                          at_init=args.at_init, overrides=_overrides(args),
                          fake_data=args.fake_data)


def cmd_diagnose(args) -> int:
    from .store import tidy_dirs

    if not args.report:
        return _diagnose(args)
    with tidy_dirs(args.report):  # made before the record's --run is checked
        return _diagnose(args)


def _diagnose(args) -> int:
    from .data import DataMissing
    from .plots import diagnosis_figure
    from .reports import save_png
    from .runner import TRAINED, diagnose_run, load_data, train_and_store, train_spec
    from .store import BadRecord, Store, check_writable, read_record, tidy_dirs

    training = [f"--{k.replace('_', '-')}" for k in ("task", "method", "init", "optimizer", "lr",
                                                     "steps", "batch_size", "precision")
                if getattr(args, k)]
    training += ["--set"] * bool(args.set) + ["--fake-data"] * args.fake_data
    if args.record and training:
        raise UserError(f"give a record or training options, not both ({', '.join(training)})")
    if not args.record and not args.task:
        raise UserError("give a record path (diagnose RECORD) or a task to train (--task NAME)")
    if args.results is not None and not Path(args.results).is_dir():
        raise UserError(f"--results: no results directory {args.results}")
    if args.report:
        check_writable(args.report)
    if args.record:
        try:
            record = read_record(Path(args.record))
        except BadRecord as err:
            raise UserError(str(err)) from None
        spec, arrays, layer_names = record.spec, record.telemetry(), record.data["layer_names"]
        if not 0 <= args.run < len(spec.runs):
            raise UserError(f"--run must lie in 0..{len(spec.runs) - 1}: the record has "
                            f"{len(spec.runs)} run{'' if len(spec.runs) == 1 else 's'}")
        where, stem = record.path.parent, f"{record.path.stem}.run{args.run}"
        if args.at_init:  # beside, not over, the run's full diagnosis
            stem += ".at-init"
        if not args.report:  # the report goes beside the record
            check_writable(where)
        try:
            data = load_data(spec, args.data_dir)
        except DataMissing as err:
            print(f"note: activation stds need the data: {err}", file=sys.stderr)
            data = None
    else:
        if args.run != 0:
            raise UserError("--run picks a run of a stored record; a trained diagnosis has one run")
        spec = _diagnose_spec(args)
        store = Store(args.out)
        record = None if args.at_init or args.force else store.load(spec)
        where, stem = store.path_for(spec).parent, store.path_for(spec).stem
        if args.at_init:
            stem += ".at-init"
        if record is not None:
            if not args.report:  # the report goes beside the record
                check_writable(where)
            arrays, layer_names = record.telemetry(), record.data["layer_names"]
            print(f"reused stored record {record.path}; --force retrains", file=sys.stderr)
            data = load_data(spec, args.data_dir)
        else:
            from tqdm import tqdm

            data = load_data(spec, args.data_dir)
            with tidy_dirs(where):  # bad input found while tracing leaves no directory
                store.check_writable(spec)
                with tqdm(total=spec.train["steps"], desc=f"{spec.task} {spec.method}",
                          unit="step", file=sys.stderr, leave=False) as bar:
                    progress = lambda done: bar.update(done - bar.n)  # noqa: E731
                    if args.at_init:  # one step, not a result: nothing stored
                        body, arrays = train_spec(spec, data, progress)
                    else:
                        done = train_and_store(spec, store, lambda _: data, progress,
                                               force=args.force)
                        record = done.record
                        body, arrays = record.data, record.telemetry()
                        print(f"record {'written to' if done.status == TRAINED else 'reused:'} "
                              f"{record.path}", file=sys.stderr)
            layer_names = body["layer_names"]
        stem = f"{stem}.run0" if not args.at_init else stem
    diag = diagnose_run(spec, arrays, layer_names, args.run, data,
                        str(record.path) if record is not None else None, args.at_init,
                        args.results or "results")
    out = Path(args.report) if args.report else where
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{stem}.diagnosis.md"
    figure = None
    if not args.at_init:
        figure = save_png(diagnosis_figure(diag, arrays["loss"][args.run],
                                           arrays["layer_grad_norm"][args.run]),
                          out / f"{stem}.diagnosis.png")
    from .diagnosis import to_markdown

    report.write_text(to_markdown(diag, figure.name if figure else None))
    print(report.read_text())
    print(f"report written to {report}" + (f", figure {figure}" if figure else ""), file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    if args.what == "tasks":
        from .config import data_source
        from .tasks import all_tasks

        width = max(len(name) for name in all_tasks())
        missing = False
        for task in all_tasks().values():
            status = data_source(task).availability(args.data_dir)
            missing |= status == "missing"
            aliases = task.config.get("aliases")
            names = f" (alias{'es' * (len(aliases) > 1)}: {', '.join(aliases)})" if aliases else ""
            print(f"{task.name:{width}s}  {status:9s}  {task.description}{names}")
        if missing:
            print("missing: `python -m stabench data TASK` says how to get the data; "
                  "--fake-data runs the task without it")
        return 0
    registry = _registry(args.what)
    for entry in registry.entries():
        ref = f"  [{entry.ref}]" if entry.ref else ""
        traced = entry.meta.get("traced")  # program inputs: what --search optuna can search
        traced = f" (traced: {', '.join(traced)})" if traced else ""
        stage = f"{entry.meta['stage']}: " if "stage" in entry.meta else ""  # methods only
        print(f"{entry.signature_text():40s} {stage}{entry.help}{traced}{ref}")
    return 0


def cmd_data(args) -> int:
    from .config import source_named

    source = source_named(args.name)
    if args.prepare and source.kind == "tfds" and not source.available(args.data_dir):
        from .data.tfds import prepare

        print(f"prepared {source.name} in {prepare(source.name, args.data_dir)}")
        return 0
    print(source.describe(args.data_dir))
    return 0 if source.available(args.data_dir) else 1


def _registry(what: str):
    if what == "methods":
        from .methods import METHODS as reg
    elif what == "inits":
        from .inits import INITS as reg
    elif what == "optimizers":
        from .optimizers import OPTIMIZERS as reg
    elif what == "datasets":
        from .data import DATASETS as reg
    else:
        from .models import MODELS as reg
    return reg


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="stabench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    # options that run, sweep and diagnose share, declared once: each command copies them
    task_settings = ArgumentParser(add_help=False)
    group = task_settings.add_argument_group("task settings")
    group.add_argument("--steps", type=int, default=None,
                       help="training steps (default: the task's)")
    group.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    group.add_argument("--precision", default=None, metavar="fp32|bf16|fp16",
                       help="compute dtype of the forward and backward pass (parameters and "
                            "optimizer state stay float32; default: the task's, fp32); in a "
                            "sweep, a comma-separated list is a grid: bf16,fp16")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a task field, e.g. model.depth=20; in a sweep, a list for a "
                            "scalar field is a grid: model.depth=[4,8,16] or 4,8,16")
    group.add_argument("--fake-data", action="store_true",
                       help="random data with the task's shapes (runs anywhere, offline)")
    group.add_argument("--data-dir", default=None,
                       help="TFDS data directory (else $TFDS_DATA_DIR)")
    stored_record = ArgumentParser(add_help=False)
    group = stored_record.add_argument_group("stored record")
    group.add_argument("--out", default=DEFAULT_OUT,
                       help=f"results directory for the trained record (default {DEFAULT_OUT}/)")
    group.add_argument("--force", action="store_true", help="retrain even if a record exists")

    run = sub.add_parser("run", help="train one cell (seeds x learning rates) and store its record",
                         parents=[task_settings, stored_record])
    run.add_argument("--task", default="digits",
                     help="task name or alias (see: list tasks), or a task file's path FILE.toml "
                          "(directories of task files: STABENCH_TASKS_DIR); default digits, "
                          "bundled offline")
    run.add_argument("--method", default="none", help="method string, e.g. clip_norm(max_norm=0.5)")
    run.add_argument("--init", default="default", help="init string, e.g. normal(std=0.01)")
    run.add_argument("--optimizer", default=None, help="overrides the task's optimizer")
    run.add_argument("--seeds", type=int, default=None,
                     help="number of seeds, 0..N-1 (default: the task's)")
    run.add_argument("--lrs", default=None,
                     help="comma-separated learning rates (default: the task's grid)")
    run.set_defaults(func=cmd_run, trains=True)

    rerun = sub.add_parser("rerun", help="retrain a stored record and check it reproduces")
    rerun.add_argument("record", help="path of a record (.json) written by run or sweep")
    rerun.add_argument("--data-dir", default=None, help="TFDS data directory")
    rerun.set_defaults(func=cmd_rerun, trains=True)

    sweep = sub.add_parser("sweep", help="train many cells: lists and grids of tasks, methods, "
                                          "inits and optimizers; resumable",
                           parents=[task_settings])
    sweep.add_argument("--suite", default=None,
                       help="tasks/suites/NAME.toml (or a path to a suite file)")
    for flag, example in (("task", "digits adding"),
                          ("method", "none 'clip_norm(max_norm=[0.25,1,4])'"),
                          ("init", "default he_normal"), ("optimizer", "'sgd(momentum=0.9)' adam")):
        sweep.add_argument(f"--{flag}", nargs="+", action="extend", default=None,
                           help=f"one or more, e.g. {example}; a list argument is a grid")
    sweep.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: task's)")
    sweep.add_argument("--lrs", default=None,
                       help="learning rates trained inside every cell (default: the task's grid)")
    sweep.add_argument("--search", default=None,
                       help="grid (default) or random(n=K, seed=S) over method/init/optimizer "
                            "arguments written as lists or loguniform(a,b) / uniform(a,b), or "
                            "optuna(n=K, batch=B, lr=loguniform(a,b)): TPE over the ranges of "
                            "traced method arguments, B trials per compiled batch")
    sweep.add_argument("--shard", default=None, metavar="I/N",
                       help="run only shard I of N (1-based) of the cells")
    sweep.add_argument("--workers", type=int, default=None,
                       help="worker processes, each pinned to a core (default: one per core); "
                            "with --executor ray and no --address, the local Ray's CPUs")
    sweep.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local worker processes (default), or each cell a Ray task "
                            "(pip install 'stabench[scale]')")
    sweep.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                       help="Ray cluster to join (default: start a local Ray instance)")
    sweep.add_argument("--out", default=None,
                       help=f"results directory (default results/SUITE or {DEFAULT_OUT}/)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the cells and whether each is stored; train nothing")
    sweep.set_defaults(func=cmd_sweep, trains=True)

    report = sub.add_parser("report", help="leaderboards (Markdown, LaTeX, CSV, Parquet) and plots "
                                           "from a results directory")
    report.add_argument("directory")
    report.add_argument("--out", default=None, help="where to write (default: the directory)")
    report.add_argument("--no-plots", action="store_true")
    report.add_argument("--main-metric", choices=("stability", "target"), default="stability",
                        help="what the main table shows per task (default: stability)")
    report.add_argument("--interval", choices=("brackets", "pm"), default="brackets",
                        help="intervals as 0.97 [0.96, 0.98] (brackets) or 0.97 ± 0.01 (pm)")
    report.set_defaults(func=cmd_report)

    merge = sub.add_parser("merge", help="combine result directories (e.g. sweep shards)")
    merge.add_argument("out", help="directory to merge into (created if absent)")
    merge.add_argument("sources", nargs="+", help="result directories to copy records from")
    merge.set_defaults(func=cmd_merge)

    diag = sub.add_parser("diagnose", help="when and where gradients exploded or vanished, what it "
                                           "did to the loss, what to try; trains one run or reads "
                                           "a stored record",
                          parents=[task_settings, stored_record])
    diag.add_argument("record", nargs="?", default=None,
                      help="a stored record (.json) to read instead of training")
    diag.add_argument("--run", type=int, default=0, help="which run of the record (default 0)")
    diag.add_argument("--task", default=None, help="task to train one run of")
    diag.add_argument("--method", default=None, help="method string (default none)")
    diag.add_argument("--init", default=None, help="init string (default: the layers' own)")
    diag.add_argument("--optimizer", default=None, help="overrides the task's optimizer")
    diag.add_argument("--lr", default=None, help="learning rate (default: the middle of the "
                                                 "task's grid)")
    diag.add_argument("--seed", type=int, default=0, help="default 0")
    diag.add_argument("--at-init", action="store_true",
                      help="stop at initialization: activation stds and step-0 gradient norms")
    diag.add_argument("--results", default=None,
                      help="where to look for a report's leaderboard.csv ranking this task "
                           "(default results/); without one, rule-based recommendations")
    diag.add_argument("--report", default=None,
                      help="directory for the report and figure (default: beside the record)")
    diag.set_defaults(func=cmd_diagnose, trains=True)

    lst = sub.add_parser("list", help="list tasks, methods, inits, optimizers, models or datasets")
    lst.add_argument("what", choices=["tasks", "methods", "inits", "optimizers", "models",
                                      "datasets"])
    lst.add_argument("--data-dir", default=None, help="TFDS data directory (else $TFDS_DATA_DIR)")
    lst.set_defaults(func=cmd_list)

    data = sub.add_parser("data", help="is a dataset here? how to get it; --prepare gets it",
                          description="Exit status 0 when the data is here, 1 when it is not.")
    data.add_argument("name", help="dataset (cifar10) or task (cifar) name")
    data.add_argument("--prepare", action="store_true",
                      help="download and convert a TFDS dataset (needs the [prepare] extra)")
    data.add_argument("--data-dir", default=None, help="TFDS data directory (else $TFDS_DATA_DIR)")
    data.set_defaults(func=cmd_data)
    for command in sub.choices.values():  # any command may name a plugin's entries
        command.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                             help="load MODULE, a plugin that registers its own methods, inits, "
                                  "optimizers, models or datasets (repeatable); plugins also "
                                  "load from STABENCH_PLUGINS=MODULE[,...] and from installed "
                                  "entry points of group stabench.plugins")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with signals.handling():  # Ctrl-C: a KeyboardInterrupt where it propagates, once
            from .hardware import code_state

            code_state()  # the code this process runs, before anything can change the checkout
            args = build_parser().parse_args(argv)
            args.argv = argv
            from .plugins import add_to_environment, load_plugins

            add_to_environment(args.plugin)  # so the processes this command starts load them too
            if getattr(args, "trains", False):
                from .process import prepare

                prepare()  # before anything starts JAX: one intra-op thread, the compile cache
            load_plugins()  # before any spec is parsed, so the plugins' names resolve
            return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(signals.MESSAGE, file=sys.stderr)
        return 130
    except OSError as err:  # the disk or file system failed under a command: say what, where
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

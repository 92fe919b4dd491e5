"""The package's imports, read from its source (ast, module-level and function-level imports), keep
the layout one-way. Its layers, upstream first, in the order data flows (spec -> cell program ->
training -> record -> tables -> figures -> report):

- spec/catalog: what a cell is and the registered names it is built from (registry, tasks, config,
  sweeps, plugins, data, models, inits, methods, optimizers, text).
- engine: the compiled cell program and its runs (program, grouping, train, process, hardware).
- record/store: training cells into stored records, and what a record's telemetry says (runner,
  executor, search, signals, store, metrics, diagnosis, reproduce).
- tables: leaderboard (DataFrames, and their Markdown and LaTeX text).
- figures: plots (matplotlib Figures from those tables).
- report: reports (reads records, writes every file of a report).
- api: the public Python API (api, testing, the package's __init__).
- cli: the command line over it (cli, __main__).

A module imports modules of its own layer or of the layers before it, never of a later one, whether
at module level or inside a function (lazily, to start fast or to load a registry's entries late);
its module-level imports form no cycle. No module imports another module's private (`_name`)
attribute, and no script in scripts/ touches a private name of stabench's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stabench"

LAYERS = [
    ("spec/catalog", {"registry", "text", "plugins", "tasks", "config", "sweeps", "inits",
                      "methods", "optimizers", "data", "models"}),
    ("engine", {"hardware", "process", "program", "curvature", "grouping", "train"}),
    ("record/store", {"metrics", "diagnosis", "reproduce", "store", "runner", "executor",
                      "search", "signals"}),
    ("tables", {"leaderboard", "paper"}),
    ("figures", {"plots"}),
    ("report", {"reports", "html"}),
    ("api", {"", "api", "testing"}),
    ("cli", {"cli", "__main__"}),
]

# Imports against the layers that issue 37 (the library layout) has yet to remove; each entry names
# the importing module, the imported one and, for a private name, that name.
ALLOWED_UPSTREAM = {
    # config.build_cell builds the engine's cell program: it belongs with the program (issue 37,
    # the public API engineer's part: config holds RunSpec, make_spec and build_cell)
    ("config", "program"),
    # runner.diagnose_run reads a report's leaderboards for its advice: the caller should pass
    # the rows in (issue 37, the public API engineer's part: one path from spec to record)
    ("runner", "reports"),
}
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore


def module_name(path: Path) -> str:
    """stabench/models/mlp.py -> models.mlp; a package's __init__ is the package ("" for
    stabench's own)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"stabench.{module} is in no layer of tests/test_layout.py: add it")


def imports(path: Path, package: str):
    """(stabench module imported, name taken from it or None, name bound, at module level?) for
    every import of a stabench module in the file at `path`; `package` is the file's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        top = id(node) in module_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stabench":
                    target = alias.name.removeprefix("stabench").lstrip(".")
                    yield target, None, alias.asname or alias.name.split(".")[0], top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "stabench":
                continue
            target = target.removeprefix("stabench").lstrip(".")
            for alias in node.names:
                bound = alias.asname or alias.name
                submodule = f"{target}.{alias.name}".lstrip(".")
                if submodule in MODULES:  # `from . import methods` imports a module
                    yield submodule, None, bound, top
                else:
                    yield target, alias.name, bound, top


def package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    own = f"stabench.{module}".rstrip(".")
    return own if path.name == "__init__.py" else own.rpartition(".")[0]


IMPORTS = {m: list(imports(path, package_of(m, path))) for m, path in MODULES.items()}
EDGES = [(m, target, name, top) for m, found in IMPORTS.items()
         for target, name, _, top in found if target != m]


def is_private(name: str | None) -> bool:
    return (name is not None and name.startswith("_") and not name.startswith("__")
            and name not in NAMEDTUPLE_API)


def private_reads(path: Path, names: set[str] | None = None):
    """`x._name` in the file at `path`, where x is one of `names` (any name if None)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and is_private(node.attr)
                and (names is None or isinstance(node.value, ast.Name)
                     and node.value.id in names)):
            yield f"{ast.unparse(node.value)}.{node.attr}"


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_later_layer():
    wrong = [f"stabench.{m} imports stabench.{t} ({LAYERS[layer_of(m)][0]} -> "
             f"{LAYERS[layer_of(t)][0]}{'' if top else ', in a function'})"
             for m, t, _, top in EDGES
             if layer_of(t) > layer_of(m) and (m, t.split(".")[0]) not in ALLOWED_UPSTREAM]
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_form_no_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, t, _, top in EDGES:
        if top:
            graph[m].add(t)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(f"stabench.{m}" for m in cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_no_module_imports_another_modules_private_name():
    wrong = [f"stabench.{m} imports {name} from stabench.{t}" for m, t, name, _ in EDGES
             if is_private(name) and (m, t, name) not in ALLOWED_PRIVATE]
    for m, found in IMPORTS.items():  # and through an imported module: `methods._helper`
        modules = {bound for target, name, bound, _ in found if name is None and target != m}
        wrong += [f"stabench.{m} reads {read}" for read in private_reads(MODULES[m], modules)]
    assert not wrong, "\n".join(wrong)


def test_each_allowed_exception_still_occurs():
    """Once fixed, an exception leaves ALLOWED_UPSTREAM or ALLOWED_PRIVATE."""
    upstream = {(m, t.split(".")[0]) for m, t, _, _ in EDGES if layer_of(t) > layer_of(m)}
    private = {(m, t, name) for m, t, name, _ in EDGES if is_private(name)}
    assert ALLOWED_UPSTREAM - upstream == set() and ALLOWED_PRIVATE - private == set()


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_no_script_touches_a_private_name_of_stabench(script):
    """Scripts use stabench as any user would: no private name imported, and none read from
    anything (what they read from is mostly stabench's: modules, engines, records)."""
    found = imports(script, "stabench")
    wrong = [f"imports {name} from stabench.{t}" for t, name, _, _ in found if is_private(name)]
    wrong += [f"reads {read}" for read in private_reads(script)]
    assert not wrong, f"{script.name}: " + "; ".join(wrong)

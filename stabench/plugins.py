"""Plugins: packages that add methods, inits, optimizers, models or datasets without changing
stabench, registered with the decorators the built-ins use (`stabench.register_method`, ...).

A plugin is a module that registers its entries when imported. Every process that trains loads
the plugins (`process.prepare`), and the CLI loads them in every command, from:

- the entry points of group `stabench.plugins` of the installed distributions, each naming a
  module (`adagc = "stabench_adagc"` under `[project.entry-points."stabench.plugins"]`);
- the modules named, comma-separated, in STABENCH_PLUGINS, which `--plugin MODULE` extends, so
  the processes a command starts (sweep workers, a local Ray) inherit them.

A cell's spec holds the sha256 of the source of each package its entries come from
(`identity`), so a changed plugin retrains its cells and no others; a record names every plugin
loaded where it trained (`loaded`): module, version, sha256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Iterable

from .registry import UserError

GROUP = "stabench.plugins"
ENV = "STABENCH_PLUGINS"


@dataclass(frozen=True)
class Plugin:
    module: str
    version: str | None  # of the distribution that installed it; None when not installed
    sha256: str  # of its package's source (package_sha256)

    def to_dict(self) -> dict:
        return asdict(self)


_LOADED: dict[str, Plugin] = {}


def _registrar(module: str, registry: str, what: str) -> Callable:
    """`stabench.register_<kind>`: the registry's own decorator, imported when first used so that
    loading stabench stays light."""

    def register(name: str, *, help: str, ref: str = "", **meta) -> Callable:
        target = getattr(importlib.import_module(module, __package__), registry)
        return target.register(name, help=help, ref=ref, **meta)

    register.__doc__ = f"Register {what} under `name` (`{registry}.register`)."
    return register


register_method = _registrar(".methods", "METHODS", "a method factory (meta: its `stage`, one of "
                             "methods.STAGES, and optionally `traced`, its float arguments the "
                             "compiled program may take as per-run inputs)")
register_init = _registrar(".inits", "INITS", "an init factory returning an inits.Init")
register_optimizer = _registrar(".optimizers", "OPTIMIZERS",
                                "an optimizer factory returning an optimizers.Optimizer")
register_model = _registrar(".models", "MODELS", "a model factory returning a builder "
                            "(meta, kernel_init, rngs) -> nnx.Module")
register_dataset = _registrar(".data", "DATASETS", "a dataset factory returning a data.Source")


def _named_in_environment() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def add_to_environment(modules: Iterable[str]) -> None:
    """Name `modules` in STABENCH_PLUGINS: this process loads them, and so does every process it
    starts, which inherits the environment."""
    named = _named_in_environment()
    named += [m for m in modules if m not in named]
    if named:
        os.environ[ENV] = ",".join(named)


def load_plugins() -> list[Plugin]:
    """Import every plugin not imported yet (entry points first, then STABENCH_PLUGINS); returns
    all loaded. One that fails to import is a UserError naming it, in one line."""
    found = [(ep.module, ep.dist) for ep in md.entry_points(group=GROUP)]
    found += [(module, None) for module in _named_in_environment()]
    for module, dist in found:
        if module in _LOADED:
            continue
        try:
            importlib.import_module(module)
        except Exception as err:  # anything a plugin raises as it loads is its failure
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise UserError(f"plugin {module} failed to load: {type(err).__name__}"
                            f"{': ' + first if first else ''}") from None
        version = dist.version if dist is not None else _installed_version(module)
        _LOADED[module] = Plugin(module, version, package_sha256(_package(module)))
    return list(_LOADED.values())


def loaded() -> list[dict]:
    """The plugins this process loaded, as a record's provenance names them."""
    return [plugin.to_dict() for plugin in _LOADED.values()]


def _package(module: str) -> str:
    return module.partition(".")[0]


def _installed_version(module: str) -> str | None:
    distributions = md.packages_distributions().get(_package(module), [])
    return md.version(distributions[0]) if distributions else None


@functools.cache
def package_sha256(package: str) -> str | None:
    """sha256 over the Python source of an imported top-level package: for each .py file in
    relative-path order, its relative path and the sha256 of its bytes. Hashed once per process,
    so it names the code this process imported. None where there is no source file."""
    top = sys.modules.get(package)
    if top is None or package == "__main__":
        return None
    if hasattr(top, "__path__"):  # a package, perhaps spread over directories (namespace)
        files = sorted((f.relative_to(root).as_posix(), f)
                       for root in map(Path, top.__path__) for f in root.rglob("*.py"))
    elif getattr(top, "__file__", None):
        files = [(Path(top.__file__).name, Path(top.__file__))]
    else:
        return None
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def identity(factories: Iterable[Callable]) -> dict[str, str]:
    """Package -> source sha256 for the registry factories a cell uses that come from outside
    stabench: a changed plugin changes the hash of the cells that use it, and only theirs."""
    packages = {_package(f.__module__) for f in factories} - {"stabench"}
    hashes = {package: package_sha256(package) for package in sorted(packages)}
    return {package: sha for package, sha in hashes.items() if sha is not None}

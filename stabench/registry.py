"""One registry class for every concept: tasks' datasets, models, methods, inits, optimizers.

Entries are factories registered under a name. A spec string names an entry with optional literal
keyword arguments, `clip_norm(max_norm=0.5)`; `Registry.get` parses it, checks every argument
against the factory's signature and calls the factory.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UserError(ValueError):
    """Bad input from the user: reported in one line, exit code 2, never a traceback."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    help: str
    ref: str
    meta: dict

    def parameters(self) -> dict[str, inspect.Parameter]:
        return {
            p.name: p
            for p in inspect.signature(self.factory).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def signature_text(self) -> str:
        parts = [f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                 for p in self.parameters().values()]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


@dataclass(frozen=True)
class Call:
    """A parsed spec: an entry name and its keyword arguments (defaults filled in)."""

    name: str
    kwargs: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


def closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


INT_LIMIT = 2**31 - 1  # JAX's integers are 32-bit: a larger one would overflow in the program
MAX_NESTING = 32  # deeper is no value anyone means, and would exhaust the recursion of Python's
# parser, printer and copier
TOO_LARGE = f"integers must lie within ±{INT_LIMIT}"
TOO_DEEP = f"brackets and signs nest at most {MAX_NESTING} deep"


def _nodes(root: Any, children: Callable[[Any], Any]):
    """Every node of a tree with its depth; iterative, so no depth breaks the walk itself."""
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in children(node))


def _items(value: Any):
    if isinstance(value, dict):
        return [*value, *value.values()]
    return value if isinstance(value, (list, tuple, set, frozenset)) else ()


def check_value(value: Any, where: str) -> Any:
    """Refuse a parsed value that would fail far from its input: an integer beyond int32, or
    containers nested too deeply."""
    for node, depth in _nodes(value, _items):
        if depth > MAX_NESTING:
            raise UserError(f"{where}: {TOO_DEEP}")
        if isinstance(node, int) and abs(node) > INT_LIMIT:
            raise UserError(f"{where}: {TOO_LARGE}")
    return value


def parse_expression(text: str, kind: str) -> ast.expr:
    """The syntax tree of a spec string; refused, in one line, if it does not parse or nests too
    deeply for the code that walks it later."""
    try:
        with warnings.catch_warnings():  # Python only warns of some typos, e.g. 1or: refuse them
            warnings.simplefilter("error", SyntaxWarning)
            node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise UserError(f"cannot parse {kind} '{text}': write name or name(key=value, ...)"
                        ) from None
    except (RecursionError, MemoryError):  # the parser's own limits on nesting
        node = None
    if node is None or any(depth > MAX_NESTING for _, depth in _nodes(node, ast.iter_child_nodes)):
        raise UserError(f"{kind} '{text}': {TOO_DEEP}")
    return node


def literal_value(node: ast.AST, where: str) -> Any:
    """The value of an argument's expression node: a Python literal, or a bare word as a string."""
    if isinstance(node, ast.Name):  # a bare word is a string: shape=cosine
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        return node.id
    try:
        value = ast.literal_eval(node)
    except OverflowError:  # a huge integer in a complex number
        raise UserError(f"{where}: {TOO_LARGE}") from None
    except (ValueError, TypeError):  # TypeError: a list as a dict key or set member
        raise UserError(f"{where}: '{ast.unparse(node)}' is not a literal value") from None
    return check_value(value, where)


def parse_call(spec: str, kind: str = "entry") -> tuple[str, dict[str, Any]]:
    """Parse `name` or `name(k=v, ...)` into its name and raw literal keyword arguments."""
    node = parse_expression(spec, kind)
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise UserError(f"cannot parse {kind} '{spec}': write name or name(key=value, ...)")
    if node.args:
        raise UserError(f"{kind} '{spec}': arguments must be named, e.g. {node.func.id}(key=value)")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise UserError(f"{kind} '{spec}': '**' is not allowed")
        if kw.arg in kwargs:
            raise UserError(f"{kind} '{spec}': argument '{kw.arg}' is given twice")
        kwargs[kw.arg] = literal_value(kw.value, f"{kind} '{spec}'")
    return node.func.id, kwargs


def split_plus(spec: str) -> list[str]:
    """Split `a(x=1)+b` at top-level '+' signs (not inside brackets or numbers like 1e+3)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced brackets in '{spec}'")
        elif ch == "+" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"unbalanced brackets in '{spec}'")
    parts.append(spec[start:])
    if any(not p.strip() for p in parts):
        raise UserError(f"empty term in '{spec}'")
    return [p.strip() for p in parts]


def _coerce(value: Any, param: inspect.Parameter, where: str) -> Any:
    """Check a literal against the annotation (or the default's type) of the factory parameter."""
    expected = param.annotation if param.annotation is not param.empty else None
    if isinstance(expected, str):  # from __future__ annotations
        if expected.endswith(" | None") and value is None:
            return value
        expected = {"float": float, "int": int, "str": str, "bool": bool}.get(
            expected.removesuffix(" | None"))
    if expected is None and param.default is not param.empty and param.default is not None:
        expected = type(param.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (float, int, str, bool) and not (
        isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    ):
        grid = " (a list is a grid of values: `stabench sweep` trains one cell per value)" \
            if isinstance(value, list) else ""
        raise UserError(f"{where}: {param.name} must be {expected.__name__}, got {value!r}{grid}")
    return value


class Registry:
    """Name -> factory. `register` rejects duplicates; `get` builds from a spec string."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, help: str, ref: str = "", label: str | Callable | None = None,
                 **meta) -> Callable:
        """`label`: the entry's display name in tables and figures, a format string or a function
        of the call's arguments (defaults filled in), e.g. "clip-norm ({max_norm:g})"."""
        if label is not None:
            meta["label"] = label

        def decorator(factory: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name '{name}'")
            self._entries[name] = Entry(name, factory, help, ref, meta)
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} '{name}'.{closest(name, self._entries)}"
                f" Valid {self.kind}s: {', '.join(self.names())} (and those of plugins, once "
                f"loaded: --plugin MODULE, STABENCH_PLUGINS or an installed entry point)"
            )
        return self._entries[name]

    def resolve(self, spec: str) -> Call:
        """Parse and validate a spec; the result names every argument, defaults included."""
        name, raw = parse_call(spec, self.kind)
        entry = self.entry(name)
        params = entry.parameters()
        where = f"{self.kind} '{spec}'"
        if raw and not params:
            raise UserError(f"{where}: {name} takes no arguments")
        kwargs = {}
        for key, value in raw.items():
            if key not in params:
                raise UserError(f"{where}: unknown argument '{key}'.{closest(key, params)} "
                                f"Accepted: {', '.join(params)}")
            kwargs[key] = _coerce(value, params[key], where)
        missing = [p for p in params.values() if p.default is p.empty and p.name not in kwargs]
        if missing:
            raise UserError(f"{where}: missing argument(s) {', '.join(p.name for p in missing)}")
        full = {p.name: kwargs.get(p.name, p.default) for p in params.values()}
        return Call(name, tuple(full.items()))

    def build(self, call: Call) -> Any:
        try:
            return self._entries[call.name].factory(**dict(call.kwargs))
        except UserError:
            raise
        except ValueError as err:  # a factory's own argument check
            raise UserError(f"{self.kind} '{call}': {err}") from None

    def get(self, spec: str) -> Any:
        return self.build(self.resolve(spec))

    def label(self, spec: str) -> str:
        """A short display name for a spec string, its '+' terms joined by " + ": each term's
        registered label, else its name and the arguments that differ from their defaults. Never
        fails: a name not registered (a plugin not loaded) shows the arguments as written."""
        family, tuned = spec.removesuffix(" tuned"), spec.endswith(" tuned")
        try:
            if tuned:  # a tuned entry: its family's names, without the settings tried
                return " + ".join(self._family_label(n) for n in family.split("+")) + " tuned"
            return " + ".join(self._label(term) for term in split_plus(spec))
        except UserError:
            return spec

    def _family_label(self, name: str) -> str:
        """The words of the registered label at the defaults before the first that shows a value
        ("clip-norm (1)" -> "clip-norm", "warmup 5%" -> "warmup"), else the name."""
        words = []
        for word in self._label(name).split():
            if "(" in word or any(c.isdigit() for c in word):
                break
            words.append(word)
        return " ".join(words) or name

    def _label(self, term: str) -> str:
        name, raw = parse_call(term, self.kind)
        entry = self._entries.get(name)
        if entry is None:
            shown = raw
        else:
            params = entry.parameters()
            label = entry.meta.get("label")
            if label is not None:
                full = {p.name: raw.get(p.name, p.default) for p in params.values()}
                return label(**full) if callable(label) else label.format(**full)
            shown = {k: v for k, v in raw.items() if k not in params or v != params[k].default}
        args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in shown.items())
        return f"{name} ({args})" if args else name

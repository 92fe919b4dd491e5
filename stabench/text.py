"""How numbers and counts read in tables, reports and messages: one spelling everywhere."""

from __future__ import annotations

import math


def format_number(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits; "-" for a missing value (None or NaN), "inf" and "-inf"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """"1 seed", "3 seeds"; `nouns` for a plural that is not noun + s ("entries")."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"

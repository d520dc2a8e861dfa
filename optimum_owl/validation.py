"""Field checks shared by the configs: numbers, choices, N:M patterns. Each error names the field and the fix."""

from __future__ import annotations

import math
from typing import Any

from .errors import OWLConfigError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Parse `"unstructured"` (-> `None`) or an `"N:M"` string (-> `(n, m)`).

    `"N:M"` follows the hardware (NVIDIA) convention: **at most `n` non-zeros are kept in every group of `m`
    consecutive input weights**, so `"2:4"` is 50% sparse and `"1:4"` is 75% sparse. (The OWL reference code's
    `prune_n` counts *pruned* weights instead; `"5:8"` there is `"3:8"` here.)
    """
    if not isinstance(pattern, str):
        raise OWLConfigError(f"`pattern` must be a string such as 'unstructured' or '2:4', got {pattern!r}.")
    text = pattern.strip().lower()
    if text == "unstructured":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise OWLConfigError(
            f"`pattern` must be 'unstructured' or 'N:M' with integers N < M (N non-zeros kept in every M), "
            f"got {pattern!r}; for example pattern='2:4'."
        )
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise OWLConfigError(
            f"`pattern` N:M needs 0 < N < M (N non-zeros kept in every M weights), got {n}:{m}; "
            f"for example '2:4' keeps 2 of every 4."
        )
    return n, m


def check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OWLConfigError(f"`{name}` must be a finite number, got {value!r}.")


def check_int(name: str, value: Any, low: int | None = None, hint: str = "") -> None:
    """An integer (not a bool), ≥ `low` when it is given."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        kind = {None: "an integer", 1: "a positive integer"}.get(low, f"an integer ≥ {low}")
        raise OWLConfigError(f"`{name}` must be {kind}, got {value!r}" + (f"; {hint}." if hint else "."))


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise OWLConfigError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")
    return value.strip().lower()


def check_range(name: str, value: Any, low: float, high: float | None = None, hint: str = "") -> None:
    """A finite number in [low, high) (or ≥ low when `high` is None)."""
    check_number(name, value)
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f"≥ {low}"
        raise OWLConfigError(f"`{name}` must be {bound}, got {value}" + (f"; {hint}." if hint else "."))


def number_list(
    name: str, values: Any, positive: bool = False, high: float | None = None, optional: bool = False, low: float = 0.0
) -> list[float] | None:
    """A non-empty list of finite numbers (a single number is accepted), each > 0 (`positive`) or ≥ `low`, and below
    `high` when given; returned as floats. `None` passes through when `optional`."""
    if values is None and optional:
        return None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise OWLConfigError(f"`{name}` must be a non-empty list of numbers, got {values!r}.")
    for v in values:
        check_number(name, v)
        if (positive and v <= 0) or v < low or (high is not None and v >= high):
            bound = "> 0" if positive else (f"in [{low:g}, {high:g})" if high is not None else f"≥ {low:g}")
            raise OWLConfigError(f"every value of `{name}` must be {bound}, got {v!r}.")
    return [float(v) for v in values]


def choice_list(name: str, values: Any, choices: tuple[str, ...]) -> list[str]:
    """A non-empty list of distinct choices (a single string is accepted), lower-cased, in the given order."""
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, (list, tuple)) or not values or any(
        not isinstance(v, str) or v.strip().lower() not in choices for v in values
    ):
        raise OWLConfigError(
            f"`{name}` must be a non-empty list of {', '.join(repr(c) for c in choices)}, got {values!r}; "
            f"e.g. {list(choices[:2])}."
        )
    return list(dict.fromkeys(v.strip().lower() for v in values))

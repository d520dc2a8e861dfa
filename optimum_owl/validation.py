"""Field checks shared by the configs (numbers, choices, N:M patterns), and the `OWLPrunerConfig` field groups checked
together (`check_scale_fields`, `check_holdout_source`). Each error names the field and the fix."""

from __future__ import annotations

import math
import os
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


def check_scale_fields(config: Any) -> None:
    """`device`, `offload_folder`, `checkpoint_dir` of an `OWLPrunerConfig` (offload and resumable runs,
    docs/scale.md); normalised in place (a `torch.device` or a path becomes a string)."""
    if config.device is not None:
        config.device = str(config.device)  # a torch.device -> "cuda:0"
        if config.device != "auto":
            import torch

            try:
                torch.device(config.device)
            except (RuntimeError, ValueError) as err:
                raise OWLConfigError(
                    f"`device` must be None, 'auto' or a torch device string such as 'cuda:0' or 'cpu', "
                    f"got {config.device!r} ({err})."
                ) from None
    for name in ("offload_folder", "checkpoint_dir"):
        value = getattr(config, name)
        if value is None:
            continue
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise OWLConfigError(f"`{name}` must be a folder path (str), got {value!r}.")
        setattr(config, name, str(value))
    if config.checkpoint_dir is not None and (config.propagation != "sequential" or config.layerwise in ("owl-auto", "auto")):
        raise OWLConfigError(
            f"`checkpoint_dir` (resumable runs) needs propagation='sequential' and a fixed layerwise (uniform, owl, "
            f"dlp, alphapruning, atp; a search's candidates are not resumable), got propagation="
            f"{config.propagation!r}, layerwise={config.layerwise!r}; drop `checkpoint_dir` or change those fields."
        )


def check_holdout_source(config: Any) -> None:
    """`auto_holdout_dataset` of an `OWLPrunerConfig`: only for the searches, and only when they score on windows
    drawn beyond the calibration set (`auto_holdout_tokens` > 0); a path becomes a string."""
    if config.auto_holdout_dataset is None:
        return
    if config.layerwise not in ("owl-auto", "auto"):
        raise OWLConfigError(
            f"`auto_holdout_dataset` is the text the searches score their candidates on; it needs "
            f"layerwise='auto' or 'owl-auto', got layerwise={config.layerwise!r}. Unset it or choose a search."
        )
    if not config.auto_holdout_tokens:
        raise OWLConfigError(
            "`auto_holdout_tokens`=0 scores candidates on held-out calibration windows, but "
            "`auto_holdout_dataset` is set; give `auto_holdout_tokens` > 0 (e.g. 8192) or unset "
            "`auto_holdout_dataset`."
        )
    if isinstance(config.auto_holdout_dataset, os.PathLike):
        config.auto_holdout_dataset = str(config.auto_holdout_dataset)
    if isinstance(config.auto_holdout_dataset, str) and not config.auto_holdout_dataset.strip():
        raise OWLConfigError("`auto_holdout_dataset` is an empty string; give a .txt/.jsonl path, a datasets "
                             "name or any calibration source, or None.")

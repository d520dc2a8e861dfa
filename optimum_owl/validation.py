"""Field checks shared by the configs (numbers, choices, N:M patterns), and the `OWLPrunerConfig` field groups checked
together (`check_scale_fields`, `check_holdout_fields`, `check_refine`, ...). Each error names the field and the fix."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
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


def check_attention_shift(config: Any) -> None:
    """`attention_shift` and `auto_attention_shifts` of an `OWLPrunerConfig`: in [-1, 1), unstructured only."""
    check_range("attention_shift", config.attention_shift, -1.0, 1.0, hint="e.g. 0.05 (0 keeps one sparsity per block)")
    config.auto_attention_shifts = number_list("auto_attention_shifts", config.auto_attention_shifts, low=-1.0,
                                               high=1.0, optional=True)
    if (config.attention_shift or config.auto_attention_shifts) and config.nm_pattern is not None:
        raise OWLConfigError(f"`attention_shift` / `auto_attention_shifts` need pattern='unstructured' (an N:M "
                             f"pattern fixes every matrix's sparsity), got pattern={config.pattern!r}; unset them.")


def check_module_fields(config: Any) -> None:
    """`ignore` (a list of name patterns; one string is accepted) and `block_name` of an `OWLPrunerConfig`."""
    if isinstance(config.ignore, str):
        config.ignore = [config.ignore]
    if not isinstance(config.ignore, (list, tuple)) or not all(isinstance(p, str) for p in config.ignore):
        raise OWLConfigError(f"`ignore` must be a list of name patterns (strings), got {config.ignore!r}.")
    config.ignore = list(config.ignore)
    if config.block_name is not None and not isinstance(config.block_name, str):
        raise OWLConfigError(f"`block_name` must be a dotted module path such as 'model.layers', got {config.block_name!r}.")


def check_counts(config: Any) -> None:
    """The positive counts of an `OWLPrunerConfig`, its `seed` and `sparsegpt_damp`."""
    for name in ("num_samples", "seqlen", "batch_size", "sparsegpt_blocksize", "auto_finalists", "dsnot_cycles"):
        check_int(name, getattr(config, name), 1)
    check_int("seed", config.seed)
    check_range("sparsegpt_damp", config.sparsegpt_damp, 0.0, hint="the paper uses 0.01")


def check_holdout_fields(config: Any) -> None:
    """`auto_holdout_tokens`, `auto_holdout`, then `auto_holdout_dataset` (`check_holdout_source`) of the searches."""
    check_int("auto_holdout_tokens", config.auto_holdout_tokens, 0,
              hint="tokens the searches score on beyond the calibration windows, e.g. 8192 (0: hold out instead)")
    check_number("auto_holdout", config.auto_holdout)
    if not 0.0 < config.auto_holdout <= 0.5:
        raise OWLConfigError(f"`auto_holdout` must be in (0, 0.5] (fraction of the calibration windows held out), "
                             f"got {config.auto_holdout}; e.g. 0.125.")
    check_holdout_source(config)


def check_dense_propagation(config: Any, criteria: Mapping[str, Any]) -> None:
    """`propagation="dense"` needs a criterion that does not update weights (`criteria`: name -> its `Criterion`,
    the registry of `algorithms.criteria`, which sits above this module)."""
    if config.propagation == "dense" and criteria[config.method].updates_weights:
        plain = ", ".join(repr(n) for n, c in criteria.items() if not c.updates_weights)
        raise OWLConfigError(
            f"`propagation`='dense' supports methods that do not update weights ({plain}) only: "
            f"{config.method!r} updates weights and needs the statistics of every block after the pruned ones "
            f"before it. Use propagation='sequential' with method={config.method!r}."
        )


def check_refine(config: Any, criteria: Mapping[str, Any], choices: tuple[str, ...]) -> None:
    """`refine` (None or one of `choices`), only with a criterion that lists it (`criteria` as above)."""
    if config.refine is None:
        return
    config.refine = check_choice("refine", config.refine, choices)
    if config.refine not in criteria[config.method].refine:
        able = [n for n, c in criteria.items() if config.refine in c.refine]
        raise OWLConfigError(
            f"`refine`={config.refine!r} needs method={' or '.join(repr(n) for n in able)} (it swaps weights "
            f"using calibration statistics and keeps dense values), got method={config.method!r}; set "
            f"refine=None or method={able[0]!r}."
        )


def check_values_fields(config: Any, values: tuple[str, ...]) -> str:
    """`values` (one of `values`, returned lower-cased) and `group_size` (None, or a positive multiple of 64, and only
    with int8 values) of an `OWLPrunerConfig`."""
    form = check_choice("values", config.values, values)
    size = config.group_size
    if size is None:
        return form
    if isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 64:
        raise OWLConfigError(f"`group_size` must be None (one scale per output row) or a positive multiple of 64 "
                             f"(one scale per row and group of that many inputs), got {size!r}; e.g. 128.")
    if form != "int8":
        raise OWLConfigError(f"`group_size`={size} sets the int8 scales' groups but `values`={form!r}; set "
                             "values='int8' or unset group_size.")
    return form


def check_search_fields(config: Any, searchable: tuple[str, ...]) -> None:
    """The searched values of `layerwise="owl-auto"` / `"auto"` (`searchable`: the families `auto` may search),
    normalised in place."""
    check_holdout_fields(config)
    config.auto_owl_ms = number_list("auto_owl_ms", config.auto_owl_ms, positive=True)
    config.auto_owl_lambdas = number_list("auto_owl_lambdas", config.auto_owl_lambdas)
    config.auto_dlp_alphas = number_list("auto_dlp_alphas", config.auto_dlp_alphas)
    config.auto_alphapruning_epsilons = number_list("auto_alphapruning_epsilons", config.auto_alphapruning_epsilons,
                                                    high=1.0)
    config.auto_atp_betas = number_list("auto_atp_betas", config.auto_atp_betas, optional=True)
    config.auto_families = choice_list("auto_families", config.auto_families, searchable)


def check_target_sparsity(config: Any, name: str = "sparsity") -> None:
    """A pruning run needs something to prune: refuse a target sparsity of 0 (`OWLConfigError` naming `name`).

    Checked where a run saves a checkpoint (the `prune` command, `OWLPruner.prune_and_save` / `quantize`), not by the
    config itself, which also describes checkpoints, nor by `OWLPruner.prune`, for which 0 is a no-op."""
    if config.target_sparsity <= 0.0:
        shown = f"{name} {config.sparsity}" if name.startswith("-") else f"`{name}`={config.sparsity}"
        raise OWLConfigError(
            f"{shown} prunes nothing: the run would only save the unchanged model as a pruned checkpoint. Set a "
            "sparsity in (0, 1), e.g. 0.5, or an N:M pattern such as 2:4."
        )


def check_known_keys(data: Mapping[str, Any], names: Iterable[str], owner: str) -> None:
    """Refuse the keys of `data` that are not among `names` (the fields of `owner`), as the constructor refuses an
    unknown keyword: `OWLConfigError` naming each key and its closest field (a typo in a JSON file must not silently
    run with the default)."""
    names = sorted(names)
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        hints = [f"`{key}`" + "".join(f" (did you mean `{m}`?)" for m in difflib.get_close_matches(key, names, n=1))
                 for key in unknown]
        raise OWLConfigError(f"Unknown {owner} key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; fix or remove "
                             f"it (the fields are documented in `help({owner})`).")


# How a pruned model's weights are saved (`save_pruned(save_format=...)`, `prune --format`; docs/checkpoints.md):
# optimum-owl's compact bitmask format (the default), compressed-tensors' sparse-bitmask layout, plain dense tensors.
SAVE_FORMATS = ("compact", "compressed-tensors", "dense")


def check_save_format(save_format: str | None, dense: bool = False, field: str = "save_format") -> str:
    """The save format to use: `save_format` (one of `SAVE_FORMATS`), or `"dense"` / `"compact"` from the older
    `dense` flag when it is None. Raises `ValueError` naming `field` for an unknown or contradicting value."""
    if save_format is None:
        return "dense" if dense else "compact"
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"{field} must be one of {SAVE_FORMATS}, got {save_format!r}.")
    if dense and save_format != "dense":
        raise ValueError(f"dense=True (--dense-checkpoint) contradicts {field}={save_format!r}; pass only {field}.")
    return save_format

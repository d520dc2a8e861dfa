"""`OWLPrunerConfig` <-> `optimum-owl prune` flags, built from the config's fields (no flag is written by hand).

Each field with a flag carries its help text and help group in `field(metadata={"help": ..., "group": ...})`
(the peft convention; `config._flag`); a field without one says `metadata={"flag": False}`. Everything else about a
flag is derived from the field: `--field-name`, its type (from the default), `choices` (`config.FIELD_CHOICES`), the
default shown in the help, and `default=argparse.SUPPRESS`, so a flag that is not given leaves the field out and the
config's own default applies. `commands/prune.py` (the parser) and `hub/card.py` (the reproduce command) import this
module, which sits beside the config, below both.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .algorithms.families import family_names, get_family
from .config import FIELD_CHOICES, NON_RESULT_FIELDS, OWLPrunerConfig

_FIELDS = {f.name: f for f in dataclasses.fields(OWLPrunerConfig)}
# the registered families whose knobs are flags of the "families" group (named in that group's title)
_KNOB_FAMILIES = [n for n in family_names() if any(_FIELDS[k].metadata.get("group") == "families"
                                                   for k in get_family(n).knobs if k in _FIELDS)]
# The help groups of `optimum-owl prune --help`, in order: the metadata "group" of a field -> the group's title.
GROUPS = {
    "pruning": "pruning",
    "criteria": "criteria",
    "refinement": "refinement (DSnoT)",
    "families": f"allocation families (--layerwise {' | '.join(_KNOB_FAMILIES)})",
    "search": "search (--layerwise owl-auto | auto)",
    "memory": "memory and resuming (docs/scale.md)",
    "values": "int8 values (docs/checkpoints.md)",
}
_unknown = {name: f.metadata["group"] for name, f in _FIELDS.items() if "group" in f.metadata
            and f.metadata["group"] not in GROUPS}
if _unknown:
    raise ValueError(f"OWLPrunerConfig fields {_unknown} name a help group not in config_flags.GROUPS ({list(GROUPS)}).")
# Every config field with a flag, by help group, then in field order. All optional: a flag left out keeps the default.
OPTIONAL_FIELDS = tuple(name for group in GROUPS for name, f in _FIELDS.items() if f.metadata.get("group") == group)


def config_default(name: str) -> Any:
    """The default of `OWLPrunerConfig.<name>` (for help texts, the flag's type, and the reproduce command)."""
    f = _FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def flag_name(name: str) -> str:
    """`--field-name` of config field `field_name`."""
    return "--" + name.replace("_", "-")


def _flag_kwargs(name: str) -> dict[str, Any]:
    """argparse keyword arguments of the flag of config field `name`, derived from the field."""
    default = config_default(name)
    if isinstance(default, bool):
        return {"action": "store_true"}
    if default is None and "list[float]" in str(_FIELDS[name].type):  # an optional list of numbers
        return {"type": float, "nargs": "+", "metavar": name.rsplit("_", 1)[-1].upper().removesuffix("S")}
    if default is None and str(_FIELDS[name].type).startswith("int"):  # an optional integer
        return {"type": int, "metavar": "N"}
    if isinstance(default, list):
        if not default:  # a list of strings given one per flag (`--ignore a --ignore b`)
            return {"action": "append", "metavar": name.upper().removesuffix("S")}
        return {"type": type(default[0]), "nargs": "+", "metavar": name.rsplit("_", 1)[-1].upper().removesuffix("S")}
    kwargs: dict[str, Any] = {}
    if isinstance(default, (int, float)):
        kwargs["type"] = type(default)
    if name in FIELD_CHOICES:
        kwargs.update(type=str.lower, choices=FIELD_CHOICES[name]())
    return kwargs


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `OWLPrunerConfig` field with a help group, in `GROUPS`; each help text shows the default."""
    for group, title in GROUPS.items():
        arguments = p.add_argument_group(title)
        for name in OPTIONAL_FIELDS:
            if _FIELDS[name].metadata["group"] != group:
                continue
            default = config_default(name)
            shown = " ".join(str(v) for v in default) if isinstance(default, list) else default
            shown = "not set" if shown is None or shown == "" else shown
            arguments.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS,
                                   help=f"{_FIELDS[name].metadata['help']} (default: {shown})", **_flag_kwargs(name))


def config_from_args(args: argparse.Namespace) -> OWLPrunerConfig:
    """Build and validate the `OWLPrunerConfig`; flags that were not given keep the config's defaults."""
    return OWLPrunerConfig(**{name: getattr(args, name) for name in OPTIONAL_FIELDS if hasattr(args, name)})


def config_flags(cfg: dict[str, Any]) -> list[str]:
    """The `optimum-owl prune` flags that rebuild the config dict `cfg` through `config_from_args` (its inverse, up
    to the fields that do not change the result: `config.NON_RESULT_FIELDS`). Derived from `OPTIONAL_FIELDS`: the
    "pruning" group is always written (a readable command), every other flag when its value differs from the
    config's default, so a new field with a flag is reproduced without touching this function."""
    out: list[str] = []
    for name in OPTIONAL_FIELDS:
        if name in NON_RESULT_FIELDS or name not in cfg:
            continue
        value, default = cfg[name], config_default(name)
        if value is None or value is False or value == [] or (_FIELDS[name].metadata["group"] != "pruning"
                                                              and value == default):
            continue
        if value is True:
            out.append(flag_name(name))
        elif _flag_kwargs(name).get("action") == "append":
            out += [item for v in value for item in (flag_name(name), str(v))]
        elif isinstance(value, (list, tuple)):
            out += [flag_name(name), *(str(v) for v in value)]
        else:
            out += [flag_name(name), str(value)]
    return out

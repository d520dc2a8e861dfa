"""One module per `optimum-owl` subcommand (see `optimum_owl.cli`), plus argument types they share."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
          "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_arg(value: str) -> str:
    """`--dtype` values: a canonical torch dtype name (`float32`, `float16`, `bfloat16`) or `auto`; aliases accepted."""
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {value!r}; use auto, float32, float16 or bfloat16 (aliases fp32, fp16, half, bf16)"
        ) from None


def int_at_least(minimum: int):
    """An argparse type: an integer `>= minimum`."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def existing_file(value: str) -> str:
    """A path argument that must name an existing file (a missing one is an argparse error, never read as text)."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; pass a .txt, .jsonl or .json file")
    return value

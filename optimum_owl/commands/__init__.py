"""One module per `optimum-owl` subcommand (see `optimum_owl.cli`), plus argument types they share."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

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


def fraction(value: str) -> float:
    """An argparse type: a number in [0, 1] (a share of weights, e.g. `--min-sparsity 0.5`)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (e.g. 0.5 for 50%), got {value}")
    return number


def existing_file(value: str) -> str:
    """A path argument that must name an existing file (a missing one is an argparse error, never read as text)."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; pass a .txt, .jsonl or .json file")
    return value


def add_model_source_arguments(p: argparse.ArgumentParser, tokenizer_help: str = "tokenizer path (default: MODEL)") -> None:
    """`--tokenizer` and `--gguf-file`: the flags of every subcommand that reads a model (see `load_model_arg`)."""
    p.add_argument("--tokenizer", default=None, help=tokenizer_help)
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="read MODEL from this GGUF file inside the MODEL folder (transformers de-quantizes it to "
                   "float; needs `pip install gguf`); its tokenizer too unless --tokenizer is given")


def check_model_args(args: argparse.Namespace) -> None:
    """Check MODEL (and `--tokenizer` when given) before anything is loaded: a missing local path, or a Hub id while
    HF_HUB_OFFLINE is set or the Hub cannot be reached, is one error naming it at once, without Hub retries
    (`pruning.sources.check_model_source`; `load_model_arg` and `load_tokenizer_arg` run it too)."""
    from ..pruning.sources import check_model_source

    check_model_source(str(args.model), "Model", filename=getattr(args, "gguf_file", None) or "config.json")
    if getattr(args, "tokenizer", None):
        check_model_source(str(args.tokenizer), "Tokenizer (--tokenizer)", filename="tokenizer_config.json")


def load_model_arg(args: argparse.Namespace, **kwargs: Any) -> Any:
    """The model named by `args.model` (and `args.gguf_file`), loaded by `pruning.modeling.load_model`."""
    from ..pruning.modeling import load_model

    return load_model(args.model, gguf_file=getattr(args, "gguf_file", None), **kwargs)


def load_tokenizer_arg(args: argparse.Namespace, needed_for: str | None) -> Any:
    """The tokenizer of `--tokenizer` (default: MODEL, read from `--gguf-file` when given).

    `needed_for` says what needs it (e.g. "--calibration text"): a tokenizer that cannot be loaded is then an error
    naming the source and the flag. `None`: it is optional (only saved beside the output), and a model without
    tokenizer files gives `None` with a log line.
    """
    from transformers import AutoTokenizer

    from ..pruning.sources import check_model_source

    if args.tokenizer:  # MODEL was checked when it was loaded
        check_model_source(str(args.tokenizer), "Tokenizer (--tokenizer)", filename="tokenizer_config.json")
    source = args.tokenizer or args.model
    gguf = getattr(args, "gguf_file", None)
    kwargs = {"gguf_file": gguf} if gguf and not args.tokenizer else {}
    try:
        return AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())
        if needed_for is None:
            logger.warning("No tokenizer loaded from %s (none is needed for this run; the output gets no tokenizer "
                           "files): %s", source, reason)
            return None
        raise OSError(
            f"{needed_for} needs a tokenizer, and none could be loaded from {source}: {reason} Pass --tokenizer with "
            "a folder holding tokenizer.json (or tokenizer.model with sentencepiece installed)."
        ) from err


# Parsed arguments that are never paths (subcommand names, flags' bookkeeping).
_NOT_PATHS = ("func", "command", "format", "verbose")


def args_input_paths(args: argparse.Namespace, output: str) -> dict[str, str]:
    """Every argument of `args` (but the output argument `output`) that names an existing local file or folder, as
    `{description: path}` for `utils.check_output_dir(inputs=...)`: the positional MODEL is "input model", any
    other is its flag (`--calibration`, `--tokenizer`, `--eval-text`, ...). Flags added later are covered too."""
    from ..utils import local_paths

    found: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest == output or dest in _NOT_PATHS:
            continue
        label = "input model" if dest == "model" else "--" + dest.replace("_", "-")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(values):
            found[label if len(values) == 1 else f"{label} #{i + 1}"] = item
    return local_paths(found)

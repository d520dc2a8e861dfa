"""`optimum-owl` console script: argparse front-end over the public API (no pruning logic lives here).

Each subcommand is a module in `optimum_owl.commands` exposing `register(subparsers)`; the parser it adds
sets `func=` to a callable taking the parsed `argparse.Namespace` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# One module per subcommand; a module whose optional dependency is missing is skipped with a hint at run time.
SUBCOMMAND_MODULES = (
    "optimum_owl.commands.prune",
    "optimum_owl.commands.evaluate",
    "optimum_owl.commands.demo",
    "optimum_owl.commands.push",
    "optimum_owl.commands.export",
    "optimum_owl.commands.repair",
    "optimum_owl.commands.generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-owl",
        description="Prune Hugging Face transformers with OWL (Outlier Weighed Layerwise sparsity).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.captureWarnings(True)  # warnings print once, formatted like the log lines
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"optimum-owl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error is one line; -v re-raises for the traceback
        if args.verbose:
            raise
        code, message = _describe_error(err)
        print(f"optimum-owl {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        logging.captureWarnings(False)


def _describe_error(err: Exception) -> tuple[int, str]:
    """(exit code, one-line message): 2 for bad input (ValueError, OSError, ImportError: the message says what and
    how to fix it), 1 for failures of the work itself (a failed upload) and for unexpected errors (named by type)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, OSError, ImportError)):
        return 2, text
    if type(err).__name__ == "HubUploadError":
        return 1, text
    return 1, f"{type(err).__name__}: {text} (unexpected; rerun with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())

"""`optimum-cli owl ...`: optimum-owl's commands inside the Optimum CLI.

optimum (>= 2.0) loads every module of the PEP 420 namespace `optimum.commands.register` and registers the commands
listed in its `REGISTER_COMMANDS`. This file ships in the optimum-owl wheel (there is deliberately no `__init__.py`
in `optimum/`, `optimum/commands/` or `optimum/commands/register/`). Everything after `owl` is handed to the
`optimum-owl` console script, so `optimum-cli owl prune MODEL --output-dir OUT` equals
`optimum-owl prune MODEL --output-dir OUT`, and `optimum-cli owl --help` prints optimum-owl's own help. Imports stay
inside `run()` and the help action to keep `optimum-cli` startup fast.
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class _OWLHelp(argparse._HelpAction):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from optimum_owl.cli import build_parser

        build_parser().print_help()
        parser.exit(0)


class OWLCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="owl",
        help="Prune models with OWL (Outlier Weighed Layerwise sparsity); `optimum-cli owl --help` lists commands.",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        # `optimum-cli owl -h/--help` shows optimum-owl's help (its commands), not this wrapper's one argument.
        for action in parser._actions:  # argparse has no public way to replace the built-in help action
            if isinstance(action, argparse._HelpAction):
                action.__class__ = _OWLHelp
        parser.add_argument(
            "owl_args",
            nargs=argparse.REMAINDER,
            metavar="COMMAND [ARGS]",
            help="an optimum-owl command and its arguments, e.g. `prune MODEL --output-dir OUT`",
        )

    def run(self) -> None:
        from optimum_owl.cli import build_parser, main

        args = list(self.args.owl_args or [])
        if not args:
            build_parser().print_help()
            raise SystemExit(2)
        code = main(args)
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [OWLCommand]

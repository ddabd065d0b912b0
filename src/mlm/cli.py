"""Command line: parse arguments and call one function per subcommand. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from mlm.errors import UserError


# ---- glue ------------------------------------------------------------------------------------
def _add_glue(subparsers) -> None:
    p = subparsers.add_parser("glue", help="fine-tune and evaluate checkpoints on GLUE")
    p.set_defaults(func=_run_glue)


def _run_glue(args: argparse.Namespace) -> None:
    raise UserError("mlm glue is not available yet")


# ---- end glue --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlm", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_glue(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

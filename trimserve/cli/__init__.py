"""The `trimserve` command: one sub-command per module, each a thin layer over library calls.

`model` (fetch the embedded default model), `eval` (perplexity and accuracy), `prune` (build
sparse and depth variants; `depth-scan` charts layer scores), `serve` (the server or gateway),
`bench` (the load generator) and `report` (the A/B report). Errors a user can fix print one
`trimserve: error: ...` line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from evaluation.records import DataError
from service.backend import BackendError
from variants.format import VariantError
from variants.load import ModelLoadError

USER_ERRORS = (DataError, ModelLoadError, VariantError, BackendError, ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    from trimserve.cli import bench, eval, model, prune, report, serve

    parser = argparse.ArgumentParser(prog="trimserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (model, eval, prune, serve, bench, report):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        print(f"trimserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trimserve: interrupted", file=sys.stderr)
        return 130

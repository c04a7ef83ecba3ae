"""The `trimserve` command: one entry point over the pruning and serving sub-commands."""

from __future__ import annotations

import argparse
import logging
import sys

from evaluation.records import DataError
from pruning.artifacts import VariantError
from pruning.models import ModelLoadError
from service.backend import BackendError

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, ModelLoadError, VariantError, BackendError, ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    from pruning import cli as pruning_cli
    from service import cli as service_cli
    from trimserve import report

    parser = argparse.ArgumentParser(prog="trimserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pruning_cli.register(sub)
    service_cli.register(sub)
    report.register(sub)
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


if __name__ == "__main__":
    sys.exit(main())

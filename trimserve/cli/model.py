"""`trimserve model fetch [NAME]`: convert an embedded model into a cached safetensors checkpoint."""

from __future__ import annotations

import argparse

from variants.load import EMBEDDED, fetch_embedded
from variants.store import DEFAULT_MODEL


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="fetch and inspect models")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser("fetch", help="convert a built-in model to a cached safetensors checkpoint")
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED))
    fetch.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> int:
    print(fetch_embedded(args.name))
    return 0

"""gpufleet logs: show a run's output (streamed by the server from the run's host)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    lg = sub.add_parser("logs", help="show a run's output")
    add_name(lg)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--node", type=int, default=0, help="multi-node runs: the node's rank (default 0)")
    lg.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    out = sys.stdout.buffer
    for chunk in connect().chunks(f"/api/runs/{args.name}/logs", follow=args.follow, node=args.node):
        out.write(chunk)
        out.flush()
    return EXIT_OK

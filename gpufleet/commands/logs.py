"""gpufleet logs: show a run's output."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet.commands.common import add_name


def register(sub) -> None:
    lg = sub.add_parser("logs", help="show a run's output")
    add_name(lg)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--node", type=int, default=0, help="multi-node runs: the node's rank (default 0)")
    lg.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import logs

    return logs(args.name, follow=args.follow, node=args.node)

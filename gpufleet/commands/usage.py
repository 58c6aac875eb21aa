"""gpufleet usage: GPU-hours per project and user, and the decayed GPU-hours that fair share orders
waiting runs by (docs/teams.md)."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json, add_project, project, show
from gpufleet.errors import UsageError


def register(sub) -> None:
    u = sub.add_parser("usage", help="GPU-hours per project and user (what fair share weighs)")
    add_project(u)
    u.add_argument("--since", metavar="DURATION", help="only the last DURATION: 90s, 30m, 2h, 7d, 1w "
                                                       "(default: the server's)")
    add_json(u)
    u.set_defaults(func=run)


def since_seconds(text: str) -> int:
    """--since as whole seconds, in the duration forms of run configurations."""
    from gpufleet.models import parse_duration

    try:
        seconds = parse_duration(text, "--since")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if seconds <= 0:
        raise UsageError(f"--since must be more than 0 seconds, not {text!r}")
    return int(seconds)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    since = since_seconds(args.since) if args.since is not None else None
    client = connect()
    rows = client.get("/api/usage", project=project(args, client), since=since)
    if args.since and not args.json:
        present.dim(console, f"over the last {args.since}")
    return show(console, args, rows, present.usage_table, "No usage.")

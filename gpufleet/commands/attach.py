"""gpufleet attach: forward a run's ports to localhost; a shell for dev environments."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet.commands.common import add_name


def register(sub) -> None:
    at = sub.add_parser("attach", help="forward a run's ports to localhost; a shell for dev environments")
    add_name(at)
    at.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import attach

    return attach(args.name, console)

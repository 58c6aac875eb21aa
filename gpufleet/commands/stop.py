"""gpufleet stop: stop a run and free its blocks."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    st = sub.add_parser("stop", help="stop a run and free its blocks")
    add_name(st, confirm=True)
    st.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import stop

    if not args.yes and not present.confirm(console, f"Stop run {args.name}?"):
        return EXIT_OK
    view = stop(args.name)
    present.plain(console, f"{view.name} stopped; its blocks are free.")
    return EXIT_OK

"""gpufleet stop: stop a run and free its blocks; a waiting run is taken out of the queue."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    st = sub.add_parser("stop", help="stop a run and free its blocks (a waiting one leaves the queue)")
    add_name(st, confirm=True)
    st.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import Run

    if not args.yes and not present.confirm(console, f"Stop run {args.name}?"):
        return EXIT_OK
    view = Run.model_validate(connect().post(f"/api/runs/{args.name}/stop"))
    if view.started_at is None:
        present.plain(console, f"{view.name} cancelled; it had not started.")
    else:
        present.plain(console, f"{view.name} stopped; its blocks are free.")
    return EXIT_OK

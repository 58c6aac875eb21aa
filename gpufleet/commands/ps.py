"""gpufleet ps: list runs, their status refreshed from the hosts."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    ps = sub.add_parser("ps", help="list runs (status refreshed from the hosts)")
    ps.add_argument("-a", "--all", action="store_true", help="include finished runs")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import refresh
    from gpufleet.state import Store

    store = Store()
    notes: list[str] = []
    refresh(store, sweep=True, notes=notes)
    for note in notes:
        present.note(Console(stderr=True), "warning", note)
    views = store.runs(include_finished=args.all)
    if args.json:
        print(present.runs_json(views))
    elif not views:
        console.print("No runs." if args.all else "No active runs (gpufleet ps -a shows finished ones).")
    else:
        console.print(present.ps_table(views))
    return EXIT_OK

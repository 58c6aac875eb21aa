"""gpufleet ps: list runs as the server knows them (it asks the hosts in the background)."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_project, project
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    ps = sub.add_parser("ps", help="list runs: waiting (with why and their place in the queue), running, and "
                                   "with -a finished")
    ps.add_argument("-a", "--all", action="store_true", help="include finished runs")
    ps.add_argument("--json", action="store_true")
    add_project(ps)
    ps.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import Run

    client = connect()
    views = [Run.model_validate(r) for r in client.get("/api/runs", all=args.all,
                                                                  project=project(args, client))]
    if project(args, client) is None:  # every run this user sees: drop the ssh entries of dev environments gone
        from gpufleet import devssh

        devssh.remove_entries(keep={v.name for v in views if v.live}, server=client.url)
    if args.json:
        print(present.runs_json(views))
    elif not views:
        console.print("No runs." if args.all else "No active runs (gpufleet ps -a shows finished ones).")
    else:
        console.print(present.ps_table(views))
    if not args.json:  # GPUs no new run gets (a job outside gpufleet, a fault): why a run may wait
        from gpufleet.errors import NotFound

        try:
            kept = [g for g in client.get("/api/gpus", project=project(args, client))
                    if g["status"] in ("outside", "unhealthy")]
        except NotFound:  # a server from before the GPU view
            kept = []
        if kept:
            console.print(present.kept_gpus_table(kept))
    return EXIT_OK

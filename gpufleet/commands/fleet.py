"""gpufleet fleet list|delete."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json, add_name, add_project, project
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    f = sub.add_parser("fleet", help="list or delete fleets")
    fs = f.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    fl = fs.add_parser("list", help="list fleets and their instances")
    add_json(fl)
    add_project(fl)
    fl.set_defaults(func=list_fleets)
    fd = fs.add_parser("delete", help="delete a fleet (refused while it runs workloads)")
    add_name(fd, confirm=True)
    fd.set_defaults(func=delete)


def list_fleets(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import FleetState

    client = connect()
    views = [FleetState.model_validate(f) for f in client.get("/api/fleets", project=project(args, client))]
    if args.json:
        print(present.fleets_json(views))
    elif not views:
        console.print("No fleets. Create one with: gpufleet apply -f FLEET.yml")
    else:
        console.print(present.fleet_table(views))
    return EXIT_OK


def delete(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    client = connect()
    client.get(f"/api/fleets/{args.name}")  # a fleet that does not exist is said before asking
    if not args.yes and not present.confirm(console, f"Delete fleet {args.name}?"):
        return EXIT_OK
    client.delete(f"/api/fleets/{args.name}")
    present.plain(console, f"Fleet {args.name} deleted.")
    return EXIT_OK

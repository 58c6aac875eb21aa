"""gpufleet whoami: who the server takes this CLI for (GET /api/me): name, role, projects, and the
project commands work in by default."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    w = sub.add_parser("whoami", help="your user name, role and projects on the server")
    add_json(w)
    w.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.commands.login import show_me

    client = connect()
    me = client.get("/api/me")
    if args.json:
        print(json.dumps({**me, "server": client.url, "project": client.project}, indent=2))
        return EXIT_OK
    present.plain(console, f"{me['name']} ({me['role']}) on {client.url}")
    show_me(console, me, client.project)
    return EXIT_OK

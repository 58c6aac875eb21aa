"""gpufleet events: what happened, oldest first: runs submitted, queued (and why), started (where),
ended (exit code, or who stopped them), hosts unreachable and back."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_project, project
from gpufleet.errors import EXIT_OK

POLL_S = 0.5


def register(sub) -> None:
    ev = sub.add_parser("events", help="what happened to runs and hosts")
    ev.add_argument("--run", help="only this run's events")
    ev.add_argument("-f", "--follow", action="store_true", help="keep printing events as they happen (Ctrl-C ends)")
    ev.add_argument("-n", "--last", type=int, default=100, help="show the last N events first (default 100)")
    ev.add_argument("--json", action="store_true", help="JSON: a list; with -f, one object per line")
    add_project(ev)
    ev.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import Event

    client = connect()
    where = {"run": args.run, "project": project(args, client)}
    found = [Event.model_validate(e) for e in _all(client, where)]
    shown = found[-args.last:] if args.last > 0 else []
    if args.json and not args.follow:
        print(json.dumps([e.model_dump(mode="json") for e in shown], indent=2))
        return EXIT_OK
    if not args.follow:
        if shown:
            console.print(present.events_table(shown))
        else:
            console.print("No events.")
        return EXIT_OK
    after = found[-1].id if found else 0
    try:
        while True:
            for e in shown:
                if args.json:
                    print(json.dumps(e.model_dump(mode="json")), flush=True)
                else:
                    console.print(present.event_line(e), highlight=False, soft_wrap=True)
            time.sleep(POLL_S)
            shown = [Event.model_validate(e) for e in client.get("/api/events", **where, after=after)]
            if shown:
                after = shown[-1].id
    except KeyboardInterrupt:
        return EXIT_OK


def _all(client, where: dict) -> list[dict]:
    out: list[dict] = []
    after = 0
    while True:
        page = client.get("/api/events", **where, after=after, limit=10000)
        out += page
        if len(page) < 10000:
            return out
        after = page[-1]["id"]

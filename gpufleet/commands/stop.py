"""gpufleet stop: stop a run and free its blocks; a waiting run is taken out of the queue."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK, GpufleetError

WAIT_S = 600.0  # how long `stop` waits for the server to stop the containers (their grace is at most this, mostly)


def register(sub) -> None:
    st = sub.add_parser("stop", help="stop a run and free its blocks (a waiting one leaves the queue)")
    add_name(st, confirm=True)
    st.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import Run, RunStatus

    if not args.yes and not present.confirm(console, f"Stop run {args.name}?"):
        return EXIT_OK
    client = connect()
    view = Run.model_validate(client.post(f"/api/runs/{args.name}/stop"))
    if view.spec.get("type") == "dev-environment":
        from gpufleet import devssh

        devssh.remove_entries(drop={view.name}, server=client.url)  # its `ssh NAME` entry, if attach wrote one
    if view.started_at is None:
        present.plain(console, f"{view.name} cancelled; it had not started.")
        return EXIT_OK
    deadline = time.monotonic() + WAIT_S
    while view.status == RunStatus.STOPPING and time.monotonic() < deadline:  # the server stops its containers
        time.sleep(0.2)
        view = Run.model_validate(client.get(f"/api/runs/{args.name}"))
    if view.status == RunStatus.STOPPING:
        raise GpufleetError(f"{view.name} is still stopping after {WAIT_S:.0f}s "
                            f"(see gpufleet events --run {view.name})")
    if view.live:
        raise GpufleetError(f"could not stop {view.name}: {view.message}")
    present.plain(console, f"{view.name} stopped; its blocks are free.")
    return EXIT_OK

"""gpufleet attach: forward a run's ports to localhost; a shell for dev environments.

The server says where the run is (its host, the fleet's ssh_config, the ports). On the machine that
has the fleet's files (the server's), the ssh session is this machine's own, through the fleet's
jump chain. Elsewhere (a user with a token and no key), or with --through-server, each connection to
a local port is carried by the server, and so is a dev environment's shell (gpufleet.tunnel): the
command then exits with the shell's status."""

from __future__ import annotations

import argparse
import os
import subprocess

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK, GpufleetError


def register(sub) -> None:
    at = sub.add_parser("attach", help="forward a run's ports to localhost; a shell for dev environments")
    add_name(at)
    at.add_argument("--through-server", action="store_true",
                    help="carry the ports and a dev environment's shell through the gpufleet server (the default "
                         "where this machine has no copy of the fleet's ssh_config)")
    at.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    client = connect()
    plan = client.get(f"/api/runs/{args.name}/attach")
    if args.through_server or not has_fleet_files(plan["ssh_config"]):
        return _through_server(client, args.name, plan, console)
    for local, remote in plan.get("bound", plan["forwards"]):  # `*:PORT`: the local port picked for it
        present.plain(console, f"forwarding localhost:{local} -> {plan['alias']}:{remote} (through the jump chain)")
    if plan["shell"]:
        return subprocess.run(plan["argv"]).returncode
    if not plan["forwards"]:
        raise GpufleetError(f"run {args.name} has no ports to forward")
    console.print("press Ctrl-C to stop forwarding")
    try:
        return subprocess.run(plan["argv"]).returncode
    except KeyboardInterrupt:
        return EXIT_OK


def has_fleet_files(ssh_config: str) -> bool:
    """Whether this machine has the fleet's files: the server's ssh_config is in this state directory
    (the server's own, as its admin has it) and readable. Anyone else goes through the server."""
    from pathlib import Path

    from gpufleet.paths import home

    path = Path(ssh_config)
    return path.is_relative_to(home()) and os.access(path, os.R_OK)


def _through_server(client, name: str, plan: dict, console: Console) -> int:
    import threading

    from gpufleet.tunnel import Forwarder, open_shell, run_shell

    if not plan["forwards"] and not plan["shell"]:
        raise GpufleetError(f"run {name} has no ports to forward")
    forwarder = Forwarder(client, name, [(int(local), int(remote)) for local, remote in plan["forwards"]])
    forwarder.listen()
    try:
        ws = open_shell(client, name) if plan["shell"] else None  # refused before anything is said
        for local, remote in forwarder.forwards:
            present.plain(console, f"forwarding localhost:{local} -> {name}:{remote} (through the gpufleet "
                                   f"server at {client.url})")
        if ws is not None:  # the ports in the background, the shell in the foreground: its end ends both
            threading.Thread(target=forwarder.serve, daemon=True, name="gpufleet-forwarder").start()
            return run_shell(ws)
        console.print("press Ctrl-C to stop forwarding")
        try:
            forwarder.serve()
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    finally:
        forwarder.close()

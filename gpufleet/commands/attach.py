"""gpufleet attach: forward a run's ports to localhost; a shell for dev environments.

The server says where the run is (its host, the fleet's ssh_config, the ports); the ssh session is
this machine's own, through the fleet's jump chain."""

from __future__ import annotations

import argparse
import subprocess

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK, GpufleetError


def register(sub) -> None:
    at = sub.add_parser("attach", help="forward a run's ports to localhost; a shell for dev environments")
    add_name(at)
    at.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from gpufleet.client import connect

    plan = connect().get(f"/api/runs/{args.name}/attach")
    if not Path(plan["ssh_config"]).exists():
        raise GpufleetError(f"attach runs ssh from this machine, which has no {plan['ssh_config']}: run it where "
                            "the fleet's files are (the server's machine)")
    for local, remote in plan["forwards"]:
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

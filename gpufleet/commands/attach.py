"""gpufleet attach: forward a run's ports to localhost; a shell for dev environments.

The server says where the run is (its host, the fleet's ssh_config, the ports). On the machine that
has the fleet's files (the server's), the ssh session is this machine's own, through the fleet's
jump chain. Elsewhere (a user with a token and no key), or with --through-server, each connection to
a local port is carried by the server, and so is a dev environment's shell (gpufleet.tunnel): the
command then exits with the shell's status.

A dev environment also gets an entry in ~/.ssh (gpufleet.devssh): `ssh NAME` and the IDE's link reach
its sshd through the server's tunnel (`gpufleet ssh-proxy NAME PORT`, the entry's ProxyCommand)."""

from __future__ import annotations

import argparse
import os
import subprocess

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_name
from gpufleet.errors import EXIT_OK, GpufleetError


def register(sub) -> None:
    at = sub.add_parser("attach", help="forward a run's ports to localhost; a shell and `ssh NAME` for dev "
                                       "environments")
    add_name(at)
    at.add_argument("--through-server", action="store_true",
                    help="carry the ports and a dev environment's shell through the gpufleet server (the default "
                         "where this machine has no copy of the fleet's ssh_config)")
    at.add_argument("--no-shell", action="store_true",
                    help="a dev environment: write its ssh entry (ssh NAME), print how to connect, and exit "
                         "without opening a shell or forwarding ports")
    at.set_defaults(func=run)
    # the ProxyCommand of a dev environment's ssh entry (written by attach): not for people to type
    px = sub.add_parser("ssh-proxy")
    px.add_argument("name")
    px.add_argument("port", type=int)
    px.set_defaults(func=proxy)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    client = connect()
    plan = client.get(f"/api/runs/{args.name}/attach")
    if plan["shell"]:
        ssh_entry(client, args.name, console)
        if args.no_shell:
            return EXIT_OK
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


def ssh_entry(client, name: str, console: Console) -> bool:
    """Write dev environment ``name``'s entry in ~/.ssh/gpufleet/config (this machine's key let into its
    sshd, its host key pinned), drop the entries of dev environments that are gone, and say how to
    connect. A dev environment without an SSH server is said, not an error (its shell still opens)."""
    from gpufleet import devssh
    from gpufleet.paths import home

    try:
        identity, public = devssh.user_key(home())
        access = client.post(f"/api/runs/{name}/ssh", {"public_key": public})
        live = {r["name"] for r in client.get("/api/runs") if r.get("spec", {}).get("type") == "dev-environment"}
        devssh.remove_entries(keep=live | {name}, server=client.url)  # those of dev environments gone
        config = devssh.write_entry(name, access["port"], access["user"], access["host_key"], identity, client.url)
    except (GpufleetError, OSError, ValueError) as e:
        present.plain(console, f"no `ssh {name}`: {getattr(e, 'strerror', None) or e}")
        return False
    present.plain(console, f"ssh entry for {name} written to {config}")
    present.plain(console, f"  ssh {name}")
    present.plain(console, f"  {devssh.ide_link(access.get('ide'), name, access['workdir'])}")
    return True


def proxy(args: argparse.Namespace, console: Console) -> int:
    """Carry ssh's connection (this process's stdin and stdout) to port ``port`` of dev environment
    ``name`` through the server's tunnel."""
    import sys

    from gpufleet.client import connect
    from gpufleet.errors import EXIT_FAILED
    from gpufleet.tunnel import carry_stdio, open_tunnel

    ws = open_tunnel(connect(), args.name, args.port)
    why = carry_stdio(ws)
    if why:
        print(f"gpufleet ssh-proxy: {args.name}: {why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK

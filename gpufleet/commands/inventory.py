"""gpufleet inventory: write the Ansible inventory, ssh_config and known_hosts of a fleet."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from gpufleet import present
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    i = sub.add_parser("inventory", help="write the Ansible inventory and ssh_config for a fleet")
    i.add_argument("-f", "--file", required=True)
    i.add_argument("--out", help="folder to write to (default: the fleet's state folder)")
    i.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet import paths
    from gpufleet.client import connect
    from gpufleet.config import load_fleet
    from gpufleet.errors import NotFound
    from gpufleet.inventory import group_name, write_fleet_files
    from gpufleet.models import FleetState

    fleet = load_fleet(args.file)
    # once the fleet is applied, its hosts' container runtimes (gpufleet_runtime...) go in too, as
    # `gpufleet apply` writes them
    try:
        facts = FleetState.model_validate(connect().get(f"/api/fleets/{fleet.name}")).facts()
    except NotFound:
        facts = {}
    files = write_fleet_files(fleet, Path(args.out) if args.out else None, facts=facts)
    hosts = [t.alias for t in fleet.targets]
    inventory = files.inventory
    present.plain(
        console,
        f"inventory:   {inventory}\nssh_config:  {files.ssh_config}\nknown_hosts: {files.known_hosts}\n"
        f"hosts:       {', '.join(hosts)} (group {group_name(fleet.name)})\n\n"
        "Plain Ansible needs nothing else: the inventory passes `-F ssh_config` to ssh (jump hosts, keys,\n"
        "multiplexing), and host keys stay checked (new ones are recorded in known_hosts; a changed one\n"
        "is refused). Keep the three files together.\n\n"
        f"  ansible -i {inventory} all -m ansible.builtin.ping\n"
        f"  ansible-playbook -i {inventory} gpufleet.fleet.probe    # with the gpufleet.fleet collection\n"
        f"  ansible-playbook -i {inventory} {paths.playbook('probe')}\n"
        f"  ssh -F {files.ssh_config} {hosts[0]}\n\n"
        "Collection, roles, inventory plugin and an example playbook: docs/ansible.md")
    return EXIT_OK

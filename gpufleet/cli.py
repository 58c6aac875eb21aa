"""The gpufleet command line. Exit codes: 0 ok, 1 something on a host is not right,
2 bad config or arguments (nothing done), 130 interrupted."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

from gpufleet import __version__, present
from gpufleet.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError, GpufleetError, UsageError


def _apply(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runconfig import RUN_TYPES, config_type

    if config_type(args.file) in RUN_TYPES:
        from gpufleet.runs import submit

        if args.dry_run:
            raise UsageError("--dry-run is for fleets; for runs, answer n at the prompt")
        return submit(args.file, yes=args.yes, detach=args.detach, console=console)
    from gpufleet.apply import apply_fleet

    return apply_fleet(args.file, yes=args.yes, dry_run=args.dry_run, console=console)


def _ps(args: argparse.Namespace, console: Console) -> int:
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


def _logs(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import logs

    return logs(args.name, follow=args.follow, node=args.node)


def _stop(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import stop

    if not args.yes and not present.confirm(console, f"Stop run {args.name}?"):
        return EXIT_OK
    view = stop(args.name)
    console.print(f"{view.name} stopped; its blocks are free.")
    return EXIT_OK


def _attach(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runs import attach

    return attach(args.name, console)


def _fleet_list(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.state import Store

    views = Store().fleets()
    if args.json:
        print(present.fleets_json(views))
    elif not views:
        console.print("No fleets. Create one with: gpufleet apply -f FLEET.yml")
    else:
        console.print(present.fleet_table(views))
    return EXIT_OK


def _fleet_delete(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.state import Store

    store = Store()
    if store.fleet(args.name) is None:
        raise GpufleetError(f"no fleet named {args.name!r} (see gpufleet fleet list)")
    if not args.yes and not present.confirm(console, f"Delete fleet {args.name}?"):
        return EXIT_OK
    store.delete_fleet(args.name)
    console.print(f"Fleet {args.name} deleted.")
    return EXIT_OK


def _inventory(args: argparse.Namespace, console: Console) -> int:
    from gpufleet import paths
    from gpufleet.config import load_fleet
    from gpufleet.inventory import group_name, write_fleet_files
    from gpufleet.state import applied_facts

    fleet = load_fleet(args.file)
    # once the fleet is applied, its hosts' container runtimes (gpufleet_runtime...) go in too, as
    # `gpufleet apply` writes them
    files = write_fleet_files(fleet, Path(args.out) if args.out else None, facts=applied_facts(fleet.name))
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
        f"  ansible-playbook -i {inventory} {paths.content_root() / 'playbooks' / 'probe.yml'}\n"
        f"  ssh -F {files.ssh_config} {hosts[0]}\n\n"
        "Collection, roles, inventory plugin and an example playbook: docs/ansible.md")
    return EXIT_OK


def _lab_up(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.lab import core

    core.up(Path(args.dir) if args.dir else core.default_dir(), nodes=args.nodes, gpus=args.gpus,
            vendor=args.vendor, log=console.print)
    return EXIT_OK


def _lab_down(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.lab import core

    core.down(Path(args.dir) if args.dir else core.default_dir(), log=console.print)
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpufleet", description="GPU fleets over SSH, sliced into blocks, "
                                                             "driven by Ansible.")
    p.add_argument("--version", action="version", version=f"gpufleet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("apply", help="apply a fleet, or submit a task, service or dev-environment")
    a.add_argument("-f", "--file", required=True, help="a fleet (dstack SSH-fleet schema) or run configuration")
    a.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument("-d", "--detach", action="store_true", help="runs: do not follow the logs")
    a.add_argument("--dry-run", action="store_true", help="fleets: validate and show the plan; change nothing")
    a.set_defaults(func=_apply)

    ps = sub.add_parser("ps", help="list runs (status refreshed from the hosts)")
    ps.add_argument("-a", "--all", action="store_true", help="include finished runs")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=_ps)
    lg = sub.add_parser("logs", help="show a run's output")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--node", type=int, default=0, help="multi-node runs: the node's rank (default 0)")
    lg.set_defaults(func=_logs)
    st = sub.add_parser("stop", help="stop a run and free its blocks")
    st.add_argument("name")
    st.add_argument("-y", "--yes", action="store_true")
    st.set_defaults(func=_stop)
    at = sub.add_parser("attach", help="forward a run's ports to localhost; a shell for dev environments")
    at.add_argument("name")
    at.set_defaults(func=_attach)

    f = sub.add_parser("fleet", help="list or delete fleets")
    fs = f.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    fl = fs.add_parser("list", help="list fleets and their instances")
    fl.add_argument("--json", action="store_true", help="machine-readable output")
    fl.set_defaults(func=_fleet_list)
    fd = fs.add_parser("delete", help="delete a fleet (refused while it runs workloads)")
    fd.add_argument("name")
    fd.add_argument("-y", "--yes", action="store_true")
    fd.set_defaults(func=_fleet_delete)

    i = sub.add_parser("inventory", help="write the Ansible inventory and ssh_config for a fleet")
    i.add_argument("-f", "--file", required=True)
    i.add_argument("--out", help="folder to write to (default: the fleet's state folder)")
    i.set_defaults(func=_inventory)

    lab = sub.add_parser("lab", help="a local lab of simulated GPU hosts behind a login node")
    ls = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    lu = ls.add_parser("up", help="create the lab (needs root)")
    lu.add_argument("--nodes", type=int, default=2)
    lu.add_argument("--gpus", type=int, default=8)
    lu.add_argument("--vendor", default="nvidia", choices=["nvidia", "amd", "gaudi", "tenstorrent", "mixed", "none"])
    lu.add_argument("--dir", help="where the lab's fleet.yml and keys go (default: $GPUFLEET_HOME/lab)")
    lu.set_defaults(func=_lab_up)
    ld = ls.add_parser("down", help="remove the lab and everything it made")
    ld.add_argument("--dir")
    ld.set_defaults(func=_lab_down)
    return p


def main(argv: list[str] | None = None) -> int:
    # everything gpufleet and its children (ansible-runner artifacts, SQLite's WAL files, ssh
    # sockets) write may hold secrets or keys: private to this user
    os.umask(0o077)
    console = Console()
    err = Console(stderr=True)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    try:
        return args.func(args, console)
    except ConfigError as e:
        for problem in e.problems:
            present.error(err, str(problem))
        return e.exit_code
    except GpufleetError as e:
        present.error(err, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

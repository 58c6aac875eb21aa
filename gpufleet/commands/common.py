"""What several commands share: arguments, showing a list the server answered, deleting by name."""

from __future__ import annotations

import argparse

from gpufleet.errors import EXIT_OK


def add_name(parser: argparse.ArgumentParser, confirm: bool = False) -> None:
    """The NAME argument of a command on one run or fleet, and -y where it asks first."""
    parser.add_argument("name")
    if confirm:
        add_yes(parser)


def add_yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def add_project(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--project P of a command that works in a project."""
    parser.add_argument("--project", metavar="P", required=required,
                        help="the project" if required else
                        "the project (default: the one gpufleet login kept, else the server picks: your only "
                        "project, or default)")


def project(args: argparse.Namespace, client) -> str | None:
    """The project a command works in: --project, else the config file's default for this server,
    else None (the server picks)."""
    return getattr(args, "project", None) or client.project


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def show(console, args: argparse.Namespace, items: list[dict], table, empty: str) -> int:
    """A list the server answered: as JSON with --json, else ``table(items)``, or ``empty`` when none."""
    import json

    from gpufleet import present

    if args.json:
        print(json.dumps(items, indent=2))
    elif not items:
        present.plain(console, empty)
    else:
        console.print(table(items))
    return EXIT_OK


def delete_listed(client, console, args: argparse.Namespace, kind: str, plural: str, after: str = "") -> int:
    """`user delete`, `project delete`: args.name must be in GET /api/{plural} (said before asking),
    then -y or a yes at the [y/n], then DELETE /api/{plural}/NAME."""
    from gpufleet import present
    from gpufleet.client import path
    from gpufleet.errors import NotFound

    if not any(x["name"] == args.name for x in client.get(f"/api/{plural}")):
        raise NotFound(f"no {kind} named {args.name!r} (see gpufleet {kind} list)")
    if not args.yes and not present.confirm(console, f"Delete {kind} {args.name}?"):
        return EXIT_OK
    client.delete(path(plural, args.name))
    present.plain(console, f"{kind.capitalize()} {args.name} deleted{after}.")
    return EXIT_OK

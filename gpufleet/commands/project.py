"""gpufleet project add|list|delete, project member add|remove: projects and their members."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json, add_name, delete_listed, show
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("project", help="add, list or delete projects; add or remove their members")
    ps = p.add_subparsers(dest="project_command", required=True, metavar="ACTION")
    pa = ps.add_parser("add", help="make a project; you are its admin (server admins)")
    pa.add_argument("name")
    pa.set_defaults(func=add)
    pl = ps.add_parser("list", help="list projects and their members (yours; server admins: all)")
    add_json(pl)
    pl.set_defaults(func=list_projects)
    pd = ps.add_parser("delete", help="delete a project (server admins; refused while it has fleets or live runs)")
    add_name(pd, confirm=True)
    pd.set_defaults(func=delete)
    pm = ps.add_parser("member", help="add or remove a project's members (project admins)")
    ms = pm.add_subparsers(dest="member_command", required=True, metavar="ACTION")
    ma = ms.add_parser("add", help="add a member, or change their role")
    ma.add_argument("project")
    ma.add_argument("user")
    ma.add_argument("--admin", action="store_true", help="a project admin (default: a member)")
    ma.set_defaults(func=member_add)
    mr = ms.add_parser("remove", help="remove a member")
    mr.add_argument("project")
    mr.add_argument("user")
    mr.set_defaults(func=member_remove)


def add(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    made = connect().post("/api/projects", {"name": args.name})
    present.plain(console, f"Project {made['name']} made; members: {present.roles(made.get('members') or [], 'user')}")
    return EXIT_OK


def list_projects(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    return show(console, args, connect().get("/api/projects"), present.projects_table, "No projects.")


def delete(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    return delete_listed(connect(), console, args, "project", "projects")


def member_add(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect, path

    role = "admin" if args.admin else "member"
    project = connect().post(path("projects", args.project, "members"), {"user": args.user, "role": role})
    _members(console, project)
    return EXIT_OK


def member_remove(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect, path

    project = connect().delete(path("projects", args.project, "members", args.user))
    _members(console, project)
    return EXIT_OK


def _members(console: Console, project: dict) -> None:
    present.plain(console, f"Project {project['name']}: {present.roles(project.get('members') or [], 'user')}")

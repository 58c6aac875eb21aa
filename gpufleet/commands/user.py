"""gpufleet user add|list|rotate-token|delete: the server's users and their API tokens.

A token is shown once, when it is made or rotated: the server keeps only its hash."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json, add_name, delete_listed, show
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    u = sub.add_parser("user", help="add, list or delete users; rotate API tokens")
    us = u.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    ua = us.add_parser("add", help="add a user and show their token, once (server admins)")
    ua.add_argument("name")
    ua.add_argument("--admin", action="store_true", help="a server admin (default: a user)")
    add_json(ua)
    ua.set_defaults(func=add)
    ul = us.add_parser("list", help="list users, their roles and projects (server admins)")
    add_json(ul)
    ul.set_defaults(func=list_users)
    ur = us.add_parser("rotate-token", help="make a new token (yours, or NAME's for server admins); the old one "
                                            "stops working")
    ur.add_argument("name", nargs="?", help="whose token (default: yours)")
    add_json(ur)
    ur.set_defaults(func=rotate)
    ud = us.add_parser("delete", help="delete a user (server admins; never the last server admin)")
    add_name(ud, confirm=True)
    ud.set_defaults(func=delete)


def add(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    client = connect()
    made = client.post("/api/users", {"name": args.name, "role": "admin" if args.admin else "user"})
    if args.json:
        print(json.dumps({"name": made["name"], "role": made["role"], "token": made["token"]}, indent=2))
        return EXIT_OK
    present.plain(console, f"User {made['name']} ({made['role']}) added. Their API token:")
    _show_token(console, made["token"])
    present.plain(console, f"They log in with: gpufleet login --server {client.url} --token TOKEN\n"
                           f"Add them to a project: gpufleet project member add PROJECT {made['name']}")
    return EXIT_OK


def _show_token(console: Console, token: str) -> None:
    present.plain(console, f"\n    {token}\n")
    present.note(console, "note", "it is shown only now: the server keeps only its hash. Keep it secret.")


def list_users(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    return show(console, args, connect().get("/api/users"), present.users_table, "No users.")


def rotate(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect, path, read_config, same_server, write_config

    client = connect()
    me = client.get("/api/me")["name"]
    name = args.name or me
    answer = client.post(path("users", name, "token"))
    token = answer["token"]
    # the config file held the token this client sent, and it was this user's: it keeps working
    login = read_config()
    kept = (name == me and login is not None and same_server(login.server, client.url)
            and client.uses_token(login.token))
    if kept:
        login.token = token
        write_config(login)
    if args.json:
        print(json.dumps({"name": answer["name"], "token": token}, indent=2))
        return EXIT_OK
    present.plain(console, f"New API token of {answer['name']}; the old one no longer works:")
    _show_token(console, token)
    if kept:
        present.dim(console, "gpufleet login's config file now holds the new token.")
    elif name == me:
        present.note(console, "note", f"this CLI found the old token in {client.token_from}: put the new one "
                                      "there (or run gpufleet login --server URL --token TOKEN)")
    return EXIT_OK


def delete(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    return delete_listed(connect(), console, args, "user", "users", "; their token no longer works")

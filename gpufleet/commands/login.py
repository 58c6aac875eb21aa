"""gpufleet login: keep a server, a token and a default project in $GPUFLEET_HOME/config.json (0600),
after asking the server who the token is (GET /api/me). The token is never printed."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from gpufleet import present
from gpufleet.errors import EXIT_OK, UsageError


def register(sub) -> None:
    lg = sub.add_parser("login", help="log in to a shared gpufleet server (kept in $GPUFLEET_HOME/config.json)")
    lg.add_argument("--server", required=True, metavar="URL", help="the server, e.g. https://gpufleet.example:8300")
    lg.add_argument("--token", metavar="T",
                    help="your API token; `-` reads it from stdin (default: GPUFLEET_TOKEN, else asked for "
                         "on a terminal)")
    lg.add_argument("--project", metavar="P", help="the default project of every command (default: the server "
                                                   "picks: your only project, or default)")
    lg.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import TOKEN_ENV, Client, Login, write_config

    token, token_from = _token(args.token, TOKEN_ENV)
    me = Client(args.server, token, via="--server", token_from=token_from).get("/api/me")
    names = [p["name"] for p in me.get("projects") or []]
    if args.project and args.project not in names and me.get("role") != "admin":
        raise UsageError(f"{me['name']} is not a member of project {args.project}; "
                         f"their projects: {', '.join(names) or 'none'}")
    path = write_config(Login(args.server, token, args.project))
    present.plain(console, f"Logged in to {args.server.rstrip('/')} as {me['name']} ({me['role']}).")
    show_me(console, me, args.project)
    present.dim(console, f"kept in {path} (0600)")
    return EXIT_OK


def show_me(console: Console, me: dict, project: str | None) -> None:
    """Projects and the default project, as login and whoami say them."""
    present.plain(console, f"projects: {present.roles(me.get('projects') or [])}")
    if project:
        present.plain(console, f"default project: {project} (gpufleet login --project)")
    elif me.get("default_project"):
        present.plain(console, f"default project: {me['default_project']} (the server's choice)")
    else:
        present.plain(console, "default project: none; give --project to commands")


def _token(given: str | None, env: str) -> tuple[str, str]:
    """(the token, where it came from): --token, `-` for stdin, GPUFLEET_TOKEN, or asked for."""
    if given == "-":
        return sys.stdin.readline().strip(), "stdin"
    if given:
        return given, "--token"
    if os.environ.get(env):
        return os.environ[env], env
    if not sys.stdin.isatty():
        raise UsageError(f"no token: pass --token T (or --token - to read it from stdin), or set {env}")
    import getpass

    return getpass.getpass("API token: ").strip(), "the prompt"

"""gpufleet server: run the control plane; `server status` and `server stop` for this state
directory's local server (or the one GPUFLEET_SERVER names)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from gpufleet import present
from gpufleet.errors import EXIT_FAILED, EXIT_OK


def register(sub) -> None:
    s = sub.add_parser("server", help="run the control plane (HTTP API, queue, scheduler); status|stop")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, help="port to listen on (default 8300)")
    s.add_argument("--config", type=Path, help="settings file (default: $GPUFLEET_HOME/server.yml if it exists)")
    s.add_argument("--database-url", help="postgresql://user:password@host/db (default: the state directory's "
                                          "SQLite file, or GPUFLEET_DATABASE_URL)")
    s.add_argument("--print-systemd-unit", action="store_true", help="print a systemd unit for this server and exit")
    s.add_argument("--local", action="store_true", help=argparse.SUPPRESS)  # started by the CLI itself
    s.add_argument("--idle-exit", type=float, help=argparse.SUPPRESS)
    s.set_defaults(func=serve)
    ss = s.add_subparsers(dest="server_command", metavar="ACTION")
    st = ss.add_parser("status", help="is a server running for this state directory, and where")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=status)
    sp = ss.add_parser("stop", help="stop this state directory's local server")
    sp.set_defaults(func=stop)


def serve(args: argparse.Namespace, console: Console) -> int:
    from gpufleet import paths
    from gpufleet.server.settings import load_settings

    overrides = {"host": args.host, "port": args.port, "database_url": args.database_url,
                 "idle_exit": args.idle_exit}
    settings = load_settings(args.config, overrides=overrides)
    if args.print_systemd_unit:
        from gpufleet.server.systemd import unit

        exe = shutil.which("gpufleet") or str(Path(sys.executable).parent / "gpufleet")
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        print(unit(str(Path(exe).absolute()), paths.home(), user, args.config.absolute() if args.config else None))
        return EXIT_OK
    if not args.local:  # only a local server exits when idle
        settings = settings.model_copy(update={"idle_exit": 0.0})
    from gpufleet.server.main import serve as run_server

    return run_server(settings, local=args.local)


def _target():
    """The server to ask: GPUFLEET_SERVER's, else the local one if it is up (None if not)."""
    from gpufleet.client import SERVER_ENV, Client, local_server

    if os.environ.get(SERVER_ENV):
        from gpufleet.client import connect

        return connect()
    found = local_server()
    return Client(found["url"], found["token"], local=True) if found else None


def status(args: argparse.Namespace, console: Console) -> int:
    client = _target()
    info = client.get("/api/server") if client else None
    if args.json:
        print(json.dumps(info or {"running": False}, indent=2))
    elif info is None:
        present.plain(console, "No local server is running for this state directory (the next command starts one).")
    else:
        leader = info.get("leader") or {}
        present.plain(console, f"gpufleet server {info['version']} at {info['url']} (pid {info['pid']})\n"
                               f"database: {info['database']}\n"
                               f"loops: {'run here' if info['leading'] else 'run by ' + leader.get('url', '?')}")
    return EXIT_OK if info else EXIT_FAILED


def stop(args: argparse.Namespace, console: Console) -> int:
    import time

    from gpufleet.client import local_server

    client = _target()
    if client is None:
        present.plain(console, "No local server is running.")
        return EXIT_OK
    client.post("/api/server/stop")
    deadline = time.monotonic() + 30
    while local_server() and time.monotonic() < deadline:
        time.sleep(0.1)
    present.plain(console, f"Stopped the server at {client.url}.")
    return EXIT_OK

"""gpufleet logout: remove the config file that gpufleet login wrote (the token stays valid on the
server: rotate it to end it there)."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    lo = sub.add_parser("logout", help="forget the server and token that gpufleet login kept")
    lo.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import config_path, remove_config

    removed = remove_config()
    if removed is None:
        present.plain(console, f"Not logged in (no {config_path()}).")
    else:
        present.plain(console, f"Logged out: removed {removed}. The token still works on the server until "
                               "it is rotated (gpufleet user rotate-token).")
    return EXIT_OK

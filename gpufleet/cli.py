"""The gpufleet command line: the parser (each command in gpufleet.commands) and the one place
where errors become messages and exit codes: 0 ok, 1 something on a host is not right, 2 bad
config or arguments (nothing done), 130 interrupted. Never a traceback for a user's mistake."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from gpufleet import __version__, present
from gpufleet.commands import register_all
from gpufleet.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ConfigError, GpufleetError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpufleet", description="GPU fleets over SSH, sliced into blocks, "
                                                             "driven by Ansible.")
    p.add_argument("--version", action="version", version=f"gpufleet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register_all(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # everything gpufleet and its children (ansible-runner artifacts, SQLite's WAL files, ssh
    # sockets) write may hold secrets or keys: private to this user
    os.umask(0o077)
    # no markup: what gpufleet prints holds names, paths and messages from users, hosts and the server
    # (`[/x]` is a name, `[fd00::1]` an address), styled only through rich Text (see present.py)
    console = Console(markup=False)
    err = Console(stderr=True, markup=False)
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

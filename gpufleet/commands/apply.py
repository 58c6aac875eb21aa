"""gpufleet apply: apply a fleet, or submit a task, service or dev-environment."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet.errors import UsageError


def register(sub) -> None:
    a = sub.add_parser("apply", help="apply a fleet, or submit a task, service or dev-environment")
    a.add_argument("-f", "--file", required=True, help="a fleet (dstack SSH-fleet schema) or run configuration")
    a.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument("-d", "--detach", action="store_true", help="runs: do not follow the logs")
    a.add_argument("--dry-run", action="store_true", help="fleets: validate and show the plan; change nothing")
    a.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runconfig import RUN_TYPES, config_type

    if config_type(args.file) in RUN_TYPES:
        from gpufleet.runs import submit

        if args.dry_run:
            raise UsageError("--dry-run is for fleets; for runs, answer n at the prompt")
        return submit(args.file, yes=args.yes, detach=args.detach, console=console)
    from gpufleet.apply import apply_fleet

    return apply_fleet(args.file, yes=args.yes, dry_run=args.dry_run, console=console)

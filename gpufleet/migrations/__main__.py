"""python -m gpufleet.migrations revision "what changed": write the next revision's file, to fill in."""

from __future__ import annotations

import argparse

from gpufleet.migrations import new_revision


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.migrations", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="write versions/NNNN_what.py after the head")
    revision.add_argument("message", help="what the revision changes (its docstring; the file name's slug)")
    args = parser.parse_args(argv)
    print(new_revision(args.message))


if __name__ == "__main__":
    main()

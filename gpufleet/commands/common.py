"""What several commands share in their arguments."""

from __future__ import annotations

import argparse


def add_name(parser: argparse.ArgumentParser, confirm: bool = False) -> None:
    """The NAME argument of a command on one run or fleet, and -y where it asks first."""
    parser.add_argument("name")
    if confirm:
        parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

"""What pyproject.toml cannot declare: the version, read from galaxy.yml (the one place it is stated)."""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def galaxy_version() -> str:
    match = re.search(r"^version:\s*['\"]?([0-9][0-9A-Za-z.+-]*)['\"]?\s*$", (ROOT / "galaxy.yml").read_text(), re.M)
    if not match:
        raise RuntimeError("galaxy.yml has no `version:` line")
    return match.group(1)


setup(version=galaxy_version())

"""Helpers shared by the unit tests of run configuration fields: a validated run config from fields,
and the problems a run file's text is refused with."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.models.run import RUN_CONFIG
from gpufleet.runconfig import parse_run


def run(kind: str = "task", **fields):
    """A run config of ``kind`` with ``fields`` (an image, and a service's port, filled in)."""
    extra = {"port": 8000} if kind == "service" else {}
    return RUN_CONFIG.validate_python({"type": kind, "image": "localhost/x:1", **extra, **fields})


def problems(tmp_path: Path, text: str, env: dict | None = None) -> str:
    """What loading ``text`` (as tmp_path/run.yml, its secrets' values ``env``) is refused with."""
    with pytest.raises(ConfigError) as e:
        parse_run(text, str(tmp_path / "run.yml"), secrets=env)
    return "\n".join(map(str, e.value.problems))

"""What every CLI command pays before it does anything: the models' validators are built when a model is
first used, not when gpufleet.models is imported (pydantic's defer_build on CoreModel). `gpufleet ps` uses
one model (Run); building all of them at import cost ~0.1 s of CPU on each command (benchmarks/bench_runs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json
import gpufleet.cli
from gpufleet.models import core
seen, built, todo = set(), [], list(core.CoreModel.__subclasses__())
while todo:
    c = todo.pop()
    if c in seen:
        continue
    seen.add(c)
    todo += c.__subclasses__()
    if c.__pydantic_complete__:
        built.append(c.__qualname__)
print(json.dumps({"models": len(seen), "built": sorted(built)}))
"""


def _python(code: str) -> str:
    """What ``code`` prints, run by a fresh interpreter on this checkout (a CLI's start-up, measured clean)."""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_importing_the_cli_builds_almost_no_model_validator():
    out = json.loads(_python(PROBE))
    assert out["models"] > 20
    # only models a module instantiates at import (a field's default, e.g. AdminPolicy()) are built
    assert not {"TaskConfig", "ServiceConfig", "DevEnvironmentConfig", "Run", "Fleet"} & set(out["built"])
    assert len(out["built"]) <= out["models"] // 5, out["built"]


def test_a_deferred_model_still_validates_and_refuses_unknown_fields():
    import pytest
    from pydantic import ValidationError

    from gpufleet.models import Run

    row = {"name": "a", "run_id": "x", "type": "task", "fleet": None, "instance_id": None, "alias": None,
           "status": "running", "spec": {}, "container": "gpufleet-a", "created_at": 0, "updated_at": 0}
    assert Run.model_validate(row).name == "a"
    with pytest.raises(ValidationError, match="extra"):
        Run.model_validate({**row, "surprise": 1})


def test_the_cli_parser_does_not_import_the_lab_or_yaml():
    # every command builds the whole parser; `lab up --vendor`'s choices come from gpufleet.lab itself, so
    # `gpufleet ps` does not import gpufleet.lab.core (and PyYAML with it: ~30 ms before anything is done)
    probe = "import sys, gpufleet.cli\ngpufleet.cli.parser()\nprint(sorted(m for m in sys.modules if m in " \
            "('yaml', 'gpufleet.lab.core')))"
    assert _python(probe).strip() == "[]"

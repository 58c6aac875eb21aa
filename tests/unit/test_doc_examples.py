"""Every ```yaml block of README.md and docs/*.md loads through the gpufleet loader it is written for,
so an example that fails as written (a command line YAML reads as a mapping, a renamed field) fails CI.

Fleet and run files go through load_fleet and parse_run (the identity files they name under `~` are
made for the test in a temporary HOME), server settings through load_settings, a fleet's `policy`
shown alone through FleetPolicy. Blocks that are not gpufleet files are in SKIP, each with why.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gpufleet.config import load_fleet
from gpufleet.models import FleetPolicy
from gpufleet.runconfig import RUN_TYPES, parse_run
from gpufleet.server.settings import ServerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (file, the block's first line): why it is not loaded here. Keep it short; a stale entry fails.
SKIP = {
    ("docs/ansible.md", 'workload_name: !unsafe "train"'):
        "Ansible variables for the workload role (job.yml), checked by the role's argument_spec when it runs",
    ("docs/ansible.md", "---"):
        "an Ansible playbook, run as is against the lab by tests/integration/test_ansible_content.py",
    ("docs/metrics.md", "scrape_configs:"):
        "Prometheus's own configuration (a scrape of /metrics), not a gpufleet file",
}


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the first line inside the fence
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()


def yaml_blocks() -> list[Block]:
    out = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").split("\n")
        i = 0
        while i < len(lines):
            m = re.fullmatch(r"( *)```yaml\s*", lines[i])
            if not m:
                i += 1
                continue
            indent, start, body = len(m.group(1)), i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:])
                i += 1
            assert i < len(lines), f"{path.name}:{start}: the ```yaml block is not closed"
            out.append(Block(str(path.relative_to(ROOT)), start + 1, "\n".join(body) + "\n"))
            i += 1
    return out


BLOCKS = yaml_blocks()


def test_the_docs_have_yaml_examples_and_every_skip_names_one() -> None:
    assert any(b.file == "README.md" for b in BLOCKS) and len(BLOCKS) >= 6
    for file, first in SKIP:
        assert [b for b in BLOCKS if (b.file, b.first_line) == (file, first)], \
            f"SKIP names no block: {file} starting {first!r}; remove the entry"


def _identity_files(data) -> list[str]:
    if isinstance(data, dict):
        found = [v for k, v in data.items() if k == "identity_file" and isinstance(v, str)]
        return found + [f for v in data.values() for f in _identity_files(v)]
    if isinstance(data, list):
        return [f for v in data for f in _identity_files(v)]
    return []


LOADED = [b for b in BLOCKS if (b.file, b.first_line) not in SKIP]  # not pytest skips: CI fails on those


@pytest.mark.parametrize("block", LOADED, ids=[b.id for b in LOADED])
def test_yaml_example_loads(block: Block, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / f"{Path(block.file).stem}-{block.line}.yml"
    path.write_text(block.text, encoding="utf-8")
    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.id}: not a mapping; add it to SKIP with why if it is not a gpufleet file"
    kind = data.get("type")
    if kind == "fleet":
        home = tmp_path / "home"
        monkeypatch.setenv("HOME", str(home))
        for key in _identity_files(data):
            assert key.startswith("~/"), f"{block.id}: an example's key is under ~ (got {key})"
            target = home / key[2:]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(target)], check=True)
        fleet = load_fleet(path)
        assert fleet.targets
    elif kind in RUN_TYPES:
        run = parse_run(block.text, str(path), values=False)  # its secrets' values are not needed here
        assert run.config.type == kind
    elif kind is None and set(data) <= set(ServerSettings.model_fields):
        load_settings(path, env={})
    elif kind is None and set(data) == {"policy"}:  # a fleet file's policy section, shown alone
        FleetPolicy.model_validate(data["policy"])
    else:
        pytest.fail(f"{block.id}: no loader for this block (type {kind!r}); teach this test its loader, "
                    "or add it to SKIP with why")

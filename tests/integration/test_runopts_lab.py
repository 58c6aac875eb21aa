"""dstack's container options of a run, on the lab, in real podman containers: `user`, `entrypoint`,
`shell`, volumes in dstack's object form (`optional` ones whose path is missing left out), and
`${{ ... }}` run variables filled for the node."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=2, vendor="nvidia")
    cli = Cli(tmp_path_factory.mktemp("runopts-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return cli


def run(cli: Cli, tmp_path: Path, name: str, body: str) -> str:
    """Submit task ``name`` attached (its output followed to its end); its output."""
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{body}")
    p = cli("apply", "-f", str(path), "-y", timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_user_runs_the_commands_as_that_user(site, tmp_path):
    out = run(site, tmp_path, "as-user", "user: '1234:2345'\ncommands:\n  - echo \"uid=$(id -u) gid=$(id -g)\"\n")
    assert "uid=1234 gid=2345" in out


def test_entrypoint_takes_the_commands_as_its_arguments(site, tmp_path):
    out = run(site, tmp_path, "entry", "entrypoint: /bin/echo from-the-entrypoint\ncommands: [one, 'two three']\n")
    assert "from-the-entrypoint one two three" in out


def test_volumes_in_object_form_and_an_optional_one_that_is_missing(site, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("object-form-volume\n")
    out = run(site, tmp_path, "vols",
              "volumes:\n"
              f"  - instance_path: {data}\n    path: /data\n    read_only: true\n"
              f"  - instance_path: {tmp_path / 'not-there'}\n    path: /maybe\n    optional: true\n"
              "commands:\n  - cat /data/note.txt\n  - test ! -e /maybe && echo no-optional-mount\n"
              "  - touch /data/x 2>/dev/null || echo read-only\n")
    assert "object-form-volume" in out and "no-optional-mount" in out and "read-only" in out


def test_run_variables_are_filled_for_the_node(site, tmp_path):
    out = run(site, tmp_path, "vars",
              "resources: {gpu: 2}\n"
              "env:\n  MSG: 'rank ${{ dstack.node_rank }} of ${{ gpufleet.nodes_num }}'\n"
              "commands:\n  - echo \"$MSG, ${{ dstack.gpus_num }} GPUs, run ${{ dstack.run_name }}\"\n")
    assert "rank 0 of 1, 2 GPUs, run vars" in out

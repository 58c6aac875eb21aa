"""Secrets never leak, private files stay private (issue 5, security), on the lab.

A secret is an env name given without a value (in the fleet's or the run's `env`): its value comes
from the environment of `gpufleet apply`. The tests run real tasks with secrets, then grep
everything gpufleet and Ansible wrote or printed (the state database, ansible-runner artifacts,
inventories, every command's stdout and stderr, `--json` output, error messages) and the node's
process list for the secret values and for the private keys' contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import stat
import time
from pathlib import Path

import pytest
import yaml
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def key_material(path: Path) -> list[str]:
    """The base64 lines of an OpenSSH private key (what must never be copied anywhere)."""
    lines = path.read_text().splitlines()
    body = [line.strip() for line in lines if line.strip() and not line.startswith("-----")]
    assert body, path
    return body


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=1, gpus=8, vendor="nvidia")


@pytest.fixture(scope="module")
def world(lab, tmp_path_factory):
    """A fleet with a secret in its env, applied; the CLI outputs seen so far are collected."""
    home = tmp_path_factory.mktemp("security-home") / "home"
    work = tmp_path_factory.mktemp("security-work")
    fleet = yaml.safe_load(lab.fleet_file.read_text())
    fleet["env"] = ["FLEET_TOKEN", "FLEET_PLAIN=fleet-visible"]
    fleet_file = work / "fleet.yml"
    fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))
    values = {"FLEET_TOKEN": "fleet-" + secrets.token_hex(16), "RUN_TOKEN": "run-" + secrets.token_hex(16),
              "MAP_TOKEN": "map-" + secrets.token_hex(16)}
    cli = Cli(home)
    outputs: list[str] = []

    def run(*args: str, check: int | None = None, env: dict[str, str] | None = None, timeout: int = 300):
        p = cli(*args, env=env, timeout=timeout)
        outputs.append(f"$ gpufleet {' '.join(args)}\n{p.stdout}\n{p.stderr}")
        if check is not None:
            assert p.returncode == check, outputs[-1]
        return p

    # a fleet's secrets are taken when it is applied (the server keeps them sealed for its runs)
    env = {k: v for k, v in os.environ.items() if k != "FLEET_TOKEN"}
    p = run("apply", "-f", str(fleet_file), "-y", env=env)
    assert p.returncode == 2 and "FLEET_TOKEN" in p.stderr and "export FLEET_TOKEN" in p.stderr, p.stdout + p.stderr
    run("apply", "-f", str(fleet_file), "-y", env={"FLEET_TOKEN": values["FLEET_TOKEN"]}, check=0)
    return {"home": home, "work": work, "values": values, "run": run, "outputs": outputs, "lab": lab,
            "fleet": fleet["name"], "fleet_file": fleet_file}


def task(work: Path, name: str, body: str) -> Path:
    path = work / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{body}")
    return path


def assert_nothing_leaked(world, extra_text: str = "") -> None:
    lab: core.Lab = world["lab"]
    needles = {name: value for name, value in world["values"].items()}
    for which in ("login", "node"):
        for i, line in enumerate(key_material(lab.key(which))):
            if len(line) >= 20:
                needles[f"{which} key line {i}"] = line
    home: Path = world["home"]
    leaks = []
    files = [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any("artifacts" in p.parts for p in files), "ansible-runner artifacts were expected under the home"
    assert (home / "state.db").exists()
    for path in files:
        data = path.read_bytes()
        for what, needle in needles.items():
            if needle.encode() in data:
                leaks.append(f"{what} in {path}")
    text = "\n".join(world["outputs"]) + extra_text
    for what, needle in needles.items():
        if needle in text:
            leaks.append(f"{what} in command output")
    assert not leaks, "\n".join(leaks)


def test_secret_env_reaches_the_container_and_nowhere_else(world):
    run, work, values = world["run"], world["work"], world["values"]
    lab: core.Lab = world["lab"]
    env = dict(values)
    body = ("env:\n  - RUN_TOKEN\n  - RUN_PLAIN=run-visible\n"
            "commands:\n"
            "  - 'echo \"fleet=$(printf %s \"$FLEET_TOKEN\" | sha256sum | cut -c1-64)\"'\n"
            "  - 'echo \"run=$(printf %s \"$RUN_TOKEN\" | sha256sum | cut -c1-64)\"'\n"
            "  - 'echo \"plain=$FLEET_PLAIN,$RUN_PLAIN\"'\n"
            "  - 'echo ready; sleep 300'\n")
    p = run("apply", "-f", str(task(work, "secret-list", body)), "-y", "-d", env=env, check=0)
    assert "is running" in p.stdout
    # the mapping form: a name with nothing after it
    body_map = ("env:\n  MAP_TOKEN:\n  MAP_PLAIN: map-visible\n"
                "commands: ['echo \"map=$(printf %s \"$MAP_TOKEN\" | sha256sum | cut -c1-64)\"']\n")
    p = run("apply", "-f", str(task(work, "secret-map", body_map)), "-y", env=env, check=0)
    assert f"map={sha(values['MAP_TOKEN'])}" in p.stdout

    logs = ""
    for _ in range(60):
        logs = run("logs", "secret-list", check=0).stdout
        if "ready" in logs:
            break
    assert f"fleet={sha(values['FLEET_TOKEN'])}" in logs
    assert f"run={sha(values['RUN_TOKEN'])}" in logs
    assert "plain=fleet-visible,run-visible" in logs

    # while the container runs: the node's process list shows no secret (the runtime got --env=NAME)
    node = lab.nodes[0]
    cmdlines = core.host_exec(lab, node, ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"],
                              check=False).stdout
    assert "sleep" in cmdlines
    inspect = core.host_exec(lab, node, ["sh", "-c", "podman ps --format '{{.Names}}'"], check=False)
    assert "secret-list" in inspect.stdout or inspect.returncode != 0

    ps = run("ps", "-a", "--json", check=0).stdout
    rows = {r["name"]: r for r in json.loads(ps)}
    assert rows["secret-list"]["status"] == "running" and rows["secret-map"]["status"] == "done"
    run("fleet", "list", "--json", check=0)
    run("stop", "secret-list", "-y", check=0)
    assert_nothing_leaked(world, extra_text=cmdlines)


def test_a_failed_start_with_secrets_leaks_nothing(world):
    run, work = world["run"], world["work"]
    path = work / "secret-fail.yml"
    path.write_text("type: task\nname: secret-fail\nimage: localhost/no-such-image:1\n"
                    "env: [RUN_TOKEN]\ncommands: ['true']\n")
    p = run("apply", "-f", str(path), "-y", env=world["values"])
    assert p.returncode == 1, p.stdout + p.stderr
    assert "no-such-image" in p.stdout + p.stderr
    assert_nothing_leaked(world)


def test_a_missing_secret_is_refused_with_its_place_and_no_value(world):
    run, work = world["run"], world["work"]
    path = task(work, "secret-missing", "env:\n  - PLAIN=1\n  - NOT_SET_ANYWHERE\ncommands: ['true']\n")
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    p = run("apply", "-f", str(path), "-y", env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stdout + p.stderr
    assert f"{path}:6:5" in err and "NOT_SET_ANYWHERE" in err and "Traceback" not in err
    # the fleet's secret was sealed when the fleet was applied: a run needs no FLEET_TOKEN of its own
    p = run("apply", "-f", str(task(work, "fleet-secret-kept", "commands: ['true']\n")), "-y", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    fleets = json.loads(run("fleet", "list", "--json", check=0).stdout)
    assert all(i["blocks"]["busy"] == 0 for f in fleets for i in f["instances"])


def test_a_private_key_given_as_a_config_is_not_echoed(world):
    lab: core.Lab = world["lab"]
    for which in ("login", "node"):
        p = world["run"]("apply", "-f", str(lab.key(which)), "-y")
        assert p.returncode == 2, p.stdout + p.stderr
        assert "Traceback" not in p.stdout + p.stderr
    assert_nothing_leaked(world)


def test_state_and_key_files_are_private(world):
    home: Path = world["home"]
    bad = []
    roots = [home]
    # ssh's control sockets live under the home, or in a short /tmp folder when the home's path is long
    control = [Path(line.split(None, 1)[1].strip().strip('"').replace("%%", "%")).parent
               for line in (home / "fleets" / world["fleet"] / "ssh_config").read_text().splitlines()
               if line.strip().startswith("ControlPath")]
    roots += sorted({c for c in control if home not in c.parents and c != home})
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            if stat.S_IMODE(mode) & 0o077:
                bad.append(f"{oct(stat.S_IMODE(mode))} {path}")
    assert not bad, "\n".join(bad)
    for name in ("state.db",):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def _sealed_rows(home: Path, run_name: str) -> int:
    with sqlite3.connect(home / "state.db") as db:
        return db.execute("select count(*) from secrets where run = ?", (run_name,)).fetchone()[0]


def test_a_waiting_runs_secret_is_kept_sealed_until_it_starts(world):
    run, work, values = world["run"], world["work"], world["values"]
    env = dict(values)
    run("apply", "-f", str(task(work, "holder", "resources: {gpu: 8}\ncommands: ['sleep 300']\n")), "-y", "-d",
        check=0)
    body = ("resources: {gpu: 8}\nenv:\n  - RUN_TOKEN\n"
            "commands:\n  - 'echo \"queued=$(printf %s \"$RUN_TOKEN\" | sha256sum | cut -c1-64)\"'\n")
    p = run("apply", "-f", str(task(work, "secret-queued", body)), "-y", "-d", env=env, check=0)
    assert "secret-queued is queued" in p.stdout
    # while it waits: sealed in the database (never in clear), nowhere in ps/events/logs/files
    assert _sealed_rows(world["home"], "secret-queued") == 1
    run("ps", "-a", "--json", check=0)
    run("events", "--json", check=0)
    assert_nothing_leaked(world)
    run("stop", "holder", "-y", check=0)
    for _ in range(120):
        rows = {r["name"]: r for r in json.loads(run("ps", "-a", "--json", check=0).stdout)}
        if rows["secret-queued"]["status"] == "done":
            break
        time.sleep(0.5)
    assert rows["secret-queued"]["status"] == "done", rows["secret-queued"]
    assert f"queued={sha(values['RUN_TOKEN'])}" in run("logs", "secret-queued", check=0).stdout
    assert _sealed_rows(world["home"], "secret-queued") == 0  # gone once it ran
    run("events", "--run", "secret-queued", "--json", check=0)
    assert_nothing_leaked(world)

"""Many gpufleet processes at once against one lab: no GPU given twice, nothing left allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import create_engine, text

from gpufleet import migrations
from gpufleet.lab import core
from gpufleet.state import metadata

pytestmark = pytest.mark.lab
PG_URL = os.environ.get("GPUFLEET_TEST_DATABASE_URL")


@pytest.fixture(scope="module")
def labs(lab_factory):
    return lab_factory(nodes=2, gpus=4, vendor="nvidia"), lab_factory(nodes=1, gpus=2, vendor="amd")


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "GPUFLEET_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("GPUFLEET_DATABASE_URL", None)
    if request.param == "postgresql":
        if not PG_URL:
            if os.environ.get("CI"):
                pytest.fail("CI must provide GPUFLEET_TEST_DATABASE_URL")
            pytest.skip("no PostgreSQL (scripts/test.sh starts one)")
        engine = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as c:
            metadata.drop_all(c)
            for table in migrations.VERSION_TABLES:
                c.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()
        env["GPUFLEET_DATABASE_URL"] = PG_URL
    return env


def gpufleet(env, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gpufleet", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_fleets_applied_at_once_then_sixteen_tasks_for_eight_blocks(labs, env, tmp_path):
    nvidia, amd = labs
    procs = [gpufleet(env, "apply", "-f", str(lab.fleet_file), "-y") for lab in (nvidia, amd)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    names = [f"c{i}" for i in range(16)]
    for name in names:
        (tmp_path / f"{name}.yml").write_text(
            f"type: task\nname: {name}\nimage: {core.LAB_IMAGE}\nfleets: [{core.fleet_name(nvidia)}]\n"
            "resources: {gpu: 1}\ncommands: ['sleep 120']\n")
    # --no-queue: each takes a block now or is refused (without it, the other 8 would wait in the queue)
    procs = [gpufleet(env, "apply", "-f", str(tmp_path / f"{n}.yml"), "-y", "-d", "--no-queue") for n in names]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    started = [n for n, r in zip(names, results, strict=True) if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(started) == 8, results
    assert len(refused) == 8 and all("no instance has 1 GPU free:" in r[2] and "0/4 free" in r[2] and
                                     "not queued: --no-queue" in r[2] for r in refused), refused
    cli = Cli(Path(env["GPUFLEET_HOME"]))
    if "GPUFLEET_DATABASE_URL" in env:
        os.environ["GPUFLEET_DATABASE_URL"] = env["GPUFLEET_DATABASE_URL"]
    try:
        runs = json.loads(cli("ps", "--json", check=0).stdout)
        fleets = json.loads(cli("fleet", "list", "--json", check=0).stdout)
    finally:
        os.environ.pop("GPUFLEET_DATABASE_URL", None)
    assert sorted(r["name"] for r in runs) == sorted(started)
    assert all(r["status"] == "running" for r in runs)
    uuids = [g["uuid"] for r in runs for g in r["gpus"]]
    assert len(uuids) == len(set(uuids)) == 8  # no GPU given twice
    nv = next(f for f in fleets if f["name"] == core.fleet_name(nvidia))
    assert [i["status_text"] for i in nv["instances"]] == ["4/4 busy", "4/4 busy"]
    # every running container is a run's, and every busy block has its container
    on_hosts = sorted(line.split()[0] for n in nvidia.nodes for line in core.host_exec(
        nvidia, n, ["podman", "ps", "--format", "{{.Names}}"]).stdout.splitlines())
    assert on_hosts == sorted(f"gpufleet-{n}" for n in started)
    # done: stop them, so the next database's round starts on idle hosts (a state's sweep never stops
    # another state's containers)
    procs = [gpufleet(env, "stop", n, "-y") for n in started]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]

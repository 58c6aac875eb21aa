"""`gpufleet server` itself: a local server exits when idle; two replicas on one PostgreSQL database,
one leading the loops, the other taking over within seconds when the leader is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, Cli, wait_for

from gpufleet.lab import core

IMAGE = core.LAB_IMAGE


def test_a_local_server_with_nothing_to_do_exits_by_itself(tmp_path):
    cli = Cli(tmp_path / "home")
    env = {"GPUFLEET_SERVER_IDLE_EXIT": "2"}
    cli("ps", env=env, check=0)
    info = json.loads(cli("server", "status", "--json", env=env, check=0).stdout)
    assert info["local"] and info["pid"]
    wait_for("the idle server to exit", lambda: not Path(f"/proc/{info['pid']}").exists(), timeout=30)
    assert not (tmp_path / "home" / "server" / "local.json").exists()
    p = cli("server", "status")
    assert p.returncode == 1 and "No local server is running" in p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def pg_database():
    """A database of its own on the PostgreSQL server of GPUFLEET_TEST_DATABASE_URL (scripts/test.sh)."""
    url = os.environ.get("GPUFLEET_TEST_DATABASE_URL")
    if not url:
        pytest.skip("GPUFLEET_TEST_DATABASE_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")
    from sqlalchemy import create_engine, text

    from gpufleet.state import database_url

    os.environ["GPUFLEET_DATABASE_URL"] = url
    try:
        admin_url = database_url()
    finally:
        del os.environ["GPUFLEET_DATABASE_URL"]
    name = f"gpufleet_replicas_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = url.rpartition("/")
    yield f"{base}/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.lab
def test_two_replicas_on_postgresql_one_leads_and_the_other_takes_over(lab_factory, pg_database, tmp_path):
    lab = lab_factory(nodes=1, gpus=8)
    home = tmp_path / "home"
    env = {**os.environ, "GPUFLEET_HOME": str(home), "GPUFLEET_DATABASE_URL": pg_database}
    ports = [_free_port(), _free_port()]
    log = [open(tmp_path / f"replica-{i}.log", "wb") for i in range(2)]  # noqa: SIM115
    replicas = [subprocess.Popen([sys.executable, "-m", "gpufleet", "server", "--port", str(port)], env=env,
                                 stdout=log[i], stderr=subprocess.STDOUT, cwd=ROOT)
                for i, port in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        cli = [Cli(home, server=u) for u in urls]
        infos = wait_for("both replicas to answer, one leading", lambda: _infos(cli), timeout=60)
        assert sorted(i["leading"] for i in infos) == [False, True], infos
        leader = next(n for n, i in enumerate(infos) if i["leading"])
        other = 1 - leader
        cli[other]("apply", "-f", str(lab.fleet_file), "-y", check=0)
        holder = tmp_path / "holder.yml"
        holder.write_text(f"type: task\nname: holder\nimage: {IMAGE}\nresources:\n  gpu: 8\ncommands: ['sleep 300']\n")
        waiter = tmp_path / "waiter.yml"
        waiter.write_text(f"type: task\nname: waiter\nimage: {IMAGE}\nresources:\n  gpu: 8\n"
                          "commands: ['echo waiter-ran']\n")
        # submitted through the replica that does not lead: the leader's loops start it
        assert "holder is running" in cli[other]("apply", "-f", str(holder), "-y", "-d", check=0).stdout
        assert "waiter is queued" in cli[other]("apply", "-f", str(waiter), "-y", "-d", check=0).stdout
        replicas[leader].send_signal(signal.SIGKILL)
        replicas[leader].wait(timeout=30)
        killed = time.monotonic()
        wait_for("the other replica to lead", lambda: (_infos([cli[other]]) or [{}])[0].get("leading"), timeout=30)
        took = time.monotonic() - killed
        assert took < 10, took  # "within a few seconds" (the lock goes with the killed leader's connection)
        cli[other]("stop", "holder", "-y", check=0)

        def waiter_done():
            rows = {r["name"]: r for r in json.loads(cli[other]("ps", "-a", "--json", check=0).stdout)}
            return rows["waiter"]["status"] == "done"

        wait_for("the waiting run to start on the new leader and finish", waiter_done, timeout=60)
        assert "waiter-ran" in cli[other]("logs", "waiter", check=0).stdout
    finally:
        for r in replicas:
            if r.poll() is None:
                r.send_signal(signal.SIGTERM)
                try:
                    r.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    r.kill()
        for f in log:
            f.close()


def _infos(clis: list[Cli]) -> list[dict] | None:
    out = []
    for c in clis:
        p = c("server", "status", "--json")
        if p.returncode != 0:
            return None
        out.append(json.loads(p.stdout))
    return out

"""A service's replica groups on the lab (real sshd hosts behind a login node, real podman, a real server):
two groups, each with its own commands and resources, both ready answer through the server's endpoint in
turns; `ps` names each replica's group; an update of one group's commands rolls that group only (the other
group's replica stays as it was)."""

from __future__ import annotations

import pytest
import yaml
from conftest import Cli, start_server, wait_for
from test_service_replicas_lab import get, replicas_of, runs

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


def serve(text: str) -> list[str]:
    # the page names the group's version and the container (its hostname): which replica answered
    return ["mkdir -p /www", f'echo "{text} $(hostname)" > /www/index.html', "exec httpd -f -p 8000 -h /www"]


def service(fleet: str, b: str) -> str:
    return yaml.safe_dump({
        "type": "service", "name": "pd", "image": IMAGE, "port": 8000, "fleets": [fleet], "stop_duration": "1s",
        "probes": [{"type": "http", "url": "/", "interval": 1}],
        "replicas": [{"name": "a", "count": 1, "commands": serve("a1"), "resources": {"gpu": 2}},
                     {"name": "b", "count": 1, "commands": serve(b), "resources": {"gpu": 1}}]}, sort_keys=False)


def test_replica_groups_answer_in_turns_and_one_group_rolls_alone(lab_factory, tmp_path):
    lab = lab_factory(nodes=2, gpus=2)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    token = server.admin_token
    base = "/proxy/services/default/pd/"
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        pd = tmp_path / "pd.yml"
        pd.write_text(service(fleet, "b1"))
        admin("apply", "-f", str(pd), "-y", "-d", check=0)
        wait_for("both groups' replicas ready", lambda: runs(admin)["pd"].get("replicas") == "2/2", timeout=120)
        reps = replicas_of(admin, "pd")
        assert {r["replica_group"] for r in reps.values()} == {"a", "b"}, reps
        by_group = {r["replica_group"]: r for r in reps.values()}
        assert (len(by_group["a"]["gpus"]), len(by_group["b"]["gpus"])) == (2, 1), reps  # each its own resources
        ps = admin("ps", check=0).stdout
        assert "replica (a)" in ps and "replica (b)" in ps and "running (2/2 ready)" in ps, ps
        seen = {get(server.port, base, token)[1].split()[0] for _ in range(6)}
        assert seen == {"a1", "b1"}, seen  # every ready replica of every group gets traffic, in turns

        # group b's commands change: b rolls (a new replica, then the old one goes); a's replica stays
        pd.write_text(service(fleet, "b2"))
        p = admin("apply", "-f", str(pd), "-y", "-d", check=0)
        assert "pd is updated" in p.stdout, p.stdout

        def rolled() -> bool:
            now = replicas_of(admin, "pd")
            return len(now) == 2 and runs(admin)["pd"].get("replicas") == "2/2" and \
                {get(server.port, base, token)[1].split()[0] for _ in range(6)} == {"a1", "b2"}
        wait_for("group b rolled", rolled, timeout=120, every=1)
        now = replicas_of(admin, "pd")
        a_name = by_group["a"]["name"]
        assert a_name in now and now[a_name]["replica_group"] == "a", now  # group a untouched
        assert by_group["b"]["name"] not in now, now
        admin("stop", "pd", "-y", check=0)
        wait_for("pd and its replicas to end", lambda: not any(n.startswith("pd") for n in runs(admin)), timeout=60)
    finally:
        admin("stop", "pd", "-y")
        server.stop()

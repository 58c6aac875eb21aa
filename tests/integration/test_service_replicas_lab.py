"""A service's replicas on the lab (real sshd hosts behind a login node, real podman, a real server):
two replicas spread over two hosts answer through the server's endpoint only once their probe passes,
with a token (401 without), taking turns; one killed is replaced while the other keeps answering; a
rolling update under a steady request loop drops no request; `scaling` goes from 1 replica to 2 under
a bounded load loop against loopback and back to 1 after it."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import yaml
from conftest import Cli, start_server, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


def service(name: str, fleet: str, version: str, extra: dict) -> str:
    # the page names the version and the container (its hostname): which replica answered
    commands = ["mkdir -p /www", f'echo "{version} $(hostname)" > /www/index.html', "exec httpd -f -p 8000 -h /www"]
    return yaml.safe_dump({"type": "service", "name": name, "image": IMAGE, "port": 8000, "fleets": [fleet],
                           "commands": commands, "stop_duration": "1s", **extra}, sort_keys=False)


def get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


class Loop:
    """A bounded request loop on a thread (every ``every`` seconds, at most ``limit`` requests): the answers."""

    def __init__(self, port: int, path: str, token: str | None, every: float = 0.1, limit: int = 3000):
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.is_set() and len(self.answers) < limit:
                try:
                    self.answers.append(get(port, path, token))
                except OSError as e:
                    self.answers.append((0, str(e)))
                time.sleep(every)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[int, str]]:
        self._stop.set()
        self._thread.join(60)
        return self.answers


def runs(admin: Cli) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(admin("ps", "--json", check=0).stdout)}


def replicas_of(admin: Cli, name: str) -> dict[str, dict]:
    return {n: r for n, r in runs(admin).items() if r.get("replica_of") == name}


def test_replicas_spread_take_turns_are_replaced_and_rolled_out_without_a_dropped_request(lab_factory, tmp_path):
    lab = lab_factory(nodes=2, gpus=2)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    token = server.admin_token
    base = "/proxy/services/default/web/"
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        web = tmp_path / "web.yml"
        spec = {"replicas": 2, "probes": [{"type": "http", "url": "/", "interval": 1}]}
        web.write_text(service("web", fleet, "v1", spec))
        p = admin("apply", "-f", str(web), "-y", "-d", check=0)
        assert f"web is served at {server.url}{base}" in p.stdout, p.stdout

        assert get(server.port, base)[0] == 401  # no token: refused, ready or not
        wait_for("both replicas ready", lambda: runs(admin)["web"].get("replicas") == "2/2", timeout=120)
        reps = replicas_of(admin, "web")
        assert sorted(reps) == ["web.0", "web.1"], reps
        assert len({r["host"] for r in reps.values()}) == 2, reps  # spread: one replica per host
        ps = admin("ps", check=0).stdout
        assert "running (2/2 ready)" in ps and "  web.0" in ps and "replica" in ps, ps

        # balanced: both replicas answer, in turns
        seen = {get(server.port, base, token)[1] for _ in range(8)}
        assert len(seen) == 2 and all(s.startswith("v1 ") for s in seen), seen

        # one replica killed: replaced (a new run), while the other keeps answering every request
        killed = reps["web.0"]
        host = next(n for n in lab.nodes if n.address == killed["host"])
        loop = Loop(server.port, base, token)
        core.host_exec(lab, host, ["podman", "rm", "-f", "gpufleet-web.0"], check=True)
        wait_for("a new replica, ready", lambda: sorted(replicas_of(admin, "web")) == ["web.1", "web.2"]
                 and runs(admin)["web"].get("replicas") == "2/2", timeout=120)
        answers = loop.stop()
        bad = [a for a in answers if a[0] != 200]
        assert len(answers) >= 20 and not bad, (len(answers), bad[:5])
        events = admin("events", "--run", "web.0", check=0).stdout
        assert "failed" in events or "stopped" in events, events

        # a rolling update under a steady request loop: not one request dropped, v1 answers then v2
        web.write_text(service("web", fleet, "v2", spec))
        loop = Loop(server.port, base, token)
        p = admin("apply", "-f", str(web), "-y", "-d", check=0)
        assert "web is updated" in p.stdout, p.stdout

        def rolled() -> bool:
            reps = replicas_of(admin, "web")
            return len(reps) == 2 and all(r["status"] == "running" for r in reps.values()) and \
                runs(admin)["web"].get("replicas") == "2/2" and \
                {get(server.port, base, token)[1].split()[0] for _ in range(4)} == {"v2"}
        wait_for("the update rolled out", rolled, timeout=180, every=1)
        time.sleep(2)
        answers = loop.stop()
        bad = [a for a in answers if a[0] != 200]
        versions = [a[1].split()[0] for a in answers if a[0] == 200]
        assert not bad, (len(answers), bad[:5])
        assert versions[0] == "v1" and versions[-1] == "v2" and len(answers) >= 50, (len(answers), versions[:3])
        assert set(replicas_of(admin, "web")) == {"web.3", "web.4"}
        # the same file again: nothing changes
        p = admin("apply", "-f", str(web), "-y", "-d", check=0)
        assert "nothing changed" in p.stdout and set(replicas_of(admin, "web")) == {"web.3", "web.4"}, p.stdout

        # stopped: every replica with it, the endpoint gone
        admin("stop", "web", "-y", check=0)
        wait_for("web and its replicas to end", lambda: not any(n.startswith("web") for n in runs(admin)),
                 timeout=60)
        wait_for("web's endpoint to go", lambda: get(server.port, base, token)[0] == 404, timeout=30)
    finally:
        admin("stop", "web", "-y")
        server.stop()


def test_scaling_adds_a_replica_under_load_and_removes_it_after(lab_factory, tmp_path):
    lab = lab_factory(nodes=2, gpus=2)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    base = "/proxy/services/default/auto/"
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        auto = tmp_path / "auto.yml"
        auto.write_text(service("auto", fleet, "v1", {
            "auth": False, "replicas": "1..2",
            "scaling": {"metric": "rps", "target": 1, "window": "30s", "scale_up_delay": "5s",
                        "scale_down_delay": "10s"}}))
        admin("apply", "-f", str(auto), "-y", "-d", check=0)
        wait_for("one replica ready", lambda: runs(admin)["auto"].get("replicas") == "1/1", timeout=120)
        time.sleep(6)
        assert len(replicas_of(admin, "auto")) == 1  # no load: one replica

        # ~5 requests a second (target 1 per replica): a second replica, placed through the queue
        loop = Loop(server.port, base, None, every=0.2, limit=1500)
        try:
            wait_for("a second replica", lambda: runs(admin)["auto"].get("replicas") == "2/2", timeout=150, every=1)
        finally:
            answers = loop.stop()
        assert all(a[0] == 200 for a in answers), [a for a in answers if a[0] != 200][:5]
        events = admin("events", "--run", "auto", check=0).stdout
        assert "scaled from 1 to 2 replicas" in events, events

        # the load is over: back to one replica once the window has no more than 1 request/s
        wait_for("back to one replica", lambda: len(replicas_of(admin, "auto")) == 1 and
                 runs(admin)["auto"].get("replicas") == "1/1", timeout=150, every=1)
        events = admin("events", "--run", "auto", check=0).stdout
        assert "scaled from 2 to 1 replicas" in events, events
        assert get(server.port, base)[0] == 200
    finally:
        admin("stop", "auto", "-y")
        server.stop()

"""A service with a router (dstack's `router: {type: sglang}` replica group) on the lab (real sshd hosts behind a
login node, real podman, a real server): a router replica (router-stub, a stand-in for SGLang's router) and a
prefill and a decode worker (openai-stub --mode, answering SGLang's GET /server_info), one per host on the hosts'
network. The server registers both workers with the router (POST /workers, at their hosts' addresses, with the
prefill's bootstrap port); a chat request to the service's endpoint is answered by the decode worker through the
router (the endpoint sends the router only its inference paths: others are 403); the decode worker killed is
replaced, and the router's list follows (the gone one removed, the new one added)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import Cli, start_server, wait_for
from test_service_replicas_lab import replicas_of, runs

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


def service(fleet: str) -> str:
    return yaml.safe_dump({
        "type": "service", "name": "pd", "image": IMAGE, "port": 8000, "fleets": [fleet], "stop_duration": "1s",
        "model": "stub", "probes": [{"type": "http", "url": "/health", "interval": 1}],
        "replicas": [
            {"name": "router", "count": 1, "commands": ["exec router-stub --port 8000"], "router": {"type": "sglang"}},
            {"name": "prefill", "count": 1, "resources": {"gpu": 1},
             "commands": ["exec openai-stub --model stub --port 8000 --mode prefill --bootstrap-port 8998"]},
            {"name": "decode", "count": 1, "resources": {"gpu": 1},
             "commands": ["exec openai-stub --model stub --port 8000 --mode decode --delay 0"]}]}, sort_keys=False)


def chat(server, token: str) -> tuple[int, dict | str]:
    r = server.request("POST", "/proxy/services/default/pd/v1/chat/completions", token,
                       body={"model": "stub", "messages": [{"role": "user", "content": "hello router"}]})
    try:
        return r.status, r.json()
    except ValueError:
        return r.status, r.text


def test_a_router_service_registers_its_workers_and_serves_through_the_router(lab_factory, tmp_path):
    lab = lab_factory(nodes=3, gpus=1)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    token = server.admin_token
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        pd = tmp_path / "pd.yml"
        pd.write_text(service(fleet))
        admin("apply", "-f", str(pd), "-y", "-d", check=0)
        wait_for("the router and both workers ready", lambda: runs(admin)["pd"].get("replicas") == "3/3", timeout=150)
        reps = replicas_of(admin, "pd")
        by_group = {r["replica_group"]: r for r in reps.values()}
        assert set(by_group) == {"router", "prefill", "decode"}, reps
        assert len({r["host"] for r in reps.values()}) == 3, reps  # one per host: they share the host's network
        router = by_group["router"]["name"]

        # the server tells the router of both workers, at their hosts' addresses (the router's own log)
        def registered() -> str | None:
            out = admin("logs", router, check=None).stdout
            return out if all(f"added http://{by_group[g]['host']}:8000 ({g})" in out
                              for g in ("prefill", "decode")) else None
        logs = wait_for("both workers registered with the router", registered, timeout=60, every=1)
        assert logs.count("router-stub: added") == 2, logs  # each once: later passes find them listed

        # a request to the endpoint: the router carries it to the decode worker, whose answer comes back
        status, body = wait_for("a chat answer through the router",
                                lambda: (a := chat(server, token))[0] == 200 and a, timeout=30)
        assert body["choices"][0]["message"]["content"] == "echo: hello router", body
        assert body["system_fingerprint"].startswith("decode@"), body
        # only the router's inference paths are served
        assert server.request("GET", "/proxy/services/default/pd/workers", token).status == 403

        # the decode worker killed: replaced, and the router's list follows it
        killed = by_group["decode"]
        host = next(n for n in lab.nodes if n.address == killed["host"])
        core.host_exec(lab, host, ["podman", "rm", "-f", f"gpufleet-{killed['name']}"], check=True)

        def replaced() -> dict | None:
            now = {r["replica_group"]: r for r in replicas_of(admin, "pd").values()}
            new = now.get("decode")
            return new if new and new["name"] != killed["name"] and runs(admin)["pd"].get("replicas") == "3/3" \
                else None
        new = wait_for("a new decode worker, ready", replaced, timeout=120, every=1)
        url = f"http://{new['host']}:8000 (decode)"

        def followed() -> str | None:
            out = admin("logs", router, check=None).stdout
            return out if "router-stub: removed" in out and out.count(f"added {url}") >= 1 and \
                out.rindex(f"added {url}") > out.index("router-stub: removed") else None
        wait_for("the router's list to follow the new decode worker", followed, timeout=60, every=1)
        status, body = wait_for("a chat answer again", lambda: (a := chat(server, token))[0] == 200 and a, timeout=30)
        assert body["system_fingerprint"].startswith("decode@"), body
        ps = json.loads(admin("ps", "--json", check=0).stdout)
        assert any(r["name"] == "pd" and r.get("replicas") == "3/3" for r in ps), ps
        admin("stop", "pd", "-y", check=0)
        wait_for("pd and its replicas to end", lambda: not any(n.startswith("pd") for n in runs(admin)), timeout=60)
    finally:
        admin("stop", "pd", "-y")
        server.stop()

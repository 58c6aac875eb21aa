"""A service's router (gpufleet.router): which workers a router is told of and how (SGLang's router API, as
dstack's server uses it), which paths its endpoint serves, and that its replicas run on their hosts' network,
one per host."""

from __future__ import annotations

import contextlib
import shutil
import socket
import socketserver
import subprocess
import threading
import time

import httpx
import pytest

from gpufleet import router
from gpufleet.allocator import NoCapacity, Request, place
from gpufleet.lab.openai_stub import OPENAI_STUB
from gpufleet.lab.router_stub import ROUTER_STUB
from gpufleet.models import Run, RunStatus
from gpufleet.models.run import group_specs, router_group
from gpufleet.runconfig import parse_run

PD = """type: service
name: pd
image: x
port: 8000
replicas:
  - count: 1
    commands: [smg launch --pd-disaggregation]
    router: {type: sglang}
  - name: prefill
    count: 1..4
    scaling: {metric: rps, target: 3}
    commands: [python -m sglang.launch_server --disaggregation-mode prefill]
    resources: {gpu: 1}
  - name: decode
    count: 1
    commands: [python -m sglang.launch_server --disaggregation-mode decode]
    resources: {gpu: 1}
"""


def test_a_router_service_runs_every_replica_on_the_hosts_network():
    spec = parse_run(PD, "pd.yml").config.model_dump(mode="json")
    assert router_group(spec) == "0"  # its index: the group is not named
    specs = dict(group_specs(spec))
    assert set(specs) == {"0", "prefill", "decode"}
    assert all(s["network"] == "host" for s in specs.values())
    plain = parse_run(PD.replace("    router: {type: sglang}\n", ""), "pd.yml").config.model_dump(mode="json")
    assert router_group(plain) is None and all(s.get("network") is None for _, s in group_specs(plain))


def test_a_ready_worker_is_told_to_the_router_as_its_server_info_says():
    url = "http://10.0.0.2:8000"
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "prefill",
                                  "disaggregation_bootstrap_port": 8998}) == {
        "url": url, "worker_type": "prefill", "connection_mode": "http", "runtime_type": "sglang",
        "bootstrap_port": 8998}
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "decode",
                                  "disaggregation_bootstrap_port": 8998}) == {
        "url": url, "worker_type": "decode", "connection_mode": "http", "runtime_type": "sglang"}
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "null"})["worker_type"] == "regular"
    assert router.worker_of(url, {"status": "ready"})["worker_type"] == "regular"
    for not_ready in ({"status": "starting"}, {}, [], None, "ready"):
        assert router.worker_of(url, not_ready) is None


def test_the_router_is_told_what_changed_only():
    a = {"url": "http://10.0.0.2:8000", "worker_type": "prefill"}
    b = {"url": "http://10.0.0.3:8000", "worker_type": "decode"}
    listed = [{"id": "w1", "url": "http://10.0.0.2:8000/"}, {"id": "w2", "url": "http://10.0.0.9:8000"},
              {"url": "http://10.0.0.8:8000"}, "junk", {"id": "w3"}]
    add, remove = router.plan(listed, [a, b])
    assert add == [b]  # a is listed already (a trailing slash is the same URL)
    assert remove == [("w2", "http://10.0.0.9:8000")]  # one listed without an id cannot be removed
    assert router.plan([{"id": "w1", "url": a["url"]}], [a]) == ([], [])
    assert router.plan([], []) == ([], [])


def test_a_router_service_serves_its_routers_inference_paths_only():
    for path in ("/v1/chat/completions", "/v1/models", "/generate", "/chat/completions"):
        assert router.inference_path(path), path
    for path in ("/", "/workers", "/workers/w1", "/v1", "/generate/x", "/health", "/server_info"):
        assert not router.inference_path(path), path


def test_a_replica_that_must_be_alone_on_its_host_waits_rather_than_share_it():
    from test_allocator import host as slots
    from test_allocator import req  # the allocator's own test hosts and requests

    hosts = [slots(0, n=2), slots(1, n=2)]
    first = place(req(1), hosts)
    other = place(Request(gpu=req(1).gpu, spread=frozenset({first.host.instance_id})), hosts)
    assert other.host.instance_id != first.host.instance_id  # spread: another host when one fits
    both = frozenset({0, 1})
    assert place(Request(gpu=req(1).gpu, spread=both), hosts)  # ... else any
    with pytest.raises(NoCapacity) as e:  # a replica on its host's network: never beside another one
        place(Request(gpu=req(1).gpu, spread=both, spread_only=True), hosts)
    assert "node-0, node-1 run(s) another replica of its service" in str(e.value), str(e.value)


# --------------------------------------------------------------------------- sync against the lab's stand-ins

class _Relay(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix socket that carries each connection to a TCP port here (what the service proxy's ssh forward is)."""

    daemon_threads = True

    def __init__(self, path: str, port: int):
        self.port = port
        super().__init__(path, _Pipe)


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        out = socket.create_connection(("127.0.0.1", self.server.port))

        def pump(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(out, self.request), daemon=True)
        t.start()
        pump(self.request, out)
        t.join(10)
        out.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(name: str, group: str, port: int, status: RunStatus = RunStatus.RUNNING) -> Run:
    return Run(name=name, run_id=name, type="service", fleet="f", instance_id=1, alias=f"host-{group}",
               status=status, spec={"type": "service", "port": port}, container=name, created_at=0, updated_at=0,
               replica_of="pd", replica_group=group)


@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox here")
def test_sync_tells_the_router_its_ready_workers_and_forgets_the_gone(tmp_path):
    """router.sync against the lab image's router-stub and two openai-stub workers (prefill, decode), run by this
    machine's busybox, each reached through a Unix socket as the proxy's forwards are."""
    busybox = shutil.which("busybox")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "nc", "sed", "grep", "tr", "head", "tail", "wc", "date", "sleep", "printf", "echo", "awk",
                 "mkdir", "mv", "cat", "hostname"):
        (bin_dir / tool).symlink_to(busybox)
    for name, text in (("router-stub", ROUTER_STUB), ("openai-stub", OPENAI_STUB)):
        (bin_dir / name).write_text(text.replace("#!/bin/sh", f"#!{bin_dir}/sh", 1))
        (bin_dir / name).chmod(0o755)
    ports = {"router": _free_port(), "prefill": _free_port(), "decode": _free_port()}
    argv = {"router": ["router-stub", "--dir", str(tmp_path / "rs")],
            "prefill": ["openai-stub", "--mode", "prefill", "--bootstrap-port", "8998"],
            "decode": ["openai-stub", "--mode", "decode", "--delay", "0"]}
    procs, relays = [], []
    try:
        for g, port in ports.items():
            procs.append(subprocess.Popen([str(bin_dir / argv[g][0]), *argv[g][1:], "--port", str(port)],
                                          env={"PATH": str(bin_dir)}, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            relay = _Relay(str(tmp_path / f"{g}.sock"), port)
            threading.Thread(target=relay.serve_forever, daemon=True).start()
            relays.append(relay)
        deadline = time.monotonic() + 10
        for port in ports.values():
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "a stub did not listen"
                    time.sleep(0.1)
        service = Run(name="pd", run_id="s", type="service", fleet=None, instance_id=None, alias=None,
                      status=RunStatus.RUNNING, spec=parse_run(PD, "pd.yml").config.model_dump(mode="json"),
                      container="", created_at=0, updated_at=0, replicas=3)
        live = [service, _replica("pd.0", "0", ports["router"]), _replica("pd.1", "prefill", ports["prefill"]),
                _replica("pd.2", "decode", ports["decode"]), _replica("pd.3", "decode", 1, RunStatus.PENDING)]

        class Store:
            def runs(self):
                return list(live)

        looked: list[list[str]] = []

        def addresses_of(store, fleet, aliases):
            looked.append(list(aliases))
            return ["127.0.0.1" for _ in aliases]

        socks = {"pd.0": "router", "pd.1": "prefill", "pd.2": "decode"}
        memory = router.Memory()

        def listed() -> list[dict]:
            return httpx.get(f"http://127.0.0.1:{ports['router']}/workers", timeout=5).json()["workers"]

        def sync() -> None:
            router.sync(Store(), lambda s, r: str(tmp_path / f"{socks[r]}.sock") if r in socks else None, memory,
                        addresses_of)

        sync()
        got = {w["worker_type"]: w for w in listed()}
        assert set(got) == {"prefill", "decode"}, got  # the pending one is no worker yet
        assert got["prefill"]["url"] == f"http://127.0.0.1:{ports['prefill']}" and got["prefill"]["bootstrap_port"] \
            == 8998 and "bootstrap_port" not in got["decode"], got
        assert looked == [["host-prefill", "host-decode"]]  # one look-up for both hosts
        sync()
        assert len(listed()) == 2 and looked == [["host-prefill", "host-decode"]]  # nothing new: nothing told
        answer = httpx.post(f"http://127.0.0.1:{ports['router']}/v1/chat/completions", timeout=10,
                            json={"model": "stub", "messages": [{"role": "user", "content": "hi"}]}).json()
        assert answer["system_fingerprint"].startswith("decode@"), answer  # the router reached its decode worker
        live.remove(next(r for r in live if r.name == "pd.2"))  # the decode worker is gone
        sync()
        assert [w["worker_type"] for w in listed()] == ["prefill"]
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)
        for relay in relays:
            relay.shutdown()
            relay.server_close()

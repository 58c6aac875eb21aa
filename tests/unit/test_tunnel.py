"""Attach through the server: the tunnel route of a real server (uvicorn on loopback, the real API
app) and the CLI's half (gpufleet.tunnel), with ssh replaced by a local command that echoes.
The lab test (tests/integration/test_tunnel_lab.py) runs the real ssh to a real container."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from gpufleet import runs
from gpufleet.client import Client
from gpufleet.errors import EXIT_DENIED, GpufleetError, NotFound, Unauthorized, UsageError
from gpufleet.models import Run, RunStatus
from gpufleet.paths import FleetFiles
from gpufleet.tunnel import Forwarder, open_tunnel, ws_url

TOKEN = "t0k3n-for-tunnels"
ECHO = "import os\nwhile d := os.read(0, 65536):\n    os.write(1, d)\n"


def make_run(name: str = "web", **spec) -> Run:
    spec = {"type": "service", "port": 8000, "ports": ["9001:9000"], **spec}
    return Run(name=name, run_id="r1", type=spec["type"], fleet="f", instance_id=1, alias="f-0",
               status=RunStatus.RUNNING, spec=spec, container="c", created_at=0, updated_at=0)


def test_ws_url_follows_the_servers_scheme_and_prefix():
    assert ws_url("http://127.0.0.1:8300", "/api/runs/w/tunnel", port=80) == "ws://127.0.0.1:8300/api/runs/w/tunnel?port=80"
    assert ws_url("https://gpu.example.com/fleet/", "/api/x") == "wss://gpu.example.com/fleet/api/x"
    with pytest.raises(GpufleetError):
        ws_url("ftp://x", "/api/x")


def test_declared_ports_are_the_remote_sides_of_what_attach_forwards(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "host_port", lambda store, run, port: port + 30000)  # where the runtime published it
    run = make_run(ports=["9001:9000", 7000, "8000"])
    assert runs.forwards(run.spec) == [(8000, 8000), (9001, 9000), (7000, 7000)]
    with pytest.raises(UsageError, match="does not declare port 9001: it declares 7000, 8000, 9000"):
        runs.tunnel_argv(None, run, 9001)  # the local side of 9001:9000 is not a port of the host
    with pytest.raises(UsageError, match="it declares no ports"):
        runs.tunnel_argv(None, make_run(type="task", port=None, ports=[]), 22)
    with pytest.raises(GpufleetError, match="not running"):
        runs.tunnel_argv(None, make_run().model_copy(update={"status": RunStatus.DONE}), 8000)
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    files = FleetFiles.of("f")
    files.create()
    files.inventory.write_text("{}")
    argv = runs.tunnel_argv(None, run, 9000)
    assert argv[:3] == ["ssh", "-F", str(files.ssh_config)] and argv[-3:] == ["-W", "127.0.0.1:39000", "f-0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A real server (the API app on uvicorn) whose run `web` is on fleet f; ssh is ``command[0]``."""
    import uvicorn

    from gpufleet.server.api import Context, create_app
    from gpufleet.server.auth import token_hash
    from gpufleet.state import Store

    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    files = FleetFiles.of("f")
    files.create()
    files.inventory.write_text("{}")
    command = [[sys.executable, "-c", ECHO]]
    monkeypatch.setattr(runs, "ssh_argv", lambda *a, **k: list(command[0]))

    monkeypatch.setattr(Store, "run", lambda self, name: make_run() if name == "web" else None)
    monkeypatch.setattr(runs, "host_port", lambda store, run, port: port)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.bootstrap("admin", token_hash(TOKEN))
    ctx = Context(store=store, seal=lambda s: "",
                  kick=lambda: None, launch=lambda *a: None, background=lambda w: w(), info=dict,
                  shutdown=lambda: None)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    yield Client(f"http://127.0.0.1:{port}", TOKEN), command
    srv.should_exit = True
    thread.join(timeout=15)


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to 127.0.0.1:port, say it is all (half-close), and read the answer to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture()
def forwarding(server):
    client, command = server
    said: list[str] = []
    local = _free_port()
    fw = Forwarder(client, "web", [(local, 8000)], say=said.append)
    fw.listen()
    thread = threading.Thread(target=fw.serve, daemon=True)
    thread.start()
    yield local, command, said, fw
    fw.close()
    thread.join(timeout=5)


def test_connections_to_a_local_port_are_carried_both_ways(forwarding):
    local, _, said, _ = forwarding
    big = os.urandom(1 << 20)  # more than any one frame or buffer
    results: dict[int, bytes] = {}

    def one(i: int) -> None:
        results[i] = _exchange(local, big if i == 0 else f"hello {i}".encode())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]  # at the same time
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0] == big
    assert results[1] == b"hello 1" and results[2] == b"hello 2"
    assert said == []


def test_a_connection_ssh_cannot_make_is_closed_with_its_reason(forwarding):
    local, command, said, _ = forwarding
    command[0] = [sys.executable, "-c", "import sys; sys.stderr.write('channel 0: open failed: connect failed: "
                                        "Connection refused\\n'); sys.exit(255)"]
    assert _exchange(local, b"x") == b""
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    assert said == ["connection to web:8000 failed: channel 0: open failed: connect failed: Connection refused"]


def test_closing_the_client_stops_and_reaps_ssh(forwarding, tmp_path):
    local, command, _, fw = forwarding
    pids = tmp_path / "pids"
    command[0] = ["sh", "-c", f"echo $$ >> {pids}; exec cat"]
    socks = [socket.create_connection(("127.0.0.1", local), timeout=10) for _ in range(2)]
    for s in socks:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and all(Path(f"/proc/{p}").exists() for p in started)
    fw.close()  # what Ctrl-C does
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in started):  # gone, not a zombie: reaped
        assert time.monotonic() < deadline, [Path(f"/proc/{p}/status").read_text() for p in started]
        time.sleep(0.05)
    for s in socks:
        assert s.recv(4) == b""
        s.close()


def test_refusals_come_back_as_the_apis_errors(server):
    client, _ = server
    with pytest.raises(Unauthorized, match="bad token") as e:
        open_tunnel(Client(client.url, "wrong"), "web", 8000)
    assert e.value.exit_code == EXIT_DENIED and "wrong" not in str(e.value)
    with pytest.raises(Unauthorized, match="no token"):
        open_tunnel(Client(client.url, None), "web", 8000)
    with pytest.raises(UsageError, match="does not declare port 22: it declares 8000, 9000"):
        open_tunnel(client, "web", 22)
    with pytest.raises(NotFound, match="no run named 'nope'"):
        open_tunnel(client, "nope", 8000)
    with pytest.raises(GpufleetError, match="cannot open a tunnel through the gpufleet server at http://127.0.0.1:1"):
        open_tunnel(Client("http://127.0.0.1:1", TOKEN), "web", 8000)


def test_the_host_port_a_runtime_published_is_read_from_its_answer():
    from gpufleet.containers import commands

    assert commands().port_argv(["sudo", "podman"], "gpufleet-web", 8000) == \
        ["sudo", "podman", "port", "gpufleet-web", "8000/tcp"]
    assert commands().published_port("127.0.0.1:41234\n") == 41234
    assert commands().published_port("0.0.0.0:80\n[::]:80\n") == 80
    assert commands().published_port("") is None
    assert commands().published_port("Error: no such container\n") is None

"""Attach through the server: the tunnel and shell routes of a real server (uvicorn on loopback, the
real API app) and the CLI's half (gpufleet.tunnel), with ssh replaced by a local command (one that
echoes; a real /bin/sh on the server's pseudo-terminal for the shell). The lab tests
(tests/integration/test_tunnel_lab.py, test_shell_lab.py) run the real ssh to a real container."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

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

    runs_by_name = {"web": make_run(), "dev": make_run("dev", type="dev-environment", port=None, ports=[])}
    monkeypatch.setattr(Store, "run", lambda self, name: runs_by_name.get(name))
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


# ---------------------------------------------------------------------- a dev environment's shell

def test_resize_frames_and_exit_statuses():
    from gpufleet.server.tunnel import parse_resize
    from gpufleet.tunnel import exit_status, resize_message

    assert parse_resize(resize_message(33, 101)) == (33, 101)
    assert parse_resize('{"resize": [24, 80], "more": 1}') == (24, 80)
    for bad in ("", "not json", "[]", '{"resize": [0, 80]}', '{"resize": [24]}', '{"resize": [24, 80.5]}',
                '{"resize": ["24", 80]}', '{"resize": [24, 65536]}', '{"resize": [true, 80]}', '{"other": 1}'):
        assert parse_resize(bad) is None, bad
    assert [exit_status(r) for r in ("exit 0", "exit 3", "exit 255", "", None, "exit x", "exit 1234")] == \
        [0, 3, 255, 0, 0, 0, 0]


def test_the_shell_is_a_dev_environments_own_over_ssh_tt(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    files = FleetFiles.of("f")
    files.create()
    files.inventory.write_text("{}")
    dev = make_run("dev", type="dev-environment", port=None, ports=[])
    argv = runs.shell_argv(SimpleNamespace(fleet=lambda name: None), dev)  # a fleet the store lost: the default runtime
    assert argv[:3] == ["ssh", "-F", str(files.ssh_config)]
    assert argv[3:] == ["-tt", "-o", "EscapeChar=none", "-o", "LogLevel=ERROR", "f-0", "--",
                        "sudo -n podman exec -it c /bin/sh -c "
                        "'GPUFLEET_ATTACHED=1; export GPUFLEET_ATTACHED; exec /bin/sh'"]  # counted by inactivity
    with pytest.raises(UsageError, match="run web is a service, not a dev environment"):
        runs.shell_argv(None, make_run())
    with pytest.raises(GpufleetError, match="not running"):
        runs.shell_argv(None, dev.model_copy(update={"status": RunStatus.DONE}))


def _terminal(rows: int, cols: int) -> tuple[int, int]:
    """A pseudo-terminal of ``rows`` x ``cols``: (the side a user types on, the program's side)."""
    import fcntl
    import struct
    import termios

    user, program = os.openpty()
    fcntl.ioctl(program, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return user, program


def _read_until(fd: int, needle: bytes, timeout: float = 15) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not printed within {timeout}s: {out!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_a_shell_on_a_terminal_gets_its_size_raw_keys_and_its_exit_status(server):
    """run_shell on a terminal of 33x101 (this test's pseudo-terminal): the server's shell sees that
    size, then the new one after SIGWINCH; the terminal is raw while it runs and restored after."""
    import signal
    import termios

    from gpufleet.server.tunnel import set_size
    from gpufleet.tunnel import open_shell, run_shell

    client, command = server
    command[0] = ["env", "PS1=$ ", "/bin/sh"]
    user, program = _terminal(33, 101)
    before = termios.tcgetattr(program)
    printed: list[bytes] = []

    def type_in() -> None:
        try:
            printed.append(_read_until(user, b"$ "))  # the prompt
            os.write(user, b"echo $((6*7)); stty size\r")
            printed.append(_read_until(user, b"33 101"))
            set_size(program, 40, 120)
            os.kill(os.getpid(), signal.SIGWINCH)  # what the terminal's program gets when it is resized
            time.sleep(0.5)
            os.write(user, b"stty size; exit 3\r")
            printed.append(_read_until(user, b"40 120"))
        except BaseException:
            os.write(user, b"\rexit 99\r")  # the shell ends whatever failed here
            raise

    thread = threading.Thread(target=type_in, daemon=True)
    thread.start()
    try:
        assert run_shell(open_shell(client, "dev"), program, program) == 3
        thread.join(timeout=20)
        out = b"".join(printed)
        assert b"42" in out and b"33 101" in out and b"40 120" in out, out
        assert termios.tcgetattr(program) == before  # restored
    finally:
        os.close(user)
        os.close(program)


def test_a_shell_without_a_terminal_pipes_its_bytes_and_ends_with_its_input(server):
    from gpufleet.tunnel import open_shell, run_shell

    client, command = server
    command[0] = ["/bin/sh"]
    for script, status in ((b"echo $((6*7)); exit 5\n", 5), (b"echo $((6*7))\n", 0)):  # the 2nd ends with ^D
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        os.write(stdin_w, script)
        os.close(stdin_w)
        try:
            assert run_shell(open_shell(client, "dev"), stdin_r, stdout_w) == status
            os.close(stdout_w)
            out = b""
            while chunk := os.read(stdout_r, 65536):
                out += chunk
            assert b"42\r\n" in out, out
        finally:
            for fd in (stdin_r, stdout_r, stdout_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def test_a_shell_is_refused_for_a_run_that_is_not_a_dev_environment(server):
    from gpufleet.tunnel import open_shell

    client, _ = server
    with pytest.raises(UsageError, match="run web is a service, not a dev environment"):
        open_shell(client, "web")
    with pytest.raises(Unauthorized, match="bad token"):
        open_shell(Client(client.url, "wrong"), "dev")
    with pytest.raises(NotFound):
        open_shell(client, "nope")


def test_a_shell_whose_client_goes_is_stopped_and_reaped(server, tmp_path):
    from gpufleet.tunnel import open_shell

    client, command = server
    pid_file = tmp_path / "pid"
    command[0] = ["sh", "-c", f"echo $$ > {pid_file}; echo ready; exec sleep 600"]
    ws = open_shell(client, "dev")
    assert b"ready" in ws.recv(timeout=10)
    pid = int(pid_file.read_text())
    assert Path(f"/proc/{pid}").exists()
    ws.close()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists():  # gone, not a zombie: reaped
        assert time.monotonic() < deadline, Path(f"/proc/{pid}/status").read_text()
        time.sleep(0.05)

"""`gpufleet attach` through the server, on the lab: a user with the server's URL and a token, and no
fleet files, no keys, no ssh at all, reaches a service's port in its container (the server runs
`ssh -W` through the fleet's jump chain and carries the bytes over a WebSocket)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh_children(pid: int, flag: bytes = b"-W") -> list[str]:
    """The ssh processes with ``flag`` whose parent is ``pid`` (the server's tunnels: -W; shells: -tt)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and cmdline and cmdline[0].endswith(b"ssh") and flag in cmdline:
            found.append(f"{entry}: {b' '.join(cmdline).decode()}")
    return found


def http_get(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """What ``proc`` printed on stdout until ``needle`` (bounded by ``timeout``)."""
    out = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while needle.encode() not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not printed within {timeout}s: {out!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_attach_and_logs_through_the_server_with_a_token_and_no_keys(lab_factory, tmp_path):
    lab = lab_factory(nodes=1, gpus=2)
    server_home = tmp_path / "server-home"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "gpufleet", "server", "--port", str(port)],
                              env={**os.environ, "GPUFLEET_HOME": str(server_home)}, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    attach = follow = None
    admin = Cli(server_home, server=url)
    try:
        wait_for("the server to answer", lambda: admin("server", "status").returncode == 0, timeout=60)
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        local = free_port()
        svc = tmp_path / "web.yml"
        svc.write_text(f"type: service\nname: web\nimage: {IMAGE}\nport: '{local}:8000'\n"
                       f"fleets: [{core.fleet_name(lab)}]\ncommands:\n"
                       "  - mkdir -p /www && echo hello-through-the-server > /www/index.html\n"
                       "  - echo web-is-up\n"
                       "  - exec httpd -f -p 8000 -h /www\n")
        admin("apply", "-f", str(svc), "-y", "-d", check=0)

        # the user: the server's URL and a token; an empty state directory, and no ssh on its PATH
        token = (server_home / "server" / "token").read_text().strip()
        user_home = tmp_path / "user-home"
        bare = tmp_path / "empty-bin"
        bare.mkdir()
        env = {**os.environ, "GPUFLEET_HOME": str(user_home), "GPUFLEET_SERVER": url, "GPUFLEET_TOKEN": token,
               "PATH": str(bare)}
        user = Cli(user_home, server=url)

        # logs -f streams through the server
        follow = subprocess.Popen([sys.executable, "-m", "gpufleet", "logs", "-f", "web"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert "web-is-up" in read_until(follow, "web-is-up", timeout=60)
        assert follow.poll() is None  # still following

        attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", "web"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        printed = read_until(attach, "Ctrl-C", timeout=30)
        assert f"forwarding localhost:{local} -> web:8000 (through the gpufleet server at {url})" in printed
        body = wait_for("the service's answer through the tunnel", lambda: http_get(local), timeout=30)
        assert body.strip() == "hello-through-the-server"

        # two connections at the same time: the first held open half-way while the second is answered
        held = socket.create_connection(("127.0.0.1", local), timeout=10)
        held.sendall(b"GET / HTTP/1.0\r\n")
        wait_for("the server's ssh for the held connection", lambda: ssh_children(server.pid), timeout=15)
        assert http_get(local).strip() == "hello-through-the-server"
        held.sendall(b"Host: web\r\n\r\n")
        answer = b""
        while chunk := held.recv(65536):
            answer += chunk
        held.close()
        assert answer.startswith(b"HTTP/1.") and b"hello-through-the-server" in answer, answer

        # nothing of the fleet came to the user's state directory
        assert not (user_home / "fleets").exists()

        # a wrong token is refused with the server's message; so is a port the run does not declare
        p = user("attach", "web", env={"GPUFLEET_TOKEN": "gft_wrong", "PATH": str(bare)})
        assert p.returncode == 3 and "bad token" in p.stderr and "gft_wrong" not in p.stderr, p.stderr
        from gpufleet.client import Client
        from gpufleet.errors import UsageError
        from gpufleet.tunnel import open_tunnel

        with pytest.raises(UsageError, match=r"run web\.0 does not declare port 22: it declares 8000"):  # its replica
            open_tunnel(Client(url, token), "web", 22)
        with pytest.raises(UsageError, match="does not declare port"):
            open_tunnel(Client(url, token), "web", local)  # the local side of local:8000 is not the host's

        # Ctrl-C with a connection open: exit 0, and the server's ssh for it is gone
        held = socket.create_connection(("127.0.0.1", local), timeout=10)
        held.sendall(b"GET / HTTP/1.0\r\n")
        wait_for("the server's ssh for the open connection", lambda: ssh_children(server.pid), timeout=15)
        attach.send_signal(signal.SIGINT)
        assert attach.wait(timeout=20) == 0, attach.stderr.read()
        wait_for("no ssh left by the closed tunnels", lambda: not ssh_children(server.pid), timeout=15)
        assert held.recv(65536) == b""
        held.close()
        assert http_get(local) is None  # nothing listens any more

        # a client that dies (SIGKILL) in the middle of a connection leaves no ssh either
        attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", "web", "--through-server"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        read_until(attach, "Ctrl-C", timeout=30)
        held = socket.create_connection(("127.0.0.1", local), timeout=10)
        held.sendall(b"GET / HTTP/1.0\r\n")
        wait_for("the server's ssh for the open connection", lambda: ssh_children(server.pid), timeout=15)
        attach.kill()
        attach.wait(timeout=10)
        held.close()
        wait_for("no ssh left by the killed client", lambda: not ssh_children(server.pid), timeout=15)

        # the followed logs end when the run stops
        admin("stop", "web", "-y", check=0)
        assert follow.wait(timeout=30) == 0
    finally:
        for p in (attach, follow):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        admin("stop", "web", "-y")
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

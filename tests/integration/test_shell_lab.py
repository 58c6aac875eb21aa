"""`gpufleet attach` of a dev environment through the server, on the lab: a user with the server's URL
and a token, and no fleet files, no keys, no ssh at all, gets a shell in the run's container (the
server runs `ssh -tt ... exec -it CONTAINER /bin/sh` on a pseudo-terminal of its own and carries the
terminal over a WebSocket) and its ports, at the same time. Driven through a real pseudo-terminal (its
size is the remote one's, the shell's exit status is attach's), then through a pipe; another user of
the project is refused; no ssh of the server's is left."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, Cli, start_server, wait_for
from test_authz_lab import Team, fleet_text
from test_tunnel_lab import free_port, http_get, ssh_children

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
NOT_YOURS = "needs to be its submitter or an admin of project ml; you are a member of it"


def set_size(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_until(fd: int, needle: bytes, timeout: float, seen: bytearray) -> None:
    """Read the terminal ``fd`` into ``seen`` until ``needle`` shows after what was there already."""
    start = len(seen)
    deadline = time.monotonic() + timeout
    while needle not in seen[start:]:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not printed within {timeout}s: {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: nobody holds the terminal any more
                chunk = b""
            assert chunk, f"the terminal closed before {needle!r}: {bytes(seen)!r}"
            seen += chunk


def test_a_dev_environments_shell_through_the_server_with_a_token_and_no_keys(lab_factory, tmp_path):
    lab = lab_factory(nodes=1, gpus=2)
    server = start_server(tmp_path / "server-home")
    attach = None
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        team = Team(server, lab, tag="shell", workdir=tmp_path)
        stack.callback(team.clean_up)
        team.tokens["admin"] = server.admin_token
        team.ok("admin", "POST", "/api/projects", {"name": "ml"})
        team.add_user("alice", projects={"ml": "member"})
        team.add_user("bob", projects={"ml": "member"})
        assert team.apply_fleet("admin", "ml", fleet_text(lab, "ml-gpus", 0))["result"]["ok"]

        # alice: the server's URL and her token; an empty state directory, and no ssh on her PATH
        bare = tmp_path / "empty-bin"
        bare.mkdir()
        home = tmp_path / "alice-home"
        env = {**os.environ, "GPUFLEET_HOME": str(home), "GPUFLEET_SERVER": server.url,
               "GPUFLEET_TOKEN": team.tokens["alice"], "PATH": str(bare), "TERM": "dumb"}
        alice = Cli(home, server=server.url)
        local = free_port()
        dev = tmp_path / "dev.yml"
        dev.write_text(f"type: dev-environment\nname: dev\nimage: {IMAGE}\nports: ['{local}:8000']\n"
                       "commands:\n  - mkdir -p /www && echo hello-from-dev > /www/index.html\n"
                       "  - httpd -p 8000 -h /www\n")
        alice("apply", "-f", str(dev), "-y", "-d", check=0, env=env)
        wait_for("the dev environment to run",
                 lambda: '"status": "running"' in alice("ps", "--json", env=env).stdout, timeout=180)

        # through a real terminal of 33x101: the remote shell has that size; attach exits with its status
        user, terminal = os.openpty()
        set_size(terminal, 33, 101)
        attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", "dev"], env=env, cwd=ROOT,
                                  stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
        os.close(terminal)
        seen = bytearray()
        try:
            read_until(user, f"forwarding localhost:{local} -> dev:8000".encode(), 30, seen)
            read_until(user, b"# ", 60, seen)  # the container's shell prompts
            assert ssh_children(server.proc.pid, b"-tt"), "the server's ssh for the shell"
            os.write(user, b"echo $((6*7)); stty size\r")
            read_until(user, b"33 101", 30, seen)
            assert b"42\r\n" in seen, bytes(seen)
            # its port is forwarded while the shell is open
            assert wait_for("the dev environment's page", lambda: http_get(local), timeout=30).strip() == \
                "hello-from-dev"
            # the terminal resized: attach is told (SIGWINCH, which the kernel sends a terminal's own
            # programs), and so is the remote shell
            set_size(user, 40, 120)
            attach.send_signal(signal.SIGWINCH)
            time.sleep(1)
            os.write(user, b"stty size; exit 3\r")
            read_until(user, b"40 120", 30, seen)
            assert attach.wait(timeout=30) == 3, bytes(seen)
        finally:
            if attach.poll() is None:
                attach.kill()
                attach.wait(timeout=10)
            os.close(user)
        wait_for("no ssh left by the shell", lambda: not ssh_children(server.proc.pid, b"-tt"), timeout=15)
        assert http_get(local) is None  # attach's forwarding ended with it
        assert not (home / "fleets").exists()  # nothing of the fleet came to alice

        # through a pipe (a script): no terminal, no size; the bytes alone, and the shell's status
        p = subprocess.run([sys.executable, "-m", "gpufleet", "attach", "dev"], input=b"echo $((6*7)); exit 4\n",
                           capture_output=True, env=env, cwd=ROOT, timeout=60)
        assert p.returncode == 4 and b"42\r\n" in p.stdout, (p.returncode, p.stdout, p.stderr)

        # bob, a member of ml, may not open alice's shell: refused (exit 3) by the CLI and by the route
        p = alice("attach", "dev", env={**env, "GPUFLEET_TOKEN": team.tokens["bob"]})
        assert p.returncode == 3 and NOT_YOURS in p.stderr, p.stderr
        from gpufleet.client import Client
        from gpufleet.errors import Forbidden
        from gpufleet.tunnel import open_shell

        with pytest.raises(Forbidden, match=NOT_YOURS):
            open_shell(Client(server.url, team.tokens["bob"]), "dev")
        assert not ssh_children(server.proc.pid, b"-tt")

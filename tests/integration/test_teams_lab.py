"""A team on a shared server, through the real CLI: users with an API token and no SSH key (a client
state directory with no fleet files and no keys, GPUFLEET_SERVER and GPUFLEET_TOKEN set) submit,
list, read and stop their runs on the lab; the server refuses what is not theirs (exit 3, with a
message that says what is missing).

alice and bob are in ml only, so the server picks it for them (no `--project`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Cli, start_server, wait_for
from test_authz_lab import Team, fleet_text, task_text
from test_tunnel_lab import free_port, http_get, read_until

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
NOT_YOURS = "needs to be its submitter or an admin of project ml; you are a member of it"


@pytest.fixture(scope="module")
def team(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=8)
    work = tmp_path_factory.mktemp("teams")
    server = start_server(work / "home")
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        team = Team(server, lab, tag="cli", workdir=work)
        stack.callback(team.clean_up)
        team.tokens["admin"] = server.admin_token
        team.issued.append(team.tokens["admin"])
        for p in ("ml", "cv"):
            team.ok("admin", "POST", "/api/projects", {"name": p})
        team.add_user("alice", projects={"ml": "member"})
        team.add_user("bob", projects={"ml": "member"})
        team.add_user("carol", projects={"ml": "admin"})
        team.add_user("dave", projects={"cv": "member"})
        done = team.apply_fleet("carol", "ml", fleet_text(lab, "ml-gpus", 0))
        assert done["result"]["ok"], done
        yield team


class User:
    """The CLI as one user of the shared server: a state directory of their own, empty (no fleet
    files, no keys, no token file), the server's URL and their token in the environment."""

    def __init__(self, team: Team, name: str | None, home: Path, token: str | None = None):
        self.team, self.name = team, name
        self.cli = Cli(home, server=team.server.url)
        home.mkdir(parents=True, exist_ok=True)
        self.token = token

    def env(self) -> dict[str, str]:
        token = self.token or (self.team.tokens[self.name] if self.name else None)
        env = {"GPUFLEET_TOKEN": token} if token else {}
        return env

    def __call__(self, *args: str, check: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        p = self.cli(*args, check=check, timeout=timeout, env=self.env())
        for token in self.team.issued:
            assert token not in p.stdout + p.stderr, f"gpufleet {' '.join(args)} printed a token"
        return p

    def runs(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self("ps", "-a", "--json", check=0).stdout)}


@pytest.fixture(scope="module")
def users(team, tmp_path_factory):
    base = tmp_path_factory.mktemp("clients")
    return {name: User(team, name, base / name) for name in ("alice", "bob", "dave")}


def write_task(dir: Path, name: str, commands: list[str]) -> Path:
    path = dir / f"{name}.yml"
    path.write_text(task_text(name, commands, extra="stop_duration: 1s\n"))
    return path


def follow_briefly(user: User, name: str, seconds: float = 8.0) -> str:
    """`gpufleet logs -f NAME` for a few seconds (the run goes on: -f would never end), then ended."""
    env = {**os.environ, "GPUFLEET_HOME": str(user.cli.home), "GPUFLEET_SERVER": user.team.server.url,
           **user.env()}
    proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "logs", "-f", name], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=seconds)
        raise AssertionError(f"logs -f ended by itself ({proc.returncode}): {out}")
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    return out


def test_users_with_a_token_and_no_ssh_key_work_with_their_runs_and_not_with_others(team, users, tmp_path):
    alice, bob, dave = users["alice"], users["bob"], users["dave"]
    a, b = "a-cli", "b-cli"
    p = alice("apply", "-f", str(write_task(tmp_path, a, ["echo alice-says-hi", "sleep 300"])), "-y", "-d", check=0)
    assert f"{a} is" in p.stdout, p.stdout
    p = bob("apply", "-f", str(write_task(tmp_path, b, ["echo bob-says-hi", "sleep 300"])), "-y", "-d", check=0)
    assert f"{b} is" in p.stdout, p.stdout
    wait_for("both runs to run", lambda: {alice.runs()[n]["status"] for n in (a, b)} == {"running"}, timeout=180)

    # ps: a member sees the project's runs, with who submitted them; another project's user, neither
    rows = {r["name"]: r for r in team.ok("alice", "GET", "/api/runs")}
    assert (rows[a]["user"], rows[a]["project"], rows[b]["user"], rows[b]["project"]) == ("alice", "ml", "bob", "ml")
    table = alice("ps", check=0).stdout
    assert a in table and b in table, table
    assert dave.runs() == {} and a not in dave("ps", check=0).stdout and b not in dave("ps", "-a", check=0).stdout

    # logs, plain and followed, through the server (the client has no key to reach a host)
    wait_for("alice's output", lambda: "alice-says-hi" in alice("logs", a, check=0).stdout, timeout=60)
    assert "alice-says-hi" in follow_briefly(alice, a)
    wait_for("bob's output", lambda: "bob-says-hi" in bob("logs", b, check=0).stdout, timeout=60)

    # another member's run: refused, exit 3, saying what is missing
    for args in (("logs", b), ("logs", "-f", b), ("stop", b, "-y")):
        p = alice(*args)
        assert p.returncode == 3 and NOT_YOURS in p.stderr, (args, p.returncode, p.stdout, p.stderr)
    p = bob("stop", a, "-y")
    assert p.returncode == 3 and NOT_YOURS in p.stderr, p.stderr
    p = dave("logs", a)
    assert p.returncode == 3 and "needs membership of project ml; you are not a member of it" in p.stderr, p.stderr
    assert alice.runs()[b]["status"] == "running"  # the refused stop left it alone

    # each stops their own
    alice("stop", a, "-y", check=0)
    bob("stop", b, "-y", check=0)
    wait_for("both runs to stop", lambda: {alice.runs()[n]["status"] for n in (a, b)} == {"stopped"}, timeout=120)
    events = team.ok("alice", "GET", "/api/events", query={"run": b})
    assert [e["actor"] for e in events if e["kind"] == "stopped"] == ["bob"], events

    # the clients' state directories never got a key, a fleet file or a token
    for user in users.values():
        files = [p for p in user.cli.home.rglob("*") if p.is_file()]
        assert not [p for p in files if "fleets" in p.parts or "id_" in p.name or p.name == "token"], files


def test_no_token_or_a_bad_one_is_refused_with_exit_3(team, tmp_path):
    nobody = User(team, None, tmp_path / "nobody")
    p = nobody("ps")
    assert p.returncode == 3 and "token" in p.stderr and "GPUFLEET_TOKEN" in p.stderr, (p.returncode, p.stderr)
    bad = User(team, None, tmp_path / "bad", token="gft_" + "b" * 43)
    p = bad("ps")
    assert p.returncode == 3 and "bad token" in p.stderr, (p.returncode, p.stderr)


def _web(dir: Path, name: str, local: int, text: str) -> Path:
    path = dir / f"{name}.yml"
    path.write_text(f"type: service\nname: {name}\nimage: {IMAGE}\nport: '{local}:8000'\nstop_duration: 1s\n"
                    "commands:\n"
                    f"  - mkdir -p /www && echo {text} > /www/index.html\n"
                    "  - exec httpd -f -p 8000 -h /www\n")
    return path


def test_users_attach_to_their_own_runs_through_the_server_and_not_to_others(team, users, tmp_path):
    """alice and bob, with a token and no key, each reach their service's port through the server
    (`gpufleet attach`: a WebSocket to the server, which reaches the host); each is refused the
    other's run, and dave both."""
    alice, bob, dave = users["alice"], users["bob"], users["dave"]
    ports = {"alice": free_port(), "bob": free_port()}
    for user, name in ((alice, "a-web"), (bob, "b-web")):
        user("apply", "-f", str(_web(tmp_path, name, ports[user.name], f"hello-{user.name}")), "-y", "-d", check=0)
    try:
        wait_for("both services to run", lambda: {alice.runs()[n]["status"] for n in ("a-web", "b-web")} == {"running"},
                 timeout=180)
        for user, name in ((alice, "a-web"), (bob, "b-web")):
            env = {**os.environ, "GPUFLEET_HOME": str(user.cli.home), "GPUFLEET_SERVER": team.server.url,
                   **user.env()}
            attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", name], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            try:
                assert "through the gpufleet server" in read_until(attach, "Ctrl-C", timeout=30)
                port = ports[user.name]
                body = wait_for(f"{name}'s page through the tunnel", lambda p=port: http_get(p), timeout=30)
                assert body.strip() == f"hello-{user.name}"
                attach.send_signal(signal.SIGINT)
                assert attach.wait(timeout=20) == 0, attach.stderr.read()
            finally:
                if attach.poll() is None:
                    attach.kill()
                    attach.wait(timeout=10)
        for user, other in ((alice, "b-web"), (bob, "a-web")):
            p = user("attach", other, "--through-server")
            assert p.returncode == 3 and NOT_YOURS in p.stderr, (p.returncode, p.stdout, p.stderr)
        p = dave("attach", "a-web", "--through-server")
        assert p.returncode == 3 and "not a member" in p.stderr, p.stderr
    finally:
        alice("stop", "a-web", "-y")
        bob("stop", "b-web", "-y")


def test_a_quota_holds_runs_until_the_users_usage_drops(team, users, tmp_path):
    """carol (admin of ml) gives alice 2 GPUs at once. alice's second 2-GPU run waits with the
    quota's reason while bob's run starts past it; it starts when alice's first run ends.
    `quota list` shows the use, `usage` the GPU-hours."""
    alice, bob = users["alice"], users["bob"]
    carol = User(team, "carol", tmp_path / "carol")
    carol("quota", "set", "--project", "ml", "--user", "alice", "--gpus", "2", check=0)
    try:
        q1 = tmp_path / "q1.yml"
        q1.write_text(task_text("q1", ["sleep 300"], gpus=2, extra="stop_duration: 1s\n"))
        q2 = tmp_path / "q2.yml"
        q2.write_text(task_text("q2", ["echo q2-ran", "sleep 300"], gpus=2, extra="stop_duration: 1s\n"))
        alice("apply", "-f", str(q1), "-y", "-d", check=0)
        wait_for("q1 to run", lambda: alice.runs()["q1"]["status"] == "running", timeout=180)
        alice("apply", "-f", str(q2), "-y", "-d", check=0)
        wait_for("q2 to wait on the quota",
                 lambda: "quota: alice runs 2/2 GPUs of project ml" in alice.runs()["q2"]["message"], timeout=60)
        b = tmp_path / "bq.yml"
        b.write_text(task_text("bq", ["sleep 300"], gpus=2, extra="stop_duration: 1s\n"))
        bob("apply", "-f", str(b), "-y", "-d", check=0)
        wait_for("bob's run to start past the held one", lambda: bob.runs()["bq"]["status"] == "running", timeout=180)
        assert alice.runs()["q2"]["status"] == "pending"
        quotas = json.loads(alice("quota", "list", "--project", "ml", "--json", check=0).stdout)
        assert [(q["user"], q["gpus"], q["used"]) for q in quotas] == [("alice", 2, 2)], quotas
        alice("stop", "q1", "-y", check=0)
        wait_for("q2 to start once alice's usage dropped", lambda: alice.runs()["q2"]["status"] == "running",
                 timeout=180)
        wait_for("q2's output", lambda: "q2-ran" in alice("logs", "q2", check=0).stdout, timeout=60)
        usage = json.loads(alice("usage", "--project", "ml", "--json", check=0).stdout)
        mine = next(u for u in usage if u["user"] == "alice")
        assert mine["runs"] >= 2 and mine["gpu_hours"] > 0 and mine["decayed_gpu_hours"] > 0, usage
        # a member may not raise their own quota; the quota and the stop are in the audit trail
        p = alice("quota", "set", "--project", "ml", "--user", "alice", "--gpus", "8")
        assert p.returncode == 3 and "needs to be an admin of project ml" in p.stderr, p.stderr
        kinds = [(e["kind"], e["actor"]) for e in team.ok("carol", "GET", "/api/events", query={"project": "ml"})]
        assert ("quota", "carol") in kinds, kinds
    finally:
        for user, name in ((alice, "q1"), (alice, "q2"), (bob, "bq")):
            user("stop", name, "-y")
        carol("quota", "unset", "--project", "ml", "--user", "alice")

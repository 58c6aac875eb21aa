"""A team on a shared server, through the real CLI: users with an API token and no SSH key (a client
state directory with no fleet files and no keys, GPUFLEET_SERVER and GPUFLEET_TOKEN set) submit,
list, read and stop their runs on the lab; the server refuses what is not theirs (exit 3, with a
message that says what is missing).

The CLI has no `--project` flag yet: alice and bob are in ml only, so the server picks it for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Cli, start_server, wait_for
from test_authz_lab import Team, fleet_text, task_text

pytestmark = pytest.mark.lab
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
    # (`ps --json` shows no user or project yet: the API's run does)
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


def test_attach_through_the_server_without_keys(team, users, tmp_path):
    """TODO(attach through the server, another engineer's work): a user with a token and no SSH key
    attaches to their run through the server. Until then attach hands the client the server's own
    ssh_config (and so its keys) to run ssh with: this says so, and skips."""
    alice = users["alice"]
    name = "a-attach"
    alice("apply", "-f", str(write_task(tmp_path, name, ["sleep 300"])), "-y", "-d", check=0)
    try:
        wait_for("the run to run", lambda: alice.runs()[name]["status"] == "running", timeout=180)
        plan = team.ok("alice", "GET", f"/api/runs/{name}/attach")
    finally:
        alice("stop", name, "-y")
    if str(plan.get("ssh_config", "")).startswith(str(team.server.home)):
        pytest.skip("TODO: gpufleet attach through the server is not built yet: the server answers with its own "
                    f"ssh_config ({plan['ssh_config']}) for the client to run ssh with, which a client with no "
                    "keys and no fleet files does not have")
    pytest.fail(f"attach no longer hands out the server's ssh_config: write this test (the answer: {plan})")

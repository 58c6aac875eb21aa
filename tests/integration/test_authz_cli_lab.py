"""The authorization matrix of docs/teams.md through the CLI: every command of `gpufleet` that talks to
a server, run for real (a `python -m gpufleet` process) as each caller against a real `gpufleet
server` with real runs on the lab, and its exit code: 0 where allowed, 3 where the server denies
(401, 403, 429) with the server's message on stderr naming what is missing, 2 only where the CLI
refuses before it asks the server. test_authz_lab.py asks the same of the API's routes.

The team is test_authz_lab.py's (its Team makes it): projects `ml` and `cv`; alice and bob are
members of ml, carol is its admin, dave is a member of cv only, erin is a server admin in no
project. Each caller is a CLI with an empty state directory of its own (GPUFLEET_HOME: no config
file, no token file, no fleet files, no keys), GPUFLEET_SERVER and GPUFLEET_TOKEN: anonymous (no
token), a bad token, dave, bob (on alice's runs and ml's things), alice (on her own), carol, erin.

ROWS covers exactly the commands the parser has (a command with sub-commands by each of them),
less LOCAL_ONLY, the commands that never reach a server; a command missing from both fails
test_the_rows_cover_every_command_of_the_parser. Allowed calls act on things made for them (a run
per caller for `stop`, throw-away users, projects, members and quotas, scratch fleets, runs with -d)
so the fixture stays as it was for the other cells; `user rotate-token` runs last, and erin's
`server stop` is the module's last test. No output of any call holds a token the server gave out
(but the one it gave out in that very call, shown once by `user add` and `user rotate-token`).

Speed: each call is a Python start-up; the rows run in a pool of threads (the cells of one row one
after another, so a row's set-ups and targets never race): the whole file takes about 1.5 minutes on
an idle 2-core machine (its about 216 calls about 65 s of it), 2 CPU-minutes in all.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, pg_test_database, start_server, wait_for
from test_authz_lab import ANON, BAD, IMAGE, MARK, ROLES, Team, fleet_text, scratch_fleet_text, slug, task_text
from test_tunnel_lab import free_port, http_get

from gpufleet.cli import parser

pytestmark = pytest.mark.lab

# the databases the matrix runs on; SQLite is enough for the CLI's half (the API's half,
# test_authz_lab.py, runs on both): add "postgresql" to run it there too (scripts/test.sh sets
# GPUFLEET_TEST_DATABASE_URL)
DATABASES = ["sqlite"]
BAD_TOKEN_VALUE = "gft_" + "x" * 43  # a token nobody has (test_authz_lab.py's)
THREADS = 4
ATTACH_TEXT = "hello-through-attach"

# Commands that never reach a server, and why. Each was checked in gpufleet/commands/.
LOCAL_ONLY = {
    "logout": "removes $GPUFLEET_HOME/config.json; asks no server",
    "lab up": "makes the local lab (network namespaces, sshd); asks no server",
    "lab down": "removes a local lab; asks no server",
    "lab fault": "makes a local lab GPU report a hardware fault (its stand-in tools); asks no server",
    "server": "is the server itself (or, with --print-systemd-unit, prints a unit file)",
}


def parser_commands() -> set[str]:
    """Every command of the parser, as typed: `ps`, `quota set`, `project member add`; a command
    with sub-commands counts itself too where it runs alone (`server`)."""
    def walk(p: argparse.ArgumentParser, prefix: tuple[str, ...]) -> set[str]:
        found = {" ".join(prefix)} if prefix and p.get_default("func") is not None else set()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found |= walk(child, (*prefix, name))
        return found

    return walk(parser(), ())


# ---------------------------------------------------------------------- a bad token's own address

class Relay:
    """A TCP relay on 127.0.0.1 to the server whose connections to it come from ``source`` (any of
    127.0.0.0/8): each bad-token call comes from an address of its own, as test_authz_lab.py's do,
    so that ten of them do not lock 127.0.0.1 out (429) for the other cells. The CLI is not
    changed: it is given the relay's URL."""

    def __init__(self, port: int, source: str):
        self.port, self.source = port, source
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            try:
                up = socket.create_connection(("127.0.0.1", self.port), source_address=(self.source, 0))
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                a.close()
                b.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


# ---------------------------------------------------------------------- the CLI as each caller

@dataclass
class Out:
    """What one call did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def said(self) -> str:
        """stdout and stderr, with whitespace runs made one space (a console may wrap)."""
        return " ".join((self.stdout + "\n" + self.stderr).split())


@dataclass
class Bench:
    """The team on its server, and what the rows act on."""

    team: Team
    homes: Path
    web: str  # alice's service, for `attach`
    web_port: int  # its local port (`port: 'LOCAL:8000'`)
    sources: itertools.count = field(default_factory=lambda: itertools.count(1))
    homes_made: itertools.count = field(default_factory=lambda: itertools.count(1))

    def token(self, role: str) -> str | None:
        return None if role == ANON else BAD_TOKEN_VALUE if role == BAD else self.team.tokens[role]

    def env(self, role: str, url: str) -> dict[str, str]:
        home = self.homes / f"h{next(self.homes_made)}-{slug(role)}"
        home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN", "GPUFLEET_DATABASE_URL", "GPUFLEET_HOME")}
        env.update({"GPUFLEET_HOME": str(home), "GPUFLEET_SERVER": url, "PYTHONPATH": str(ROOT),
                    "COLUMNS": "400", "TERM": "dumb"})
        token = self.token(role)
        if token:
            env["GPUFLEET_TOKEN"] = token
        return env

    @contextlib.contextmanager
    def url(self, role: str):
        """The server's URL for ``role``: a relay of an address of its own for a bad token."""
        if role != BAD:
            yield self.team.server.url
            return
        n = next(self.sources)
        relay = Relay(self.team.server.port, f"127.0.{1 + n // 250}.{1 + n % 250}")
        try:
            yield relay.url
        finally:
            relay.close()

    def cli(self, role: str, argv: list[str], timeout: float = 120, stdin: str | None = None) -> Out:
        with self.url(role) as url:
            args = [url if a == "{server}" else a for a in argv]
            start = time.monotonic()
            given = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
            p = subprocess.run([sys.executable, "-m", "gpufleet", *args], capture_output=True, text=True,
                               env=self.env(role, url), cwd=ROOT, timeout=timeout, **given)
            return Out(args, p.returncode, p.stdout, p.stderr, time.monotonic() - start)

    def attach(self, role: str, argv: list[str]) -> Out:
        """`gpufleet attach`, which forwards until Ctrl-C: allowed, it prints where it forwards;
        then alice's page is fetched through the forwarded port (the server's WebSocket tunnel) and
        the CLI is sent SIGINT (it exits 0). Denied, it exits at once."""
        with self.url(role) as url:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-m", "gpufleet", *argv], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env(role, url),
                                    cwd=ROOT)
            out = b""
            try:
                deadline = time.monotonic() + 60
                while b"Ctrl-C" not in out and proc.poll() is None and time.monotonic() < deadline:
                    if select.select([proc.stdout], [], [], 0.2)[0]:
                        out += os.read(proc.stdout.fileno(), 65536)
                page = None
                if b"Ctrl-C" in out:
                    page = wait_for("alice's page through attach", lambda: http_get(self.web_port), timeout=30)
                    proc.send_signal(signal.SIGINT)
                rest, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
            stdout = (out + rest).decode(errors="replace") + (f"\n[page: {page.strip()}]" if page else "")
            return Out(argv, proc.returncode, stdout, err.decode(errors="replace"), time.monotonic() - start)


# ---------------------------------------------------------------------- the team on a server

def web_text(name: str, port: int) -> str:
    return (f"type: service\nname: {name}\nimage: {IMAGE}\nport: '{port}:8000'\nstop_duration: 1s\ncommands:\n"
            f"  - mkdir -p /www && echo {ATTACH_TEXT} > /www/index.html\n"
            "  - exec httpd -f -p 8000 -h /www\n")


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=2, gpus=8)


@pytest.fixture(scope="module", params=DATABASES)
def bench(request, lab, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_test_database("gpufleet_authz_cli")) if request.param == "postgresql" else None
        work = tmp_path_factory.mktemp(f"authz-cli-{request.param}")
        server = start_server(work / "home", url)
        stack.callback(server.stop)
        team = Team(server, lab, tag=f"c{request.param[:2]}", workdir=work)
        stack.callback(team.clean_up)
        team.set_up()  # the team, ml's and cv's fleets, a-main (alice), b-main, d-main, a-stop-{alice,carol,erin}
        port = free_port()
        web = team.run("a-web")
        team.ok("alice", "POST", "/api/runs", {"source": f"{work}/{web}.yml", "project": "ml",
                                               "text": web_text(web, port)})
        team.wait_running(web)
        homes = work / "clients"
        homes.mkdir()
        yield Bench(team, homes, web, port)


# ---------------------------------------------------------------------- the matrix

@dataclass(frozen=True)
class Want:
    exit: int
    words: tuple[str, ...] = ()  # in what the call said (stderr for a refusal)
    later: bool = False  # not run in the matrix: a later test runs it

    @property
    def allowed(self) -> bool:
        return self.exit not in (2, 3)


OK = Want(0)
LATER = Want(0, later=True)
NO_TOKEN = Want(3, ("no token", "GPUFLEET_TOKEN"))
REFUSED_TOKEN = Want(3, ("bad token",))


def denied(*words: str) -> Want:
    return Want(3, words)


def server_admin(user: str) -> Want:
    return denied("needs a server admin", f"{user} is a user")


NOT_MEMBER = denied("needs membership of project ml", "you are not a member of it")
NOT_IN_ML = denied("needs to be an admin of project ml", "you are not a member of it")
MEMBER_NOT_ADMIN = denied("needs to be an admin of project ml", "you are a member of it")
NOT_SUBMITTER = denied("needs to be its submitter or an admin of project ml", "you are a member of it")


def roles(other: Want, member: Want, padmin: Want, sadmin: Want, submitter: Want | None = None,
          anon: Want = NO_TOKEN) -> dict[str, Want]:
    return {ANON: anon, BAD: REFUSED_TOKEN, "dave": other, "bob": member, "alice": submitter or member, "carol": padmin,
            "erin": sadmin}


MEMBERS = dict(other=NOT_MEMBER, member=OK, padmin=OK, sadmin=OK)
PROJECT_ADMINS = dict(other=NOT_IN_ML, member=MEMBER_NOT_ADMIN, padmin=OK, sadmin=OK)
ONE_OWN_RUN = dict(other=NOT_MEMBER, member=NOT_SUBMITTER, submitter=OK, padmin=OK, sadmin=OK)
ANYONE = dict(other=OK, member=OK, padmin=OK, sadmin=OK)


def server_admins(sadmin: Want = OK) -> dict:
    return dict(other=server_admin("dave"), member=server_admin("bob"), submitter=server_admin("alice"),
                padmin=server_admin("carol"), sadmin=sadmin)


Argv = Callable[[Bench, str], list[str]]
Check = Callable[[Bench, str, Out], None]


@dataclass(frozen=True)
class Row:
    """One command (as the parser spells it) with the arguments each caller gives (made first where
    it acts on something of its own), what each gets, and ``check`` of an allowed call's output."""

    id: str
    command: str
    expect: dict[str, Want]
    argv: Argv
    check: Check | None = None
    last: bool = False  # after every other row (it changes tokens)
    attach: bool = False  # runs until Ctrl-C: Bench.attach
    stdin: str | None = None  # what the call reads on its stdin (else none: /dev/null)


def fixed(*argv: str) -> Argv:
    return lambda bench, role: list(argv)


def json_out(out: Out):
    return json.loads(out.stdout)


# -- runs

def check_ps(bench: Bench, role: str, out: Out) -> None:
    runs = {r["name"]: r for r in json_out(out)}
    main = bench.team.run("a-main")
    assert main in runs and runs[main]["user"] == "alice" and {r["project"] for r in runs.values()} == {"ml"}, runs


def check_logs(bench: Bench, role: str, out: Out) -> None:
    assert MARK in out.stdout, out.stdout[:300]


def check_metrics(bench: Bench, role: str, out: Out) -> None:
    got = json_out(out)
    assert got["run"] == bench.team.run("a-main") and len(got["gpus"]) == 1, got


def stop_argv(bench: Bench, role: str) -> list[str]:
    # the callers who may stop alice's runs stop one made for them; the others try her main run
    target = bench.team.run(f"a-stop-{role}" if role in ("alice", "carol", "erin") else "a-main")
    return ["stop", target, "-y"]


def check_stop(bench: Bench, role: str, out: Out) -> None:
    name = bench.team.run(f"a-stop-{role}")
    assert f"{name} stopped" in out.stdout, out.stdout
    assert bench.team.status(name) == "stopped"


def check_attach(bench: Bench, role: str, out: Out) -> None:
    assert f"forwarding localhost:{bench.web_port} -> {bench.web}:8000 (through the gpufleet server" in out.said, \
        out.said
    assert f"[page: {ATTACH_TEXT}]" in out.stdout, out.stdout


# `gpufleet ssh-proxy NAME PORT`: the ProxyCommand of a dev environment's ssh entry, a stdio proxy to
# the run's port through the server's tunnel (as attach's): asked here of alice's service, its stdin
# an HTTP request, its stdout the page
PROXIED_REQUEST = "GET / HTTP/1.0\r\n\r\n"


def check_ssh_proxy(bench: Bench, role: str, out: Out) -> None:
    assert out.stdout.startswith("HTTP/1.") and ATTACH_TEXT in out.stdout, out.stdout[:300]


def apply_run_argv(bench: Bench, role: str) -> list[str]:
    name = bench.team.run(f"apply-{slug(role)}")
    path = bench.team.workdir / f"{name}.yml"
    path.write_text(task_text(name, [f"echo applied-by-{role}"]))
    return ["apply", "-f", str(path), "-y", "-d", "--project", "ml"]


def check_apply_run(bench: Bench, role: str, out: Out) -> None:
    name = bench.team.run(f"apply-{slug(role)}")
    # "is running on ...", "is queued (#n): ...", or (it ran and ended between two looks) "NAME: done ..."
    assert f"{name} is" in out.stdout or f"{name}: done" in out.stdout, out.stdout
    run = bench.team.ok("admin", "GET", f"/api/runs/{name}")
    assert (run["user"], run["project"]) == (role, "ml"), run


def check_events(bench: Bench, role: str, out: Out) -> None:
    events = json_out(out)
    assert events and {e["project"] for e in events} == {"ml"}, events


# -- fleets

def ml_fleet_file(bench: Bench) -> Path:
    path = bench.team.workdir / "ml-gpus.yml"
    path.write_text(fleet_text(bench.team.lab, "ml-gpus", 0))
    return path


def apply_fleet_argv(bench: Bench, role: str) -> list[str]:
    if role in ("carol", "erin"):  # may apply: a scratch fleet of their own (its one host is nobody)
        path = bench.team.workdir / f"applied-{role}.yml"
        path.write_text(scratch_fleet_text(bench.team.lab, f"applied-{role}"))
    else:  # ml's own fleet, again
        path = ml_fleet_file(bench)
    return ["apply", "-f", str(path), "-y", "--project", "ml"]


# The scratch fleet's one host is 127.0.0.1:9, where nothing listens: the apply is allowed and done
# (the fleet is made, in ml), and the CLI exits 1 because its host could not be probed.
APPLIED_UNREACHABLE = Want(1, ("applied-",))


def check_apply_fleet(bench: Bench, role: str, out: Out) -> None:
    fleet = bench.team.ok("admin", "GET", f"/api/fleets/applied-{role}")
    assert fleet["project"] == "ml", fleet
    assert f"applied-{role}" in out.stdout, out.stdout


def dry_run_argv(bench: Bench, role: str) -> list[str]:
    return ["apply", "-f", str(ml_fleet_file(bench)), "--dry-run", "--project", "ml"]


def check_dry_run(bench: Bench, role: str, out: Out) -> None:
    assert "Fleet ml-gpus" in out.said and "--dry-run: nothing was changed" in out.said, out.said


def check_fleet_list(bench: Bench, role: str, out: Out) -> None:
    fleets = json_out(out)
    names = {f["name"] for f in (fleets if isinstance(fleets, list) else fleets.get("fleets", []))}
    assert "ml-gpus" in names and "cv-gpus" not in names, fleets


def fleet_delete_argv(bench: Bench, role: str) -> list[str]:
    if role not in ("carol", "erin"):
        return ["fleet", "delete", "ml-gpus", "-y"]
    name = f"scratch-{role}"
    if bench.team.call("admin", "GET", f"/api/fleets/{name}").status == 404:
        bench.team.apply_fleet("admin", "ml", scratch_fleet_text(bench.team.lab, name))
    return ["fleet", "delete", name, "-y"]


def check_fleet_delete(bench: Bench, role: str, out: Out) -> None:
    assert f"Fleet scratch-{role} deleted" in out.stdout, out.stdout
    assert bench.team.call("admin", "GET", f"/api/fleets/scratch-{role}").status == 404


def inventory_argv(bench: Bench, role: str) -> list[str]:
    out = bench.homes / f"inventory-{slug(role)}"
    return ["inventory", "-f", str(ml_fleet_file(bench)), "--out", str(out)]


def check_inventory(bench: Bench, role: str, out: Out) -> None:
    written = {p.name for p in (bench.homes / f"inventory-{role}").rglob("*")}
    assert "inventory:" in out.stdout and {"inventory.yml", "ssh_config"} <= written, (out.stdout, written)


# -- who, users, projects

def check_login(bench: Bench, role: str, out: Out) -> None:
    assert f"as {role} (" in out.said, out.said


def check_whoami(bench: Bench, role: str, out: Out) -> None:
    me = json_out(out)
    assert me["name"] == role and "token" not in me, me


def user_add_argv(bench: Bench, role: str) -> list[str]:
    return ["user", "add", f"new-by-{slug(role)}", "--json"]


def check_user_add(bench: Bench, role: str, out: Out) -> None:
    made = json_out(out)
    assert made["name"] == f"new-by-{role}" and made["token"].startswith("gft_"), made
    assert bench.team.server.request("GET", "/api/me", made["token"]).status == 200


def check_user_list(bench: Bench, role: str, out: Out) -> None:
    names = {u["name"] for u in json_out(out)}
    assert {"alice", "bob", "carol", "dave", "erin", "admin"} <= names, names


def throwaway_user(prefix: str, projects: dict[str, str] | None = None) -> Callable[[Bench, str], str]:
    def make(bench: Bench, role: str) -> str:
        name = f"{prefix}-{slug(role)}"
        if name not in bench.team.tokens:
            bench.team.add_user(name, projects=projects)
        return name
    return make


_del_user = throwaway_user("del")
_member = throwaway_user("mem", {"ml": "member"})


def user_delete_argv(bench: Bench, role: str) -> list[str]:
    return ["user", "delete", _del_user(bench, role), "-y"]


def check_user_delete(bench: Bench, role: str, out: Out) -> None:
    names = {u["name"] for u in bench.team.ok("admin", "GET", "/api/users")}
    assert f"del-{role}" not in names, names


def rotate_argv(bench: Bench, role: str) -> list[str]:
    # the one target each may try: another user's (denied), alice's own, erin a user made for it
    target = {"dave": "bob", "bob": "alice", "alice": "alice", "carol": "alice"}.get(role)
    if target is None:
        target = "rot-target"
        if target not in bench.team.tokens:
            bench.team.add_user(target, projects={"cv": "member"})
    return ["user", "rotate-token", target, "--json"]


def check_rotate(bench: Bench, role: str, out: Out) -> None:
    got = json_out(out)
    old = bench.team.tokens[got["name"]]
    assert got["token"].startswith("gft_") and got["token"] != old, got
    bench.team.tokens[got["name"]] = got["token"]
    assert bench.team.server.request("GET", "/api/me", old, source="127.0.0.250").status == 401
    assert bench.team.ok(got["name"], "GET", "/api/me")["name"] == got["name"]


def project_add_argv(bench: Bench, role: str) -> list[str]:
    return ["project", "add", f"proj-by-{slug(role)}"]


def check_project_add(bench: Bench, role: str, out: Out) -> None:
    assert f"Project proj-by-{role} made" in out.stdout, out.stdout


def check_project_list(bench: Bench, role: str, out: Out) -> None:
    names = {p["name"] for p in json_out(out)}
    want = {"dave": {"cv"}, "bob": {"ml"}, "alice": {"ml"}, "carol": {"ml"}}.get(role)
    if want is None:  # a server admin sees all
        assert {"ml", "cv", "default"} <= names, names
    else:
        assert names == want, (role, names)


def project_delete_argv(bench: Bench, role: str) -> list[str]:
    if role != "erin":  # a project they can see (if allowed by mistake, it is refused: it has a fleet)
        return ["project", "delete", "cv" if role == "dave" else "ml", "-y"]
    bench.team.ok("admin", "POST", "/api/projects", {"name": "doomed"})
    return ["project", "delete", "doomed", "-y"]


def check_project_delete(bench: Bench, role: str, out: Out) -> None:
    assert "Project doomed deleted" in out.stdout, out.stdout


def member_remove_argv(bench: Bench, role: str) -> list[str]:
    return ["project", "member", "remove", "ml", _member(bench, role)]


def check_member_remove(bench: Bench, role: str, out: Out) -> None:
    members = {p["name"]: p["members"] for p in bench.team.ok("admin", "GET", "/api/projects")}["ml"]
    assert f"mem-{role}" not in {m["user"] for m in members}, members


# -- quotas (each row its own scope: rows run at once)

def quota_unset_user_argv(bench: Bench, role: str) -> list[str]:
    bench.team.ok("admin", "PUT", "/api/quotas", {"project": "ml", "user": "bob", "gpus": 8})
    return ["quota", "unset", "--project", "ml", "--user", "bob"]


def quota_unset_project_argv(bench: Bench, role: str) -> list[str]:
    bench.team.ok("admin", "PUT", "/api/quotas", {"project": "ml", "gpu": "A100", "gpus": 100})
    return ["quota", "unset", "--project", "ml", "--gpu", "A100"]


def check_quota_list(bench: Bench, role: str, out: Out) -> None:
    assert all(q["project"] == "ml" for q in json_out(out)), out.stdout


def check_usage(bench: Bench, role: str, out: Out) -> None:
    usage = json_out(out)
    assert usage and {u["project"] for u in usage} == {"ml"}, usage


def check_server_status(bench: Bench, role: str, out: Out) -> None:
    info = json_out(out)
    assert info["url"] and info["version"] and ":gpufleet@" not in out.stdout, info


ROWS = [
    # runs
    Row("apply-run", "apply", roles(other=NOT_MEMBER, member=OK, padmin=OK, sadmin=OK), apply_run_argv,
        check_apply_run),
    Row("apply-fleet", "apply", roles(other=NOT_MEMBER, member=MEMBER_NOT_ADMIN, padmin=APPLIED_UNREACHABLE,
                                      sadmin=APPLIED_UNREACHABLE), apply_fleet_argv, check_apply_fleet),
    Row("apply-fleet-dry-run", "apply", roles(**{**PROJECT_ADMINS, "other": NOT_MEMBER}), dry_run_argv,
        check_dry_run),
    Row("ps", "ps", roles(**MEMBERS), fixed("ps", "-a", "--json", "--project", "ml"), check_ps),
    Row("logs", "logs", roles(**ONE_OWN_RUN), lambda b, r: ["logs", b.team.run("a-main")], check_logs),
    Row("stop", "stop", roles(**ONE_OWN_RUN), stop_argv, check_stop),
    Row("attach", "attach", roles(**ONE_OWN_RUN), lambda b, r: ["attach", b.web], check_attach, attach=True),
    Row("ssh-proxy", "ssh-proxy", roles(**ONE_OWN_RUN), lambda b, r: ["ssh-proxy", b.web, "8000"], check_ssh_proxy,
        stdin=PROXIED_REQUEST),
    Row("events", "events", roles(**MEMBERS), fixed("events", "--project", "ml", "-n", "5", "--json"), check_events),
    Row("metrics", "metrics", roles(**ONE_OWN_RUN), lambda b, r: ["metrics", b.team.run("a-main"), "--json"],
        check_metrics),
    # fleets
    Row("fleet-list", "fleet list", roles(**MEMBERS), fixed("fleet", "list", "--project", "ml", "--json"),
        check_fleet_list),
    Row("fleet-delete", "fleet delete", roles(**{**PROJECT_ADMINS, "other": NOT_MEMBER}), fleet_delete_argv,
        check_fleet_delete),
    Row("inventory", "inventory", roles(**MEMBERS), inventory_argv, check_inventory),
    # who is asking; users
    # anonymous: the CLI has no token to send and says so (exit 2) before it asks the server
    Row("login", "login", roles(**ANYONE, anon=Want(2, ("no token", "--token"))),
        fixed("login", "--server", "{server}"), check_login),
    Row("whoami", "whoami", roles(**ANYONE), fixed("whoami", "--json"), check_whoami),
    Row("user-add", "user add", roles(**server_admins()), user_add_argv, check_user_add),
    Row("user-list", "user list", roles(**server_admins()), fixed("user", "list", "--json"), check_user_list),
    Row("user-delete", "user delete", roles(**server_admins()), user_delete_argv, check_user_delete),
    # projects
    Row("project-add", "project add", roles(**server_admins()), project_add_argv, check_project_add),
    Row("project-list", "project list", roles(**ANYONE), fixed("project", "list", "--json"), check_project_list),
    Row("project-delete", "project delete", roles(**server_admins()), project_delete_argv, check_project_delete),
    Row("member-add", "project member add", roles(**PROJECT_ADMINS), fixed("project", "member", "add", "ml", "bob")),
    Row("member-remove", "project member remove", roles(**PROJECT_ADMINS), member_remove_argv, check_member_remove),
    # quotas and usage
    Row("quota-set-user", "quota set", roles(**PROJECT_ADMINS),
        fixed("quota", "set", "--project", "ml", "--user", "alice", "--gpus", "8")),
    Row("quota-set-project", "quota set", roles(**server_admins()), fixed("quota", "set", "--project", "ml", "--gpus",
                                                                         "100")),
    Row("quota-unset-user", "quota unset", roles(**PROJECT_ADMINS), quota_unset_user_argv),
    Row("quota-unset-project", "quota unset", roles(**server_admins()), quota_unset_project_argv),
    Row("quota-list", "quota list", roles(**MEMBERS), fixed("quota", "list", "--project", "ml", "--json"),
        check_quota_list),
    Row("usage", "usage", roles(**MEMBERS), fixed("usage", "--project", "ml", "--json"), check_usage),
    # the server
    Row("server-status", "server status", roles(**ANYONE), fixed("server", "status", "--json"), check_server_status),
    Row("server-stop", "server stop", roles(**server_admins(LATER)), fixed("server", "stop")),
    # last: alice's own rotation changes the token the rows above use
    Row("user-rotate-token", "user rotate-token",
        roles(**{**server_admins(), "submitter": OK}), rotate_argv, check_rotate, last=True),
]


def test_the_rows_cover_every_command_of_the_parser():
    commands = parser_commands()
    rows = {row.command for row in ROWS}
    assert not rows & set(LOCAL_ONLY), rows & set(LOCAL_ONLY)
    assert rows | set(LOCAL_ONLY) == commands, (f"commands without a row: {sorted(commands - rows - set(LOCAL_ONLY))}; "
                                                f"rows of no command: {sorted(rows - commands)}; "
                                                f"local-only of no command: {sorted(set(LOCAL_ONLY) - commands)}")
    for row in ROWS:
        assert set(row.expect) == set(ROLES), row.id
    assert len({row.id for row in ROWS}) == len(ROWS)


# ---------------------------------------------------------------------- running it

@dataclass
class Cell:
    row: Row
    role: str
    out: Out | None = None
    minted: list[str] = field(default_factory=list)  # tokens the server gave out in this call
    wrong: list[str] = field(default_factory=list)


TOKEN = re.compile(r"gft_[A-Za-z0-9_-]{43}")


def run_cell(bench: Bench, row: Row, role: str) -> Cell:
    cell = Cell(row, role)
    want = row.expect[role]
    try:
        argv = row.argv(bench, role)
        known = [*bench.team.issued, BAD_TOKEN_VALUE]
        out = cell.out = bench.attach(role, argv) if row.attach else bench.cli(role, argv, stdin=row.stdin)
        printed = out.stdout + out.stderr
        leaked = [t for t in known if t in printed]
        if leaked:
            cell.wrong.append(f"printed {len(leaked)} token(s) the server had given out before")
        new = [t for t in TOKEN.findall(printed) if t not in known]
        if new and not (want.allowed and row.id in ("user-add", "user-rotate-token")):
            cell.wrong.append("printed a token")
        cell.minted = new
        bench.team.issued.extend(new)
        if out.returncode != want.exit:
            cell.wrong.append(f"exit {out.returncode}, want {want.exit}")
        missing = [w for w in want.words if w not in (out.said if want.allowed else " ".join(out.stderr.split()))]
        if missing:
            cell.wrong.append(f"does not say {missing}")
        if want.allowed and out.returncode == want.exit and row.check is not None:
            row.check(bench, role, out)
    except AssertionError as e:
        cell.wrong.append(f"allowed, but {str(e)[:500]}")
    except Exception as e:  # noqa: BLE001 - reported as the cell's, the others go on
        cell.wrong.append(f"{type(e).__name__}: {e}")
    return cell


def run_row(bench: Bench, row: Row) -> list[Cell]:
    return [run_cell(bench, row, role) for role in ROLES if not row.expect[role].later]


@pytest.fixture(scope="module")
def matrix(bench) -> dict[str, list[Cell]]:
    """Every cell, run: the rows in a pool of threads (a row's cells one after another), then the
    rows that must come last, one at a time."""
    start = time.monotonic()
    first = [row for row in ROWS if not row.last]
    with ThreadPoolExecutor(THREADS) as pool:
        done = dict(zip([r.id for r in first], pool.map(lambda row: run_row(bench, row), first), strict=True))
    for row in ROWS:
        if row.last:
            done[row.id] = run_row(bench, row)
    cells = [c for cs in done.values() for c in cs]
    took = time.monotonic() - start
    slowest = sorted((c for c in cells if c.out), key=lambda c: -c.out.seconds)[:3]
    print(f"\n{len(cells)} CLI calls in {took:.0f}s; slowest: " +
          ", ".join(f"{c.row.id}/{c.role} {c.out.seconds:.1f}s" for c in slowest))
    print(f"{'exit codes':22}" + "".join(f"{slug(r):>10}" for r in ROLES))  # shown with pytest -s
    for row_id, cs in done.items():
        codes = {c.role: str(c.out.returncode) if c.out else "?" for c in cs}
        print(f"{row_id:22}" + "".join(f"{codes.get(r, 'later'):>10}" for r in ROLES))
    return done


def describe(cell: Cell) -> str:
    """A cell that went wrong, with what it said (any token in it blanked: a report is no place for one)."""
    out = cell.out
    said = f"\n    $ gpufleet {' '.join(out.argv)}\n    exit {out.returncode}\n    stdout: {out.stdout[-600:]!r}" \
           f"\n    stderr: {out.stderr[-600:]!r}" if out else ""
    return TOKEN.sub("gft_[blanked]", f"  {cell.role}: {'; '.join(cell.wrong)}{said}")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_the_cli_authorization_matrix(matrix, row):
    wrong = [describe(c) for c in matrix[row.id] if c.wrong]
    assert not wrong, f"gpufleet {row.command} ({row.id}):\n" + "\n".join(wrong)


def test_no_cli_output_holds_a_token_the_server_gave_out(matrix, bench):
    """Across every call of the matrix, and every token the server gave out (rotated ones too, and
    those made after the call): none is in any output, but a token in the output of the very call
    that made it (`user add`, `user rotate-token`, shown once)."""
    tokens = [*bench.team.issued, BAD_TOKEN_VALUE]
    assert len(tokens) > 10
    found = []
    for cell in (c for cs in matrix.values() for c in cs if c.out):
        printed = cell.out.stdout + cell.out.stderr
        found += [f"{cell.row.id}/{cell.role}" for t in tokens if t in printed and t not in cell.minted]
    assert not found, f"outputs that hold a token: {found}"
    minted = {f"{c.row.id}/{c.role}" for cs in matrix.values() for c in cs if c.minted}
    assert minted == {"user-add/erin", "user-rotate-token/alice", "user-rotate-token/erin"}, minted


def test_the_tunnel_of_attach_refuses_whom_attach_refuses(bench):
    """`gpufleet attach` asks GET /api/runs/NAME/attach, then opens the WebSocket route
    /api/runs/NAME/tunnel for each connection. A WebSocket route is not in /openapi.json, so
    test_authz_lab.py's table has no row of it, and the CLI's refused callers never get that far:
    here it is asked directly, as each caller, with the CLI's own client (gpufleet.tunnel)."""
    from gpufleet.client import Client
    from gpufleet.errors import GpufleetError
    from gpufleet.tunnel import open_tunnel

    expect = roles(**ONE_OWN_RUN)
    wrong = []
    for role in ROLES:
        want = expect[role]
        with bench.url(role) as url:
            try:
                ws = open_tunnel(Client(url, bench.token(role)), bench.web, 8000)
            except GpufleetError as e:
                said = str(e)
                if any(t in said for t in [*bench.team.issued, BAD_TOKEN_VALUE]):
                    wrong.append(f"{role}: the refusal holds a token")
                elif want.allowed or e.exit_code != 3 or not all(w in said for w in want.words):
                    wrong.append(f"{role}: refused, exit code {e.exit_code}: {said}")
                continue
            try:
                ws.send(b"GET / HTTP/1.0\r\n\r\n")
                ws.send(b"")  # no more from this side
                page = b""
                with contextlib.suppress(Exception):
                    while True:
                        page += ws.recv(timeout=30)
            finally:
                ws.close()
            if not want.allowed or ATTACH_TEXT.encode() not in page:
                wrong.append(f"{role}: opened, and got {page[:200]!r}")
    assert not wrong, "\n".join(wrong)


def test_a_server_admin_stops_the_server_with_the_cli(matrix, bench):
    """Last: erin's `server stop` (the matrix's LATER cell), once every run has ended."""
    team = bench.team
    team.clean_up()
    cell = run_cell(bench, next(r for r in ROWS if r.id == "server-stop"), "erin")
    assert cell.out.returncode == 0 and "Stopped the server at" in cell.out.stdout, describe(cell)
    assert not cell.wrong, describe(cell)
    team.server.proc.wait(timeout=60)
    log = team.server.log.read_text(errors="replace")
    assert not [t for t in team.issued if t in log], "the server's log holds a token"

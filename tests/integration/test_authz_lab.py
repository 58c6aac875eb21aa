"""The authorization matrix of docs/teams.md, asked of a real `gpufleet server` process over a real
socket (plain HTTP, no test client), on SQLite and on PostgreSQL, with real fleets and real runs on
the lab.

The team: projects `ml` and `cv`; alice and bob are members of ml, carol is its admin, dave is a
member of cv only, erin is a server admin in no project (and `admin`, the bootstrap admin, made
them all). For every route the live server's /openapi.json lists under /api, CASES says what each
caller gets: anonymous, a bad token, dave (another project's user), bob (a member, acting on
alice's run and ml's things), alice (the run's submitter), carol (ml's admin), erin (server admin).
A route without a row fails the test that compares CASES with the schema.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import re
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import ApiServer, Reply, pg_test_database, start_server, wait_for

from gpufleet import upload
from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
ANON, BAD = "anonymous", "bad token"
USERS = ("dave", "bob", "alice", "carol", "erin")
ROLES = (ANON, BAD, *USERS)
MARK = "alice-was-here"  # what alice's main run prints first
WEB_MARK = "alice-serves-this"  # what alice's service answers


# ---------------------------------------------------------------------- the team on a server

def fleet_text(lab, name: str, node: int) -> str:
    """The lab's fleet file, as fleet ``name`` of one of its nodes."""
    fleet = yaml.safe_load(lab.fleet_file.read_text())
    fleet["name"] = name
    fleet["ssh_config"]["hosts"] = [lab.nodes[node].address]
    fleet.pop("placement", None)
    return yaml.safe_dump(fleet, sort_keys=False)


def scratch_fleet_text(lab, name: str) -> str:
    """A fleet of one host nobody listens for (its probe fails in a second): applied and deleted
    by the rows that may, touching no real host."""
    return yaml.safe_dump({"type": "fleet", "name": name, "ssh_config": {
        "user": core.LAB_USER, "identity_file": str(lab.key("node")),
        "hosts": [{"hostname": "127.0.0.1", "port": 9}]}}, sort_keys=False)


def task_text(name: str, commands: list[str], gpus: int = 1, extra: str = "") -> str:
    lines = "".join(f"  - {json.dumps(c)}\n" for c in commands)
    return f"type: task\nname: {name}\nimage: {IMAGE}\nresources:\n  gpu: {gpus}\n{extra}commands:\n{lines}"


@dataclass
class Team:
    server: ApiServer
    lab: object
    tag: str  # in run names: the two databases' servers share the lab's hosts (and container names)
    workdir: Path
    tokens: dict[str, str] = field(default_factory=dict)  # user -> their token now
    issued: list[str] = field(default_factory=list)  # every token the API ever gave out (rotated ones too)
    sources: itertools.count = field(default_factory=lambda: itertools.count(1))

    def run(self, key: str) -> str:
        return f"{key}-{self.tag}"

    def call(self, who: str | None, method: str, path: str, body=None, query: dict | None = None,
             source: str | None = None) -> Reply:
        """A request as ``who`` (a user; ANON: no token; BAD: a token nobody has, each from an
        address of its own so that the limit on failed logins stays out of the way). No reply ever
        holds a token the API gave out before it (a reply may hold the one it gives out now)."""
        token = None if who in (None, ANON) else "gft_" + "x" * 43 if who == BAD else self.tokens[who]
        if who == BAD and source is None:
            n = next(self.sources)
            source = f"127.0.{1 + n // 250}.{1 + n % 250}"
        known = list(self.issued)
        reply = self.server.request(method, path, token, body, query, source=source)
        seen = reply.text + json.dumps(reply.headers)
        leaked = [t for t in known if t in seen]
        assert not leaked, f"{method} {path} as {who}: the reply holds a token: {reply.status} {reply.text[:300]}"
        with contextlib.suppress(ValueError):
            body = reply.json()
            if isinstance(body, dict) and isinstance(body.get("token"), str):
                self.issued.append(body["token"])
        return reply

    def ok(self, who: str, method: str, path: str, body=None, query: dict | None = None):
        reply = self.call(who, method, path, body, query)
        assert 200 <= reply.status < 300, f"{method} {path} as {who}: {reply.status} {reply.text[:500]}"
        try:
            return reply.json()
        except ValueError:
            return reply.text

    def add_user(self, name: str, role: str = "user", projects: dict[str, str] | None = None) -> str:
        """User ``name`` (made by admin), in ``projects`` ({project: role}); their token."""
        made = self.ok("admin", "POST", "/api/users", {"name": name, "role": role})
        assert made["name"] == name and made["token"].startswith("gft_")
        self.tokens[name] = made["token"]
        for project, prole in (projects or {}).items():
            self.ok("admin", "POST", f"/api/projects/{project}/members", {"user": name, "role": prole})
        return made["token"]

    def apply_fleet(self, who: str, project: str, text: str) -> dict:
        """POST /api/fleets and read its stream to the end: the result line (or the error line)."""
        name = yaml.safe_load(text)["name"]
        path = self.workdir / f"{name}.yml"
        path.write_text(text)
        reply = self.call(who, "POST", "/api/fleets", {"source": str(path), "text": text, "project": project})
        assert reply.status == 200, reply.text
        last = json.loads(reply.text.strip().splitlines()[-1])
        assert "result" in last or "error" in last, reply.text
        return last

    def submit(self, who: str, name: str, commands: list[str], project: str = "ml", gpus: int = 1,
               extra: str = "") -> dict:
        return self.ok(who, "POST", "/api/runs", {"source": f"{self.workdir}/{name}.yml", "project": project,
                                                   "text": task_text(name, commands, gpus, extra)})

    def status(self, name: str) -> str:
        return self.ok("admin", "GET", f"/api/runs/{name}")["status"]

    def wait_running(self, *names: str) -> None:
        for name in names:
            wait_for(f"run {name} to be running", lambda n=name: self.status(n) == "running", timeout=180)

    def set_up(self) -> None:
        self.tokens["admin"] = self.server.admin_token
        self.issued.append(self.tokens["admin"])
        for p in ("ml", "cv"):
            made = self.ok("admin", "POST", "/api/projects", {"name": p})
            assert made["name"] == p
        self.add_user("alice", projects={"ml": "member"})
        self.add_user("bob", projects={"ml": "member"})
        self.add_user("carol", projects={"ml": "admin"})
        self.add_user("dave", projects={"cv": "member"})
        self.add_user("erin", role="admin")
        # ml's fleet applied by its project admin, cv's by a server admin: one lab node each
        done = self.apply_fleet("carol", "ml", fleet_text(self.lab, "ml-gpus", 0))
        assert done["result"]["ok"] and done["result"]["fleet"]["project"] == "ml", done
        done = self.apply_fleet("admin", "cv", fleet_text(self.lab, "cv-gpus", 1))
        assert done["result"]["ok"] and done["result"]["fleet"]["project"] == "cv", done
        sleeper = ["sleep 300"]
        runs = [("alice", "a-main", [f"echo {MARK}", "sleep 300"], "ml"), ("bob", "b-main", sleeper, "ml"),
                ("dave", "d-main", sleeper, "cv")]
        runs += [("alice", f"a-stop-{who}", sleeper, "ml") for who in ("alice", "carol", "erin")]
        for who, key, commands, project in runs:
            made = self.submit(who, self.run(key), commands, project, extra="stop_duration: 1s\n")
            assert (made["user"], made["project"]) == (who, project), made
        web = self.run("a-svc")  # alice's service (auth: true, dstack's default): the proxy's row
        self.ok("alice", "POST", "/api/runs", {"source": f"{self.workdir}/{web}.yml", "project": "ml", "text": (
            f"type: service\nname: {web}\nimage: {IMAGE}\nport: 8000\nstop_duration: 1s\ncommands:\n"
            f"  - mkdir -p /www && echo {WEB_MARK} > /www/index.html\n  - exec httpd -f -p 8000 -h /www\n")})
        self.wait_running(*(self.run(key) for _, key, _, _ in runs))
        wait_for(f"service {web} to answer", lambda: self.call(
            "admin", "GET", f"/proxy/services/ml/{web}/").status == 200, timeout=120)

    def clean_up(self) -> None:
        """Stop every run still active and wait for their containers to go (the lab is shared)."""
        if not self.server.alive():
            return
        active = [r["name"] for r in self.ok("admin", "GET", "/api/runs") if r["status"] not in
                  ("done", "failed", "stopped")]
        for name in active:
            self.call("admin", "POST", f"/api/runs/{name}/stop")
        wait_for("every run to end", lambda: not self.ok("admin", "GET", "/api/runs"), timeout=120)


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=2, gpus=8)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def team(request, lab, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_test_database("gpufleet_authz")) if request.param == "postgresql" else None
        work = tmp_path_factory.mktemp(f"authz-{request.param}")
        server = start_server(work / "home", url)
        stack.callback(server.stop)
        team = Team(server, lab, tag=request.param[:2], workdir=work)
        stack.callback(team.clean_up)
        team.set_up()
        yield team


# ---------------------------------------------------------------------- the matrix

@dataclass(frozen=True)
class Expect:
    statuses: tuple[int, ...]
    words: tuple[str, ...] = ()  # in the reply's detail
    later: bool = False  # not asked in the matrix: the last test of the module asks it

    @property
    def allowed(self) -> bool:
        return not any(s in (401, 403, 429) for s in self.statuses)


def allow(*statuses: int) -> Expect:
    return Expect(statuses or (200,))


def deny(*words: str) -> Expect:
    return Expect((403,), words)


UNAUTHORIZED = Expect((401,), ("token",))
LATER = Expect((200,), later=True)
SERVER_ADMIN = deny("needs a server admin", "is a user")
NOT_MEMBER = deny("needs membership of project ml", "you are not a member of it")
NOT_IN_ML = deny("needs to be an admin of project ml", "you are not a member of it")
MEMBER_NOT_ADMIN = deny("needs to be an admin of project ml", "you are a member of it")
NOT_SUBMITTER = deny("needs to be its submitter or an admin of project ml", "you are a member of it")


def roles(other: Expect, member: Expect, padmin: Expect, sadmin: Expect, submitter: Expect | None = None,
          anyone: Expect = UNAUTHORIZED) -> dict[str, Expect]:
    return {ANON: anyone, BAD: anyone, "dave": other, "bob": member, "alice": submitter or member,
            "carol": padmin, "erin": sadmin}


MEMBERS = dict(other=NOT_MEMBER, member=allow(), padmin=allow(), sadmin=allow())  # see the project's things
PROJECT_ADMINS = dict(other=NOT_IN_ML, member=MEMBER_NOT_ADMIN, padmin=allow(), sadmin=allow())
SERVER_ADMINS = dict(other=SERVER_ADMIN, member=SERVER_ADMIN, padmin=SERVER_ADMIN, sadmin=allow())
ONE_OWN_RUN = dict(other=NOT_MEMBER, member=NOT_SUBMITTER, submitter=allow(), padmin=allow(), sadmin=allow())
ANY_USER = dict(other=allow(201), member=allow(201), padmin=allow(201), sadmin=allow(201))
# POST /api/runs/NAME/ssh, allowed: the dev environment of the bench has no sshd (the lab's image has
# none), so those who may attach to it get past authorization to the container, which says so (409);
# on a task, the route says only a dev environment has an SSH server (400)
NO_SSHD = Expect((409,), ("has no SSH server running", "no /usr/sbin/sshd"))
NOT_DEV = Expect((400,), ("is a task, not a dev environment",))
# POST /proxy/models/ml/...: those who may use ml's models get past authorization to the routing, which finds
# no service serving the model asked (404, OpenAI's error; tests/integration/test_model_route_lab.py has one)
NO_MODEL = Expect((404,), ("model 'no-such-model' is not served in project ml",))

Request = tuple[str, object, dict | None]  # (path, body, query)


@dataclass(frozen=True)
class Case:
    """One row: a route, a request per role (which may first make what it acts on), and what each
    role gets; ``check`` looks further at an allowed reply."""

    id: str
    method: str
    route: str  # as the schema spells it
    expect: dict[str, Expect]
    request: Callable[[Team, str], Request]
    check: Callable[[Team, str, Reply], None] | None = None


def plain(path: str, body=None, query: dict | None = None) -> Callable[[Team, str], Request]:
    return lambda team, role: (path, body, query)


def a_main(suffix: str = "") -> Callable[[Team, str], Request]:
    return lambda team, role: (f"/api/runs/{team.run('a-main')}{suffix}", None, None)


def slug(role: str) -> str:
    return role.replace(" ", "")


def submit_req(team: Team, role: str) -> Request:
    name = team.run(f"submit-{slug(role)}")
    return "/api/runs", {"source": f"{team.workdir}/{name}.yml", "project": "ml",
                         "text": task_text(name, [f"echo submitted-by-{role}"])}, None


def _check_web(reply: Reply) -> None:
    assert reply.text.strip() == WEB_MARK, reply.text[:300]


def check_submit(team: Team, role: str, reply: Reply) -> None:
    run = reply.json()
    assert (run["user"], run["project"]) == (role, "ml"), run


def plan_run_req(team: Team, role: str) -> Request:
    return "/api/runs/plan", {"source": f"{team.workdir}/plan.yml", "project": "ml",
                              "text": task_text("planned", ["true"])}, None


def stop_req(team: Team, role: str) -> Request:
    # allowed callers stop a run of alice's made for them; the others try alice's main run
    target = team.run(f"a-stop-{role}") if role in ("alice", "carol", "erin") else team.run("a-main")
    return f"/api/runs/{target}/stop", None, None


def check_stop(team: Team, role: str, reply: Reply) -> None:
    run = reply.json()
    assert run["name"] == team.run(f"a-stop-{role}") and run["status"] in ("stopping", "stopped"), run


def check_logs(team: Team, role: str, reply: Reply) -> None:
    assert MARK in reply.text, reply.text[:300]


def check_attach(team: Team, role: str, reply: Reply) -> None:
    plan = reply.json()
    assert plan["alias"] and plan["argv"] and plan["shell"] is False, plan


def upload_archive(role: str) -> bytes:
    """A run's code upload as `gpufleet apply` packs it: the manifest first, then its one item, a
    folder (`0/`) holding a file that names who sent it. The same bytes each call (the gzip header's
    time is 0, not now): check_upload packs it again to compare with what the server kept."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        add(upload.MANIFEST, json.dumps({"items": ["0"]}).encode())
        add("0", None)
        add("0/hello.txt", f"uploaded-by-{role}\n".encode())
    return buf.getvalue()


def upload_req(team: Team, role: str) -> Request:
    return "/api/uploads", upload_archive(role), None


def check_upload(team: Team, role: str, reply: Reply) -> None:
    got = reply.json()
    sent = upload_archive(role)
    assert re.fullmatch(r"[0-9a-f]{32}", got["id"]) and got["size"] == len(sent), got
    kept = team.server.home / "uploads" / "pending" / f"{got['id']}.tar.gz"
    assert kept.read_bytes() == sent and kept.stat().st_mode & 0o777 == 0o600, kept


def public_key(team: Team) -> str:
    """A real ssh public key (ssh-keygen's, made once in the bench's folder)."""
    key = team.workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "authz", "-f", str(key)], check=True)
    return key.with_suffix(".pub").read_text().strip()


def dev_req(team: Team, role: str) -> Request:
    """Alice's dev environment (made by the first role that asks, on the lab's busybox image: it has
    no sshd and no package manager to install one, so, without `ide`, it runs without an SSH server)."""
    name = team.run("a-dev")
    if team.call("admin", "GET", f"/api/runs/{name}").status == 404:
        text = (f"type: dev-environment\nname: {name}\nimage: {IMAGE}\nresources:\n  gpu: 1\nstop_duration: 1s\n"
                "commands:\n  - echo dev-up\n")
        made = team.ok("alice", "POST", "/api/runs", {"source": f"{team.workdir}/{name}.yml", "project": "ml",
                                                       "text": text})
        assert made["user"] == "alice", made
        team.wait_running(name)
    return f"/api/runs/{name}/ssh", {"public_key": public_key(team)}, None


def task_ssh_req(team: Team, role: str) -> Request:
    return f"/api/runs/{team.run('a-main')}/ssh", {"public_key": public_key(team)}, None


def apply_req(team: Team, role: str) -> Request:
    if role in ("carol", "erin"):  # may apply: a fleet of their own, deleted by the DELETE row
        text, source = scratch_fleet_text(team.lab, f"scratch-{role}"), f"{team.workdir}/scratch-{role}.yml"
    else:
        text, source = fleet_text(team.lab, "ml-gpus", 0), f"{team.workdir}/ml-gpus.yml"
    return "/api/fleets", {"source": source, "text": text, "project": "ml"}, None


def check_apply(team: Team, role: str, reply: Reply) -> None:
    last = json.loads(reply.text.strip().splitlines()[-1])
    assert last["result"]["fleet"]["name"] == f"scratch-{role}" and last["result"]["fleet"]["project"] == "ml", last


def delete_fleet_req(team: Team, role: str) -> Request:
    if role not in ("carol", "erin"):
        return "/api/fleets/ml-gpus", None, None
    name = f"scratch-{role}"
    if team.call("admin", "GET", f"/api/fleets/{name}").status == 404:
        team.apply_fleet("admin", "ml", scratch_fleet_text(team.lab, name))
    return f"/api/fleets/{name}", None, None


def plan_fleet_req(team: Team, role: str) -> Request:
    return "/api/fleets/plan", {"source": f"{team.workdir}/ml-gpus.yml", "project": "ml",
                                "text": fleet_text(team.lab, "ml-gpus", 0)}, None


def check_me(team: Team, role: str, reply: Reply) -> None:
    me = reply.json()
    assert me["name"] == role, me
    if role in ("alice", "bob", "carol"):
        assert me["default_project"] == "ml", me


def new_user_req(team: Team, role: str) -> Request:
    return "/api/users", {"name": f"new-by-{slug(role)}", "role": "user"}, None


def rotate_req(team: Team, role: str) -> Request:
    target = {"dave": "bob", "bob": "alice", "alice": "alice", "carol": "alice"}.get(role)
    if target is None:  # erin: anyone's, here a user made for it
        target = "rot-target"
        if target not in team.tokens:
            team.add_user(target, projects={"cv": "member"})
    return f"/api/users/{target}/token", None, None


def check_rotate(team: Team, role: str, reply: Reply) -> None:
    got = reply.json()
    old = team.tokens[got["name"]]
    assert got["token"].startswith("gft_") and got["token"] != old
    team.tokens[got["name"]] = got["token"]
    # the old token is refused at once, the new one works
    assert team.server.request("GET", "/api/me", old, source="127.0.0.200").status == 401
    assert team.ok(got["name"], "GET", "/api/me")["name"] == got["name"]


def throwaway_user(prefix: str, projects: dict[str, str] | None = None) -> Callable[[Team, str], str]:
    def make(team: Team, role: str) -> str:
        name = f"{prefix}-{slug(role)}"
        if name not in team.tokens:
            team.add_user(name, projects=projects)
        return name
    return make


_del_user = throwaway_user("del")
_member = throwaway_user("mem", {"ml": "member"})


def delete_user_req(team: Team, role: str) -> Request:
    return f"/api/users/{_del_user(team, role)}", None, None


def remove_member_req(team: Team, role: str) -> Request:
    return f"/api/projects/ml/members/{_member(team, role)}", None, None


def check_projects(team: Team, role: str, reply: Reply) -> None:
    names = {p["name"] for p in reply.json()}
    want = {"dave": {"cv"}, "bob": {"ml"}, "alice": {"ml"}, "carol": {"ml"}}.get(role)
    if want is None:  # a server admin sees all
        assert {"ml", "cv", "default"} <= names, names
    else:
        assert names == want, (role, names)


def new_project_req(team: Team, role: str) -> Request:
    return "/api/projects", {"name": f"proj-by-{slug(role)}"}, None


def delete_project_req(team: Team, role: str) -> Request:
    if role != "erin":  # their own project (if allowed by mistake, it is refused: it has a fleet)
        return f"/api/projects/{'cv' if role == 'dave' else 'ml'}", None, None
    team.ok("admin", "POST", "/api/projects", {"name": "doomed"})
    return "/api/projects/doomed", None, None


def user_quota(team: Team, role: str) -> Request:
    return "/api/quotas", {"project": "ml", "user": "alice", "gpus": 8}, None


def project_quota(team: Team, role: str) -> Request:
    return "/api/quotas", {"project": "ml", "user": None, "gpus": 100}, None


def delete_user_quota(team: Team, role: str) -> Request:
    team.ok("admin", "PUT", "/api/quotas", {"project": "ml", "user": "alice", "gpus": 8})
    return "/api/quotas", None, {"project": "ml", "user": "alice"}


def delete_project_quota(team: Team, role: str) -> Request:
    team.ok("admin", "PUT", "/api/quotas", {"project": "ml", "gpus": 100})
    return "/api/quotas", None, {"project": "ml"}


def check_gpus(team: Team, role: str, reply: Reply) -> None:
    gpus = reply.json()
    assert gpus and {g["fleet"] for g in gpus} == {"ml-gpus"}, gpus
    assert team.run("a-main") in {g["run"] for g in gpus}, gpus  # a member sees whose GPU it is


def check_run_metrics(team: Team, role: str, reply: Reply) -> None:
    got = reply.json()
    assert got["run"] == team.run("a-main") and len(got["gpus"]) == 1 and got["resolution"] == "raw", got


def check_prometheus(team: Team, role: str, reply: Reply) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(reply.text)}
    fleets = {s.labels["fleet"] for s in fams["gpufleet_blocks_total"].samples}
    mine, theirs = {"dave": ("cv-gpus", "ml-gpus")}.get(role, ("ml-gpus", "cv-gpus"))
    if role == "erin":  # a server admin: every fleet
        assert {"ml-gpus", "cv-gpus"} <= fleets, fleets
    else:
        assert mine in fleets and theirs not in fleets, (role, fleets)


def check_models(team: Team, role: str, reply: Reply) -> None:
    assert reply.json() == {"object": "list", "data": []}, reply.text  # OpenAI's list: ml serves no model


def check_server(team: Team, role: str, reply: Reply) -> None:
    assert ":gpufleet@" not in reply.text  # a PostgreSQL URL's password is never shown


CASES = [
    Case("health", "GET", "/api/health", roles(allow(), allow(), allow(), allow(), anyone=allow()),
         plain("/api/health")),
    Case("server", "GET", "/api/server", roles(allow(), allow(), allow(), allow()), plain("/api/server"),
         check_server),
    Case("server-stop", "POST", "/api/server/stop", roles(SERVER_ADMIN, SERVER_ADMIN, SERVER_ADMIN, LATER),
         plain("/api/server/stop")),
    Case("runs-list", "GET", "/api/runs", roles(**MEMBERS), plain("/api/runs", query={"project": "ml"})),
    Case("runs-submit", "POST", "/api/runs", roles(NOT_MEMBER, allow(201), allow(201), allow(201)), submit_req,
         check_submit),
    Case("run-get", "GET", "/api/runs/{name}", roles(**MEMBERS), a_main()),
    Case("runs-plan", "POST", "/api/runs/plan", roles(**MEMBERS), plan_run_req),
    Case("run-stop", "POST", "/api/runs/{name}/stop", roles(**ONE_OWN_RUN), stop_req, check_stop),
    Case("run-attach", "GET", "/api/runs/{name}/attach", roles(**ONE_OWN_RUN), a_main("/attach"), check_attach),
    Case("run-logs", "GET", "/api/runs/{name}/logs", roles(**ONE_OWN_RUN), a_main("/logs"), check_logs),
    # who may attach to a run may let their key into its sshd (run-ssh: a dev environment's)
    Case("run-ssh", "POST", "/api/runs/{name}/ssh",
         roles(**{**ONE_OWN_RUN, "submitter": NO_SSHD, "padmin": NO_SSHD, "sadmin": NO_SSHD}), dev_req),
    Case("run-ssh-task", "POST", "/api/runs/{name}/ssh",
         roles(**{**ONE_OWN_RUN, "submitter": NOT_DEV, "padmin": NOT_DEV, "sadmin": NOT_DEV}), task_ssh_req),
    # any user may upload code (it has no project yet); the run's submission checks the project
    Case("upload", "POST", "/api/uploads", roles(**ANY_USER), upload_req, check_upload),
    Case("fleets-list", "GET", "/api/fleets", roles(**MEMBERS), plain("/api/fleets", query={"project": "ml"})),
    Case("fleet-apply", "POST", "/api/fleets", roles(**{**PROJECT_ADMINS, "other": NOT_MEMBER}), apply_req,
         check_apply),
    Case("fleet-get", "GET", "/api/fleets/{name}", roles(**MEMBERS), plain("/api/fleets/ml-gpus")),
    Case("fleet-delete", "DELETE", "/api/fleets/{name}", roles(**{**PROJECT_ADMINS, "other": NOT_MEMBER}),
         delete_fleet_req),
    Case("fleets-plan", "POST", "/api/fleets/plan", roles(**{**PROJECT_ADMINS, "other": NOT_MEMBER}),
         plan_fleet_req),
    Case("events", "GET", "/api/events", roles(**MEMBERS), plain("/api/events", query={"project": "ml"})),
    Case("me", "GET", "/api/me", roles(allow(), allow(), allow(), allow()), plain("/api/me"), check_me),
    Case("users-list", "GET", "/api/users", roles(**SERVER_ADMINS), plain("/api/users")),
    Case("user-add", "POST", "/api/users", roles(**{**SERVER_ADMINS, "sadmin": allow(201)}), new_user_req),
    Case("user-delete", "DELETE", "/api/users/{name}", roles(**SERVER_ADMINS), delete_user_req),
    Case("projects-list", "GET", "/api/projects", roles(allow(), allow(), allow(), allow()), plain("/api/projects"),
         check_projects),
    Case("project-add", "POST", "/api/projects", roles(**{**SERVER_ADMINS, "sadmin": allow(201)}), new_project_req),
    Case("project-delete", "DELETE", "/api/projects/{name}", roles(**SERVER_ADMINS), delete_project_req),
    Case("member-add", "POST", "/api/projects/{name}/members", roles(**PROJECT_ADMINS),
         plain("/api/projects/ml/members", {"user": "bob", "role": "member"})),
    Case("member-remove", "DELETE", "/api/projects/{name}/members/{user}", roles(**PROJECT_ADMINS),
         remove_member_req),
    Case("quotas-list", "GET", "/api/quotas", roles(**MEMBERS), plain("/api/quotas", query={"project": "ml"})),
    Case("quota-set-user", "PUT", "/api/quotas", roles(**PROJECT_ADMINS), user_quota),
    Case("quota-set-project", "PUT", "/api/quotas", roles(**SERVER_ADMINS), project_quota),
    Case("quota-delete-user", "DELETE", "/api/quotas", roles(**PROJECT_ADMINS), delete_user_quota),
    Case("quota-delete-project", "DELETE", "/api/quotas", roles(**SERVER_ADMINS), delete_project_quota),
    Case("usage", "GET", "/api/usage", roles(**MEMBERS), plain("/api/usage", query={"project": "ml"})),
    # metrics: the GPUs of the project's fleets; a run's metrics as its logs; /metrics: what the token's user sees
    Case("gpus", "GET", "/api/gpus", roles(**MEMBERS), plain("/api/gpus", query={"project": "ml"}), check_gpus),
    Case("run-metrics", "GET", "/api/runs/{name}/metrics", roles(**ONE_OWN_RUN), a_main("/metrics"),
         check_run_metrics),
    Case("service-proxy", "GET", "/proxy/services/{project}/{name}/{path}", roles(**MEMBERS),
         lambda team, role: (f"/proxy/services/ml/{team.run('a-svc')}/", None, None),
         lambda team, role, reply: _check_web(reply)),
    # the project's models (OpenAI-compatible): its members', whatever each service's `auth` (as in dstack)
    Case("models-request", "POST", "/proxy/models/{project}/{path}",
         roles(**{**MEMBERS, "member": NO_MODEL, "padmin": NO_MODEL, "sadmin": NO_MODEL}),
         plain("/proxy/models/ml/v1/chat/completions", {"model": "no-such-model", "messages": []})),
    Case("models-list", "GET", "/proxy/models/{project}/{path}", roles(**MEMBERS), plain("/proxy/models/ml/v1/models"),
         check_models),
    Case("prometheus", "GET", "/metrics", roles(allow(), allow(), allow(), allow()), plain("/metrics"),
         check_prometheus),
    # last: alice's own rotation changes the token the rows above use
    Case("token-rotate", "POST", "/api/users/{name}/token",
         roles(other=SERVER_ADMIN, member=SERVER_ADMIN, submitter=allow(), padmin=SERVER_ADMIN, sadmin=allow()),
         rotate_req, check_rotate),
]


def test_the_matrix_has_a_row_for_every_route_the_live_schema_lists(team):
    reply = team.call(ANON, "GET", "/openapi.json")
    assert reply.status == 200
    schema = {(method.upper(), path) for path, methods in reply.json()["paths"].items()
              if path.startswith(("/api/", "/proxy/")) or path == "/metrics" for method in methods}
    rows = {(c.method, c.route) for c in CASES}
    assert rows == schema, f"routes without a row: {sorted(schema - rows)}; rows of no route: {sorted(rows - schema)}"
    for case in CASES:
        assert set(case.expect) == set(ROLES), case.id


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_authorization_matrix(team, case):
    wrong = []
    for role in ROLES:
        want = case.expect[role]
        if want.later:
            continue
        path, body, query = case.request(team, role)
        reply = team.call(role, case.method, path, body, query)
        try:
            detail = reply.json().get("detail", "") if reply.status >= 400 else ""
        except (ValueError, AttributeError):
            detail = reply.text
        if reply.status not in want.statuses:
            wrong.append(f"{role}: {case.method} {path} gave {reply.status} (want {want.statuses}): {reply.text[:300]}")
            continue
        missing = [w for w in want.words if w not in str(detail)]
        if missing:
            wrong.append(f"{role}: {reply.status} says {detail!r}, not {missing}")
        if reply.status in (401, 403):
            assert reply.json()["exit_code"] == 3, reply.text  # the CLI exits 3
        if want.allowed and case.check is not None:
            try:
                case.check(team, role, reply)
            except AssertionError as e:
                wrong.append(f"{role}: allowed, but {e}")
    assert not wrong, f"{case.method} {case.route}:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------- what each one sees

def test_a_refused_upload_stores_nothing(team):
    """POST /api/uploads asks for the token before it reads the body: anonymous and a bad token get
    401 and the server keeps no byte of what they sent."""
    pending = team.server.home / "uploads" / "pending"
    before = sorted(pending.iterdir()) if pending.exists() else []
    for role in (ANON, BAD):
        reply = team.call(role, "POST", "/api/uploads", upload_archive(role))
        assert reply.status == 401 and "id" not in reply.json(), reply.text
    assert (sorted(pending.iterdir()) if pending.exists() else []) == before


def test_a_user_lists_only_the_runs_of_their_projects(team):
    def names(who, **query):
        return {r["name"]: r for r in team.ok(who, "GET", "/api/runs", query=query or None)}

    ml = {team.run("a-main"), team.run("b-main")}
    alice = names("alice", all="true")
    assert ml <= set(alice) and all(r["project"] == "ml" for r in alice.values()), alice
    assert alice[team.run("b-main")]["user"] == "bob"  # a member sees the project's runs, bob's too
    dave = names("dave", all="true")
    assert set(dave) == {team.run("d-main")} and dave[team.run("d-main")]["user"] == "dave", dave
    assert names("dave", all="true", project="cv") == dave
    erin = names("erin")
    assert ml | {team.run("d-main")} <= set(erin)  # a server admin sees every project's
    assert team.call("dave", "GET", "/api/runs", query={"project": "ml"}).status == 403


def test_another_projects_user_sees_no_event_of_it(team):
    mine = team.ok("dave", "GET", "/api/events", query={"limit": 10000})
    assert mine and {e["project"] for e in mine} == {"cv"}, {e["project"] for e in mine}
    assert {e["run"] for e in mine if e.get("run")} == {team.run("d-main")}
    assert team.ok("dave", "GET", "/api/events", query={"run": team.run("a-main")}) == []
    everyone = team.ok("erin", "GET", "/api/events", query={"limit": 10000})
    assert {"ml", "cv"} <= {e["project"] for e in everyone}


def test_a_runs_events_name_who_submitted_it_and_who_stopped_it(team):
    name = team.run("a-events")
    team.submit("alice", name, ["sleep 300"], extra="stop_duration: 1s\n")
    team.wait_running(name)
    stopped = team.ok("carol", "POST", f"/api/runs/{name}/stop")
    assert stopped["status"] in ("stopping", "stopped")
    wait_for("the run to stop", lambda: team.status(name) == "stopped", timeout=120)
    events = team.ok("alice", "GET", "/api/events", query={"run": name})
    by_kind = {e["kind"]: e for e in events}
    assert by_kind["submitted"]["actor"] == "alice" and by_kind["submitted"]["project"] == "ml", events
    assert by_kind["stopped"]["actor"] == "carol", events
    assert "carol" in by_kind["stopped"]["message"] and "admin of project ml" in by_kind["stopped"]["message"]
    # the submitter's own stop names her
    own = team.run("a-events-own")
    team.submit("alice", own, ["sleep 300"], extra="stop_duration: 1s\n")
    # stopped at once, whether its start is over or not (a stop during a start is the start's to do:
    # tests/integration/test_stop_during_start_lab.py); it names her either way
    team.ok("alice", "POST", f"/api/runs/{own}/stop")
    wait_for("the run to stop", lambda: team.status(own) == "stopped", timeout=120)
    stops = [e for e in team.ok("alice", "GET", "/api/events", query={"run": own}) if e["kind"] == "stopped"]
    assert [e["actor"] for e in stops] == ["alice"], stops


def test_a_rotated_token_is_refused_at_once(team):
    # carol rotates her own (a project admin may: own), erin a user's of hers
    old = team.tokens["carol"]
    got = team.ok("carol", "POST", "/api/users/carol/token")
    assert team.server.request("GET", "/api/me", old, source="127.0.0.201").status == 401
    team.tokens["carol"] = got["token"]
    assert team.ok("carol", "GET", "/api/me")["name"] == "carol"
    team.add_user("rot-2", projects={"ml": "member"})
    old = team.tokens["rot-2"]
    got = team.ok("erin", "POST", "/api/users/rot-2/token")
    assert team.server.request("GET", "/api/runs", old, source="127.0.0.202").status == 401
    assert team.server.request("GET", "/api/runs", got["token"]).status == 200
    team.tokens["rot-2"] = got["token"]
    # rotating another user's token is a server admin's: carol, admin of ml, may not rotate a member's
    r = team.call("carol", "POST", "/api/users/rot-2/token")
    assert r.status == 403 and "needs a server admin" in r.json()["detail"], r.text


def test_the_last_admin_of_a_project_can_neither_leave_it_nor_become_a_member(team):
    """A project always keeps an admin: its last one is refused both ways (409, saying why)."""
    team.ok("erin", "POST", "/api/projects", {"name": "solo"})  # its maker, erin, is its admin
    team.ok("erin", "POST", "/api/projects/solo/members", {"user": "carol", "role": "admin"})
    team.ok("erin", "DELETE", "/api/projects/solo/members/erin")
    for method, path, body in (("DELETE", "/api/projects/solo/members/carol", None),
                               ("POST", "/api/projects/solo/members", {"user": "carol", "role": "member"})):
        r = team.call("carol", method, path, body)
        assert r.status == 409 and "carol is the last admin of project solo" in r.json()["detail"], (method, r.text)
    members = {p["name"]: p["members"] for p in team.ok("carol", "GET", "/api/projects")}["solo"]
    assert members == [{"user": "carol", "role": "admin"}], members
    team.ok("erin", "DELETE", "/api/projects/solo")


def test_eleven_bad_tokens_from_one_address_are_answered_429(team):
    """Ten bad tokens from one address: the eleventh try is 429 with Retry-After, even with a
    good token; other addresses are not locked out (an address of its own: the rest goes on)."""
    src = "127.0.0.99"
    for i in range(10):
        r = team.server.request("GET", "/api/runs", f"gft_guess{i}", source=src)
        assert r.status == 401 and f"gft_guess{i}" not in r.text, r.text
    r = team.server.request("GET", "/api/runs", team.tokens["alice"], source=src)
    assert r.status == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= 61 and "too many failed logins" in r.json()["detail"]
    assert team.tokens["alice"] not in r.text
    assert team.call("alice", "GET", "/api/runs").status == 200  # from 127.0.0.1


def test_no_server_log_line_holds_a_token_and_a_server_admin_stops_the_server(team):
    """Last: the server is stopped by a server admin (the matrix's `LATER` row)."""
    team.clean_up()
    r = team.call("erin", "POST", "/api/server/stop")
    assert r.status == 200 and r.json() == {"stopping": True}, r.text
    team.server.proc.wait(timeout=60)
    log = team.server.log.read_text(errors="replace")
    assert "listening on" in log
    leaked = [t for t in team.issued if t in log]
    assert not leaked, "the server's log holds a token"
    assert "gft_" not in log

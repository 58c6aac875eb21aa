"""The CLI's side of teams (docs/teams.md): login and its config file, which server and token a
command uses, --project, the user, project, quota, usage and whoami commands, and 401/403/429 as
exit 3 with the server's message; a token is never printed but where one is made.

The CLI runs in this process (gpufleet.cli.main) against a real HTTP server on loopback that
answers the API as docs/teams.md documents it (routes, bodies, answers, statuses): the CLI is
tested against the documented API, not against mocks of http.client."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpufleet import cli
from gpufleet.client import Client
from gpufleet.errors import EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError

ADMIN = "gft_" + "a" * 43
ALICE = "gft_" + "b" * 43
BOB = "gft_" + "c" * 43


# ------------------------------------------------------------------------------ the documented API

class TeamApi:
    """In-memory users, projects, quotas and usage, answering docs/teams.md's routes. Every request
    is recorded: (method, path, query, body)."""

    def __init__(self, name: str = "a"):
        now = time.time() - 3600
        self.name = name
        self.users = {"admin": {"role": "admin", "token": ADMIN, "created_at": now},
                      "alice": {"role": "user", "token": ALICE, "created_at": now},
                      "bob": {"role": "user", "token": BOB, "created_at": now}}
        self.projects = {"default": {"created_at": now, "members": {"admin": "admin"}},
                         "ml": {"created_at": now, "members": {"admin": "admin", "alice": "admin", "bob": "member"}}}
        self.quotas: list[dict] = []
        self.usage = [{"project": "ml", "user": "alice", "gpu_hours": 12.5, "decayed_gpu_hours": 9.25, "runs": 3},
                      {"project": "ml", "user": "bob", "gpu_hours": 1.0, "decayed_gpu_hours": 0.5, "runs": 1}]
        self.runs: list[dict] = []
        self.events: list[dict] = []
        self.requests: list[tuple[str, str, dict, object]] = []
        self.failures: list[float] = []
        self.tokens = 0

    # -- who asks
    def who(self, headers) -> str | None:
        header = headers.get("Authorization", "")
        presented = header[7:] if header.lower().startswith("bearer ") else None
        for name, u in self.users.items():
            if presented is not None and u["token"] == presented:
                return name
        self.failures = [t for t in self.failures if t > time.time() - 60] + [time.time()]
        if len(self.failures) > 10:
            raise Denied(429, "too many failed tries from 127.0.0.1", {"Retry-After": "60"})
        raise Denied(401, "no token" if presented is None else "bad token")

    def admin(self, me: str, what: str) -> None:
        if self.users[me]["role"] != "admin":
            raise Denied(403, f"{what} needs a server admin; you are a user")

    def project_admin(self, me: str, project: str, what: str) -> None:
        role = self.projects[project]["members"].get(me)
        if self.users[me]["role"] != "admin" and role != "admin":
            raise Denied(403, f"{what} needs an admin of project {project}; you are "
                              f"{'a ' + role if role else 'not in it'}")

    def member(self, me: str, project: str) -> None:
        if self.users[me]["role"] != "admin" and me not in self.projects[project]["members"]:
            raise Denied(403, f"project {project} needs you to be a member; you are not in it")

    def project_json(self, name: str) -> dict:
        p = self.projects[name]
        return {"name": name, "created_at": p["created_at"],
                "members": [{"user": u, "role": r} for u, r in p["members"].items()]}

    def mine(self, me: str) -> list[str]:
        return [p for p, v in self.projects.items() if me in v["members"]]

    # -- routes
    def handle(self, method: str, path: str, query: dict, body, headers) -> tuple[int, object]:
        if path == "/api/health":
            return 200, {"ok": True}
        me = self.who(headers)
        parts = path.removeprefix("/api/").split("/")
        match method, parts:
            case "GET", ["me"]:
                mine = self.mine(me)
                default = mine[0] if len(mine) == 1 else "default" if "default" in mine else None
                return 200, {"name": me, "role": self.users[me]["role"], "default_project": default,
                             "projects": [{"name": p, "role": self.projects[p]["members"][me]} for p in mine]}
            case "GET", ["users"]:
                self.admin(me, "listing users")
                return 200, [{"name": n, "role": u["role"], "created_at": u["created_at"],
                              "projects": [{"name": p, "role": v["members"][n]} for p, v in self.projects.items()
                                           if n in v["members"]]} for n, u in self.users.items()]
            case "POST", ["users"]:
                self.admin(me, "adding users")
                if body["name"] in self.users:
                    raise Denied(409, f"user {body['name']} exists")
                token = self.new_token()
                self.users[body["name"]] = {"role": body["role"], "token": token, "created_at": time.time()}
                return 201, {"name": body["name"], "role": body["role"], "token": token}
            case "POST", ["users", name, "token"]:
                if name != me:
                    self.admin(me, f"rotating the token of {name}")
                if name not in self.users:
                    raise Denied(404, f"no user named {name!r}")
                self.users[name]["token"] = self.new_token()
                return 200, {"name": name, "token": self.users[name]["token"]}
            case "DELETE", ["users", name]:
                self.admin(me, "deleting users")
                if name not in self.users:
                    raise Denied(404, f"no user named {name!r}")
                del self.users[name]
                return 200, {"deleted": name}
            case "GET", ["projects"]:
                names = list(self.projects) if self.users[me]["role"] == "admin" else self.mine(me)
                return 200, [self.project_json(p) for p in names]
            case "POST", ["projects"]:
                self.admin(me, "making projects")
                self.projects[body["name"]] = {"created_at": time.time(), "members": {me: "admin"}}
                return 201, self.project_json(body["name"])
            case "DELETE", ["projects", name]:
                self.admin(me, "deleting projects")
                del self.projects[name]
                return 200, {"deleted": name}
            case "POST", ["projects", project, "members"]:
                self.project_admin(me, project, "adding members")
                self.projects[project]["members"][body["user"]] = body["role"]
                return 200, self.project_json(project)
            case "DELETE", ["projects", project, "members", user]:
                self.project_admin(me, project, "removing members")
                self.projects[project]["members"].pop(user)
                return 200, self.project_json(project)
            case "GET", ["quotas"]:
                return 200, [q for q in self.quotas if query.get("project") in (None, q["project"])]
            case "PUT", ["quotas"]:
                if body["user"] is None:
                    self.admin(me, f"setting the quota of project {body['project']}")
                else:
                    self.project_admin(me, body["project"], "setting a user's quota")
                self.quotas = [q for q in self.quotas if _key(q) != _key(body)] + [{**body, "used": 6}]
                return 200, self.quotas[-1]
            case "DELETE", ["quotas"]:
                key = (query.get("project"), query.get("user"), query.get("gpu"))
                self.quotas = [q for q in self.quotas if _key(q) != key]
                return 200, {"deleted": True}
            case "GET", ["usage"]:
                if query.get("project"):
                    self.member(me, query["project"])
                return 200, [u for u in self.usage if query.get("project") in (None, u["project"])]
            case "GET", ["runs"]:
                return 200, [r for r in self.runs if query.get("project") in (None, r.get("project"))]
            case "GET", ["events"]:
                return 200, [e for e in self.events if int(query.get("after", 0)) < e["id"]]
            case "GET", ["fleets"]:
                return 200, []
            case "POST", ["runs", "plan"]:
                return 200, {"never": "no fleet of project ml has H100s", "placements": [], "waits": ""}
        raise Denied(404, f"no route {method} {path}")

    def new_token(self) -> str:
        self.tokens += 1
        return f"gft_{self.name}{self.tokens:042d}"


def _key(q: dict) -> tuple:
    return q["project"], q.get("user"), q.get("gpu")


class Denied(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        api: TeamApi = self.server.api  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        api.requests.append((self.command, url.path, query, body))
        headers: dict = {}
        try:
            status, answer = api.handle(self.command, url.path, query, body, self.headers)
        except Denied as e:
            status, headers = e.status, e.headers
            answer = {"detail": e.detail, "exit_code": EXIT_DENIED if e.status in (401, 403, 429) else 1}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(raw))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


def serve(api: TeamApi) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.api = api  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def api() -> TeamApi:
    return TeamApi("a")


@pytest.fixture()
def server(api: TeamApi) -> Iterator[str]:
    yield from serve(api)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch) -> Path:
    """A fresh state directory, no server or token in the environment, wide tables."""
    h = tmp_path / "home"
    monkeypatch.setenv("GPUFLEET_HOME", str(h))
    for name in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("GPUFLEET_SERVER_IDLE_EXIT", "5")
    return h


class Run:
    """gpufleet's main() in this process: (exit code, stdout, stderr)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        umask = os.umask(0o022)
        os.umask(umask)
        saved = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            code = cli.main(list(argv))
        finally:
            sys.stdin = saved
            os.umask(umask)  # main() makes it 077 for the process
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture()
def gf(capsys, home) -> Run:
    return Run(capsys)


def config(home: Path) -> Path:
    return home / "config.json"


def login(gf: Run, server: str, token: str = ALICE, *extra: str) -> tuple[int, str, str]:
    return gf("login", "--server", server, "--token", token, *extra)


# ------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("argv", [
    ["login", "--server", "http://x:1", "--token", "t", "--project", "ml"],
    ["logout"], ["whoami", "--json"],
    ["user", "add", "carol", "--admin", "--json"], ["user", "list", "--json"], ["user", "rotate-token"],
    ["user", "rotate-token", "carol"], ["user", "delete", "carol", "-y"],
    ["project", "add", "cv"], ["project", "list", "--json"], ["project", "delete", "cv", "-y"],
    ["project", "member", "add", "ml", "carol", "--admin"], ["project", "member", "remove", "ml", "carol"],
    ["quota", "set", "--project", "ml", "--user", "alice", "--gpu", "H100", "--gpus", "8"],
    ["quota", "unset", "--project", "ml"], ["quota", "list", "--project", "ml", "--json"],
    ["usage", "--project", "ml", "--since", "7d", "--json"],
    ["ps", "--project", "ml"], ["events", "--project", "ml"], ["fleet", "list", "--project", "ml"],
    ["apply", "-f", "x.yml", "--project", "ml"],
])
def test_new_commands_and_flags_parse(argv: list[str]) -> None:
    args = cli.parser().parse_args(argv)
    assert callable(args.func)


@pytest.mark.parametrize("argv", [
    ["quota", "set", "--project", "ml"],  # no --gpus
    ["quota", "set", "--project", "ml", "--gpus", "-1"],
    ["quota", "set", "--gpus", "2"],  # no --project
    ["quota", "unset"], ["user", "add"], ["user", "delete"], ["project", "member", "add", "ml"],
    ["login", "--token", "t"],  # no --server
    ["usage", "--since", "1h30m"], ["usage", "--since", "0s"], ["user", "frobnicate"],
])
def test_bad_arguments_exit_2_without_asking_a_server(gf: Run, home: Path, argv: list[str]) -> None:
    code, out, err = gf(*argv)
    assert code == EXIT_USAGE, (out, err)
    assert not (home / "server").exists()  # no local server was started or asked


# ------------------------------------------------------------------------------ login and its file

@pytest.fixture()
def no_umask():
    """umask 0 for the test, and the process's own back after it (later tests write files too)."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_login_checks_the_token_and_keeps_a_private_config(gf: Run, home: Path, server: str, api: TeamApi,
                                                           no_umask) -> None:
    # the file is 0600 whatever the umask (no_umask: 0)
    code, out, err = login(gf, server + "/", ALICE, "--project", "ml")
    assert code == EXIT_OK, err
    assert ("GET", "/api/me") in [r[:2] for r in api.requests]
    assert f"Logged in to {server} as alice (user)." in out and "ml (admin)" in out and "default project: ml" in out
    assert ALICE not in out + err
    path = config(home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"server": server, "token": ALICE, "project": "ml"}
    assert [p.name for p in home.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    code, out, err = gf("whoami")
    assert code == EXIT_OK and out.splitlines()[0] == f"alice (user) on {server}"
    assert "default project: ml (gpufleet login --project)" in out and ALICE not in out


def test_login_rewrites_the_config_whole_never_in_place(gf: Run, home: Path, server: str) -> None:
    assert login(gf, server, ALICE, "--project", "ml")[0] == EXIT_OK
    with open(config(home)) as old:  # a reader of the old file...
        assert login(gf, server, BOB)[0] == EXIT_OK
        assert json.loads(old.read())["token"] == ALICE  # ...still reads all of it: a new file was renamed over
    assert json.loads(config(home).read_text()) == {"server": server, "token": BOB, "project": None}


def test_login_with_a_bad_token_keeps_nothing_and_says_401(gf: Run, home: Path, server: str) -> None:
    secret = "gft_" + "z" * 43
    code, out, err = login(gf, server, secret)
    assert code == EXIT_DENIED
    assert "bad token (the token from --token" in err and secret not in out + err
    assert not config(home).exists()


def test_login_token_from_stdin_or_env_and_project_membership(gf: Run, home: Path, server: str,
                                                             monkeypatch) -> None:
    code, out, err = gf("login", "--server", server, "--token", "-", stdin=BOB + "\n")
    assert code == EXIT_OK and "bob (user)" in out and "default project: ml (the server's choice)" in out
    monkeypatch.setenv("GPUFLEET_TOKEN", BOB)
    code, out, err = gf("login", "--server", server, "--project", "default")
    assert code == EXIT_USAGE and "bob is not a member of project default; their projects: ml" in err
    monkeypatch.delenv("GPUFLEET_TOKEN")
    code, out, err = gf("login", "--server", server)  # no token, no terminal
    assert code == EXIT_USAGE and "no token: pass --token T" in err


def test_a_config_other_users_may_read_is_refused(gf: Run, home: Path, server: str) -> None:
    assert login(gf, server)[0] == EXIT_OK
    os.chmod(config(home), 0o640)
    code, out, err = gf("whoami")
    assert code == EXIT_FAILED
    assert f"the config file {config(home)} is open to other users (mode 0640)" in err
    assert f"chmod 600 {config(home)}" in err and ALICE not in out + err
    config(home).write_text("not json")
    os.chmod(config(home), 0o600)
    code, out, err = gf("whoami")
    assert code == EXIT_FAILED and "is not what gpufleet login writes" in err


def test_logout_removes_the_config(gf: Run, home: Path, server: str) -> None:
    assert login(gf, server)[0] == EXIT_OK
    code, out, _ = gf("logout")
    assert code == EXIT_OK and "Logged out" in out and not config(home).exists()
    code, out, _ = gf("logout")
    assert code == EXIT_OK and "Not logged in" in out


# ------------------------------------------------------------------------------ which server, which token

@pytest.fixture()
def other() -> Iterator[tuple[TeamApi, str]]:
    """A second server: there, BOB's token is the admin's."""
    api = TeamApi("b")
    api.users["admin"]["token"], api.users["bob"]["token"] = BOB, "gft_" + "d" * 43
    yield from ((api, url) for url in serve(api))


def whoami(gf: Run) -> dict:
    code, out, err = gf("whoami", "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


def test_connect_precedence(gf: Run, home: Path, server: str, other, monkeypatch) -> None:
    _, other_url = other
    assert login(gf, server, ALICE, "--project", "ml")[0] == EXIT_OK
    # the config file alone: its server, its token, its project
    assert (whoami(gf)["name"], whoami(gf)["server"], whoami(gf)["project"]) == ("alice", server, "ml")
    # GPUFLEET_TOKEN with the config's server
    monkeypatch.setenv("GPUFLEET_TOKEN", BOB)
    assert whoami(gf)["name"] == "bob"
    # GPUFLEET_SERVER first; the token from GPUFLEET_TOKEN
    monkeypatch.setenv("GPUFLEET_SERVER", other_url)
    me = whoami(gf)
    assert (me["name"], me["server"], me["project"]) == ("admin", other_url, None)  # the config's project is a's
    # GPUFLEET_SERVER, no GPUFLEET_TOKEN: the config's token where it is the same server...
    monkeypatch.delenv("GPUFLEET_TOKEN")
    monkeypatch.setenv("GPUFLEET_SERVER", server + "/")
    assert (whoami(gf)["name"], whoami(gf)["project"]) == ("alice", "ml")
    # ...else the state directory's token file
    monkeypatch.setenv("GPUFLEET_SERVER", other_url)
    (home / "server").mkdir(mode=0o700)
    fd = os.open(home / "server" / "token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (BOB + "\n").encode())
    os.close(fd)
    assert whoami(gf)["name"] == "admin"
    code, out, err = gf("user", "list")
    assert code == EXIT_OK  # b's admin


def test_the_config_project_is_the_default_and_project_overrides_it(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ALICE, "--project", "ml")[0] == EXIT_OK
    for argv in (["ps"], ["events"], ["fleet", "list"], ["quota", "list"], ["usage"]):
        assert gf(*argv)[0] == EXIT_OK
        assert api.requests[-1][2].get("project") == "ml", argv
        assert gf(*argv, "--project", "default")[0] in (EXIT_OK, EXIT_DENIED)
        assert api.requests[-1][2].get("project") == "default", argv
    assert login(gf, server, ALICE)[0] == EXIT_OK  # no default project: none is sent, the server picks
    assert gf("ps")[0] == EXIT_OK and "project" not in api.requests[-1][2]


def test_apply_puts_the_project_in_the_body(gf: Run, server: str, api: TeamApi, tmp_path: Path) -> None:
    run = tmp_path / "train.yml"
    run.write_text("type: task\nname: train\nimage: busybox\nresources: {gpu: H100:2}\ncommands: ['true']\n")
    assert login(gf, server, ALICE)[0] == EXIT_OK
    code, out, err = gf("apply", "-f", str(run), "-y", "--project", "ml")
    assert code == EXIT_FAILED and "no fleet of project ml has H100s; not queued" in err
    method, path, _, body = api.requests[-1]
    assert (method, path, body["project"]) == ("POST", "/api/runs/plan", "ml")


# ------------------------------------------------------------------------------ denied: exit 3

def test_403_exits_3_with_the_servers_message(gf: Run, server: str) -> None:
    assert login(gf, server, BOB)[0] == EXIT_OK
    code, out, err = gf("user", "add", "carol")
    assert code == EXIT_DENIED and "adding users needs a server admin; you are a user" in err
    code, out, err = gf("project", "member", "add", "ml", "carol")
    assert code == EXIT_DENIED and "adding members needs an admin of project ml; you are a member" in err
    assert "Traceback" not in err and BOB not in out + err


def test_401_and_then_429_after_failed_tries(gf: Run, server: str, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_SERVER", server)
    monkeypatch.setenv("GPUFLEET_TOKEN", "gft_wrong")
    for _ in range(10):
        code, out, err = gf("ps")
        assert code == EXIT_DENIED and "bad token (the token from GPUFLEET_TOKEN" in err
    code, out, err = gf("ps")
    assert code == EXIT_DENIED
    assert "too many failed tries from 127.0.0.1; try again in 60s" in err and "gft_wrong" not in err


def test_a_token_is_never_in_an_error_or_a_repr(server: str, api: TeamApi, home: Path) -> None:
    client = Client(server, ALICE, token_from="GPUFLEET_TOKEN")
    assert ALICE not in repr(client)
    api.users["alice"]["token"] = "changed"
    with pytest.raises(Exception) as e:
        client.get("/api/me")
    assert ALICE not in str(e.value) and ALICE not in repr(e.value)
    with pytest.raises(UsageError) as e:  # http.client would put the header in its own error
        Client(server, "gft_x\nInjected: 1", token_from="GPUFLEET_TOKEN")
    assert "gft_x" not in str(e.value) and "the API token from GPUFLEET_TOKEN is not a token" in str(e.value)


def test_a_server_echoing_the_token_is_blanked_out(server: str, api: TeamApi, home: Path) -> None:
    api.users["alice"]["role"] = "user"
    client = Client(server, ALICE)
    with pytest.raises(Exception) as e:
        client.post(f"/api/users/{ALICE}/token")  # the name is the token: a 403 naming it
    assert ALICE not in str(e.value) and "[token]" in str(e.value)


# ------------------------------------------------------------------------------ users

def test_user_add_shows_the_token_once(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    code, out, err = gf("user", "add", "carol")
    token = api.users["carol"]["token"]
    assert code == EXIT_OK and api.users["carol"]["role"] == "user"
    assert token in out and "shown only now" in out and f"--server {server}" in out
    code, out, err = gf("user", "add", "dave", "--admin", "--json")
    assert json.loads(out) == {"name": "dave", "role": "admin", "token": api.users["dave"]["token"]}
    code, out, err = gf("user", "list")
    assert code == EXIT_OK and token not in out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "PROJECTS", "CREATED"]
    assert any(line.split()[:5] == ["alice", "user", "ml", "(admin)", "1"] for line in lines), out
    listed = json.loads(gf("user", "list", "--json")[1])
    assert {u["name"] for u in listed} == {"admin", "alice", "bob", "carol", "dave"}
    assert "token" not in json.dumps(listed)


def test_user_text_is_never_markup(gf: Run, server: str, api: TeamApi) -> None:
    api.users["[bold red]x[/]"] = {"role": "user", "token": "gft_markup", "created_at": time.time()}
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    assert "[bold red]x[/]" in gf("user", "list")[1]


def test_rotate_own_token_updates_the_config(gf: Run, home: Path, server: str, api: TeamApi) -> None:
    assert login(gf, server, ALICE, "--project", "ml")[0] == EXIT_OK
    code, out, err = gf("user", "rotate-token")
    new = api.users["alice"]["token"]
    assert code == EXIT_OK and new != ALICE and new in out and "shown only now" in out
    assert json.loads(config(home).read_text()) == {"server": server, "token": new, "project": "ml"}
    assert stat.S_IMODE(config(home).stat().st_mode) == 0o600
    assert whoami(gf)["name"] == "alice"  # still logged in, with the new token
    # an admin rotating someone else's token leaves the config alone
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    code, out, err = gf("user", "rotate-token", "bob", "--json")
    assert json.loads(out) == {"name": "bob", "token": api.users["bob"]["token"]}
    assert json.loads(config(home).read_text())["token"] == ADMIN


def test_rotate_with_gpufleet_token_says_where_to_put_the_new_one(gf: Run, server: str, monkeypatch) -> None:
    monkeypatch.setenv("GPUFLEET_SERVER", server)
    monkeypatch.setenv("GPUFLEET_TOKEN", BOB)
    code, out, err = gf("user", "rotate-token")
    assert code == EXIT_OK and "found the old token in GPUFLEET_TOKEN" in out


def test_user_delete_asks_and_refuses_without_a_terminal(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    code, out, err = gf("user", "delete", "bob")
    assert code == EXIT_USAGE and "pass -y to delete" in err and "bob" in api.users
    code, out, err = gf("user", "delete", "nobody", "-y")
    assert code == EXIT_FAILED and "no user named 'nobody'" in err
    code, out, err = gf("user", "delete", "bob", "-y")
    assert code == EXIT_OK and "bob" not in api.users


# ------------------------------------------------------------------------------ projects

def test_projects_and_members(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    code, out, err = gf("project", "add", "cv")
    assert code == EXIT_OK and "Project cv made; members: admin (admin)" in out
    code, out, err = gf("project", "member", "add", "cv", "alice", "--admin")
    assert code == EXIT_OK and api.projects["cv"]["members"]["alice"] == "admin"
    assert gf("project", "member", "add", "cv", "bob")[0] == EXIT_OK
    assert api.requests[-1][1:] == ("/api/projects/cv/members", {}, {"user": "bob", "role": "member"})
    code, out, err = gf("project", "list")
    row = next(line for line in out.splitlines() if line.startswith("cv"))
    assert "admin (admin), alice (admin), bob (member)" in row
    assert json.loads(gf("project", "list", "--json")[1])[-1]["members"][-1] == {"user": "bob", "role": "member"}
    code, out, err = gf("project", "member", "remove", "cv", "bob")
    assert code == EXIT_OK and "bob" not in api.projects["cv"]["members"] and "Project cv:" in out
    assert gf("project", "delete", "cv")[0] == EXIT_USAGE
    assert gf("project", "delete", "cv", "-y")[0] == EXIT_OK and "cv" not in api.projects


# ------------------------------------------------------------------------------ quotas and usage

def test_quotas(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ADMIN)[0] == EXIT_OK
    code, out, err = gf("quota", "set", "--project", "ml", "--gpus", "8")
    assert code == EXIT_OK and "project ml, the whole project, GPUs of any model: at most 8" in out
    assert api.requests[-1][0] == "PUT" and api.requests[-1][3] == {"project": "ml", "user": None, "gpu": None,
                                                                     "gpus": 8}
    assert gf("quota", "set", "--project", "ml", "--user", "alice", "--gpu", "H100", "--gpus", "6")[0] == EXIT_OK
    code, out, err = gf("quota", "list", "--project", "ml")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["PROJECT", "USER", "GPU", "LIMIT", "IN", "USE"]
    assert rows[1][:4] == ["ml", "*", "any", "8"] and rows[1][-1] == "6/8"
    assert rows[2][:4] == ["ml", "alice", "H100", "6"] and rows[2][-2:] == ["██████████", "6/6"]
    assert json.loads(gf("quota", "list", "--json")[1])[1] == {"project": "ml", "user": "alice", "gpu": "H100",
                                                              "gpus": 6, "used": 6}
    code, out, err = gf("quota", "unset", "--project", "ml", "--user", "alice", "--gpu", "H100")
    assert code == EXIT_OK and api.requests[-1][:3] == ("DELETE", "/api/quotas",
                                                        {"project": "ml", "user": "alice", "gpu": "H100"})
    assert len(api.quotas) == 1
    # a project admin may not set the project's own quota
    assert login(gf, server, ALICE)[0] == EXIT_OK
    code, out, err = gf("quota", "set", "--project", "ml", "--gpus", "1")
    assert code == EXIT_DENIED and "setting the quota of project ml needs a server admin" in err


def test_usage(gf: Run, server: str, api: TeamApi) -> None:
    assert login(gf, server, ALICE)[0] == EXIT_OK
    code, out, err = gf("usage", "--project", "ml", "--since", "2h")
    assert code == EXIT_OK and api.requests[-1][2] == {"project": "ml", "since": "7200"}
    rows = [line.split() for line in out.splitlines()]
    assert ["PROJECT", "USER", "GPU-HOURS", "DECAYED", "RUNS"] in rows
    assert ["ml", "alice", "12.5", "9.2", "3"] in rows or ["ml", "alice", "12.5", "9.3", "3"] in rows
    assert gf("usage", "--since", "1w")[0] == EXIT_OK and api.requests[-1][2] == {"since": "604800"}
    assert json.loads(gf("usage", "--json")[1]) == api.usage
    code, out, err = gf("usage", "--project", "default")
    assert code == EXIT_DENIED and "project default needs you to be a member" in err


# ------------------------------------------------------------------------------ ps and events

def _run(name: str, **team) -> dict:
    now = time.time()
    return {"name": name, "run_id": name + "-1", "type": "task", "fleet": "lab", "instance_id": 1, "alias": "n0",
            "status": "running", "spec": {}, "container": "c", "created_at": now, "updated_at": now,
            "instance_num": 0, **team}


def _event(i: int, **team) -> dict:
    return {"id": i, "ts": time.time(), "kind": "run.started", "message": "started on n0", "run": "r1", **team}


def test_ps_and_events_show_user_and_project_where_they_differ(gf: Run, server: str, api: TeamApi) -> None:
    """One user's runs in one project (the single-user case) need no PROJECT or USER column; runs
    of several users, or projects, get them. --json always carries them."""
    assert login(gf, server, ALICE)[0] == EXIT_OK
    api.runs = [_run("r1", project="ml", user="alice"), _run("r2", project="ml", user="alice")]
    api.events = [_event(1, project="ml", actor="alice")]
    assert gf("ps")[1].split()[:8] == ["NAME", "TYPE", "FLEET", "INSTANCE", "GPUS", "STATUS", "AGE", "r1"]
    assert gf("events")[1].split()[:5] == ["TIME", "KIND", "RUN", "HOST", "MESSAGE"]
    assert json.loads(gf("ps", "--json")[1])[0]["project"] == "ml"

    api.runs = [_run("r1", project="ml", user="alice"), _run("r2", project="cv", user="bob")]
    api.events = [_event(1, project="ml", actor="alice"), _event(2, project="cv", actor="bob")]
    out = gf("ps")[1].splitlines()
    assert out[0].split()[:3] == ["NAME", "PROJECT", "USER"] and out[1].split()[:3] == ["r1", "ml", "alice"]
    assert json.loads(gf("ps", "--json")[1])[0]["user"] == "alice"
    out = gf("events")[1].splitlines()
    assert out[0].split()[:5] == ["TIME", "KIND", "PROJECT", "ACTOR", "RUN"]
    assert out[1].split()[3:6] == ["ml", "alice", "r1"]
    assert json.loads(gf("events", "--json")[1])[0]["actor"] == "alice"

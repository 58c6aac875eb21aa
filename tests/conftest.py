from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the virtualenv's bin dir: Ansible's commands are run from here, never found through PATH (a new user's
# PATH does not hold .venv/bin, and CI runs with a minimal one)
BIN = Path(sys.executable).parent
# real GPU tool outputs live in shared/ beside the checkout (CI has a read-only copy at the same place),
# never copied into the repo
GPU_TOOL_FIXTURES = ROOT.parent / "shared" / "fixtures" / "gpu-tools"
# scripts/test.sh sets this: the README promises every test runs, so a skip is a failure there
NO_SKIP_ENV = "GPUFLEET_TEST_NO_SKIP"
# Every CLI a test runs starts (or reuses) the local server of its GPUFLEET_HOME; in tests such a
# server exits a minute after it has nothing to do, and the session's end stops any left.
os.environ.setdefault("GPUFLEET_SERVER_IDLE_EXIT", "60")


def tool(name: str) -> str:
    """The path of an Ansible command (ansible-playbook, ansible-doc, molecule...) next to this Python."""
    path = BIN / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}: run scripts/setup.sh"
    return str(path)


def gpu_tool_fixture(name: str) -> str:
    """A recorded output of a real GPU tool, from ../shared/fixtures/gpu-tools."""
    assert GPU_TOOL_FIXTURES.is_dir(), (
        f"{GPU_TOOL_FIXTURES} is missing: the real GPU tool outputs are read from shared/fixtures/gpu-tools "
        f"beside the checkout ({ROOT.parent})")
    return (GPU_TOOL_FIXTURES / name).read_text(encoding="utf-8")


def _fail_skip(report) -> None:
    """Under scripts/test.sh (GPUFLEET_TEST_NO_SKIP=1) a skip is reported as a failure, with its reason:
    the README promises that every test runs, so a skip there means the setup left something out (a tool
    not installed, no PostgreSQL, not root) and CI must say so. xfail is not used; its reports are left alone."""
    if os.environ.get(NO_SKIP_ENV) and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {NO_SKIP_ENV} is set (scripts/test.sh runs every test): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test skipped in setup or call (pytest.skip, skipif, a fixture that skips)."""
    _fail_skip((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at collection (pytest.importorskip or skip at module level)."""
    _fail_skip((yield).get_result())


def local_servers() -> list[tuple[int, str]]:
    """(pid, GPUFLEET_HOME) of every local gpufleet server running on this machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"server" not in cmdline or b"--local" not in cmdline or b"gpufleet" not in cmdline:
                continue
            env = dict(item.split(b"=", 1) for item in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
        except OSError:
            continue
        found.append((int(entry), env.get(b"GPUFLEET_HOME", b"").decode()))
    return found


@pytest.fixture(scope="session", autouse=True)
def _stop_local_servers(tmp_path_factory):
    """At the end of the session, stop the local servers that tests started (their homes are under
    pytest's temporary folder)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    for pid, home in local_servers():
        if home.startswith(base):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass


@dataclass
class Cli:
    home: Path
    server: str | None = None  # GPUFLEET_SERVER: a server started by the test; None: the home's local server

    def __call__(self, *args: str, check: int | None = None, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "GPUFLEET_HOME": str(self.home), "COLUMNS": "200", "TERM": "dumb",
               **({"GPUFLEET_SERVER": self.server} if self.server else {}), **(env or {})}
        p = subprocess.run([sys.executable, "-m", "gpufleet", *args], capture_output=True, text=True,
                           env=env, timeout=timeout, cwd=ROOT)
        if check is not None:
            assert p.returncode == check, (f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
                                           f"\nserver log (tail):\n{self.server_log()}")
        return p

    def server_log(self, lines: int = 30) -> str:
        log = self.home / "server" / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(none)"


def container_module(monkeypatch):
    """plugins/modules/gpufleet_container.py, with its module_utils import served by the shipped copy."""
    from gpufleet.containers import commands
    monkeypatch.setitem(sys.modules, "ansible.module_utils.gpufleet_inspect", commands())
    spec = importlib.util.spec_from_file_location("gpufleet_container_under_test",
                                                  ROOT / "plugins" / "modules" / "gpufleet_container.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_logs(cli: Cli, name: str, needle: str, timeout: float = 30) -> str:
    """Poll `gpufleet logs NAME` until ``needle`` shows; return the logs."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = cli("logs", name).stdout
        if needle in out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in logs of {name}: {out!r}")


def wait_for(what: str, fn, timeout: float = 60.0, every: float = 0.5):
    """Poll ``fn`` until it returns something true, and return that (a bounded loop: the server's
    loops act by themselves, so tests wait for what they see); fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)


def lab_available() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    return None


@pytest.fixture(scope="session")
def lab_factory(tmp_path_factory):
    """Create labs (removed at the end of the session)."""
    reason = lab_available()
    if reason:
        pytest.skip(reason)
    from gpufleet.lab import core

    made = []

    def make(nodes: int = 2, gpus: int = 8, vendor: str = "nvidia"):
        d = tmp_path_factory.mktemp(f"lab-{vendor}")
        made.append(d)
        return core.up(d, nodes=nodes, gpus=gpus, vendor=vendor, log=lambda *_: None)

    yield make
    for d in made:
        core.down(d, log=lambda *_: None)


@pytest.fixture()
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


# ---------------------------------------------------------------------- a shared server on loopback
# (a `gpufleet server` process as a team runs it, not a local one; its callers are users with tokens)

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self):
        import json

        return json.loads(self.text)


@dataclass
class ApiServer:
    """A `gpufleet server --port P` process on 127.0.0.1, its state directory (GPUFLEET_HOME) in a
    temporary folder, its output in ``log``. Requests are plain HTTP over a real socket."""

    home: Path
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def admin_token(self) -> str:
        """The bootstrap admin's token (user `admin`, a server admin): the state directory's file."""
        return (self.home / "server" / "token").read_text().strip()

    def request(self, method: str, path: str, token: str | None = None, body=None, query: dict | None = None,
                source: str | None = None, timeout: float = 120.0, raw_auth: str | None = None) -> Reply:
        """One request; ``source``: the client's address (any of 127.0.0.0/8), for limits per address."""
        import http.client
        import json
        import urllib.parse

        target = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if raw_auth is not None:
            headers["Authorization"] = raw_auth
        data = None
        if isinstance(body, bytes):  # as it is (a run's code upload, POST /api/uploads)
            data = body
            headers["Content-Type"] = "application/gzip"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, target, body=data, headers=headers)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode(errors="replace"))
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


def start_server(home: Path, database_url: str | None = None, timeout: float = 60.0) -> ApiServer:
    """Start `gpufleet server` (this checkout's code) on a free loopback port, with state in ``home``
    and ``database_url`` (None: the state directory's SQLite file); return once it answers."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN",
                                                            "GPUFLEET_DATABASE_URL")}
    env.update({"GPUFLEET_HOME": str(home), "PYTHONPATH": str(ROOT)})
    if database_url:
        env["GPUFLEET_DATABASE_URL"] = database_url
    log = home.parent / f"{home.name}-server.log"
    with open(log, "ab") as out:
        argv = [sys.executable, "-m", "gpufleet", "server", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    server = ApiServer(home, f"http://127.0.0.1:{port}", port, proc, log)

    def up():
        assert server.alive(), f"the server exited ({proc.returncode}):\n{log.read_text(errors='replace')}"
        try:
            return server.request("GET", "/api/health", timeout=5).status == 200
        except OSError:
            return False

    wait_for("the server to answer", up, timeout=timeout, every=0.2)
    return server


def pg_test_database(prefix: str):
    """A fresh database on the PostgreSQL server of GPUFLEET_TEST_DATABASE_URL (scripts/test.sh), as a
    context manager yielding its URL (dropped afterwards); skips when the variable is unset."""
    import contextlib
    import uuid

    url = os.environ.get("GPUFLEET_TEST_DATABASE_URL")
    if not url:
        pytest.skip("GPUFLEET_TEST_DATABASE_URL is not set (scripts/test.sh starts PostgreSQL and sets it)")

    @contextlib.contextmanager
    def made():
        from sqlalchemy import create_engine, text

        from gpufleet.state import database_url

        saved = os.environ.get("GPUFLEET_DATABASE_URL")
        os.environ["GPUFLEET_DATABASE_URL"] = url
        try:
            admin_url = database_url()
        finally:
            if saved is None:
                del os.environ["GPUFLEET_DATABASE_URL"]
            else:
                os.environ["GPUFLEET_DATABASE_URL"] = saved
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        base, _, _ = url.rpartition("/")
        try:
            yield f"{base}/{name}"
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return made()

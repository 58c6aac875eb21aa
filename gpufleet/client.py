"""The CLI's way to the control plane: one client of the server's HTTP API for every command that
reads or changes state.

Which server, first found: GPUFLEET_SERVER; the server of the config file that `gpufleet login`
writes ($GPUFLEET_HOME/config.json: server, token, default project); else this state directory's
local server, started in the background on first use (as SkyPilot starts its local API server), so
a single user needs no set-up. Each state directory (GPUFLEET_HOME) has its own local server.
Which token, first found: GPUFLEET_TOKEN; the config file's, where it is for the same server; the
state directory's token file (the local server's bootstrap admin).

A token is never shown: not in an error, a repr or anything printed but the answers that make one.

Plain http.client: the CLI starts fast (no HTTP library to import), and streams (logs, a fleet's
probe progress) are read as they come.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from gpufleet import paths
from gpufleet.errors import ConfigError, ConfigProblem, Forbidden, GpufleetError, NotFound, Unauthorized, UsageError

SERVER_ENV = "GPUFLEET_SERVER"
TOKEN_ENV = "GPUFLEET_TOKEN"
IDLE_ENV = "GPUFLEET_SERVER_IDLE_EXIT"  # seconds a local server idles before it exits (tests set it low)
START_TIMEOUT = 60.0
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 65536


class ServerGone(GpufleetError):
    """The server could not be reached, or stopped answering in the middle of a request."""


class Client:
    """``url``'s API with ``token``. ``via``: what named the server (for messages); ``token_from``:
    where the token was found (said on a 401, never the token); ``project``: the default project of
    the config file, where it is this server's."""

    def __init__(self, url: str, token: str | None, local: bool = False, via: str = SERVER_ENV,
                 token_from: str = "", project: str | None = None):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{via}: {url!r} is not an http:// or https:// URL")
        if token is not None and not _token_ok(token):  # http.client would put it in its ValueError
            raise UsageError(f"the API token from {token_from or via} is not a token: it is empty or holds "
                             "spaces or control characters")
        self._parts = parts
        self._token = token or None
        self.local = local
        self.via = via
        self.token_from = token_from
        self.project = project

    def __repr__(self) -> str:
        return f"Client({self.url!r}, local={self.local}, token_from={self.token_from!r})"

    def authorization(self) -> dict[str, str]:
        """The header that carries the token (none without one): for requests made elsewhere (a tunnel's WebSocket)."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def uses_token(self, token: str) -> bool:
        """Whether this client sends ``token`` (without handing its own out)."""
        return self._token is not None and secrets.compare_digest(self._token.encode(), token.encode())

    # ------------------------------------------------------------------ plumbing
    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=timeout)

    def _send(self, method: str, path: str, body=None, params: dict | None = None,
              timeout: float | None = 600.0) -> http.client.HTTPResponse:
        query = {k: ("true" if v is True else "false" if v is False else v) for k, v in (params or {}).items()
                 if v is not None}
        target = self._parts.path + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", **self.authorization()}
        data = None
        if isinstance(body, bytes):  # an upload (a run's code archive)
            data = body
            headers["Content-Type"] = "application/gzip"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection(timeout)
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self._gone(e) from None
        if response.status >= 400:
            try:
                raise self._scrub(_error(response.status, response.read(), response.headers.get("Retry-After")))
            finally:
                conn.close()
        return response

    def _scrub(self, err: GpufleetError) -> GpufleetError:
        """The error, with the token (should a server ever echo it) blanked out, and on a 401 where
        the token was found."""
        if self._token and err.args and isinstance(err.args[0], str):
            err.args = (err.args[0].replace(self._token, "[token]"), *err.args[1:])
        if isinstance(err, Unauthorized) and self._token and self.token_from and err.args:
            err.args = (f"{err.args[0]} (the token from {self.token_from}, for {self.url})", *err.args[1:])
        return err

    def _gone(self, e: Exception) -> ServerGone:
        where = f"the local gpufleet server ({self.url})" if self.local else f"the gpufleet server at {self.url}"
        hint = (f"; its log: {_server_dir() / 'server.log'}" if self.local
                else f" (set by {self.via}); is it running?")
        return ServerGone(f"cannot reach {where}: {e}{hint}")

    def call(self, method: str, path: str, body=None, params: dict | None = None):
        response = self._send(method, path, body, params)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise self._gone(e) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **params):
        return self.call("GET", path, params=params)

    def post(self, path: str, body=None, **params):
        return self.call("POST", path, body=body, params=params)

    def put(self, path: str, body=None, **params):
        return self.call("PUT", path, body=body, params=params)

    def delete(self, path: str, **params):
        return self.call("DELETE", path, params=params)

    def lines(self, method: str, path: str, body=None) -> Iterator[dict]:
        """A stream of JSON lines (a fleet's apply); an `error` line raises as the CLI's errors do."""
        response = self._send(method, path, body, timeout=None)
        try:
            for raw in response:
                item = json.loads(raw)
                if "error" in item:
                    raise self._scrub(_error_from(item["error"]))
                yield item
        except (OSError, http.client.HTTPException) as e:
            raise self._gone(e) from None
        finally:
            response.close()

    def chunks(self, path: str, **params) -> Iterator[bytes]:
        """A byte stream (a run's logs), as it comes."""
        response = self._send("GET", path, params=params, timeout=None)
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    return
                yield chunk
        except (OSError, http.client.HTTPException) as e:
            raise self._gone(e) from None
        finally:
            response.close()


def path(*segments: str) -> str:
    """An API path from names a user typed: each one quoted (a `/` or `?` in a name stays in it)."""
    return "/api/" + "/".join(urllib.parse.quote(str(s), safe="") for s in segments)


def _token_ok(token: str) -> bool:
    return bool(token) and token.isascii() and token.isprintable() and not any(c.isspace() for c in token)


def _error(status: int, raw: bytes, retry_after: str | None = None) -> GpufleetError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"detail": raw.decode(errors="replace").strip() or f"HTTP {status}"}
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    if status == 422 and "problems" not in body and isinstance(body.get("detail"), list):
        # FastAPI's own validation of a request (a client of another version)
        body = {"detail": "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
                                    for d in body["detail"]), "exit_code": 2}
    if status in (401, 403, 429):  # denied, whatever the body says: exit 3
        detail = str(body.get("detail") or ("too many failed tries" if status == 429 else f"HTTP {status}"))
        if status == 429 and retry_after and retry_after.strip().isdigit():
            detail += f"; try again in {int(retry_after)}s"
        return (Forbidden if status == 403 else Unauthorized)(detail)
    body.setdefault("exit_code", 2 if status in (400, 422) else 1)
    err = _error_from(body)
    if status == 404 and type(err) is GpufleetError:
        err = NotFound(str(err))
    elif status in (401, 403, 429):  # refused: exit 3, whatever the server's version says
        err = (Forbidden if status == 403 else Unauthorized)(str(err))
    return err


def _error_from(body: dict) -> GpufleetError:
    detail = str(body.get("detail", "error"))
    if body.get("problems"):
        return ConfigError([ConfigProblem(**p) for p in body["problems"]])
    err = UsageError(detail) if body.get("exit_code") == 2 else GpufleetError(detail)
    if body.get("exit_code") not in (None, 1, 2):
        err.exit_code = int(body["exit_code"])
    return err


# ---------------------------------------------------------------------- which server

def _server_dir() -> Path:
    from gpufleet.server.tokens import server_dir

    return server_dir()


def connect() -> Client:
    """The client of GPUFLEET_SERVER, else of the config file's server, else of this state
    directory's local server (started if need be); the token as the module's docstring says."""
    url = os.environ.get(SERVER_ENV)
    env_token = os.environ.get(TOKEN_ENV) or None
    login = read_config()
    if url:
        same = login is not None and same_server(login.server, url)
        if env_token:
            token, token_from = env_token, TOKEN_ENV
        elif same:
            token, token_from = login.token, f"the config file {config_path()}"
        else:
            from gpufleet.server.tokens import read_token

            token, token_from = read_token(_server_dir()), "the state directory's token file"
        return Client(url, token, via=SERVER_ENV, token_from=token_from, project=login.project if same else None)
    if login is not None:
        where = f"the config file {config_path()}"
        return Client(login.server, env_token or login.token, via=where,
                      token_from=TOKEN_ENV if env_token else where, project=login.project)
    url, token = ensure_local()
    return Client(url, env_token or token, local=True, via="the local server",
                  token_from=TOKEN_ENV if env_token else "the state directory's token file")


def same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


# ---------------------------------------------------------------------- the config file

class Login:
    """What `gpufleet login` keeps: the server, the token, the default project (None: the server picks)."""

    __slots__ = ("server", "token", "project")

    def __init__(self, server: str, token: str, project: str | None = None):
        self.server, self.token, self.project = server.rstrip("/"), token, project

    def __repr__(self) -> str:  # never the token
        return f"Login(server={self.server!r}, project={self.project!r})"

    def json(self) -> dict:
        return {"server": self.server, "token": self.token, "project": self.project}


def config_path() -> Path:
    return paths.home() / CONFIG_FILE


def read_config() -> Login | None:
    """The config file's login, None if there is none. A file other users may read is refused
    (it holds a token), as one that is not a plain file or not the JSON `gpufleet login` writes."""
    path = config_path()
    redo = "remove it (gpufleet logout) and run gpufleet login again"
    raw = paths.read_private_file(path, "config", redo, MAX_CONFIG_BYTES,
                                  exposed=" (it holds a token), and if others may have read it, rotate the token "
                                          "(gpufleet user rotate-token)")
    if raw is None:
        return None
    try:
        data = json.loads(raw) if len(raw) <= MAX_CONFIG_BYTES else None
    except ValueError:
        data = None
    if (not isinstance(data, dict) or not isinstance(data.get("server"), str) or not isinstance(data.get("token"), str)
            or not isinstance(data.get("project"), (str, type(None)))):
        raise GpufleetError(f"the config file {path} is not what gpufleet login writes: {redo}")
    return Login(data["server"], data["token"], data.get("project"))


def write_config(login: Login) -> Path:
    """Write the config file 0600, atomically: a file written in full under another name, then
    renamed over the old one (a reader sees the old file or the new one, never half of one)."""
    path = config_path()
    paths.replace_private_file(path, json.dumps(login.json(), indent=2) + "\n", "config")
    return path


def remove_config() -> Path | None:
    """Remove the config file; its path, or None if there was none."""
    path = config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def local_server() -> dict | None:
    """The local server of this state directory, if one answers: {"url", "pid", ...}."""
    from gpufleet.server.tokens import local_file, read_token

    try:
        found = json.loads(local_file().read_text())
    except (OSError, ValueError):
        return None
    token = read_token(_server_dir())
    try:
        Client(found["url"], token, local=True).get("/api/health")
    except GpufleetError:
        return None
    return {**found, "token": token}


def ensure_local() -> tuple[str, str]:
    """(url, token) of this state directory's local server, started in the background if none answers.
    Two commands starting at once start one server (a lock file); the second waits for it."""
    found = local_server()
    if found:
        return found["url"], found["token"]
    sdir = _server_dir()
    with open(sdir / "start.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = local_server()
        if found:
            return found["url"], found["token"]
        log = sdir / "server.log"
        argv = [sys.executable, "-m", "gpufleet", "server", "--local"]
        if os.environ.get(IDLE_ENV):
            argv += ["--idle-exit", os.environ[IDLE_ENV]]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                    close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = local_server()
            if found:
                return found["url"], found["token"]
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
        raise ServerGone("the local gpufleet server did not start" +
                         (f" (exit {proc.returncode})" if proc.poll() is not None else f" in {START_TIMEOUT:.0f}s") +
                         f"; its log ({log}):\n" + "\n".join(tail))

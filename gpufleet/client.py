"""The CLI's way to the control plane: one client of the server's HTTP API for every command that
reads or changes state.

Which server: GPUFLEET_SERVER (a shared one; its token from GPUFLEET_TOKEN or the state directory's
token file), else this state directory's local server, started in the background on first use (as
SkyPilot starts its local API server), so a single user needs no set-up. Each state directory
(GPUFLEET_HOME) has its own local server.

Plain http.client: the CLI starts fast (no HTTP library to import), and streams (logs, a fleet's
probe progress) are read as they come.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from gpufleet.errors import (
    ConfigError,
    ConfigProblem,
    Forbidden,
    GpufleetError,
    NotFound,
    Unauthorized,
    UsageError,
)

SERVER_ENV = "GPUFLEET_SERVER"
TOKEN_ENV = "GPUFLEET_TOKEN"
IDLE_ENV = "GPUFLEET_SERVER_IDLE_EXIT"  # seconds a local server idles before it exits (tests set it low)
START_TIMEOUT = 60.0


class ServerGone(GpufleetError):
    """The server could not be reached, or stopped answering in the middle of a request."""


class Client:
    def __init__(self, url: str, token: str | None, local: bool = False):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{SERVER_ENV}={url}: not an http:// or https:// URL")
        self._parts = parts
        self.token = token
        self.local = local

    # ------------------------------------------------------------------ plumbing
    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=timeout)

    def _send(self, method: str, path: str, body=None, params: dict | None = None,
              timeout: float | None = 600.0) -> http.client.HTTPResponse:
        query = {k: ("true" if v is True else "false" if v is False else v) for k, v in (params or {}).items()
                 if v is not None}
        target = self._parts.path + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
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
                raise _error(response.status, response.read())
            finally:
                conn.close()
        return response

    def _gone(self, e: Exception) -> ServerGone:
        where = f"the local gpufleet server ({self.url})" if self.local else f"the gpufleet server at {self.url}"
        hint = (f"; its log: {_server_dir() / 'server.log'}" if self.local
                else f" (set by {SERVER_ENV}); is it running?")
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

    def delete(self, path: str):
        return self.call("DELETE", path)

    def lines(self, method: str, path: str, body=None) -> Iterator[dict]:
        """A stream of JSON lines (a fleet's apply); an `error` line raises as the CLI's errors do."""
        response = self._send(method, path, body, timeout=None)
        try:
            for raw in response:
                item = json.loads(raw)
                if "error" in item:
                    raise _error_from(item["error"])
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


def _error(status: int, raw: bytes) -> GpufleetError:
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
    """The client of GPUFLEET_SERVER, else of this state directory's local server (started if need be)."""
    url = os.environ.get(SERVER_ENV)
    if url:
        from gpufleet.server.tokens import read_token

        token = os.environ.get(TOKEN_ENV) or read_token(_server_dir())
        return Client(url, token)
    return Client(*ensure_local(), local=True)


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

"""A real HTTP server on loopback that answers the CLI as a test says, and the CLI (gpufleet.cli.main)
run in this process against it: pytest fixtures `api`, `server` and `gf` for tests of what the CLI
prints and asks. Import them into a test module: `from fakeapi import api, gf, server, write`."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpufleet import cli

TOKEN = "gft_" + "t" * 43


class Api:
    """Answers (method, path) with (status, JSON) as set in ``routes``; records what it was asked."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, object]] = {}
        self.asked: list[tuple[str, str, object]] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        api: Api = self.server.api  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        api.asked.append((self.command, path, body))
        status, answer = api.routes.get((self.command, path), (404, {"detail": f"no route {path}", "exit_code": 1}))
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


@pytest.fixture()
def api() -> Api:
    return Api()


@pytest.fixture()
def server(api: Api, tmp_path: Path, monkeypatch) -> Iterator[str]:
    """The fake server, the CLI pointed at it, a fresh state directory and wide output."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.api = api  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUFLEET_SERVER", url)
    monkeypatch.setenv("GPUFLEET_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "300")
    try:
        yield url
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def gf(capsys, server):
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        umask = os.umask(0o022)
        os.umask(umask)
        try:
            code = cli.main(list(argv))
        finally:
            os.umask(umask)  # main() makes it 077 for the process
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and "MarkupError" not in out + err, out + err
        return code, out, err

    return run


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path

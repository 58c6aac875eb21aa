"""A service's `rate_limits` on the service endpoint (gpufleet.server.proxy's routes) on a real uvicorn server
on loopback, to a real replica (uvicorn on a Unix socket, what a replica's ssh forward is): over the limit
an HTTP request gets 429 with the limit and Retry-After, and a WebSocket's handshake too, before `auth`;
another prefix, another client and another service are counted apart. The lab test covers the ssh side."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gpufleet.errors import Unauthorized
from gpufleet.models import Run
from gpufleet.server import proxy


def _run(name: str, run_id: str, **spec) -> Run:
    return Run(name=name, run_id=run_id, type="service", fleet=None, instance_id=None, alias=None, status="running",
               spec={"type": "service", "port": 8000, **spec}, container="c", created_at=0, updated_at=0,
               project="main", replicas=1)  # a service's own run


def _replica_app(seen: list) -> FastAPI:
    app = FastAPI()

    @app.get("/{path:path}")
    def get(path: str):
        seen.append(path)
        return {"path": path}

    @app.websocket("/{path:path}")
    async def ws(websocket: WebSocket, path: str):
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    return app


@contextlib.contextmanager
def _serve(app, **where):
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **where))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        t.join(10)


@pytest.fixture
def endpoint(tmp_path):
    sock = str(tmp_path / "replica.sock")
    seen: list = []
    limits = [{"prefix": "/", "rps": 1, "burst": 2, "key": {"type": "ip_address"}},
              {"prefix": "/api/", "rps": 1, "burst": 0, "key": {"type": "header", "header": "X-User"}}]
    runs = {"web": _run("web", "r1", auth=False, rate_limits=limits),
            "locked": _run("locked", "r2", auth=True, rate_limits=limits[:1]),
            "free": _run("free", "r3", auth=False)}
    ctx = SimpleNamespace(store=SimpleNamespace(run=runs.get),
                          services=SimpleNamespace(socket_for=lambda r: sock, status=lambda r: (1, 1),
                                                   known=runs.get, lost=lambda *a: None, hit=lambda n: None),
                          caller=lambda token, client: None)
    app = FastAPI()
    proxy.add_routes(app, ctx)

    @app.exception_handler(Unauthorized)  # as the server's app answers it
    async def _unauthorized(request, e):
        return JSONResponse({"detail": str(e)}, status_code=401)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _serve(_replica_app(seen), uds=sock), _serve(app, host="127.0.0.1", port=port):
        yield port, seen


def test_over_the_limit_an_http_request_gets_429_with_the_limit_and_retry_after(endpoint):
    port, seen = endpoint
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/proxy/services/main", timeout=10) as c:
        codes = [c.get("/web/x").status_code for _ in range(8)]
        assert codes[:3] == [200] * 3 and codes.count(429) >= 4, codes  # burst 2: 3 at once, then 1/s
        r = c.get("/web/x")
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        body = r.json()
        assert body["detail"] == ("service web: too many requests under / (its rate limit: 1 requests/s, burst 2, "
                                  "per client address); retry in 1 s"), body
        assert body["rate_limit"] == {"prefix": "/", "rps": 1.0, "burst": 2, "key": {"type": "ip_address"}}
        assert seen.count("x") == codes.count(200)  # a refused request never reached the replica
        # /api/ has its own rule (the longest prefix), keyed by X-User: each user counted apart; no header:
        # not limited by it
        assert [c.get("/web/api/a", headers={"X-User": "ann"}).status_code for _ in range(2)] == [200, 429]
        assert c.get("/web/api/a", headers={"X-User": "bob"}).status_code == 200
        assert [c.get("/web/api/a").status_code for _ in range(3)] == [200] * 3
        # a service without rate_limits: never limited
        assert {c.get("/free/x").status_code for _ in range(10)} == {200}
        # another client address (X-Forwarded-For from loopback, a proxy uvicorn trusts): its own count
        assert c.get("/web/x", headers={"X-Forwarded-For": "10.9.9.9"}).status_code == 200
        time.sleep(1.05)  # a request drained (or more, on a slow machine)
        codes = [c.get("/web/x").status_code for _ in range(4)]
        assert codes[0] == 200 and 429 in codes, codes


def test_the_limit_is_counted_before_auth_and_a_websocket_handshake_gets_429_too(endpoint):
    port, _ = endpoint
    base = f"127.0.0.1:{port}/proxy/services/main"
    with httpx.Client(base_url=f"http://{base}", timeout=10) as c:
        codes = [c.get("/locked/").status_code for _ in range(5)]  # no token: 401, counted (as nginx does)
        assert codes[:3] == [401] * 3 and 429 in codes, codes
    with pytest.raises(InvalidStatus) as e:
        connect(f"ws://{base}/locked/chat", open_timeout=10)
    assert e.value.response.status_code == 429 and e.value.response.headers["Retry-After"] == "1"
    assert b"too many requests under /" in e.value.response.body
    with connect(f"ws://{base}/free/chat", open_timeout=10) as ws:  # no rate_limits: carried
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"

"""The service endpoint's carrying (gpufleet.server.proxy's routes) on a real uvicorn server on loopback,
to a real replica listening on a Unix socket (what a replica's ssh forward is): WebSocket frames both
ways with the subprotocol the replica chose, and an HTTP answer. The lab test covers the ssh side."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI
from websockets.asyncio.server import unix_serve
from websockets.sync.client import connect

from gpufleet.models import Run
from gpufleet.server import proxy


def _run(**spec) -> Run:
    return Run(name="web", run_id="r1", type="service", fleet=None, instance_id=None, alias=None, status="running",
               spec={"type": "service", "port": 8000, **spec}, container="c", created_at=0, updated_at=0,
               project="main", replicas=1)


@contextlib.contextmanager
def _serving(ctx):
    """The proxy's routes over ``ctx`` on a real uvicorn server on loopback: its port."""
    app = FastAPI()
    proxy.add_routes(app, ctx)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        t.join(10)


def _replica(path: str, seen: list, started: threading.Event) -> None:
    async def echo(ws):
        seen.append((ws.request.path, ws.request.headers.get("Authorization"), ws.request.headers.get("X-Seen")))
        async for message in ws:
            await ws.send(message[::-1] if isinstance(message, str) else message + b"!")

    async def main():
        async with unix_serve(echo, path, subprotocols=["chat"]):
            started.set()
            await asyncio.Future()

    asyncio.run(main())


def test_a_websocket_is_carried_both_ways_and_the_path_stripped(tmp_path):
    sock = str(tmp_path / "replica.sock")
    seen: list = []
    started = threading.Event()
    threading.Thread(target=_replica, args=(sock, seen, started), daemon=True).start()
    assert started.wait(10)
    run = _run(auth=False)
    ctx = SimpleNamespace(store=SimpleNamespace(run=lambda name: run if name == "web" else None),
                          services=SimpleNamespace(socket_for=lambda r: sock, status=lambda r: (1, 1),
                                                   known=lambda n: run, lost=lambda *a: None, hit=lambda n: None),
                          caller=lambda token, client: None)
    with _serving(ctx) as port:
        url = f"ws://127.0.0.1:{port}/proxy/services/main/web/chat?room=1"
        with connect(url, subprotocols=["chat"], additional_headers={"Authorization": "Bearer gft_secret",
                                                                     "X-Seen": "yes"}) as ws:
            assert ws.subprotocol == "chat"
            ws.send("hello")
            assert ws.recv(timeout=10) == "olleh"
            ws.send(b"\x00\x01")
            assert ws.recv(timeout=10) == b"\x00\x01!"
        assert seen == [("/chat?room=1", None, "yes")]  # stripped; the gpufleet token not passed on


def _http_replica(path: str, started: threading.Event, answers: int) -> None:
    """A replica on a Unix socket answering ``answers`` plain HTTP requests with 'hello'."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen()
        started.set()
        for _ in range(answers):
            c, _ = s.accept()
            with c:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += c.recv(4096)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


def test_a_service_the_last_look_saw_starting_is_served_once_the_store_says_running(tmp_path):
    # the proxy's last look (its thread, once a second or slower) saw the service still starting; by now its
    # replicas are ready and the store has it running: the request is carried, not refused as "not ready"
    sock = str(tmp_path / "replica.sock")
    started = threading.Event()
    threading.Thread(target=_http_replica, args=(sock, started, 1), daemon=True).start()
    assert started.wait(10)
    now, stale = _run(auth=False), _run(auth=False).model_copy(update={"status": "provisioning"})
    ctx = SimpleNamespace(store=SimpleNamespace(run=lambda name: now if name == "web" else None),
                          services=SimpleNamespace(socket_for=lambda r: sock if r.status == "running" else None,
                                                   status=lambda r: (1, 1), known=lambda n: stale,
                                                   lost=lambda *a: None, hit=lambda n: None),
                          caller=lambda token, client: None)
    with _serving(ctx) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/proxy/services/main/web/")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"hello")

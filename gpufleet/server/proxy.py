"""The server's endpoint for services: ``/proxy/services/<project>/<run>/<path>`` (any method, and
WebSocket) carried to the service's ready replica through the fleet's jump chain.

Each replica gets one ssh forward, kept by the server: ``ssh -N -L SOCKET:127.0.0.1:HOSTPORT`` through
the fleet's ssh_config (its multiplexed masters and jump chain), SOCKET a Unix socket in a folder only
the server's user can open (a loopback port would let any local user past `auth`). It is started when
the replica is first seen running and started again when it dies. Requests go over it with an HTTP
client that keeps connections alive (one ssh channel per kept connection, not an ssh process per
request); bodies stream both ways (chunked uploads, server-sent events), WebSockets are carried frame
by frame.

Readiness: a thread of the server probes each running replica every PROBE_TICK seconds through its
forward: the service's `probes` (gpufleet.services.probe_due/probe_step), or without probes whether its
port takes a connection. Only a ready replica gets traffic; until one is, the answer is 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from gpufleet import ratelimit, router, runs, services
from gpufleet.containers import ssh_argv
from gpufleet.errors import GpufleetError, NotFound
from gpufleet.models import Run, RunStatus
from gpufleet.models.run import router_group
from gpufleet.paths import FleetFiles
from gpufleet.server import models_proxy
from gpufleet.server.auth import Caller, bearer, client_of, token_hash
from gpufleet.state import RATE_BUCKET

log = logging.getLogger("gpufleet.server.proxy")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per probe and per request

PROBE_TICK = 1.0  # seconds between two looks at the running services
FORWARD_START = 20.0  # seconds an ssh forward has to open its socket
ACCEPT_WAIT = 1.0  # without probes: a connection the forward keeps open this long reached a listening port
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # RFC 9110 9.2.2: safe to send again
RETRIES = 3  # replicas a request without a body is tried on when one does not answer


@dataclass
class Forward:
    """One replica's ssh forward: a Unix socket here that reaches HOSTPORT on its host's 127.0.0.1."""

    argv: list[str]
    sock: str
    proc: subprocess.Popen | None = None
    error: str = ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and os.path.exists(self.sock)

    def start(self, errfile: str) -> bool:
        with open(errfile, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.monotonic() + FORWARD_START
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if os.path.exists(self.sock):
                return True
            time.sleep(0.05)
        self.stop()
        with contextlib.suppress(OSError):
            lines = [x.strip() for x in open(errfile, errors="replace").read().splitlines() if x.strip()]
            self.error = lines[-1] if lines else f"ssh exited with {self.proc.returncode}"
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.sock)


@dataclass
class Entry:
    """A live service as the proxy knows it: its own run, its running replicas' state, their forwards."""

    run: Run
    replicas: list[services.Replica] = field(default_factory=list)
    forwards: dict[str, Forward] = field(default_factory=dict)  # replica's run_id/alias -> its forward
    turn: int = 0  # round robin over the ready replicas

    @property
    def ready(self) -> int:
        return sum(r.ready for r in self.replicas)


class ServiceProxy:
    """The forwards and readiness of the live services of a store, kept by a thread, and the requests
    their endpoint carried (for autoscaling)."""

    def __init__(self, store):
        self.store = store
        self.dir = tempfile.mkdtemp(prefix="gpufleet-proxy-")  # 0700: only the server's user opens the sockets
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._n = itertools.count()
        self._unflushed: dict[tuple[str, int], int] = {}  # (service, bucket) -> requests not yet in the store
        self._flushed = time.monotonic()
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------------ what the routes ask
    def status(self, run: Run) -> tuple[int, int]:
        """(ready, wanted) replicas of service ``run``."""
        wanted = run.replicas if run.replicas is not None else 1
        with self.lock:
            e = self.entries.get(run.name)
            if e is None or e.run.run_id != run.run_id:
                return 0, wanted
            return e.ready, wanted

    def known(self, name: str) -> Run | None:
        """Live service ``name`` as the last look saw it (None: not live then)."""
        with self.lock:
            e = self.entries.get(name)
            return e.run if e is not None else None

    def ready_names(self, name: str) -> set[str]:
        """The replicas of service ``name`` that get traffic now."""
        with self.lock:
            e = self.entries.get(name)
            return {r.name for r in e.replicas if r.ready} if e is not None else set()

    def socket_for(self, run: Run) -> str | None:
        """The socket of a ready replica of ``run``, each in turn (None: none is ready)."""
        with self.lock:
            e = self.entries.get(run.name)
            if e is None or e.run.run_id != run.run_id:
                return None
            n = len(e.replicas)
            router = router_group(e.run.spec)  # a service with a router: its traffic goes to the router only
            for i in range(n):
                r = e.replicas[(e.turn + i) % n]
                f = e.forwards.get(_key(r))
                if r.ready and f is not None and f.alive() and (router is None or r.group == router):
                    e.turn = (e.turn + i + 1) % n
                    return f.sock
        return None

    def replica_socket(self, service: str, replica: str) -> str | None:
        """The socket of the forward to replica ``replica`` of ``service`` (None: none is open), ready or not."""
        with self.lock:
            e = self.entries.get(service)
            r = next((r for r in e.replicas if r.name == replica), None) if e is not None else None
            f = e.forwards.get(_key(r)) if r is not None else None
            return f.sock if f is not None and f.alive() else None

    def lost(self, run: Run, sock: str, why: str) -> None:
        """A request could not reach ``sock``: the replica is not ready until the next probe says so."""
        with self.lock:
            e = self.entries.get(run.name)
            for r in e.replicas if e else []:
                f = e.forwards.get(_key(r))
                if f is not None and f.sock == sock:
                    r.ready, r.why = False, why
                    r.probes = [services.ProbeState() for _ in r.probes]

    def drain(self, replica: str) -> None:
        """Replica ``replica`` is about to be stopped: no new request goes to it from this server."""
        with self.lock:
            for e in self.entries.values():
                for r in e.replicas:
                    if r.name == replica:
                        r.ready, r.why, r.draining = False, "being stopped", True

    def hit(self, name: str) -> None:
        """A request reached service ``name``'s endpoint (counted whether or not a replica took it): kept in
        the store every RATE_BUCKET seconds, where the leader's autoscaling sums every server's counts."""
        key = (name, int(time.time()) // RATE_BUCKET)
        with self.lock:
            self._unflushed[key] = self._unflushed.get(key, 0) + 1

    def flush(self) -> None:
        with self.lock:
            counts, self._unflushed = self._unflushed, {}
        if counts:
            self.store.add_service_requests(self.holder, counts, time.time())

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gpufleet-services", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(Exception):  # the last counts (a store that is gone: lost)
            self.flush()
        with self.lock:
            for e in self.entries.values():
                for f in e.forwards.values():
                    f.stop()
            self.entries.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _loop(self) -> None:
        while not self._stop.wait(PROBE_TICK):
            try:
                self.tick()
            except Exception:  # the loop goes on: the next tick tries again
                log.exception("services: probing failed")

    def tick(self) -> None:
        """One look: forwards for the running replicas of the live services (started, or started again),
        probes due run, forwards of replicas no longer running stopped."""
        if time.monotonic() - self._flushed >= RATE_BUCKET:
            self._flushed = time.monotonic()
            self.flush()
        live = self.store.runs()
        services_ = {r.name: r for r in live if r.is_service}
        running: dict[str, list[Run]] = {}
        for r in live:
            if r.replica_of in services_ and r.status == RunStatus.RUNNING:
                running.setdefault(r.replica_of, []).append(r)
        with self.lock:
            for n in [n for n, e in self.entries.items() if n not in services_ or services_[n].run_id != e.run.run_id]:
                for f in self.entries.pop(n).forwards.values():
                    f.stop()
            for n, run in services_.items():
                e = self.entries.setdefault(n, Entry(run))
                e.run = run
                keep = {(r.run_id, r.alias) for r in running.get(n, [])}
                for r in [r for r in e.replicas if (r.run_id, r.alias) not in keep]:
                    f = e.forwards.pop(_key(r), None)
                    if f is not None:
                        f.stop()
                e.replicas = [r for r in e.replicas if (r.run_id, r.alias) in keep]
                have = {(r.run_id, r.alias) for r in e.replicas}
                for rep in running.get(n, []):
                    if (rep.run_id, rep.alias) not in have:  # its own spec's port (a rolling update may change it)
                        e.replicas.append(services.Replica(rep.run_id, rep.alias, int(rep.spec["port"]), name=rep.name,
                                                           group=rep.replica_group or ""))
                e.replicas.sort(key=lambda r: r.name)
            work = [(e, list(e.replicas)) for e in self.entries.values()]
        for e, reps in work:
            for r in reps:
                if self._stop.is_set():
                    return
                self._look(e, r, next((x for x in running.get(e.run.name, []) if x.run_id == r.run_id), None))

    def _look(self, e: Entry, r: services.Replica, replica: Run | None) -> None:
        if replica is None:
            return
        run = e.run
        probes = replica.spec.get("probes") or []  # its own version's
        f = e.forwards.get(_key(r))
        if f is None or not f.alive():
            if f is not None:
                f.stop()
                log.info("service %s: the forward to %s died: starting it again", run.name, r.name)
            f = self._forward(replica, r)
            if f is None:
                return
            with self.lock:
                e.forwards[_key(r)] = f
                r.probes = [services.ProbeState() for _ in probes]
        if r.draining:
            return
        ready = self._probe(r, f, probes)
        with self.lock:
            if ready != r.ready:
                log.info("service %s: replica %s on %s is %s", run.name, r.name, r.alias,
                         "ready" if ready else f"not ready ({r.why})")
            r.ready = ready

    def _forward(self, run: Run, r: services.Replica) -> Forward | None:
        try:
            if r.host_port is None:
                r.host_port = runs.host_port(self.store, run, r.port)
            files = FleetFiles.of(run.fleet).require()
        except GpufleetError as e:
            r.ready, r.why = False, str(e)
            return None
        sock = os.path.join(self.dir, f"{next(self._n)}.sock")
        argv = ssh_argv(files, r.alias, None, extra=[
            # a connection of its own (a multiplexed client would hand the forward to the fleet's master and
            # exit: the forward would then live and die with the master, out of this server's sight); its
            # jump hosts are still reached through their masters
            "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0177",
            "-o", "ServerAliveInterval=15", "-L", f"{sock}:127.0.0.1:{r.host_port}"])
        f = Forward(argv, sock)
        if not f.start(sock + ".err"):
            r.ready, r.why = False, f"cannot forward to {r.alias}: {f.error}"
            log.warning("service %s: %s", run.name, r.why)
            return None
        return f

    def _probe(self, r: services.Replica, f: Forward, probes: list[dict]) -> bool:
        """Run the probes due; whether the replica is ready."""
        if not probes:
            ok, why = accepts(f.sock)
            r.why = why
            return ok
        now = time.monotonic()
        states = list(r.probes)
        for i, p in enumerate(probes):
            if not services.probe_due(states[i], now, p["interval"], p["ready_after"], p["until_ready"]):
                continue
            ok, why = http_probe(f.sock, p)
            states[i] = services.probe_step(states[i], ok, time.monotonic(), why)
        with self.lock:
            r.probes = states
            r.why = next((s.last_error for s in states if s.last_error), "")
        return services.replica_ready(states, [p["ready_after"] for p in probes])


def _key(r: services.Replica) -> str:
    return f"{r.run_id}/{r.alias}"


def accepts(sock: str) -> tuple[bool, str]:
    """Whether the port behind forward ``sock`` takes a connection: ssh closes ours at once when it
    cannot connect there; kept open ACCEPT_WAIT (or answered), it did."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(ACCEPT_WAIT)
    try:
        s.connect(sock)
        return (True, "") if s.recv(1) else (False, "its port does not accept connections")
    except TimeoutError:
        return True, ""
    except OSError as e:
        return False, f"its port does not accept connections ({e.strerror or e})"
    finally:
        s.close()


def http_probe(sock: str, probe: dict) -> tuple[bool, str]:
    """One HTTP probe through forward ``sock``: (succeeded: a 2xx, why not)."""
    headers = [(h["name"], h["value"]) for h in probe.get("headers") or []]
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=probe["timeout"]) as c:
            resp = c.request(probe["method"].upper(), "http://service" + probe["url"], headers=headers,
                             content=probe.get("body"))
    except httpx.HTTPError as e:
        return False, f"probe {probe['url']}: {type(e).__name__}: {e}"[:300]
    if 200 <= resp.status_code < 300:
        return True, ""
    return False, f"probe {probe['url']} answered {resp.status_code}"


# --------------------------------------------------------------------------- the routes

def add_routes(app: FastAPI, ctx) -> None:
    clients: dict[str, httpx.AsyncClient] = {}

    def client_for(sock: str) -> httpx.AsyncClient:
        c = clients.get(sock)
        if c is None:
            c = clients[sock] = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), timeout=None)
        return c

    callers = CallerCache()
    limiter = ratelimit.Limiter()  # this process's counts of the services' `rate_limits`

    def target(project: str, name: str, token: str | None, client: str, known: Run | None = None,
               caller: Caller | None = None) -> tuple[Run, str]:
        """The run behind the path and a ready replica's socket, once the caller may reach it. ``known``: the
        running service as the proxy's last look saw it; ``caller``: the token's user, looked up lately."""
        proxy: ServiceProxy | None = ctx.services
        run = known or ctx.store.run(name)
        if run is None or run.project != project or not run.is_service or not run.live:
            raise NotFound(f"no service {name!r} running in project {project!r} (see gpufleet ps)")
        auth = run.spec.get("auth", True)
        if auth and token and caller is None:
            caller = ctx.caller(token, client)
            callers.put(token, caller)
        services.check_access(auth, caller, run.project, run.name)
        if proxy is None:
            raise _NotReady("this server does not proxy services")
        proxy.hit(run.name)  # the request rate `scaling` follows (a request while none is ready counts too)
        sock = proxy.socket_for(run) if run.status == RunStatus.RUNNING else None
        if sock is None:
            ready, total = proxy.status(run)
            raise _NotReady(services.not_ready_message(run.name, ready, total))
        return run, sock

    route = services.PREFIX + "/{project}/{name}/{path:path}"

    # in the schema once (GET: the authorization matrix's row); the other methods are the same route
    @app.api_route(route, methods=[m for m in METHODS if m != "GET"], include_in_schema=False)
    @app.api_route(services.PREFIX + "/{project}/{name}", methods=METHODS, include_in_schema=False)
    @app.api_route(route, methods=["GET"], tags=["services"])
    async def proxy_http(request: Request, project: str, name: str, path: str = ""):
        """A service's endpoint: the request (any method; a WebSocket too) carried to a ready replica of
        run `name` of `project`, with its `auth` (a member's token) and `strip_prefix`; 503 until one is ready."""
        if (over := _over_limit(ctx, limiter, project, name, path, client_of(request), request.headers)) is not None:
            return _too_many(name, over)
        token = bearer(request.headers.get("authorization"))
        try:
            run, sock = await _target(target, ctx, callers, project, name, token, client_of(request))
        except _NotReady as e:
            return JSONResponse({"detail": str(e), "exit_code": 1}, status_code=503, headers={"Retry-After": "1"})
        if router_group(run.spec) is not None and not router.inference_path("/" + path):
            return JSONResponse({"detail": f"service {name} has a router: only its inference paths ("
                                           f"{', '.join(router.INFERENCE_PATHS)}) are served", "exit_code": 1},
                                status_code=403)
        return await carry(request, run, sock, services.upstream_path(project, name, path, request.url.query,
                                                                      bool(run.spec.get("strip_prefix", True))),
                           bool(run.spec.get("auth", True)))

    async def carry(request: Request, run: Run, sock: str, path: str, auth: bool, content: bytes | None = None):
        """``request`` carried to the ready replica of ``run`` behind ``sock``, at ``path`` (and query): its
        headers as services.upstream_headers makes them (``auth``: the service's, its token kept from the
        replica), its body (``content``, else as it streams in); the replica's answer streamed back as it
        comes (502 when the replica does not answer)."""
        headers = services.upstream_headers(list(request.headers.items()), client_of(request), request.url.scheme,
                                            request.headers.get("host", ""), auth)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        tries = RETRIES if request.method in IDEMPOTENT and not has_body and content is None else 1
        for attempt in range(tries):
            client = client_for(sock)
            upstream = client.build_request(request.method, "http://service" + path, headers=headers,
                                            content=content if content is not None else
                                            request.stream() if has_body else None)
            try:
                resp = await client.send(upstream, stream=True)
                break
            except httpx.HTTPError as e:
                # a replica that went away (stopped, its host gone) before answering: not ready until its probe
                # says so; a request without a body that changes nothing is tried on another ready replica
                ctx.services.lost(run, sock, f"{type(e).__name__}: {e}")
                other = ctx.services.socket_for(run) if attempt + 1 < tries else None
                if other is None:
                    return JSONResponse({"detail": f"service {run.name}: its replica did not answer "
                                                   f"({type(e).__name__}: {e})", "exit_code": 1}, status_code=502)
                sock = other
        out = StreamingResponse(_body(resp), status_code=resp.status_code, background=BackgroundTask(resp.aclose))
        out.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                           for k, v in services.response_headers(list(resp.headers.multi_items()))]
        return out

    models_proxy.add_routes(app, ctx, carry, callers)  # /proxy/models/PROJECT/...: the project's models, by name

    @app.websocket(services.PREFIX + "/{project}/{name}/{path:path}")
    async def proxy_ws(websocket: WebSocket, project: str, name: str, path: str = "") -> None:
        token = bearer(websocket.headers.get("authorization"))
        client = websocket.client.host if websocket.client else ""
        if (over := _over_limit(ctx, limiter, project, name, path, client, websocket.headers)) is not None:
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(_too_many(name, over))
            else:
                await websocket.close(1013, over.message(name)[:120])
            return
        try:
            run, sock = await _target(target, ctx, callers, project, name, token, client)
        except _NotReady as e:
            await websocket.close(1013, str(e)[:120])
            return
        await carry_websocket(websocket, run, sock, project, name, path, client)


def _over_limit(ctx, limiter: ratelimit.Limiter, project: str, name: str, path: str, client: str,
                headers) -> ratelimit.Refusal | None:
    """A request over the service's `rate_limits` (counted before `auth`, as dstack's nginx does). Nothing is
    looked up for a service without them."""
    run = ctx.services.known(name) if ctx.services is not None else None
    if run is None or not run.spec.get("rate_limits") or run.project != project:
        return None
    return limiter.check(run.run_id, run.spec["rate_limits"], path, client, headers.getlist, time.monotonic())


def _too_many(name: str, over: ratelimit.Refusal) -> JSONResponse:
    return JSONResponse({"detail": over.message(name), "rate_limit": over.rule.describe(), "exit_code": 1},
                        status_code=429, headers={"Retry-After": str(over.retry_after)})


async def _body(resp: httpx.Response):
    async for chunk in resp.aiter_raw():  # each as it comes (with a chunk size, httpx would gather up to it)
        yield chunk


class _NotReady(Exception):
    pass


CALLER_TTL = 5.0  # seconds a token's user (and roles) is taken as looked up: a revoked token or role works that long


class CallerCache:
    """The users of tokens that reached a service lately (by the token's hash), so that a stream of requests
    does not read the store for each; a bad token is never kept (each one counts as a failed login)."""

    def __init__(self, ttl: float = CALLER_TTL, size: int = 10000):
        self.ttl, self.size = ttl, size
        self._seen: dict[str, tuple[float, Caller]] = {}

    def get(self, token: str | None) -> Caller | None:
        if not token:
            return None
        hit = self._seen.get(token_hash(token))
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def put(self, token: str, caller: Caller) -> None:
        if len(self._seen) >= self.size:
            now = time.monotonic()
            self._seen = {k: v for k, v in self._seen.items() if v[0] > now}
            if len(self._seen) >= self.size:
                self._seen.clear()
        self._seen[token_hash(token)] = (time.monotonic() + self.ttl, caller)


async def _target(target, ctx, callers: CallerCache, project: str, name: str, token: str | None, client: str):
    """``target`` on the event loop when neither the store nor a token needs reading (a service the proxy's
    last look saw running, no token or one seen lately), else on a worker thread."""
    known = ctx.services.known(name) if ctx.services is not None else None
    if known is not None and known.status != RunStatus.RUNNING:
        known = None  # the last look saw it starting (or stopping): the store says what it is now
    caller = callers.get(token)
    if known is not None and (caller is not None or not token or not known.spec.get("auth", True)):
        return target(project, name, token, client, known, caller)
    return await asyncio.to_thread(target, project, name, token, client, known, caller)


async def carry_websocket(websocket: WebSocket, run: Run, sock: str, project: str, name: str, path: str,
                          client: str) -> None:
    """Open the same WebSocket on the replica (through ``sock``), accept the client's with the
    subprotocol the replica chose, and carry frames both ways until either side closes."""
    from websockets.asyncio.client import unix_connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    query = websocket.url.query
    uri = "ws://service" + services.upstream_path(project, name, path, query, bool(run.spec.get("strip_prefix", True)))
    skip = {"host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
    headers = [(k, v) for k, v in services.upstream_headers(list(websocket.headers.items()), client, "ws",
                                                            websocket.headers.get("host", ""),
                                                            bool(run.spec.get("auth", True)))
               if k.lower() not in skip]
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    try:
        upstream = await unix_connect(sock, uri, additional_headers=headers, subprotocols=protocols or None,
                                      open_timeout=30, max_size=None)
    except (OSError, InvalidStatus, TimeoutError) as e:
        await websocket.close(1011, f"service {name}: {e}"[:120])
        return
    await websocket.accept(subprotocol=upstream.subprotocol)

    async def up() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code", 1000))
                return
            await upstream.send(message["bytes"] if message.get("bytes") is not None else message.get("text", ""))

    async def down() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in upstream:
                if isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
                else:
                    await websocket.send_text(frame)
        code = upstream.close_code or 1000
        with contextlib.suppress(Exception):
            await websocket.close(code if code not in (1005, 1006) else 1000, upstream.close_reason or "")

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()

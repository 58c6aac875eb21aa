"""Running `gpufleet server`: the API on uvicorn and the loops beside it, in one process.

A *local* server (started by the CLI when no GPUFLEET_SERVER is set) listens on a free loopback
port, writes where it listens to `<state dir>/server/local.json`, and exits by itself once nothing
has run, waited or asked for `idle_exit` seconds. A server started by hand (or by systemd) listens
where its settings say and never exits on its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time

from gpufleet import __version__, images, paths
from gpufleet.errors import GpufleetError
from gpufleet.server import tokens
from gpufleet.server.settings import ServerSettings
from gpufleet.server.vault import KEY_FILE, Vault
from gpufleet.state import Store

log = logging.getLogger("gpufleet.server")
local_file = tokens.local_file


def serve(settings: ServerSettings, local: bool = False) -> int:
    import uvicorn

    from gpufleet.server.api import Context, create_app
    from gpufleet.server.auth import BOOTSTRAP_ADMIN, token_hash
    from gpufleet.server.control import Controller

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sdir = tokens.server_dir()
    token = tokens.ensure_token(sdir)
    vault = Vault(sdir / KEY_FILE)
    store = Store(settings.database_url) if settings.database_url else Store()
    if store.bootstrap(BOOTSTRAP_ADMIN, token_hash(token)):
        log.info("first start: made user %s (server admin, the state directory's token) and project default",
                 BOOTSTRAP_ADMIN)
    sock = listening_socket(settings.host, 0 if local else settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    started = time.time()

    def fleet_secrets(fleet: str) -> dict[str, str]:
        sealed = store.sealed(fleet=fleet)
        return vault.open(sealed) if sealed else {}

    images.set_server_images(settings.images)  # for fleets without `images` of their own
    controller = Controller(store, settings, vault.open, fleet_secrets, url)
    from gpufleet.server.proxy import ServiceProxy

    service_proxy = ServiceProxy(store)  # services' forwards and probes (gpufleet.server.proxy)
    controller.services = service_proxy  # the leader's replicas loop asks it which replicas are ready
    servers: list = []

    def shutdown() -> None:
        for s in servers:
            s.should_exit = True

    def info() -> dict:
        return {"url": url, "pid": os.getpid(), "version": __version__, "database": store.safe_url,
                "local": local, "started_at": started, "leading": controller.leading, "leader": store.leader(),
                "home": str(paths.home())}

    ctx = Context(store=store, seal=vault.seal, kick=controller.kick, launch=controller.launch,
                  background=controller.background, info=info, shutdown=shutdown,
                  half_life=settings.fair_share_half_life, token_file=sdir / tokens.TOKEN_FILE,
                  upload_limit=settings.upload_limit, metrics_interval=settings.metrics_interval,
                  metrics_raw_retention=settings.metrics_raw_retention, services=service_proxy)
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    servers.append(server)
    controller.start()
    service_proxy.start()
    if local:
        _write_local(url)
        threading.Thread(target=_idle_watch, args=(store, controller, ctx, settings.idle_exit, shutdown),
                         daemon=True, name="gpufleet-idle").start()
    log.info("gpufleet server %s listening on %s (database %s); web console: %s/", __version__, url, store.safe_url,
             url)
    signal.signal(signal.SIGTERM, lambda *_: shutdown())
    try:
        server.run(sockets=[sock])
    finally:
        service_proxy.stop()
        controller.stop()
        if local:
            _remove_local(url)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's TCP socket, bound and listening. Made with proto IPPROTO_TCP, not 0: asyncio sets
    TCP_NODELAY only on the connections of a socket that says it is TCP, and without it each answer on a
    kept-alive connection waited ~40 ms (its last segment held by Nagle until the client's delayed ACK)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GpufleetError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(512)
    return sock


def _write_local(url: str) -> None:
    path = local_file()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "version": __version__}))
    os.replace(tmp, path)


def _remove_local(url: str) -> None:
    path = local_file()
    try:
        if json.loads(path.read_text()).get("url") == url:
            path.unlink()
    except (OSError, ValueError):
        pass


def _idle_watch(store: Store, controller, ctx, idle_exit: float, shutdown) -> None:
    """Exit once no run is waiting or active and nobody asked anything for ``idle_exit`` seconds."""
    if not idle_exit:
        return
    while True:
        time.sleep(min(idle_exit / 4, 5.0))
        try:
            busy = bool(store.runs())
        except Exception:
            busy = True
        last = max(ctx.touched[0], controller.last_activity)
        if busy:
            ctx.touched[0] = time.monotonic()
        elif time.monotonic() - last > idle_exit:
            log.info("idle for %ss with nothing running or waiting: exiting", idle_exit)
            shutdown()
            return

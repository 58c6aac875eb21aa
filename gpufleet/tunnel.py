"""The client half of attaching through the server: local ports whose connections are carried to a
run's ports over the server's WebSocket route (``/api/runs/{name}/tunnel?port=N``), so a user with a
token and no ssh key reaches them. The server half is gpufleet.server.tunnel.

One listening socket per forward (127.0.0.1:LOCAL); per accepted connection, a WebSocket to the
server (the Client's URL, ws:// or wss://, and its token) and two threads pumping bytes, binary
frames: the local side's end of sending is an empty frame (the server closes ssh's stdin), the
server's close ends the local connection. Blocking sockets and a bounded receive queue keep the
buffers bounded. ``websockets`` is imported here only, when attach needs it.
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet.client import Client, ServerGone, _error
from gpufleet.errors import GpufleetError

CHUNK = 65536
OPEN_TIMEOUT = 20.0  # seconds to open the WebSocket (the server checks the token and the run first)


def ws_url(http_url: str, path: str, **query) -> str:
    """The WebSocket URL of ``path`` on the server at ``http_url``: ws:// for http://, wss:// for
    https://, under the URL's own path (a server behind a proxy's prefix)."""
    parts = urllib.parse.urlsplit(http_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise GpufleetError(f"{http_url}: not an http:// or https:// URL")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + path, urllib.parse.urlencode(query), ""))


def open_tunnel(client: Client, name: str, port: int):
    """A WebSocket carrying a connection to port ``port`` of run ``name`` (the remote side), opened
    through the server; refusals raise as the API's errors do (401/403: exit 3, with the server's message)."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    url = ws_url(client.url, f"/api/runs/{urllib.parse.quote(name, safe='')}/tunnel", port=port)
    headers = client.authorization()
    try:
        # entered at once (the handshake happens here whatever the version; closed by the caller)
        return connect(url, additional_headers=headers, open_timeout=OPEN_TIMEOUT, compression=None,
                       max_size=4 * CHUNK, **_supported(connect, max_queue=16, proxy=None)).__enter__()
    except InvalidStatus as e:
        raise _error(e.response.status_code, e.response.body or b"") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
        raise ServerGone(f"cannot open a tunnel through the gpufleet server at {client.url}: {_why(e)}") from None


def _supported(fn, **options) -> dict:
    """The ``options`` this version of websockets takes (``proxy``: 15 and later; http.client, which
    the rest of the CLI uses, does not go through proxies either)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def _why(e: Exception) -> str:
    return str(e) or type(e).__name__


@dataclass
class Forwarder:
    """Listens on 127.0.0.1 for each (local, remote) port of run ``name`` and carries each connection
    through the server. ``say`` hears what happens to connections (a refusal, a failure)."""

    client: Client
    name: str
    forwards: list[tuple[int, int]]
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)
    _listeners: dict[socket.socket, int] = field(default_factory=dict)
    _open: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def listen(self) -> None:
        """Bind every local port (all or none: a port in use is an error a user can act on)."""
        for local, remote in self.forwards:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", local))
            except OSError as e:
                sock.close()
                self.close()
                raise GpufleetError(f"cannot listen on 127.0.0.1:{local}: {e.strerror} (another attach, or "
                                    f"another program, uses it)") from None
            sock.listen(64)
            self._listeners[sock] = remote

    def serve(self) -> None:
        """Accept connections until ``stop()`` (or Ctrl-C, which propagates), each on a thread of its own."""
        with selectors.DefaultSelector() as sel:
            for sock in self._listeners:
                sel.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.5):
                    try:
                        conn, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    remote = self._listeners[key.fileobj]
                    threading.Thread(target=self._carry, args=(conn, remote), daemon=True,
                                     name=f"gpufleet-tunnel-{remote}").start()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop listening and end every open connection (the server then stops its ssh)."""
        self._stop.set()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        with self._lock:
            still = list(self._open)
        for ws, conn in still:
            _quietly(ws.close)
            _quietly(lambda c=conn: c.shutdown(socket.SHUT_RDWR))  # wakes the thread reading it

    def _carry(self, conn: socket.socket, remote: int) -> None:
        try:
            ws = open_tunnel(self.client, self.name, remote)
        except GpufleetError as e:
            self.say(f"connection to {self.name}:{remote} refused: {e}")
            conn.close()
            return
        pair = (ws, conn)
        with self._lock:
            self._open.add(pair)
        try:
            ended = carry(conn, ws)
            if ended:
                self.say(f"connection to {self.name}:{remote} failed: {ended}")
        finally:
            with self._lock:
                self._open.discard(pair)


def carry(conn: socket.socket, ws) -> str | None:
    """Pump bytes between the local connection ``conn`` and the WebSocket ``ws`` until either ends;
    close both. Returns why the server ended it when that was a failure (e.g. ssh could not connect)."""
    from websockets.exceptions import ConnectionClosed

    def upstream() -> None:  # local -> server; an empty frame when the local side is done sending
        try:
            while data := conn.recv(CHUNK):
                ws.send(data)
            ws.send(b"")
        except (OSError, ConnectionClosed):
            pass

    up = threading.Thread(target=upstream, daemon=True, name="gpufleet-tunnel-up")
    up.start()
    why = None
    try:
        while True:  # server -> local
            message = ws.recv()
            conn.sendall(message if isinstance(message, bytes) else message.encode())
    except ConnectionClosed as e:
        if e.rcvd is not None and e.rcvd.code not in (1000, 1001):
            why = e.rcvd.reason or f"closed with code {e.rcvd.code}"
    except OSError:
        pass  # the local side went away
    finally:
        _quietly(lambda: conn.shutdown(socket.SHUT_RDWR))
        _quietly(conn.close)
        _quietly(ws.close)
        up.join(timeout=5)
    return why


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        pass


"""The client half of attaching through the server: local ports whose connections are carried to a
run's ports over the server's WebSocket route (``/api/runs/{name}/tunnel?port=N``), so a user with a
token and no ssh key reaches them. The server half is gpufleet.server.tunnel.

One listening socket per forward (127.0.0.1:LOCAL); per accepted connection, a WebSocket to the
server (the Client's URL, ws:// or wss://, and its token) and two threads pumping bytes, binary
frames: the local side's end of sending is an empty frame (the server closes ssh's stdin), the
server's close ends the local connection. Blocking sockets and a bounded receive queue keep the
buffers bounded. ``websockets`` is imported here only, when attach needs it.

A dev environment's shell (``/api/runs/{name}/shell``): run_shell carries this process's stdin and
stdout over one WebSocket. On a terminal, the terminal is raw while it runs (restored however it
ends) and its size is sent at the start and on every SIGWINCH; on anything else (a pipe, a file), the
bytes alone, and the end of the input is said with an empty frame (a ^D to the shell).
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet.client import Client, ServerGone, _error
from gpufleet.errors import EXIT_FAILED, GpufleetError

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
    return _open(client, f"/api/runs/{urllib.parse.quote(name, safe='')}/tunnel", "a tunnel", port=port)


def open_shell(client: Client, name: str):
    """A WebSocket carrying the terminal of a shell in dev environment ``name`` (run_shell drives it);
    refusals raise as open_tunnel's do."""
    return _open(client, f"/api/runs/{urllib.parse.quote(name, safe='')}/shell", "a shell")


def _open(client: Client, path: str, what: str, **query):
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    url = ws_url(client.url, path, **query)
    headers = client.authorization()
    try:
        # entered at once (the handshake happens here whatever the version; closed by the caller)
        return connect(url, additional_headers=headers, open_timeout=OPEN_TIMEOUT, compression=None,
                       max_size=4 * CHUNK, **_supported(connect, max_queue=16, proxy=None)).__enter__()
    except InvalidStatus as e:
        raise _error(e.response.status_code, e.response.body or b"") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
        raise ServerGone(f"cannot open {what} through the gpufleet server at {client.url}: {_why(e)}") from None


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
        """Bind every local port (all or none: a port in use is an error a user can act on); a local port 0
        (dstack's `*:PORT`) is one the system picks, written back into ``forwards``."""
        bound = []
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
            bound.append((sock.getsockname()[1], remote))
        self.forwards = bound

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


def carry_stdio(ws, stdin: int = 0, stdout: int = 1) -> str | None:
    """``carry`` for this process's stdin and stdout (an ssh ProxyCommand's: `gpufleet ssh-proxy`):
    stdin's bytes to the WebSocket (an empty frame at its end), the WebSocket's to stdout, until the
    server closes it or stdout is gone. Returns why the server ended it when that was a failure."""
    from websockets.exceptions import ConnectionClosed

    def upstream() -> None:
        try:
            while data := os.read(stdin, CHUNK):
                ws.send(data)
            ws.send(b"")
        except (OSError, ConnectionClosed):
            pass

    threading.Thread(target=upstream, daemon=True, name="gpufleet-proxy-up").start()
    why = None
    try:
        while True:
            message = ws.recv()
            _write_all(stdout, message if isinstance(message, bytes) else message.encode())
    except ConnectionClosed as e:
        if e.rcvd is not None and e.rcvd.code not in (1000, 1001):
            why = e.rcvd.reason or f"closed with code {e.rcvd.code}"
    except OSError:
        pass  # ssh went away
    finally:
        _quietly(ws.close)
    return why


def resize_message(rows: int, cols: int) -> str:
    """The text frame that sets the remote terminal's size."""
    import json

    return json.dumps({"resize": [rows, cols]})


def exit_status(reason: str | None) -> int:
    """The shell's exit status in the server's close reason (``exit N``); 0 when it does not say."""
    found = re.fullmatch(r"exit (\d{1,3})", reason or "")
    return int(found[1]) if found else 0


class _Signalled(Exception):
    def __init__(self, signo: int):
        super().__init__(signo)
        self.signo = signo


def run_shell(ws, stdin: int = 0, stdout: int = 1) -> int:
    """Carry ``stdin`` to the shell of ``ws`` (open_shell's) and its terminal's output to ``stdout``
    until the shell ends; its exit status (128+N when this process gets SIGTERM or SIGHUP N)."""
    import signal
    import termios
    import tty

    from websockets.exceptions import ConnectionClosed

    terminal = os.isatty(stdin)
    main = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    resized, stop = threading.Event(), threading.Event()

    def size() -> str:
        columns, lines = os.get_terminal_size(stdin)
        return resize_message(lines, columns)

    def wake() -> None:
        try:
            os.write(wake_w, b"\0")
        except OSError:
            pass  # the pipe is full: a wake-up is already waiting

    def on_winch(signo, frame) -> None:
        resized.set()
        wake()

    def on_end(signo, frame) -> None:
        raise _Signalled(signo)

    def upstream() -> None:  # stdin (and sizes) -> server: the one thread that sends
        try:
            if terminal:
                ws.send(size())
            with selectors.PollSelector() as sel:  # poll: stdin may be a plain file
                sel.register(stdin, selectors.EVENT_READ)
                sel.register(wake_r, selectors.EVENT_READ)
                while not stop.is_set():
                    for key, _ in sel.select():
                        if key.fd == wake_r:
                            os.read(wake_r, 512)
                            if resized.is_set() and not stop.is_set():
                                resized.clear()
                                ws.send(size())
                        elif data := os.read(stdin, CHUNK):
                            ws.send(data)
                        else:  # the end of the input: the shell is told (^D) and reads no more
                            ws.send(b"")
                            sel.unregister(stdin)
        except (OSError, ConnectionClosed):
            pass

    saved = None
    handlers: dict[int, object] = {}
    up = threading.Thread(target=upstream, daemon=True, name="gpufleet-shell-up")
    try:
        for signo in (signal.SIGTERM, signal.SIGHUP) if main else ():
            handlers[signo] = signal.signal(signo, on_end)
        if terminal:
            saved = termios.tcgetattr(stdin)
            if main:
                handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
            tty.setraw(stdin)  # keys go to the shell as they are: ^C is the remote shell's
        up.start()
        while True:
            message = ws.recv()
            _write_all(stdout, message if isinstance(message, bytes) else message.encode())
    except ConnectionClosed as e:
        if e.rcvd is None:
            raise ServerGone("the connection to the gpufleet server was lost") from None
        if e.rcvd.code == 1000:
            return exit_status(e.rcvd.reason)
        raise GpufleetError(e.rcvd.reason or f"the gpufleet server closed the shell (code {e.rcvd.code})") from None
    except _Signalled as e:
        return 128 + e.signo
    except OSError:  # our stdout is gone
        return EXIT_FAILED
    finally:
        stop.set()
        wake()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for signo, handler in handlers.items():
            signal.signal(signo, handler)
        _quietly(ws.close)
        if up.is_alive():
            up.join(timeout=5)
        os.close(wake_r)
        os.close(wake_w)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        pass


"""A run's ports through the server: a WebSocket per TCP connection, so a user with a token and no
ssh key can reach what the run declares (`gpufleet attach` on a machine without the fleet's files).

``/api/runs/{name}/tunnel?port=N`` (token in ``Authorization: Bearer``): the server checks the token
and the run (``authorize``), and that the run declares N (the remote side of ``8080:8000``), before it
accepts; a refusal is the API's own HTTP error (401, 403, 404, 400 for a port the run does not
declare), JSON ``{"detail", "exit_code"}``. Once accepted, the server runs ``ssh -W 127.0.0.1:N``
through the fleet's ssh_config (its jump chain and keys) and pumps bytes both ways, binary frames,
until either side closes. An empty binary frame from the client says its side has no more to send
(a TCP half-close): ssh's stdin is closed and the answer still comes back. When ssh ends, the
WebSocket is closed (1000; 1011 with ssh's last words when it could not connect); when the client
goes, ssh is stopped. ssh is always reaped.

``/api/runs/{name}/shell`` (same token, same check): a shell in the container of a dev environment
(400 for any other run). The server runs ``ssh -tt ALIAS -- RUNTIME exec -it CONTAINER /bin/sh`` on a
pseudo-terminal it opens (24x80 until told otherwise); binary frames carry the terminal's bytes both
ways (an empty one from the client: the end of its input, a ^D to the shell); a text frame
``{"resize": [rows, cols]}`` sets the terminal's size (ssh is told with SIGWINCH). When the shell
ends, the WebSocket is closed with 1000 and the reason ``exit N`` (ssh's status: the shell's, or 255
when ssh failed, its message then printed on the terminal); when the client goes, ssh is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import struct
import termios
from collections.abc import Callable

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from gpufleet import runs
from gpufleet.errors import UsageError
from gpufleet.models import Run
from gpufleet.server.auth import bearer

log = logging.getLogger("gpufleet.server.tunnel")

CHUNK = 65536  # bytes read from ssh at a time: one frame at most; the socket's flow control bounds the rest
STOP_GRACE = 5.0  # seconds ssh has to exit after its stdin is closed or it is sent SIGTERM
REASON_MAX = 120  # a close frame's reason is at most 123 bytes
DEFAULT_SIZE = (24, 80)  # a shell's terminal (rows, columns) until the client says its own
DRAIN = 0.2  # seconds the output of an exited shell may still take to reach its terminal
EOF_CHAR = b"\x04"  # ^D: what the end of a client's input is to the shell (its terminal's VEOF)

Authorize = Callable[[str | None, str, str], Run]  # (token, client host, run name) -> the run, or raises


def add_routes(app: FastAPI, ctx, authorize: Authorize) -> None:
    """The tunnel route on ``app``. ``authorize(token, client_host, name)`` returns the run the caller
    may attach to, or raises the API's errors (Unauthorized, Forbidden, NotFound, GpufleetError);
    raised before the WebSocket is accepted, they answer as any route's errors do."""

    @app.websocket("/api/runs/{name}/tunnel")
    async def tunnel(websocket: WebSocket, name: str) -> None:
        run = await asyncio.to_thread(authorize, bearer(websocket.headers.get("authorization")),
                                      websocket.client.host if websocket.client else "", name)
        port = parse_port(websocket.query_params.get("port"))
        argv = await asyncio.to_thread(runs.tunnel_argv, ctx.store, run, port)
        await websocket.accept()
        log.info("tunnel to %s:%s of run %s opened", run.alias, port, run.name)
        await pump(websocket, argv)

    @app.websocket("/api/runs/{name}/shell")
    async def shell(websocket: WebSocket, name: str) -> None:
        run = await asyncio.to_thread(authorize, bearer(websocket.headers.get("authorization")),
                                      websocket.client.host if websocket.client else "", name)
        argv = await asyncio.to_thread(runs.shell_argv, ctx.store, run)
        await websocket.accept()
        log.info("shell in run %s (container %s on %s) opened", run.name, run.container, run.alias)
        code = await pump_terminal(websocket, argv)
        log.info("shell in run %s closed (%s)", run.name,
                 "its client left" if code is None else f"exit {code}")


def parse_port(text: str | None) -> int:
    if text is None or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"the tunnel needs ?port=N, a port from 1 to 65535 (got {text!r})")
    return int(text)


async def pump(websocket: WebSocket, argv: list[str]) -> None:
    """Run ``argv`` and carry its stdin and stdout over the accepted ``websocket`` until either ends;
    then close the other. ssh is reaped whatever happens (the client leaving, the server stopping)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stderr = bytearray()
    sent = 0

    async def upstream() -> None:  # the client's bytes to ssh; an empty frame: no more from the client
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if not data:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                continue
            if proc.stdin.is_closing():
                continue
            try:
                proc.stdin.write(data)
                await proc.stdin.drain()  # bounded: waits while ssh has not taken what it was given
            except (ConnectionError, OSError):
                return  # ssh is gone; downstream sees its end

    async def downstream() -> None:  # ssh's bytes to the client
        nonlocal sent
        while chunk := await proc.stdout.read(CHUNK):
            await websocket.send_bytes(chunk)
            sent += len(chunk)

    async def errors() -> None:  # what ssh says, kept short: the reason when it could not connect
        while chunk := await proc.stderr.read(4096):
            stderr.extend(chunk)
            del stderr[:-2048]

    reader = asyncio.create_task(errors())
    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        if await _downstream_ended(up, down, "tunnel"):  # ssh closed its side: tell the client how it ended
            code = await _reap(proc, STOP_GRACE)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), STOP_GRACE)
            why = _last_line(stderr)
            await _close(websocket, *((1011, why) if code != 0 and sent == 0 and why else (1000, "")))
    finally:  # the client left, or the server stops (a cancellation): stop ssh now
        await _stop(websocket, proc, up, down, reader)


def parse_resize(text: str) -> tuple[int, int] | None:
    """The (rows, columns) of a client's ``{"resize": [rows, cols]}`` text frame; None for anything else
    (ignored: a client of another version)."""
    try:
        message = json.loads(text)
    except ValueError:
        return None
    size = message.get("resize") if isinstance(message, dict) else None
    if not isinstance(size, list) or len(size) != 2 or \
            not all(type(n) is int and 1 <= n <= 0xFFFF for n in size):
        return None
    return size[0], size[1]


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal ``fd`` (either side of a pseudo-terminal)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def pump_terminal(websocket: WebSocket, argv: list[str]) -> int | None:
    """Run ``argv`` on a pseudo-terminal and carry the terminal's bytes over the accepted ``websocket``
    until the command ends (closed with 1000, ``exit N``) or the client goes (the command is stopped).
    Returns the command's exit status (None when the client left first). Always reaped; bounded: a
    frame is read from the client only once the terminal took the last one, the terminal only once
    its last chunk was sent."""
    loop = asyncio.get_running_loop()
    master, slave = os.openpty()
    try:
        set_size(master, *DEFAULT_SIZE)
        # no echo here: the remote terminal echoes (ssh copies these modes to it, and sets this one raw;
        # what a client sends before that, a script's lines, would be echoed twice)
        modes = termios.tcgetattr(slave)
        modes[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, modes)
        # its own session: no signal of the server's terminal reaches it; SIGWINCH is sent to it by hand
        proc = await asyncio.create_subprocess_exec(*argv, stdin=slave, stdout=slave, stderr=slave,
                                                    start_new_session=True)
    except OSError as e:
        os.close(master)
        log.warning("shell: cannot run %s: %s", argv[0], e.strerror)
        await _close(websocket, 1011, f"the server cannot run {argv[0]}: {e.strerror}")
        return None
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    exited = asyncio.ensure_future(proc.wait())

    async def ready(writing: bool = False) -> None:
        done = loop.create_future()
        (loop.add_writer if writing else loop.add_reader)(master, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            (loop.remove_writer if writing else loop.remove_reader)(master)

    async def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(master, view):]
            except BlockingIOError:
                await ready(writing=True)  # the terminal is full: the client waits

    async def upstream() -> None:  # the client's keys (and sizes) to the terminal
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                size = parse_resize(message["text"])
                if size is not None:
                    set_size(master, *size)
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGWINCH)  # no controlling terminal: ssh is told by hand
                continue
            try:
                await write(message.get("bytes") or EOF_CHAR)
            except OSError:
                pass  # the terminal is gone (the shell ended): downstream sees its end

    def read() -> bytes | None:  # what the terminal has now; None: nothing now; b"": nothing ever
        try:
            return os.read(master, CHUNK)
        except BlockingIOError:
            return None
        except OSError:  # EIO: no process holds the terminal any more
            return b""

    async def downstream() -> None:  # the terminal's output to the client, to its end once ssh exited
        while True:
            draining = exited.done()
            waiting = asyncio.ensure_future(ready())
            try:
                await asyncio.wait({waiting} if draining else {waiting, exited}, timeout=DRAIN if draining else None,
                                   return_when=asyncio.FIRST_COMPLETED)
                quiet = draining and not waiting.done()
            finally:
                waiting.cancel()
            chunk = read()
            if chunk:
                await websocket.send_bytes(chunk)
            elif chunk == b"" or quiet:
                return  # no process holds the terminal, or ssh exited and nothing more came for DRAIN

    up = asyncio.create_task(upstream())
    down = asyncio.create_task(downstream())
    try:
        if await _downstream_ended(up, down, "shell"):  # the shell ended and all it printed was sent
            code = await _reap(proc, STOP_GRACE)
            await _close(websocket, 1000, f"exit {code if code >= 0 else 128 - code}")
            return code
        return None
    finally:  # the client left, or the server stops (a cancellation): stop ssh now
        try:
            await _stop(websocket, proc, up, down, exited)
        finally:
            os.close(master)


async def _downstream_ended(up: asyncio.Task, down: asyncio.Task, what: str) -> bool:
    """Wait for the first of ``up`` (client -> ssh) and ``down`` (ssh -> client) to end; whether it was
    ``down``, without an error (ssh's side ended). Errors other than a side going away are logged."""
    done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        exc = task.exception()
        if exc is not None and not isinstance(exc, (WebSocketDisconnect, ConnectionError, OSError, RuntimeError)):
            log.warning("%s: %s: %s", what, type(exc).__name__, exc)
    return down in done and down.exception() is None


async def _stop(websocket: WebSocket, proc: asyncio.subprocess.Process, *tasks: asyncio.Future) -> None:
    """End ``tasks``, stop and reap ``proc`` now, and close ``websocket`` if it is still open (1001)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _reap(proc, 0)
    if websocket.application_state == WebSocketState.CONNECTED:
        await _close(websocket, 1001, "")


async def _reap(proc: asyncio.subprocess.Process, patience: float) -> int:
    """Wait up to ``patience`` seconds for ``proc`` to exit (its stdin closed), then SIGTERM it, then
    SIGKILL it, and reap it; its exit code."""
    if proc.stdin and not proc.stdin.is_closing():
        proc.stdin.close()
    for wait, signal_it in ((patience, None), (STOP_GRACE, proc.terminate), (None, proc.kill)):
        if proc.returncode is not None:
            break
        if signal_it is not None:
            with contextlib.suppress(ProcessLookupError):
                signal_it()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), wait)
    return proc.returncode


def _last_line(stderr: bytes) -> str:
    lines = [x.strip() for x in bytes(stderr).decode(errors="replace").splitlines() if x.strip()]
    return lines[-1][:REASON_MAX] if lines else ""


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.close(code, reason.encode()[:REASON_MAX].decode(errors="ignore"))

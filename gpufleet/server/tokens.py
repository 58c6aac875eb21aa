"""The API token of a server's state directory, and the private files it and the secret key live in.

A client on the same machine reads the token from the state directory (file permissions are the
access control), so the file is created 0600 and a looser one is refused rather than trusted. Two
servers (or a server and a client) starting at once must end with one token: the file is written in
full under a temporary name and then hard-linked to its name, which fails if the other got there
first. Nobody ever reads a half-written token, and the loser reads the winner's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from gpufleet import paths
from gpufleet.errors import GpufleetError

TOKEN_FILE = "token"
MAX_PRIVATE_BYTES = 4096  # a token or a key is under 100 bytes; more means the wrong file
REMAKE = "remove it and restart the server to make a new one"


def server_dir(home: Path | None = None) -> Path:
    """The server's folder in the state directory (``home``, else $GPUFLEET_HOME or ~/.gpufleet), 0700."""
    return paths.ensure_private_dir((home or paths.home()) / "server")


def ensure_token(dir: Path) -> str:
    """The token in ``dir``, made now if there is none yet."""
    return write_once(dir / TOKEN_FILE, lambda: secrets.token_urlsafe(32), "API token")


def read_token(dir: Path) -> str | None:
    """The token in ``dir``, or None when no server has made one yet."""
    return read_private(dir / TOKEN_FILE, "API token")


def read_private(path: Path, what: str, remake: str = REMAKE) -> str | None:
    """The text of a private file (its trailing newline dropped), None if it does not exist. A file
    other users may open, or not a plain file, or not holding one word, is an error saying what to do
    (``remake``: how to get a good one)."""
    raw = paths.read_private_file(path, what, remake, MAX_PRIVATE_BYTES)
    if raw is None:
        return None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or len(raw) > MAX_PRIVATE_BYTES or any(c.isspace() for c in text):
        raise GpufleetError(f"the {what} file {path} does not hold one {what}: {remake}")
    return text


def write_once(path: Path, make: Callable[[], str], what: str, remake: str = REMAKE) -> str:
    """The private file's text; if there is no file yet, ``make()``'s text, written to it 0600. Safe
    when several processes call it at once: all of them return the same text."""
    existing = read_private(path, what, remake)
    if existing is not None:
        return existing
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (make() + "\n").encode("ascii"))
            os.fsync(fd)  # on disk before it has its name: a crash never leaves an empty file behind
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a file: the first process to get here wins
        except FileExistsError:
            pass
        else:
            _fsync_dir(path.parent)  # the name survives a crash too, or a key in use could be lost
    except OSError as e:
        raise GpufleetError(f"cannot write the {what} file {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    text = read_private(path, what, remake)
    if text is None:  # the winner's file was removed in between: someone else's doing
        raise GpufleetError(f"the {what} file {path} was removed while it was being made: try again")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCAL_FILE = "local.json"


def local_file(home: Path | None = None) -> Path:
    """Where this state directory's local server says where it listens ({"url", "pid", "version"})."""
    return server_dir(home) / LOCAL_FILE

"""Checks on SSH identity files, done before any connection is attempted."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

_PUBLIC_PREFIXES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-")


def check_private_key(path: Path) -> str | None:
    """Return why ``path`` cannot be used as an ssh identity file, or None if it can."""
    try:
        if not path.exists():
            return f"identity file {path} does not exist"
        if not path.is_file():
            return f"identity file {path} is not a regular file"
        with path.open("rb") as f:
            text = f.read(65536).decode("ascii", errors="replace")
    except OSError as e:  # e.g. a name too long, a folder that is not searchable
        return f"cannot read identity file {path}: {e.strerror}"
    head = text.lstrip()
    if head.startswith(_PUBLIC_PREFIXES) or "PUBLIC KEY-----" in head[:100]:
        hint = f" (use {path.with_suffix('')})" if path.suffix == ".pub" else ""
        return f"{path} is a public key; identity_file needs the private key{hint}"
    encrypted = False
    if "-----BEGIN OPENSSH PRIVATE KEY-----" in head:
        encrypted = _openssh_key_encrypted(head)
        if encrypted is None:
            return f"{path} is not a readable OpenSSH private key"
    elif "PRIVATE KEY-----" in head:
        encrypted = "ENCRYPTED" in head[:400]
    else:
        return f"{path} does not look like an SSH private key"
    if encrypted and not os.environ.get("SSH_AUTH_SOCK"):
        return (f"{path} is protected by a passphrase and no ssh-agent is running: "
                f"start one (eval $(ssh-agent)) and add the key (ssh-add {path})")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}) and ssh will refuse it: "
                f"chmod 600 {path}")
    return None


def _openssh_key_encrypted(text: str) -> bool | None:
    body = text.split("-----BEGIN OPENSSH PRIVATE KEY-----", 1)[1].split("-----END", 1)[0]
    try:
        blob = base64.b64decode("".join(body.split()), validate=False)
    except ValueError:
        return None
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic) or len(blob) < len(magic) + 4:
        return None
    n = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
    cipher = blob[len(magic) + 4:len(magic) + 4 + n]
    return cipher != b"none"

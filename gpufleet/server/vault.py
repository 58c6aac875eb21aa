"""The secrets of waiting runs, encrypted at rest.

A run's secrets are read from the submitter's environment once; a run that waits for GPUs must keep
them until it starts, and the database (perhaps a shared PostgreSQL, perhaps backed up) must not
hold them in the clear. They are sealed with Fernet (AES-CBC with an HMAC) under a key kept beside
the API token, 0600, made on first use. A sealed value made under another key (the key file was
removed or replaced) cannot be opened: the run has to be submitted again, and the error says so
without ever showing a secret.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from gpufleet.errors import GpufleetError
from gpufleet.server.tokens import write_once

KEY_FILE = "secret.key"
_REMAKE = ("remove it and restart the server to make a new one (runs waiting with secrets must then be "
           "submitted again)")


class VaultError(GpufleetError):
    """Sealed secrets that cannot be opened with the server's key."""


class Vault:
    """Seals a run's secrets into a string for a database column, and opens them again."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        key = write_once(key_file, lambda: Fernet.generate_key().decode("ascii"), "secret key", _REMAKE)
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise GpufleetError(f"the secret key file {key_file} does not hold a Fernet key: {_REMAKE}") from None

    def __repr__(self) -> str:
        return f"Vault({str(self.key_file)!r})"

    def seal(self, values: dict[str, str]) -> str:
        """``values`` (name: secret) encrypted and authenticated, as text."""
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
            raise TypeError("secrets are names and values, both text")
        return self._fernet.encrypt(json.dumps(values).encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> dict[str, str]:
        """The secrets ``seal`` made ``sealed`` from; VaultError if this server's key did not make it."""
        try:
            values = json.loads(self._fernet.decrypt(sealed).decode("utf-8"))
        except (InvalidToken, TypeError, ValueError):
            values = None
        if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in values.items()):
            raise VaultError(f"the secrets of this run cannot be decrypted with the server's secret key "
                             f"({self.key_file}): the key was changed since the run was submitted (or the "
                             f"stored secrets are damaged); submit the run again")
        return values

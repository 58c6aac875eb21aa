"""Turn ssh's error output into a cause a user can act on, naming the hop that failed."""

from __future__ import annotations

import re

_NOISE = re.compile(r"^(Warning: Permanently added|Failed to connect to the host via ssh: )", re.M)


def explain(raw: str, host: str, known_hosts: str | None = None) -> str:
    text = _NOISE.sub("", raw or "").strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        hint = f" in {known_hosts}" if known_hosts else ""
        return (f"host key of {host} does not match the one recorded{hint}: refusing to connect "
                f"(if the host was reinstalled, remove its old key with ssh-keygen -R and re-apply)")
    if "Permission denied" in text:
        m = re.search(r"Permission denied \([^)]*\)", text)
        return f"{host} refused the login ({m.group(0) if m else 'Permission denied'}): check user and identity_file"
    for pattern in ("Connection timed out", "Connection refused", "No route to host", "Network is unreachable",
                    "Could not resolve hostname", "Connection closed by", "Connection reset",
                    "kex_exchange_identification"):
        if pattern in text:
            line = next((ln for ln in text.splitlines() if pattern in ln), pattern)
            return f"{host}: {line.strip()}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{host}: {lines[-1].strip() if lines else 'connection failed'}"

"""Turn ssh's error output into a cause a user can act on, naming the hop that failed."""

from __future__ import annotations

import re

_NOISE = re.compile(r"^(Task failed: )?(Warning: Permanently added.*|Failed to connect to the host via ssh: )", re.M)


def hides_cause(raw: str) -> bool:
    """True for the messages ssh prints when a multiplexed jump host could not reach the target:
    the real reason went to the master connection's log."""
    return "kex_exchange_identification" in raw or "UNKNOWN port 65535" in raw


def explain(raw: str, host: str, known_hosts: str | None = None) -> str:
    text = _NOISE.sub("", raw or "").strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        where = f" in {known_hosts}" if known_hosts else ""
        return (f"host key of {host} changed since it was recorded{where}: refused "
                f"(if the host was reinstalled: ssh-keygen -R HOST -f KNOWN_HOSTS, then re-apply)")
    if "Permission denied" in text:
        m = re.search(r"Permission denied \([^)]*\)", text)
        return f"login refused by {host} ({m.group(0) if m else 'Permission denied'}): check user and identity_file"
    m = re.search(r"open failed: (?:connect failed: )?(.*)", text)
    if m:  # the login node could not open the connection to the target
        return f"the login node cannot reach it: {m.group(1).strip()}"
    for pattern in ("Connection timed out", "Connection refused", "No route to host", "Network is unreachable",
                    "Could not resolve hostname", "Connection closed by", "Connection reset",
                    "kex_exchange_identification"):
        if pattern in text:
            line = next((ln for ln in text.splitlines() if pattern in ln), pattern)
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "connection failed"

"""Turn ssh's error output into a cause a user can act on, naming the hop that failed."""

from __future__ import annotations

import re
import shlex

_NOISE = re.compile(r"^(Task failed: )?(Warning: Permanently added.*|Failed to connect to the host via ssh: )", re.M)


def hides_cause(raw: str) -> bool:
    """True for the messages ssh prints when a multiplexed jump host could not reach the target:
    the real reason went to the master connection's log."""
    return "kex_exchange_identification" in raw or "UNKNOWN port 65535" in raw


def known_hosts_name(host: str) -> str:
    """How known_hosts names ``host`` ("HOST:PORT"): the bare host on port 22, else [HOST]:PORT."""
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        return host
    name = name.strip("[]")
    return name if port == "22" else f"[{name}]:{port}"


def explain(raw: str, host: str, known_hosts: str | None = None, via: str = "the login node",
            check: str = "user and identity_file") -> str:
    """The cause in ssh's output ``raw`` for a connection to ``host`` ("HOST:PORT"). ``via`` names the
    hop the connection went through (it is who "cannot reach" the host); ``check`` names the
    settings a refused login points at."""
    text = _NOISE.sub("", raw or "").strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        where = f" in {known_hosts}" if known_hosts else ""
        fix = (f"ssh-keygen -R {shlex.quote(known_hosts_name(host))} -f {shlex.quote(known_hosts)}" if known_hosts
               else "ssh-keygen -R HOST -f KNOWN_HOSTS")
        return (f"host key of {host} changed since it was recorded{where}: refused "
                f"(if the host was reinstalled: {fix}, then re-apply)")
    if "Permission denied" in text:
        m = re.search(r"Permission denied \([^)]*\)", text)
        return f"login refused by {host} ({m.group(0) if m else 'Permission denied'}): check {check}"
    m = re.search(r"open failed: (?:connect failed: )?(.*)", text)
    if m:  # the hop before could not open the connection to the host
        return f"{via} cannot reach it: {m.group(1).strip()}"
    for pattern in ("Connection timed out", "Connection refused", "No route to host", "Network is unreachable",
                    "Could not resolve hostname", "Connection closed by", "Connection reset",
                    "kex_exchange_identification"):
        if pattern in text:
            line = next((ln for ln in text.splitlines() if pattern in ln), pattern)
            return line.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "connection failed"

"""A service's endpoint on the server, the decisions alone (pure functions): its URL, the path and
headers a replica sees, who may call it, and when a replica is ready (its probes' state machine).

gpufleet.server.proxy carries the requests (a pooled ssh forward per replica, an HTTP client on it)
and runs the probes; it asks this module what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from gpufleet.errors import Unauthorized

PREFIX = "/proxy/services"
TOKEN_PREFIX = "gft_"  # a gpufleet token (gpufleet.server.auth.TOKEN_PREFIX): never passed to a replica

# RFC 9110 7.6.1: headers of one connection, never forwarded by a proxy (plus those a Connection header names)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})


def prefix(project: str, run: str) -> str:
    """The path under which the server serves service ``run`` of ``project`` (no trailing slash)."""
    return f"{PREFIX}/{quote(project, safe='')}/{quote(run, safe='')}"


def service_url(server: str, project: str, run: str) -> str:
    """The URL of a service on the server at ``server`` (e.g. http://host:8080)."""
    return f"{server.rstrip('/')}{prefix(project, run)}/"


def upstream_path(project: str, run: str, path: str, query: str, strip_prefix: bool) -> str:
    """The path (and query) a replica sees for ``/proxy/services/PROJECT/RUN/PATH?QUERY``: ``/PATH`` with
    dstack's `strip_prefix` (the default), else the whole path as the client sent it."""
    rest = "/" + path.lstrip("/")
    full = rest if strip_prefix else prefix(project, run) + rest
    return full + (f"?{query}" if query else "")


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The headers a Connection header names (hop-by-hop as well)."""
    return {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",") if t.strip()}


def upstream_headers(headers: list[tuple[str, str]], client: str, scheme: str, host: str,
                     auth: bool) -> list[tuple[str, str]]:
    """The headers a replica gets for a client's request: without hop-by-hop ones, without the
    client's gpufleet token (its `Authorization` when the service has `auth`, or any bearing a gpufleet
    token), with X-Forwarded-For (the client appended; uvicorn already took it from the header when the
    request came through a proxy it trusts, loopback by default), X-Forwarded-Proto and X-Forwarded-Host."""
    drop = HOP_BY_HOP | _connection_named(headers) | {"x-forwarded-proto", "x-forwarded-host"}
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    for k, v in headers:
        lower = k.lower()
        if lower in drop:
            continue
        if lower == "authorization" and (auth or _is_gpufleet_token(v)):
            continue
        if lower == "x-forwarded-for":
            forwarded_for.append(v)
            continue
        out.append((k, v))
    chain = [a.strip() for v in forwarded_for for a in v.split(",") if a.strip()]
    if client and (not chain or chain[-1] != client):  # a trusted proxy's client is already the chain's last
        chain.append(client)
    if chain:
        out.append(("X-Forwarded-For", ", ".join(chain)))
    out.append(("X-Forwarded-Proto", scheme))
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def _is_gpufleet_token(value: str) -> bool:
    scheme, _, token = value.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip().startswith(TOKEN_PREFIX)


def response_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A replica's response headers as the client gets them: without hop-by-hop ones (the server
    frames the body itself: chunked when the replica gave no length)."""
    drop = HOP_BY_HOP | _connection_named(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


def check_access(auth: bool, caller, project: str, run: str) -> None:
    """Whether a request may reach service ``run`` of ``project``: with `auth`, ``caller`` (a
    gpufleet.server.auth.Caller, None when the request had no token) must be a member of the project
    (or a server admin): Unauthorized (401) without a token, Forbidden (403) saying what is missing."""
    if not auth:
        return
    if caller is None:
        raise Unauthorized(f"service {run} needs a gpufleet token of a member of project {project} "
                           "(Authorization: Bearer ...), or `auth: false` in its configuration")
    caller.need_member(project, f"service {run}")


# --------------------------------------------------------------------------- readiness

@dataclass(frozen=True)
class ProbeState:
    """One probe of one replica: its successes in a row, and when it last ended (monotonic seconds)."""

    streak: int = 0
    last_end: float | None = None
    last_error: str = ""


def probe_due(state: ProbeState, now: float, interval: float, ready_after: int, until_ready: bool) -> bool:
    """Whether a probe runs now: its first time, or `interval` after the last ended; never again once
    it reached `ready_after` when `until_ready`."""
    if until_ready and state.streak >= ready_after:
        return False
    return state.last_end is None or now - state.last_end >= interval


def probe_step(state: ProbeState, ok: bool, now: float, error: str = "") -> ProbeState:
    """The state after a probe that succeeded (``ok``: a 2xx) or failed (``error``: why)."""
    return replace(state, streak=state.streak + 1 if ok else 0, last_end=now, last_error="" if ok else error)


def replica_ready(states: list[ProbeState], ready_afters: list[int]) -> bool:
    """A replica is ready when each of its probes succeeded `ready_after` times in a row."""
    return all(s.streak >= n for s, n in zip(states, ready_afters, strict=True))


@dataclass
class Replica:
    """What the server knows of one replica of a service: where its port is, its probes, readiness."""

    run_id: str
    alias: str
    port: int  # the container's port (the service's `port`)
    host_port: int | None = None  # where it is published on the host's 127.0.0.1
    name: str = ""  # the replica's run
    group: str = ""  # its replica group
    draining: bool = False  # about to be stopped: gets no new request
    probes: list[ProbeState] = field(default_factory=list)
    ready: bool = False
    why: str = "not probed yet"


def not_ready_message(run: str, ready: int, total: int) -> str:
    return f"service {run} is not ready yet ({ready}/{total} replicas ready)"

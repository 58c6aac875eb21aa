"""A service's router (dstack's `router: {type: sglang}` replica group): its workers told to it.

A service with a router group runs SGLang's router in that group's one replica and model servers in the
other groups' replicas (prefill, decode or regular workers). Every replica runs on its host's network
(`group_specs`), one per host, so the router reaches a worker at ``http://<its host's cluster address>:<port>``.
The server's endpoint sends the service's traffic to the router's replica only (its inference paths,
INFERENCE_PATHS; anything else is refused 403, as dstack's proxy does).

`sync` (a pass of the leader, after the replicas' own): for each such service whose router replica runs,
the router's ``GET /workers`` is compared with the workers the service has now: each running worker replica
whose ``GET /server_info`` says `status: ready` is one, its `worker_type` from `disaggregation_mode`
(`prefill`, with `disaggregation_bootstrap_port` as `bootstrap_port`; `decode`; else `regular`). A new one is
added (``POST /workers`` {url, worker_type, connection_mode: http, runtime_type: sglang[, bootstrap_port]},
202 {status: accepted}), one gone is removed (``DELETE /workers/{id}``). These are the shapes of SGLang's router
(its model gateway) as dstack's server uses them. The router and the workers are reached through the service
proxy's forwards (the fleet's jump chain), as the endpoint reaches them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from gpufleet.errors import GpufleetError
from gpufleet.models import Run, RunStatus
from gpufleet.models.run import router_group

log = logging.getLogger("gpufleet.router")

# the paths of a router service's endpoint that are served (dstack's: its in-replica router's inference API);
# one ending in / is a prefix
INFERENCE_PATHS = ("/generate", "/v1/", "/chat/completions")
TIMEOUT = 10.0  # seconds for one request to the router or a worker
MAX_BODY = 2 * 1024 * 1024  # bytes of an answer read at most


def inference_path(path: str) -> bool:
    """Whether ``path`` (of a router service's endpoint, after its prefix) is one its router serves."""
    return any(path.startswith(p) if p.endswith("/") else path == p for p in INFERENCE_PATHS)


def normal_url(url: str) -> str:
    """A worker's URL as compared with the router's list: no surrounding blanks, no trailing slash."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme, parts.netloc, (parts.path or "").rstrip("/"), parts.query, parts.fragment))


def worker_of(url: str, info: object) -> dict | None:
    """The worker to register for a replica at ``url`` whose GET /server_info answered ``info`` (None: not ready)."""
    if not isinstance(info, dict) or info.get("status") != "ready":
        return None
    mode = info.get("disaggregation_mode")
    kind = mode if mode in ("prefill", "decode") else "regular"
    worker = {"url": url, "worker_type": kind, "connection_mode": "http", "runtime_type": "sglang"}
    port = info.get("disaggregation_bootstrap_port")
    if kind == "prefill" and isinstance(port, int) and not isinstance(port, bool):
        worker["bootstrap_port"] = port
    return worker


def plan(current: list, wanted: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """What to tell a router that lists ``current`` (its GET /workers `workers`) for it to have the workers
    ``wanted``: (workers to add, (id, url) of workers to remove). A listed worker without an id cannot be removed
    and is left out (logged)."""
    have: dict[str, str | None] = {}
    for w in current:
        if isinstance(w, dict) and isinstance(w.get("url"), str) and w["url"]:
            wid = w.get("id")
            have[normal_url(w["url"])] = wid if isinstance(wid, str) and wid else None
    want = {normal_url(w["url"]): w for w in wanted}
    add = [want[u] for u in sorted(set(want) - set(have))]
    remove = []
    for u in sorted(set(have) - set(want)):
        if have[u] is None:
            log.warning("router: worker %s is listed without an id: it cannot be removed", u)
        else:
            remove.append((have[u], u))
    return add, remove


@dataclass
class Memory:
    """What the leader keeps between passes: the cluster address of each (fleet, host) looked up."""

    addresses: dict[tuple[str, str], str] = field(default_factory=dict)


def _json(sock: str, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = (200,)) -> object:
    """``method path`` through forward ``sock``: its JSON answer (None: another status, or not JSON)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=TIMEOUT) as c:
        with c.stream(method, "http://router" + path, json=body) as resp:
            if resp.status_code not in ok:
                log.info("router: %s %s answered %s", method, path, resp.status_code)
                return None
            raw = b""
            for chunk in resp.iter_bytes():
                raw += chunk
                if len(raw) > MAX_BODY:
                    log.warning("router: %s %s answered more than %d bytes", method, path, MAX_BODY)
                    return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _look_up(memory: Memory, store, runs: list[Run], addresses_of) -> None:
    """The cluster addresses of the hosts of ``runs`` not known yet, looked up at once (one playbook a fleet)."""
    missing: dict[str, list[str]] = {}
    for r in runs:
        if r.fleet and r.alias and (r.fleet, r.alias) not in memory.addresses:
            missing.setdefault(r.fleet, [])
            if r.alias not in missing[r.fleet]:
                missing[r.fleet].append(r.alias)
    for fleet, aliases in missing.items():
        try:
            found = addresses_of(store, fleet, aliases)
        except GpufleetError as e:
            log.warning("router: cannot tell the cluster address of %s: %s", ", ".join(aliases), e)
            continue
        memory.addresses.update({(fleet, a): address for a, address in zip(aliases, found, strict=True)})


def _wanted(store, s: Run, workers: list[Run], socket_of, memory: Memory, addresses_of) -> list[dict]:
    """The workers a router of service ``s`` should list: its running ``workers`` whose GET /server_info says ready."""
    reached = [(w, sock) for w in workers if (sock := socket_of(s.name, w.name)) is not None]
    _look_up(memory, store, [w for w, _ in reached], addresses_of)
    wanted = []
    for w, sock in reached:
        address = memory.addresses.get((w.fleet or "", w.alias or ""))
        if address is None:
            continue
        try:
            info = _json(sock, "GET", "/server_info")
        except httpx.HTTPError as e:
            log.info("service %s: worker %s does not answer /server_info: %s", s.name, w.name, e)
            continue
        worker = worker_of(f"http://{address}:{int(w.spec['port'])}", info)
        if worker is not None:
            wanted.append(worker)
    return wanted


def _tell(s: Run, replica: str, sock: str, wanted) -> None:
    """Router replica ``replica`` of service ``s`` (reached at ``sock``) told the workers ``wanted()`` gives."""
    try:
        listed = _json(sock, "GET", "/workers")
    except httpx.HTTPError as e:
        log.info("service %s: its router %s does not answer yet: %s", s.name, replica, e)
        return
    current = listed.get("workers") if isinstance(listed, dict) else None
    if not isinstance(current, list):
        return
    add, remove = plan(current, wanted())
    for worker in add:
        try:
            said = _json(sock, "POST", "/workers", worker, ok=(202,))
        except httpx.HTTPError as e:
            said = str(e)
        ok = isinstance(said, dict) and said.get("status") == "accepted"
        log.log(logging.INFO if ok else logging.WARNING, "service %s: router %s %s worker %s (%s)%s", s.name, replica,
                "added" if ok else "did not add", worker["url"], worker["worker_type"], "" if ok else f": {said}")
    for wid, url in remove:
        try:
            said = _json(sock, "DELETE", f"/workers/{quote(wid, safe='')}", ok=(202,))
        except httpx.HTTPError as e:
            said = str(e)
        ok = isinstance(said, dict) and said.get("status") == "accepted"
        log.log(logging.INFO if ok else logging.WARNING, "service %s: router %s %s worker %s%s", s.name, replica,
                "removed" if ok else "did not remove", url, "" if ok else f": {said}")


def sync(store, socket_of, memory: Memory, addresses_of) -> None:
    """One pass: every running router replica of a live service told its service's ready workers (a rolling
    update of the router group runs two for a while). ``socket_of(service, replica)``: the proxy's forward to a
    replica (None: none open); ``addresses_of(store, fleet, aliases)``: the hosts' cluster addresses
    (gpufleet.launch.node_addresses)."""
    live = store.runs()
    for s in (r for r in live if r.is_service and r.live and router_group(r.spec) is not None):
        group = router_group(s.spec)
        mine = [r for r in live if r.replica_of == s.name and r.status == RunStatus.RUNNING]
        found: list[list[dict]] = []

        def wanted(s=s, group=group, mine=mine, found=found) -> list[dict]:  # looked up once, for the first router
            if not found:
                found.append(_wanted(store, s, [r for r in mine if r.replica_group != group], socket_of, memory,
                                     addresses_of))
            return found[0]

        for r in (r for r in mine if r.replica_group == group):
            sock = socket_of(s.name, r.name)
            if sock is not None:
                _tell(s, r.name, sock, wanted)

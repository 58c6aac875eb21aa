"""A service's replicas.

A service is a run of its own that holds no blocks: its row says how many replicas it wants now
(`replicas`) and keeps the service's spec and sealed secrets. Each replica is a run named
``SERVICE.N`` (`replica_of`: the service) with the service's spec: placed by the scheduler through
the queue, started, watched, stopped and logged as any run. The server's leader keeps them
(gpufleet.server.control): `decide` (pure) says what to do from the service, its live replicas,
which of them are ready (the service proxy's probes) and the request rate its endpoint carried;
`keep` does it:

- fewer live replicas of the current spec than wanted: new ones are queued; more: the newest (not
  ready first) are stopped. A replica that ends (failed, stopped by hand, its host gone) is replaced.
- a changed service (`gpufleet apply` of a live service with another spec) is rolled out one
  replica at a time: one new replica more than wanted is started, and an old one is stopped only
  once a new one is ready, so the ready count never drops below what it was (rolling update).
- `scaling` (metric rps): the wanted count follows ceil(rps / target) within the `replicas` range,
  waiting scale_up_delay / scale_down_delay after the last change (dstack's rule; from zero
  replicas a request scales up at once).
- replicas that fail before ever being ready FAIL_LIMIT times in a row end the service failed
  (a bad image or command does not loop forever).

Replica groups (dstack's `replicas` as a list of groups): each group is kept as above on its own: its
replicas run its spec (`group_specs`: the service with the group's count, scaling, resources, commands...)
and carry its name (`replica_group`); the service's row keeps how many each group wants
(`group_replicas`, their sum in `replicas`); a group scales from the whole service's request rate with its
own `scaling` and rolls when its own spec changes. A service without groups is one group, DEFAULT_GROUP.
Replicas of a group that an update removed are stopped once the other groups have their wanted replicas
ready (or at once when they serve nothing).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from gpufleet.errors import GpufleetError
from gpufleet.launch import container_name
from gpufleet.models import Run, RunRequest, RunStatus
from gpufleet.models.core import SYSTEM_ACTOR, Range
from gpufleet.models.run import DEFAULT_GROUP, DEFAULT_SCALING_WINDOW, ServiceConfig, group_specs, parse_count

FAIL_LIMIT = 3  # replicas in a row that failed before being ready: the service fails
SCALE_ONLY = ("replicas", "scaling")  # spec fields whose change is not a new version of the replicas


def replica_name(service: str, index: int) -> str:
    return f"{service}.{index}"


def replica_index(name: str) -> int:
    return int(name.rpartition(".")[2])


def version(spec: dict) -> dict:
    """What the replicas run, of a service's spec: all of it but its replica count and scaling."""
    return {k: v for k, v in spec.items() if k not in SCALE_ONLY}


def versions(spec: dict) -> dict[str, dict]:
    """What each replica group of a service runs (its version), by group name."""
    return {name: version(g) for name, g in group_specs(spec)}


def has_groups(spec: dict) -> bool:
    return isinstance(spec.get("replicas"), list)


def group_of(run: Run) -> str:
    """A replica's group (DEFAULT_GROUP for a service without groups)."""
    return run.replica_group or DEFAULT_GROUP


def wanted_of(service: Run) -> dict[str, int]:
    """How many replicas each group of ``service`` wants now (a group new to it: its start count)."""
    stored = service.group_replicas if has_groups(service.spec) else None
    if stored is None:
        stored = {DEFAULT_GROUP: service.replicas or 0}
    return {name: stored.get(name, wanted_at_start(g)) for name, g in group_specs(service.spec)}


def bounds(spec: dict) -> Range:
    return parse_count(spec.get("replicas", 1), "replicas")


def wanted_at_start(spec: dict) -> int:
    """Replicas a new service starts with: its number, or the low end of its range (0: the first
    request to its endpoint scales it up)."""
    return int(bounds(spec).min or 0)


def desired(spec: dict, current: int, rps: float | None, last_scaled: float | None, now: float) -> int:
    """dstack's RPS autoscaler: the wanted count after ``current`` with the request rate ``rps`` (None:
    not measured yet) and the last change at ``last_scaled``; without `scaling`, the fixed count."""
    r = bounds(spec)
    lo, hi = int(r.min or 0), int(r.max if r.max is not None else r.min or 0)
    scaling = spec.get("scaling")
    if not scaling:
        return min(max(current, lo), hi)
    if rps is None:
        return min(max(current, lo), hi)
    new = min(max(math.ceil(rps / float(scaling["target"])), lo), hi)
    if new > current:
        if current == 0 or last_scaled is None or now - last_scaled >= float(scaling.get("scale_up_delay", 300)):
            return new
        return current
    if new < current:
        if last_scaled is None or now - last_scaled >= float(scaling.get("scale_down_delay", 600)):
            return new
        return current
    return new


@dataclass(frozen=True)
class Replica:
    """A live replica as `decide` sees it."""

    name: str
    status: RunStatus
    current: bool  # runs the service's current spec
    ready: bool  # gets traffic (its probes passed)


@dataclass
class Actions:
    add: int = 0  # new replicas of the current spec to queue
    stop: list[str] = field(default_factory=list)  # replicas to stop


def decide(wanted: int, replicas: list[Replica]) -> Actions:
    """What to do so that ``wanted`` replicas of the current spec run: add, stop extras, roll old ones.

    Rolling: at most one replica more than wanted lives while old ones remain; an old replica is
    stopped only when the ready ones without it are at least as many as wanted (or every old one that
    is not ready: it serves nothing). Replicas being stopped are not counted (not in ``replicas``)."""
    cur = [r for r in replicas if r.current]
    old = [r for r in replicas if not r.current]
    out = Actions()
    if not old:
        if len(cur) < wanted:
            out.add = wanted - len(cur)
        elif len(cur) > wanted:
            # not ready first, then the newest
            extra = sorted(cur, key=lambda r: (r.ready, -replica_index(r.name)))[: len(cur) - wanted]
            out.stop = [r.name for r in extra]
        return out
    stop = [r.name for r in old if not r.ready]
    old_ready = sorted((r for r in old if r.ready), key=lambda r: replica_index(r.name))
    ready_cur = sum(r.ready for r in cur)
    can_go = max(0, ready_cur + len(old_ready) - max(wanted, 1))
    stop += [r.name for r in old_ready[:can_go]]
    left_old = len(old) - len(stop)
    if len(cur) < wanted and len(cur) + left_old < wanted + 1:
        out.add = min(wanted - len(cur), wanted + 1 - len(cur) - left_old)
    if wanted == 0:
        stop = [r.name for r in old]
    out.stop = stop
    return out


def service_status(replicas: list[Run], ready: int, wanted: int) -> tuple[RunStatus, str]:
    """A live service's status and message from its live replicas: running once one runs."""
    running = sum(r.status == RunStatus.RUNNING for r in replicas)
    waiting = [r for r in replicas if r.status == RunStatus.PENDING]
    text = f"{ready}/{wanted} replicas ready"
    if running < len(replicas):
        text += f", {running} running, {len(replicas) - running} starting or waiting"
    if waiting and not running and waiting[0].message:
        text += f" ({waiting[0].name}: {waiting[0].message})"
    return (RunStatus.RUNNING if running else RunStatus.PENDING), text


# --------------------------------------------------------------------------- doing it


def add_replica(store, service: Run, group: str = DEFAULT_GROUP) -> str:
    """Queue one new replica of ``service`` in its replica group ``group`` (the group's spec, the service's
    sealed secrets): its name."""
    spec = dict(group_specs(service.spec))[group]
    existing = store.replica_runs(service.name, include_finished=True)
    index = 1 + max((replica_index(r.name) for r in existing), default=-1)
    name = replica_name(service.name, index)
    retry = store.retry_policy(service.name)
    store.enqueue(name, uuid.uuid4().hex[:12], "service", spec, container_name(name),
                  priority=service.priority, max_duration=None, retry=retry, sealed=store.sealed(run=service.name),
                  reason="", project=service.project, user=service.user, replica_of=service.name,
                  replica_group=group if has_groups(service.spec) else None)
    return name


@dataclass
class Memory:
    """What the leader remembers of a service between passes (lost with it: then counted anew)."""

    last_scaled: dict[str, float] = field(default_factory=dict)  # by replica group
    failed_in_a_row: int = 0
    seen_live: set[str] = field(default_factory=set)
    last_error: str = ""


def failures(memory: Memory, replicas_now: list[Run], ended: list[Run], ready_names: set[str]) -> None:
    """Count replicas that failed before they were ever ready (reset once one is ready)."""
    if ready_names:
        memory.failed_in_a_row = 0
    for r in ended:
        if r.name in memory.seen_live and r.status == RunStatus.FAILED:
            memory.failed_in_a_row += 1
            memory.last_error = f"{r.name}: {r.message}" if r.message else r.name
    memory.seen_live = {r.name for r in replicas_now}


def parts(req: RunRequest) -> list[tuple[str, RunRequest]]:
    """What is placed of a run being submitted: a service with replica groups, each group's replicas (the
    request as each group runs it, with " (replica group NAME)" to say so); any other run, itself."""
    if not isinstance(req.config, ServiceConfig) or req.config.groups is None:
        return [("", req)]
    spec = req.config.model_dump(mode="json")
    return [(f" (replica group {name})", req.model_copy(update={"config": ServiceConfig.model_validate(g)}))
            for name, g in group_specs(spec)]


def submit(store, req, sealed: str | None, who, policy) -> Run:
    """A new service (its own run, `pending` until a replica runs) and its first replicas, queued;
    or, when a live service of that name exists, its update (`update`)."""
    old = store.run(req.name)
    spec = req.config.model_dump(mode="json")
    if old is not None and old.live and old.is_service:
        return update(store, old, spec, sealed, who)
    counts = {name: wanted_at_start(g) for name, g in group_specs(spec)}
    wanted = sum(counts.values())
    store.enqueue(req.name, uuid.uuid4().hex[:12], "service", spec, container_name(req.name),
                  priority=policy.priority, max_duration=policy.max_duration, retry=policy.as_json(), sealed=sealed,
                  reason=f"0/{wanted} replicas ready", project=who.project, user=who.user, replicas=wanted,
                  group_replicas=counts if has_groups(spec) else None)
    service = store.run(req.name)
    for group, n in counts.items():
        for _ in range(n):
            add_replica(store, service, group)
    return store.run(req.name)


def update(store, old: Run, spec: dict, sealed: str | None, who) -> Run:
    """`gpufleet apply` of a live service: a new spec is rolled out to its replicas one at a time (the
    leader's `keep`); a new replica count or scaling is taken at once; the same spec changes nothing."""
    if old.project != who.project:
        raise GpufleetError(f"a service named {old.name} is already live in project {old.project}: choose "
                            f"another name")
    same = versions(spec) == versions(old.spec)
    if same and spec == old.spec:
        return old  # nothing changed (secrets given again are kept as they were sealed first)
    before = wanted_of(old)
    counts = {}
    for name, g in group_specs(spec):  # what each group has, within its new bounds
        counts[name] = desired(g, before.get(name, wanted_at_start(g)), None, None, 0)
    wanted = sum(counts.values())
    what = "rolling update to its new configuration" if not same else "new replica settings"
    if wanted != old.replicas:
        what += f", {old.replicas} -> {wanted} replicas"
    store.set_service(old.name, spec=spec, replicas=wanted, sealed=sealed if not same else False,
                      group_replicas=counts if has_groups(spec) else None,
                      event=("updated", f"updated by {who.user or 'the user'}: {what}"), actor=who.user or SYSTEM_ACTOR)
    return store.run(old.name)


def keep(store, memories: dict[str, Memory], ready_of, rps_of, stop, now: float) -> None:
    """One pass of the leader over every live service: replicas scaled, replaced, rolled, orphans
    stopped, each service's status set. ``ready_of(service)``: names of its ready replicas (the proxy's
    probes); ``rps_of(service, window)``: requests per second its endpoint carried over ``window`` seconds
    (None: not measured yet); ``stop(replica, why)``: stop (or cancel) a replica."""
    live = store.runs()
    services = {r.name: r for r in live if r.is_service}
    kids: dict[str, list[Run]] = {}
    for r in live:
        if r.replica_of is not None:
            kids.setdefault(r.replica_of, []).append(r)
    for parent, rs in kids.items():
        s = services.get(parent)
        if s is None:  # its service ended (failed, cancelled): its replicas go too
            for r in rs:
                if r.status != RunStatus.STOPPING:
                    stop(r.name, f"its service {parent} ended")
    for name in list(memories):
        if name not in services:
            del memories[name]
    for s in services.values():
        if s.status == RunStatus.STOPPING:
            continue  # its stop stops its replicas
        _keep_one(store, s, kids.get(s.name, []), memories.setdefault(s.name, Memory()), ready_of(s.name), rps_of,
                  stop, now)


def _keep_one(store, s: Run, rs: list[Run], memory: Memory, ready: set[str], rps_of, stop, now: float) -> None:
    going = [r for r in rs if r.status != RunStatus.STOPPING]
    ended = [e for n in memory.seen_live - {r.name for r in going} if (e := store.run(n)) is not None
             and not e.live]
    failures(memory, going, ended, ready & {r.name for r in going})
    if memory.failed_in_a_row >= FAIL_LIMIT:
        why = (f"{memory.failed_in_a_row} replicas in a row failed before they were ready (last: "
               f"{memory.last_error})")
        if store.finish_run(s.name, RunStatus.FAILED, None, why, expect=(s.status,)):
            for r in going:
                stop(r.name, f"its service {s.name} failed")
        return
    counts = wanted_of(s)
    stops: list[tuple[str, str]] = []
    groups = group_specs(s.spec)
    for group, spec in groups:
        scaling = spec.get("scaling")
        rps = rps_of(s.name, float(scaling.get("window") or DEFAULT_SCALING_WINDOW)) if scaling else None
        wanted = desired(spec, counts[group], rps, memory.last_scaled.get(group, s.created_at), now)
        if wanted != counts[group]:
            what = f"group {group}: " if has_groups(s.spec) else ""
            why = (f"{what}scaled from {counts[group]} to {wanted} replicas" +
                   (f" ({rps:.2f} requests/s, target {float(scaling['target']):g} per replica)" if scaling and
                    rps is not None else ""))
            counts[group] = wanted
            store.set_service(s.name, replicas=sum(counts.values()), event=("scaled", why),
                              group_replicas=counts if has_groups(s.spec) else None)
            memory.last_scaled[group] = now
        mine = [Replica(r.name, r.status, version(r.spec) == version(spec), r.name in ready) for r in going
                if group_of(r) == group]
        acts = decide(wanted, mine)
        for name in acts.stop:
            current = next(v.current for v in mine if v.name == name)
            stops.append((name, "replaced by a replica of the new configuration" if not current else
                          f"scaled down to {wanted} replicas" + (f" in group {group}" if has_groups(s.spec) else "")))
        for _ in range(acts.add):  # watched from now on: one refused or failed before the next pass counts too
            memory.seen_live.add(add_replica(store, s, group))
    # replicas of a group the service no longer has: stopped once the others have their wanted replicas
    # ready (at once when they serve nothing)
    names = {g for g, _ in groups}
    gone = [r for r in going if group_of(r) not in names]
    kept_ready = len(ready & {r.name for r in going if group_of(r) in names})
    for r in gone:
        if r.name not in ready or kept_ready >= sum(counts.values()):
            stops.append((r.name, f"its replica group {group_of(r)} was removed from the service"))
    for name, why in stops:
        stop(name, why)
    stopped = {n for n, _ in stops}
    going = [r for r in going if r.name not in stopped]
    status, message = service_status(going, len(ready & {r.name for r in going}), sum(counts.values()))
    if (status, message) != (s.status, s.message):  # a write transaction only for a change
        store.set_service(s.name, status=status, message=message)

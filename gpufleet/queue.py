"""The queue, server side: a run is submitted to wait for blocks, the scheduling pass starts waiting
runs where the pure scheduler (gpufleet.scheduler.decide) puts them, limits stop runs past their
`max_duration` and give up on runs past their retry window, and a waiting run can be cancelled.

The server's API and its loops call these; nothing here talks HTTP. Starting containers is
gpufleet.launch's; what became of them, gpufleet.runs.refresh's.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet import failpoints, hostpolicy, images, replicas
from gpufleet.allocator import (
    HostIndex,
    HostSlots,
    NoCapacity,
    Placement,
    Request,
    gpu_matches,
    host_refusal,
    place_gang,
)
from gpufleet.errors import Forbidden, GpufleetError, NotFound
from gpufleet.fairshare import HALF_LIFE_DEFAULT, Usage, decayed_usage
from gpufleet.launch import container_name, start_nodes, stop_containers
from gpufleet.models import (
    DEFAULT_PROJECT,
    RUN_CONFIG,
    SYSTEM_ACTOR,
    FleetPolicy,
    ProjectRole,
    Run,
    RunConfigType,
    RunRequest,
    RunStatus,
    ServerRole,
    ServiceConfig,
    User,
)
from gpufleet.models.cron import utc_text
from gpufleet.models.run import format_duration
from gpufleet.scheduler import PRIORITY_DEFAULT, Decision, Quota, Running, Waiting, decide, never_fits, ordered
from gpufleet.state import Store, kept_words

Seal = Callable[[dict[str, str]], str]
STOP_DEFAULT = 10.0  # seconds of grace on stop when the run gives no `stop_duration`
STOP_CAP = 86400.0  # `stop_duration: off` (wait for ever) waits a day: a stop must end some day
Unseal = Callable[[str], dict[str, str]]


@dataclass(frozen=True)
class Submitter:
    """Who submits a run, in which project, and their role there: `member`, `admin` (of the
    project) or `server-admin` (what a fleet's policy lets their run do depends on it)."""

    user: str = ""
    project: str = DEFAULT_PROJECT
    role: str = "server-admin"


class Placing:
    """The fleets of each project and their policies, read once per pass: a run is placed only on
    its project's fleets, of those only the ones its `fleets` names, and of those only the ones
    whose policy lets its submitter's role run it (gpufleet.hostpolicy), and of those only the ones
    that have an image for it (gpufleet.images)."""

    def __init__(self, store: Store):
        self.by_project: dict[str, dict[str, FleetPolicy]] = {}
        self.images: dict[str, list | None] = {}  # each fleet's `images` (gpufleet.images)
        for fleet, project in sorted(store.fleet_projects().items()):
            config = store.fleet_config(fleet)
            self.by_project.setdefault(project, {})[fleet] = hostpolicy.policy_of(config)
            self.images[fleet] = images.fleet_images(config)
        self._users: dict[str, User] | None = None
        self._store = store

    def choice(self, cfg: RunConfigType, project: str, role: str) -> tuple[tuple[str, ...], str, bool]:
        """(the fleets the run may go to, why none when there is none, whether that is a policy's refusal)."""
        policies = self.by_project.get(project)
        if not policies:
            why = f"project {project} has no fleet yet (a project admin applies one: gpufleet apply -f FLEET.yml)"
            return (), why, False
        allowed, why = hostpolicy.allowed_fleets(cfg, policies, role)
        if allowed:  # of those, the fleets that have an image for it (its `python`, `nvcc`)
            fits, no_image = images.usable(cfg, allowed, self.images)
            return (tuple(fits), "", False) if fits else ((), no_image, False)
        named = [f for f in policies if cfg.fleets is None or f in cfg.fleets]
        if not named:
            return (), (f"none of the fleets it names ({', '.join(cfg.fleets or [])}) is a fleet of project {project} "
                        f"(its fleets: {', '.join(policies)})"), False
        return (), "; ".join(rule for f in named for rule in why[f]), True

    def role(self, user: str, project: str) -> str:
        """What a fleet's policy sees of a run's submitter now: `server-admin`, `admin` (of the
        project) or `member` (also a user since deleted or removed). Runs from before users (no
        user) were their state's owner's: `server-admin`."""
        if not user:
            return "server-admin"
        if self._users is None:
            self._users = {u.name: u for u in self._store.users()}
        return role_of(self._users.get(user), project)


def role_of(user: User | None, project: str) -> str:
    if user is None:
        return "member"
    if user.role == ServerRole.ADMIN:
        return "server-admin"
    return "admin" if user.projects.get(project) == ProjectRole.ADMIN else "member"


def request_of(cfg: RunConfigType, fleets: tuple[str, ...] | None = None) -> Request:
    """What the allocator places for ``cfg``: on ``fleets`` (its project's, which must not be
    empty), else on the fleets the run names (else on any)."""
    r = cfg.resources
    if fleets is None:
        fleets = tuple(cfg.fleets) if cfg.fleets else None
    return Request(gpu=r.gpu, cpu=r.cpu_count, memory_gb=r.memory, fleets=fleets, arch=r.cpu_arch, disk=r.disk)


def cluster_fleets(store: Store) -> set[str]:
    return {f.name for f in store.fleets() if (store.fleet_config(f.name) or {}).get("placement") == "cluster"}


@dataclass(frozen=True)
class Policy:
    """What the queue does with a run: its priority, limit, grace on stop, and whether it waits for
    capacity (and how long)."""

    priority: int = PRIORITY_DEFAULT
    max_duration: float | None = None
    stop_duration: float = STOP_DEFAULT  # seconds of grace when it is stopped
    queue: bool = True
    retry_duration: float | None = None
    on_events: tuple[str, ...] = ("no-capacity",)

    def as_json(self) -> dict:
        return {"priority": self.priority, "max_duration": self.max_duration, "stop_duration": self.stop_duration,
                "queue": self.queue, "duration": self.retry_duration, "on_events": list(self.on_events)}

    @classmethod
    def of(cls, cfg: RunConfigType) -> Policy:
        retry = cfg.retry_policy
        # gpufleet's grace when `stop_duration` is not given stays the runtime's 10 s (dstack's 5 min
        # would hold every `gpufleet stop` of a shell that ignores SIGTERM for 5 minutes)
        grace = STOP_DEFAULT if cfg.stop_duration is None else min(cfg.stop_duration, STOP_CAP)
        return cls(priority=cfg.priority, max_duration=cfg.max_duration, stop_duration=grace,
                   queue=retry.queue, retry_duration=retry.duration, on_events=tuple(sorted(retry.on_events)))


def waiting_of(run: Run | RunRequest, submitted_at: float = 0.0, fleets: tuple[str, ...] | None = None,
               who: Submitter | None = None) -> Waiting:
    """The scheduler's view of a waiting run (or one being submitted, by ``who``). A scheduled run
    waiting for its time is not eligible before it (``not_before``)."""
    cfg = run.config if isinstance(run, RunRequest) else RUN_CONFIG.validate_python(run.spec)
    policy = Policy.of(cfg)
    user, project = (who.user, who.project) if who else (getattr(run, "user", ""), getattr(run, "project", ""))
    return Waiting(run_id=run.name, request=request_of(cfg, fleets), submitted_at=submitted_at,
                   nodes=getattr(cfg, "nodes", 1), priority=policy.priority, max_duration=policy.max_duration,
                   user=user, project=project, not_before=None if isinstance(run, RunRequest) else run.next_at)


def queued_since(run: Run) -> float:
    """When a waiting run joined the queue: its submission, or for a scheduled run the time it was
    due (its queue order, aging and retry window count from then, as dstack's do)."""
    return run.next_at if run.next_at is not None else run.created_at


def scheduled_text(at: float) -> str:
    """Why a scheduled run waits before its time: `scheduled: next 2026-12-03 23:15 UTC`."""
    return f"scheduled: next {utc_text(at)}"


def running_of(store: Store) -> list[Running]:
    """The active runs as the scheduler sees them: their blocks, expected ends, owners and GPU models."""
    return [Running(run_id=r.name, blocks=tuple((n.instance_id, b) for n in r.nodes for b in n.blocks),
                    ends_at=(r.started_at + r.max_duration) if r.started_at and r.max_duration else None,
                    user=r.user, project=r.project,
                    gpus=tuple(g.model or g.name or "" for n in r.nodes for g in n.gpus))
            for r in store.runs() if r.active]


def quotas_of(store: Store) -> list[Quota]:
    return [Quota(project=q.project, user=q.user, gpu=q.gpu, gpus=q.gpus) for q in store.quotas()]


def usage_of(store: Store, now: float, half_life: float = HALF_LIFE_DEFAULT) -> Usage:
    """Fair share's decayed GPU-hours per project and user. Time used more than ten half-lives ago
    (weight under 0.1%) is not read."""
    records = store.usage_records(since=now - 10 * half_life)
    return decayed_usage([(r.project, r.user, r.gpus, r.started_at, r.ended_at) for r in records], now, half_life)


# --------------------------------------------------------------------------- why a run waits

def kept_gpus(store: Store) -> dict[tuple[str, str], str]:
    """(fleet, alias) -> `GPU 2 unhealthy, GPU 5 used outside gpufleet`: the host's GPUs that no new run
    gets (Store.withhold), for wait reasons."""
    return {key: ", ".join(f"GPU {idx} {kept_words(kind)}"
                           for (_, idx), (kind, _, _) in sorted(gpus.items()))
            for key, gpus in store.withheld().items()}


def wait_reason(run: Waiting, hosts: HostIndex, limit: int = 6, kept: dict[tuple[str, str], str] | None = None
                ) -> str:
    """`waiting for 4 H100: node-0 2/8 free, node-1 0/8 free (GPU 3 unhealthy)`: what it asks for, and
    the free GPUs (of the kind it asks for) on each host it could use, with the GPUs kept from runs
    (``kept``: kept_gpus)."""
    req = run.request
    considered = [h for h in hosts.hosts() if not req.fleets or h.fleet in req.fleets]
    parts = []
    refused = {h.alias: why for h in considered if (why := host_refusal(h, req))}
    for h in considered[:limit]:
        if h.alias in refused:
            parts.append(refused[h.alias])
            continue
        fit = [i for i, g in enumerate(h.gpus) if req.gpu is None or gpu_matches(g, req.gpu)]
        free = {g for b in h.blocks if b.free for g in b.gpus}
        note = (kept or {}).get((h.fleet, h.alias))
        parts.append(f"{h.alias} {len([i for i in fit if i in free])}/{len(fit)} free" + (f" ({note})" if note else ""))
    if len(considered) > limit:
        parts.append(f"and {len(considered) - limit} more hosts")
    what = req.describe() + (f" on each of {run.nodes} hosts" if run.nodes > 1 else "")
    return f"waiting for {what}: " + (", ".join(parts) if parts else "no ready host")


# --------------------------------------------------------------------------- submit

@dataclass
class Plan:
    """Where a run would go now (rank 0 first), or why it would wait, or why it never can."""

    placements: list[Placement] = field(default_factory=list)
    waits: str = ""
    never: str = ""


def plan(store: Store, req: RunRequest, who: Submitter = Submitter()) -> Plan:
    """Where ``req`` would go now; a service with replica groups: each group is checked, the first one's
    placement is shown."""
    hosts = store.slots_snapshot()
    clusters = cluster_fleets(store)
    found: Plan | None = None
    for what, part in replicas.parts(req):
        fleets, nowhere, refused = Placing(store).choice(part.config, who.project, who.role)
        if refused:  # not a matter of capacity: the submit would be refused the same way (403)
            raise Forbidden(f"{req.name}{what}: {nowhere}")
        if nowhere:
            return Plan(never=f"{req.name}{what}: {nowhere}")
        waiting = waiting_of(part, fleets=fleets, who=who)
        never = never_fits(waiting, hosts, clusters)
        if never:
            return Plan(never=f"{req.name}{what} {never}")
        if found is None:
            try:
                found = Plan(placements=place_gang(waiting.request, hosts, part.nodes, clusters))
            except NoCapacity as e:
                found = Plan(waits=f"{e}")
    assert found is not None
    return found


def submit(store: Store, req: RunRequest, seal: Seal, no_queue: bool = False, who: Submitter = Submitter()
           ) -> tuple[Run, list[Placement] | None]:
    """Queue ``req`` (the scheduling pass starts it as soon as it may): (the run, None). Refused at
    once when it can never fit. A run that must not wait (`retry: false`, --no-queue) takes its
    blocks now, in one transaction, or is refused: (the run, its placements) for the caller to
    launch. It never takes blocks the head of the queue has reserved."""
    policy = Policy.of(req.config)
    hosts = store.slots_snapshot()
    clusters = cluster_fleets(store)
    for what, part in replicas.parts(req):  # a service's replica groups: each must be able to run
        fleets, nowhere, refused = Placing(store).choice(part.config, who.project, who.role)
        if nowhere:
            raise (Forbidden if refused else GpufleetError)(f"{req.name}{what}: {nowhere}; not queued")
        waiting = waiting_of(part, fleets=fleets, who=who)
        never = never_fits(waiting, hosts, clusters)
        if never:
            raise GpufleetError(f"{req.name}{what} {never}; not queued")
    spec = req.config.model_dump(mode="json")
    sealed = seal(req.secrets) if req.secrets else None
    if isinstance(req.config, ServiceConfig):
        if no_queue or not policy.queue or req.config.schedule is not None:
            why = ("--no-queue" if no_queue else "`retry: false`" if not policy.queue else "`schedule`")
            raise GpufleetError(f"{req.name}: a service's replicas wait in the queue for blocks and are replaced "
                                f"when they end: {why} is not taken for a service")
        return replicas.submit(store, req, sealed, who, policy), None
    if req.config.schedule is not None:  # it waits for its first time (then as any run: scheduled())
        if no_queue:
            raise GpufleetError(f"{req.name}: --no-queue starts a run now or not at all; this one has a `schedule` "
                                f"(for each start to be now-or-never, give it `retry: false`)")
        at = req.config.schedule.next_start(time.time())
        store.enqueue(req.name, uuid.uuid4().hex[:12], req.config.type, spec, container_name(req.name),
                      priority=policy.priority, max_duration=policy.max_duration, retry=policy.as_json(),
                      sealed=sealed, reason=scheduled_text(at), project=who.project, user=who.user, next_at=at)
        return store.run(req.name), None
    if no_queue or not policy.queue:
        held = decide([waiting], hosts, running_of(store), time.time(), cluster_fleets=clusters,
                      quotas=quotas_of(store)).held
        if held:
            why = "--no-queue" if no_queue else "retry: false"
            raise GpufleetError(f"{req.name}: {held[0].reason} (not queued: {why})")
        reserved: dict[int, set[int]] = {}
        for _, blocks in store.reservations().values():
            for iid, idx in blocks:
                reserved.setdefault(iid, set()).add(idx)

        def choose(index: HostIndex) -> list[Placement]:
            return place_gang(waiting.request, _without(index, reserved), req.nodes, clusters)

        try:
            placements = store.allocate(req.name, uuid.uuid4().hex[:12], req.config.type, spec,
                                        container_name(req.name), choose, priority=policy.priority,
                                        max_duration=policy.max_duration, retry=policy.as_json(), sealed=sealed,
                                        project=who.project, user=who.user)
        except NoCapacity as e:
            why = "--no-queue" if no_queue else "retry: false"
            raise GpufleetError(f"{e} (not queued: {why})") from None
        return store.run(req.name), placements
    try:
        place_gang(waiting.request, hosts, req.nodes, clusters)
        reason = ""  # it fits now: the scheduling pass this submission kicks starts it
    except NoCapacity:
        reason = wait_reason(waiting, hosts, kept=kept_gpus(store))
    quotas = quotas_of(store)
    if quotas:  # over a quota, it waits for that whether it fits or not
        held = decide([waiting], hosts, running_of(store), time.time(), cluster_fleets=clusters, quotas=quotas).held
        reason = held[0].reason if held else reason
    store.enqueue(req.name, uuid.uuid4().hex[:12], req.config.type, spec, container_name(req.name),
                  priority=policy.priority, max_duration=policy.max_duration, retry=policy.as_json(),
                  sealed=sealed, reason=reason, project=who.project, user=who.user)
    return store.run(req.name), None


def _without(index: HostIndex, reserved: dict[int, set[int]]) -> list[HostSlots]:
    """The hosts of ``index`` with the ``reserved`` blocks (instance id -> block indices) shown busy."""
    if not reserved:
        return index.hosts()
    return [h if h.instance_id not in reserved else
            dataclasses.replace(h, blocks=[dataclasses.replace(b, free=False) if b.idx in reserved[h.instance_id]
                                           else b for b in h.blocks], shape=None)
            for h in index.hosts()]


def cancel(store: Store, name: str, why: str = "cancelled by the user while waiting",
           actor: str = SYSTEM_ACTOR) -> bool:
    """End a waiting run; False if it no longer waits (the scheduler may have just started it: then
    its containers are being started and it must be stopped, not cancelled)."""
    return store.finish_run(name, RunStatus.STOPPED, None, why, actor=actor, final=True,
                            expect=(RunStatus.PENDING,))


# --------------------------------------------------------------------------- the scheduling pass

def schedule(store: Store, launch: Callable[[Run, list[Placement]], None], now: float | None = None,
             half_life: float = HALF_LIFE_DEFAULT) -> float | None:
    """Decide which waiting runs start now (scheduler.decide over the store's blocks and running
    runs), take their blocks, and hand each to ``launch`` (which starts its containers, usually on
    a worker thread). Refused runs end `failed` with why; the others get their reason and the
    head its reservation. Returns the time the next scheduled run is due (None: none waits for one),
    for the loop to be there on time."""
    now = time.time() if now is None else now
    pending = store.pending()
    if not pending:
        store.save_reservations([])
        return None
    placing = Placing(store)
    waits, homeless, later, now_or_never = {}, {}, {}, set()
    for r in pending:
        if r.next_at is not None and r.next_at > now:  # scheduled, not yet due: not eligible (decide)
            later[r.name] = scheduled_text(r.next_at)
            continue
        cfg = RUN_CONFIG.validate_python(r.spec)
        fleets, nowhere, _ = placing.choice(cfg, r.project, placing.role(r.user, r.project))
        if r.next_at is not None and not cfg.retry_policy.queue:
            now_or_never.add(r.name)  # `retry: false`: at its time it starts, or fails until the next
        if nowhere:
            homeless[r.name] = f"waiting: {nowhere}"
        else:
            waits[r.name] = waiting_of(r, queued_since(r), fleets)
    store.set_waiting(homeless | later)
    _spread_replicas(store, pending, waits)
    hosts = store.slots_snapshot()
    decision: Decision = decide(list(waits.values()), hosts, running_of(store), now,
                                cluster_fleets=cluster_fleets(store), quotas=quotas_of(store),
                                usage=usage_of(store, now, half_life))
    for refusal in decision.refused:
        store.finish_run(refusal.run_id, RunStatus.FAILED, None, f"refused: {refusal.reason}")
    for start in decision.starts:
        placements = list(start.placements)
        if store.start_pending(start.run.run_id, placements):
            failpoints.reach("after-allocate")
            launch(store.run(start.run.run_id), placements)
    store.save_reservations([(r.run_id, r.at, list(r.blocks)) for r in decision.reservations])
    gone = {r.run_id for r in decision.refused} | {st.run.run_id for st in decision.starts}
    for name in sorted((now_or_never & (set(waits) | set(homeless))) - gone):
        why = next((h.reason for h in decision.held if h.run_id == name), None) or homeless.get(name) or \
            wait_reason(waits[name], hosts)
        store.finish_run(name, RunStatus.FAILED, None, f"not started at its scheduled time (retry: false): {why}")
        gone.add(name)
    reasons = {h.run_id: h.reason for h in decision.held if h.run_id not in gone}
    left = [w for w in waits.values() if w.run_id not in gone and w.run_id not in reasons]
    if left:
        after = store.slots_snapshot()
        reserved = {r.run_id: r.at for r in decision.reservations}
        kept = kept_gpus(store)
        for w in left:
            reason = wait_reason(w, after, kept=kept)
            if w.run_id in reserved:
                at = reserved[w.run_id]
                reason += ("; next to start, when runs without a max_duration end" if at is None
                           else f"; next to start, expected by {time.strftime('%H:%M:%S', time.localtime(at))}")
            reasons[w.run_id] = reason
    store.set_waiting(reasons)
    return min((r.next_at for r in pending if r.name in later), default=None)


def _spread_replicas(store: Store, pending: list[Run], waits: dict[str, Waiting]) -> None:
    """A waiting replica of a service goes on a host without another replica of it when one fits."""
    services = {r.replica_of for r in pending if r.replica_of and r.name in waits}
    if not services:
        return
    held: dict[str, set[int]] = {}
    for r in store.runs():
        if r.replica_of in services and r.active:
            held.setdefault(r.replica_of, set()).update(n.instance_id for n in r.nodes)
    for r in pending:
        if r.name in waits and r.replica_of:
            w = waits[r.name]
            waits[r.name] = dataclasses.replace(w, request=dataclasses.replace(
                w.request, spread=frozenset(held.get(r.replica_of, ())), spread_group=r.replica_of,
                spread_only=r.spec.get("network") == "host"))  # on the host's network: one per host


def positions(runs: list[Run], now: float | None = None, usage: Usage | None = None) -> dict[str, int]:
    """Each waiting run's 1-based place in the queue's order (with fair share: ``usage``)."""
    now = time.time() if now is None else now
    waits = [waiting_of(r, queued_since(r)) for r in runs if r.status == RunStatus.PENDING
             and (r.next_at is None or r.next_at <= now)]  # a scheduled run has no place before its time
    return {w.run_id: i + 1 for i, w in enumerate(ordered(waits, now, usage=usage))}


def launch(store: Store, run: Run, placements: list[Placement], unseal: Unseal,
           fleet_secrets: Callable[[str], dict[str, str]]) -> None:
    """Start the containers of a run the scheduler placed (its blocks are taken, it is `starting`):
    running when every node started, else failed with the node and the cause (its blocks freed).

    A stop that lands during the start (begin_stop: `stopping`, the run still this start's) is done
    here, where it is known which containers exist: before the first node and between nodes no
    further one is started, and once the start is over (started, or failed) the containers started
    are removed and the run ends `stopped` as its stop says (who, why)."""
    cfg = RUN_CONFIG.validate_python(run.spec)
    sealed = store.sealed(run=run.name)
    req = RunRequest(name=run.name, source=f"run {run.name}", config=cfg, secrets=unseal(sealed) if sealed else {},
                     replica_of=run.replica_of)
    started: list[str] = []
    fleet = placements[0].host.fleet
    # the host checks the run's volumes against the roots its submitter's role may mount now
    role = "server-admin" if not run.user else role_of(store.user(run.user), run.project)
    roots = hostpolicy.volume_roots(hostpolicy.policy_of(store.fleet_config(fleet)), role)
    try:
        failpoints.reach("before-start")
        start_nodes(store, req, run.run_id, placements, started, fleet_secrets(fleet), volume_roots=roots,
                    before_node=lambda: _still_starting(store, run.name))
    except StartCut:  # a stop began: no further node was started
        _release(store, run, started, "")
        return
    except GpufleetError as e:
        _release(store, run, started, str(e))
        return
    except BaseException:
        _release(store, run, started, "interrupted while starting")
        raise
    failpoints.reach("after-start")
    # running only if it is still `starting`: a stop that began meanwhile is not undone
    if not store.set_run_status(run.name, RunStatus.RUNNING, expect=(RunStatus.STARTING,)):
        _release(store, run, started, "")


def _still_starting(store: Store, name: str) -> None:
    """Before each node of a start: StartCut if the run is no longer `starting` (a stop began)."""
    now = store.run(name)
    if now is None or now.status != RunStatus.STARTING:
        raise StartCut(f"run {name} is {now.status if now else 'gone'}: its start stops here")


class StartCut(GpufleetError):
    """A start that stopped before its next node: the run is no longer `starting` (a stop began)."""


def _release(store: Store, run: Run, started: list[str], why: str) -> None:
    """A start that is over without the run running: remove what was started (best effort), and end
    the run (start_over): failed (``why``: how the start failed; "": it did not, a stop cut it short)
    if it is still `starting`, else as the stop that began during the start says."""
    grace = store.retry_policy(run.name).get("stop_duration")
    removal = ""
    try:
        if started:
            stop_containers(run.fleet, run.container, run.run_id, started, remove=True, timeout=grace)
    except GpufleetError as e:
        removal = f"removing its containers failed: {e}; the sweep stops what is left"
    start_over(store, run.name, why, removal)


def start_over(store: Store, name: str, why: str, removal: str = "") -> None:
    """A start that ended without the run running (its containers removed, or ``removal``: why not):
    the run ends failed (``why``) if it is still `starting`; if a stop began meanwhile, `stopped` as
    that stop says (by whom, why), with what became of the start noted (one transaction each, each
    only from the status it expects: whichever the run is in, exactly one of them ends it)."""
    if why and store.finish_run(name, RunStatus.FAILED, None, why + (f" ({removal})" if removal else ""),
                                expect=(RunStatus.STARTING,)):
        return
    store.finish_stop(name, "; ".join(n for n in (f"its start failed: {why}" if why else "", removal) if n))


# --------------------------------------------------------------------------- limits

def enforce_limits(store: Store, now: float | None = None) -> list[str]:
    """Stop runs past their max_duration; fail waiting runs past their retry duration. Returns
    the names of the runs ended."""
    now = time.time() if now is None else now
    ended = []
    for r in store.runs():
        if r.status == RunStatus.PENDING and not r.is_service:  # a service: its replicas' own retry durations
            duration = store.retry_policy(r.name).get("duration")
            if duration and now - queued_since(r) > duration:
                if store.finish_run(r.name, RunStatus.FAILED, None,
                                    f"no capacity within its retry duration ({format_duration(duration)})",
                                    expect=(RunStatus.PENDING,)):  # not one the scheduler just started
                    ended.append(r.name)
        elif r.status == RunStatus.RUNNING and r.max_duration and r.started_at and \
                now - r.started_at > r.max_duration:
            work = _stopper(store, r, f"stopped by its max_duration ({format_duration(r.max_duration)})")
            if work is not None and work():  # a stop that failed is noted on the run; tried again next pass
                ended.append(r.name)
    return ended


def _stopper(store: Store, run: Run, why: str, actor: str = SYSTEM_ACTOR, final: bool = False
             ) -> Callable[[], bool] | None:
    """Mark an active run `stopping` (so its containers' exit is not read as a failure) and return
    the work that stops them within its grace and records it `stopped` (``why``): True when done,
    False when the runtime could not stop them (the run is `running` again, saying why). None if
    the run is no longer active. ``final`` (a user's stop): a scheduled run is not started again.
    A run that was `starting` is stopped by its start (launch): the work returned does nothing."""
    grace = store.retry_policy(run.name).get("stop_duration")
    was = store.begin_stop(run.name, why, actor, final=final)
    if was is None:
        return None
    if run.is_service:
        return lambda: _stop_service(store, run.name, why, actor)
    if was == RunStatus.STARTING:
        return lambda: False  # launch removes what it started when its current step ends, and ends it

    def work() -> bool:
        try:
            stop_containers(run.fleet, run.container, run.run_id, run.aliases, timeout=grace)
        except GpufleetError as e:
            store.set_run_status(run.name, RunStatus.RUNNING, f"could not stop it: {e}", expect=(RunStatus.STOPPING,))
            return False
        return store.finish_run(run.name, RunStatus.STOPPED, None, why, actor=actor, expect=(RunStatus.STOPPING,))

    return work


def _stop_service(store: Store, name: str, why: str, actor: str) -> bool:
    """Stop every replica of a `stopping` service (each within its grace), then end the service
    `stopped`; False (it is `running` again, saying why) when a replica could not be stopped."""
    failed = _end_replicas(store, name, f"its service {name} is stopping ({why})", actor)
    if failed:
        store.set_service(name, status=RunStatus.RUNNING, message=f"could not stop replicas {', '.join(failed)}")
        return False
    return store.finish_run(name, RunStatus.STOPPED, None, why, actor=actor, expect=(RunStatus.STOPPING,))


def _end_replicas(store: Store, service: str, why: str, actor: str) -> list[str]:
    """End every live replica of ``service`` (end_replica, one after the other): those that could not be stopped."""
    return [r.name for r in store.replica_runs(service) if not end_replica(store, r.name, why, actor)]


def stop_replica(store: Store, name: str, why: str, actor: str = SYSTEM_ACTOR) -> Callable[[], bool] | None:
    """Cancel a waiting replica (None), or mark an active one `stopping` and return the work that stops
    its containers (as `_stopper`); None as well when it is no longer live."""
    run = store.run(name)
    if run is None or not run.live:
        return None
    if run.status == RunStatus.PENDING and cancel(store, name, why, actor):
        return None
    run = store.run(name)
    if run is None or not run.active or run.status == RunStatus.STOPPING:
        return None
    return _stopper(store, run, why, actor)


def end_replica(store: Store, name: str, why: str, actor: str = SYSTEM_ACTOR) -> bool:
    """`stop_replica` and its work, here (within its grace: call it from a worker thread). True when it
    is over, or being stopped by its start; False when the runtime could not stop it."""
    work = stop_replica(store, name, why, actor)
    if work is None or work():
        return True
    now = store.run(name)
    return now is None or now.status != RunStatus.RUNNING  # a start that is cut stops it itself


def stop(store: Store, name: str, by: str = "the user", actor: str = SYSTEM_ACTOR
         ) -> tuple[Run, Callable[[], bool] | None]:
    """Stop a run. A waiting one is cancelled at once: (the run, None). An active one is marked
    `stopping` at once, and the work that stops its containers (up to their grace) and frees its
    blocks is returned, for the caller to do where it does not hold up others (the server: on a
    worker thread, so that stops never hold the API's threads)."""
    run = store.run(name)
    if run is None:
        raise NotFound(f"no run named {name!r} (see gpufleet ps -a)")
    if run.status == RunStatus.PENDING:
        if cancel(store, name, f"cancelled by {by} while waiting", actor):
            if run.is_service:  # its replicas (waiting, or being started) go too
                return store.run(name), lambda: not _end_replicas(store, name, f"its service {name} was "
                                                                                f"cancelled by {by}", actor)
            return store.run(name), None
        run = store.run(name)
    if run.status == RunStatus.STOPPING:
        return run, None  # already being stopped
    if not run.active:
        raise GpufleetError(f"run {name} is not running ({run.status})")
    work = _stopper(store, run, f"stopped by {by}", actor, final=True)
    if work is None:
        raise GpufleetError(f"run {name} is not running ({store.run(name).status})")
    return store.run(name), work


"""Which waiting runs start now, and where: one pure function, no I/O, no clock, no state kept.

    decide(waiting, hosts, running, now, cluster_fleets=(), quotas=(), usage=None)
        -> Decision(starts, reservations, refused, held)

`waiting` are the queued runs, `hosts` the ready hosts with their free and busy blocks (a HostIndex
or a list of HostSlots, as the allocator takes them), `running` says which run holds which busy
blocks and when it is expected to end (its start plus its `max_duration`). The control plane calls
it whenever a run is submitted or ends; benchmarks/bench_sched.py replays real job traces through
it unchanged, so what is benchmarked is what runs. Where a run goes is the allocator's choice
(`place`, `place_gang`): this module decides which runs start, in what order, and which must wait.

Rules
- Order: effective priority, then submission time, then run id. Effective priority is `priority`
  (0-100, default 50, as dstack's) plus one point per `aging_s` seconds waited (default one hour;
  `aging_s=None` turns aging off). Two runs of the same priority never swap places through aging.
- Fair share (given `usage`, decayed GPU-hours per project and per user in a project: see
  gpufleet/fairshare.py): among runs of equal effective priority (the whole number: runs submitted
  at different times tie), the run whose project has used less goes first, then the one whose user
  (in that project) has used less, then submission time, then run id. It never puts a run ahead
  of one of higher effective priority. `usage=None`: no fair share, the order above.
- Quotas (`Quota`: at most so many GPUs running at once in a project, or for a user in a project,
  optionally of one GPU model): a run whose start would take a quota that applies to it over its
  cap, counting running runs (`Running.gpus`) and the runs this decision starts, is *held*: it
  does not start, is not the head, gets no reservation and blocks no one; `Decision.held` says
  why (`quota: alice runs 8/8 GPUs of project ml`, `quota: project ml runs 16/16 H100 GPUs`, and
  `(the run asks for 12 GPUs, more than the quota of 8)` when it alone is over: it waits, and
  starts if the quota is raised). It starts once the quota has room. A model quota counts the GPUs
  of that model a run holds or would be placed on, matched as a requested GPU name is; a run that
  names no model (or other models too) counts against it with the GPUs of that model its placement
  takes, known only once it is placed (a placement that would go over holds it). Every queued run
  over a quota is listed, not only those the decision looked at; one that can never fit is refused.
- Runs start in that order while they fit. The first that does not (the *head*) gets the one
  reservation kept (EASY style): the earliest time it fits once running runs end at their expected
  ends, and the blocks it would take then.
- A run behind the head starts now (backfill) only if that cannot delay the reservation: it ends,
  by its own `max_duration`, no later than the reserved time; or the blocks it takes are not the
  reserved ones; or, if they are, the head still fits at the reserved time with it running (the
  reservation then moves to those other blocks). A run that fits only by delaying the head waits.
  Backfill candidates are tried by priority, then shortest `max_duration` (none: last), then queue
  order, at most `depth` runs behind the head per decision (BACKFILL_DEPTH, as Slurm's
  bf_max_job_test), so a decision's cost does not grow with a queue of thousands. Shortest first
  lowers mean wait; it cannot starve anyone, since every run reaches the head in queue order.
- A run without `max_duration` cannot be assumed to end. Its blocks are never counted as freed when
  the reservation is worked out, and it never counts as ending in time. If the head needs blocks
  that only such runs (or blocks not held by any run given) free, its start cannot be predicted:
  the reservation's `at` is None and its blocks are those the head would take on the idle fleet
  (the same from one decision to the next). Runs without a limit are then kept off those blocks,
  runs with one may use them (each ends by its limit).
- A scheduled run (dstack's `schedule`) is not eligible before its time: a run whose `not_before`
  is after `now` is left out of the decision altogether (not started, not the head, not refused,
  held or reserved for). From its time on it is a waiting run like any other; the caller gives
  that time as its `submitted_at`, so it queues (and ages) from then.
- A multi-node run (gang) is placed whole by `place_gang` or not at all; it waits, and reserves,
  as one.
- A run that does not fit even on the idle fleet (more GPUs of a model than any ready host, more
  nodes than a `placement: cluster` fleet has, ...) is refused with why, never queued: by the first
  decision that looks at it (the head, and the runs within `depth` behind it); `never_fits` gives
  the same answer for a run being submitted. Whether a request fits the idle fleet is remembered
  across decisions, keyed by the fleet's make-up and the request's fields (a cache, not state: the
  answer is the same either way).

Starvation. With `max_duration` enforced (a run is stopped at its limit), a reservation never moves
later from one decision to the next: runs expected to end by then still do, and every run started
since either ends by then or left the head room. So the head starts no later than the time reserved
when it became head, unless a run of higher effective priority arrives. Aging bounds that: a run of
priority p can be overtaken only by runs submitted less than (101 - p) x `aging_s` after it, so it
reaches the head after finitely many others, whatever stream of smaller or higher-priority runs
follows. Runs that backfill past it never delay it once it is the head. (What the guarantee cannot
cover: a head whose blocks are held by runs without a limit waits until those runs end.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from heapq import merge
from operator import attrgetter, itemgetter

from gpufleet.allocator import (
    BlockSlot,
    HostIndex,
    HostSlots,
    NoCapacity,
    Placement,
    Request,
    gpu_matches,
    place,
    place_gang,
)
from gpufleet.fairshare import Usage
from gpufleet.models import GPU, GPUSpec

AGING_S = 3600.0  # one point of priority per hour waited
BACKFILL_DEPTH = 500  # runs behind the head that backfill considers per decision (Slurm's bf_max_job_test default)
PRIORITY_DEFAULT = 50

BlockRef = tuple[int, int]  # (instance_id, block idx)


@dataclass(frozen=True)
class Waiting:
    """A queued run: what it asks for, when it was submitted, its dstack `priority` and
    `max_duration` (seconds; None: no limit)."""

    run_id: str
    request: Request
    submitted_at: float
    nodes: int = 1
    priority: int = PRIORITY_DEFAULT
    max_duration: float | None = None
    user: str = ""
    project: str = ""
    not_before: float | None = None  # a scheduled run's next start: not eligible before it

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 100:
            raise ValueError(f"run {self.run_id}: priority {self.priority} is not in 0..100")
        if self.nodes < 1:
            raise ValueError(f"run {self.run_id}: nodes must be at least 1")
        if self.max_duration is not None and not self.max_duration > 0:
            raise ValueError(f"run {self.run_id}: max_duration must be positive (None: no limit)")
        # runs with the same request object and nodes place alike within a decision (and, with the
        # same max_duration, take the same backfill path): what fails for one fails for the others
        object.__setattr__(self, "_fit", (id(self.request), self.nodes))
        object.__setattr__(self, "_path", hash((id(self.request), self.nodes, self.max_duration)))
        object.__setattr__(self, "_submission", (self.submitted_at, self.run_id))
        object.__setattr__(self, "_quota_key", (self.project, self.user, id(self.request), self.nodes))
        object.__setattr__(self, "_shortest", (-self.priority, math.inf if self.max_duration is None
                                               else self.max_duration))


@dataclass(frozen=True)
class Running:
    """A run holding blocks, and when it is expected to end (its start plus its max_duration;
    None: no limit, never assumed to end). ``gpus``: the model name of each GPU it holds (what
    quotas count; its length is its GPU count)."""

    run_id: str
    blocks: tuple[BlockRef, ...]
    ends_at: float | None = None
    user: str = ""
    project: str = ""
    gpus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_end", math.inf if self.ends_at is None else self.ends_at)


@dataclass(frozen=True)
class Start:
    run: Waiting
    placements: tuple[Placement, ...]  # rank 0 first
    backfill: bool = False  # started ahead of a reserved run
    ends_at: float | None = None  # now + max_duration

    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return tuple((p.host.instance_id, b) for p in self.placements for b in p.blocks)


@dataclass(frozen=True)
class Reservation:
    run_id: str
    at: float | None  # earliest start; None: not predictable (waits on runs without a limit)
    blocks: tuple[BlockRef, ...]


@dataclass(frozen=True)
class Refusal:
    run_id: str
    reason: str


@dataclass(frozen=True)
class Held:
    """A run that would go over a quota if it started: it waits, with why."""

    run_id: str
    reason: str


@dataclass(frozen=True)
class Quota:
    """At most ``gpus`` GPUs running at once in ``project`` (``user`` None), or for ``user`` in
    it; ``gpu`` set: only GPUs of that model count (matched as a requested GPU name is)."""

    project: str
    user: str | None = None
    gpu: str | None = None
    gpus: int = 0


@dataclass(frozen=True)
class Decision:
    starts: tuple[Start, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    refused: tuple[Refusal, ...] = ()
    held: tuple[Held, ...] = ()


_BY_SUBMISSION = attrgetter("_submission")
_PRIORITY = attrgetter("priority")
_FIT = attrgetter("_fit")
_PATH = attrgetter("_path")
_END = attrgetter("_end")
_SHORTEST = attrgetter("_shortest")
_FIRST = itemgetter(0)


def order_key(now: float, aging_s: float | None = AGING_S,
              usage: Usage | None = None) -> Callable[[Waiting], tuple]:
    """The queue's order: effective priority (aged, a whole number), then, with ``usage`` (fair
    share), the decayed usage of the run's project, then of its user in the project, then
    submission time, then run id."""
    if aging_s:
        def prio(r: Waiting) -> int:
            return r.priority + int(max(0.0, now - r.submitted_at) // aging_s)
    else:
        prio = _PRIORITY
    if usage is None:
        return lambda r: (-prio(r), r.submitted_at, r.run_id)
    projects, users = usage.projects, usage.users
    return lambda r: (-prio(r), projects.get(r.project, 0.0), users.get((r.project, r.user), 0.0), r.submitted_at,
                      r.run_id)


def ordered(waiting: Sequence[Waiting], now: float, aging_s: float | None = AGING_S,
            usage: Usage | None = None) -> list[Waiting]:
    """``waiting`` in the queue's order (``order_key``). With one priority and no fair share, aging
    changes nothing: submission order it is."""
    by_submission = sorted(waiting, key=_BY_SUBMISSION)
    if usage is None:
        if len(set(map(_PRIORITY, by_submission))) <= 1:
            return by_submission
        return sorted(by_submission, key=order_key(now, aging_s))
    # order_key's, less its last two fields: the sort is stable and the runs are in submission order
    projects, users = usage.projects, usage.users
    shares: dict[tuple[str, str], tuple[float, float]] = {}
    for r in by_submission:
        pair = (r.project, r.user)
        if pair not in shares:
            shares[pair] = (projects.get(r.project, 0.0), users.get(pair, 0.0))
    if aging_s:
        return sorted(by_submission, key=lambda r: (-r.priority - int(max(0.0, now - r.submitted_at) // aging_s),
                                                    shares[r.project, r.user]))
    return sorted(by_submission, key=lambda r: (-r.priority, shares[r.project, r.user]))


def eligible(waiting: Sequence[Waiting], now: float) -> Sequence[Waiting]:
    """``waiting`` less the scheduled runs whose time has not come (order kept)."""
    if all(r.not_before is None or r.not_before <= now for r in waiting):
        return waiting
    return [r for r in waiting if r.not_before is None or r.not_before <= now]


def decide(waiting: Sequence[Waiting], hosts: HostIndex | Sequence[HostSlots], running: Sequence[Running],
           now: float, *, cluster_fleets: Collection[str] = (), aging_s: float | None = AGING_S,
           in_order: bool = False, depth: int | None = BACKFILL_DEPTH, quotas: Sequence[Quota] = (),
           usage: Usage | None = None) -> Decision:
    """Which of ``waiting`` start now and where, the reservation kept, the runs refused, and the
    runs held by a quota.

    ``in_order``: the caller vouches that ``waiting`` is already in the queue's order (as
    ``ordered`` returns it, with the same ``usage``; a queue kept in that order, or read with ORDER
    BY), so it is not sorted again: a decision then costs nothing per queued run beyond the
    ``depth`` runs behind the head that backfill looks at (None: all), and, with quotas, a
    look-up per queued run. ``quotas``: the caps in force (``Quota``); ``usage``: decayed
    GPU-hours for fair share (``fairshare.decayed_usage``; None: no fair share). Nothing given is
    changed (a HostIndex is copied before anything is tried on it)."""
    base = hosts if isinstance(hosts, HostIndex) else HostIndex(list(hosts))
    waiting = eligible(waiting, now)
    queue = waiting if in_order else ordered(waiting, now, aging_s, usage)
    caps = _Caps(quotas, running) if quotas else None
    return _Decider(base, frozenset(cluster_fleets), now, caps).run(queue, running, depth)


# ---------------------------------------------------------------------------------------------------------------
# internals


def _free_gpus(host: HostSlots) -> int:
    return sum([len(b.gpus) for b in host.blocks if b.free])


def _block(host: HostSlots, idx: int) -> BlockSlot | None:
    blocks = host.blocks
    if 0 <= idx < len(blocks) and blocks[idx].idx == idx:
        return blocks[idx]
    return next((b for b in blocks if b.idx == idx), None)


def _with(host: HostSlots, idxs: Collection[int], free: bool) -> HostSlots:
    blocks = [BlockSlot(b.idx, b.gpus, b.cpus, b.memory_mib, b.numa_node, free) if b.idx in idxs and b.free != free
              else b for b in host.blocks]
    return HostSlots(host.instance_id, host.fleet, host.num, host.alias, host.gpus, blocks, host.shape,
                     traits=host.traits)


class _View:
    """A changeable copy of the fleet's blocks, and how many hosts have k free GPUs: enough for a
    cheap necessary condition (some ``nodes`` hosts with the run's GPUs free) before the allocator
    is asked."""

    def __init__(self, index: HostIndex):
        self.index = index
        self.hist: dict[int, int] = {}
        self.spread_used: dict[str, set[int]] = {}  # a spread group's hosts placed on in this view
        for leader, count in index.groups():
            k = _free_gpus(leader)
            self.hist[k] = self.hist.get(k, 0) + count

    def copy(self) -> _View:
        other = _View.__new__(_View)
        other.index, other.hist = self.index.copy(), dict(self.hist)
        other.spread_used = {k: set(v) for k, v in self.spread_used.items()}
        return other

    def hosts_with(self, gpus: int) -> int:
        return sum(c for k, c in self.hist.items() if k >= gpus)

    def might_fit(self, run: Waiting) -> bool:
        g = run.request.gpu_min
        return g == 0 or self.hosts_with(g) >= run.nodes

    def set(self, iid: int, idxs: Collection[int], free: bool) -> HostSlots | None:
        """Mark blocks free or busy; returns the host as it was."""
        host = self.index.get(iid)
        if host is None:
            return None
        new = _with(host, idxs, free)
        old_k, new_k = _free_gpus(host), _free_gpus(new)
        if old_k != new_k:
            self.hist[old_k] -= 1
            self.hist[new_k] = self.hist.get(new_k, 0) + 1
        self.index.put(new)
        return host

    def restore(self, host: HostSlots) -> None:
        current = self.index.get(host.instance_id)
        old_k, new_k = _free_gpus(current), _free_gpus(host)
        if old_k != new_k:
            self.hist[old_k] -= 1
            self.hist[new_k] = self.hist.get(new_k, 0) + 1
        self.index.put(host)

    def occupy(self, placements: Sequence[Placement]) -> None:
        for p in placements:
            self.set(p.host.instance_id, p.blocks, False)

    def place(self, run: Waiting, clusters: frozenset[str]) -> tuple[Placement, ...] | None:
        if not self.might_fit(run):
            return None
        try:
            if run.nodes == 1:
                group = run.request.spread_group
                if not group:
                    return (place(run.request, self.index),)
                used = self.spread_used.setdefault(group, set())
                p = place(dataclasses.replace(run.request, spread=run.request.spread | used), self.index)
                used.add(p.host.instance_id)
                return (p,)
            return tuple(place_gang(run.request, self.index, run.nodes, clusters))
        except NoCapacity:
            return None


# -- quotas ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _model_spec(name: str) -> GPUSpec:
    return GPUSpec(name=[name])


@lru_cache(maxsize=1024)
def _named_gpu(model: str) -> GPU:
    """A running run's GPU, known by its model name, as the allocator's matching takes it."""
    return GPU(index=0, vendor="", model=model, name=model)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


class _Caps:
    """The quotas in force and the GPUs each counts now: running runs, plus the runs the decision
    starts. A quota of a GPU model counts the GPUs of that model (``gpu_matches`` on the quota's
    name, as a requested GPU name is matched): a running run's ``gpus``, a starting run's
    placement. Before a run is placed, what it would count is its request: all its GPUs
    (``gpu_min`` x nodes) for a quota of no model, and for a model quota the same if every model the
    request names is that one, else none (it may land on other GPUs; its placement decides)."""

    def __init__(self, quotas: Sequence[Quota], running: Sequence[Running]):
        self.quotas = list(quotas)
        self.used = [0] * len(self.quotas)
        self.applying: dict[tuple[str, str], list[int]] = {}
        self.before: dict[tuple, str | None] = {}  # Waiting._quota_key -> over() before placement, until a take
        self.by_project: dict[str, list[int]] = {}
        for i, q in enumerate(self.quotas):
            self.by_project.setdefault(q.project, []).append(i)
        counts: dict[tuple[str, str], int] = {}  # (project, user) -> GPUs its runs hold
        models = any(q.gpu is not None for q in self.quotas)
        held: dict[tuple[str, str], list[str]] = {}  # and which, when a quota counts a model
        for r in running:
            if r.project in self.by_project:
                pair = (r.project, r.user)
                counts[pair] = counts.get(pair, 0) + len(r.gpus)
                if models:
                    held.setdefault(pair, []).extend(r.gpus)
        for pair, n in counts.items():
            for i in self._applying(*pair):
                gpu = self.quotas[i].gpu
                self.used[i] += n if gpu is None else \
                    sum(1 for m in held[pair] if gpu_matches(_named_gpu(m), _model_spec(gpu)))

    def _applying(self, project: str, user: str) -> list[int]:
        out = self.applying.get((project, user))
        if out is None:
            out = self.applying[project, user] = [i for i in self.by_project.get(project, ())
                                                  if self.quotas[i].user in (None, user)]
        return out

    def _need(self, q: Quota, run: Waiting, placements: Sequence[Placement] | None) -> int:
        if placements is not None:
            if q.gpu is None:
                return sum(len(p.gpus) for p in placements)
            spec = _model_spec(q.gpu)
            return sum(1 for p in placements for i in p.gpus if gpu_matches(p.host.gpus[i], spec))
        spec = run.request.gpu
        if q.gpu is not None and not (spec is not None and spec.name and
                                      all(n.lower() == q.gpu.lower() for n in spec.name)):
            return 0
        return run.request.gpu_min * run.nodes

    def over(self, run: Waiting, placements: Sequence[Placement] | None = None) -> str | None:
        """Why starting ``run`` (at ``placements``, or as its request asks) would go over a quota
        that applies to it, or None."""
        if placements is None:  # runs with the same request, nodes, project and user answer alike
            key = run._quota_key
            if key not in self.before:
                self.before[key] = self._over(run, None)
            return self.before[key]
        return self._over(run, placements)

    def _over(self, run: Waiting, placements: Sequence[Placement] | None) -> str | None:
        for i in self._applying(run.project, run.user):
            q = self.quotas[i]
            need = self._need(q, run, placements)
            if need and self.used[i] + need > q.gpus:
                gpus = "GPUs" if q.gpu is None else f"{q.gpu} GPUs"
                why = (f"quota: project {q.project} runs {self.used[i]}/{q.gpus} {gpus}" if q.user is None else
                       f"quota: {q.user} runs {self.used[i]}/{q.gpus} {gpus} of project {q.project}")
                if need > q.gpus:
                    asks = _plural(need, "GPU" if q.gpu is None else f"{q.gpu} GPU")
                    why += f" (the run asks for {asks}, more than the quota of {q.gpus})"
                return why
        return None

    def take(self, run: Waiting, placements: Sequence[Placement]) -> None:
        applying = self._applying(run.project, run.user)
        for i in applying:
            self.used[i] += self._need(self.quotas[i], run, placements)
        if applying:
            self.before.clear()


def _refs(placements: Sequence[Placement]) -> tuple[BlockRef, ...]:
    return tuple((p.host.instance_id, b) for p in placements for b in p.blocks)


@dataclass
class _Reserved:
    run: Waiting
    at: float | None
    placements: tuple[Placement, ...]
    proj: _View | None  # the fleet as expected at ``at`` (None when at is None)
    masked: _View | None = None  # now, with the reserved blocks taken

    @property
    def blocks(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for p in self.placements:
            out.setdefault(p.host.instance_id, set()).update(p.blocks)
        return out


class _Decider:
    def __init__(self, base: HostIndex, clusters: frozenset[str], now: float, caps: _Caps | None = None):
        self.base, self.clusters, self.now, self.caps = base, clusters, now, caps
        self.view = _View(base.copy())
        self.starts: list[Start] = []
        self.refused: list[Refusal] = []
        self.held: dict[str, str] = {}  # run id -> why
        self.never_fits: dict[tuple[int, int], str] = {}  # _fit -> why
        self.fit_ever: set = set()  # _fit of runs that fit on the idle fleet
        self._fleet_sig: frozenset | None = None
        self._idle_reps: HostIndex | None = None
        self._idle_all: list[HostSlots] | None = None

    def run(self, queue: Sequence[Waiting], running: Sequence[Running], depth: int | None) -> Decision:
        started: list[tuple[float | None, tuple[BlockRef, ...]]] = []  # (end, blocks) of runs started here
        no_fit: set = set()  # runs (by _fit) that fit nowhere now: capacity only shrinks during a decision
        res: _Reserved | None = None
        pos = 0
        while pos < len(queue) and res is None:
            run = queue[pos]
            pos += 1
            if self.caps is not None and self._held(run):
                continue
            p = None if run._fit in no_fit else self.view.place(run, self.clusters)
            if p is not None:
                if self.caps is not None and self._held(run, p):
                    continue
                self._start(run, p, False, None, started)
                continue
            no_fit.add(run._fit)
            res = self._reserve(run, running, started)
        if res is not None:
            rest = queue[pos:] if depth is None else queue[pos:pos + depth]
            # backfill candidates: priority, then shortest max_duration, then queue order (sorted is stable)
            self._backfill(sorted(rest, key=_SHORTEST), res, no_fit)
        if self.caps is not None:  # every queued run over a quota is held, not only those looked at
            begun = {s.run.run_id for s in self.starts}
            over, before = self.caps.over, self.caps.before
            for r in queue:
                why = before[r._quota_key] if r._quota_key in before else over(r)
                if why is not None and r.run_id not in self.held and r.run_id not in begun and \
                        r._fit not in self.never_fits and not self._check_never(r):
                    self.held[r.run_id] = why
        if self.never_fits:  # every queued run that never fits is refused, not only the first seen
            done = {r.run_id for r in self.refused}
            self.refused += [Refusal(r.run_id, self.never_fits[r._fit]) for r in queue
                             if r._fit in self.never_fits and r.run_id not in done]
        reservations = () if res is None else (Reservation(res.run.run_id, res.at, _refs(res.placements)),)
        held = tuple(Held(rid, why) for rid, why in self.held.items())
        return Decision(tuple(self.starts), reservations, tuple(self.refused), held)

    def _held(self, run: Waiting, placements: tuple[Placement, ...] | None = None) -> bool:
        """Whether ``run`` waits for a quota (then it is held, with why): it is not started, not
        the head, and blocks no one. A run over a quota that can never fit is refused instead."""
        assert self.caps is not None
        why = self.caps.over(run, placements)
        if why is None:
            return False
        if placements is None and self._check_never(run):
            return True
        self.held[run.run_id] = why
        return True

    def _backfill(self, rest: list[Waiting], res: _Reserved, no_fit: set) -> None:
        """Start what cannot delay the reservation. Runs that take the same path with the same request
        fail alike, so the scan stops once every kind of run left has failed."""
        kinds = list(map(_PATH, rest))
        n = len(kinds)
        first = dict(zip(reversed(kinds), range(n - 1, -1, -1), strict=True))  # kind -> its first position
        last = dict(zip(kinds, range(n), strict=True))  # kind -> its last position
        firsts = sorted(first.values())
        dead: set = set()
        seen: set = set()
        live = 0  # kinds seen that have not failed and have runs left
        no_masked: set = set()
        i = nxt = 0
        while i < n:
            if live <= 0:  # every kind seen so far failed or has nothing left: go to the next kind not seen yet
                while nxt < len(firsts) and kinds[firsts[nxt]] in seen:
                    nxt += 1
                if nxt == len(firsts):
                    break
                i = max(i, firsts[nxt])
            run, kind = rest[i], kinds[i]
            i += 1
            if kind in dead:
                continue
            if kind not in seen:
                seen.add(kind)
                live += 1
            if last[kind] == i - 1:
                live -= 1  # its last run: whatever happens to it, nothing of its kind is left after
            if self.caps is not None and self._held(run):
                continue  # held: its kind may still start
            fit = run._fit
            end = self.now + run.max_duration if run.max_duration is not None else None
            if end is not None and (res.at is None or end <= res.at):  # ends in time: anywhere
                p = None if fit in no_fit else self.view.place(run, self.clusters)
                if p is not None:
                    if self.caps is None or not self._held(run, p):
                        self._start(run, p, True, res)
                else:
                    no_fit.add(fit)
                    dead.add(kind)
                    live -= last[kind] >= i
                    self._check_never(run)
                continue
            if fit not in no_masked:  # runs past it: on blocks the reservation does not need
                if res.masked is None:
                    res.masked = self._masked(res)
                p = res.masked.place(run, self.clusters)
                if p is not None:
                    if self.caps is None or not self._held(run, p):
                        self._start(run, p, True, res, past=True)
                    continue
                no_masked.add(fit)
            if res.at is None:
                dead.add(kind)
                live -= last[kind] >= i
                self._check_never(run)
                continue
            p = None if fit in no_fit else self.view.place(run, self.clusters)
            if p is None:
                no_fit.add(fit)
                dead.add(kind)
                live -= last[kind] >= i
                self._check_never(run)
                continue
            if self.caps is not None and self._held(run, p):
                continue
            moved = self._head_still_fits(res, p)  # or on them, if the head still fits elsewhere then
            if moved is None:
                dead.add(kind)
                live -= last[kind] >= i
                continue
            res.placements, res.masked = moved, None
            no_masked.clear()
            dead = set()  # the reservation moved: what failed against it may not now
            live = sum(1 for k in seen if last[k] >= i)
            self._start(run, p, True, res, past=True, proj_done=True)

    # -- starting, reserving ---------------------------------------------------------------------------------

    def _start(self, run: Waiting, placements: tuple[Placement, ...], backfill: bool, res: _Reserved | None,
               started: list | None = None, past: bool = False, proj_done: bool = False) -> None:
        self.view.occupy(placements)
        if self.caps is not None:
            self.caps.take(run, placements)
        end = self.now + run.max_duration if run.max_duration is not None else None
        if res is not None:
            if res.masked is not None:
                res.masked.occupy(placements)
            if past and res.proj is not None and not proj_done:
                res.proj.occupy(placements)
        elif started is not None:
            started.append((end, _refs(placements)))
        self.starts.append(Start(run, placements, backfill, end))

    def _reserve(self, head: Waiting, running: Sequence[Running], started: list) -> _Reserved | None:
        """The earliest time ``head`` fits as running runs end at their expected ends, and where;
        None if it never fits (then it is refused)."""
        g, n = head.request.gpu_min, head.nodes
        index = self.view.index
        now = self.now
        # expected ends in order, soonest first (runs without a limit last: never reached)
        ends = merge(((r._end, r.blocks) for r in sorted(running, key=_END)),
                     sorted(((e, b) for e, b in started if e is not None), key=_FIRST), key=_FIRST)
        pending: dict[int, set[int]] = {}
        free: dict[int, int] = {}
        enough = self.view.hosts_with(g) if g else 0
        batch = next(ends, None)
        while batch is not None and batch[0] != math.inf:
            t = batch[0] if batch[0] > now else now
            while batch is not None and (batch[0] if batch[0] > now else now) == t:
                for iid, b in batch[1]:
                    host = index.get(iid)
                    block = None if host is None else _block(host, b)
                    if block is None or block.free:
                        continue
                    released = pending.get(iid)
                    if released is None:
                        released = pending[iid] = set()
                        free[iid] = _free_gpus(host)
                    if b in released:
                        continue
                    released.add(b)
                    before = free[iid]
                    free[iid] = before + len(block.gpus)
                    if g and before < g <= free[iid]:
                        enough += 1
                batch = next(ends, None)
            if g and enough < n:
                continue
            proj = self.view.copy()
            for iid, released in pending.items():
                if free[iid] >= g:  # a host left with fewer than the head's GPUs free cannot take it: as is
                    proj.set(iid, released, True)
            p = proj.place(head, self.clusters)
            if p is not None:
                return _Reserved(head, t, p, proj)
        if self._check_never(head):
            return None
        p = (place(head.request, self._idle(1)),) if n == 1 else \
            tuple(place_gang(head.request, self._idle(n), n, self.clusters))
        return _Reserved(head, None, p, None)

    def _masked(self, res: _Reserved) -> _View:
        masked = self.view.copy()
        for iid, idxs in res.blocks.items():
            masked.set(iid, idxs, False)
        return masked

    def _head_still_fits(self, res: _Reserved, placements: tuple[Placement, ...]) -> tuple[Placement, ...] | None:
        """Whether the head still fits at its reserved time with ``placements`` running then; if so,
        where (the projection keeps them, else it is put back as it was)."""
        assert res.proj is not None
        saved = [h for h in (res.proj.set(p.host.instance_id, p.blocks, False) for p in placements) if h is not None]
        moved = res.proj.place(res.run, self.clusters)
        if moved is None:
            for host in reversed(saved):
                res.proj.restore(host)
        return moved

    # -- runs that can never fit -----------------------------------------------------------------------------

    def _idle(self, nodes: int) -> HostIndex | list[HostSlots]:
        """The fleet with every block free: one host per (fleet, shape) for a one-node run (identical
        idle hosts place alike), every host for a gang."""
        if nodes == 1:
            if self._idle_reps is None:
                seen: dict = {}
                for leader, _count in self.base.groups():
                    key = (leader.fleet, leader.shape if leader.shape is not None else ("host", leader.instance_id))
                    if key not in seen or leader.num < seen[key].num:
                        seen[key] = leader
                self._idle_reps = HostIndex([_with(h, [b.idx for b in h.blocks], True) for h in seen.values()])
            return self._idle_reps
        if self._idle_all is None:
            self._idle_all = [_with(h, [b.idx for b in h.blocks], True) for h in self.base.hosts()]
        return self._idle_all

    def _idle_for_check(self, nodes: int) -> HostIndex | list[HostSlots]:
        """Enough of the idle fleet to tell whether a run can ever fit: a gang of n nodes uses at most
        n hosts of each (fleet, shape), and identical idle hosts place alike, so n of each will do."""
        if nodes == 1:
            return self._idle(1)
        counts: dict = {}
        leaders: dict = {}
        for leader, count in self.base.groups():
            key = (leader.fleet, leader.shape if leader.shape is not None else ("host", leader.instance_id))
            counts[key] = counts.get(key, 0) + count
            leaders.setdefault(key, leader)
        out: list[HostSlots] = []
        for key, leader in leaders.items():
            idle = _with(leader, [b.idx for b in leader.blocks], True)
            for _ in range(min(counts[key], nodes)):  # stand-ins: distinct numbers, never returned as a placement
                out.append(HostSlots(-1 - len(out), idle.fleet, -1 - len(out), idle.alias, idle.gpus, idle.blocks,
                                     idle.shape, traits=idle.traits))
        return out

    def _check_never(self, run: Waiting) -> bool:
        """Whether ``run`` can never fit (then it is refused, with every queued run like it)."""
        fit = run._fit
        if fit in self.never_fits:
            return True
        if fit in self.fit_ever:
            return False
        if self._fleet_sig is None:
            self._fleet_sig = _fleet_signature(self.base)
        key = (self._fleet_sig, self.clusters, _request_signature(run.request), run.nodes)
        never = _NEVER_CACHE.get(key)
        why = None
        if never is None or never:
            why = _never_fits(run, self._idle_for_check(run.nodes), self.clusters)
            if len(_NEVER_CACHE) > 10_000:
                _NEVER_CACHE.clear()
            _NEVER_CACHE[key] = why is not None
        if why is None:
            self.fit_ever.add(fit)
            return False
        self.never_fits[fit] = why
        return True


# Whether a request fits on an idle fleet depends only on the fleet's make-up (fleets, host shapes,
# how many of each, which are placement: cluster) and the request: remembered across decisions.
_NEVER_CACHE: dict[tuple, bool] = {}


def _fleet_signature(index: HostIndex) -> frozenset:
    counts: dict = {}
    for leader, count in index.groups():
        shape = leader.shape if leader.shape is not None else (
            "host", leader.instance_id,
            tuple((b.idx, b.gpus, b.cpus, b.memory_mib, b.numa_node) for b in leader.blocks),
            tuple((g.vendor, g.model, g.name, g.memory_mib) for g in leader.gpus))
        key = (leader.fleet, shape)
        counts[key] = counts.get(key, 0) + count
    return frozenset(counts.items())


def _request_signature(req: Request) -> tuple:
    g = req.gpu
    gpu = None if g is None else (tuple(g.name) if g.name else None, g.vendor, g.count, g.memory)
    return gpu, req.cpu, req.memory_gb, req.fleets, req.arch, req.disk


def never_fits(run: Waiting, hosts: HostIndex | Sequence[HostSlots],
               cluster_fleets: Collection[str] = ()) -> str | None:
    """Why ``run`` cannot start on ``hosts`` (the ready hosts) even with every block free, or None if it can."""
    listed = hosts.hosts() if isinstance(hosts, HostIndex) else list(hosts)
    return _never_fits(run, [_with(h, [b.idx for b in h.blocks], True) for h in listed], cluster_fleets)


def _never_fits(run: Waiting, idle: HostIndex | Sequence[HostSlots], cluster_fleets: Collection[str]) -> str | None:
    try:
        if run.nodes == 1:
            place(run.request, idle)
        else:
            place_gang(run.request, idle if isinstance(idle, HostIndex) else list(idle), run.nodes,
                       set(cluster_fleets))
        return None
    except NoCapacity as e:
        hosts = idle.hosts() if isinstance(idle, HostIndex) else list(idle)
        req = run.request
        considered = [h for h in hosts if not req.fleets or h.fleet in req.fleets]
        if run.nodes == 1 and req.gpu_min and considered:
            most = max(sum(len(b.gpus) for b in h.blocks if b.gpus and
                           all(gpu_matches(h.gpus[i], req.gpu) for i in b.gpus)) for h in considered)
            if most < req.gpu_min:
                named = req.gpu is not None and bool(req.gpu.name or req.gpu.vendor or req.gpu.memory)
                return (f"never fits: it asks for {req.describe()} on one host and the most any ready host has "
                        f"is {most}{' matching' if named else ''}")
        return f"never fits, even with every block free: {e}"

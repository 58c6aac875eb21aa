"""Which waiting runs start now, and where: one pure function, no I/O, no clock, no state kept.

    decide(waiting, hosts, running, now, cluster_fleets=()) -> Decision(starts, reservations, refused)

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
- Runs start in that order while they fit. The first that does not (the *head*) gets the one
  reservation kept (EASY style): the earliest time it fits once running runs end at their expected
  ends, and the blocks it would take then.
- A run behind the head starts now (backfill) only if that cannot delay the reservation: it ends,
  by its own `max_duration`, no later than the reserved time; or the blocks it takes are not the
  reserved ones; or, if they are, the head still fits at the reserved time with it running (the
  reservation then moves to those other blocks). A run that fits only by delaying the head waits.
- A run without `max_duration` cannot be assumed to end. Its blocks are never counted as freed when
  the reservation is worked out, and it never counts as ending in time. If the head needs blocks
  that only such runs (or blocks not held by any run given) free, its start cannot be predicted:
  the reservation's `at` is None and its blocks are those the head would take on the idle fleet
  (the same from one decision to the next). Runs without a limit are then kept off those blocks,
  runs with one may use them (each ends by its limit).
- A multi-node run (gang) is placed whole by `place_gang` or not at all; it waits, and reserves,
  as one.
- A run that does not fit even on the idle fleet (more GPUs of a model than any ready host, more
  nodes than a `placement: cluster` fleet has, ...) is refused at once with why, never queued.

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

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop

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

AGING_S = 3600.0  # one point of priority per hour waited
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

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 100:
            raise ValueError(f"run {self.run_id}: priority {self.priority} is not in 0..100")
        if self.nodes < 1:
            raise ValueError(f"run {self.run_id}: nodes must be at least 1")
        if self.max_duration is not None and not self.max_duration > 0:
            raise ValueError(f"run {self.run_id}: max_duration must be positive (None: no limit)")


@dataclass(frozen=True)
class Running:
    """A run holding blocks, and when it is expected to end (its start plus its max_duration;
    None: no limit, never assumed to end)."""

    run_id: str
    blocks: tuple[BlockRef, ...]
    ends_at: float | None = None


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
class Decision:
    starts: tuple[Start, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    refused: tuple[Refusal, ...] = ()


def order_key(now: float, aging_s: float | None = AGING_S) -> Callable[[Waiting], tuple]:
    """The queue's order: effective priority (aged), then submission time, then run id."""
    if aging_s:
        return lambda r: (-(r.priority + max(0.0, now - r.submitted_at) // aging_s), r.submitted_at, r.run_id)
    return lambda r: (-r.priority, r.submitted_at, r.run_id)


def decide(waiting: Sequence[Waiting], hosts: HostIndex | Sequence[HostSlots], running: Sequence[Running],
           now: float, *, cluster_fleets: Collection[str] = (), aging_s: float | None = AGING_S) -> Decision:
    """Which of ``waiting`` start now and where, the reservation kept, and the runs refused.

    Nothing given is changed (a HostIndex is copied before anything is tried on it)."""
    base = hosts if isinstance(hosts, HostIndex) else HostIndex(list(hosts))
    return _Decider(base, frozenset(cluster_fleets), now).run(sorted(waiting, key=order_key(now, aging_s)), running)


# ---------------------------------------------------------------------------------------------------------------
# internals


def _free_gpus(host: HostSlots) -> int:
    return sum(len(b.gpus) for b in host.blocks if b.free)


def _block(host: HostSlots, idx: int) -> BlockSlot | None:
    blocks = host.blocks
    if 0 <= idx < len(blocks) and blocks[idx].idx == idx:
        return blocks[idx]
    return next((b for b in blocks if b.idx == idx), None)


def _with(host: HostSlots, idxs: Collection[int], free: bool) -> HostSlots:
    blocks = [BlockSlot(b.idx, b.gpus, b.cpus, b.memory_mib, b.numa_node, free) if b.idx in idxs and b.free != free
              else b for b in host.blocks]
    return HostSlots(host.instance_id, host.fleet, host.num, host.alias, host.gpus, blocks, host.shape)


def _key(run: Waiting) -> tuple[int, int]:
    return id(run.request), run.nodes


class _View:
    """A changeable copy of the fleet's blocks, and how many hosts have k free GPUs: enough for a
    cheap necessary condition (some ``nodes`` hosts with the run's GPUs free) before the allocator
    is asked."""

    def __init__(self, index: HostIndex):
        self.index = index
        self.hist: dict[int, int] = {}
        for leader, count in index.groups():
            k = _free_gpus(leader)
            self.hist[k] = self.hist.get(k, 0) + count

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
                return (place(run.request, self.index),)
            return tuple(place_gang(run.request, self.index, run.nodes, clusters))
        except NoCapacity:
            return None


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
    def __init__(self, base: HostIndex, clusters: frozenset[str], now: float):
        self.base, self.clusters, self.now = base, clusters, now
        self.view = _View(base.copy())
        self.starts: list[Start] = []
        self.refused: list[Refusal] = []
        self.never: dict[tuple[int, int], str | None] = {}
        self._idle_reps: HostIndex | None = None
        self._idle_all: list[HostSlots] | None = None

    def run(self, queue: list[Waiting], running: Sequence[Running]) -> Decision:
        ends: list[tuple[float | None, tuple[BlockRef, ...]]] = [(r.ends_at, r.blocks) for r in running]
        res: _Reserved | None = None
        no_fit: set = set()  # keys that fit nowhere now (capacity only shrinks during a decision)
        no_masked: set = set()
        no_move: set = set()
        for run in queue:
            key = _key(run)
            if res is None:
                p = None if key in no_fit else self.view.place(run, self.clusters)
                if p is not None:
                    self._start(run, p, False, ends)
                    continue
                no_fit.add(key)
                if self._refuse_if_never(run):
                    continue
                res = self._reserve(run, ends)
                continue
            # behind the reservation: backfill only what cannot delay it
            if key in no_fit:
                self._refuse_if_never(run)
                continue
            end = self.now + run.max_duration if run.max_duration is not None else None
            if end is not None and (res.at is None or end <= res.at):
                p = self.view.place(run, self.clusters)
                if p is not None:
                    self._start(run, p, True, ends, res)
                else:
                    no_fit.add(key)
                    self._refuse_if_never(run)
                continue
            if key not in no_masked:
                if res.masked is None:
                    res.masked = self._masked(res)
                p = res.masked.place(run, self.clusters)
                if p is not None:
                    self._start(run, p, True, ends, res, past=True)
                    continue
                no_masked.add(key)
            if res.at is None or key in no_move:
                continue
            p = self.view.place(run, self.clusters)
            if p is None:
                no_fit.add(key)
                self._refuse_if_never(run)
                continue
            moved = self._head_still_fits(res, p)
            if moved is None:
                no_move.add(key)
                continue
            res.placements, res.masked = moved, None
            no_masked.clear()
            self._start(run, p, True, ends, res, past=True, proj_done=True)
        reservations = () if res is None else (Reservation(res.run.run_id, res.at, _refs(res.placements)),)
        return Decision(tuple(self.starts), reservations, tuple(self.refused))

    # -- starting, reserving ---------------------------------------------------------------------------------

    def _start(self, run: Waiting, placements: tuple[Placement, ...], backfill: bool, ends: list,
               res: _Reserved | None = None, past: bool = False, proj_done: bool = False) -> None:
        self.view.occupy(placements)
        end = self.now + run.max_duration if run.max_duration is not None else None
        if res is not None:
            if res.masked is not None:
                res.masked.occupy(placements)
            if past and res.proj is not None and not proj_done:
                res.proj.occupy(placements)
        else:
            ends.append((end, _refs(placements)))
        self.starts.append(Start(run, placements, backfill, end))

    def _reserve(self, head: Waiting, ends: list) -> _Reserved:
        """The earliest time ``head`` fits as running runs end at their expected ends, and where."""
        g, n = head.request.gpu_min, head.nodes
        index = self.view.index
        heap = [(max(end, self.now), i) for i, (end, _) in enumerate(ends) if end is not None]
        heapify(heap)
        pending: dict[int, set[int]] = {}
        free: dict[int, int] = {}
        enough = self.view.hosts_with(g) if g else 0
        while heap:
            t = heap[0][0]
            while heap and heap[0][0] == t:
                for iid, b in ends[heappop(heap)[1]][1]:
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
            if g and enough < n:
                continue
            proj = _View(index.copy())
            for iid, released in pending.items():
                proj.set(iid, released, True)
            p = proj.place(head, self.clusters)
            if p is not None:
                return _Reserved(head, t, p, proj)
        p = (place(head.request, self._idle(1)),) if n == 1 else \
            tuple(place_gang(head.request, self._idle(n), n, self.clusters))
        return _Reserved(head, None, p, None)

    def _masked(self, res: _Reserved) -> _View:
        masked = _View(self.view.index.copy())
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
                for host in self.base.hosts():
                    key = (host.fleet, host.shape if host.shape is not None else ("host", host.instance_id))
                    if key not in seen:
                        seen[key] = _with(host, [b.idx for b in host.blocks], True)
                self._idle_reps = HostIndex(list(seen.values()))
            return self._idle_reps
        if self._idle_all is None:
            self._idle_all = [_with(h, [b.idx for b in h.blocks], True) for h in self.base.hosts()]
        return self._idle_all

    def _refuse_if_never(self, run: Waiting) -> bool:
        key = _key(run)
        if key not in self.never:
            self.never[key] = _never_fits(run, self._idle(run.nodes), self.clusters)
        why = self.never[key]
        if why is not None:
            self.refused.append(Refusal(run.run_id, why))
        return why is not None


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

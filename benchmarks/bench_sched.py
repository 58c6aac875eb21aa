"""Scheduling on real GPU-cluster job traces: gpufleet's scheduler (gpufleet/scheduler.py, called
unchanged, one `decide` per moment something happens) against two references implemented here:
plain FIFO (no backfill) and EASY backfill (Mu'alem & Feitelson 2001).

Traces: ../shared/fixtures/gpu-job-traces/ (see its SOURCE.md; read from there, never copied into
the project), format job_id,submit_s,gpus,nodes,duration_s. Each is replayed whole on a fleet sized
to it (FLEETS below) of 8-GPU hosts with one block per GPU, the allocator's placement for every
policy. A job of at most 8 GPUs runs on one host; a job of more runs as a gang of ceil(gpus / 8)
whole hosts (the traces carry no node counts), and holds all their GPUs.

What each policy knows:
- FIFO and EASY know every job's true duration (EASY uses it for its shadow time and its backfill
  test; FIFO does not need it).
- gpufleet knows only a dstack-style `max_duration` per job, as a user would set one: the job's
  true duration rounded up to the next of 1h, 4h, 12h, 48h, 7d, 30d, 90d (LIMITS). The job still
  runs its true duration (it ends before its limit, as a run the server stops at its limit would).

EASY (reference): the queue in submission order; jobs start in order while they fit; the first that
does not (the head) gets a shadow time: the earliest true end of running jobs after which it fits
(per-host free GPUs, exact for these uniform 1-GPU-block hosts). A later job that fits now starts
if it ends (true duration) by the shadow time, or if the head still fits at the shadow time with it
running (the per-host form of EASY's "extra nodes").

Fair share and quotas (`python -m benchmarks.bench_sched fairshare [skip_days days]`, the table in
benchmarks/README.md): each Philly job's project is its virtual cluster (the prefix of its job id;
no trace here names users, so every user is ""). gpufleet is replayed on a window of the trace
without fair share, with it (`decide` gets the decayed usage of the simulated history at each
decision, half-life 7 days, through fairshare.UsageMeter), and with it plus a per-project quota;
per project: its share of the GPU-hours held while the window submits, against an equal share
(1 / projects with a job), its offered share and its mean wait; summaries: the largest distance
from the equal share and Jain's fairness index of the shares.

Metrics per trace and policy: utilization (GPU-seconds held while the trace is submitting, over the
fleet's GPU-seconds in that span), wait (start - submit: mean, p50, p95, max), bounded slowdown
(mean of max(1, (wait + run) / max(run, 10 s))), jobs that never started, and for gpufleet the
heads that started after the time first reserved for them (a broken reservation: 0 when every job
ends within its max_duration).
"""

from __future__ import annotations

import csv
import heapq
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from gpufleet.allocator import BlockSlot, HostIndex, HostSlots, NoCapacity, Request, place, place_gang
from gpufleet.fairshare import HALF_LIFE_DEFAULT, UsageMeter
from gpufleet.models import GPU, GPUSpec
from gpufleet.scheduler import Quota, Running, Waiting, decide

GPUS = 8
TAU = 10.0  # bounded slowdown's floor on run time, seconds
LIMITS = (3600, 4 * 3600, 12 * 3600, 48 * 3600, 7 * 86400, 30 * 86400, 90 * 86400)
TRACE_DIR = Path(os.environ.get("GPUFLEET_TRACES") or
                 Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "gpu-job-traces")
# trace -> (file, hosts of 8 GPUs)
FLEETS = {
    "philly-2017": ("philly-2017.csv", 64),  # 512 GPUs: one of Philly's 64-node VCs; mean offered load 374 GPUs
    # 720 GPUs: Venus had 1,022 with ~740 GPUs of offered load; the file's 48 h cap removed 29% of its
    # GPU-hours (offered load 521 left), so the fleet is shrunk alike to keep the real load, ~72%
    # (on 128 x 8 almost nothing waits: mean wait 1 s)
    "helios-venus-2020": ("helios-venus-2020.csv", 90),
    "alibaba-openb-2023": ("alibaba-openb-2023.csv", 4),  # 32 GPUs: mean offered load 22
}
POLICIES = ("gpufleet", "easy", "fifo")
FLEET = "sim"
MODEL = "H100"
# Philly's job ids are `<virtual cluster>-<row>` (SOURCE.md): the virtual cluster is the job's project.
# No trace here names users: every job's user is "".
_PROJECT = re.compile(r"([0-9a-f]{6})-[0-9]+")


def project_of(job_id: str) -> str:
    """The project of a trace's job: Philly's virtual cluster, the prefix of its job id; "" where
    the id carries none (Helios, Alibaba)."""
    m = _PROJECT.fullmatch(job_id)
    return m.group(1) if m else ""


def limit_for(duration: float) -> float:
    return next((x for x in LIMITS if x >= duration), math.ceil(duration / LIMITS[-1]) * LIMITS[-1])


def window(rows, skip_days: float, days: float) -> list[tuple[str, int, int, int, int]]:
    """The rows submitted within [skip_days, skip_days + days), times re-based to the window's start."""
    lo, hi = skip_days * 86400, (skip_days + days) * 86400
    return [(j, int(t - lo), g, n, d) for j, t, g, n, d in rows if lo <= t < hi]


def load(name: str, limit: int | None = None) -> list[tuple[str, int, int, int, int]]:
    """(job_id, submit_s, gpus, nodes, duration_s) rows of a trace, in submission order."""
    path = TRACE_DIR / FLEETS[name][0]
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows)
        out = []
        for row in rows:
            out.append((row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4])))
            if limit is not None and len(out) >= limit:
                break
    return out


def host_gpus(h: int) -> list[GPU]:
    return [GPU(index=i, vendor="nvidia", name="NVIDIA H100 80GB HBM3", model="H100", memory_mib=81559,
                uuid=f"GPU-{h}-{i}", numa_node=i // 4) for i in range(GPUS)]


class Fleet:
    """Simulated hosts kept in a HostIndex, as the state store keeps the real ones."""

    SHAPE = ("H100x8", tuple(range(GPUS)))

    def __init__(self, hosts: int):
        self.gpus = [host_gpus(h) for h in range(hosts)]
        self.free = [[True] * GPUS for _ in range(hosts)]
        self.free_count = [GPUS] * hosts
        self.hist = [0] * GPUS + [hosts]  # free GPUs -> hosts
        self.index = HostIndex([self._slots(h) for h in range(hosts)])

    def hosts_with(self, gpus: int) -> int:
        return sum(self.hist[gpus:])

    def _slots(self, h: int) -> HostSlots:
        return HostSlots(h, FLEET, h, f"node-{h}", self.gpus[h],
                         [BlockSlot(i, (i,), 8, 1024, i // 4, self.free[h][i]) for i in range(GPUS)], self.SHAPE)

    def set(self, blocks, free: bool) -> None:
        touched = set()
        for h, b in blocks:
            assert self.free[h][b] != free, (h, b, free)
            self.free[h][b] = free
            self.hist[self.free_count[h]] -= 1
            self.free_count[h] += 1 if free else -1
            self.hist[self.free_count[h]] += 1
            touched.add(h)
        for h in touched:
            self.index.put(self._slots(h))


class Job:
    __slots__ = ("idx", "job_id", "project", "submit", "gpus", "nodes", "per_node", "duration", "limit", "start",
                 "blocks", "waiting", "reserved_at")

    def __init__(self, idx, job_id, submit, gpus, nodes, duration):
        self.idx, self.job_id, self.submit, self.duration = idx, job_id, submit, duration
        self.project = project_of(job_id)
        if gpus <= GPUS and nodes <= 1:
            self.nodes, self.per_node = 1, gpus
        else:
            self.nodes = max(nodes, math.ceil(gpus / GPUS))
            self.per_node = GPUS
        self.gpus = self.nodes * self.per_node  # GPUs held
        self.limit = limit_for(duration)
        self.start: float | None = None
        self.blocks: tuple = ()
        self.waiting: Waiting | None = None
        self.reserved_at: float | None = None


def _requests() -> dict[int, Request]:
    return {g: Request(gpu=GPUSpec.model_validate(g)) for g in range(1, GPUS + 1)}


def simulate(rows, hosts: int, policy: str, *, fair_share: bool = False, quotas: Sequence[Quota] = (),
             half_life_s: float = HALF_LIFE_DEFAULT) -> dict:
    """Replay ``rows`` on ``hosts`` 8-GPU hosts under ``policy``; every job runs its true duration.
    gpufleet only: ``fair_share`` feeds ``decide`` the decayed usage of the simulated history at
    each decision (fairshare.UsageMeter, the closed form of fairshare.decayed_usage kept up to
    date), ``quotas`` are passed to it as they are."""
    fleet = Fleet(hosts)
    meter = UsageMeter(half_life_s) if fair_share else None
    requests = _requests()
    jobs = [Job(i, *row) for i, row in enumerate(rows)]
    by_id = {}
    refused = [j for j in jobs if j.nodes > hosts]
    arrivals = [j for j in jobs if j.nodes <= hosts]
    ends: list[tuple[float, int]] = []  # (end, job idx)
    waiting: dict[int, Job] = {}
    running: dict[int, Job] = {}
    running_views: dict[int, Running] = {}
    sizes: dict[tuple[int, int], int] = {}  # (GPUs per node, nodes) -> jobs waiting
    queue: dict[int, Waiting] = {}  # gpufleet's queue, in submission order
    decisions = 0
    t0 = time.perf_counter()

    def start(job: Job, blocks, now: float) -> None:
        fleet.set(blocks, False)
        job.start, job.blocks = now, tuple(blocks)
        del waiting[job.idx]
        queue.pop(job.idx, None)
        sizes[job.per_node, job.nodes] -= 1
        running[job.idx] = job
        if policy == "gpufleet":
            running_views[job.idx] = Running(str(job.idx), job.blocks, now + job.limit, project=job.project,
                                             gpus=(MODEL,) * len(job.blocks))
            if meter is not None:
                meter.start(job.project, "", job.gpus, now)
        heapq.heappush(ends, (now + job.duration, job.idx))

    i = 0
    while i < len(arrivals) or ends:
        now = min(arrivals[i].submit if i < len(arrivals) else math.inf, ends[0][0] if ends else math.inf)
        while ends and ends[0][0] == now:
            job = jobs[heapq.heappop(ends)[1]]
            fleet.set(job.blocks, True)
            del running[job.idx]
            running_views.pop(job.idx, None)
            if meter is not None:
                meter.end(job.project, "", job.gpus, job.start, now)
        while i < len(arrivals) and arrivals[i].submit == now:
            job = arrivals[i]
            waiting[job.idx] = job
            sizes[job.per_node, job.nodes] = sizes.get((job.per_node, job.nodes), 0) + 1
            if policy == "gpufleet":
                job.waiting = Waiting(f"{job.idx:07d}", requests[job.per_node], job.submit, nodes=job.nodes,
                                      max_duration=job.limit, project=job.project)
                by_id[job.waiting.run_id] = job
                queue[job.idx] = job.waiting
            i += 1
        if not waiting:
            continue
        decisions += 1
        if policy == "gpufleet":
            # the queue is kept in its order (submission, one priority), as the server reads it; with fair
            # share its order changes with usage, so decide sorts it
            d = decide(list(queue.values()), fleet.index, list(running_views.values()), now,
                       cluster_fleets=(FLEET,), in_order=meter is None, quotas=quotas,
                       usage=None if meter is None else meter.usage(now))
            for s in d.starts:
                start(by_id[s.run.run_id], s.blocks, now)
            for r in d.reservations:
                job = by_id[r.run_id]
                if job.reserved_at is None and r.at is not None:
                    job.reserved_at = r.at
            for r in d.refused:
                job = by_id[r.run_id]
                del waiting[job.idx]
                del queue[job.idx]
                sizes[job.per_node, job.nodes] -= 1
                refused.append(job)
        else:
            _reference(policy, waiting, running, fleet, requests, now, start, sizes)
    took = time.perf_counter() - t0
    return _metrics(jobs, refused, hosts, policy, took, decisions)


def _place(job: Job, fleet: Fleet, requests) -> tuple | None:
    try:
        if job.nodes == 1:
            p = place(requests[job.per_node], fleet.index)
            return tuple((p.host.instance_id, b) for b in p.blocks)
        ps = place_gang(requests[job.per_node], fleet.index, job.nodes, {FLEET})
        return tuple((p.host.instance_id, b) for p in ps for b in p.blocks)
    except NoCapacity:
        return None


def _fits_count(free: dict[int, int], job: Job) -> bool:
    return sum(1 for f in free.values() if f >= job.per_node) >= job.nodes


def _reference(policy: str, waiting: dict[int, Job], running: dict[int, Job], fleet: Fleet, requests, now: float,
               start, sizes: dict) -> None:
    """FIFO: start jobs in submission order while they fit. EASY: then backfill behind the first that
    does not, as the module docstring says. Jobs of the same size (GPUs per node, nodes) fit alike:
    once one does not fit now, or would delay the head, the others are not tried again this pass."""
    queue = list(waiting.values())  # submission order
    k = 0
    while k < len(queue):
        job = queue[k]
        if fleet.hosts_with(job.per_node) < job.nodes:
            break
        blocks = _place(job, fleet, requests)
        if blocks is None:
            break
        start(job, blocks, now)
        k += 1
    if policy == "fifo" or k >= len(queue):
        return
    head = queue[k]
    # shadow time: release running jobs in order of their true end until the head fits
    free = dict(enumerate(fleet.free_count))
    enough = sum(1 for f in free.values() if f >= head.per_node)
    order = [(j.start + j.duration, j.idx) for j in running.values()]
    heapq.heapify(order)
    shadow = None
    while order:
        end, idx = heapq.heappop(order)
        for h, _b in running[idx].blocks:
            free[h] += 1
            if free[h] == head.per_node:
                enough += 1
        if enough >= head.nodes:
            shadow = end
            break
    assert shadow is not None
    no_fit: set = set()
    no_past: set = set()
    live = {size for size, count in sizes.items() if count}
    for job in queue[k + 1:]:
        size = (job.per_node, job.nodes)
        if size in no_fit:
            if len(no_fit) >= len(live):
                break
            continue
        in_time = now + job.duration <= shadow
        if not in_time and size in no_past:
            continue
        blocks = None if fleet.hosts_with(job.per_node) < job.nodes else _place(job, fleet, requests)
        if blocks is None:
            no_fit.add(size)
            continue
        if in_time:
            start(job, blocks, now)
            continue
        for h, _b in blocks:  # it runs past the shadow time: the head must still fit then
            free[h] -= 1
        if _fits_count(free, head):
            start(job, blocks, now)
        else:
            no_past.add(size)
            for h, _b in blocks:
                free[h] += 1


def _percentile(sorted_xs: list[float], p: float) -> float:
    if not sorted_xs:
        return float("nan")
    k = min(len(sorted_xs) - 1, max(0, math.ceil(p / 100 * len(sorted_xs)) - 1))  # nearest rank
    return sorted_xs[k]


def _metrics(jobs: list[Job], refused: list[Job], hosts: int, policy: str, took: float, decisions: int) -> dict:
    ran = [j for j in jobs if j.start is not None]
    span = max(j.submit for j in jobs) or 1
    held = sum(j.gpus * max(0.0, min(j.start + j.duration, span) - j.start) for j in ran if j.start < span)
    waits = sorted(j.start - j.submit for j in ran)
    slow = [max(1.0, (j.start - j.submit + j.duration) / max(j.duration, TAU)) for j in ran]
    broken = sum(1 for j in ran if j.reserved_at is not None and j.start > j.reserved_at + 1e-6)
    return {"policy": policy, "hosts": hosts, "jobs": len(jobs), "ran": len(ran), "refused": len(refused),
            "never_started": len(jobs) - len(ran) - len(refused),
            "utilization": held / (hosts * GPUS * span),
            "wait_mean": sum(waits) / len(waits) if waits else 0.0, "wait_p50": _percentile(waits, 50),
            "wait_p95": _percentile(waits, 95), "wait_max": waits[-1] if waits else 0.0,
            "bsld_mean": sum(slow) / len(slow) if slow else 0.0, "bsld_max": max(slow) if slow else 0.0,
            "broken_reservations": broken, "seconds": took, "decisions": decisions,
            "makespan": max((j.start + j.duration for j in ran), default=0.0),
            **({"projects": _per_project(jobs, span)} if any(j.project for j in jobs) else {})}


def _per_project(jobs: list[Job], span: float) -> dict[str, dict]:
    """Per project: jobs, GPU-hours offered (all its jobs' gpus x duration), GPU-hours held while
    the trace is still submitting (as utilization counts them), mean wait of its jobs that ran."""
    out: dict[str, dict] = {}
    for j in jobs:
        p = out.setdefault(j.project, {"jobs": 0, "offered": 0.0, "gpu_hours": 0.0, "waits": []})
        p["jobs"] += 1
        p["offered"] += j.gpus * j.duration / 3600
        if j.start is not None:
            p["waits"].append(j.start - j.submit)
            if j.start < span:
                p["gpu_hours"] += j.gpus * (min(j.start + j.duration, span) - j.start) / 3600
    for p in out.values():
        waits = p.pop("waits")
        p["wait_mean"] = sum(waits) / len(waits) if waits else 0.0
    return out


def shares(projects: dict[str, dict]) -> dict[str, float]:
    """Each project's share of the GPU-hours held while the trace submits."""
    total = sum(p["gpu_hours"] for p in projects.values()) or 1.0
    return {name: p["gpu_hours"] / total for name, p in projects.items()}


def fairness(share: dict[str, float]) -> tuple[float, float]:
    """(largest distance from an equal share, Jain's fairness index) of the shares of the projects
    given (those active: every project with a job)."""
    n = len(share)
    xs = list(share.values())
    jain = sum(xs) ** 2 / (n * sum(x * x for x in xs)) if any(xs) else 1.0
    return max(abs(x - 1 / n) for x in xs), jain


# fair share on Philly: its steady state (SOURCE.md: from day 21), four weeks, on the 64-host fleet
FAIR_TRACE, FAIR_SKIP_DAYS, FAIR_DAYS = "philly-2017", 21, 28
FAIR_QUOTA = 128  # GPUs per project in the quota run: a quarter of the fleet, Philly's largest job


def bench_fairshare(trace: str = FAIR_TRACE, skip_days: float = FAIR_SKIP_DAYS, days: float = FAIR_DAYS,
                    log=print) -> dict:
    """gpufleet on a window of a trace with projects: without fair share, with it (half-life 7 d),
    and with it plus a quota of FAIR_QUOTA GPUs per project."""
    rows = window(load(trace), skip_days, days)
    hosts = FLEETS[trace][1]
    projects = sorted({project_of(r[0]) for r in rows})
    variants = {"plain": {}, "fair share": {"fair_share": True},
                f"fair share + quota {FAIR_QUOTA}": {"fair_share": True,
                                                     "quotas": [Quota(p, gpus=FAIR_QUOTA) for p in projects]}}
    out = {"trace": trace, "skip_days": skip_days, "days": days, "hosts": hosts, "runs": {}}
    for name, kw in variants.items():
        r = simulate(rows, hosts, "gpufleet", **kw)
        dev, jain = fairness(shares(r["projects"]))
        log(f"  fairshare {trace} days {skip_days}..{skip_days + days} {name:24}: {r['ran']} jobs in "
            f"{r['seconds']:.1f} s, utilization {100 * r['utilization']:.2f}%, wait mean {r['wait_mean']:.0f} s, "
            f"max deviation from equal share {100 * dev:.1f} points, Jain {jain:.3f}")
        out["runs"][name] = r
    return out


def fairshare_table(res: dict) -> list[str]:
    runs = res["runs"]
    names = list(runs)
    first = runs[names[0]]["projects"]
    share = {n: shares(r["projects"]) for n, r in runs.items()}
    offered = sum(p["offered"] for p in first.values())
    equal = 1 / len(first)
    out = ["| project | jobs | offered | " + " | ".join(f"share, {n}" for n in names) + " | equal share | " +
           " | ".join(f"wait mean, {n}" for n in names) + " |",
           "|---|---:|---:|" + "---:|" * (2 * len(names) + 1)]
    for p in sorted(first, key=lambda p: -first[p]["offered"]):
        out.append(f"| {p} | {first[p]['jobs']} | {100 * first[p]['offered'] / offered:.1f}% | " +
                   " | ".join(f"{100 * share[n][p]:.1f}%" for n in names) + f" | {100 * equal:.1f}% | " +
                   " | ".join(dur(runs[n]["projects"][p]["wait_mean"]) for n in names) + " |")
    out += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    fair = {n: fairness(share[n]) for n in names}
    out.append("| largest distance from the equal share | " +
               " | ".join(f"{100 * fair[n][0]:.1f} points" for n in names) + " |")
    out.append("| Jain's fairness index of the shares | " + " | ".join(f"{fair[n][1]:.3f}" for n in names) + " |")
    for label, key, fmt in (("utilization", "utilization", lambda v: f"{100 * v:.2f}%"),
                            ("wait mean (all jobs)", "wait_mean", dur), ("wait p95", "wait_p95", dur),
                            ("bounded slowdown (mean)", "bsld_mean", lambda v: f"{v:.2f}"),
                            ("never started", "never_started", str), ("simulated in", "seconds",
                                                                       lambda v: f"{v:.1f} s")):
        out.append(f"| {label} | " + " | ".join(fmt(runs[n][key]) for n in names) + " |")
    return out


def dur(seconds: float) -> str:
    """A duration as the tables show it."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def bench(traces: tuple[str, ...] = tuple(FLEETS), limit: int | None = None, policies=POLICIES,
          log=print) -> list[dict]:
    out = []
    for name in traces:
        rows = load(name, limit)
        hosts = FLEETS[name][1]
        for policy in policies:
            r = simulate(rows, hosts, policy)
            r["trace"] = name
            log(f"  sched {name} {policy:8}: {r['ran']} jobs in {r['seconds']:.1f} s ({r['decisions']} decisions), "
                f"utilization {100 * r['utilization']:.2f}%, wait mean {r['wait_mean']:.0f} s p50 {r['wait_p50']:.0f} "
                f"p95 {r['wait_p95']:.0f} max {r['wait_max']:.0f}, bounded slowdown {r['bsld_mean']:.2f}, "
                f"never started {r['never_started']}, refused {r['refused']}, "
                f"broken reservations {r['broken_reservations']}")
            out.append(r)
    return out


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["fairshare"]:  # fairshare [skip_days days]: the table of benchmarks/README.md
        skip, span = (float(sys.argv[2]), float(sys.argv[3])) if len(sys.argv) > 3 else (FAIR_SKIP_DAYS, FAIR_DAYS)
        print("\n".join(fairshare_table(bench_fairshare(skip_days=skip, days=span))))
        sys.exit(0)
    n = int(sys.argv[1]) or None if len(sys.argv) > 1 else None
    names = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else tuple(FLEETS)
    pols = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else POLICIES
    bench(names, n, pols)

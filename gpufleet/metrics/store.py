"""Metrics kept in the state database, and read back for the live views.

The leader's `metrics` loop (gpufleet.server.control) calls ``tick`` every ``metrics_interval``:
the samples of every host (gpufleet.metrics.sample.sample_all) are written by ``record`` — a row
per GPU, naming the run that held that GPU when it was taken (so a run's series outlives it), a
row per run container, and each host's whole sample in ``latest_samples`` — then ``maintain`` folds
raw rows of minutes that have passed into 1-minute means and prunes what is past its retention,
a bounded amount of work per pass.

Read here, once, for everyone: which GPU is whose and in what state (``gpu_rows``: /api/gpus, the
console, the CLI, /metrics) and a run's own series (``run_metrics``). Which GPUs the scheduler
must not give is the state store's (Store.withhold, written by gpufleet.metrics.protect).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select

from gpufleet.metrics.protect import withheld_of
from gpufleet.metrics.sample import held, outside
from gpufleet.models import Run
from gpufleet.models.metrics import GpuProcess, HostSample
from gpufleet.state import (
    Store,
    blocks,
    container_samples,
    gpu_samples,
    instances,
    latest_samples,
)

RAW = 0  # `res` of a raw sample
MINUTE = 60  # `res` of a 1-minute mean (its `at`: the minute's start)
FOLD_MINUTES = 10  # minutes folded per pass at most (a leader back after a long pause catches up over passes)
PRUNE_ROWS = 20_000  # rows deleted per table and resolution per pass at most
STATUSES = ("free", "busy", "outside", "unhealthy", "unreachable", "unknown")


def stale_after(interval: float) -> float:
    """A host's latest sample older than this is no longer taken as how it is now."""
    return max(3 * interval, 60.0)


# ------------------------------------------------------------------------------------ who holds what
@dataclass(frozen=True)
class Holders:
    """The active runs, by where they hold GPUs and by their container's name."""

    gpus: dict[tuple[str, str], dict[int, Run]]  # (fleet, alias) -> vendor GPU index -> run
    containers: dict[tuple[str, str], dict[str, Run]]  # (fleet, alias) -> container name -> run


def holders(store: Store, active: Iterable[Run] | None = None) -> Holders:
    gpus: dict[tuple[str, str], dict[int, Run]] = {}
    containers: dict[tuple[str, str], dict[str, Run]] = {}
    for run in store.runs() if active is None else active:
        if not run.active or not run.fleet:
            continue
        for node in run.nodes:
            key = (run.fleet, node.alias)
            containers.setdefault(key, {})[run.container] = run
            for g in node.gpus:
                gpus.setdefault(key, {})[g.index] = run
    return Holders(gpus, containers)


def processes_by_gpu(sample: HostSample) -> dict[int, list[tuple[GpuProcess, str | None]]]:
    """Per GPU index, its processes, each with the name of the gpufleet container holding it (None:
    outside gpufleet, as gpufleet.metrics.sample.outside decides)."""
    stray = {id(p) for procs in outside(sample).values() for p in procs}
    out: dict[int, list[tuple[GpuProcess, str | None]]] = {}
    for index, p in held(sample):
        name = None if id(p) in stray else sample.container_ids.get(p.container or "")
        out.setdefault(index, []).append((p, name))
    return out


# ------------------------------------------------------------------------------------ writing
def record(store: Store, samples: list[HostSample], active: Iterable[Run] | None = None) -> None:
    """Keep ``samples``: raw GPU rows attributed to the runs holding the GPUs now, the run
    containers' use, and each host's latest sample. One transaction."""
    held = holders(store, active)
    gpu_rows, container_rows = [], []
    for s in samples:
        key = (s.fleet, s.alias)
        on_host = held.gpus.get(key, {})
        for g in s.gpus:
            run = on_host.get(g.index)
            gpu_rows.append(dict(res=RAW, at=s.at, fleet=s.fleet, host=s.alias, idx=g.index, uuid=g.uuid,
                                 utilization=g.utilization, memory_used_mib=g.memory_used_mib,
                                 memory_total_mib=g.memory_total_mib, temperature_c=g.temperature_c,
                                 power_w=g.power_w, run=run.name if run else None))
        runs_here = held.containers.get(key, {})
        for u in s.containers:
            run = runs_here.get(u.name)
            if run is not None:
                container_rows.append(dict(res=RAW, at=s.at, fleet=s.fleet, host=s.alias, run=run.name,
                                           cpu_percent=u.cpu_percent, memory_bytes=u.memory_bytes,
                                           memory_limit_bytes=u.memory_limit_bytes))
    with store.engine.begin() as c:
        if gpu_rows:
            c.execute(insert(gpu_samples), gpu_rows)
        if container_rows:
            c.execute(insert(container_samples), container_rows)
        for s in samples:
            c.execute(delete(latest_samples).where(latest_samples.c.fleet == s.fleet,
                                                   latest_samples.c.host == s.alias))
        if samples:
            c.execute(insert(latest_samples), [dict(fleet=s.fleet, host=s.alias, at=s.at,
                                                    sample=s.model_dump_json()) for s in samples])


def _mean(values: list) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def _fold_table(c, table, key: Callable, means: tuple[str, ...], peaks: tuple[str, ...], keep: tuple[str, ...],
                now: float, minutes: int) -> int:
    """Fold the raw rows of ``table`` of whole minutes not folded yet (at most ``minutes`` of them,
    oldest first) into one row per series and minute; return how many minute rows were written."""
    last = c.execute(select(func.max(table.c.at)).where(table.c.res == MINUTE)).scalar()
    start = (last + MINUTE) if last is not None else None
    first_raw = select(func.min(table.c.at)).where(table.c.res == RAW)
    if start is not None:
        first_raw = first_raw.where(table.c.at >= start)
    first = c.execute(first_raw).scalar()
    if first is None:
        return 0
    start = max(start or 0.0, math.floor(first / MINUTE) * MINUTE)
    end = min(math.floor(now / MINUTE) * MINUTE, start + minutes * MINUTE)
    if end <= start:
        return 0
    groups: dict[tuple, list] = {}
    for r in c.execute(select(table).where(table.c.res == RAW, table.c.at >= start, table.c.at < end)):
        minute = math.floor(r.at / MINUTE) * MINUTE
        groups.setdefault((minute, *key(r)), []).append(r)
    rows = []
    for (minute, *_), members in groups.items():
        row = {"res": MINUTE, "at": float(minute)}
        row.update({k: getattr(members[-1], k) for k in keep})
        for k in means:
            m = _mean([getattr(r, k) for r in members])
            row[k] = m if m is None or table.c[k].type.python_type is float else round(m)
        for k in peaks:
            got = [getattr(r, k) for r in members if getattr(r, k) is not None]
            row[k] = max(got) if got else None
        rows.append(row)
    if rows:
        c.execute(insert(table), rows)
    return len(rows)


def fold(store: Store, now: float, minutes: int = FOLD_MINUTES) -> int:
    """Fold raw rows of passed minutes into 1-minute means (GPUs and containers); the rows written."""
    with store.engine.begin() as c:
        n = _fold_table(c, gpu_samples, lambda r: (r.fleet, r.host, r.idx, r.run),
                        means=("utilization", "memory_used_mib", "temperature_c", "power_w"),
                        peaks=("memory_total_mib",), keep=("fleet", "host", "idx", "uuid", "run"),
                        now=now, minutes=minutes)
        n += _fold_table(c, container_samples, lambda r: (r.fleet, r.host, r.run),
                         means=("cpu_percent", "memory_bytes"), peaks=("memory_limit_bytes",),
                         keep=("fleet", "host", "run"), now=now, minutes=minutes)
    return n


def prune(store: Store, now: float, raw_retention: float, retention: float, limit: int = PRUNE_ROWS) -> int:
    """Delete, ``limit`` rows per table and resolution at most, raw rows older than ``raw_retention``
    that were folded, minute rows older than ``retention``, and latest samples of hosts not heard of
    for ``raw_retention``; the rows deleted."""
    n = 0
    with store.engine.begin() as c:
        for table in (gpu_samples, container_samples):
            folded = c.execute(select(func.max(table.c.at)).where(table.c.res == MINUTE)).scalar()
            raw_cut = now - raw_retention
            raw_cut = min(raw_cut, folded + MINUTE) if folded is not None else raw_cut
            for res, cut in ((RAW, raw_cut), (MINUTE, now - retention)):
                ids = select(table.c.id).where(table.c.res == res, table.c.at < cut).order_by(table.c.id).limit(limit)
                n += c.execute(delete(table).where(table.c.id.in_(ids.scalar_subquery()))).rowcount
        n += c.execute(delete(latest_samples).where(latest_samples.c.at < now - raw_retention)).rowcount
    return n


def tick(store: Store, sample: Callable[[Store], list[HostSample]], raw_retention: float, retention: float,
         now: Callable[[], float] = time.time) -> list[HostSample]:
    """One pass of the leader's metrics loop: sample every host, keep it, fold and prune."""
    samples = sample(store)
    record(store, samples)
    at = now()
    fold(store, at)
    prune(store, at, raw_retention, retention)
    return samples


# ------------------------------------------------------------------------------------ reading
def latest(store: Store) -> dict[tuple[str, str], HostSample]:
    """(fleet, alias) -> the host's latest sample."""
    with store._reads.connect() as c:
        return {(r.fleet, r.host): HostSample.model_validate_json(r.sample)
                for r in c.execute(select(latest_samples.c.fleet, latest_samples.c.host, latest_samples.c.sample))}


@dataclass
class HostView:
    fleet: str
    alias: str
    instance_id: int
    status: str
    reason: str
    gpus: list  # the probe's GPUs (gpufleet.models.GPU), as dicts
    blocks: dict[int, tuple[int, str | None]]  # vendor GPU index -> (block index, run holding it)


def _hosts(store: Store, fleets: set[str] | None) -> list[HostView]:
    out: dict[int, HostView] = {}
    with store._reads.connect() as c:
        q = select(instances.c.id, instances.c.fleet, instances.c.alias, instances.c.status, instances.c.reason,
                   instances.c.probe).order_by(instances.c.fleet, instances.c.num)
        if fleets is not None:
            q = q.where(instances.c.fleet.in_(sorted(fleets)))
        for r in c.execute(q):
            probe = json.loads(r.probe or "{}")
            out[r.id] = HostView(r.fleet, r.alias, r.id, r.status, r.reason, probe.get("gpus") or [], {})
        for b in c.execute(select(blocks.c.instance_id, blocks.c.idx, blocks.c.gpus, blocks.c.run)):
            host = out.get(b.instance_id)
            if host is None:
                continue
            for pos in json.loads(b.gpus):
                if pos < len(host.gpus):
                    host.blocks[host.gpus[pos]["index"]] = (b.idx, b.run)
    return list(out.values())


def gpu_rows(store: Store, visible: set[str] | None = None, project: str | None = None,
             interval: float = 10.0, now: float | None = None) -> list[dict]:
    """One row per GPU of the fleets of ``visible`` projects (None: all), or of ``project`` only:
    where it is, who holds it, its state and why, and its latest numbers (the /api/gpus shape).
    A run of a project not in ``visible`` is shown as busy without its name, user or project."""
    now = time.time() if now is None else now
    fleet_projects = store.fleet_projects()
    fleets = {f for f, p in fleet_projects.items() if (visible is None or p in visible)
              and (project is None or p == project)}
    runs = {r.name: r for r in store.runs() if r.active}
    held = holders(store, runs.values())
    samples = latest(store)
    out = []
    for host in _hosts(store, fleets):
        sample = samples.get((host.fleet, host.alias))
        if sample is not None and now - sample.at > stale_after(interval):
            sample = None
        measured = {g.index: g for g in sample.gpus} if sample else {}
        procs = processes_by_gpu(sample) if sample else {}
        kept = withheld_of(sample, outside(sample)) if sample else {}
        names = held.containers.get((host.fleet, host.alias), {})
        for gpu in host.gpus:
            idx = gpu["index"]
            block, block_run = host.blocks.get(idx, (None, None))
            run = runs.get(block_run) if block_run else held.gpus.get((host.fleet, host.alias), {}).get(idx)
            shown = run is not None and (visible is None or run.project in visible)
            m = measured.get(idx)
            status, reason = _status(host, sample, m, kept, gpu.get("vendor"), idx,
                                     run is not None or block_run is not None)
            out.append({
                "fleet": host.fleet, "host": host.alias, "instance_id": host.instance_id, "index": idx,
                "vendor": gpu.get("vendor"), "model": gpu.get("model") or gpu.get("name"),
                "uuid": (m.uuid if m and m.uuid else gpu.get("uuid")), "numa_node": gpu.get("numa_node"),
                "block": block, "run": run.name if shown else None, "user": run.user if shown else None,
                "project": run.project if shown else None, "status": status, "reason": reason,
                "utilization": m.utilization if m else None, "memory_used_mib": m.memory_used_mib if m else None,
                "memory_total_mib": (m.memory_total_mib if m and m.memory_total_mib else gpu.get("memory_mib")),
                "temperature_c": m.temperature_c if m else None, "power_w": m.power_w if m else None,
                "at": sample.at if sample else None,
                "processes": [_process(p, names.get(cname) if cname else None, visible)
                              for p, cname in procs.get(idx, [])],
            })
    return out


def _process(p: GpuProcess, run: Run | None, visible: set[str] | None) -> dict:
    hidden = run is not None and visible is not None and run.project not in visible
    return {"pid": p.pid, "name": "" if hidden else p.name, "memory_mib": p.memory_mib,
            "run": run.name if run is not None and not hidden else None}


def _status(host: HostView, sample: HostSample | None, m, kept: dict[tuple[str, int], tuple[str, str]],
            vendor: str | None, idx: int, held: bool) -> tuple[str, str]:
    if host.status != "ready":
        return "unreachable", host.reason or f"the host is {host.status}"
    if sample is not None and sample.error and m is None:
        return "unreachable", sample.error
    if (vendor, idx) in kept:  # faulty, or used outside gpufleet: kept from new runs (protect.withheld_of)
        return kept[(vendor, idx)]
    if held:
        return "busy", ""
    if m is None:
        return "unknown", "not sampled yet" if sample is None else "the sample has no such GPU"
    return "free", ""


def utilization_series(store: Store, run: str, since: float, raw_retention: float = 3600.0,
                       now: float | None = None) -> dict[tuple[str, int], list[tuple[float, float | None]]]:
    """(host, GPU index) -> [(at, utilization)] of run ``run`` since ``since``: raw samples where they are
    kept, else 1-minute means (what a utilization_policy is judged on)."""
    now = time.time() if now is None else now
    res = RAW if since >= now - raw_retention else MINUTE
    g = gpu_samples.c
    out: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    with store._reads.connect() as c:
        for r in c.execute(select(g.host, g.idx, g.at, g.utilization)
                           .where(g.run == run, g.res == res, g.at >= since).order_by(g.host, g.idx, g.at)):
            out.setdefault((r.host, r.idx), []).append((r.at, r.utilization))
    return out


def run_metrics(store: Store, run: Run, since: float | None = None, raw_retention: float = 3600.0,
                now: float | None = None) -> dict:
    """Run ``run``'s GPUs, their latest numbers and their series since ``since`` (default: its
    submission), its containers' CPU and memory: raw where kept, else 1-minute means (the
    /api/runs/{name}/metrics shape)."""
    now = time.time() if now is None else now
    start = max(since or 0.0, run.created_at)  # not the samples of an earlier run of that name
    res = RAW if start >= now - raw_retention else MINUTE
    if res == MINUTE:
        start = math.floor(start / MINUTE) * MINUTE  # a minute row's `at` is the minute's start
    g, cs = gpu_samples.c, container_samples.c
    with store._reads.connect() as c:
        rows = c.execute(select(g.host, g.idx, g.at, g.utilization, g.memory_used_mib)
                         .where(g.run == run.name, g.res == res, g.at >= start).order_by(g.host, g.idx, g.at)).all()
        def newest(res: int, since: float) -> list:  # each GPU's newest row of resolution ``res``
            last = (select(g.host, g.idx, func.max(g.at).label("at")).where(g.run == run.name, g.res == res,
                                                                             g.at >= since)
                    .group_by(g.host, g.idx).subquery())
            return c.execute(select(g.host, g.idx, g.at, g.uuid, g.utilization, g.memory_used_mib,
                                    g.memory_total_mib, g.temperature_c, g.power_w)
                             .join(last, (g.host == last.c.host) & (g.idx == last.c.idx) & (g.at == last.c.at))
                             .where(g.run == run.name, g.res == res).order_by(g.host, g.idx)).all()

        # its last raw sample, or when its raw rows are gone, the last minute kept
        latest_rows = newest(RAW, run.created_at) or newest(MINUTE, run.created_at - MINUTE)
        containers = c.execute(select(cs.host, cs.at, cs.cpu_percent, cs.memory_bytes, cs.memory_limit_bytes)
                               .where(cs.run == run.name, cs.res == res, cs.at >= start)
                               .order_by(cs.host, cs.at)).all()
    gpus = [{"host": n.alias, "index": gpu.index, "uuid": gpu.uuid, "model": gpu.model}
            for n in run.nodes for gpu in n.gpus]
    if not gpus:  # ended and its placement forgotten: the GPUs its samples name
        gpus = [{"host": r.host, "index": r.idx, "uuid": r.uuid, "model": None} for r in latest_rows]
    series: dict[tuple[str, int], list] = {}
    for r in rows:
        series.setdefault((r.host, r.idx), []).append([r.at, r.utilization, r.memory_used_mib])
    return {
        "run": run.name,
        "gpus": gpus,
        "latest": [{"host": r.host, "index": r.idx, "at": r.at, "utilization": r.utilization,
                    "memory_used_mib": r.memory_used_mib, "memory_total_mib": r.memory_total_mib,
                    "temperature_c": r.temperature_c, "power_w": r.power_w} for r in latest_rows],
        "series": [{"host": h, "index": i, "points": pts} for (h, i), pts in series.items()],
        "containers": [{"host": r.host, "at": r.at, "cpu_percent": r.cpu_percent, "memory_bytes": r.memory_bytes,
                        "memory_limit_bytes": r.memory_limit_bytes} for r in containers],
        "resolution": "raw" if res == RAW else "1m",
    }

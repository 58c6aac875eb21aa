"""Allocator: allocations per second and p50/p99 latency through the real code path
(state.Store.allocate with allocator.place_gang as `gpufleet apply -f run.yml` calls it),
with state for HOSTS hosts x 8 GPUs, on SQLite and PostgreSQL, with 1 and 8 concurrent clients."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.exc import OperationalError

from benchmarks.common import fmt, median, percentile
from gpufleet import blocks as blockslib
from gpufleet import migrations
from gpufleet.allocator import NoCapacity, Request, place_gang
from gpufleet.models import GPU, GPUSpec
from gpufleet.state import Store, blocks, fleets, instances, metadata

SIZES = (1, 2, 4, 8)
FLEET = "bench"


def host_gpus(h: int) -> list[dict]:
    return [{"index": i, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "model": "H100",
             "memory_mib": 81559, "uuid": f"GPU-{h:06d}-{i}", "bus_id": f"0000:{0x19 + 0x10 * i:02x}:00.0",
             "numa_node": i // 4} for i in range(8)]


def populate(url: str, hosts: int) -> None:
    """A fresh schema with one fleet of ``hosts`` ready 8-GPU hosts (8 one-GPU blocks each)."""
    if url.startswith("sqlite:///"):
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
    engine = create_engine(url)
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            tables = [*metadata.tables, *migrations.VERSION_TABLES]  # a new database: no version either
            c.execute(text(f"DROP TABLE IF EXISTS {', '.join(tables)} CASCADE"))
    engine.dispose()
    Store(url)  # creates the schema through the real migrations
    engine = create_engine(url)
    now = time.time()
    layout = blockslib.split([GPU.model_validate(g) for g in host_gpus(0)], "auto", 64, 1 << 20)
    with engine.begin() as c:
        c.execute(insert(fleets).values(name=FLEET, source="bench", config=json.dumps({"placement": "cluster"}),
                                        created_at=now, updated_at=now))
        rows, brows = [], []
        for h in range(hosts):
            probe = {"gpus": host_gpus(h), "cpu": {"count": 64}, "memory_mib": 1 << 20}
            rows.append(dict(id=h + 1, fleet=FLEET, num=h, alias=f"node-{h}", hostname=f"10.0.{h // 250}.{h % 250}",
                             port=22, status="ready", reason="", resources="8xH100 (80GB)", probe=json.dumps(probe),
                             created_at=now, updated_at=now))
            brows += [dict(instance_id=h + 1, idx=b.index, gpus=json.dumps(list(b.gpus)), cpus=b.cpus,
                           memory_mib=b.memory_mib, numa_node=b.numa_node, run=None) for b in layout]
        for i in range(0, len(rows), 2000):
            c.execute(insert(instances), rows[i:i + 2000])
        for i in range(0, len(brows), 8000):
            c.execute(insert(blocks), brows[i:i + 8000])
        if engine.dialect.name == "postgresql":
            c.execute(text("SELECT setval(pg_get_serial_sequence('instances', 'id'), :n)"), {"n": hosts})
    engine.dispose()


def _client(url: str, n: int, seed: int, tag: str, queue, ready, go) -> None:
    store = Store(url)
    rng = random.Random(seed)
    clusters = {FLEET}
    lat, refused, errors = [], 0, 0
    # a fresh process's first allocation reads every host's probe and block layout (a CLI pays this
    # once per command); it is reported apart, the rest is the steady state of a long-lived client
    t0 = time.perf_counter()
    for _ in range(10):  # eight fresh processes at once can wait out SQLite's busy_timeout here
        try:
            store.allocate(f"b{tag}-first", "first", "task", {"type": "task"}, f"gpufleet-b{tag}-first",
                           lambda hosts: place_gang(Request(gpu=GPUSpec.model_validate(1)), hosts, 1, clusters))
            break
        except OperationalError:
            continue
    first = time.perf_counter() - t0
    ready.put(1)
    go.wait()
    for i in range(n):
        req = Request(gpu=GPUSpec.model_validate(rng.choice(SIZES)))
        name = f"b{tag}-{i}"

        def choose(hosts, req=req):
            return place_gang(req, hosts, 1, clusters)

        t0 = time.perf_counter()
        try:
            store.allocate(name, uuid.uuid4().hex[:12], "task", {"type": "task"}, f"gpufleet-{name}", choose)
        except NoCapacity:
            refused += 1
        except OperationalError:  # SQLite's busy_timeout (10 s) ran out waiting for the write lock
            refused += 1
            errors += 1
        lat.append(time.perf_counter() - t0)
    queue.put((lat, refused, first, time.perf_counter(), errors))
    store.engine.dispose()


def run_one(url: str, clients: int, per_client: int) -> dict:
    ctx = mp.get_context("spawn")
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client, args=(url, per_client, 1000 + k, f"{clients}c{k}", q, ready, go))
             for k in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:  # every client has connected and made its first allocation
        ready.get(timeout=1800)
    t0 = time.perf_counter()
    go.set()
    results = [q.get(timeout=1800) for _ in procs]
    wall = max(r[3] for r in results) - t0
    for p in procs:
        p.join()
    lat = [x for r in results for x in r[0]]
    return {"clients": clients, "allocs": len(lat), "refused": sum(r[1] for r in results),
            "lock_errors": sum(r[4] for r in results),
            "per_s": len(lat) / wall if wall else float("nan"), "wall": wall,
            "first_ms": median([r[2] for r in results]) * 1000,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}


def bench(hosts: int = 10_000, per_client: int = 500, pg_url: str | None = None, log=print) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-bench-alloc-") as d:
        backends = [("SQLite", f"sqlite:///{Path(d) / 'state.db'}")]
        if pg_url:
            backends.append(("PostgreSQL", pg_url))
        for label, url in backends:
            for clients in (1, 8):
                t0 = time.perf_counter()
                populate(url, hosts)
                log(f"  allocator: {label} state for {hosts} hosts written in {time.perf_counter() - t0:.1f}s")
                n = per_client if clients == 1 else max(per_client // clients, 10)
                r = run_one(url, clients, n)
                r["backend"] = label
                r["hosts"] = hosts
                log(f"  allocator: {label} {clients} client(s): {fmt(r['per_s'], 0)} allocs/s, "
                    f"p50 {fmt(r['p50_ms'], 1)} ms, p99 {fmt(r['p99_ms'], 1)} ms ({r['allocs']} allocations; "
                    f"first in a fresh process {fmt(r['first_ms'], 0)} ms; {r['lock_errors']} lock timeouts)")
                out.append(r)
    return out


def pg_bench_url() -> str | None:
    url = os.environ.get("GPUFLEET_BENCH_DATABASE_URL")
    if url:
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return None

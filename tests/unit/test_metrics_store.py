"""Metrics in the state database (gpufleet.metrics.store) on SQLite and PostgreSQL
(GPUFLEET_TEST_DATABASE_URL): attribution to runs, downsampling and retention on a fake clock, the
live GPU view and what the scheduler withholds, /metrics parsed back, the API's answers and rights,
the leader's loop with a sampler built by hand, and the Grafana dashboard against /metrics' names."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import test_state
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, inspect, select

from gpufleet import migrations
from gpufleet.allocator import Request, place
from gpufleet.blocks import split
from gpufleet.metrics import export, protect
from gpufleet.metrics import store as metrics
from gpufleet.metrics.sample import outside
from gpufleet.models import GPU, GPUSpec, HostFacts, ProjectRole, RunStatus, ServerRole
from gpufleet.models.metrics import ContainerUsage, GpuProcess, GpuSample, HostSample
from gpufleet.server.api import Context, create_app
from gpufleet.server.auth import token_hash
from gpufleet.server.control import Controller
from gpufleet.server.settings import ServerSettings
from gpufleet.server.vault import Vault
from gpufleet.state import Store, container_samples, gpu_samples, metadata

REPO = Path(__file__).resolve().parents[2]
ADMIN, ALICE, BOB = "t-admin", "t-alice", "t-bob"


db_url = test_state.db_url  # every test here on SQLite and on PostgreSQL, as the state tests


def _gpus(n: int) -> list[GPU]:
    return [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559, uuid=f"GPU-{i}", numa_node=i // 2)
            for i in range(n)]


def add_host(store: Store, fleet: str, alias: str, n: int = 4, project: str = "default") -> None:
    store.save_fleet(fleet, f"{fleet}.yml", {"type": "fleet"}, project=project)
    probe = HostFacts(gpus=_gpus(n), cpu={"count": 16}, memory_mib=64000)
    store.record_instance(fleet, alias, alias, 22, "ready", "", f"{n}xH100", probe, split(_gpus(n), "auto", 16, 64000))


def start_run(store: Store, name: str, gpus: int = 1, project: str = "default", user: str = "",
              fleet: str = "f") -> list[int]:
    """Run ``name`` holding ``gpus`` GPUs of ``fleet``, running; the vendor indices of its GPUs."""
    ask = Request(gpu=GPUSpec.model_validate(gpus), fleets=(fleet,))
    store.allocate(name, f"{name}-id", "task", {}, f"gpufleet-{name}", lambda hosts: place(ask, hosts),
                   project=project, user=user)
    store.set_run_status(name, RunStatus.RUNNING)
    return [g.index for g in store.run(name).nodes[0].gpus]


def host_sample(at: float, util: dict[int, float], n: int = 4, fleet: str = "f", alias: str = "a",
                **extra) -> HostSample:
    return HostSample(fleet=fleet, alias=alias, at=at, gpus=[
        GpuSample(index=i, vendor="nvidia", uuid=f"GPU-{i}", utilization=util.get(i, 0.0),
                  memory_used_mib=int(util.get(i, 0.0) * 100), memory_total_mib=81559, temperature_c=40 + i,
                  power_w=100.0 + i) for i in range(n)], **extra)


def test_samples_are_attributed_folded_and_pruned(db_url):
    store = Store(db_url)
    add_host(store, "f", "a")
    [mine] = start_run(store, "r", user="alice")
    t0 = (int(time.time()) // 60 + 1) * 60  # a minute's start, after the run's submission
    for k in range(18):  # three minutes, every 10 s: the run's GPU at 20, 40, 60 ... in turn
        metrics.record(store, [host_sample(t0 + 10 * k, {mine: [20, 40, 60][k // 6]},
                                           containers=[ContainerUsage(name="gpufleet-r", cpu_percent=150.0,
                                                                      memory_bytes=3 * 2**30 + k,
                                                                      memory_limit_bytes=2**33),
                                                       ContainerUsage(name="someone-else", cpu_percent=1.0)])])
    with store.engine.connect() as c:
        owners = dict(c.execute(select(gpu_samples.c.idx, func.count(gpu_samples.c.run))
                                .group_by(gpu_samples.c.idx)).all())
        assert owners == {i: (18 if i == mine else 0) for i in range(4)}  # only the run's GPU names it
        assert c.execute(select(func.count()).select_from(container_samples)).scalar() == 18
    now = t0 + 180
    live = metrics.run_metrics(store, store.run("r"), now=now)
    assert live["resolution"] == "raw" and live["gpus"] == [{"host": "a", "index": mine, "uuid": f"GPU-{mine}",
                                                               "model": "H100"}]
    [series] = live["series"]
    assert (series["host"], series["index"], len(series["points"])) == ("a", mine, 18)
    assert series["points"][0] == [t0, 20.0, 2000]
    assert live["latest"] == [{"host": "a", "index": mine, "at": t0 + 170, "utilization": 60.0,
                               "memory_used_mib": 6000, "memory_total_mib": 81559, "temperature_c": 40 + mine,
                               "power_w": 100.0 + mine}]
    assert len(live["containers"]) == 18 and live["containers"][-1]["cpu_percent"] == 150.0
    assert len(metrics.run_metrics(store, store.run("r"), since=t0 + 125, now=now)["series"][0]["points"]) == 5
    # the run ends: later samples name no run, and its series stays
    store.finish_run("r", RunStatus.DONE, 0)
    metrics.record(store, [host_sample(t0 + 185, {mine: 99})])
    with store.engine.connect() as c:
        assert c.execute(select(gpu_samples.c.run).where(gpu_samples.c.at == t0 + 185,
                                                         gpu_samples.c.idx == mine)).scalar() is None
    # folding: one minute per pass when asked so, then the rest; never the minute still going on
    assert metrics.fold(store, now, minutes=1) == 4 + 1  # 4 GPUs + the container, of minute t0
    assert metrics.fold(store, now) == 2 * 5
    assert metrics.fold(store, now) == 0
    # pruning: raw rows past an hour (folded ones only), minute rows past the retention
    later = t0 + 3600 + 170
    assert metrics.prune(store, later, 3600, 7 * 86400, limit=1000) == 4 * 17 + 17
    old = metrics.run_metrics(store, store.run("r"), now=later)
    assert old["resolution"] == "1m"
    assert old["series"] == [{"host": "a", "index": mine, "points": [[t0, 20.0, 2000], [t0 + 60, 40.0, 4000],
                                                                     [t0 + 120, 60.0, 6000]]}]
    assert old["latest"][0]["at"] == t0 + 170  # its last raw sample, kept for the hour
    assert [(c["at"], c["cpu_percent"]) for c in old["containers"]] == [(t0 + 60 * m, 150.0) for m in range(3)]
    with store.engine.connect() as c:  # within the hour (t0+170), and after the run (t0+185, not folded yet)
        assert c.execute(select(func.count()).select_from(gpu_samples).where(gpu_samples.c.res == 0)).scalar() == 8
    # bounded: a prune deletes at most `limit` rows per table and resolution
    assert metrics.prune(store, t0 + 8 * 86400, 3600, 7 * 86400, limit=5) == 4 + 5 + 1 + 3 + 1
    metrics.prune(store, t0 + 8 * 86400, 3600, 7 * 86400)
    with store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(gpu_samples)).scalar() == 4  # unfolded raw rows


def test_the_gpu_view_and_what_the_scheduler_withholds(db_url):
    store = Store(db_url)
    store.bootstrap(ADMIN, token_hash("x"))
    store.add_project("other", ADMIN, actor=ADMIN)
    add_host(store, "f", "a")
    add_host(store, "g", "b", project="other")
    [mine] = start_run(store, "r", user="alice")
    [theirs] = start_run(store, "s", project="other", user="bob", fleet="g")
    now = time.time()
    cid = "c0ffee" * 10
    stray_gpu = next(i for i in range(4) if i != mine)
    sick_gpu = next(i for i in range(4) if i not in (mine, stray_gpu))
    a = host_sample(now, {mine: 90.0}, container_ids={cid: "gpufleet-r"}, processes=[
        GpuProcess(vendor="nvidia", gpu_uuid=f"GPU-{mine}", pid=100, name="python", memory_mib=2048, container=cid),
        GpuProcess(vendor="nvidia", gpu_uuid=f"GPU-{stray_gpu}", pid=4242, name="/usr/bin/python3",
                   memory_mib=30 * 1024, container=None)])
    a.gpus[sick_gpu].faults.append("XID 79: GPU has fallen off the bus")
    metrics.record(store, [a])
    rows = {(r["fleet"], r["host"], r["index"]): r for r in metrics.gpu_rows(store, None, now=now)}
    assert len(rows) == 8
    r = rows[("f", "a", mine)]
    assert (r["status"], r["run"], r["user"], r["project"], r["utilization"]) == ("busy", "r", "alice", "default", 90.0)
    assert r["block"] == mine and r["processes"] == [{"pid": 100, "name": "python", "memory_mib": 2048, "run": "r"}]
    assert set(r) == {"fleet", "host", "instance_id", "index", "vendor", "model", "uuid", "numa_node", "block", "run",
                      "user", "project", "status", "reason", "utilization", "memory_used_mib", "memory_total_mib",
                      "temperature_c", "power_w", "at", "processes"}
    stray = rows[("f", "a", stray_gpu)]
    assert stray["status"] == "outside"
    assert stray["reason"] == "pid 4242 (/usr/bin/python3) in no gpufleet run"
    assert (rows[("f", "a", sick_gpu)]["status"], rows[("f", "a", sick_gpu)]["reason"]) == (
        "unhealthy", "XID 79: GPU has fallen off the bus")
    assert rows[("g", "b", theirs)]["status"] == "busy"  # never sampled, but held
    assert {rows[("g", "b", i)]["status"] for i in range(4) if i != theirs} == {"unknown"}
    # a member of `default` only: fleet g is not listed; with a run of `other` on a shared fleet, unnamed
    seen = metrics.gpu_rows(store, {"default"}, now=now)
    assert {r["fleet"] for r in seen} == {"f"}
    # what the scheduler is told: the same state, kept in the store (gpufleet.metrics.protect)
    protect.withhold(store, [a], outside)
    assert {k: v[:2] for k, v in store.withheld()[("f", "a")].items()} == {
        ("nvidia", stray_gpu): ("outside", "pid 4242 (/usr/bin/python3) in no gpufleet run"),
        ("nvidia", sick_gpu): ("unhealthy", "XID 79: GPU has fallen off the bus")}
    assert {r["status"] for r in metrics.gpu_rows(store, None, now=now + 3600) if r["fleet"] == "f"} == {"busy",
                                                                                                          "unknown"}
    # the host stops answering
    store.record_instance("f", "a", "a", 22, "unreachable", "Connection refused")
    assert {(r["status"], r["reason"]) for r in metrics.gpu_rows(store, None, now=now) if r["fleet"] == "f"} == {
        ("unreachable", "Connection refused")}


def _families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _value(fams: dict, name: str, **labels) -> float:
    found = [s.value for s in fams[name].samples if all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(found) == 1, (name, labels, fams[name].samples)
    return found[0]


def test_prometheus_text_parsed_back(db_url):
    store = Store(db_url)
    add_host(store, "f", "a")
    [mine] = start_run(store, "r", user="alice")
    store.enqueue("w1", "w1-id", "task", {}, "gpufleet-w1", priority=50, max_duration=None, retry={}, sealed=None,
                  reason="no capacity")
    store.enqueue("w2", "w2-id", "task", {}, "gpufleet-w2", priority=50, max_duration=None, retry={}, sealed=None,
                  reason="no capacity")
    now = time.time()
    s = host_sample(now, {mine: 75.5}, containers=[ContainerUsage(name="gpufleet-r", cpu_percent=120.0,
                                                                  memory_bytes=5 * 2**30, memory_limit_bytes=2**34)],
                    processes=[GpuProcess(vendor="nvidia", gpu_index=3 if mine != 3 else 2, pid=7, name="x",
                                          memory_mib=10)])
    s.gpus[0 if mine != 0 else 1].faults.append("retired pages pending")
    metrics.record(store, [s])
    fams = _families(export.exposition(store, None, now=now))
    assert set(fams) == set(export.METRICS)
    labels = dict(fleet="f", host="a", gpu=mine, uuid=f"GPU-{mine}", model="H100", run="r", user="alice",
                  project="default")
    assert _value(fams, "gpufleet_gpu_utilization_percent", **labels) == 75.5
    assert _value(fams, "gpufleet_gpu_memory_used_bytes", **labels) == 7550 * 2**20
    assert _value(fams, "gpufleet_gpu_memory_total_bytes", **labels) == 81559 * 2**20
    assert _value(fams, "gpufleet_gpu_power_watts", **labels) == 100.0 + mine
    assert _value(fams, "gpufleet_gpu_busy", **labels) == 1
    assert _value(fams, "gpufleet_gpu_healthy", gpu=0 if mine != 0 else 1) == 0
    assert _value(fams, "gpufleet_gpu_outside", gpu=3 if mine != 3 else 2) == 1
    assert sum(s.value for s in fams["gpufleet_gpu_outside"].samples) == 1
    assert _value(fams, "gpufleet_blocks_total", fleet="f", host="a") == 4
    assert _value(fams, "gpufleet_blocks_busy", fleet="f", host="a") == 1
    assert _value(fams, "gpufleet_host_up", fleet="f", host="a") == 1
    assert _value(fams, "gpufleet_queue_length", project="default") == 2
    assert {s.labels["project"]: s.value for s in fams["gpufleet_queue_length"].samples} == {"default": 2}
    assert _value(fams, "gpufleet_run_cpu_percent", run="r", user="alice", project="default") == 120.0
    assert _value(fams, "gpufleet_run_memory_bytes", run="r") == 5 * 2**30
    # a user of no project sees nothing of it
    assert all(not f.samples for f in _families(export.exposition(store, set(), now=now)).values())


def test_the_dashboard_uses_only_exported_metrics():
    board = json.loads((REPO / "docs/grafana/gpufleet-dashboard.json").read_text())
    assert board["schemaVersion"] >= 39 and board["uid"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    import re

    for expr in exprs:
        names = set(re.findall(r"\bgpufleet_[a-z_]+\b", expr))
        assert names and names <= set(export.METRICS), expr
    used = {n for e in exprs for n in re.findall(r"\bgpufleet_[a-z_]+\b", e)}
    for wanted in ("gpufleet_gpu_utilization_percent", "gpufleet_gpu_memory_used_bytes",
                   "gpufleet_gpu_temperature_celsius", "gpufleet_gpu_power_watts", "gpufleet_gpu_outside",
                   "gpufleet_gpu_healthy", "gpufleet_blocks_busy", "gpufleet_blocks_total", "gpufleet_queue_length"):
        assert wanted in used


@pytest.fixture()
def api(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.bootstrap(ADMIN, token_hash(ADMIN))
    for user in (ALICE, BOB):
        store.add_user(user, ServerRole.USER, token_hash(user), actor=ADMIN)
    store.add_project("other", ADMIN, actor=ADMIN)
    store.set_member("default", ALICE, ProjectRole.MEMBER, actor=ADMIN)
    store.set_member("default", BOB, ProjectRole.MEMBER, actor=ADMIN)
    ctx = Context(store=store, seal=Vault(tmp_path / "secret.key").seal, kick=lambda: None,
                  launch=lambda run, placements: None, background=lambda work: work(), info=lambda: {},
                  shutdown=lambda: None)
    with TestClient(create_app(ctx)) as http:
        yield http, store


def _as(user: str) -> dict:
    return {"Authorization": f"Bearer {user}"}


def test_the_routes_and_who_may_read_them(api):
    http, store = api
    add_host(store, "f", "a")
    add_host(store, "g", "b", project="other")
    [mine] = start_run(store, "r", user=ALICE)
    metrics.record(store, [host_sample(time.time(), {mine: 55.0}),
                           host_sample(time.time(), {}, fleet="g", alias="b")])
    for path in ("/api/gpus", "/api/runs/r/metrics", "/metrics"):
        assert http.get(path).status_code == 401
    everything = http.get("/api/gpus", headers=_as(ADMIN)).json()
    assert len(everything) == 8 and {g["fleet"] for g in everything} == {"f", "g"}
    bobs = http.get("/api/gpus", headers=_as(BOB)).json()
    assert {g["fleet"] for g in bobs} == {"f"}
    assert next(g for g in bobs if g["index"] == mine)["run"] == "r"
    r = http.get("/api/gpus?project=other", headers=_as(BOB))
    assert r.status_code == 403 and r.json()["exit_code"] == 3
    assert http.get("/api/gpus?project=other", headers=_as(ADMIN)).json()[0]["fleet"] == "g"
    # a run's metrics: its submitter, a project admin, a server admin; not another member
    got = http.get("/api/runs/r/metrics", headers=_as(ALICE)).json()
    assert got["run"] == "r" and got["resolution"] == "raw" and got["latest"][0]["utilization"] == 55.0
    assert http.get("/api/runs/r/metrics", headers=_as(ADMIN)).status_code == 200
    assert http.get("/api/runs/r/metrics", headers=_as(BOB)).status_code == 403
    assert http.get("/api/runs/nope/metrics", headers=_as(ADMIN)).status_code == 404
    # /metrics: what the token's user sees
    r = http.get("/metrics", headers=_as(BOB))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert {s.labels["fleet"] for s in _families(r.content)["gpufleet_gpu_utilization_percent"].samples} == {"f"}
    every = _families(http.get("/metrics", headers=_as(ADMIN)).content)
    assert {s.labels["fleet"] for s in every["gpufleet_gpu_utilization_percent"].samples} == {"f", "g"}


def test_the_leaders_loop_keeps_samples_and_a_slow_sample_holds_up_nothing(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    add_host(store, "f", "a")
    calls, gate = [], threading.Event()

    def sampler(s: Store) -> list[HostSample]:
        calls.append(time.time())
        if len(calls) == 2:
            gate.wait(5)  # a slow pass
        return [host_sample(time.time(), {0: 10.0 * len(calls)})]

    settings = ServerSettings(metrics_interval=0.05, schedule_interval=0.05, reconcile_interval=0.05,
                              limits_interval=0.05, leader_retry=0.05)
    controller = Controller(store, settings, lambda sealed: {}, lambda fleet: {}, "http://x")
    controller.sample = sampler
    passes = []
    controller._schedule_pass = lambda: passes.append(time.time())
    controller.start()
    try:
        deadline = time.time() + 10
        while len(calls) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert metrics.latest(store)[("f", "a")].gpus[0].utilization == 10.0
        before = len(passes)
        controller.kick()
        time.sleep(0.3)
        assert len(passes) > before  # the scheduler turns while the sampler is stuck
        gate.set()
        while len(calls) < 4 and time.time() < deadline:
            time.sleep(0.02)
        assert len(calls) >= 4
    finally:
        gate.set()
        controller.stop()


def test_revision_0008_goes_up_and_down(db_url):
    Store(db_url).engine.dispose()
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    from alembic import command

    with migrations.migration_connection(engine) as c, c.begin():
        command.downgrade(migrations.config(c, metadata), "0007_schedule")
    with engine.connect() as c:
        assert not {"gpu_samples", "container_samples", "latest_samples"} & set(inspect(c).get_table_names())
    engine.dispose()
    store = Store(db_url)  # brought up again
    add_host(store, "f", "a")
    metrics.record(store, [host_sample(time.time(), {0: 1.0})])
    assert ("f", "a") in metrics.latest(store)

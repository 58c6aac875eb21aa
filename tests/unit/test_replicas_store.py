"""A service's replicas kept on a real store (SQLite and PostgreSQL): submission, placement spread over hosts,
replacement, a rolling update, scaling, the service's status, and its stop taking its replicas along. The
hosts and their containers are not touched (the lab test does): a replica is made `running` as a start would,
and the runtime's stop of its containers is recorded instead of done."""

from __future__ import annotations

import time

import pytest
from test_state import add_host, db_url  # noqa: F401 (a fixture)

from gpufleet import queue
from gpufleet.models import RunStatus
from gpufleet.replicas import keep
from gpufleet.runconfig import parse_run
from gpufleet.state import Store

WHO = queue.Submitter(user="", project="default")


@pytest.fixture(autouse=True)
def containers(monkeypatch) -> list[str]:
    """The containers the runtime was asked to stop (by run), none stopped for real."""
    asked: list[str] = []
    monkeypatch.setattr(queue, "stop_containers", lambda fleet, container, run_id, aliases, **kw: asked.append(
        container))
    return asked


def submit(store: Store, text: str):
    req = parse_run("type: service\nname: web\nimage: x\nport: 80\n" + text, "web.yml")
    return queue.submit(store, req, seal=lambda secrets: "sealed", who=WHO)[0]


def start_waiting(store: Store) -> dict[str, str]:
    """One scheduling pass; each replica it places made `running`: {replica: host}."""
    placed: dict[str, str] = {}
    queue.schedule(store, lambda run, ps: placed.__setitem__(run.name, ps[0].host.alias))
    for name in placed:
        assert store.set_run_status(name, RunStatus.RUNNING, expect=(RunStatus.STARTING,))
    return placed


class Loop:
    """The leader's pass (replicas.keep) with the readiness the test says and stops done at once."""

    def __init__(self, store: Store):
        self.store, self.memories, self.ready, self.rate, self.stopped = store, {}, set(), None, []

    def __call__(self, now: float | None = None) -> None:
        def stop(name: str, why: str) -> None:
            self.stopped.append(name)
            assert queue.end_replica(self.store, name, why)

        keep(self.store, self.memories, lambda s: set(self.ready), lambda s, w: self.rate, stop,
             time.time() if now is None else now)

    def live(self) -> list[str]:
        return sorted(r.name for r in self.store.replica_runs("web"))


def test_a_service_keeps_its_replicas_spread_replaced_rolled_and_stopped(db_url, containers):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 2)
    add_host(store, "f", "b", 2)
    web = submit(store, "replicas: 2\nresources: {gpu: 1}\n")
    assert (web.is_service, web.replicas, web.status) == (True, 2, RunStatus.PENDING)
    assert [r.name for r in store.replica_runs("web")] == ["web.0", "web.1"]
    assert [r.name for r in store.pending()] == ["web.0", "web.1"]  # the service itself is not in the queue

    assert sorted(start_waiting(store).values()) == ["a", "b"]  # one per host (best fit alone packs one)
    loop = Loop(store)
    loop.ready = {"web.0"}
    loop()
    web = store.run("web")
    assert web.status == RunStatus.RUNNING and web.message == "1/2 replicas ready", web.message

    # a replica that fails is replaced by a new run
    store.finish_run("web.0", RunStatus.FAILED, 1, "exit code 1")
    loop.ready = {"web.1"}
    loop()
    assert loop.live() == ["web.1", "web.2"] and store.run("web.2").status == RunStatus.PENDING
    assert start_waiting(store) == {"web.2": "a"}
    loop.ready = {"web.1", "web.2"}
    loop()

    # an update: one new replica more than wanted; an old one goes once a new one is ready
    submit(store, "replicas: 2\nresources: {gpu: 1}\nenv: [V=2]\n")
    loop()
    assert loop.live() == ["web.1", "web.2", "web.3"] and not loop.stopped
    start_waiting(store)
    loop()  # web.3 runs but is not ready yet: nothing stops
    assert loop.live() == ["web.1", "web.2", "web.3"] and not loop.stopped
    loop.ready = {"web.1", "web.2", "web.3"}
    loop()
    assert loop.stopped == ["web.1"] and loop.live() == ["web.2", "web.3", "web.4"]
    start_waiting(store)
    loop.ready = {"web.2", "web.3", "web.4"}
    loop()
    assert loop.stopped == ["web.1", "web.2"] and loop.live() == ["web.3", "web.4"]
    assert all(r.spec["env"] == ["V=2"] for r in store.replica_runs("web"))
    events = [e.message for e in store.events(run="web")]
    assert any("rolling update to its new configuration" in m for m in events), events

    # the same configuration again changes nothing
    before = store.run("web").updated_at
    submit(store, "replicas: 2\nresources: {gpu: 1}\nenv: [V=2]\n")
    assert store.run("web").updated_at == before

    # a stop takes every replica with it
    _, work = queue.stop(store, "web", by="the test")
    assert work is not None and work()
    assert store.run("web").status == RunStatus.STOPPED and loop.live() == []
    assert containers == ["gpufleet-web.1", "gpufleet-web.2", "gpufleet-web.3", "gpufleet-web.4"]
    assert {r.status for r in store.replica_runs("web", include_finished=True)} >= {RunStatus.STOPPED}


def test_scaling_follows_the_request_rate_after_its_delays(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 4)
    submit(store, "replicas: 1..3\nscaling: {metric: rps, target: 2, scale_up_delay: 30s, scale_down_delay: 60s}\n")
    start_waiting(store)
    loop = Loop(store)
    t0 = store.run("web").created_at
    loop.rate = 5.0  # wants ceil(5 / 2) = 3
    loop(now=t0 + 10)
    assert store.run("web").replicas == 1  # within scale_up_delay of its creation
    loop(now=t0 + 31)
    assert store.run("web").replicas == 3 and len(loop.live()) == 3
    assert any("scaled from 1 to 3 replicas (5.00 requests/s, target 2 per replica)" in e.message
               for e in store.events(run="web"))
    start_waiting(store)
    loop.rate = 0.0
    loop(now=t0 + 60)
    assert store.run("web").replicas == 3  # within scale_down_delay
    loop.ready = {"web.0", "web.1", "web.2"}
    loop(now=t0 + 92)
    assert store.run("web").replicas == 1 and len(loop.live()) == 1, loop.live()
    assert sorted(loop.stopped) == ["web.1", "web.2"]  # the newest go


def test_replicas_that_keep_failing_before_ready_end_the_service(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 2)
    submit(store, "replicas: 1\n")
    loop = Loop(store)
    for i in range(3):
        start_waiting(store)
        loop()
        store.finish_run(f"web.{i}", RunStatus.FAILED, 127, "exit code 127")
        loop()
    web = store.run("web")
    assert web.status == RunStatus.FAILED, (web.status, web.message)
    assert web.message == "3 replicas in a row failed before they were ready (last: web.2: exit code 127)"
    assert loop.live() == []


def test_a_replica_refused_before_the_next_pass_counts_as_a_failure(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 2)
    submit(store, "replicas: 1\n")
    loop = Loop(store)
    for _ in range(3):
        loop()  # the service's first replica, or its replacement, queued
        (r,) = store.replica_runs("web")
        store.finish_run(r.name, RunStatus.FAILED, None, "refused: quota")  # as the scheduler refuses one
    loop()
    assert store.run("web").status == RunStatus.FAILED, store.run("web").message


def test_request_counts_of_every_server_process_add_up_and_old_ones_go(db_url):  # noqa: F811
    from gpufleet.state import RATE_BUCKET, RATE_KEEP

    store = Store(db_url)
    now = 1_000_000.0
    b = int(now) // RATE_BUCKET
    store.add_service_requests("h:1", {("web", b): 10, ("other", b): 3}, now)
    store.add_service_requests("h:1", {("web", b): 5}, now)
    store.add_service_requests("h:2", {("web", b - 1): 7, ("web", b - 20): 100}, now)
    assert store.service_requests_since("web", now - 2 * RATE_BUCKET) == 22
    assert store.service_requests_since("web", now - 30 * RATE_BUCKET) == 122
    assert store.service_requests_since("other", now - 60) == 3
    store.add_service_requests("h:3", {}, now + RATE_KEEP + RATE_BUCKET)  # old buckets pruned, whoever wrote them
    assert store.service_requests_since("web", 0) == 0


def test_a_waiting_service_cancelled_takes_its_waiting_replicas_along(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 2)
    submit(store, "replicas: 2\n")
    run, work = queue.stop(store, "web", by="the test")
    assert run.status == RunStatus.STOPPED and work is not None and work()
    assert {r.status for r in store.replica_runs("web", include_finished=True)} == {RunStatus.STOPPED}
    assert store.replica_runs("web") == []

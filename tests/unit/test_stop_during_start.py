"""A stop that lands while a run is starting (its blocks taken, its containers being started by a
worker thread) always ends the run `stopped`: its containers removed, its blocks freed, the event
naming who stopped it; also when the start then fails, also when the stop lands as the scheduler
takes the run, also when a reconcile pass read the run before the stop. On SQLite and on PostgreSQL
(GPUFLEET_TEST_DATABASE_URL).

The start is paused at a chosen point by a failpoint (gpufleet.failpoints) on a thread of its own,
the stop is sent, the start let go: no sleep decides the order. The store is real; what the hosts
would do (start_nodes, stop_containers) is recorded instead (the lab test does it for real)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import pg_test_database

from gpufleet import failpoints, queue
from gpufleet.blocks import split
from gpufleet.launch import StartError
from gpufleet.models import GPU, Container, HostFacts, RunStatus
from gpufleet.runconfig import parse_run
from gpufleet.runs import _record, settle
from gpufleet.state import Store

RUN = "type: task\nname: r\nimage: busybox\ncommands: [sleep 300]\nresources: {gpu: 2}\nstop_duration: 3s\n"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "postgresql" and not os.environ.get("GPUFLEET_TEST_DATABASE_URL") and os.environ.get("CI"):
        pytest.fail("CI must provide GPUFLEET_TEST_DATABASE_URL (scripts/test.sh starts PostgreSQL)")
    if request.param == "sqlite":
        yield _fleet(Store(f"sqlite:///{tmp_path / 'state.db'}"))
        return
    with pg_test_database("gpufleet_stoprace") as url:
        s = _fleet(Store(url))
        yield s
        s.engine.dispose()


def _fleet(s: Store) -> Store:
    s.save_fleet("f", "f.yml", {"type": "fleet"})
    gs = [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559, uuid=f"GPU-{i}") for i in range(2)]
    s.record_instance("f", "a", "a", 22, "ready", "", "2xH100", HostFacts(gpus=gs, cpu={"count": 8}, memory_mib=64000),
                      split(gs, "auto", 8, 64000))
    return s


class Hosts:
    """What the hosts were asked (in place of start_nodes and stop_containers); ``fail``: the start
    fails (after it started the container on `a`) once it is let go at the pause point `in-start`."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.starts: list[str] = []
        self.stops: list[tuple[list[str], bool, float | None]] = []
        self.fail = fail
        monkeypatch.setattr(queue, "start_nodes", self.start_nodes)
        monkeypatch.setattr(queue, "stop_containers", self.stop_containers)

    def start_nodes(self, store, req, run_id, placements, started, secrets, volume_roots=None, before_node=None):
        for p in placements:
            if before_node is not None:
                before_node()
            started.append(p.host.alias)
            self.starts.append(p.host.alias)
            failpoints.reach("in-start")
            if self.fail:
                raise StartError(f"{p.host.alias}: pulling busybox failed")

    def stop_containers(self, fleet, container, run_id, aliases, remove=False, timeout=None):
        self.stops.append((list(aliases), remove, timeout))


def _unseal(sealed: str) -> dict[str, str]:
    return json.loads(sealed)


def _submit_and_take_blocks(store: Store) -> tuple:
    """Submit run `r` and let the scheduling pass take its blocks: (the run as the pass hands it to
    launch, its placements); the run is `starting`."""
    queue.submit(store, parse_run(RUN, "r.yml"), json.dumps)
    handed = []
    queue.schedule(store, lambda run, placements: handed.append((run, placements)))
    [(run, placements)] = handed
    assert store.run("r").status == RunStatus.STARTING
    return run, placements


def _launch_paused_at(store: Store, point: str, pauses, monkeypatch) -> threading.Thread:
    """Launch run `r` on a thread of its own (as the server's workers do), paused at ``point``."""
    run, placements = _submit_and_take_blocks(store)
    monkeypatch.setenv("GPUFLEET_PAUSE", point)
    monkeypatch.setenv("GPUFLEET_PAUSE_DIR", str(pauses))
    t = threading.Thread(target=queue.launch, args=(store, run, placements, _unseal, lambda fleet: {}), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not failpoints.reached(pauses, point):
        assert t.is_alive() and time.monotonic() < deadline, f"the start never reached {point}"
        time.sleep(0.01)
    return t


def _assert_stopped_by_alice(store: Store, note: str = "") -> None:
    run = store.run("r")
    assert run.status == RunStatus.STOPPED, (run.status, run.message)
    assert run.message == "stopped by alice" + note
    assert all(b.free for h in store.slots_snapshot().hosts() for b in h.blocks)  # its blocks are free
    assert store.fleet("f").instances[0].blocks_busy == 0
    kinds = [(e.kind, e.actor) for e in store.events(run="r")]
    # nothing undid the stop (no `running` after it, no `failed`): it ended as it said, naming alice
    assert kinds[kinds.index(("stopping", "alice")):] == [("stopping", "alice"), ("stopped", "alice")], kinds
    assert store.sealed(run="r") is None


@pytest.mark.parametrize("point", ["before-start", "in-start", "after-start"])
def test_a_stop_at_any_moment_of_the_start_ends_the_run_stopped(store, point, tmp_path, monkeypatch):
    hosts = Hosts(monkeypatch)
    t = _launch_paused_at(store, point, tmp_path, monkeypatch)
    stopping, work = queue.stop(store, "r", by="alice", actor="alice")
    assert stopping.status == RunStatus.STOPPING and stopping.message == "stopped by alice"
    assert work() is False  # the stop of a starting run is its start's: nothing to do on the side
    assert store.run("r").status == RunStatus.STOPPING  # its start still owns it
    failpoints.release(tmp_path, point)
    t.join(timeout=30)
    assert not t.is_alive()
    _assert_stopped_by_alice(store)
    if point == "before-start":  # no container was started at all
        assert hosts.starts == [] and hosts.stops == []
    else:  # the container the start made is removed, within the run's grace
        assert hosts.starts == ["a"] and hosts.stops == [(["a"], True, 3.0)]


def test_a_stop_during_a_start_that_then_fails_ends_the_run_stopped(store, tmp_path, monkeypatch):
    hosts = Hosts(monkeypatch, fail=True)
    t = _launch_paused_at(store, "in-start", tmp_path, monkeypatch)
    assert queue.stop(store, "r", by="alice", actor="alice")[0].status == RunStatus.STOPPING
    failpoints.release(tmp_path, "in-start")
    t.join(timeout=30)
    _assert_stopped_by_alice(store, " (its start failed: a: pulling busybox failed)")
    assert hosts.stops == [(["a"], True, 3.0)]


def test_a_start_that_fails_without_a_stop_still_fails(store, tmp_path, monkeypatch):
    hosts = Hosts(monkeypatch, fail=True)
    t = _launch_paused_at(store, "in-start", tmp_path, monkeypatch)
    failpoints.release(tmp_path, "in-start")
    t.join(timeout=30)
    run = store.run("r")
    assert (run.status, run.message) == (RunStatus.FAILED, "a: pulling busybox failed")
    assert hosts.stops == [(["a"], True, 3.0)] and store.fleet("f").instances[0].blocks_busy == 0


def test_a_start_without_a_stop_runs(store, tmp_path, monkeypatch):
    Hosts(monkeypatch)
    t = _launch_paused_at(store, "after-start", tmp_path, monkeypatch)
    failpoints.release(tmp_path, "after-start")
    t.join(timeout=30)
    assert store.run("r").status == RunStatus.RUNNING


def test_a_stop_as_the_scheduler_takes_the_run_is_not_a_cancel(store, monkeypatch):
    """`stop` read the run `pending`, the scheduling pass took its blocks, then the cancel came: the
    cancel ends only a waiting run, and the stop goes to the start, which starts nothing."""
    hosts = Hosts(monkeypatch)
    run, placements = _submit_and_take_blocks(store)
    assert queue.cancel(store, "r", "cancelled by alice while waiting", "alice") is False
    assert store.run("r").status == RunStatus.STARTING and store.fleet("f").instances[0].blocks_busy == 2
    assert queue.stop(store, "r", by="alice", actor="alice")[0].status == RunStatus.STOPPING
    queue.launch(store, run, placements, _unseal, lambda fleet: {})
    _assert_stopped_by_alice(store)
    assert hosts.starts == [] and hosts.stops == []


def _running(store: Store) -> None:
    _submit_and_take_blocks(store)
    assert store.set_run_status("r", RunStatus.RUNNING, expect=(RunStatus.STARTING,))


def test_a_reconcile_pass_that_read_the_run_before_its_stop_does_not_fail_it(store, monkeypatch):
    """The pass read the run `running`; the stop began and killed its container; the pass then heard
    of the container's exit (137): that is the stop's doing, not a failure."""
    hosts = Hosts(monkeypatch)
    _running(store)
    read = store.run("r")
    _, work = queue.stop(store, "r", by="alice", actor="alice")
    killed = Container(name="gpufleet-r", state="exited", exit_code=137, run_id=read.run_id)
    s = settle(read, [("a", killed)], "")
    assert s.status == RunStatus.FAILED
    _record(store, read, s)
    assert store.run("r").status == RunStatus.STOPPING
    assert work() is True
    _assert_stopped_by_alice(store)
    assert hosts.stops == [(["a"], False, 3.0)]


def test_a_stop_whose_stopper_died_is_finished_by_reconcile_naming_who_stopped_it(store, monkeypatch):
    Hosts(monkeypatch)
    _running(store)
    queue.stop(store, "r", by="alice", actor="alice")  # the work is never done: the server died
    read = store.run("r")
    _record(store, read, settle(read, [("a", None)], ""))
    _assert_stopped_by_alice(store)


def test_a_stopped_start_is_not_queued_again_nor_made_running(store):
    _submit_and_take_blocks(store)
    assert store.begin_stop("r", "stopped by alice", "alice", final=True) == RunStatus.STARTING
    assert store.requeue("r", "its start was interrupted", expect=(RunStatus.STARTING,)) is False
    assert store.set_run_status("r", RunStatus.RUNNING, expect=(RunStatus.STARTING,)) is False
    assert store.finish_run("r", RunStatus.FAILED, None, "start failed", expect=(RunStatus.STARTING,)) is False
    assert store.run("r").status == RunStatus.STOPPING
    assert store.finish_stop("r")
    _assert_stopped_by_alice(store)
    assert store.finish_stop("r") is False

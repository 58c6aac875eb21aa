"""The scheduler's decision: order, reservations, backfill, gangs, refusals, runs without a limit, starvation."""

from __future__ import annotations

import pytest

from gpufleet.allocator import BlockSlot, HostIndex, HostSlots, Request
from gpufleet.models import GPU, GPUSpec
from gpufleet.scheduler import Running, Waiting, decide, never_fits

SHAPE = ("H100x8", tuple(range(8)))


def host(num: int, busy: set[int] = frozenset(), fleet: str = "f", model: str = "H100") -> HostSlots:
    gpus = [GPU(index=g, vendor="nvidia", model=model, name=f"NVIDIA {model}", memory_mib=81559, numa_node=g // 4)
            for g in range(8)]
    blocks = [BlockSlot(b, (b,), 8, 64000, b // 4, b not in busy) for b in range(8)]
    return HostSlots(num, fleet, num, f"node-{num}", gpus, blocks, (fleet, model, SHAPE))


def gpus(n: int) -> Request:
    return Request(gpu=GPUSpec.model_validate(n))


def run(run_id: str, n: int, t: float = 0.0, *, nodes: int = 1, priority: int = 50, limit: float | None = 1000.0,
        request: Request | None = None) -> Waiting:
    return Waiting(run_id, request or gpus(n), t, nodes=nodes, priority=priority, max_duration=limit)


def holding(run_id: str, iid: int, blocks, ends_at: float | None) -> Running:
    return Running(run_id, tuple((iid, b) for b in blocks), ends_at)


def started(decision) -> list[str]:
    return [s.run.run_id for s in decision.starts]


def test_priority_first_then_submission_time():
    d = decide([run("old", 8, t=0), run("urgent", 8, t=5, priority=90)], [host(0)], [], now=10)
    assert started(d) == ["urgent"]
    assert [r.run_id for r in d.reservations] == ["old"]
    d = decide([run("second", 8, t=5), run("first", 8, t=1)], [host(0)], [], now=10)
    assert started(d) == ["first"] and d.reservations[0].run_id == "second"


def test_runs_start_in_order_while_they_fit():
    d = decide([run("a", 4, t=0), run("b", 2, t=1), run("c", 2, t=2)], [host(0), host(1)], [], now=3)
    assert started(d) == ["a", "b", "c"] and not d.reservations
    assert all(not s.backfill for s in d.starts)
    assert {s.blocks[0][0] for s in d.starts} == {0}  # best fit packs one host


def test_backfill_allowed_when_it_ends_before_the_reservation():
    busy = holding("r1", 0, range(6), ends_at=100)
    d = decide([run("head", 8, t=0), run("small", 2, t=1, limit=50)], [host(0, busy=set(range(6)))], [busy], now=10)
    assert started(d) == ["small"] and d.starts[0].backfill
    (res,) = d.reservations
    assert res.run_id == "head" and res.at == 100 and len(res.blocks) == 8


@pytest.mark.parametrize("limit", [200.0, None])
def test_backfill_refused_when_it_would_delay_the_reservation(limit):
    busy = holding("r1", 0, range(6), ends_at=100)
    d = decide([run("head", 8, t=0), run("small", 2, t=1, limit=limit)], [host(0, busy=set(range(6)))], [busy],
               now=10)
    assert started(d) == []
    assert d.reservations[0].at == 100


def test_backfill_onto_blocks_the_reservation_does_not_need():
    hosts = [host(0, busy=set(range(8))), host(1, busy=set(range(4)))]
    running = [holding("r0", 0, range(8), ends_at=100), holding("r1", 1, range(4), ends_at=500)]
    d = decide([run("head", 8, t=0), run("forever", 4, t=1, limit=None)], hosts, running, now=10)
    assert started(d) == ["forever"] and d.starts[0].blocks == tuple((1, b) for b in range(4, 8))
    assert d.reservations[0].at == 100 and {i for i, _ in d.reservations[0].blocks} == {0}


def test_backfill_may_take_reserved_blocks_if_the_head_still_fits_elsewhere_then():
    # both hosts free up at 100; the head is reserved on host 0, whose 2 free GPUs a long run takes
    hosts = [host(0, busy=set(range(6))), host(1, busy=set(range(8)))]
    running = [holding("r0", 0, range(6), ends_at=100), holding("r1", 1, range(8), ends_at=100)]
    d = decide([run("head", 8, t=0), run("long", 2, t=1, limit=10_000)], hosts, running, now=10)
    assert started(d) == ["long"] and d.starts[0].blocks[0][0] == 0
    (res,) = d.reservations
    assert res.at == 100 and {i for i, _ in res.blocks} == {1}
    # a second long run cannot: the head needs the only host left whole at 100
    d = decide([run("head", 8, t=0), run("long", 2, t=1, limit=10_000), run("long2", 8, t=2, limit=10_000)],
               [host(0, busy=set(range(6))), host(1, busy=set(range(8)))], running, now=10)
    assert started(d) == ["long"]


def test_a_gang_waits_whole_and_starts_whole():
    clusters = {"f"}
    hosts = [host(0), host(1, busy=set(range(8))), host(2, busy=set(range(4)))]
    running = [holding("r1", 1, range(8), ends_at=100), holding("r2", 2, range(4), ends_at=200)]
    gang = run("gang", 8, t=0, nodes=2)
    d = decide([gang, run("tiny", 1, t=1, limit=None)], hosts, running, now=10, cluster_fleets=clusters)
    assert started(d) == ["tiny"] and d.starts[0].blocks[0][0] == 2  # not on the hosts the gang waits for
    (res,) = d.reservations
    assert res.run_id == "gang" and res.at == 100 and {i for i, _ in res.blocks} == {0, 1}
    # at 100 host 1 is free: the gang starts, both nodes at once
    d = decide([gang], [host(0), host(1), host(2, busy=set(range(5)))], [running[1]], now=100, cluster_fleets=clusters)
    (start,) = d.starts
    assert [p.host.num for p in start.placements] == [0, 1] and len(start.blocks) == 16


def test_never_fits_is_refused_at_once_with_why():
    hosts = [host(0), host(1)]
    d = decide([run("huge", 16), run("gang3", 8, nodes=3), run("ok", 1, t=1)], hosts, [], now=0,
               cluster_fleets={"f"})
    assert started(d) == ["ok"]
    why = {r.run_id: r.reason for r in d.refused}
    assert why["huge"] == "never fits: it asks for 16 GPU on one host and the most any ready host has is 8"
    assert "fleet f has 2 ready instances, the task needs 3" in why["gang3"]
    d = decide([run("h100", 1, request=Request(gpu=GPUSpec.model_validate("A100:1")))], hosts, [], now=0)
    assert d.refused[0].reason.endswith("the most any ready host has is 0 matching")
    d = decide([run("gang", 8, nodes=2)], hosts, [], now=0)  # fleet f is not placement: cluster
    assert "not placement: cluster" in d.refused[0].reason
    # never refused just because the fleet is busy now
    busy = [host(0, busy=set(range(8))), host(1, busy=set(range(8)))]
    assert never_fits(run("x", 8), busy) is None
    d = decide([run("x", 8)], busy, [], now=0)
    assert not d.refused and d.reservations[0].at is None


def test_runs_without_a_limit_are_never_counted_as_ending():
    hosts = [host(0, busy=set(range(8))), host(1, busy=set(range(8)))]
    running = [holding("service", 0, range(8), ends_at=None), holding("job", 1, range(8), ends_at=300)]
    d = decide([run("head", 8)], hosts, running, now=0)
    assert d.reservations[0].at == 300 and {i for i, _ in d.reservations[0].blocks} == {1}


def test_head_waiting_on_a_run_without_limit_keeps_unlimited_runs_off_its_blocks():
    hosts = [host(0, busy=set(range(4)))]
    running = [holding("service", 0, range(4), ends_at=None)]
    d = decide([run("head", 8), run("bounded", 2, t=1, limit=60), run("unbounded", 2, t=2, limit=None)],
               hosts, running, now=0)
    assert started(d) == ["bounded"]
    (res,) = d.reservations
    assert res.at is None and len(res.blocks) == 8


def test_nothing_given_is_changed():
    index = HostIndex([host(0, busy={0, 1}), host(1)])
    before = [(h.instance_id, tuple(b.free for b in h.blocks)) for h in index.hosts()]
    d = decide([run("a", 8), run("b", 4, t=1), run("c", 8, t=2)], index, [holding("x", 0, [0, 1], 50)], now=0)
    assert started(d) == ["a", "b"]
    assert [(h.instance_id, tuple(b.free for b in h.blocks)) for h in index.hosts()] == before


def test_priority_must_be_dstacks_range():
    with pytest.raises(ValueError, match="0..100"):
        run("x", 1, priority=101)
    with pytest.raises(ValueError, match="max_duration"):
        run("x", 1, limit=0)


def _simulate(arrivals, hosts: int, until: float, aging_s: float | None = 3600.0, duration=None):
    """A bounded loop of simulated time, one decision a second: runs end at their max_duration
    (or ``duration(run)``). Returns run id -> start time."""
    waiting: dict[str, Waiting] = {}
    running: dict[str, tuple[Running, float]] = {}
    free = {h: set(range(8)) for h in range(hosts)}
    started_at: dict[str, float] = {}
    t = 0.0
    while t <= until:
        for r in arrivals(t):
            waiting[r.run_id] = r
        for rid, (r, end) in list(running.items()):
            if end <= t:
                for iid, b in r.blocks:
                    free[iid].add(b)
                del running[rid]
        fleet = [host(h, busy=set(range(8)) - free[h]) for h in range(hosts)]
        d = decide(list(waiting.values()), fleet, [r for r, _ in running.values()], now=t, aging_s=aging_s)
        for s in d.starts:
            for iid, b in s.blocks:
                free[iid].remove(b)
            end = t + (duration(s.run) if duration else s.run.max_duration)
            running[s.run.run_id] = (Running(s.run.run_id, s.blocks, s.ends_at), end)
            started_at[s.run.run_id] = t
            del waiting[s.run.run_id]
        t += 1
    return started_at


def test_a_big_run_is_not_starved_by_a_stream_of_small_ones():
    # a 1-GPU run of 10 s arrives every second, for ever; at t=5 a run wants the whole host
    def arrivals(t):
        out = [run(f"s{t:.0f}", 1, t=t, limit=10)]
        if t == 5:
            out.append(run("big", 8, t=t, limit=10))
        return out
    starts = _simulate(arrivals, hosts=1, until=60)
    assert "big" in starts and starts["big"] <= 5 + 10  # every small run holding a GPU has ended by then
    # and afterwards the small ones run again
    assert any(starts.get(f"s{t}", 1e9) > starts["big"] for t in range(20, 60))


def test_limits_that_overstate_the_real_length_do_not_starve_either():
    def arrivals(t):
        out = [run(f"s{t:.0f}", 1, t=t, limit=30)]
        if t == 3:
            out.append(run("big", 8, t=t, limit=30))
        return out
    starts = _simulate(arrivals, hosts=1, until=80, duration=lambda r: 7)
    assert starts["big"] <= 3 + 30


def test_aging_bounds_the_wait_behind_higher_priority_runs():
    # a priority-100 run of the whole host arrives every 5 s and runs 10 s: without aging the
    # priority-0 run never starts; with one point a second only those submitted within 101 s of it
    # go first
    def arrivals(t):
        out = [run(f"hi{t:.0f}", 8, t=t, priority=100, limit=10)] if t % 5 == 0 else []
        if t == 1:
            out.append(run("low", 8, t=t, priority=0, limit=10))
        return out
    assert "low" not in _simulate(arrivals, hosts=1, until=300, aging_s=None)
    starts = _simulate(arrivals, hosts=1, until=400, aging_s=1.0)
    assert "low" in starts
    # only runs submitted less than (101 - 0) x aging_s after it went first
    ahead = [rid for rid, t in starts.items() if t < starts["low"]]
    assert ahead and all(int(rid[2:]) < 1 + 101 for rid in ahead)


def test_same_priority_order_is_not_changed_by_aging():
    d = decide([run("b", 8, t=3600 * 5 + 1), run("a", 8, t=0)], [host(0)], [], now=3600 * 10)
    assert started(d) == ["a"]


def test_backfill_tries_the_shortest_limit_first():
    # host 0 is the head's at 100; host 1 has 2 GPUs free for good: the short run gets them
    hosts = [host(0, busy=set(range(8))), host(1, busy=set(range(6)))]
    running = [holding("r0", 0, range(8), ends_at=100), holding("r1", 1, range(6), ends_at=5000)]
    queue = [run("head", 8, t=0), run("long", 2, t=1, limit=10_000), run("short", 2, t=2, limit=50)]
    d = decide(queue, hosts, running, now=10)
    assert started(d) == ["short"]


def test_backfill_looks_only_depth_runs_behind_the_head():
    hosts = [host(0, busy=set(range(6)))]
    running = [holding("r0", 0, range(6), ends_at=100)]
    queue = [run("head", 8, t=0)] + [run(f"big{i}", 4, t=1 + i, limit=10) for i in range(3)] + \
        [run("small", 1, t=9, limit=10)]
    assert started(decide(queue, hosts, running, now=10)) == ["small"]
    assert started(decide(queue, hosts, running, now=10, depth=3)) == []


def test_a_queue_the_caller_keeps_in_order_is_taken_as_given():
    queue = [run("second", 8, t=5), run("first", 8, t=1)]
    assert started(decide(queue, [host(0)], [], now=10)) == ["first"]
    assert started(decide(queue, [host(0)], [], now=10, in_order=True)) == ["second"]

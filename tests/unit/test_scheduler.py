"""The scheduler's decision: order, reservations, backfill, gangs, refusals, runs without a limit, starvation."""

from __future__ import annotations

import pytest

from gpufleet.allocator import BlockSlot, HostIndex, HostSlots, Request
from gpufleet.models import GPU, GPUSpec
from gpufleet.scheduler import Quota, Running, Usage, Waiting, decide, never_fits, ordered

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


# -- quotas --------------------------------------------------------------------------------------------------------


def of(run_id: str, n: int, project: str = "ml", user: str = "alice", t: float = 0.0, **kw) -> Waiting:
    w = run(run_id, n, t, **kw)
    return Waiting(w.run_id, w.request, w.submitted_at, nodes=w.nodes, priority=w.priority,
                   max_duration=w.max_duration, user=user, project=project)


def holding_gpus(run_id: str, iid: int, blocks, ends_at: float | None, project: str = "ml", user: str = "alice",
                 model: str = "H100") -> Running:
    blocks = tuple(blocks)
    return Running(run_id, tuple((iid, b) for b in blocks), ends_at, user=user, project=project,
                   gpus=(model,) * len(blocks))


def held(decision) -> dict[str, str]:
    return {h.run_id: h.reason for h in decision.held}


def test_a_user_quota_holds_that_users_run_only():
    running = [holding_gpus("r1", 0, range(6), 500)]
    quotas = [Quota("ml", user="alice", gpus=8)]
    waiting = [of("a2", 4, t=1), of("b1", 4, user="bob", t=2), of("a3", 2, t=3)]
    d = decide(waiting, [host(0, busy=set(range(6))), host(1)], running, now=10, quotas=quotas)
    assert started(d) == ["b1", "a3"]  # alice's 2 more reach 8/8; bob has no quota
    assert held(d) == {"a2": "quota: alice runs 6/8 GPUs of project ml"}
    assert not d.reservations and not d.refused


def test_a_project_quota_counts_the_runs_started_in_the_same_decision():
    quotas = [Quota("ml", gpus=8)]
    waiting = [of("a", 4, t=0), of("b", 4, user="bob", t=1), of("c", 2, user="carol", t=2),
               of("d", 2, project="cv", t=3)]
    d = decide(waiting, [host(0), host(1)], [], now=10, quotas=quotas)
    assert started(d) == ["a", "b", "d"]
    assert held(d) == {"c": "quota: project ml runs 8/8 GPUs"}


def test_a_model_quota_counts_only_gpus_of_that_model():
    hosts = [host(0, busy={0, 1}), host(1, model="A100")]
    # a running run's GPUs named the way the probe names them, or by model: both match "H100"
    running = [Running("r1", ((0, 0),), 500, user="alice", project="ml", gpus=("NVIDIA H100 80GB HBM3",)),
               holding_gpus("r2", 0, [1], 500, user="bob")]
    quotas = [Quota("ml", gpu="H100", gpus=4)]
    def named(spec: str) -> Request:
        return Request(gpu=GPUSpec.model_validate(spec))
    waiting = [of("h", 4, request=named("H100:4"), t=0), of("a", 4, request=named("A100:4"), t=1),
               of("h2", 2, user="bob", t=2, request=named("h100:2"))]
    d = decide(waiting, hosts, running, now=10, quotas=quotas)
    assert started(d) == ["a", "h2"]
    assert held(d) == {"h": "quota: project ml runs 2/4 H100 GPUs"}
    # a run naming no model counts with the GPUs its placement takes of that model
    quotas = [Quota("ml", gpu="H100", gpus=6)]
    hosts = [host(0, busy={0, 1}), host(1, model="A100", busy=set(range(4)))]  # 6 H100 free, 4 A100 free
    d = decide([of("any", 5, t=0)], hosts, running, now=10, quotas=quotas)
    assert started(d) == [] and held(d) == {"any": "quota: project ml runs 2/6 H100 GPUs"}
    d = decide([of("any", 4, t=0)], hosts, running, now=10, quotas=quotas)
    assert started(d) == ["any"] and d.starts[0].blocks[0][0] == 1  # best fit: the A100 host, no H100 taken


def test_held_runs_do_not_block_the_queue_nor_take_the_heads_reservation():
    busy = holding_gpus("r1", 0, range(6), 100, project="cv")
    waiting = [of("big", 8, t=0), of("head", 8, project="cv", t=1), of("small", 2, project="cv", t=2, limit=50)]
    hosts = [host(0, busy=set(range(6)))]
    d = decide(waiting, hosts, [busy], now=10)
    assert d.reservations[0].run_id == "big"  # without the quota, big is the head
    d = decide(waiting, hosts, [busy], now=10, quotas=[Quota("ml", gpus=4)])
    assert held(d) == {"big": "quota: project ml runs 0/4 GPUs (the run asks for 8 GPUs, more than the quota of 4)"}
    (res,) = d.reservations
    assert res.run_id == "head" and res.at == 100
    assert started(d) == ["small"] and d.starts[0].backfill


def test_runs_behind_the_head_over_a_quota_are_held_and_the_rest_backfill():
    busy = holding_gpus("r1", 0, range(6), 100, project="cv")
    waiting = [of("head", 8, project="cv", t=0), of("s1", 1, t=1, limit=50), of("s2", 1, t=2, limit=50)] + \
        [of(f"far{i}", 1, t=10 + i, limit=50) for i in range(3)]
    d = decide(waiting, [host(0, busy=set(range(6)))], [busy], now=10, quotas=[Quota("ml", gpus=1)], depth=2)
    assert started(d) == ["s1"] and d.reservations[0].run_id == "head"
    # every queued run over the quota is listed, also those beyond the backfill depth
    assert held(d) == {r: "quota: project ml runs 1/1 GPUs" for r in ("s2", "far0", "far1", "far2")}


def test_a_held_run_starts_once_running_usage_drops():
    quotas = [Quota("ml", user="alice", gpus=8)]
    waiting = [of("next", 4, t=5)]
    running = [holding_gpus("r1", 0, range(4), 100), holding_gpus("r2", 0, range(4, 8), None)]
    d = decide(waiting, [host(0, busy=set(range(8))), host(1)], running, now=10, quotas=quotas)
    assert started(d) == [] and held(d) == {"next": "quota: alice runs 8/8 GPUs of project ml"}
    assert not d.reservations  # a held run reserves nothing
    d = decide(waiting, [host(0, busy=set(range(4, 8))), host(1)], running[1:], now=100, quotas=quotas)
    assert started(d) == ["next"] and not d.held


def test_a_run_bigger_than_its_quota_waits_held_and_starts_when_the_quota_is_raised():
    gang = of("gang", 8, nodes=2)
    hosts = [host(0), host(1)]
    d = decide([gang], hosts, [], now=0, cluster_fleets={"f"}, quotas=[Quota("ml", user="alice", gpus=8)])
    assert not d.refused and not d.starts
    assert held(d) == {"gang": "quota: alice runs 0/8 GPUs of project ml (the run asks for 16 GPUs, "
                               "more than the quota of 8)"}
    d = decide([gang], hosts, [], now=0, cluster_fleets={"f"}, quotas=[Quota("ml", user="alice", gpus=16)])
    assert started(d) == ["gang"]


def test_a_run_over_its_quota_that_can_never_fit_is_refused_not_held():
    d = decide([of("huge", 16)], [host(0)], [], now=0, quotas=[Quota("ml", gpus=4)])
    assert not d.held and d.refused[0].run_id == "huge" and d.refused[0].reason.startswith("never fits")


# -- fair share ----------------------------------------------------------------------------------------------------


USAGE = Usage(projects={"big": 100.0, "small": 1.0},
              users={("big", "u1"): 100.0, ("small", "u1"): 0.9, ("small", "u2"): 0.1})


def test_fair_share_orders_equal_priority_by_project_then_user_usage():
    waiting = [of("a", 8, project="big", user="u1", t=0), of("b", 8, project="small", user="u1", t=1),
               of("c", 8, project="small", user="u2", t=2), of("n", 8, project="new", user="u9", t=3)]
    assert [r.run_id for r in ordered(waiting, now=10, usage=USAGE)] == ["n", "c", "b", "a"]
    assert [r.run_id for r in ordered(waiting, now=10)] == ["a", "b", "c", "n"]
    d = decide(waiting, [host(0)], [], now=10, usage=USAGE)
    assert started(d) == ["n"] and d.reservations[0].run_id == "c"


def test_fair_share_ties_are_on_the_whole_aged_priority():
    # waited 7000 s and 4100 s: both one point aged, so usage decides
    early, late = of("early", 8, project="big", user="u1", t=100), of("late", 8, project="small", user="u2", t=3000)
    assert started(decide([early, late], [host(0)], [], now=7100, usage=USAGE)) == ["late"]
    assert started(decide([early, late], [host(0)], [], now=7100)) == ["early"]
    # waited 7000 s and 3000 s: the earlier run has a point more, fair share does not override it
    late = of("late", 8, project="small", user="u2", t=4100)
    assert started(decide([early, late], [host(0)], [], now=7100, usage=USAGE)) == ["early"]


def test_fair_share_never_overrides_a_higher_priority():
    waiting = [of("heavy", 8, project="big", user="u1", t=5, priority=60),
               of("light", 8, project="small", user="u2", t=0)]
    d = decide(waiting, [host(0)], [], now=10, usage=USAGE)
    assert started(d) == ["heavy"] and d.reservations[0].run_id == "light"


def test_empty_usage_decides_as_no_fair_share():
    import random
    rng = random.Random(3)
    waiting = [of(f"r{i}", rng.choice((1, 2, 4, 8)), project=rng.choice("pq"), user=rng.choice("uv"),
                  t=rng.randint(0, 20000), priority=rng.choice((40, 50, 60)), limit=rng.choice((60, 600, None)))
               for i in range(60)]
    hosts = [host(0, busy=set(range(5))), host(1, busy={0}), host(2)]
    running = [holding_gpus("x", 0, range(5), 3000), holding_gpus("y", 1, [0], None)]
    base = decide(waiting, hosts, running, now=20000)
    assert decide(waiting, hosts, running, now=20000, usage=Usage()) == base
    # and a usage that tells the projects apart does change it
    assert decide(waiting, hosts, running, now=20000, usage=Usage({"p": 5.0, "q": 1.0})) != base


def test_replicas_of_one_service_spread_over_hosts_and_pack_only_when_they_must():
    import dataclasses

    one = dataclasses.replace(gpus(1), spread_group="web")
    d = decide([run("web.0", 1, t=0, request=one), run("web.1", 1, t=1, request=one)], [host(0), host(1)], [], now=3)
    assert sorted(s.blocks[0][0] for s in d.starts) == [0, 1]  # one on each host (best fit would pack host 0)
    # a replica already on host 0 (the scheduler is told: spread): the new one goes to host 1
    held = dataclasses.replace(one, spread=frozenset({0}))
    d = decide([run("web.2", 1, request=held)], [host(0, busy={0}), host(1)], [holding("web.0", 0, [0], None)], now=3)
    assert d.starts[0].blocks[0][0] == 1
    # no other host has room: on the same host after all
    d = decide([run("web.2", 1, request=held)], [host(0, busy={0}), host(1, busy=set(range(8)))],
               [holding("web.0", 0, [0], None)], now=3)
    assert d.starts[0].blocks[0][0] == 0

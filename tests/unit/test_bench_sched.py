"""The trace simulator of benchmarks/ (no timing here: only that it is deterministic and sound)."""

import random

from benchmarks.bench_sched import LIMITS, limit_for, simulate


def _rows(seed: int, n: int, hosts: int):
    rng = random.Random(seed)
    t, rows = 0, []
    for i in range(n):
        t += rng.randint(0, 300)
        gpus = rng.choice((1, 1, 1, 2, 4, 8, 16, 3))
        rows.append((f"j{i}", t, gpus, 1, rng.choice((5, 60, 600, 4000, 20000))))
    return rows


def test_limits_are_user_style_and_never_below_the_duration():
    assert limit_for(1) == 3600 and limit_for(3600) == 3600 and limit_for(3601) == 4 * 3600
    assert limit_for(172800) == 48 * 3600 and limit_for(LIMITS[-1] + 1) == 2 * LIMITS[-1]


def test_every_policy_runs_every_job_and_results_repeat():
    rows = _rows(1, 300, 2)
    for policy in ("gpufleet", "easy", "fifo"):
        r = simulate(rows, 2, policy)
        assert r == {**simulate(rows, 2, policy), "seconds": r["seconds"]}
        assert r["ran"] == 300 and r["never_started"] == 0 and r["refused"] == 0
        assert 0 < r["utilization"] <= 1
        assert r["broken_reservations"] == 0


def test_backfill_beats_fifo_and_a_gang_too_big_is_refused():
    rows = _rows(2, 400, 2)
    fifo, easy, ours = (simulate(rows, 2, p) for p in ("fifo", "easy", "gpufleet"))
    assert easy["wait_mean"] < fifo["wait_mean"] and ours["wait_mean"] < fifo["wait_mean"]
    rows.append(("huge", rows[-1][1] + 1, 24, 1, 10))  # 3 hosts' worth on a fleet of 2
    for policy in ("fifo", "easy", "gpufleet"):
        r = simulate(rows, 2, policy)
        assert r["refused"] == 1 and r["ran"] == 400

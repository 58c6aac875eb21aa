"""The trace simulator of benchmarks/ (no timing here: only that it is deterministic and sound)."""

import random

import pytest

from benchmarks.bench_sched import LIMITS, fairness, limit_for, project_of, shares, simulate, window
from gpufleet.scheduler import Quota


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


def test_the_project_is_phillys_virtual_cluster_and_none_elsewhere():
    assert project_of("6214e9-54649") == "6214e9" and project_of("ee9e8c-0") == "ee9e8c"
    assert project_of("363167") == "" and project_of("openb-pod-0033") == ""  # Helios, Alibaba: no project
    assert window([("a-1", 5, 1, 1, 9), ("b-2", 86400, 1, 1, 9), ("c-3", 2 * 86400, 1, 1, 9)], 1, 1) == \
        [("b-2", 0, 1, 1, 9)]


def _two_projects():
    """Project aaaaaa floods the fleet at t=0; bbbbbb submits as many jobs just after (same hour)."""
    rows = [(f"aaaaaa-{i}", 0, 8, 1, 600) for i in range(10)]
    rows += [(f"bbbbbb-{10 + i}", 1 + i, 8, 1, 600) for i in range(10)]
    return rows


def test_fair_share_lets_the_light_project_in_between_the_heavy_ones():
    rows = _two_projects()
    plain = simulate(rows, 1, "gpufleet")
    fair = simulate(rows, 1, "gpufleet", fair_share=True)
    assert fair == {**simulate(rows, 1, "gpufleet", fair_share=True), "seconds": fair["seconds"]}
    for r in (plain, fair):
        assert r["ran"] == 20 and set(r["projects"]) == {"aaaaaa", "bbbbbb"}
        assert r["projects"]["aaaaaa"]["jobs"] == 10 and r["projects"]["bbbbbb"]["offered"] == pytest.approx(10 * 8 / 6)
    # in submission order bbbbbb's i-th job (submitted at 1 + i) waits for all ten of aaaaaa's jobs (600 s
    # each) and i of its own: it starts at 6000 + 600 i
    assert plain["projects"]["bbbbbb"]["wait_mean"] == pytest.approx(sum(6000 + 599 * i - 1 for i in range(10)) / 10)
    # with fair share the projects take turns once aaaaaa's first job has run: bbbbbb's i-th job starts at
    # 600 + 1200 i (the project that used less recently goes next)
    assert fair["projects"]["bbbbbb"]["wait_mean"] == pytest.approx(sum(600 + 1199 * i - 1 for i in range(10)) / 10)
    assert fair["projects"]["aaaaaa"]["wait_mean"] > plain["projects"]["aaaaaa"]["wait_mean"]
    assert fair["wait_mean"] == pytest.approx(plain["wait_mean"], abs=10)  # same work, one host: same total


def test_a_project_quota_leaves_room_for_the_others():
    rows = _two_projects()
    plain = simulate(rows, 2, "gpufleet")
    capped = simulate(rows, 2, "gpufleet", quotas=[Quota("aaaaaa", gpus=8)])
    assert capped["ran"] == plain["ran"] == 20
    # aaaaaa runs on one host at a time: bbbbbb has the other from its first job on (the i-th, submitted at
    # 1 + i, starts at 1 + 600 i)
    assert capped["projects"]["bbbbbb"]["wait_mean"] == pytest.approx(sum(599 * i for i in range(10)) / 10)
    assert capped["projects"]["bbbbbb"]["wait_mean"] < plain["projects"]["bbbbbb"]["wait_mean"]


def test_shares_and_fairness_numbers():
    assert shares({"a": {"gpu_hours": 3.0}, "b": {"gpu_hours": 1.0}}) == {"a": 0.75, "b": 0.25}
    dev, jain = fairness({"a": 0.75, "b": 0.25})
    assert dev == pytest.approx(0.25) and jain == pytest.approx(1 / (2 * (0.75 ** 2 + 0.25 ** 2)))
    assert fairness({"a": 0.5, "b": 0.5}) == (0.0, 1.0)

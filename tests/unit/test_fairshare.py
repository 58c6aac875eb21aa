"""Decayed and plain GPU-hours (gpufleet/fairshare.py), against numbers worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from gpufleet.fairshare import HALF_LIFE_DEFAULT, Usage, UsageMeter, decayed_usage, gpu_hours

H = 3600.0  # a half-life of one hour keeps the hand arithmetic short
LN2 = math.log(2)


def test_the_default_half_life_is_a_week():
    assert HALF_LIFE_DEFAULT == 7 * 86400


def test_decayed_usage_closed_form():
    now = 10 * H
    # 2 GPUs over the last half-life: 2 * (1/ln 2) h * (1 - 1/2) = 1/ln 2 GPU-hours (undecayed: 2)
    u = decayed_usage([("ml", "alice", 2, now - H, now)], now, H)
    assert u.users == {("ml", "alice"): pytest.approx(1 / LN2)} and u.projects == {"ml": pytest.approx(1.442695, 1e-6)}
    # 1 GPU from two half-lives ago to one: (1/4 .. 1/2) of the weight: 0.25 / ln 2
    u = decayed_usage([("ml", "bob", 1, now - 2 * H, now - H)], now, H)
    assert u.users[("ml", "bob")] == pytest.approx(0.25 / LN2) == pytest.approx(0.360674, 1e-6)
    # still running (no end) counts up to now; an end after now is cut at now; a start after now counts nothing
    running = decayed_usage([("ml", "bob", 1, now - H, None)], now, H).users[("ml", "bob")]
    assert running == pytest.approx(0.5 / LN2)
    assert decayed_usage([("ml", "bob", 1, now - H, now + 5 * H)], now, H).users[("ml", "bob")] == running
    assert decayed_usage([("ml", "bob", 1, now + 1, None)], now, H).users == {}
    # a run much shorter than the half-life weighs about its GPU-hours: 8 GPUs x 36 s = 0.08
    u = decayed_usage([("cv", "c", 8, now - 36, now)], now, 1e9)
    assert u.users[("cv", "c")] == pytest.approx(0.08, rel=1e-6)
    # however long a run, it counts at most gpus x h / ln 2
    assert decayed_usage([("cv", "c", 1, -1e9, None)], now, H).users[("cv", "c")] == pytest.approx(1 / LN2)


def test_decayed_usage_sums_users_into_projects():
    now = 4 * H
    records = [("ml", "alice", 2, now - H, now), ("ml", "alice", 1, now - 2 * H, now - H),
               ("ml", "bob", 1, now - H, None), ("cv", "carol", 4, now - H, now)]
    u = decayed_usage(records, now, H)
    assert u.users == pytest.approx({("ml", "alice"): 1.25 / LN2, ("ml", "bob"): 0.5 / LN2,
                                     ("cv", "carol"): 2 / LN2})
    assert u.projects == pytest.approx({"ml": 1.75 / LN2, "cv": 2 / LN2})
    with pytest.raises(ValueError):
        decayed_usage(records, now, 0)


def test_gpu_hours_clips_to_the_window():
    now = 10 * H
    records = [("ml", "alice", 2, 0, 3 * H),          # before and into the window: 1 h of it, 2 GPUs
               ("ml", "alice", 1, 5 * H, None),        # running: 5 h up to now
               ("ml", "bob", 4, 0, H),                 # wholly before the window: nothing
               ("cv", "carol", 3, 9 * H, 12 * H)]      # ends after now: 1 h
    assert gpu_hours(records, since=2 * H, now=now) == pytest.approx({("ml", "alice"): 7.0, ("cv", "carol"): 3.0})


def test_the_meter_gives_decayed_usage_at_every_moment():
    rng = random.Random(5)
    meter = UsageMeter(H)
    records: list[list] = []
    running: list[int] = []
    t = 0.0
    for _ in range(300):
        t += rng.uniform(0, 900)
        if running and rng.random() < 0.5:
            i = running.pop(rng.randrange(len(running)))
            p, u, g, s, _ = records[i]
            meter.end(p, u, g, s, t)
            records[i][4] = t
        else:
            rec = [rng.choice("pq"), rng.choice("uv"), rng.choice((1, 2, 8)), t, None]
            meter.start(*rec[:4])
            running.append(len(records))
            records.append(rec)
        if rng.random() < 0.3:
            now = t + rng.uniform(0, 100)
            got, want = meter.usage(now), decayed_usage([tuple(r) for r in records], now, H)
            assert got.projects == pytest.approx(want.projects, rel=1e-9, abs=1e-9)
            assert got.users == pytest.approx(want.users, rel=1e-9, abs=1e-9)
            t = now
    assert isinstance(meter.usage(t), Usage)

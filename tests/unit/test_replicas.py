"""A service's replicas (gpufleet.replicas): the pure decisions, played out over passes."""

from __future__ import annotations

import pytest

from gpufleet.models import RunStatus
from gpufleet.replicas import Actions, Replica, decide, desired, replica_index, version

R = RunStatus.RUNNING


def rep(name: str, current: bool = True, ready: bool = True, status: RunStatus = R) -> Replica:
    return Replica(name, status, current, ready)


def test_missing_replicas_are_added_and_extras_stopped_not_ready_then_newest_first():
    assert decide(2, []) == Actions(add=2)
    assert decide(2, [rep("w.0")]) == Actions(add=1)
    assert decide(2, [rep("w.0"), rep("w.1")]) == Actions()
    out = decide(1, [rep("w.0"), rep("w.3"), rep("w.2", ready=False)])
    assert out == Actions(stop=["w.2", "w.3"])
    assert decide(0, [rep("w.0")]) == Actions(stop=["w.0"])


def play(wanted: int, replicas: list[Replica], passes: int = 20) -> list[int]:
    """Roll ``replicas`` out: each pass does what decide says, a new replica becoming ready one pass after it
    is added. The ready count after each pass."""
    counter = 100
    fresh: set[str] = set()
    history = []
    for _ in range(passes):
        out = decide(wanted, replicas)
        replicas = [r for r in replicas if r.name not in out.stop]
        # the ones added last pass are ready now
        replicas = [Replica(r.name, r.status, r.current, True) if r.name in fresh else r for r in replicas]
        fresh = set()
        for _ in range(out.add):
            replicas.append(rep(f"w.{counter}", ready=False))
            fresh.add(f"w.{counter}")
            counter += 1
        history.append(sum(r.ready for r in replicas))
        if all(r.current for r in replicas) and len(replicas) == wanted and all(r.ready for r in replicas):
            break
    assert all(r.current for r in replicas) and len(replicas) == wanted, replicas
    return history


@pytest.mark.parametrize("wanted", [1, 2, 3])
def test_a_rolling_update_never_has_fewer_ready_replicas_than_wanted_and_at_most_one_extra(wanted):
    old = [rep(f"w.{i}", current=False) for i in range(wanted)]
    history = play(wanted, old)
    assert min(history) >= wanted, history


def test_a_rolling_update_stops_old_replicas_that_serve_nothing_at_once():
    out = decide(2, [rep("w.0", current=False), rep("w.1", current=False, ready=False, status=RunStatus.PENDING)])
    assert out.stop == ["w.1"]
    assert out.add == 2  # two new (one more than wanted lives: the ready old one still serves)
    # the new one is not ready yet: the old ready one stays
    out = decide(2, [rep("w.0", current=False), rep("w.2", ready=False), rep("w.3", ready=False)])
    assert out == Actions()


def test_a_rolling_update_of_a_service_with_no_ready_replica_replaces_them():
    out = decide(1, [rep("w.0", current=False, ready=False)])
    assert out == Actions(add=1, stop=["w.0"])


def test_replica_names_and_what_is_a_new_version():
    assert replica_index("web.12") == 12
    a = {"type": "service", "image": "x", "replicas": "1..2", "scaling": {"metric": "rps", "target": 1}}
    assert version(a) == version({**a, "replicas": "2..4", "scaling": {"metric": "rps", "target": 5}})
    assert version(a) != version({**a, "image": "y"})


SCALED = {"replicas": "1..3", "scaling": {"metric": "rps", "target": 2, "scale_up_delay": 10,
                                          "scale_down_delay": 60}}


def test_desired_follows_rps_over_target_within_the_range_after_the_delays():
    assert desired(SCALED, 1, None, None, 0) == 1  # not measured: as it is
    assert desired(SCALED, 1, 3.5, 0, 5) == 1  # up, but within scale_up_delay of the last change
    assert desired(SCALED, 1, 3.5, 0, 10) == 2  # ceil(3.5 / 2)
    assert desired(SCALED, 1, 100, 0, 10) == 3  # at most the range's top
    assert desired(SCALED, 3, 0, 0, 59) == 3  # down, within scale_down_delay
    assert desired(SCALED, 3, 0, 0, 60) == 1  # at least the range's bottom
    assert desired(SCALED, 2, 3.9, 0, 1000) == 2  # as it should be


def test_from_zero_replicas_a_request_scales_up_at_once():
    spec = {**SCALED, "replicas": "0..2"}
    assert desired(spec, 0, 0.02, 0, 1) == 1
    assert desired(spec, 1, 0.0, 0, 61) == 0


def test_without_scaling_the_count_is_the_fixed_one():
    assert desired({"replicas": 3}, 3, 50, None, 0) == 3
    assert desired({"replicas": 2}, 3, None, None, 0) == 2  # an update to fewer replicas

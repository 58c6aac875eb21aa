"""dstack's utilization_policy: the model's forms and the pure rule that stops an idle run."""

import pytest

from gpufleet.errors import ConfigError
from gpufleet.metrics.policy import COVER_SLACK, idle_gpu, reason
from gpufleet.runconfig import parse_run

BASE = "type: task\nimage: x\ncommands: [a]\n"


def test_dstack_forms_load():
    r = parse_run(BASE + "utilization_policy: {min_gpu_utilization: 10, time_window: 30m}\n", "t.yml")
    assert r.config.utilization_policy.min_gpu_utilization == 10
    assert r.config.utilization_policy.time_window == 1800
    r = parse_run(BASE + "utilization_policy:\n  min_gpu_utilization: 0\n  time_window: 3600\n", "t.yml")
    assert r.config.utilization_policy.time_window == 3600


@pytest.mark.parametrize("policy, where", [
    ("{min_gpu_utilization: 10, time_window: 4m}", "utilization_policy.time_window"),
    ("{min_gpu_utilization: 101, time_window: 30m}", "utilization_policy.min_gpu_utilization"),
    ("{min_gpu_utilization: 10}", "utilization_policy.time_window"),
    ("{min_gpu_utilization: 10, time_window: 30m, max: 3}", "utilization_policy.max"),
])
def test_bad_policy_names_the_field(policy, where):
    with pytest.raises(ConfigError) as e:
        parse_run(BASE + f"utilization_policy: {policy}\n", "t.yml")
    assert where in str(e.value)
    assert "t.yml:4:" in str(e.value)


def series(start, end, every, value):
    t, out = start, []
    while t <= end:
        out.append((t, value(t) if callable(value) else value))
        t += every
    return out


NOW, WINDOW = 10_000.0, 600.0


def test_a_gpu_idle_for_the_whole_window_is_found():
    points = {("n1", 0): series(NOW - 900, NOW, 10, 95.0), ("n1", 1): series(NOW - 900, NOW, 10, 3.0)}
    idle = idle_gpu(points, 10, WINDOW, NOW)
    assert idle is not None and idle.gpu == ("n1", 1) and idle.peak == 3.0
    assert idle.samples == 61
    assert reason(idle, 10, WINDOW) == ("its utilization_policy: GPU 1 on n1 stayed below 10% for 10m "
                                        "(at most 3% in 61 samples)")


def test_one_busy_sample_in_the_window_keeps_the_run():
    points = {("n1", 0): series(NOW - 900, NOW, 10, lambda t: 50.0 if t == NOW - 300 else 2.0)}
    assert idle_gpu(points, 10, WINDOW, NOW) is None
    # the busy sample left the window: now it is judged idle
    assert idle_gpu(points, 10, WINDOW, NOW + 400) is None  # no samples after NOW: window not covered
    later = {("n1", 0): points[("n1", 0)] + series(NOW + 10, NOW + 400, 10, 2.0)}
    assert idle_gpu(later, 10, WINDOW, NOW + 400).gpu == ("n1", 0)


def test_a_window_not_yet_covered_is_not_judged():
    started = NOW - WINDOW + COVER_SLACK + 10  # sampled since a little less than the window
    assert idle_gpu({("n1", 0): series(started, NOW, 10, 0.0)}, 10, WINDOW, NOW) is None
    assert idle_gpu({("n1", 0): series(NOW - WINDOW + COVER_SLACK, NOW, 10, 0.0)}, 10, WINDOW, NOW) is not None


def test_unreported_utilization_is_never_idle():
    assert idle_gpu({("n1", 0): series(NOW - 900, NOW, 10, None)}, 10, WINDOW, NOW) is None
    assert idle_gpu({}, 10, WINDOW, NOW) is None


def test_min_zero_never_stops():
    assert idle_gpu({("n1", 0): series(NOW - 900, NOW, 10, 0.0)}, 0, WINDOW, NOW) is None

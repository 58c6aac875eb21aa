"""The packing simulator of benchmarks/ (no timing here: only that it is deterministic and sound)."""

from benchmarks.bench_pack import make_stream, simulate, upper_bound


def test_stream_is_seeded():
    assert make_stream(7, 50, 4) == make_stream(7, 50, 4)
    assert make_stream(7, 50, 4) != make_stream(8, 50, 4)


def test_no_policy_beats_the_upper_bound_and_results_repeat():
    stream = make_stream(3, 300, 4, load=1.2)
    bound = upper_bound(stream, 4)
    for policy in ("gpufleet", "first-fit", "random"):
        r = simulate(stream, 4, policy, seed=3)
        assert r == simulate(stream, 4, policy, seed=3)
        assert 0 < r["gpu_hours"] <= bound + 1e-6
        assert r["refused"] == sum(r["refused_by_size"].values())


def test_a_lone_job_is_never_refused():
    stream = [(0.0, 8, 5.0), (10.0, 4, 1.0), (20.0, 1, 1.0)]
    for policy in ("gpufleet", "first-fit", "random"):
        r = simulate(stream, 1, policy)
        assert r["refused"] == 0
        assert abs(r["gpu_hours"] - upper_bound(stream, 1)) < 1e-9

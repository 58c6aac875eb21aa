"""The packing simulator of benchmarks/ (no timing here: only that it is deterministic and sound)."""

from benchmarks.bench_pack import GPUS, lp_bound, make_stream, simulate, upper_bound


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


def _best_subset(stream, hosts: int) -> float:
    """Brute force: the most GPU-hours of any set of jobs that never needs more than the fleet's GPUs."""
    cap = hosts * GPUS
    best = 0.0
    for mask in range(1 << len(stream)):
        chosen = [j for i, j in enumerate(stream) if mask >> i & 1]
        if all(sum(s for a, s, length in chosen if a <= t < a + length) <= cap for t, _, _ in chosen):
            best = max(best, sum(s * length for _, s, length in chosen))
    return best


def test_lp_bound_lies_between_the_best_choice_of_jobs_and_the_fluid_bound():
    for seed in range(5):
        stream = make_stream(seed, 10, 1, load=2.0)
        lp = lp_bound(stream, 1)
        assert _best_subset(stream, 1) - 1e-3 <= lp <= upper_bound(stream, 1) + 1e-3
        for policy in ("gpufleet", "first-fit", "random", "repack"):
            assert simulate(stream, 1, policy, seed)["gpu_hours"] <= lp + 1e-3


def test_lp_bound_is_exact_when_every_job_needs_the_whole_fleet():
    """Jobs of 8 GPUs on one 8-GPU host: at most one runs at a time, so the LP is an interval
    scheduling problem whose relaxation has integral optima; it must equal the brute force."""
    stream = [(0.0, 8, 4.0), (1.0, 8, 2.0), (2.5, 8, 3.0), (3.5, 8, 1.0), (5.0, 8, 6.0), (6.0, 8, 0.5)]
    # best: 0-4 (32) then 5-11 (48) = 80, beats 1-3 + 3.5-4.5 + 5-11 = 16+8+48 = 72
    assert abs(lp_bound(stream, 1) - _best_subset(stream, 1)) < 1e-3
    assert abs(lp_bound(stream, 1) - 80.0) < 1e-3


def test_repacking_accepts_whatever_fits_in_total():
    # each host: 4 + 2 + 1 + 1 GPUs; one 1-GPU job on each ends early, leaving 1 free GPU per host
    stream = [(0.0, 4, 10.0), (0.1, 2, 10.0), (0.2, 1, 1.0), (0.3, 1, 10.0),
              (0.4, 4, 10.0), (0.5, 2, 10.0), (0.6, 1, 1.0), (0.7, 1, 10.0)]
    for policy in ("gpufleet", "first-fit", "repack"):
        assert simulate(stream, 2, policy)["refused"] == 0
    stream.append((2.0, 2, 1.0))  # 2 GPUs free in the fleet, but not on one host
    assert simulate(stream, 2, "repack")["refused"] == 0
    for policy in ("gpufleet", "first-fit", "random"):
        assert simulate(stream, 2, policy)["refused"] == 1, policy

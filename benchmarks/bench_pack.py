"""Packing quality: a seeded stream of 1/2/4/8-GPU jobs with random lengths on simulated 8-GPU hosts.
A job that fits nowhere when it arrives is refused (no queue). Policies: gpufleet's allocator
(allocator.place, best fit), first fit (first host with room, lowest free GPUs) and random choice
(dstack picks free GPUs in random order: a random host with room, random free GPUs on it).

Two upper bounds that no policy can beat, and one reference that is not a bound:
- fluid: at every moment min(capacity, GPUs of every job that would be running had all been accepted);
- lp: the best GPU-hours of any choice of jobs to accept, knowing the whole stream in advance, with
  jobs free to move between hosts and to be accepted in part (the linear relaxation, solved exactly
  as a min-cost flow); it is at most the fluid bound;
- repack: accept on arrival whenever the fleet has enough free GPUs in total, as if running jobs
  could be moved to make room at no cost. What is left between a placing policy and this is the
  cost of fragmentation; what is left between this and the bounds is the cost of deciding on
  arrival without knowing the future.
"""

from __future__ import annotations

import heapq
import random

import networkx as nx

from gpufleet.allocator import BlockSlot, HostSlots, NoCapacity, Request, place
from gpufleet.models import GPU, GPUSpec

SIZES = (1, 2, 4, 8)
GPUS = 8


def make_stream(seed: int, jobs: int, hosts: int, load: float = 0.95) -> list[tuple[float, int, float]]:
    """(arrival, gpus, length) jobs; mean offered load ``load`` of the fleet's GPUs."""
    rng = random.Random(seed)
    mean_len = 10.0
    mean_gpus = sum(SIZES) / len(SIZES)
    rate = load * hosts * GPUS / (mean_gpus * mean_len)
    t, out = 0.0, []
    for _ in range(jobs):
        t += rng.expovariate(rate)
        out.append((t, rng.choice(SIZES), rng.expovariate(1 / mean_len)))
    return out


def host_gpus(h: int) -> list[GPU]:
    return [GPU(index=i, vendor="nvidia", name="NVIDIA H100 80GB HBM3", model="H100", memory_mib=81559,
                uuid=f"GPU-{h}-{i}", numa_node=i // 4) for i in range(GPUS)]


def simulate(stream, hosts: int, policy: str, seed: int = 0) -> dict:
    rng = random.Random(seed)
    free = [[True] * GPUS for _ in range(hosts)]
    gpus = [host_gpus(h) for h in range(hosts)]
    shape = ("H100x8", tuple(range(GPUS)))
    ends: list[tuple[float, int, tuple[int, ...]]] = []
    used = refused = 0.0
    refused_by_size = {s: 0 for s in SIZES}
    cross_numa = 0
    requests = {s: Request(gpu=GPUSpec.model_validate(s)) for s in SIZES}
    for arrival, size, length in stream:
        while ends and ends[0][0] <= arrival:
            _, h, taken = heapq.heappop(ends)
            for g in taken:
                free[h][g] = True
        choice = None
        if policy == "repack":
            if sum(map(sum, free)) >= size:  # move running jobs until one host has room: free here
                taken = [(h, g) for h in range(hosts) for g in range(GPUS) if free[h][g]][:size]
                for h, g in taken:
                    free[h][g] = False
                used += size * length
                for h, g in taken:
                    heapq.heappush(ends, (arrival + length, h, (g,)))
                continue
        elif policy == "gpufleet":
            slots = [HostSlots(h, "sim", h, f"node-{h}", gpus[h],
                               [BlockSlot(i, (i,), 8, 1024, i // 4, free[h][i]) for i in range(GPUS)], shape)
                     for h in range(hosts)]
            try:
                p = place(requests[size], slots)
                choice = (p.host.num, p.gpus)
            except NoCapacity:
                pass
        else:
            fits = [h for h in range(hosts) if sum(free[h]) >= size]
            if fits:
                if policy == "first-fit":
                    h = fits[0]
                    choice = (h, tuple([i for i in range(GPUS) if free[h][i]][:size]))
                else:
                    h = rng.choice(fits)
                    choice = (h, tuple(sorted(rng.sample([i for i in range(GPUS) if free[h][i]], size))))
        if choice is None:
            refused += 1
            refused_by_size[size] += 1
            continue
        h, taken = choice
        for g in taken:
            free[h][g] = False
        cross_numa += len({g // 4 for g in taken}) > 1
        used += size * length
        heapq.heappush(ends, (arrival + length, h, taken))
    return {"policy": policy, "gpu_hours": used, "refused": int(refused), "refused_by_size": refused_by_size,
            "cross_numa": cross_numa, "jobs": len(stream)}


def upper_bound(stream, hosts: int) -> float:
    """GPU-hours no policy can beat: at every moment at most min(capacity, GPUs of all jobs that
    would be running had every job been accepted) are in use."""
    events = []
    for arrival, size, length in stream:
        events.append((arrival, size))
        events.append((arrival + length, -size))
    events.sort()
    cap = hosts * GPUS
    total, demand, last = 0.0, 0, events[0][0]
    for t, delta in events:
        total += min(cap, demand) * (t - last)
        demand += delta
        last = t
    return total


def lp_bound(stream, hosts: int) -> float:
    """The most GPU-hours of any (fractional) choice of jobs to accept, knowing the stream in advance,
    with GPUs pooled over the fleet: maximise sum(x_j * gpus_j * length_j) with 0 <= x_j <= 1 and at
    every moment sum(x_j * gpus_j) over running jobs <= capacity. Solved as a min-cost flow: capacity
    units of flow go along the time line; a unit that rides a job's arc from its start to its end
    (at most gpus_j of them) earns the job's length. Lengths are scaled to integers (micro-units)."""
    cap = hosts * GPUS
    times = sorted({t for arrival, _, length in stream for t in (arrival, arrival + length)})
    at = {t: i for i, t in enumerate(times)}
    g = nx.MultiDiGraph()
    g.add_nodes_from(range(len(times)))
    g.nodes[0]["demand"], g.nodes[len(times) - 1]["demand"] = -cap, cap
    g.add_edges_from((i, i + 1, {"capacity": cap, "weight": 0}) for i in range(len(times) - 1))
    g.add_edges_from((at[arrival], at[arrival + length], {"capacity": size, "weight": -round(length * 1e6)})
                     for arrival, size, length in stream)
    cost, _ = nx.network_simplex(g)
    return -cost / 1e6


POLICIES = ("gpufleet", "first-fit", "random", "repack")


def bench(hosts: int = 64, jobs: int = 4000, seeds: tuple[int, ...] = tuple(range(1, 11)), load: float = 0.95,
          log=print) -> list[dict]:
    out = []
    for seed in seeds:
        stream = make_stream(seed, jobs, hosts, load)
        fluid, lp = upper_bound(stream, hosts), lp_bound(stream, hosts)
        log(f"  packing seed {seed}: fluid bound {fluid:.0f} GPU-hours, LP bound {lp:.0f} ({100 * lp / fluid:.2f}%)")
        for policy in POLICIES:
            r = simulate(stream, hosts, policy, seed)
            r.update(seed=seed, bound=fluid, lp_bound=lp, share=r["gpu_hours"] / fluid, lp_share=r["gpu_hours"] / lp)
            log(f"  packing seed {seed} {policy:9}: {100 * r['lp_share']:.2f}% of the LP bound, "
                f"{100 * r['share']:.2f}% of the fluid bound, {r['refused']} refused {r['refused_by_size']}, "
                f"{r['cross_numa']} jobs across NUMA nodes")
            out.append(r)
    return out

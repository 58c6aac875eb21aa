"""What the leader does with each round of samples, beyond storing them: keep GPUs used behind
gpufleet's back and faulty GPUs from new runs (Store.withhold), and stop runs that break their
`utilization_policy` (the pure rule in gpufleet.metrics.policy)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from gpufleet import queue
from gpufleet.errors import GpufleetError
from gpufleet.metrics import policy
from gpufleet.models import RunStatus
from gpufleet.models.metrics import GpuProcess, HostSample
from gpufleet.state import Store

log = logging.getLogger("gpufleet.metrics")

# (run name, since) -> {(host alias, GPU index): [(at, utilization), ...]} from the stored samples
Series = Callable[[str, float], Mapping[tuple[str, int], Sequence[tuple[float, float | None]]]]


def describe(procs: Sequence[GpuProcess]) -> str:
    """`pid 4242 (/usr/bin/python3) in no gpufleet run`: stable from one sample to the next."""
    shown = ", ".join(f"pid {p.pid}" + (f" ({p.name})" if p.name else "") for p in procs[:3])
    more = f" and {len(procs) - 3} more" if len(procs) > 3 else ""
    return f"{shown}{more} in no gpufleet run"


def withheld_of(sample: HostSample, outside: Mapping[int, Sequence[GpuProcess]]) -> dict[tuple[str, int],
                                                                                      tuple[str, str]]:
    """The GPUs of one host's sample to keep from new runs, (vendor, index) -> (kind, reason): faulty
    ones (`unhealthy`, the tool's own words) before those that a process outside gpufleet holds
    (`outside`: ``outside`` maps a GPU index to those processes)."""
    found: dict[tuple[str, int], tuple[str, str]] = {}
    for g in sample.gpus:
        if g.faults:
            found[(g.vendor, g.index)] = ("unhealthy", "; ".join(g.faults))
    for index, procs in sorted(outside.items()):
        if procs:
            vendor = next((g.vendor for g in sample.gpus if g.index == index), procs[0].vendor)
            found.setdefault((vendor, index), ("outside", describe(procs)))
    return found


def withhold(store: Store, samples: Sequence[HostSample],
             outside: Callable[[HostSample], Mapping[int, Sequence[GpuProcess]]]) -> list[str]:
    """Bring withheld GPUs in line with ``samples`` (a host that could not be read keeps what it had)."""
    messages: list[str] = []
    for s in samples:
        if s.error and not s.gpus:
            continue
        messages += store.withhold(s.fleet, s.alias, withheld_of(s, outside(s)))
    return messages


def idle_runs(store: Store, series: Series, now: float | None = None) -> list[Callable[[], bool]]:
    """Mark `stopping` the running runs whose utilization_policy is broken; return the work that stops
    them (for the caller's workers). The stop's event names the GPU and how idle it was."""
    now = time.time() if now is None else now
    work: list[Callable[[], bool]] = []
    for run in store.runs():
        # a service's own run holds no GPU: its replicas are judged (one idle replica stops the service)
        rule = run.spec.get("utilization_policy") if run.status == RunStatus.RUNNING and not run.is_service \
            else None
        if not rule:
            continue
        window, minimum = float(rule["time_window"]), float(rule["min_gpu_utilization"])
        if run.started_at is None or run.started_at > now - window:
            continue  # it has not held its GPUs for a whole window yet
        idle = policy.idle_gpu(series(run.name, now - window - policy.COVER_SLACK), minimum, window, now)
        if idle is None:
            continue
        try:
            why = policy.reason(idle, minimum, window)
            if run.replica_of:
                why = why.replace("its utilization_policy", f"the utilization_policy of its replica {run.name}", 1)
            _, stop = queue.stop(store, run.replica_of or run.name, by=why)
        except GpufleetError as e:  # it ended meanwhile
            log.info("utilization_policy of %s: %s", run.name, e)
            continue
        if stop is not None:
            work.append(stop)
    return work

"""dstack's `utilization_policy`, judged from the stored samples: a pure rule (the leader's metrics
loop applies it to running runs).

A run is stopped when any one of its GPUs stayed below `min_gpu_utilization` in every sample of the
last `time_window`, as dstack does. It is judged only when the samples cover the window: the oldest
one in it is at most COVER_SLACK seconds after the window's start and the newest at most COVER_SLACK
before now (so a run that just started, or one on a host that stopped answering, is never judged on a
part of the window).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpufleet.models.run import format_duration

COVER_SLACK = 60.0  # seconds: how late the window's first sample may be (dstack allows a minute too)

GpuKey = tuple[str, int]  # (host alias, GPU index)


@dataclass(frozen=True)
class Idle:
    """The GPU that broke the policy, and its highest utilization in the window."""

    gpu: GpuKey
    peak: float
    samples: int


def idle_gpu(points: Mapping[GpuKey, Sequence[tuple[float, float | None]]], min_utilization: float,
             window: float, now: float) -> Idle | None:
    """The first GPU (in key order) whose every sample ``(at, utilization)`` of ``[now - window, now]``
    is below ``min_utilization``, if the samples cover the window; None otherwise. A GPU whose tool
    does not report utilization (None: MIG, some drivers) is never judged idle."""
    start = now - window
    for key in sorted(points):
        inside = [(at, u) for at, u in points[key] if start <= at <= now]
        if not inside or any(u is None for _, u in inside):
            continue
        if min(at for at, _ in inside) > start + COVER_SLACK or max(at for at, _ in inside) < now - COVER_SLACK:
            continue  # not sampled for the whole window yet, or not lately (its host stopped answering)
        peak = max(u for _, u in inside)
        if peak < min_utilization:
            return Idle(key, peak, len(inside))
    return None


def reason(idle: Idle, min_utilization: float, window: float) -> str:
    host, index = idle.gpu
    return (f"its utilization_policy: GPU {index} on {host} stayed below {min_utilization:g}% for "
            f"{format_duration(int(window))} (at most {idle.peak:g}% in {idle.samples} samples)")


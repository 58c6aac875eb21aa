"""GPU-hours used, decayed and not: what the scheduler's fair share orders by, and what `gpufleet
usage` shows. Pure: no I/O, no clock (``now`` is given).

A record is ``(project, user, gpus, started_at, ended_at)``, times in seconds, ``ended_at`` None
for a run still running (it counts up to ``now``; an end after ``now`` is cut at ``now``).

Decay is exponential, as Slurm's fair-share usage: a GPU-second used at time t weighs
``0.5 ** ((now - t) / half_life_s)``. Each interval is integrated exactly:

    gpus * h / ln 2 * (0.5 ** ((now - end) / h) - 0.5 ** ((now - start) / h)) / 3600   GPU-hours

so a run of g GPUs that ran for the last d seconds counts g * d / 3600 when d is much shorter than
the half-life h, and g * h / ln 2 / 3600 at most however long it ran.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

HALF_LIFE_DEFAULT = 7 * 86400.0  # seconds

Record = tuple[str, str, int, float, "float | None"]  # (project, user, gpus, started_at, ended_at or None)


@dataclass(frozen=True)
class Usage:
    """Decayed GPU-hours per project and per (project, user): what ``scheduler.decide`` takes for
    fair share (a missing key counts as 0)."""

    projects: Mapping[str, float] = field(default_factory=dict)
    users: Mapping[tuple[str, str], float] = field(default_factory=dict)


def decayed_usage(records: Iterable[Record], now: float, half_life_s: float = HALF_LIFE_DEFAULT) -> Usage:
    """Decayed GPU-hours per project and per (project, user) at ``now`` (closed form per interval)."""
    if not half_life_s > 0:
        raise ValueError("half_life_s must be positive")
    k = half_life_s / math.log(2) / 3600.0
    users: dict[tuple[str, str], float] = {}
    for project, user, gpus, start, end in records:
        end = now if end is None or end > now else end
        if end <= start:
            continue
        w = gpus * k * (0.5 ** ((now - end) / half_life_s) - 0.5 ** ((now - start) / half_life_s))
        users[project, user] = users.get((project, user), 0.0) + w
    return _usage(users)


def gpu_hours(records: Iterable[Record], since: float, now: float) -> dict[tuple[str, str], float]:
    """Undecayed GPU-hours per (project, user) used within [since, now] (intervals clipped to it)."""
    out: dict[tuple[str, str], float] = {}
    for project, user, gpus, start, end in records:
        lo = max(start, since)
        hi = now if end is None or end > now else end
        if hi > lo:
            out[project, user] = out.get((project, user), 0.0) + gpus * (hi - lo) / 3600.0
    return out


def _usage(users: Mapping[tuple[str, str], float]) -> Usage:
    projects: dict[str, float] = {}
    for (project, _user), v in users.items():
        projects[project] = projects.get(project, 0.0) + v
    return Usage(projects, dict(users))


class UsageMeter:
    """``decayed_usage`` kept up to date as runs start and end, for a caller that asks at many
    moments (the trace simulator): each reading costs one pass over the (project, user) pairs,
    not over the history. Times must not go backwards between readings.

    Per pair it keeps, at a reference time r: F, the decayed GPU-hours of ended runs at r; G, the
    GPUs running; S, the sum over running runs of gpus * 0.5 ** ((r - start) / h). At now, with
    d = 0.5 ** ((now - r) / h), the pair's usage is k * (F' + G - d * S) with F = k * F', the
    closed form of ``decayed_usage`` summed. Each reading moves r to now."""

    def __init__(self, half_life_s: float = HALF_LIFE_DEFAULT, origin: float = 0.0):
        if not half_life_s > 0:
            raise ValueError("half_life_s must be positive")
        self.h, self.r = half_life_s, origin
        self.k = half_life_s / math.log(2) / 3600.0
        self.pairs: dict[tuple[str, str], list[float]] = {}  # -> [F', G, S]

    def _pair(self, project: str, user: str) -> list[float]:
        p = self.pairs.get((project, user))
        if p is None:
            p = self.pairs[project, user] = [0.0, 0.0, 0.0]
        return p

    def start(self, project: str, user: str, gpus: int, at: float) -> None:
        p = self._pair(project, user)
        p[1] += gpus
        p[2] += gpus * 0.5 ** ((self.r - at) / self.h)

    def end(self, project: str, user: str, gpus: int, started_at: float, at: float) -> None:
        """A run begun with ``start(project, user, gpus, started_at)`` ended at ``at``."""
        p = self._pair(project, user)
        w_start = 0.5 ** ((self.r - started_at) / self.h)
        w_end = 0.5 ** ((self.r - at) / self.h)
        p[1] -= gpus
        p[2] -= gpus * w_start
        p[0] += gpus * (w_end - w_start)

    def usage(self, now: float) -> Usage:
        d = 0.5 ** ((now - self.r) / self.h)
        users: dict[tuple[str, str], float] = {}
        for key, p in self.pairs.items():
            p[0] *= d
            p[2] *= d
            users[key] = self.k * (p[0] + p[1] - p[2])
        self.r = now
        return _usage(users)

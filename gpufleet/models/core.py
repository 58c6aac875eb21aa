"""The base of every gpufleet model, the status enums, and ranges."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class CoreModel(BaseModel):
    """Every gpufleet model: unknown fields are refused, never silently dropped."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class InstanceStatus(StrEnum):
    """A fleet host as the last probe left it."""

    READY = "ready"
    UNREACHABLE = "unreachable"
    ERROR = "error"


class RunStatus(StrEnum):
    """A run's life: pending (queued, holds nothing) -> starting -> running (holding blocks) ->
    [stopping ->] done | failed | stopped."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"  # being stopped (by a user or a limit); its blocks are held until it is
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def active(self) -> bool:
        """Holding blocks (its containers are starting or running)."""
        return self in ACTIVE_RUN_STATUSES

    @property
    def live(self) -> bool:
        """Not over: waiting in the queue, or active."""
        return self in LIVE_RUN_STATUSES


ACTIVE_RUN_STATUSES = (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.STOPPING)
LIVE_RUN_STATUSES = (RunStatus.PENDING, *ACTIVE_RUN_STATUSES)


class ServerRole(StrEnum):
    """A user's role on the server: an `admin` manages users, projects and every run and fleet."""

    ADMIN = "admin"
    USER = "user"


class ProjectRole(StrEnum):
    """A member's role in a project: an `admin` manages its fleets, members and per-user quotas."""

    ADMIN = "admin"
    MEMBER = "member"


SYSTEM_ACTOR = "gpufleet"  # the actor of what the server does by itself (a limit, the scheduler)


class HostStatus(StrEnum):
    """One host's progress through a playbook run, and how it ended (for a probe too)."""

    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"

    @property
    def bad(self) -> bool:
        return self in (HostStatus.FAILED, HostStatus.UNREACHABLE)


@dataclass(frozen=True)
class Range:
    """A count or size range as dstack writes it: `4`, `2..4`, `24GB..`."""

    min: float | None = None
    max: float | None = None

    def __str__(self) -> str:
        def f(v):
            return "" if v is None else (str(int(v)) if float(v).is_integer() else str(v))
        return f(self.min) if self.min == self.max else f"{f(self.min)}..{f(self.max)}"

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

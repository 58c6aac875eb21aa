"""What the state store keeps and returns: instances (probed hosts), fleets, runs."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from pydantic import Field

from gpufleet.models.core import CoreModel, InstanceStatus, ProjectRole, RunStatus, ServerRole
from gpufleet.models.facts import GPU, UNKNOWN_RUNTIME, HostFacts
from gpufleet.models.run import RunType

DEFAULT_PROJECT = "default"  # the project every server starts with (and of everything from before projects)


class Instance(CoreModel):
    """A fleet host as gpufleet last found it."""

    fleet: str
    num: int
    alias: str
    hostname: str
    port: int
    status: InstanceStatus
    reason: str = ""
    resources: str = ""
    facts: HostFacts | None = None  # None until a probe of the host succeeded
    created_at: float
    updated_at: float
    blocks_total: int = 0
    blocks_busy: int = 0
    withheld: list[str] = Field(default_factory=list)  # GPUs kept from new runs, each with why (Store.withhold)

    @property
    def status_text(self) -> str:
        if self.status != InstanceStatus.READY:
            return f"{self.status}: {self.reason}" if self.reason else str(self.status)
        text = ("busy" if self.blocks_busy else "idle") if self.blocks_total <= 1 else \
            f"{self.blocks_busy}/{self.blocks_total} busy"
        return "; ".join([text, *self.withheld])


class FleetState(CoreModel):
    name: str
    source: str
    created_at: float
    project: str = DEFAULT_PROJECT
    instances: list[Instance] = Field(default_factory=list)

    def facts(self) -> dict[str, HostFacts]:
        """alias -> facts, for the hosts that were probed."""
        return {i.alias: i.facts for i in self.instances if i.facts}

    def runtime_argv(self, alias: str) -> list[str]:
        """The container runtime's command on ``alias``, as its probe found it (the workload role's
        default, podman through sudo, for a host never probed)."""
        facts = self.facts().get(alias)
        return facts.runtime_argv() if facts else UNKNOWN_RUNTIME.argv()


class Event(CoreModel):
    """One transition, as `gpufleet events` shows it: a run submitted, queued, started, ended;
    a host unreachable or back."""

    id: int
    ts: float
    kind: str
    message: str
    run: str | None = None
    fleet: str | None = None
    host: str | None = None
    project: str | None = None
    actor: str | None = None  # who did it: a user's name, or SYSTEM_ACTOR for the server's own doing


class RunNode(CoreModel):
    """Where one node (rank) of a run runs."""

    rank: int
    alias: str
    instance_id: int
    instance_num: int | None = None
    blocks: list[int]
    gpus: list[GPU]


class ServiceView(CoreModel):
    """A service's endpoint as the server answering says (set by the server in its answers, never stored)."""

    url: str = Field(description="Where the server serves it: http://SERVER/proxy/services/PROJECT/RUN/.")
    ready: bool = Field(description="Whether a replica is ready (gets traffic).")
    replicas_ready: int = Field(description="Replicas ready.")
    replicas: int = Field(description="Replicas wanted.")
    model: str | None = Field(None, description="A model service: its `model`'s name (the `model` of the OpenAI "
                                                "requests routed to it).")
    model_url: str | None = Field(None, description="A model service: the OpenAI base URL of its project's models, "
                                                    "http://SERVER/proxy/models/PROJECT/.")


class Run(CoreModel):
    """A submitted run, as the state store keeps it."""

    name: str
    run_id: str  # unique per submission; labels the container
    type: RunType
    fleet: str | None
    instance_id: int | None
    alias: str | None
    status: RunStatus
    message: str = ""
    exit_code: int | None = None
    gpus: list[GPU] = Field(default_factory=list)
    blocks: list[int] = Field(default_factory=list)
    spec: dict[str, Any]  # the run configuration as submitted (JSON)
    container: str
    nodes: list[RunNode] = Field(default_factory=list)
    created_at: float
    updated_at: float
    instance_num: int | None = None
    owner: str = ""  # host:pid of the gpufleet that allocated it
    priority: int = 50
    max_duration: float | None = None  # seconds; None: no limit
    started_at: float | None = None  # when its blocks were taken (None while pending)
    position: int | None = None  # pending runs: 1-based place in the queue's order (set by the server)
    project: str = DEFAULT_PROJECT
    user: str = ""  # who submitted it
    next_at: float | None = None  # a scheduled run: its next start (pending) or its last (active); else None
    service: ServiceView | None = None  # a live service: its URL and readiness (set by the server's answers)
    replica_of: str | None = None  # a replica of a service: the service's run (gpufleet.replicas)
    replicas: int | None = None  # a service: how many replicas it wants now (its replicas are runs of their own)
    replica_group: str | None = None  # a replica of a service with replica groups: its group's name
    group_replicas: dict[str, int] | None = None  # a service with replica groups: how many each group wants now

    @property
    def is_service(self) -> bool:
        """A service's own run: it holds no blocks; its replicas (runs naming it in `replica_of`) do."""
        return self.replicas is not None

    @property
    def active(self) -> bool:
        return self.status.active

    @property
    def live(self) -> bool:
        return self.status.live

    @property
    def aliases(self) -> list[str]:
        """The hosts of its nodes, rank 0 first."""
        return [n.alias for n in self.nodes] if self.nodes else ([self.alias] if self.alias else [])

    def start_in_progress(self, lease: float) -> bool:
        """Whether the process that is starting (or stopping) this run may still be at it: alive on
        this machine, or (elsewhere) within the lease."""
        if self.status not in (RunStatus.STARTING, RunStatus.STOPPING):
            return False
        host, _, pid = self.owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return time.time() - self.updated_at < lease


class Member(CoreModel):
    user: str
    role: ProjectRole


class Project(CoreModel):
    name: str
    created_at: float
    members: list[Member] = Field(default_factory=list)

    def role_of(self, user: str) -> ProjectRole | None:
        return next((m.role for m in self.members if m.user == user), None)


class User(CoreModel):
    """A user of the server (its token is never here: the store keeps only its hash)."""

    name: str
    role: ServerRole
    created_at: float
    projects: dict[str, ProjectRole] = Field(default_factory=dict)  # project -> role in it


class Quota(CoreModel):
    """At most ``gpus`` GPUs running at once in ``project`` (of ``user`` when set; of GPU model
    ``gpu`` when set)."""

    project: str
    user: str | None = None
    gpu: str | None = None
    gpus: int = Field(ge=0)
    used: int | None = None  # GPUs in use now that count against it (filled in by the server)


class UsageRecord(CoreModel):
    """A stretch of GPU time: ``gpus`` GPUs of ``project``/``user`` from ``started_at`` to
    ``ended_at`` (None: still running)."""

    run: str
    project: str
    user: str
    gpus: int
    gpu: str = ""  # the model of its GPUs
    started_at: float
    ended_at: float | None = None

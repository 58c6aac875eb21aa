"""The state store: fleets, instances and blocks, in SQLite (default) through SQLAlchemy Core.

Written against SQLAlchemy Core only, so the same code runs on PostgreSQL
(``GPUFLEET_DATABASE_URL``). Every change is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import TypeAdapter
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from gpufleet import migrations, paths
from gpufleet.allocator import BlockSlot, HostIndex, HostSlots, HostTraits, Placement
from gpufleet.blocks import Block
from gpufleet.errors import GpufleetError, NotFound
from gpufleet.models import (
    ACTIVE_RUN_STATUSES,
    DEFAULT_PROJECT,
    GPU,
    LIVE_RUN_STATUSES,
    SYSTEM_ACTOR,
    Event,
    FleetState,
    HostFacts,
    Instance,
    InstanceStatus,
    Member,
    Project,
    ProjectRole,
    Quota,
    Run,
    RunStatus,
    ServerRole,
    UsageRecord,
    User,
)
from gpufleet.models.cron import utc_text
from gpufleet.models.run import ScheduleSpec

metadata = MetaData()

fleets = Table(
    "fleets", metadata,
    Column("name", String(64), primary_key=True),
    Column("source", Text, nullable=False),
    Column("config", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("project", String(64), nullable=False, default=DEFAULT_PROJECT),
)

instances = Table(
    "instances", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(64), ForeignKey("fleets.name", ondelete="CASCADE"), nullable=False),
    Column("num", Integer, nullable=False),
    Column("alias", String(300), nullable=False),
    Column("hostname", String(300), nullable=False),
    Column("port", Integer, nullable=False),
    Column("status", String(32), nullable=False),  # ready | unreachable | error
    Column("reason", Text, nullable=False, default=""),
    Column("resources", Text, nullable=False, default=""),
    Column("probe", Text, nullable=False, default="{}"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("fleet", "alias"),
    UniqueConstraint("fleet", "num"),
)

blocks = Table(
    "blocks", metadata,
    Column("instance_id", Integer, ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("gpus", Text, nullable=False),  # JSON list of positions in the instance's probed GPU list
    Column("cpus", Integer, nullable=False),
    Column("memory_mib", Integer, nullable=False),
    Column("numa_node", Integer, nullable=True),
    Column("run", String(128), nullable=True),  # the run holding the block; NULL when free
)

# Requests each server process carried to each service's endpoint, in RATE_BUCKET-second buckets: the
# leader's autoscaling sums them over all processes (gpufleet.replicas); older than RATE_KEEP, pruned.
service_requests = Table(
    "service_requests", metadata,
    Column("service", String(64), primary_key=True),
    Column("holder", String(300), primary_key=True),  # host:pid of the server process
    Column("bucket", Integer, primary_key=True),  # unix time // RATE_BUCKET
    Column("count", Integer, nullable=False),
)
RATE_BUCKET = 5  # seconds
RATE_KEEP = 600  # seconds of request counts kept (dstack's longest window is 300 s)

# GPUs kept from new runs: a process outside gpufleet holds one (someone ran a job on the host by hand),
# or it reports a hardware fault. Written by the metrics loop from each sample (Store.withhold); a
# block with such a GPU is busy to the allocator until the row goes.
withheld_gpus = Table(
    "withheld_gpus", metadata,
    Column("instance_id", Integer, ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    Column("vendor", String(16), primary_key=True),
    Column("gpu", Integer, primary_key=True),  # the vendor tool's index (GPU.index)
    Column("kind", String(16), nullable=False),  # outside | unhealthy
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("name", String(64), primary_key=True),
    Column("run_id", String(64), nullable=False),  # unique per submission; labels the container
    Column("type", String(32), nullable=False),
    Column("fleet", String(64), nullable=True),
    Column("instance_id", Integer, nullable=True),
    Column("alias", String(300), nullable=True),
    Column("status", String(32), nullable=False),  # starting | running | done | failed | stopped
    Column("message", Text, nullable=False, default=""),
    Column("exit_code", Integer, nullable=True),
    Column("gpus", Text, nullable=False, default="[]"),  # the host's GPU dicts given to the run
    Column("blocks", Text, nullable=False, default="[]"),
    Column("spec", Text, nullable=False),
    Column("container", String(128), nullable=False),
    Column("nodes", Text, nullable=False, default="[]"),  # per node: rank, alias, instance_id, blocks, gpus
    Column("owner", String(300), nullable=False, default=""),  # host:pid of the process starting it
    Column("created_at", Float, nullable=False),  # submission time: the queue's order after priority
    Column("updated_at", Float, nullable=False),
    Column("priority", Integer, nullable=False, default=50),
    Column("max_duration", Float, nullable=True),  # seconds; NULL: no limit
    Column("retry", Text, nullable=False, default="{}"),  # the normalized retry policy (JSON)
    Column("started_at", Float, nullable=True),  # when its blocks were taken
    Column("project", String(64), nullable=False, default=DEFAULT_PROJECT),
    Column("user", String(64), nullable=False, default=""),  # who submitted it
    # a scheduled run (`schedule`): when it starts next (pending), or started last (active); NULL: not
    # scheduled, or stopped by a user (no more starts)
    Column("next_at", Float, nullable=True),
    # a service's replicas are runs of their own (placed, started, stopped as any run): a replica names
    # its service (`replica_of`); the service's own row holds no blocks and says how many replicas it wants
    Column("replica_of", String(64), nullable=True),
    Column("replicas", Integer, nullable=True),
    # replica groups: on a replica, its group's name (None: its service has no groups); on a service with
    # groups, the replicas each group wants now (JSON {group: n}; `replicas` is their sum)
    Column("replica_group", String(64), nullable=True),
    Column("group_replicas", Text, nullable=True),
    Index("ix_runs_status", "status"),
)

# Every transition: a run submitted, queued, started, ended; a host unreachable or back. Not tied to
# the runs table (a run's row is replaced when its name is used again; its history stays).
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("run", String(64), nullable=True),
    Column("fleet", String(64), nullable=True),
    Column("host", String(300), nullable=True),
    Column("message", Text, nullable=False),
    Column("project", String(64), nullable=True),
    Column("actor", String(64), nullable=True),  # a user's name, or SYSTEM_ACTOR
    Index("ix_events_run", "run", "id"),
    sqlite_autoincrement=True,  # an id is never reused: `events -f` reads "after id N"
)

# Secrets (env names without a value) of a waiting run, or of a fleet, sealed with the server's key
# (gpufleet.server.vault); a run's row goes when it starts or ends.
secrets = Table(
    "secrets", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run", String(64), ForeignKey("runs.name", ondelete="CASCADE"), nullable=True, unique=True),
    Column("fleet", String(64), ForeignKey("fleets.name", ondelete="CASCADE"), nullable=True, unique=True),
    Column("sealed", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# The scheduler's reservation for the head of the queue (what `ps` shows as its expected start).
reservations = Table(
    "reservations", metadata,
    Column("run", String(64), ForeignKey("runs.name", ondelete="CASCADE"), primary_key=True),
    Column("at", Float, nullable=True),  # NULL: not predictable (waits on runs without a limit)
    Column("blocks", Text, nullable=False),  # JSON [[instance_id, block idx], ...]
    Column("updated_at", Float, nullable=False),
)

# Which server replica runs the loops (the lock itself is PostgreSQL's advisory lock, or a file lock
# beside a SQLite file); this row says who holds it, for `gpufleet server status`.
server_leases = Table(
    "server_leases", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(300), nullable=False),
    Column("url", String(300), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
)

# Users of the server: a role, and the SHA-256 of their API token (the token itself is never kept).
users = Table(
    "users", metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),  # admin | user
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),  # last made or rotated token
)

projects = Table(
    "projects", metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

members = Table(
    "members", metadata,
    Column("project", String(64), ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True),
    Column("user", String(64), ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
    Column("role", String(16), nullable=False),  # admin | member
)

# GPUs running at once: of a project (user ''), of a user in it; of one GPU model (gpu '': any)
quotas = Table(
    "quotas", metadata,
    Column("project", String(64), ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True),
    Column("user", String(64), primary_key=True),
    Column("gpu", String(64), primary_key=True),
    Column("gpus", Integer, nullable=False),
)

# GPU time used, a row per run segment that held GPUs (written when it ends): usage and fair share.
usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run", String(64), nullable=False),
    Column("project", String(64), nullable=False),
    Column("user", String(64), nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("gpu", String(64), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Index("ix_usage_ended", "ended_at"),
)

# One row per transaction and instance whose blocks or status changed (allocation, release,
# probe, removal): a Store that has seen up to seq N re-reads only the instances changed after N.
# Old rows are pruned; a Store that fell behind the oldest row reads everything again.
changes = Table(
    "changes", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("instance_id", Integer, nullable=False),
    sqlite_autoincrement=True,  # never reuse a seq
)
# Metrics (gpufleet.metrics.store): GPU samples, raw (res 0, kept metrics_raw_retention) and folded
# into 1-minute means (res 60, kept metrics_retention); each row names the run that held the GPU
# when it was taken, so a run's series outlives it. Per-run container CPU and memory likewise. The
# latest sample of each host, whole, for the live views (/api/gpus, /metrics, the scheduler).
gpu_samples = Table(
    "gpu_samples", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("res", Integer, nullable=False),  # 0: raw; 60: the mean of a minute (at: its start)
    Column("at", Float, nullable=False),
    Column("fleet", String(64), nullable=False),
    Column("host", String(300), nullable=False),
    Column("idx", Integer, nullable=False),  # the vendor tool's GPU index
    Column("uuid", String(128), nullable=True),
    Column("utilization", Float, nullable=True),
    Column("memory_used_mib", Integer, nullable=True),
    Column("memory_total_mib", Integer, nullable=True),
    Column("temperature_c", Float, nullable=True),
    Column("power_w", Float, nullable=True),
    Column("run", String(64), nullable=True),
    Index("ix_gpu_samples_run", "run", "res", "at"),
    Index("ix_gpu_samples_res_at", "res", "at"),
)

container_samples = Table(
    "container_samples", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("res", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("fleet", String(64), nullable=False),
    Column("host", String(300), nullable=False),
    Column("run", String(64), nullable=False),
    Column("cpu_percent", Float, nullable=True),
    Column("memory_bytes", BigInteger, nullable=True),
    Column("memory_limit_bytes", BigInteger, nullable=True),
    Index("ix_container_samples_run", "run", "res", "at"),
    Index("ix_container_samples_res_at", "res", "at"),
)

latest_samples = Table(
    "latest_samples", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("host", String(300), primary_key=True),
    Column("at", Float, nullable=False),
    Column("sample", Text, nullable=False),  # the HostSample, JSON
)

KEEP_CHANGES = 100_000
PRUNE_EVERY = 1000  # the old rows are dropped by whichever writer's seqs cross a multiple of this
ALLOCATION_LOCK = 7405324  # PostgreSQL advisory lock: one writer of blocks at a time

# built once: an allocation is a handful of statements and building them each time was a third of its cost
_TAKE_BLOCKS = (update(blocks)
                .where(blocks.c.instance_id == bindparam("iid"), blocks.c.idx.in_(bindparam("idxs", expanding=True)),
                       blocks.c.run.is_(None))
                .values(run=bindparam("run_name")))
_RUN_STATUS = select(runs.c.status).where(runs.c.name == bindparam("name"))
_CHANGES_RANGE = select(func.min(changes.c.seq), func.max(changes.c.seq))

ACTIVE = tuple(str(s) for s in ACTIVE_RUN_STATUSES)
LIVE = tuple(str(s) for s in LIVE_RUN_STATUSES)
PENDING = str(RunStatus.PENDING)
KEEP_EVENTS = 100_000  # events beyond this many are pruned, oldest first
_GPUS = TypeAdapter(list[GPU])


def _instance(r, blocks_total: int = 0, blocks_busy: int = 0, withheld: list[str] | None = None) -> Instance:
    facts = json.loads(r.probe)
    return Instance(fleet=r.fleet, num=r.num, alias=r.alias, hostname=r.hostname, port=r.port, status=r.status,
                    reason=r.reason, resources=r.resources, facts=HostFacts.model_validate(facts) if facts else None,
                    created_at=r.created_at, updated_at=r.updated_at, blocks_total=blocks_total,
                    blocks_busy=blocks_busy, withheld=withheld or [])


def kept_words(kind: str) -> str:
    """How a withheld GPU's kind reads: `used outside gpufleet` or `unhealthy`."""
    return "used outside gpufleet" if kind == "outside" else "unhealthy"


def _withheld_row(iid: int, key: tuple[str, int]) -> tuple:
    return (withheld_gpus.c.instance_id == iid, withheld_gpus.c.vendor == key[0], withheld_gpus.c.gpu == key[1])


def _run(r) -> Run:
    return Run(name=r.name, run_id=r.run_id, type=r.type, fleet=r.fleet, instance_id=r.instance_id, alias=r.alias,
               status=r.status, message=r.message, exit_code=r.exit_code, gpus=json.loads(r.gpus),
               blocks=json.loads(r.blocks), spec=json.loads(r.spec), container=r.container,
               nodes=json.loads(r.nodes), created_at=r.created_at, updated_at=r.updated_at, instance_num=r.num,
               owner=r.owner, priority=r.priority, max_duration=r.max_duration, started_at=r.started_at,
               project=r.project, user=r.user, next_at=r.next_at, replica_of=r.replica_of, replicas=r.replicas,
               replica_group=r.replica_group,
               group_replicas=json.loads(r.group_replicas) if r.group_replicas else None)


def _event(r) -> Event:
    return Event(id=r.id, ts=r.ts, kind=r.kind, run=r.run, fleet=r.fleet, host=r.host, message=r.message,
                 project=r.project, actor=r.actor)


def _where(placements: list[Placement]) -> str:
    return ", ".join(f"{p.host.fleet} instance {p.host.num} ({p.host.alias}) blocks "
                     f"{','.join(map(str, p.blocks))}" for p in placements)


def existing_store() -> Store | None:
    """The state store, if gpufleet has one here (a database URL is set, or the state file exists);
    None rather than make one for a command that only reads."""
    if os.environ.get("GPUFLEET_DATABASE_URL") or (paths.home() / "state.db").exists():
        return Store()
    return None


def applied_facts(fleet: str) -> dict[str, HostFacts]:
    """alias -> facts of a fleet as `gpufleet apply` recorded them here; {} when it never was."""
    store = existing_store()
    state = store.fleet(fleet) if store else None
    return state.facts() if state else {}


def database_url() -> str:
    """GPUFLEET_DATABASE_URL (postgresql://user:password@host/db shares a fleet's accounting between
    operators and CI runners), else a SQLite file in the state directory."""
    url = os.environ.get("GPUFLEET_DATABASE_URL")
    if url:
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
    return f"sqlite:///{paths.home() / 'state.db'}"


class Store:
    def __init__(self, url: str | None = None):
        self.url = url or database_url()
        self._slot_cache: dict[int, tuple] = {}  # instance id -> (updated_at, gpus, shape, block slots)
        self._index: HostIndex | None = None  # ready hosts as the allocator sees them ...
        self._seen = 0  # ... as of this seq of `changes`
        if self.url.startswith("sqlite:///"):
            db = Path(self.url.removeprefix("sqlite:///"))
            if not db.exists():
                db.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            self.engine: Engine = create_engine(self.url, future=True, pool_pre_ping=True)
        except (ImportError, ArgumentError) as e:
            raise GpufleetError(f"cannot use database {self.safe_url}: {e}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # every transaction that may write takes the write lock at once: two processes
            # allocating at the same moment are serialised instead of both reading the same free
            # blocks; reads (self._reads) take none and never wait for a writer (WAL)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._reads = self.engine.execution_options(gpufleet_read=True)
        try:
            migrations.upgrade(self.engine, metadata)
        except OperationalError as e:
            raise GpufleetError(f"cannot open the state database {self.safe_url}: {e.orig}") from None

    @property
    def identity(self) -> str:
        """Which state this is (a digest of its database URL): the label `gpufleet.state` of the
        containers it starts, so that the sweep of one state never stops another's containers on a
        host both use (two state directories on one lab, a test beside a user)."""
        return hashlib.sha256(self.safe_url.encode()).hexdigest()[:16]

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.url)

    # fleets -----------------------------------------------------------------------------------
    def save_fleet(self, name: str, source: str, config: dict, project: str = DEFAULT_PROJECT) -> None:
        """Record a fleet's config, in ``project``; a fleet of another project is not taken over."""
        now = time.time()
        with self.engine.begin() as c:
            row = c.execute(select(fleets.c.name, fleets.c.project).where(fleets.c.name == name)).first()
            if row and row.project != project:
                raise GpufleetError(f"a fleet named {name} belongs to project {row.project}: choose another name")
            if row:
                c.execute(update(fleets).where(fleets.c.name == name).values(
                    source=source, config=json.dumps(config), updated_at=now))
            else:
                c.execute(insert(fleets).values(name=name, source=source, config=json.dumps(config),
                                                created_at=now, updated_at=now, project=project))

    def fleet_projects(self) -> dict[str, str]:
        """fleet -> its project."""
        with self._reads.connect() as c:
            return {r.name: r.project for r in c.execute(select(fleets.c.name, fleets.c.project))}

    def fleet(self, name: str) -> FleetState | None:
        views = self.fleets(name)
        return views[0] if views else None

    def fleets(self, name: str | None = None, projects: set[str] | None = None) -> list[FleetState]:
        """The fleets (of ``projects`` when given), with their instances."""
        with self._reads.connect() as c:
            q = select(fleets).order_by(fleets.c.name)
            if name is not None:
                q = q.where(fleets.c.name == name)
            if projects is not None:
                q = q.where(fleets.c.project.in_(sorted(projects)))
            out = {r.name: FleetState(name=r.name, source=r.source, created_at=r.created_at, project=r.project)
                   for r in c.execute(q)}
            q = select(instances).order_by(instances.c.fleet, instances.c.num)
            if name is not None:
                q = q.where(instances.c.fleet == name)
            counts = self._block_counts(c)
            held: dict[int, list[str]] = {}
            for w in c.execute(select(withheld_gpus).order_by(withheld_gpus.c.vendor, withheld_gpus.c.gpu)):
                held.setdefault(w.instance_id, []).append(f"GPU {w.gpu} {kept_words(w.kind)}: {w.reason}")
            for r in c.execute(q):
                if r.fleet in out:
                    total, busy = counts.get(r.id, (0, 0))
                    out[r.fleet].instances.append(_instance(r, total, busy, held.get(r.id, [])))
        return list(out.values())

    @staticmethod
    def _block_counts(c) -> dict[int, tuple[int, int]]:
        counts: dict[int, list[int]] = {}
        for r in c.execute(select(blocks.c.instance_id, blocks.c.run)):
            entry = counts.setdefault(r.instance_id, [0, 0])
            entry[0] += 1
            entry[1] += r.run is not None
        return {k: (v[0], v[1]) for k, v in counts.items()}

    def delete_fleet(self, name: str) -> None:
        with self.engine.begin() as c:
            self._serialize(c)
            busy = self._busy_aliases(c, name)
            if busy:
                raise GpufleetError(f"fleet {name} has workloads running on {', '.join(busy)}: stop them first")
            ids = [r.id for r in c.execute(select(instances.c.id).where(instances.c.fleet == name))]
            if ids:
                c.execute(delete(blocks).where(blocks.c.instance_id.in_(ids)))
                self._changed(c, ids)
            c.execute(delete(instances).where(instances.c.fleet == name))
            c.execute(delete(fleets).where(fleets.c.name == name))

    @staticmethod
    def _busy_aliases(c, fleet: str, alias: str | None = None) -> list[str]:
        q = (select(instances.c.alias).distinct().join(blocks, blocks.c.instance_id == instances.c.id)
             .where(instances.c.fleet == fleet, blocks.c.run.is_not(None)))
        if alias is not None:
            q = q.where(instances.c.alias == alias)
        return [r.alias for r in c.execute(q)]

    # instances --------------------------------------------------------------------------------
    def record_instance(self, fleet: str, alias: str, hostname: str, port: int, status: InstanceStatus,
                        reason: str = "", resources: str = "", facts: HostFacts | None = None,
                        block_layout: list[Block] | None = None) -> int:
        """Insert or update one instance after a probe. ``block_layout`` replaces the blocks when
        the instance is ready and none of its blocks is in use."""
        now = time.time()
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(select(instances).where(instances.c.fleet == fleet, instances.c.alias == alias)).first()
            values = dict(hostname=hostname, port=port, status=str(status), reason=reason, updated_at=now)
            if facts is not None:
                values.update(probe=facts.model_dump_json(), resources=resources)
            if row is None:
                used = {r.num for r in c.execute(select(instances.c.num).where(instances.c.fleet == fleet))}
                num = next(i for i in range(len(used) + 1) if i not in used)
                iid = c.execute(insert(instances).values(fleet=fleet, alias=alias, num=num, created_at=now,
                                                         probe=values.pop("probe", "{}"),
                                                         resources=values.pop("resources", ""), **values)
                                ).inserted_primary_key[0]
            else:
                iid = row.id
                c.execute(update(instances).where(instances.c.id == iid).values(**values))
            if block_layout is not None and not self._busy_aliases(c, fleet, alias):
                c.execute(delete(blocks).where(blocks.c.instance_id == iid))
                if block_layout:
                    c.execute(insert(blocks), [dict(instance_id=iid, idx=b.index, gpus=json.dumps(list(b.gpus)),
                                                    cpus=b.cpus, memory_mib=b.memory_mib, numa_node=b.numa_node,
                                                    run=None) for b in block_layout])
            elif status != InstanceStatus.READY and not self._busy_aliases(c, fleet, alias):
                c.execute(delete(blocks).where(blocks.c.instance_id == iid))
            self._changed(c, [iid])
            return iid

    def withhold(self, fleet: str, alias: str, found: dict[tuple[str, int], tuple[str, str]]) -> list[str]:
        """Set which GPUs of host ``alias`` are kept from new runs: ``found`` maps (vendor, index) to
        (kind, reason), kind `outside` (a process no gpufleet run owns holds it) or `unhealthy` (a
        hardware fault), as the latest sample of the host says. GPUs no longer in ``found`` are
        released. Changes are events (`gpu-withheld`, `gpu-released`); returns their messages."""
        now = time.time()
        messages: list[str] = []

        def current(c) -> tuple[int | None, dict]:
            iid = c.execute(select(instances.c.id).where(instances.c.fleet == fleet,
                                                         instances.c.alias == alias)).scalar()
            return iid, {(r.vendor, r.gpu): r for r in c.execute(select(withheld_gpus)
                                                                 .where(withheld_gpus.c.instance_id == iid))}

        with self._reads.connect() as c:  # the usual case, nothing changed, takes no write lock
            iid, had = current(c)
        if iid is None or {k: (r.kind, r.reason) for k, r in had.items()} == found:
            return messages
        with self.engine.begin() as c:
            self._serialize(c)
            iid, had = current(c)
            if iid is None:
                return messages
            for key, (kind, reason) in sorted(found.items()):
                old = had.get(key)
                if old is not None and (old.kind, old.reason) == (kind, reason):
                    continue
                if old is None:
                    c.execute(insert(withheld_gpus).values(instance_id=iid, vendor=key[0], gpu=key[1], kind=kind,
                                                           reason=reason, since=now))
                else:
                    c.execute(update(withheld_gpus).where(*_withheld_row(iid, key)).values(kind=kind, reason=reason))
                if old is None or old.kind != kind:
                    messages.append(f"GPU {key[1]} on {alias} is {kept_words(kind)}: {reason}; no new run is placed "
                                    f"on it until it is {'free' if kind == 'outside' else 'healthy'} again")
                    self._event(c, "gpu-withheld", messages[-1], fleet=fleet, host=alias)
            for key, old in sorted(had.items()):
                if key not in found:
                    c.execute(delete(withheld_gpus).where(*_withheld_row(iid, key)))
                    what = "free" if old.kind == "outside" else "healthy"
                    messages.append(f"GPU {key[1]} on {alias} is {what} again")
                    self._event(c, "gpu-released", messages[-1], fleet=fleet, host=alias)
            if set(had) != set(found):
                self._changed(c, [iid])
        return messages

    def withheld(self) -> dict[tuple[str, str], dict[tuple[str, int], tuple[str, str, float]]]:
        """Every withheld GPU: (fleet, alias) -> (vendor, index) -> (kind, reason, since)."""
        out: dict[tuple[str, str], dict[tuple[str, int], tuple[str, str, float]]] = {}
        with self._reads.connect() as c:
            q = select(instances.c.fleet, instances.c.alias, withheld_gpus).join(
                withheld_gpus, withheld_gpus.c.instance_id == instances.c.id)
            for r in c.execute(q):
                out.setdefault((r.fleet, r.alias), {})[(r.vendor, r.gpu)] = (r.kind, r.reason, r.since)
        return out

    def remove_instance(self, fleet: str, alias: str) -> None:
        with self.engine.begin() as c:
            self._serialize(c)
            if self._busy_aliases(c, fleet, alias):
                raise GpufleetError(f"{alias} runs workloads: stop them before removing it from fleet {fleet}")
            row = c.execute(select(instances.c.id).where(instances.c.fleet == fleet,
                                                         instances.c.alias == alias)).first()
            if row:
                self._changed(c, [row.id])
                c.execute(delete(blocks).where(blocks.c.instance_id == row.id))
                c.execute(delete(instances).where(instances.c.id == row.id))

    # runs -------------------------------------------------------------------------------------
    def _serialize(self, c) -> None:
        """On PostgreSQL, writers of blocks and instances go one at a time (an advisory lock held
        to the end of the transaction), so allocations never race and `changes` rows commit in seq
        order. SQLite's BEGIN IMMEDIATE does the same by itself."""
        if self.engine.dialect.name == "postgresql":
            c.execute(text(f"SELECT pg_advisory_xact_lock({ALLOCATION_LOCK})"))

    @staticmethod
    def _changed(c, ids) -> int:
        """Record that instances ``ids`` changed in this transaction; return the newest seq. Every
        PRUNE_EVERY seqs the rows older than the newest KEEP_CHANGES go, whoever writes them (an
        allocation, a release, a probe), so the table stays bounded however the fleet is used."""
        seqs = list(c.execute(insert(changes).returning(changes.c.seq),
                              [{"instance_id": i} for i in sorted(set(ids))]).scalars())
        top = max(seqs)
        if top // PRUNE_EVERY > (min(seqs) - 1) // PRUNE_EVERY:
            c.execute(delete(changes).where(changes.c.seq < top - KEEP_CHANGES))
        return top

    def index(self, c) -> HostIndex:
        """Ready instances and their blocks, as the allocator sees them, brought up to date.

        The first call reads every ready instance; later ones read only the instances named in
        `changes` since the last call (a re-probe's GPUs and block layout are read again when its
        ``updated_at`` moved). ``allocate`` calls it under the allocation lock."""
        low, top = c.execute(_CHANGES_RANGE).one()
        top = top or 0
        if self._index is not None and top == self._seen:
            return self._index
        if self._index is None or (low is not None and low > self._seen + 1):
            rows = c.execute(select(instances.c.id, instances.c.fleet, instances.c.num, instances.c.alias,
                                    instances.c.updated_at)
                             .where(instances.c.status == str(InstanceStatus.READY))).all()
            ids = None
            self._index = HostIndex()
        else:
            ids = sorted({r.instance_id for r in c.execute(select(changes.c.instance_id)
                                                            .where(changes.c.seq > self._seen))})
            rows = []
            for chunk in _chunks(ids):
                rows += c.execute(select(instances.c.id, instances.c.fleet, instances.c.num, instances.c.alias,
                                         instances.c.updated_at)
                                  .where(instances.c.status == str(InstanceStatus.READY),
                                         instances.c.id.in_(chunk))).all()
            for iid in ids:
                self._index.remove(iid)
        cache = self._slot_cache
        for chunk in _chunks([r.id for r in rows if r.id not in cache or cache[r.id][0] != r.updated_at]):
            self._load_static(c, chunk)
        busy: dict[int, set[int]] = {}
        q = select(blocks.c.instance_id, blocks.c.idx).where(blocks.c.run.is_not(None))
        for chunk in [None] if ids is None else _chunks(ids):
            for b in c.execute(q if chunk is None else q.where(blocks.c.instance_id.in_(chunk))):
                busy.setdefault(b.instance_id, set()).add(b.idx)
        held: dict[int, set[tuple[str, int]]] = {}  # GPUs withheld (Store.withhold): their blocks are busy too
        q = select(withheld_gpus.c.instance_id, withheld_gpus.c.vendor, withheld_gpus.c.gpu)
        for chunk in [None] if ids is None else _chunks(ids):
            for w in c.execute(q if chunk is None else q.where(withheld_gpus.c.instance_id.in_(chunk))):
                held.setdefault(w.instance_id, set()).add((w.vendor, w.gpu))
        for r in rows:
            taken = busy.get(r.id, set())
            if r.id in held and r.id in self._slot_cache:
                taken = taken | self._blocks_holding(r.id, held[r.id])
            self._index_put(r.id, r.fleet, r.num, r.alias, taken)
        self._seen = top
        return self._index

    def _blocks_holding(self, iid: int, keys: set[tuple[str, int]]) -> set[int]:
        """The blocks of instance ``iid`` that hold any of the GPUs ``keys`` ((vendor, index))."""
        _, gpus, _, variants = self._slot_cache[iid]
        positions = {p for p, g in enumerate(gpus) if (g.vendor, g.index) in keys}
        return {idx for idx, free, _ in variants if positions.intersection(free.gpus)}

    def _index_put(self, iid: int, fleet: str, num: int, alias: str, taken) -> None:
        """Put a ready instance in the view, its blocks ``taken`` (indices) busy, the rest free."""
        _, gpus, shape, variants = self._slot_cache[iid]
        if variants:
            self._index.put(HostSlots(iid, fleet, num, alias, gpus,
                                      [busy if idx in taken else free for idx, free, busy in variants], shape,
                                      traits=shape[2]))
        else:
            self._index.remove(iid)

    def _load_static(self, c, ids: list[int]) -> None:
        layout: dict[int, list] = {i: [] for i in ids}
        for b in c.execute(select(blocks.c.instance_id, blocks.c.idx, blocks.c.gpus, blocks.c.cpus,
                                  blocks.c.memory_mib, blocks.c.numa_node)
                           .where(blocks.c.instance_id.in_(ids)).order_by(blocks.c.instance_id, blocks.c.idx)):
            layout[b.instance_id].append((b.idx, tuple(json.loads(b.gpus)), b.cpus, b.memory_mib, b.numa_node))
        for r in c.execute(select(instances.c.id, instances.c.updated_at, instances.c.probe)
                           .where(instances.c.id.in_(ids))):
            probe = json.loads(r.probe)
            gpus = _GPUS.validate_python(probe.get("gpus") or [])
            blist = layout[r.id]
            shape = (tuple((g.vendor, g.model, g.name, g.memory_mib) for g in gpus),
                     tuple(blist), HostTraits.of(probe))
            variants = [(idx, BlockSlot(idx, g, cp, mem, numa, True), BlockSlot(idx, g, cp, mem, numa, False))
                        for idx, g, cp, mem, numa in blist]
            self._slot_cache[r.id] = (r.updated_at, gpus, shape, variants)

    def slots_snapshot(self) -> HostIndex:
        with self._reads.connect() as c:
            return self.index(c)

    def fleet_config(self, name: str) -> dict | None:
        with self._reads.connect() as c:
            row = c.execute(select(fleets.c.config).where(fleets.c.name == name)).first()
            return json.loads(row.config) if row else None

    def allocate(self, name: str, run_id: str, kind: str, spec: dict, container: str,
                 choose: Callable[[HostIndex], Placement | list[Placement]], *, priority: int = 50,
                 max_duration: float | None = None, retry: dict | None = None,
                 sealed: str | None = None, project: str = DEFAULT_PROJECT, user: str = "") -> list[Placement]:
        """In one transaction: refuse a duplicate live run, choose blocks with ``choose`` (which
        raises when nothing fits; a list for multi-node runs, rank 0 first), mark them, and record
        the run as `starting` (its secrets sealed, for its start)."""
        now = time.time()
        if self._index is None:
            # a new process reads every host: do that before taking the write lock, so others wait
            # only for the short part. A store that has a view brings it up to date under the lock
            # (index() below reads only what changed), which saves a read transaction per allocation.
            self.slots_snapshot()
        with self.engine.begin() as c:
            self._serialize(c)
            old = c.execute(_RUN_STATUS, {"name": name}).first()
            if old and old.status in LIVE:
                raise GpufleetError(f"a run named {name} is already {old.status}: stop it first "
                                    f"(gpufleet stop {name}) or choose another name")
            chosen = choose(self.index(c))
            placements = chosen if isinstance(chosen, list) else [chosen]
            if old:
                c.execute(delete(runs).where(runs.c.name == name))
            c.execute(insert(runs), dict(
                name=name, run_id=run_id, type=kind, status=str(RunStatus.STARTING), message="", spec=json.dumps(spec),
                container=container, created_at=now, updated_at=now, priority=priority, max_duration=max_duration,
                retry=json.dumps(retry or {}), project=project, user=user))
            if sealed is not None:
                c.execute(insert(secrets).values(run=name, sealed=sealed, created_at=now))
            self._event(c, "submitted", f"submitted ({kind}, priority {priority})", run=name, ts=now,
                        project=project, actor=user or None)
            seen = self._take(c, name, placements, now)
        self._taken(placements, seen)
        return placements

    def _take(self, c, name: str, placements: list[Placement], now: float) -> int:
        """Mark ``placements``' blocks as held by run ``name`` and record where it runs (`starting`)."""
        nodes = []
        for rank, p in enumerate(placements):
            host = p.host
            done = c.execute(_TAKE_BLOCKS, {"iid": host.instance_id, "idxs": list(p.blocks), "run_name": name})
            if done.rowcount != len(p.blocks):  # cannot happen under the lock; never give a GPU twice
                raise GpufleetError(f"blocks {list(p.blocks)} of {host.alias} were taken meanwhile; try again")
            nodes.append({"rank": rank, "alias": host.alias, "instance_id": host.instance_id,
                          "instance_num": host.num, "blocks": list(p.blocks),
                          "gpus": [host.gpus[g].model_dump(mode="json") for g in p.gpus]})
        seen = self._changed(c, [p.host.instance_id for p in placements])
        first = placements[0].host
        c.execute(update(runs).where(runs.c.name == name).values(
            fleet=first.fleet, instance_id=first.instance_id, alias=first.alias, status=str(RunStatus.STARTING),
            message="", exit_code=None, gpus=json.dumps(nodes[0]["gpus"]), blocks=json.dumps(nodes[0]["blocks"]),
            nodes=json.dumps(nodes), owner=f"{socket.gethostname()}:{os.getpid()}", started_at=now, updated_at=now))
        c.execute(delete(reservations).where(reservations.c.run == name))
        self._event(c, "starting", f"starting on {_where(placements)}", run=name, fleet=first.fleet, ts=now,
                    actor=SYSTEM_ACTOR)
        return seen

    def _taken(self, placements: list[Placement], seen: int) -> None:
        # Committed. Nothing else wrote between the transaction's index() and its commit (it held
        # the write lock), so the view is brought up to date here instead of re-read next time.
        for p in placements:
            taken = {b.idx for b in p.host.blocks if not b.free} | set(p.blocks)
            self._index_put(p.host.instance_id, p.host.fleet, p.host.num, p.host.alias, taken)
        self._seen = seen

    # the queue --------------------------------------------------------------------------------
    def enqueue(self, name: str, run_id: str, kind: str, spec: dict, container: str, *, priority: int,
                max_duration: float | None, retry: dict, sealed: str | None, reason: str,
                project: str = DEFAULT_PROJECT, user: str = "", next_at: float | None = None,
                replica_of: str | None = None, replicas: int | None = None, replica_group: str | None = None,
                group_replicas: dict[str, int] | None = None) -> None:
        """Record a run that waits for blocks (`pending`), with its secrets sealed, and say why it waits;
        ``next_at``: a scheduled run's first start (it waits for that time first). A service's own run
        (``replicas``: how many it wants; ``group_replicas``: how many each of its replica groups wants) or
        one of its replicas (``replica_of``: the service; ``replica_group``: its group)."""
        now = time.time()
        with self.engine.begin() as c:
            old = c.execute(_RUN_STATUS, {"name": name}).first()
            if old and old.status in LIVE:
                raise GpufleetError(f"a run named {name} is already {old.status}: stop it first "
                                    f"(gpufleet stop {name}) or choose another name")
            if old:
                c.execute(delete(runs).where(runs.c.name == name))
            c.execute(insert(runs), dict(
                name=name, run_id=run_id, type=kind, status=PENDING, message=reason, spec=json.dumps(spec),
                container=container, created_at=now, updated_at=now, priority=priority, max_duration=max_duration,
                retry=json.dumps(retry), project=project, user=user, next_at=next_at, replica_of=replica_of,
                replicas=replicas, replica_group=replica_group,
                group_replicas=json.dumps(group_replicas) if group_replicas is not None else None))
            if sealed is not None:
                c.execute(insert(secrets).values(run=name, sealed=sealed, created_at=now))
            what = (f"replica of service {replica_of}" if replica_of else
                    f"{kind} of {replicas} replica(s)" if replicas is not None else kind)
            self._event(c, "submitted", f"submitted ({what}, priority {priority})", run=name, ts=now,
                        project=project, actor=SYSTEM_ACTOR if replica_of else (user or None))
            if reason:
                self._event(c, "queued", reason, run=name, ts=now, project=project, actor=SYSTEM_ACTOR)

    def start_pending(self, name: str, placements: list[Placement]) -> bool:
        """Take ``placements``' blocks for the waiting run ``name`` (as the scheduler decided) and
        mark it `starting`, in one transaction; False if it is no longer waiting (cancelled, or
        started by another server)."""
        now = time.time()
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(_RUN_STATUS, {"name": name}).first()
            if row is None or row.status != PENDING:
                return False
            self.index(c)  # up to date under the lock, so _taken below can patch it
            seen = self._take(c, name, placements, now)
        self._taken(placements, seen)
        return True

    def requeue(self, name: str, why: str, expect: tuple[RunStatus, ...] | None = None) -> bool:
        """A run whose start was cut short (its server died before any container ran): back to
        waiting, its blocks freed, its place in the queue kept; a new run id, so that a container
        left from the first try is replaced, not adopted. ``expect``: only if the run is still in one
        of these statuses (a stop that began meanwhile is not undone); False when nothing was done."""
        with self.engine.begin() as c:
            self._serialize(c)
            if expect is not None:
                now_ = c.execute(_RUN_STATUS, {"name": name}).first()
                if now_ is None or now_.status not in expect:
                    return False
            self._record_usage(c, name)
            c.execute(update(runs).where(runs.c.name == name).values(
                run_id=uuid.uuid4().hex[:12], status=PENDING, fleet=None, instance_id=None, alias=None, gpus="[]",
                blocks="[]", nodes="[]",
                owner="", started_at=None, message=why, updated_at=time.time()))
            self._free(c, name)
            self._event(c, "queued", why, run=name, actor=SYSTEM_ACTOR)
        return True

    def pending(self) -> list[Run]:
        """The waiting runs, oldest first."""
        with self._reads.connect() as c:
            q = (select(runs, instances.c.num).join(instances, instances.c.id == runs.c.instance_id, isouter=True)
                 .where(runs.c.status == PENDING, runs.c.replicas.is_(None))  # a service's own run takes no blocks
                 .order_by(runs.c.created_at, runs.c.name))
            return [_run(r) for r in c.execute(q)]

    def retry_policy(self, name: str) -> dict:
        with self._reads.connect() as c:
            row = c.execute(select(runs.c.retry).where(runs.c.name == name)).first()
            return json.loads(row.retry) if row else {}

    def set_waiting(self, reasons: dict[str, str]) -> None:
        """Why each waiting run waits (its message), written only where it changed."""
        if not reasons:
            return
        with self.engine.begin() as c:
            current = {r.name: r.message for r in c.execute(select(runs.c.name, runs.c.message)
                                                            .where(runs.c.status == PENDING))}
            for name, reason in reasons.items():
                if name in current and current[name] != reason:
                    c.execute(update(runs).where(runs.c.name == name, runs.c.status == PENDING)
                              .values(message=reason))

    def save_reservations(self, items: list[tuple[str, float | None, list]]) -> None:
        """Replace the scheduler's reservations: (run, earliest start or None, [(instance_id, block)])."""
        now = time.time()
        with self.engine.begin() as c:
            c.execute(delete(reservations))
            live = {r.name for r in c.execute(select(runs.c.name).where(runs.c.status == PENDING))}
            rows = [dict(run=n, at=at, blocks=json.dumps([list(b) for b in blk]), updated_at=now)
                    for n, at, blk in items if n in live]
            if rows:
                c.execute(insert(reservations), rows)

    def reservations(self) -> dict[str, tuple[float | None, list[tuple[int, int]]]]:
        """run -> (earliest start or None, [(instance_id, block)]) of the scheduler's reservations."""
        with self._reads.connect() as c:
            return {r.run: (r.at, [tuple(b) for b in json.loads(r.blocks)])
                    for r in c.execute(select(reservations.c.run, reservations.c.at, reservations.c.blocks))}

    # secrets (sealed by the server; this module never sees a value) ---------------------------
    def sealed(self, run: str | None = None, fleet: str | None = None) -> str | None:
        with self._reads.connect() as c:
            q = select(secrets.c.sealed).where(secrets.c.run == run if run is not None else secrets.c.fleet == fleet)
            row = c.execute(q).first()
            return row.sealed if row else None

    def seal_fleet(self, fleet: str, sealed: str | None) -> None:
        with self.engine.begin() as c:
            c.execute(delete(secrets).where(secrets.c.fleet == fleet))
            if sealed is not None:
                c.execute(insert(secrets).values(fleet=fleet, sealed=sealed, created_at=time.time()))

    def drop_secrets(self, run: str) -> None:
        with self.engine.begin() as c:
            c.execute(delete(secrets).where(secrets.c.run == run))

    # events -----------------------------------------------------------------------------------
    def _event(self, c, kind: str, message: str, run: str | None = None, fleet: str | None = None,
               host: str | None = None, ts: float | None = None, project: str | None = None,
               actor: str | None = None) -> None:
        # under the writers' lock (PostgreSQL; SQLite's write lock is per transaction anyway), so
        # events commit in id order and a reader following "after id N" never skips one
        self._serialize(c)
        if project is None and run is not None:
            project = c.execute(select(runs.c.project).where(runs.c.name == run)).scalar()
        if project is None and fleet is not None:
            project = c.execute(select(fleets.c.project).where(fleets.c.name == fleet)).scalar()
        eid = c.execute(insert(events).returning(events.c.id).values(
            ts=ts or time.time(), kind=kind, run=run, fleet=fleet, host=host, message=message, project=project,
            actor=actor)).scalar_one()
        if eid % PRUNE_EVERY == 0:
            c.execute(delete(events).where(events.c.id <= eid - KEEP_EVENTS))

    def add_event(self, kind: str, message: str, run: str | None = None, fleet: str | None = None,
                  host: str | None = None, project: str | None = None, actor: str | None = SYSTEM_ACTOR) -> None:
        with self.engine.begin() as c:
            self._event(c, kind, message, run, fleet, host, project=project, actor=actor)

    def events(self, run: str | None = None, after: int = 0, limit: int = 1000,
               projects: set[str] | None = None) -> list[Event]:
        """Events after id ``after``, oldest first (at most ``limit``); of ``projects`` when given."""
        with self._reads.connect() as c:
            q = select(events).where(events.c.id > after)
            if run is not None:
                q = q.where(events.c.run == run)
            if projects is not None:
                q = q.where(events.c.project.in_(sorted(projects)))
            return [_event(r) for r in c.execute(q.order_by(events.c.id).limit(limit))]

    # users, projects, members, quotas (tokens arrive hashed; a value is never seen here) -------
    def bootstrap(self, admin: str, token_hash: str) -> bool:
        """On a server's first start (no user yet): user ``admin`` (server admin) with that token,
        and the project `default` with them as its admin. True if it made them. Two replicas
        starting at once make them once."""
        now = time.time()
        try:
            with self.engine.begin() as c:
                self._serialize(c)
                if c.execute(select(func.count()).select_from(users)).scalar():
                    return False
                c.execute(insert(users).values(name=admin, role=str(ServerRole.ADMIN), token_hash=token_hash,
                                               created_at=now, updated_at=now))
                if c.execute(select(projects.c.name).where(projects.c.name == DEFAULT_PROJECT)).first() is None:
                    c.execute(insert(projects).values(name=DEFAULT_PROJECT, created_at=now))
                c.execute(insert(members).values(project=DEFAULT_PROJECT, user=admin, role=str(ProjectRole.ADMIN)))
                self._event(c, "user", f"server admin {admin} made on first start", project=DEFAULT_PROJECT,
                            actor=SYSTEM_ACTOR)
                return True
        except IntegrityError:
            return False

    def user_by_token(self, token_hash: str) -> User | None:
        with self._reads.connect() as c:
            row = c.execute(select(users.c.name).where(users.c.token_hash == token_hash)).first()
            return self._users(c, row.name)[0] if row else None

    def users(self, name: str | None = None) -> list[User]:
        with self._reads.connect() as c:
            return self._users(c, name)

    def user(self, name: str) -> User | None:
        found = self.users(name)
        return found[0] if found else None

    @staticmethod
    def _users(c, name: str | None = None) -> list[User]:
        q = select(users).order_by(users.c.name)
        m = select(members)
        if name is not None:
            q, m = q.where(users.c.name == name), m.where(members.c.user == name)
        roles: dict[str, dict[str, str]] = {}
        for r in c.execute(m.order_by(members.c.project)):
            roles.setdefault(r.user, {})[r.project] = r.role
        return [User(name=r.name, role=r.role, created_at=r.created_at, projects=roles.get(r.name, {}))
                for r in c.execute(q)]

    def add_user(self, name: str, role: ServerRole, token_hash: str, actor: str) -> User:
        now = time.time()
        with self.engine.begin() as c:
            if c.execute(select(users.c.name).where(users.c.name == name)).first():
                raise GpufleetError(f"a user named {name} exists already")
            c.execute(insert(users).values(name=name, role=str(role), token_hash=token_hash, created_at=now,
                                           updated_at=now))
            self._event(c, "user", f"user {name} added ({role})", actor=actor)
            return self._users(c, name)[0]

    def set_token(self, name: str, token_hash: str, actor: str) -> bool:
        """Replace user ``name``'s token (its old one stops working at once)."""
        with self.engine.begin() as c:
            done = c.execute(update(users).where(users.c.name == name).values(
                token_hash=token_hash, updated_at=time.time())).rowcount
            if done:
                self._event(c, "user", f"token of {name} rotated", actor=actor)
            return bool(done)

    def delete_user(self, name: str, actor: str) -> None:
        with self.engine.begin() as c:
            row = c.execute(select(users.c.role).where(users.c.name == name)).first()
            if row is None:
                raise NotFound(f"no user named {name!r} (see gpufleet user list)")
            admins = c.execute(select(func.count()).select_from(users)
                               .where(users.c.role == str(ServerRole.ADMIN))).scalar()
            if row.role == ServerRole.ADMIN and admins <= 1:
                raise GpufleetError(f"{name} is the last server admin: make another admin first")
            c.execute(delete(members).where(members.c.user == name))
            c.execute(delete(quotas).where(quotas.c.user == name))
            c.execute(delete(users).where(users.c.name == name))
            self._event(c, "user", f"user {name} deleted", actor=actor)

    def projects(self, names: set[str] | None = None) -> list[Project]:
        with self._reads.connect() as c:
            q = select(projects).order_by(projects.c.name)
            m = select(members).order_by(members.c.user)
            if names is not None:
                q, m = q.where(projects.c.name.in_(sorted(names))), m.where(members.c.project.in_(sorted(names)))
            found = {r.name: Project(name=r.name, created_at=r.created_at) for r in c.execute(q)}
            for r in c.execute(m):
                if r.project in found:
                    found[r.project].members.append(Member(user=r.user, role=r.role))
            return list(found.values())

    def project(self, name: str) -> Project | None:
        found = self.projects({name})
        return found[0] if found else None

    def add_project(self, name: str, admin: str, actor: str) -> Project:
        with self.engine.begin() as c:
            if c.execute(select(projects.c.name).where(projects.c.name == name)).first():
                raise GpufleetError(f"a project named {name} exists already")
            c.execute(insert(projects).values(name=name, created_at=time.time()))
            c.execute(insert(members).values(project=name, user=admin, role=str(ProjectRole.ADMIN)))
            self._event(c, "project", f"project {name} added, {admin} its admin", project=name, actor=actor)
        return self.project(name)

    def delete_project(self, name: str, actor: str) -> None:
        with self.engine.begin() as c:
            self._serialize(c)
            if c.execute(select(projects.c.name).where(projects.c.name == name)).first() is None:
                raise NotFound(f"no project named {name!r} (see gpufleet project list)")
            owned = [r.name for r in c.execute(select(fleets.c.name).where(fleets.c.project == name))]
            if owned:
                raise GpufleetError(f"project {name} has fleets ({', '.join(owned)}): delete them first")
            live = [r.name for r in c.execute(select(runs.c.name).where(runs.c.project == name,
                                                                       runs.c.status.in_(LIVE)))]
            if live:
                raise GpufleetError(f"project {name} has runs waiting or running ({', '.join(live[:5])}): "
                                    "stop them first")
            c.execute(delete(members).where(members.c.project == name))
            c.execute(delete(quotas).where(quotas.c.project == name))
            c.execute(delete(projects).where(projects.c.name == name))
            self._event(c, "project", f"project {name} deleted", project=name, actor=actor)

    def set_member(self, project: str, user: str, role: ProjectRole, actor: str) -> None:
        with self.engine.begin() as c:
            if c.execute(select(users.c.name).where(users.c.name == user)).first() is None:
                raise NotFound(f"no user named {user!r} (see gpufleet user list)")
            old = c.execute(select(members.c.role).where(members.c.project == project,
                                                         members.c.user == user)).first()
            if old:
                c.execute(update(members).where(members.c.project == project, members.c.user == user)
                          .values(role=str(role)))
            else:
                c.execute(insert(members).values(project=project, user=user, role=str(role)))
            self._event(c, "member", f"{user} is {role} of project {project}" +
                        (f" (was {old.role})" if old and old.role != role else ""), project=project, actor=actor)

    def remove_member(self, project: str, user: str, actor: str) -> None:
        with self.engine.begin() as c:
            done = c.execute(delete(members).where(members.c.project == project, members.c.user == user)).rowcount
            if not done:
                raise NotFound(f"{user} is not a member of project {project}")
            c.execute(delete(quotas).where(quotas.c.project == project, quotas.c.user == user))
            self._event(c, "member", f"{user} removed from project {project}", project=project, actor=actor)

    def quotas(self, projects_: set[str] | None = None) -> list[Quota]:
        with self._reads.connect() as c:
            q = select(quotas).order_by(quotas.c.project, quotas.c.user, quotas.c.gpu)
            if projects_ is not None:
                q = q.where(quotas.c.project.in_(sorted(projects_)))
            return [Quota(project=r.project, user=r.user or None, gpu=r.gpu or None, gpus=r.gpus) for r in c.execute(q)]

    def set_quota(self, quota: Quota, actor: str) -> None:
        key = dict(project=quota.project, user=quota.user or "", gpu=quota.gpu or "")
        with self.engine.begin() as c:
            where = [getattr(quotas.c, k) == v for k, v in key.items()]
            if c.execute(select(quotas.c.gpus).where(*where)).first():
                c.execute(update(quotas).where(*where).values(gpus=quota.gpus))
            else:
                c.execute(insert(quotas).values(**key, gpus=quota.gpus))
            self._event(c, "quota", f"quota set: {_quota_text(quota)}", project=quota.project, actor=actor)

    def delete_quota(self, project: str, user: str | None, gpu: str | None, actor: str) -> bool:
        with self.engine.begin() as c:
            done = c.execute(delete(quotas).where(quotas.c.project == project, quotas.c.user == (user or ""),
                                                  quotas.c.gpu == (gpu or ""))).rowcount
            if done:
                self._event(c, "quota", "quota removed: " + _quota_text(Quota(project=project, user=user, gpu=gpu,
                                                                                  gpus=0), limit=False),
                            project=project, actor=actor)
            return bool(done)

    def usage_records(self, since: float = 0.0) -> list[UsageRecord]:
        """GPU time that ended after ``since``, and that of the runs holding GPUs now (``ended_at`` None)."""
        with self._reads.connect() as c:
            out = [UsageRecord(run=r.run, project=r.project, user=r.user, gpus=r.gpus, gpu=r.gpu,
                               started_at=r.started_at, ended_at=r.ended_at)
                   for r in c.execute(select(usage).where(usage.c.ended_at > since).order_by(usage.c.id))]
            for r in c.execute(select(runs.c.name, runs.c.project, runs.c.user, runs.c.nodes, runs.c.started_at)
                               .where(runs.c.status.in_(ACTIVE), runs.c.started_at.is_not(None))):
                gpus = [g for n in json.loads(r.nodes) for g in n.get("gpus", [])]
                if gpus:
                    out.append(UsageRecord(run=r.name, project=r.project, user=r.user, gpus=len(gpus),
                                           gpu=gpus[0].get("model") or "", started_at=r.started_at))
            return out

    # server leadership (who holds it; the lock itself is the server's) -----------------------
    def record_leader(self, holder: str, url: str, acquired_at: float) -> None:
        now = time.time()
        with self.engine.begin() as c:
            c.execute(delete(server_leases).where(server_leases.c.name == "leader"))
            c.execute(insert(server_leases).values(name="leader", holder=holder, url=url, acquired_at=acquired_at,
                                                   renewed_at=now))

    def leader(self) -> dict | None:
        with self._reads.connect() as c:
            row = c.execute(select(server_leases).where(server_leases.c.name == "leader")).first()
            return dict(row._mapping) if row else None

    def finish_run(self, name: str, status: RunStatus, exit_code: int | None = None, message: str = "",
                   actor: str = SYSTEM_ACTOR, final: bool = False, expect: tuple[RunStatus, ...] | None = None
                   ) -> bool:
        """Record a run's end (an event says how, and who: ``actor``), free its blocks, forget its
        secrets and record the GPU time it used, in one transaction; False (nothing done) if it had
        already ended. A scheduled run (dstack's `schedule`) that ends otherwise than by a user's stop
        (``final``, or begin_stop's) waits for its next time instead, its secrets kept sealed.
        ``expect``: only if the run is still in one of these statuses (what the caller decided from)."""
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(select(runs.c.status, runs.c.fleet, runs.c.next_at, runs.c.spec)
                            .where(runs.c.name == name)).first()
            if row is None or row.status not in LIVE or (expect is not None and row.status not in expect):
                return False
            if row.next_at is not None and not final and json.loads(row.spec).get("schedule"):
                self._reschedule(c, name, row, status, exit_code, message, actor)
                return True
            self._record_usage(c, name)
            c.execute(update(runs).where(runs.c.name == name).values(
                status=str(status), exit_code=exit_code, message=message, updated_at=time.time(), next_at=None))
            self._free(c, name)
            c.execute(delete(reservations).where(reservations.c.run == name))
            c.execute(delete(secrets).where(secrets.c.run == name))
            text_ = message or (f"exit code {exit_code}" if exit_code is not None else str(status))
            if status == RunStatus.DONE:
                text_ = "finished: exit code 0" if not message else f"finished: {message}"
            self._event(c, str(status), text_, run=name, fleet=row.fleet, actor=actor)
            return True

    def _reschedule(self, c, name: str, row, status: RunStatus, exit_code: int | None, message: str,
                    actor: str) -> None:
        """A scheduled run's end (``status``, as finish_run says it): its GPU time recorded, its blocks
        freed, and it waits (`pending`) for the next time of its schedule after now, with a new run id
        (its old container is replaced, not adopted, when it starts again); its secrets stay sealed."""
        now = time.time()
        schedule = ScheduleSpec.model_validate(json.loads(row.spec)["schedule"])
        at = schedule.next_start(max(now, row.next_at + 1))  # the next time after the one it started at
        self._record_usage(c, name)
        reason = f"scheduled: next {utc_text(at)}"
        c.execute(update(runs).where(runs.c.name == name).values(
            run_id=uuid.uuid4().hex[:12], status=PENDING, fleet=None, instance_id=None, alias=None, gpus="[]",
            blocks="[]", nodes="[]", owner="", started_at=None, exit_code=None, message=reason, next_at=at,
            updated_at=now))
        self._free(c, name)
        c.execute(delete(reservations).where(reservations.c.run == name))
        text_ = message or (f"exit code {exit_code}" if exit_code is not None else str(status))
        if status == RunStatus.DONE:
            text_ = "finished: exit code 0" if not message else f"finished: {message}"
        self._event(c, str(status), text_, run=name, fleet=row.fleet, actor=actor)
        self._event(c, "scheduled", reason, run=name, actor=SYSTEM_ACTOR)

    @staticmethod
    def _record_usage(c, name: str) -> None:
        """The GPU time of run ``name`` since it took its blocks, as a `usage` row (before its end or requeue)."""
        row = c.execute(select(runs.c.project, runs.c.user, runs.c.nodes, runs.c.started_at, runs.c.status)
                        .where(runs.c.name == name)).first()
        if row is None or row.started_at is None or row.status not in ACTIVE:
            return
        gpus = [g for n in json.loads(row.nodes) for g in n.get("gpus", [])]
        if gpus:
            c.execute(insert(usage).values(run=name, project=row.project, user=row.user, gpus=len(gpus),
                                           gpu=gpus[0].get("model") or "", started_at=row.started_at,
                                           ended_at=max(time.time(), row.started_at)))

    def _free(self, c, name: str) -> None:
        held = [r.instance_id for r in c.execute(select(blocks.c.instance_id).distinct()
                                                 .where(blocks.c.run == name))]
        if held:
            c.execute(update(blocks).where(blocks.c.run == name).values(run=None))
            self._changed(c, held)

    def begin_stop(self, name: str, why: str, actor: str = SYSTEM_ACTOR, final: bool = False) -> RunStatus | None:
        """Mark an active run `stopping` (``why``, by ``actor``) before its containers are stopped,
        so that their exit is not taken for a failure; the status it had (None: not active, nothing
        done). ``final`` (a user's stop): a scheduled run is not started again.

        A `running` run becomes this process's to stop. A `starting` one stays its starter's (its
        owner is kept): the start is the one that knows which containers exist, so it does the stop
        when its current step ends (queue.launch) and no one else changes the run meanwhile."""
        with self.engine.begin() as c:
            self._serialize(c)  # one transaction at a time reads and changes a run's status
            row = c.execute(select(runs.c.status, runs.c.fleet).where(runs.c.name == name)).first()
            if row is None or row.status not in ACTIVE:
                return None
            owner = {} if row.status == RunStatus.STARTING else {"owner": f"{socket.gethostname()}:{os.getpid()}"}
            c.execute(update(runs).where(runs.c.name == name).values(
                status=str(RunStatus.STOPPING), message=why, updated_at=time.time(), **owner,
                **({"next_at": None} if final else {})))
            self._event(c, "stopping", why, run=name, fleet=row.fleet, actor=actor)
            return RunStatus(row.status)

    def finish_stop(self, name: str, note: str = "") -> bool:
        """End a `stopping` run `stopped` as its stop said (its message, and the event names who
        began it), ``note`` added (what else happened meanwhile); False if it is not `stopping`."""
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(select(runs.c.status, runs.c.message).where(runs.c.name == name)).first()
            if row is None or row.status != RunStatus.STOPPING:
                return False
            actor = c.execute(select(events.c.actor).where(events.c.run == name, events.c.kind == "stopping")
                              .order_by(events.c.id.desc()).limit(1)).scalar() or SYSTEM_ACTOR
        why = row.message + (f" ({note})" if note else "")
        return self.finish_run(name, RunStatus.STOPPED, None, why, actor=actor, expect=(RunStatus.STOPPING,))

    def set_run_status(self, name: str, status: RunStatus, message: str = "",
                       expect: tuple[RunStatus, ...] | None = None) -> bool:
        """A live run's new status (or note); an event when the status changes. ``expect``: only if
        the run is still in one of these statuses (what the caller decided from), else nothing is
        done (a stop that began meanwhile is not undone). False when nothing was done."""
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(select(runs.c.status, runs.c.fleet, runs.c.nodes).where(runs.c.name == name)).first()
            if row is None or row.status not in LIVE or (expect is not None and row.status not in expect):
                return False
            c.execute(update(runs).where(runs.c.name == name).values(status=str(status), message=message,
                                                                     updated_at=time.time()))
            if row.status != str(status):
                where = ", ".join(n["alias"] for n in json.loads(row.nodes))
                text_ = f"running on {where}" if status == RunStatus.RUNNING and where else (message or str(status))
                self._event(c, str(status), text_, run=name, fleet=row.fleet, actor=SYSTEM_ACTOR)
                retry = json.loads(c.execute(select(runs.c.retry).where(runs.c.name == name)).scalar_one())
                again = {"error", "interruption"} & set(retry.get("on_events") or [])
                scheduled = c.execute(select(runs.c.next_at).where(runs.c.name == name)).scalar() is not None
                if status == RunStatus.RUNNING and not again and not scheduled:
                    # started: its secrets are on the host now, not kept here (a run that may be
                    # started again after an error or interruption keeps them, sealed, until it ends)
                    c.execute(delete(secrets).where(secrets.c.run == name))
            return True

    def runs(self, include_finished: bool = False, name: str | None = None,
             projects: set[str] | None = None) -> list[Run]:
        with self._reads.connect() as c:
            q = select(runs, instances.c.num).join(instances, instances.c.id == runs.c.instance_id, isouter=True)
            if name is not None:
                q = q.where(runs.c.name == name)
            elif not include_finished:
                q = q.where(runs.c.status.in_(LIVE))
            if projects is not None:
                q = q.where(runs.c.project.in_(sorted(projects)))
            return [_run(r) for r in c.execute(q.order_by(runs.c.created_at))]

    def run(self, name: str) -> Run | None:
        found = self.runs(name=name)
        return found[0] if found else None

    # services and their replicas (gpufleet.replicas) ------------------------------------------
    def add_service_requests(self, holder: str, counts: dict[tuple[str, int], int], now: float) -> None:
        """Add this process's request counts ({(service, bucket): n}) and drop rows older than RATE_KEEP."""
        with self.engine.begin() as c:
            for (service, bucket), n in counts.items():
                key = (service_requests.c.service == service, service_requests.c.holder == holder,
                       service_requests.c.bucket == bucket)
                done = c.execute(update(service_requests).where(*key).values(count=service_requests.c.count + n))
                if done.rowcount == 0:
                    c.execute(insert(service_requests).values(service=service, holder=holder, bucket=bucket, count=n))
            # old rows of every process (one that died leaves its rows behind)
            c.execute(delete(service_requests).where(service_requests.c.bucket < int(now - RATE_KEEP) // RATE_BUCKET))

    def service_requests_since(self, service: str, since: float) -> int:
        """Requests every server process carried to ``service`` since ``since`` (whole buckets from it)."""
        with self._reads.connect() as c:
            return int(c.execute(select(func.coalesce(func.sum(service_requests.c.count), 0)).where(
                service_requests.c.service == service,
                service_requests.c.bucket >= int(since) // RATE_BUCKET)).scalar_one())

    def replica_runs(self, service: str, include_finished: bool = False) -> list[Run]:
        """The replicas of ``service`` (live ones; ``include_finished``: every row still kept)."""
        with self._reads.connect() as c:
            q = (select(runs, instances.c.num).join(instances, instances.c.id == runs.c.instance_id, isouter=True)
                 .where(runs.c.replica_of == service))
            if not include_finished:
                q = q.where(runs.c.status.in_(LIVE))
            return [_run(r) for r in c.execute(q.order_by(runs.c.created_at))]

    def set_service(self, name: str, *, status: RunStatus | None = None, message: str | None = None,
                    replicas: int | None = None, spec: dict | None = None, sealed: str | None | bool = False,
                    group_replicas: dict[str, int] | None = None,
                    event: tuple[str, str] | None = None, actor: str = SYSTEM_ACTOR) -> bool:
        """Change a live service's own run: its status and message (an event when the status changes),
        the replicas it wants (``group_replicas``: each group's), its spec and sealed secrets (``sealed=False``:
        kept), and record ``event``
        (kind, message). Only what differs is written; False when it is not a live service."""
        with self.engine.begin() as c:
            self._serialize(c)
            row = c.execute(select(runs.c.status, runs.c.message, runs.c.replicas, runs.c.spec, runs.c.started_at,
                                   runs.c.project, runs.c.group_replicas).where(runs.c.name == name)).first()
            if row is None or row.status not in LIVE or row.replicas is None:
                return False
            now = time.time()
            values: dict = {}
            if status is not None and str(status) != row.status:
                values["status"] = str(status)
                if status == RunStatus.RUNNING and row.started_at is None:
                    values["started_at"] = now
            if message is not None and message != row.message:
                values["message"] = message
            if replicas is not None and replicas != row.replicas:
                values["replicas"] = replicas
            if group_replicas is not None and json.dumps(group_replicas) != row.group_replicas:
                values["group_replicas"] = json.dumps(group_replicas)
            if spec is not None and json.dumps(spec) != row.spec:
                values["spec"] = json.dumps(spec)
            if values:
                c.execute(update(runs).where(runs.c.name == name).values(updated_at=now, **values))
            if sealed is not False:
                c.execute(delete(secrets).where(secrets.c.run == name))
                if sealed is not None:
                    c.execute(insert(secrets).values(run=name, sealed=sealed, created_at=now))
            if "status" in values:
                self._event(c, str(status), message or str(status), run=name, ts=now, project=row.project,
                            actor=SYSTEM_ACTOR)
            if event is not None:
                self._event(c, event[0], event[1], run=name, ts=now, project=row.project, actor=actor)
            return True

    def busy_aliases(self, fleet: str) -> list[str]:
        with self._reads.connect() as c:
            return self._busy_aliases(c, fleet)


def _quota_text(q: Quota, limit: bool = True) -> str:
    who = f"{q.user} in project {q.project}" if q.user else f"project {q.project}"
    what = f"{q.gpu} GPUs" if q.gpu else "GPUs"
    return f"{who}: at most {q.gpus} {what} at once" if limit else f"{who}, {what}"


def _chunks(ids: list[int], size: int = 500):
    """``ids`` in slices short enough for an IN (...) list."""
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("gpufleet_read") else "BEGIN IMMEDIATE")


SQLITE_BUSY_MS = 10000


def _sqlite_wal(cur) -> None:
    """Switch the file to WAL. On a new file two processes may switch at once: SQLite answers the
    loser "database is locked" at once, without waiting for the busy timeout (it holds a read
    lock and wants to upgrade it, which it refuses to wait for), so the switch is retried here
    until the busy timeout has passed."""
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    pause = 0.005
    while True:
        try:
            mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        else:
            if mode.lower() == "wal" or time.monotonic() > deadline:
                return
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # the "begin" hook (_sqlite_begin) issues BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    _sqlite_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is not fsynced alone, the database stays consistent
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()

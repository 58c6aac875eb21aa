"""Versioned schema migrations for the state store, the same on SQLite and PostgreSQL.

The database records its schema version in `gpufleet_schema`. A new database gets the current
schema at once; an older one is brought up step by step, each step in the same transaction as
the version bump. A database written by a newer gpufleet is refused rather than guessed at.
To change the schema: change the tables in state.py, append a step here, bump nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Connection, Engine

from gpufleet.errors import GpufleetError

version_table = Table(
    "gpufleet_schema", MetaData(),
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("description", String(200), nullable=False),
)


def _add_runs_nodes(c: Connection, metadata: MetaData) -> None:
    c.execute(text("ALTER TABLE runs ADD COLUMN nodes TEXT NOT NULL DEFAULT '[]'"))


def _add_runs_owner(c: Connection, metadata: MetaData) -> None:
    c.execute(text("ALTER TABLE runs ADD COLUMN owner VARCHAR(300) NOT NULL DEFAULT ''"))


def _add_changes(c: Connection, metadata: MetaData) -> None:
    metadata.tables["changes"].create(c)


def _add_queue(c: Connection, metadata: MetaData) -> None:
    for column in ("priority INTEGER NOT NULL DEFAULT 50", "max_duration FLOAT", "retry TEXT NOT NULL DEFAULT '{}'",
                   "started_at FLOAT"):
        c.execute(text(f"ALTER TABLE runs ADD COLUMN {column}"))
    c.execute(text("CREATE INDEX ix_runs_status ON runs (status)"))
    for name in ("events", "secrets", "reservations", "server_leases"):
        metadata.tables[name].create(c)


# (version, description, step): step brings a database at version-1 to version.
# Version 1 is the first released schema (fleets, instances, blocks, runs without `nodes`).
STEPS: list[tuple[int, str, Callable[[Connection, MetaData], None]]] = [
    (2, "runs.nodes: per-node placement of multi-node runs", _add_runs_nodes),
    (3, "runs.owner: the process starting a run, for reconciliation after a crash", _add_runs_owner),
    (4, "changes: which instances each transaction touched, so allocators re-read only those", _add_changes),
    (5, "the server's queue: runs.priority/max_duration/retry/started_at, events, secrets, reservations, "
        "server_leases", _add_queue),
]
LATEST = STEPS[-1][0] if STEPS else 1


def current_version(c: Connection) -> int | None:
    if not inspect(c).has_table("gpufleet_schema"):
        return None
    row = c.execute(select(version_table.c.version).where(version_table.c.id == 1)).first()
    return row.version if row else None


def upgrade(engine: Engine, metadata: MetaData) -> int:
    """Bring the database to LATEST; return the version found before."""
    # the usual case, a database already at LATEST, is seen without a write lock (on SQLite the
    # state store's "begin" hook takes one for every transaction not marked as a read)
    with engine.execution_options(gpufleet_read=True).connect() as c:
        found = current_version(c)
    if found == LATEST:
        return found
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            c.execute(text("SELECT pg_advisory_xact_lock(7405323)"))  # one migrator at a time
        found = current_version(c)
        if found is None:
            if inspect(c).has_table("fleets"):
                raise GpufleetError("the state database has gpufleet tables but no schema version; "
                                    "it was not made by this gpufleet")
            metadata.create_all(c)
            version_table.create(c, checkfirst=True)
            c.execute(version_table.insert().values(id=1, version=LATEST, description="created"))
            return 0
        if found > LATEST:
            raise GpufleetError(f"the state database is at schema version {found}, newer than this gpufleet "
                                f"understands ({LATEST}): upgrade gpufleet")
        for version, description, step in STEPS:
            if version > found:
                step(c, metadata)
                c.execute(version_table.update().where(version_table.c.id == 1)
                          .values(version=version, description=description))
        return found

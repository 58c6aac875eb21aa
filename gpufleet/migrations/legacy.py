"""The versioned runner gpufleet had before Alembic, kept only to bring its databases over.

Those databases record their schema version (1 to 5) in `gpufleet_schema`. One at version 1 to 3
gets the old steps up to version 4, the schema of the baseline revision; Alembic takes over from
there (gpufleet.migrations stamps the database at the revision of its version and upgrades it).
The steps are frozen: they write exactly what their release wrote, whatever state.py says today.

The table itself stays, its version kept equal to the schema's number, because a gpufleet from
before Alembic reads only this table: it then refuses a database newer than it understands with
its own "upgrade gpufleet", instead of calling it "not made by this gpufleet" (which it would say
of gpufleet tables with no version table) or, worse, using a schema that has moved on.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.engine import Connection

version_table = Table(
    "gpufleet_schema", MetaData(),
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("description", String(200), nullable=False),
)

# `changes` as version 4 created it (the baseline revision has the same table)
_changes_v4 = Table(
    "changes", MetaData(),
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("instance_id", Integer, nullable=False),
    sqlite_autoincrement=True,
)


def _add_runs_nodes(c: Connection) -> None:
    c.execute(text("ALTER TABLE runs ADD COLUMN nodes TEXT NOT NULL DEFAULT '[]'"))


def _add_runs_owner(c: Connection) -> None:
    c.execute(text("ALTER TABLE runs ADD COLUMN owner VARCHAR(300) NOT NULL DEFAULT ''"))


def _add_changes(c: Connection) -> None:
    _changes_v4.create(c)


# (version, description, step): step brings a database at version-1 to version.
# Version 1 is the first released schema (fleets, instances, blocks, runs without `nodes`).
# Version 5 (the queue) is revision 0005 of Alembic, which a version-5 database is stamped at.
STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (2, "runs.nodes: per-node placement of multi-node runs", _add_runs_nodes),
    (3, "runs.owner: the process starting a run, for reconciliation after a crash", _add_runs_owner),
    (4, "changes: which instances each transaction touched, so allocators re-read only those", _add_changes),
]
BASELINE = 4  # the version the baseline revision is
LAST = 5  # the newest version a gpufleet before Alembic wrote
DESCRIPTION = "the schema's number, for gpufleet before Alembic: the revision is in alembic_version"


def version(c: Connection) -> int | None:
    """The version in `gpufleet_schema` (the caller knows the table exists); None if its row is gone."""
    row = c.execute(select(version_table.c.version).where(version_table.c.id == 1)).first()
    return row.version if row else None


def bring_to_baseline(c: Connection, found: int) -> None:
    """Apply the old steps after version ``found``, up to the baseline's version."""
    for step_version, _description, step in STEPS:
        if step_version > found:
            step(c)


def record(c: Connection, schema_version: int) -> None:
    """Write ``schema_version`` into `gpufleet_schema`, creating it on a database that never had it."""
    version_table.create(c, checkfirst=True)
    done = c.execute(version_table.update().where(version_table.c.id == 1)
                     .values(version=schema_version, description=DESCRIPTION))
    if done.rowcount == 0:
        c.execute(version_table.insert().values(id=1, version=schema_version, description=DESCRIPTION))

"""Schema migrations for the state store, by Alembic, the same on SQLite and PostgreSQL.

Store() calls upgrade() for every command, so the usual case, a database already at the newest
revision, is one SELECT of `alembic_version` with no write lock and without importing Alembic
(whose import alone costs more than the rest of opening the store). Everything else happens in
one transaction that holds the migration lock (an advisory lock on PostgreSQL; on SQLite the write
lock that every transaction not marked as a read takes):

- a new database gets state.py's tables and is stamped at the head;
- an older one is brought to the head by the revisions in versions/;
- one from before Alembic (`gpufleet_schema`, versions 1 to 5) gets the old steps up to version 4
  (legacy.py), is stamped at the revision of its version and brought to the head;
- a revision this gpufleet does not know, which only a newer gpufleet writes, is refused rather
  than guessed at, and so are gpufleet tables with no version at all.

Revision ids are NNNN_what (the file versions/NNNN_what.py): NNNN continues the numbering of
`gpufleet_schema` (the baseline is 4), so the newest one is known from the file names alone, and
that number is the schema version this module reports. There is no alembic.ini: the configuration
is built here, pointing at this package's folder, so it works the same from a checkout and from an
installed wheel.

To change the schema: change the tables in state.py, run `python -m gpufleet.migrations revision
"what changed"` and fill in the file it writes with explicit op calls (op.batch_alter_table for what
SQLite's ALTER TABLE cannot do). tests/unit/test_state.py checks that the revisions give exactly
state.py's tables on both databases.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from gpufleet.errors import GpufleetError
from gpufleet.migrations import legacy

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPTS = Path(__file__).resolve().parent  # script_location: env.py, script.py.mako, versions/
VERSION_TABLES = ("alembic_version", legacy.version_table.name)
MIGRATION_LOCK = 7405323  # PostgreSQL advisory lock: one migrator at a time
_REVISION_FILE = re.compile(r"^(\d{4})_\w+\.py$")
_READ_STAMP = text("SELECT version_num FROM alembic_version")


@functools.cache
def revisions(directory: Path = SCRIPTS) -> tuple[str, ...]:
    """The revision ids in ``directory``/versions, oldest first, read from the file names only
    (tests/unit/test_state.py checks that Alembic sees the same chain)."""
    return tuple(sorted(p.name.removesuffix(".py") for p in (directory / "versions").iterdir()
                        if _REVISION_FILE.match(p.name)))


def version_of(revision: str) -> int:
    """The schema version a revision id stands for: its number."""
    return int(revision[:4])


HEAD = revisions()[-1]  # the newest revision this gpufleet knows
LATEST = version_of(HEAD)  # ... and its schema version (as gpufleet_schema numbered them)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate's filter: the version tables are not state.py's and must not be diffed."""
    return not (type_ == "table" and name in VERSION_TABLES)


def current_revision(c: Connection) -> str | None:
    """The revision in `alembic_version`; None when it has none."""
    if not inspect(c).has_table("alembic_version"):
        return None
    return c.execute(_READ_STAMP).scalar()


def current_version(c: Connection) -> int | None:
    """The schema version of the database: that of its revision, or the one in `gpufleet_schema`
    for a database from before Alembic; None for one with neither (or a revision not numbered as
    gpufleet numbers them)."""
    revision = current_revision(c)
    if revision is not None:
        return version_of(revision) if _REVISION_FILE.match(revision + ".py") else None
    return legacy.version(c) if inspect(c).has_table(legacy.version_table.name) else None


def config(connection: Connection | None = None, metadata: MetaData | None = None,
           directory: Path = SCRIPTS) -> Config:
    """Alembic's configuration, built here instead of read from an alembic.ini: the scripts in
    ``directory``; env.py runs the migrations on ``connection`` (in its transaction) and compares
    with ``metadata``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(directory).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s")  # the id is NNNN_what already
    cfg.attributes.update(connection=connection, metadata=metadata)
    return cfg


def _refuse_newer(found: str, directory: Path) -> GpufleetError:
    return GpufleetError(f"the state database is at schema revision {found}, newer than this gpufleet "
                         f"understands ({revisions(directory)[-1]}): upgrade gpufleet")


def upgrade(engine: Engine, metadata: MetaData, directory: Path = SCRIPTS) -> int:
    """Bring the database to the head revision; return the schema version found (0: a new database).

    ``directory`` holds the scripts (tests give a copy with an extra revision)."""
    known = revisions(directory)
    # the usual case, a database already at the head, is seen without a write lock (on SQLite the
    # state store's "begin" hook takes one for every transaction not marked as a read) and without
    # asking the catalog whether the table exists: a failed SELECT says it does not (or that
    # something else is wrong, which the locked path below meets again and reports)
    with engine.execution_options(gpufleet_read=True).connect() as c:
        try:
            found = c.execute(_READ_STAMP).scalars().all()
        except DBAPIError:
            found = None
    if found == [known[-1]]:
        return version_of(known[-1])
    with migration_connection(engine) as c, c.begin():
        if engine.dialect.name == "postgresql":
            c.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        return _migrate(c, metadata, directory, known)


def _migrate(c: Connection, metadata: MetaData, directory: Path, known: tuple[str, ...]) -> int:
    from alembic import command

    cfg = config(c, metadata, directory)
    head = known[-1]
    tables = set(inspect(c).get_table_names())
    found = c.execute(_READ_STAMP).scalars().all() if "alembic_version" in tables else []
    if found == [head]:  # another process migrated it while this one waited for the lock
        return version_of(head)
    dangling = _dangling(c)
    if found:  # under Alembic
        if len(found) > 1 or found[0] not in known:
            raise _refuse_newer(", ".join(found), directory)
        before = version_of(found[0])
        command.upgrade(cfg, head)
    elif legacy.version_table.name in tables and (before := legacy.version(c)) is not None:
        if before > legacy.LAST:
            raise GpufleetError(f"the state database is at schema version {before}, newer than this gpufleet "
                                f"understands ({version_of(head)}): upgrade gpufleet")
        legacy.bring_to_baseline(c, before)
        command.stamp(cfg, next(r for r in known if version_of(r) == max(before, legacy.BASELINE)))
        command.upgrade(cfg, head)
    elif tables & set(metadata.tables):
        raise GpufleetError("the state database has gpufleet tables but no schema version; "
                            "it was not made by this gpufleet")
    else:  # new: state.py's tables as they are, rather than every revision since the baseline
        before = 0
        metadata.create_all(c)
        command.stamp(cfg, head)
    legacy.record(c, version_of(head))
    left = _dangling(c) - dangling
    if left:
        raise GpufleetError(f"the schema migration would leave rows referring to missing rows "
                            f"({', '.join(sorted(left))}); nothing was changed")
    return before


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection to migrate on. On SQLite, foreign keys are off on it while it migrates:
    a batch operation recreates a table (copy, DROP, rename), and with foreign keys on, that DROP
    would delete, by ON DELETE CASCADE, every row that refers to the table (the instances of every
    fleet, their blocks). SQLite ignores the pragma inside a transaction, so it is set before one
    begins, and set back after; _migrate checks what the migration left."""
    with engine.connect() as c:
        if engine.dialect.name != "sqlite":
            yield c
            return
        raw = c.connection.driver_connection
        was = raw.execute("PRAGMA foreign_keys").fetchone()[0]
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            yield c
        finally:
            raw.execute(f"PRAGMA foreign_keys={'ON' if was else 'OFF'}")


def _dangling(c: Connection) -> set[str]:
    """On SQLite, where migrations run with foreign keys off: the tables with rows that refer to
    missing rows, as "table -> referred table". Compared before and after, so that rows left
    dangling by some old bug do not stop every later migration."""
    if c.dialect.name != "sqlite":
        return set()
    return {f"{r[0]} -> {r[2]}" for r in c.exec_driver_sql("PRAGMA foreign_key_check")}


def new_revision(message: str, directory: Path = SCRIPTS) -> Path:
    """Write an empty revision after the head, numbered next (versions/NNNN_message.py), for a
    developer to fill in; return its path."""
    from alembic import command

    slug = re.sub(r"\W+", "_", message.lower()).strip("_")[:40] or "revision"
    revision = f"{version_of(revisions(directory)[-1]) + 1:04d}_{slug}"
    script = command.revision(config(directory=directory), message, rev_id=revision)
    revisions.cache_clear()
    return Path(script.path)

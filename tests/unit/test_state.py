"""The state store on SQLite and on PostgreSQL (GPUFLEET_TEST_DATABASE_URL, set by scripts/test.sh)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from gpufleet import migrations
from gpufleet.allocator import NoCapacity, Request, place
from gpufleet.blocks import split
from gpufleet.errors import GpufleetError
from gpufleet.models import GPU, GPUSpec, HostFacts
from gpufleet.state import Store, metadata

PG_URL = os.environ.get("GPUFLEET_TEST_DATABASE_URL")


def _engine(url: str):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def _wipe(url: str) -> None:
    engine = _engine(url)
    with engine.begin() as c:
        metadata.drop_all(c)
        for table in migrations.VERSION_TABLES:
            c.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must provide GPUFLEET_TEST_DATABASE_URL (scripts/test.sh starts PostgreSQL)")
        pytest.skip("no PostgreSQL: set GPUFLEET_TEST_DATABASE_URL (scripts/test.sh does)")
    _wipe(PG_URL)
    return PG_URL


def gpus(n: int) -> list[GPU]:
    return [GPU(index=i, vendor="nvidia", model="H100", memory_mib=81559, uuid=f"GPU-{i}", numa_node=i // 4)
            for i in range(n)]


def add_host(store: Store, fleet: str, alias: str, n: int = 8) -> None:
    store.save_fleet(fleet, f"{fleet}.yml", {"type": "fleet", "placement": "cluster"})
    probe = HostFacts(gpus=gpus(n), cpu={"count": 16}, memory_mib=64000)
    store.record_instance(fleet, alias, alias, 22, "ready", "", f"{n}xH100", probe, split(gpus(n), "auto", 16, 64000))


def test_fleets_instances_and_blocks(db_url):
    store = Store(db_url)
    add_host(store, "f", "a")
    add_host(store, "f", "b")
    view = store.fleet("f")
    assert [(i.num, i.alias, i.status_text) for i in view.instances] == [(0, "a", "0/8 busy"), (1, "b", "0/8 busy")]
    store.remove_instance("f", "a")
    add_host(store, "f", "c")
    assert [(i.num, i.alias) for i in store.fleet("f").instances] == [(0, "c"), (1, "b")]
    store.record_instance("f", "b", "b", 22, "unreachable", "Connection refused")
    assert store.fleet("f").instances[1].status_text == "unreachable: Connection refused"


def test_allocate_finish_and_busy_rules(db_url):
    store = Store(db_url)
    add_host(store, "f", "a")
    req = Request(gpu=GPUSpec.model_validate(4))
    [p] = store.allocate("r1", "id1", "task", {}, "gpufleet-r1", lambda hosts: place(req, hosts))
    assert p.blocks == (0, 1, 2, 3)
    assert store.fleet("f").instances[0].status_text == "4/8 busy"
    with pytest.raises(GpufleetError, match="already starting"):
        store.allocate("r1", "id2", "task", {}, "gpufleet-r1", lambda hosts: place(req, hosts))
    with pytest.raises(GpufleetError, match="runs workloads"):
        store.remove_instance("f", "a")
    with pytest.raises(GpufleetError, match="workloads running"):
        store.delete_fleet("f")
    store.finish_run("r1", "done", 0)
    assert store.fleet("f").instances[0].status_text == "0/8 busy"
    assert store.run("r1").status == "done"
    store.delete_fleet("f")
    assert store.fleets() == []


ALLOCATE = """
import sys, time
from gpufleet.allocator import NoCapacity, Request, place
from gpufleet.models import GPUSpec
from gpufleet.state import Store
url, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = Store(url)
req = Request(gpu=GPUSpec.model_validate(1))
while time.time() < start:
    time.sleep(0.001)
try:
    [p] = store.allocate(name, name, "task", {}, "c-" + name, lambda hosts: place(req, hosts))
    print("OK", p.host.alias, p.gpus[0])
except NoCapacity as e:
    print("REFUSED", e)
"""


def test_sixteen_processes_eight_blocks(db_url, tmp_path):
    store = Store(db_url)
    add_host(store, "f", "a", n=4)
    add_host(store, "g", "b", n=4)
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", ALLOCATE, db_url, f"r{i}", str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(16)]
    outs = [p.communicate(timeout=120) for p in procs]
    lines = [o[0].strip() for o in outs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    ok = [line for line in lines if line.startswith("OK")]
    refused = [line for line in lines if line.startswith("REFUSED")]
    assert len(ok) == 8 and len(refused) == 8, lines
    assert len({tuple(line.split()[1:]) for line in ok}) == 8  # no GPU given twice
    assert all("no instance has 1 GPU free: a 0/4 free, b 0/4 free" in line for line in refused)
    with store.engine.connect() as c:
        busy = c.execute(text("SELECT count(*) FROM blocks WHERE run IS NOT NULL")).scalar()
        orphans = c.execute(text("SELECT count(*) FROM blocks WHERE run IS NOT NULL AND run NOT IN "
                                 "(SELECT name FROM runs)")).scalar()
    assert busy == 8 and orphans == 0


def test_schema_versions(db_url):
    store = Store(db_url)
    with store.engine.connect() as c:
        assert migrations.current_revision(c) == migrations.HEAD
        assert migrations.current_version(c) == migrations.LATEST
    # a database at an older revision is upgraded in place, keeping its data
    add_host(store, "f", "a")
    with migrations.migration_connection(store.engine) as c, c.begin():
        command.downgrade(migrations.config(c, metadata), "0004_baseline")
    with store.engine.connect() as c:
        assert migrations.current_version(c) == 4
        assert "events" not in inspect(c).get_table_names()
    again = Store(db_url)
    again.allocate("r", "id", "task", {}, "c", _one_gpu)
    assert again.run("r").nodes[0].alias == "a" and again.run("r").priority == 50
    assert [e.kind for e in again.events(run="r")] == ["submitted", "starting"]
    # a newer database (a revision this gpufleet does not know) is refused, not guessed at
    with again.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    with pytest.raises(GpufleetError, match=rf"at schema revision 0099_from_the_future, newer than this gpufleet "
                                            rf"understands \({migrations.HEAD}\): upgrade gpufleet"):
        Store(db_url)
    # and so are gpufleet's tables without any version
    with again.engine.begin() as c:
        for table in migrations.VERSION_TABLES:
            c.execute(text(f"DROP TABLE {table}"))
    with pytest.raises(GpufleetError, match="gpufleet tables but no schema version"):
        Store(db_url)


def _release_tables(c, version: int) -> None:
    """The tables as the gpufleet of schema ``version`` (1, 4 or 5, in gpufleet_schema) left them: the
    DDL its metadata.create_all() issued (the release before 9be9de7 for version 4; version 1 is that
    without runs.nodes, runs.owner and `changes`; version 5 is version 4 after 9be9de7's step 5)."""
    serial = "SERIAL" if c.dialect.name == "postgresql" else "INTEGER"
    nodes_owner = "nodes TEXT NOT NULL, owner VARCHAR(300) NOT NULL," if version > 1 else ""
    ddl = [
        "CREATE TABLE fleets (name VARCHAR(64) NOT NULL, source TEXT NOT NULL, config TEXT NOT NULL, "
        "created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (name))",
        "CREATE TABLE runs (name VARCHAR(64) NOT NULL, run_id VARCHAR(64) NOT NULL, type VARCHAR(32) NOT NULL, "
        "fleet VARCHAR(64), instance_id INTEGER, alias VARCHAR(300), status VARCHAR(32) NOT NULL, "
        "message TEXT NOT NULL, exit_code INTEGER, gpus TEXT NOT NULL, blocks TEXT NOT NULL, spec TEXT NOT NULL, "
        f"container VARCHAR(128) NOT NULL, {nodes_owner} created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, "
        "PRIMARY KEY (name))",
        f"CREATE TABLE instances (id {serial} NOT NULL, fleet VARCHAR(64) NOT NULL, num INTEGER NOT NULL, "
        "alias VARCHAR(300) NOT NULL, hostname VARCHAR(300) NOT NULL, port INTEGER NOT NULL, "
        "status VARCHAR(32) NOT NULL, reason TEXT NOT NULL, resources TEXT NOT NULL, probe TEXT NOT NULL, "
        "created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (fleet, alias), "
        "UNIQUE (fleet, num), FOREIGN KEY(fleet) REFERENCES fleets (name) ON DELETE CASCADE)",
        "CREATE TABLE blocks (instance_id INTEGER NOT NULL, idx INTEGER NOT NULL, gpus TEXT NOT NULL, "
        "cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, numa_node INTEGER, run VARCHAR(128), "
        "PRIMARY KEY (instance_id, idx), FOREIGN KEY(instance_id) REFERENCES instances (id) ON DELETE CASCADE)",
    ]
    if version >= 4:
        ddl.append("CREATE TABLE changes (seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, instance_id INTEGER NOT NULL)"
                   if serial == "INTEGER" else
                   "CREATE TABLE changes (seq SERIAL NOT NULL, instance_id INTEGER NOT NULL, PRIMARY KEY (seq))")
    if version >= 5:  # step 5 of that release
        ddl += [f"ALTER TABLE runs ADD COLUMN {column}" for column in (
            "priority INTEGER NOT NULL DEFAULT 50", "max_duration FLOAT", "retry TEXT NOT NULL DEFAULT '{}'",
            "started_at FLOAT")]
        ddl.append("CREATE INDEX ix_runs_status ON runs (status)")
    ddl += ["CREATE TABLE gpufleet_schema (id INTEGER NOT NULL, version INTEGER NOT NULL, "
            "description VARCHAR(200) NOT NULL, PRIMARY KEY (id))",
            f"INSERT INTO gpufleet_schema VALUES (1, {version}, 'created')"]
    for statement in ddl:
        c.execute(text(statement))
    if version >= 5:
        for table in ("events", "secrets", "reservations", "server_leases"):
            metadata.tables[table].create(c)  # as that release's step did ...
            for column in TEAMS_COLUMNS.get(table, ()):  # ... which had none of what came since
                c.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))


TEAMS_COLUMNS = {"events": ("project", "actor")}  # what revision 0006 added to version 5's tables


def _release_database(url: str, version: int) -> None:
    """A state database left by the gpufleet of schema ``version``: fleet f with host a (2 GPUs, 2
    blocks), block 0 held by the running run `old`."""
    engine = _engine(url)
    probe = HostFacts(gpus=gpus(2), cpu={"count": 16}, memory_mib=64000).model_dump_json()
    run = dict(name="old", run_id="old-1", type="task", fleet="f", instance_id=1, alias="a", status="running",
               message="", gpus="[]", blocks="[0]", spec="{}", container="gpufleet-old", created_at=1.0,
               updated_at=2.0)
    if version > 1:
        run.update(nodes='[{"rank": 0, "alias": "a", "instance_id": 1, "instance_num": 0, "blocks": [0], '
                         '"gpus": []}]', owner="host:1")
    with engine.begin() as c:
        _release_tables(c, version)
        c.execute(text("INSERT INTO fleets VALUES ('f', 'f.yml', '{}', 1.0, 1.0)"))
        c.execute(text("INSERT INTO instances (id, fleet, num, alias, hostname, port, status, reason, resources, "
                       "probe, created_at, updated_at) VALUES (1, 'f', 0, 'a', 'a', 22, 'ready', '', '2xH100', "
                       ":probe, 1.0, 1.0)"), {"probe": probe})
        c.execute(text("INSERT INTO blocks VALUES (1, 0, '[0]', 8, 32000, 0, 'old'), (1, 1, '[1]', 8, 32000, 0, NULL)"))
        c.execute(text(f"INSERT INTO runs ({', '.join(run)}) VALUES ({', '.join(':' + k for k in run)})"), run)
        if c.dialect.name == "postgresql":  # the row was inserted with its id: move the sequence past it
            c.execute(text("SELECT setval('instances_id_seq', 1)"))
    engine.dispose()


def _schema_diff(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match state.py's tables."""
    engine = _engine(url)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"include_name": migrations.include_name}),
                                metadata)
        if c.dialect.name == "sqlite":  # not compared by Alembic: a seq or event id is never reused
            for table in ("changes", "events"):
                sql = c.execute(text("SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table}).scalar()
                if "AUTOINCREMENT" not in sql:
                    diff.append(("no AUTOINCREMENT", table))
    engine.dispose()
    return diff


@pytest.mark.parametrize("version", [1, 4, 5])
def test_a_database_from_before_alembic_is_brought_over(db_url, version):
    """A state file (or PostgreSQL database) of gpufleet_schema version 1, 4 (the release before the
    queue) or 5: its data survive, it gets the queue's columns and tables, and ends exactly at
    state.py's schema; gpufleet_schema stays, at the schema's version, for an older gpufleet to refuse."""
    _release_database(db_url, version)
    Store(db_url).engine.dispose()
    assert _schema_diff(db_url) == []
    store = Store(db_url)  # this one takes the fast path
    with store.engine.connect() as c:
        assert migrations.current_revision(c) == migrations.HEAD
        assert c.execute(text("SELECT version FROM gpufleet_schema")).scalar() == migrations.LATEST
    [host] = store.fleet("f").instances
    assert (host.alias, host.status_text, host.facts.gpus[1].uuid) == ("a", "1/2 busy", "GPU-1")
    old = store.run("old")
    assert (old.status, old.blocks, old.priority, old.max_duration, old.started_at) == ("running", [0], 50, None, None)
    assert store.retry_policy("old") == {}
    assert [n.alias for n in old.nodes] == (["a"] if version > 1 else [])
    [p] = store.allocate("new", "new-1", "task", {}, "gpufleet-new", _one_gpu)
    assert (p.host.alias, p.blocks) == ("a", (1,))
    assert store.finish_run("old", "done", 0)
    assert [(e.run, e.kind) for e in store.events()] == [("new", "submitted"), ("new", "starting"), ("old", "done")]
    add_host(store, "f", "b")  # a new instance gets the next id, on PostgreSQL too
    assert [i.alias for i in store.fleet("f").instances] == ["a", "b"]


def test_a_database_from_a_newer_gpufleet_before_alembic_is_refused(db_url):
    _release_database(db_url, 4)
    engine = _engine(db_url)
    with engine.begin() as c:
        c.execute(text("UPDATE gpufleet_schema SET version = 6"))  # no gpufleet before Alembic wrote 6
    engine.dispose()
    with pytest.raises(GpufleetError, match=rf"schema version 6, newer than this gpufleet understands "
                                            rf"\({migrations.LATEST}\): upgrade gpufleet"):
        Store(db_url)


def _alembic(engine, name: str, revision: str) -> None:
    """Run Alembic's command ``name`` as gpufleet.migrations does: on its connection, in one transaction."""
    with migrations.migration_connection(engine) as c, c.begin():
        getattr(command, name)(migrations.config(c, metadata), revision)


def test_the_revisions_give_state_py_tables(db_url):
    """Alembic's comparison finds nothing to change between state.py's tables and: a new database
    (made from those tables), one made by the revisions from nothing, and one taken back to the
    baseline and up again."""
    Store(db_url).engine.dispose()
    assert _schema_diff(db_url) == []
    _wipe(db_url)
    engine = _engine(db_url)
    _alembic(engine, "upgrade", "head")
    assert _schema_diff(db_url) == []
    _alembic(engine, "downgrade", "0004_baseline")
    _alembic(engine, "upgrade", "head")
    assert _schema_diff(db_url) == []
    _alembic(engine, "downgrade", "base")
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    store = Store(db_url)  # an emptied database is a new one
    add_host(store, "f", "a")
    assert _schema_diff(db_url) == []


def test_alembic_sees_the_revisions_that_the_file_names_say():
    """upgrade() knows the head from the file names alone (no Alembic on the fast path): they must
    agree with Alembic's own reading of versions/, one straight line from the baseline."""
    scripts = ScriptDirectory.from_config(migrations.config())
    chain = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    assert tuple(chain) == migrations.revisions() and chain[0] == "0004_baseline"
    assert scripts.get_heads() == [migrations.HEAD]
    for script in scripts.walk_revisions():
        assert Path(script.path).name == f"{script.revision}.py"


def test_a_new_revision_is_numbered_after_the_head(tmp_path):
    """`python -m gpufleet.migrations revision "..."` (here in a copy of the scripts)."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPTS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = migrations.new_revision("Add the widgets table!", directory=copy)
    new = f"{migrations.LATEST + 1:04d}_add_the_widgets_table"
    assert path == copy / "versions" / f"{new}.py"
    assert migrations.revisions(copy)[-1] == new
    source = path.read_text()
    assert f"revision = '{new}'" in source and f"down_revision = '{migrations.HEAD}'" in source
    assert source.startswith('"""Add the widgets table!')
    scripts = ScriptDirectory.from_config(migrations.config(directory=copy))  # loads the new file
    assert scripts.get_heads() == [new]


RECREATE_FLEETS = """
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{head}"


def upgrade():
    with op.batch_alter_table("fleets", recreate="always") as fleets:
        fleets.add_column(sa.Column("note", sa.Text, nullable=True))
"""


def test_a_revision_that_recreates_a_table_keeps_the_rows_that_refer_to_it(tmp_path):
    """On SQLite a batch operation copies the table, drops it and renames the copy: with foreign keys
    on, the DROP would delete every instance (ON DELETE CASCADE) and their blocks with them."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = Store(url)
    add_host(store, "f", "a")
    store.allocate("r", "r", "task", {}, "c", _one_gpu)
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPTS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    revision = f"{migrations.LATEST + 1:04d}_recreate_fleets"
    (copy / "versions" / f"{revision}.py").write_text(RECREATE_FLEETS.format(revision=revision, head=migrations.HEAD))
    assert migrations.upgrade(store.engine, metadata, directory=copy) == migrations.LATEST
    with store.engine.connect() as c:
        assert migrations.current_revision(c) == revision
        assert "note" in {col["name"] for col in inspect(c).get_columns("fleets")}
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for the store
    assert store.fleet("f").instances[0].status_text == "1/8 busy"
    assert store.run("r").status == "starting"


def test_the_usual_open_takes_no_lock_and_no_alembic(db_url):
    """Store() runs for every command: on a database at the head it reads alembic_version, without
    waiting for a writer (or a migrator) and without importing Alembic."""
    Store(db_url).engine.dispose()
    engine = _engine(db_url)
    with engine.connect() as c:
        if c.dialect.name == "postgresql":
            c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrations.MIGRATION_LOCK})
        else:
            c.exec_driver_sql("BEGIN IMMEDIATE")  # held by "another writer" while the process opens the store
        code = ("import sys, time; from gpufleet.state import Store; t = time.monotonic(); Store(sys.argv[1]); "
                "print(time.monotonic() - t, 'alembic' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code, db_url], capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[2])
        c.rollback()
    engine.dispose()
    assert out.returncode == 0, out.stderr
    took, alembic = out.stdout.split()
    assert float(took) < 5 and alembic == "False"


def test_bad_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(GpufleetError, match=r"cannot open the state database postgresql\+psycopg://u:\*\*\*@"):
        os.environ["GPUFLEET_DATABASE_URL"] = "postgresql://u:secret@127.0.0.1:1/x"
        try:
            from gpufleet.state import database_url

            Store(database_url())
        finally:
            del os.environ["GPUFLEET_DATABASE_URL"]


def _one_gpu(hosts):
    return place(Request(gpu=GPUSpec.model_validate(1)), hosts)


def test_long_lived_stores_see_each_others_changes(db_url):
    """A Store keeps its view of the blocks between allocations and re-reads only what `changes`
    says moved: another store's allocations, releases, re-probes and removals must all show."""
    a, b = Store(db_url), Store(db_url)
    add_host(a, "f", "x", n=2)
    add_host(a, "f", "y", n=2)
    taken = set()
    for i in range(4):  # alternate stores: each must see the other's allocations
        store = (a, b)[i % 2]
        [p] = store.allocate(f"r{i}", f"r{i}", "task", {}, f"c{i}", _one_gpu)
        taken.add((p.host.alias, p.gpus))
    assert len(taken) == 4
    with pytest.raises(NoCapacity):
        b.allocate("r9", "r9", "task", {}, "c9", _one_gpu)
    a.finish_run("r1", "done", 0)  # b allocated r1; a frees it; b sees the block free again
    [p] = b.allocate("r5", "r5", "task", {}, "c5", _one_gpu)
    assert (p.host.alias, p.gpus) in taken
    for i in (0, 2, 3, 5):
        b.finish_run(f"r{i}", "done", 0)
    # x re-probed with 4 GPUs by a: b's next allocation knows the new layout
    probe = HostFacts(gpus=gpus(4), cpu={"count": 16}, memory_mib=64000)
    a.record_instance("f", "x", "x", 22, "ready", "", "4xH100", probe, split(gpus(4), "auto", 16, 64000))
    [p] = b.allocate("big", "big", "task", {}, "cbig",
                     lambda hosts: place(Request(gpu=GPUSpec.model_validate(4)), hosts))
    assert p.host.alias == "x" and p.gpus == (0, 1, 2, 3)
    b.finish_run("big", "done", 0)
    a.remove_instance("f", "x")
    a.record_instance("f", "y", "y", 22, "unreachable", "Connection refused")
    with pytest.raises(NoCapacity, match="no ready instance"):
        b.allocate("r6", "r6", "task", {}, "c6", _one_gpu)


def test_a_store_behind_the_pruned_changes_reads_everything_again(db_url, monkeypatch):
    from gpufleet import state

    a, b = Store(db_url), Store(db_url)
    add_host(a, "f", "x", n=2)
    b.allocate("r0", "r0", "task", {}, "c0", _one_gpu)  # b's view is now current
    monkeypatch.setattr(state, "KEEP_CHANGES", 0)
    monkeypatch.setattr(state, "PRUNE_EVERY", 1)
    a.finish_run("r0", "done", 0)
    a.allocate("r1", "r1", "task", {}, "c1", _one_gpu)
    a.allocate("r2", "r2", "task", {}, "c2", _one_gpu)
    add_host(a, "f", "z", n=2)  # prunes every change but its own
    with a.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM changes")).scalar() == 1
    [p] = b.allocate("r3", "r3", "task", {}, "c3", _one_gpu)
    assert p.host.alias == "z"  # x is full: b did not keep its stale view of x


def test_allocations_alone_keep_the_changes_table_bounded(db_url, monkeypatch):
    """A fleet applied once and then only used (allocations and releases, no re-probe) must not
    grow `changes` without end: every writer prunes it, not only a probe."""
    from gpufleet import state

    monkeypatch.setattr(state, "KEEP_CHANGES", 5)
    monkeypatch.setattr(state, "PRUNE_EVERY", 3)
    a, b = Store(db_url), Store(db_url)
    add_host(a, "f", "x", n=2)
    for i in range(30):
        store = (a, b)[i % 2]
        store.allocate(f"r{i}", f"r{i}", "task", {}, f"c{i}", _one_gpu)
        store.finish_run(f"r{i}", "done", 0)
    with a.engine.connect() as c:
        left = c.execute(text("SELECT count(*) FROM changes")).scalar()
        top = c.execute(text("SELECT max(seq) FROM changes")).scalar()
    assert top == 61  # the probe, then an allocation and a release each
    assert left <= 5 + 3
    [p1] = a.allocate("last", "last", "task", {}, "clast", _one_gpu)
    [p2] = b.allocate("last2", "last2", "task", {}, "clast2", _one_gpu)
    assert {p1.gpus, p2.gpus} == {(0,), (1,)}
    with pytest.raises(NoCapacity):
        a.allocate("none", "none", "task", {}, "cnone", _one_gpu)


def _open_and_write(url: str, name: str, start: float, results) -> None:
    while time.time() < start:
        time.sleep(0.0005)
    try:
        Store(url).save_fleet(name, "f.yml", {})
        results.put("OK")
    except Exception as e:  # noqa: BLE001 - the test shows what went wrong
        results.put(repr(e))


def test_processes_opening_a_new_database_at_once(tmp_path):
    """Several `gpufleet apply` run at once on a fresh machine all create the SQLite file, switch
    it to WAL and migrate it: none may fail with "database is locked". (SQLite refuses the WAL
    switch at once, without its busy timeout, to a process that lost the race: CI hit it.) Forked
    processes start within a millisecond of each other; 20 rounds made it fail in about half of
    them before the retry."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        url = f"sqlite:///{tmp_path / f'state{round_}.db'}"
        results = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_open_and_write, args=(url, f"f{i}", start, results)) for i in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["OK"] * 4, f"round {round_}: {got}"
        assert sorted(v.name for v in Store(url).fleets()) == ["f0", "f1", "f2", "f3"]


@pytest.mark.parametrize("start", [0, 4])
def test_processes_migrating_a_database_at_once(db_url, start):
    """Four processes open at once a database that needs migrating, new (0) or from gpufleet_schema
    version 4: one migrates (under PostgreSQL's advisory lock, or SQLite's write lock) and the
    others, once it is done, find it at the head; none fails."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        _wipe(db_url)
        if start:
            _release_database(db_url, start)
        results = ctx.Queue()
        begin = time.time() + 0.3
        procs = [ctx.Process(target=_open_and_write, args=(db_url, f"f{i}", begin, results)) for i in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert got == ["OK"] * 4, f"round {round_}: {got}"
        store = Store(db_url)
        assert sorted(v.name for v in store.fleets()) == (["f"] if start else []) + ["f0", "f1", "f2", "f3"]
        store.engine.dispose()


def test_a_fleets_env_is_read_from_state_even_when_its_key_files_are_gone(tmp_path, monkeypatch):
    """A run reads its fleet's env from the config stored at apply time; files that config named
    (identity files) may be gone since: that is for the fleet's next apply, not a traceback now."""
    from gpufleet.launch import fleet_config_env

    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.save_fleet("f", "f.yml", {"type": "fleet", "name": "f", "env": ["A=1", "TOKEN"],
                                    "ssh_config": {"identity_file": str(tmp_path / "gone"), "hosts": ["h"]}})
    # the secret's value is what `gpufleet apply` of the fleet sent (the server keeps it sealed)
    assert fleet_config_env(store, "f", {"TOKEN": "s3cret", "OTHER": "x"}) == ({"A": "1"}, {"TOKEN": "s3cret"})
    with pytest.raises(GpufleetError, match="fleet f: secret TOKEN has no value: export it and apply the fleet"):
        fleet_config_env(store, "f", {})


def test_withheld_gpus_are_not_allocated_and_come_back(db_url):
    """A GPU held by a process outside gpufleet, or faulty, keeps its block from new runs (seen by
    another long-lived store too), with events; released, it is allocated again."""
    a, b = Store(db_url), Store(db_url)
    add_host(a, "f", "x", n=2)  # blocks of one GPU each
    b.slots_snapshot()  # b has a view before the change
    messages = a.withhold("f", "x", {("nvidia", 0): ("outside", "pid 4242 (/usr/bin/python3, 30 GiB) in no run")})
    assert messages == ["GPU 0 on x is used outside gpufleet: pid 4242 (/usr/bin/python3, 30 GiB) in no run; "
                        "no new run is placed on it until it is free again"]
    assert a.withhold("f", "x", {("nvidia", 0): ("outside", "pid 4242 (/usr/bin/python3, 30 GiB) in no run")}) == []
    [p] = b.allocate("r1", "r1", "task", {}, "c1", _one_gpu)
    assert p.gpus == (1,)
    assert b.fleet("f").instances[0].status_text == ("1/2 busy; GPU 0 used outside gpufleet: pid 4242 "
                                                     "(/usr/bin/python3, 30 GiB) in no run")
    with pytest.raises(NoCapacity):
        b.allocate("r2", "r2", "task", {}, "c2", _one_gpu)
    assert a.withheld() == {("f", "x"): {("nvidia", 0): ("outside", "pid 4242 (/usr/bin/python3, 30 GiB) in no run",
                                                         pytest.approx(time.time(), abs=60))}}
    # the same GPU turns faulty: one event; then healthy and free: released, allocatable again
    assert a.withhold("f", "x", {("nvidia", 0): ("unhealthy", "2 uncorrected ECC errors")})[0].startswith(
        "GPU 0 on x is unhealthy: 2 uncorrected ECC errors")
    assert a.withhold("f", "x", {}) == ["GPU 0 on x is healthy again"]
    [p] = b.allocate("r2", "r2", "task", {}, "c2", _one_gpu)
    assert p.gpus == (0,)
    kinds = [e.kind for e in a.events() if e.kind.startswith("gpu-")]
    assert kinds == ["gpu-withheld", "gpu-withheld", "gpu-released"]
    assert a.withheld() == {}
    assert a.withhold("f", "nohost", {("nvidia", 0): ("outside", "x")}) == []

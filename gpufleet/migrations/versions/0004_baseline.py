"""The baseline: the schema gpufleet_schema called version 4, the last one before Alembic

fleets; instances, numbered per fleet; blocks, a host's GPU blocks and the run holding each; runs,
with the per-node placement (nodes) and the process that started them (owner); changes, which
instances each transaction touched.

gpufleet never runs this upgrade on a database of its own: a new one is created from state.py's
tables and stamped at the head, and one from before Alembic is brought to version 4 by the old
steps (legacy.py) and stamped here. It is the start of an upgrade from nothing, which the tests run
to check that the revisions give state.py's tables.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name", ondelete="CASCADE"), nullable=False),
        sa.Column("num", sa.Integer, nullable=False),
        sa.Column("alias", sa.String(300), nullable=False),
        sa.Column("hostname", sa.String(300), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("resources", sa.Text, nullable=False),
        sa.Column("probe", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("fleet", "alias"),
        sa.UniqueConstraint("fleet", "num"),
    )
    op.create_table(
        "blocks",
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("gpus", sa.Text, nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("numa_node", sa.Integer, nullable=True),
        sa.Column("run", sa.String(128), nullable=True),
    )
    op.create_table(
        "runs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("fleet", sa.String(64), nullable=True),
        sa.Column("instance_id", sa.Integer, nullable=True),
        sa.Column("alias", sa.String(300), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("gpus", sa.Text, nullable=False),
        sa.Column("blocks", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("container", sa.String(128), nullable=False),
        sa.Column("nodes", sa.Text, nullable=False),
        sa.Column("owner", sa.String(300), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.Integer, nullable=False),
        sqlite_autoincrement=True,  # a seq is never reused
    )


def downgrade() -> None:
    for table in ("changes", "runs", "blocks", "instances", "fleets"):
        op.drop_table(table)

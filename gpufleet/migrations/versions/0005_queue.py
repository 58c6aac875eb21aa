"""The server's queue: runs.priority/max_duration/retry/started_at, events, secrets, reservations, server_leases

What gpufleet_schema called version 5: a database at that version is stamped here.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_queue"
down_revision = "0004_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the NOT NULL columns get a server default for the rows already there (as version 5's step did)
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="50"))
        runs.add_column(sa.Column("max_duration", sa.Float, nullable=True))
        runs.add_column(sa.Column("retry", sa.Text, nullable=False, server_default="{}"))
        runs.add_column(sa.Column("started_at", sa.Float, nullable=True))
        runs.create_index("ix_runs_status", ["status"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("run", sa.String(64), nullable=True),
        sa.Column("fleet", sa.String(64), nullable=True),
        sa.Column("host", sa.String(300), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Index("ix_events_run", "run", "id"),
        sqlite_autoincrement=True,  # an id is never reused: `events -f` reads "after id N"
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run", sa.String(64), sa.ForeignKey("runs.name", ondelete="CASCADE"), nullable=True, unique=True),
        sa.Column("fleet", sa.String(64), sa.ForeignKey("fleets.name", ondelete="CASCADE"), nullable=True,
                  unique=True),
        sa.Column("sealed", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "reservations",
        sa.Column("run", sa.String(64), sa.ForeignKey("runs.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("at", sa.Float, nullable=True),
        sa.Column("blocks", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "server_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(300), nullable=False),
        sa.Column("url", sa.String(300), nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("server_leases", "reservations", "secrets", "events"):
        op.drop_table(table)
    with op.batch_alter_table("runs") as runs:
        runs.drop_index("ix_runs_status")
        for column in ("started_at", "retry", "max_duration", "priority"):
            runs.drop_column(column)

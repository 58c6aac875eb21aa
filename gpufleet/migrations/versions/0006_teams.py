"""Teams: users, projects, members, quotas, usage; the project of fleets, runs and events, a run's
user, an event's actor

Everything made before projects belongs to the project `default` (made by the server's first start
with its bootstrap admin); runs from then have no user.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_teams"
down_revision = "0005_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fleets") as fleets:
        fleets.add_column(sa.Column("project", sa.String(64), nullable=False, server_default="default"))
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("project", sa.String(64), nullable=False, server_default="default"))
        runs.add_column(sa.Column("user", sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("events") as events:
        events.add_column(sa.Column("project", sa.String(64), nullable=True))
        events.add_column(sa.Column("actor", sa.String(64), nullable=True))
    op.create_table(
        "users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "projects",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "members",
        sa.Column("project", sa.String(64), sa.ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("user", sa.String(64), sa.ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_table(
        "quotas",
        sa.Column("project", sa.String(64), sa.ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("user", sa.String(64), primary_key=True),
        sa.Column("gpu", sa.String(64), primary_key=True),
        sa.Column("gpus", sa.Integer, nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run", sa.String(64), nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("gpu", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Index("ix_usage_ended", "ended_at"),
    )


def downgrade() -> None:
    for table in ("usage", "quotas", "members", "projects", "users"):
        op.drop_table(table)
    with op.batch_alter_table("events") as events:
        events.drop_column("actor")
        events.drop_column("project")
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("user")
        runs.drop_column("project")
    with op.batch_alter_table("fleets") as fleets:
        fleets.drop_column("project")

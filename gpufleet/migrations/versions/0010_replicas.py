"""A service's replicas: runs of their own that name their service

`runs.replica_of`: a replica's service (its run's name); `runs.replicas`: on a service's own run,
how many replicas it wants now (set at submission, changed by its autoscaling). `service_requests`:
the requests each server process carried to each service (its autoscaling's request rate).
`runs.replica_group`: a replica's group (dstack's replica groups); `runs.group_replicas`: on a service
with groups, how many replicas each group wants now (JSON).
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_replicas"
down_revision = "0009_withheld"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("replica_of", sa.String(64), nullable=True))
        batch.add_column(sa.Column("replicas", sa.Integer, nullable=True))
        batch.add_column(sa.Column("replica_group", sa.String(64), nullable=True))
        batch.add_column(sa.Column("group_replicas", sa.Text, nullable=True))
    op.create_table(
        "service_requests",
        sa.Column("service", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(300), primary_key=True),
        sa.Column("bucket", sa.Integer, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_requests")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("group_replicas")
        batch.drop_column("replica_group")
        batch.drop_column("replicas")
        batch.drop_column("replica_of")

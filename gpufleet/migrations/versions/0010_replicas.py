"""A service's replicas: runs of their own that name their service

`runs.replica_of`: a replica's service (its run's name); `runs.replicas`: on a service's own run,
how many replicas it wants now (set at submission, changed by its autoscaling).
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


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("replicas")
        batch.drop_column("replica_of")

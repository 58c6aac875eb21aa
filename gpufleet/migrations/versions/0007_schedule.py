"""Scheduled runs (dstack's `schedule`): a run's next start

`runs.next_at`: when a scheduled run starts next (while it waits) or started last (while it runs);
NULL for a run without a schedule, and once a user stopped it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_schedule"
down_revision = "0006_teams"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("next_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("next_at")

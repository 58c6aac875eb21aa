"""GPUs kept from new runs (a process outside gpufleet holds one, or it reports a hardware fault)

`withheld_gpus`: one row per such GPU, written by the server's metrics loop; the allocator counts a
block holding one as busy.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_withheld"
down_revision = "0008_metrics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "withheld_gpus",
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("vendor", sa.String(16), primary_key=True),
        sa.Column("gpu", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("withheld_gpus")

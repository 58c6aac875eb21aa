"""Metrics: GPU and container samples (raw and 1-minute means), and each host's latest sample

gpu_samples and container_samples: a row per GPU (per run container) per sample, `res` 0 (raw) or
60 (the mean of a minute), each naming the run that held the GPU when it was taken;
latest_samples: each host's latest HostSample, whole (JSON). See gpufleet.metrics.store.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_metrics"
down_revision = "0007_schedule"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gpu_samples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("res", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("host", sa.String(300), nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("uuid", sa.String(128), nullable=True),
        sa.Column("utilization", sa.Float, nullable=True),
        sa.Column("memory_used_mib", sa.Integer, nullable=True),
        sa.Column("memory_total_mib", sa.Integer, nullable=True),
        sa.Column("temperature_c", sa.Float, nullable=True),
        sa.Column("power_w", sa.Float, nullable=True),
        sa.Column("run", sa.String(64), nullable=True),
    )
    op.create_index("ix_gpu_samples_run", "gpu_samples", ["run", "res", "at"])
    op.create_index("ix_gpu_samples_res_at", "gpu_samples", ["res", "at"])
    op.create_table(
        "container_samples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("res", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("fleet", sa.String(64), nullable=False),
        sa.Column("host", sa.String(300), nullable=False),
        sa.Column("run", sa.String(64), nullable=False),
        sa.Column("cpu_percent", sa.Float, nullable=True),
        sa.Column("memory_bytes", sa.BigInteger, nullable=True),
        sa.Column("memory_limit_bytes", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_container_samples_run", "container_samples", ["run", "res", "at"])
    op.create_index("ix_container_samples_res_at", "container_samples", ["res", "at"])
    op.create_table(
        "latest_samples",
        sa.Column("fleet", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(300), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("sample", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("latest_samples")
    op.drop_index("ix_container_samples_res_at", "container_samples")
    op.drop_index("ix_container_samples_run", "container_samples")
    op.drop_table("container_samples")
    op.drop_index("ix_gpu_samples_res_at", "gpu_samples")
    op.drop_index("ix_gpu_samples_run", "gpu_samples")
    op.drop_table("gpu_samples")

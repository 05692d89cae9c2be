"""Fair sharing of the GPUs between batches, and the point where a job stops needing one.

``batches.priority``, ``weight``, ``max_concurrent`` and ``tenant`` are how a studio shares the
farm (``db.fair_share``): dispatch serves the highest priority first and splits the GPUs
between batches of one priority in proportion to their weights, never giving a batch more than
its ``max_concurrent``. ``batches.output_dir`` is the folder the submit asked the videos for, so
a job dispatched later, by another process, still publishes there. ``jobs.rendered_at`` is when
the job's last segment was recorded and its GPU slot given back: from then on it no longer counts
against the GPUs. ``leases.gpu_wanted_at`` is since when a render has been asking for a slot: a
free slot goes to the waiter fair sharing picks, not to whichever asks first.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("max_concurrent", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tenant", sa.String(200), nullable=True))
        batch.add_column(sa.Column("output_dir", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rendered_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("gpu_wanted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("gpu_wanted_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("rendered_at")
    with op.batch_alter_table("batches") as batch:
        for column in ("output_dir", "tenant", "max_concurrent", "weight", "priority"):
            batch.drop_column(column)

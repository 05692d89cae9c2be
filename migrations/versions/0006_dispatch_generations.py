"""Dispatch generations: which render run a job was last given, so a dead one is replaced.

``jobs.dispatch_generation`` is bumped by every dispatch of the job (compare-and-set, so two
sweeps never dispatch one job twice); the render run's idempotency key carries it, so a run
that died is never handed back again. ``jobs.flow_run_id`` is the Prefect flow run of the
latest dispatch (None inline) and ``jobs.dispatched_at`` when it was made: the sweep asks
Prefect about that run to tell a job that waits for a worker from one whose run is gone.
``batches.submit_run_id`` is the submit-batch deployment run that last submitted the batch: a
Cancel of it in the UI cancels the batch's jobs, re-dispatched ones included.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("dispatch_generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("flow_run_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("submit_run_id", sa.String(36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("submit_run_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatched_at")
        batch.drop_column("flow_run_id")
        batch.drop_column("dispatch_generation")

"""GPU slots live in the job database: a limit row, and the slot on the holder's job lease.

A Prefect global-concurrency lease lived in the memory of the Prefect server that granted it,
so a render killed together with its ephemeral server (or a restarted production server) left
the slot counted forever. A slot is now a mark on the holder's job lease, which expires with
it and is cleared when the lease is taken over.

``leases.gpu_slot`` (the Prefect lease id) is no longer written but stays for now, so renders
of the previous release still running during an upgrade keep working; a later revision drops
it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "gpu_limits",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_gpu_limits")),
    )
    with op.batch_alter_table("leases") as batch:
        batch.add_column(sa.Column("gpu_since", UTC_TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("progress_at", UTC_TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("progress_at")
        batch.drop_column("gpu_since")
    op.drop_table("gpu_limits")

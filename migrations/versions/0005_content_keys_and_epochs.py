"""Checkpoint integrity: input and weights hashes on jobs, lease epochs (fencing tokens).

``jobs.image_sha256`` / ``audio_sha256`` record the bytes a job renders (its id is derived
from them); ``jobs.weights_sha256`` pins the bundle it renders with. ``jobs.lease_epoch`` is
incremented by every lease acquisition (the current holder's is the job's), and
``segments.epoch`` is the epoch of the render that recorded the segment. Rows made before
this revision have no hashes (they render with the configured bundle, as before) and epoch 0.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("image_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("audio_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("weights_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_epoch", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("epoch", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("epoch")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_epoch")
        batch.drop_column("weights_sha256")
        batch.drop_column("audio_sha256")
        batch.drop_column("image_sha256")

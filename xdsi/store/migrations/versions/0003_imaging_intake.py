"""Revision 0003: the Imaging Document Source's intake and manifest lifecycle.

Adds the entryUUID and status of each published manifest, so that a
replacement can name its target (RAD TF-3 4.68.4.1.2.3), and the table of
studies taken in by C-STORE, STOW-RS or import.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("imaging_manifest") as batch:
        batch.add_column(
            sa.Column(
                "entry_uuid", sa.String(length=64), nullable=False, server_default=""
            )
        )
        batch.add_column(
            sa.Column(
                "status", sa.String(length=16), nullable=False, server_default="current"
            )
        )
    op.create_table(
        "imaging_study",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=False),
        sa.Column("changed_at", sa.Float(), nullable=False),
        sa.Column("dirty", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid"),
    )


def downgrade() -> None:
    op.drop_table("imaging_study")
    with op.batch_alter_table("imaging_manifest") as batch:
        batch.drop_column("status")
        batch.drop_column("entry_uuid")

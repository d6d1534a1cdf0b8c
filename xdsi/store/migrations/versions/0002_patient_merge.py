"""Revision 0002: the Document Registry remembers ITI-8 merges and updates.

Adds registry_patient.merged_into (the surviving patient of an A40, ITI TF-2
3.8.4.2.3) with its index, and registry_patient.updated_at (the last A08).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("registry_patient") as batch:
        batch.add_column(sa.Column("merged_into", sa.String(length=256), nullable=True))
        batch.add_column(
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.create_index(
            "ix_registry_patient_merged_into", ["merged_into"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("registry_patient") as batch:
        batch.drop_index("ix_registry_patient_merged_into")
        batch.drop_column("updated_at")
        batch.drop_column("merged_into")

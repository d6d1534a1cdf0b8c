"""Revision 0005: when a study's publication was claimed.

Adds imaging_study.claimed_at and claimed_by, set while a publisher works
on the study, so that a publication cut short by a killed process is taken
up again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("imaging_study") as batch:
        batch.add_column(sa.Column("claimed_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
        batch.create_index("ix_imaging_study_claimed", ["claimed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("imaging_study") as batch:
        batch.drop_index("ix_imaging_study_claimed")
        batch.drop_column("claimed_by")
        batch.drop_column("claimed_at")

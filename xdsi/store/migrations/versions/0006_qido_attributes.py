"""Revision 0006: the QIDO-RS attributes of each imaging instance.

Adds imaging_instance.attributes (DICOM JSON of the attributes of DICOM
PS3.18 Tables 10.6.3-3 to 10.6.3-5) and indexed columns for the
attributes queries match on most, so that QIDO-RS (DICOM PS3.18 10.6) is
answered from the database. Rows already held keep NULL attributes here:
the migration knows the database alone, not where the instance files are
(the node's storage settings), and reading every header would hold the
start-up for as long. The Imaging Document Source fills them in before it
answers its first query (ImagingSource.index_attributes).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

COLUMNS = (
    "dicom_patient_id",
    "accession_number",
    "study_date",
    "study_time",
    "modality",
    "patient_name",
)
# Compared by code point on PostgreSQL too: the "C" collation.
INDEXED_VALUE = sa.String(length=256).with_variant(
    sa.String(length=256, collation="C"), "postgresql"
)


def upgrade() -> None:
    with op.batch_alter_table("imaging_instance") as batch:
        batch.add_column(sa.Column("attributes", sa.Text(), nullable=True))
        for name in COLUMNS:
            batch.add_column(sa.Column(name, INDEXED_VALUE, nullable=True))
        batch.create_index(
            "ix_imaging_instance_patient", ["dicom_patient_id"], unique=False
        )
        batch.create_index(
            "ix_imaging_instance_accession", ["accession_number"], unique=False
        )
        batch.create_index(
            "ix_imaging_instance_study_date", ["study_date"], unique=False
        )
        batch.create_index(
            "ix_imaging_instance_modality",
            ["modality", "study_instance_uid"],
            unique=False,
        )
        batch.create_index(
            "ix_imaging_instance_patient_name", ["patient_name"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("imaging_instance") as batch:
        for index in (
            "ix_imaging_instance_patient_name",
            "ix_imaging_instance_modality",
            "ix_imaging_instance_study_date",
            "ix_imaging_instance_accession",
            "ix_imaging_instance_patient",
        ):
            batch.drop_index(index)
        for name in reversed(COLUMNS):
            batch.drop_column(name)
        batch.drop_column("attributes")

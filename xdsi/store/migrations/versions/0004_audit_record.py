"""Revision 0004: the Audit Record Repository's tables.

Creates audit_record, one row per syslog message received (ITI TF-2 3.20),
and audit_patient, the patients each names.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "audit_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("transport", sa.String(length=8), nullable=False),
        sa.Column("peer", sa.String(length=256), nullable=False),
        sa.Column("valid", sa.Boolean(), nullable=False),
        sa.Column("error", sa.String(length=512), nullable=True),
        sa.Column("app_name", sa.String(length=48), nullable=True),
        sa.Column("msgid", sa.String(length=32), nullable=True),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("event_id", sa.String(length=64), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=True),
        sa.Column("event_action", sa.String(length=1), nullable=True),
        sa.Column("outcome", sa.Integer(), nullable=True),
        sa.Column("audit_source_id", sa.String(length=256), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("xml", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_audit_record_event_time", "audit_record", ["event_time"], unique=False
    )
    op.create_index(
        "ix_audit_record_received_at", "audit_record", ["received_at"], unique=False
    )
    op.create_table(
        "audit_patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(["record_id"], ["audit_record.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_audit_patient_lookup", "audit_patient", ["patient_id"], unique=False
    )
    op.create_index(
        "ix_audit_patient_record", "audit_patient", ["record_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_audit_patient_record", table_name="audit_patient")
    op.drop_index("ix_audit_patient_lookup", table_name="audit_patient")
    op.drop_table("audit_patient")
    op.drop_index("ix_audit_record_received_at", table_name="audit_record")
    op.drop_index("ix_audit_record_event_time", table_name="audit_record")
    op.drop_table("audit_record")

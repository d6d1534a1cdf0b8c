"""Revision 0001: the first schema of every actor's tables.

Creates the tables of the Document Registry, the Document Repository and the
Imaging Document Source.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "imaging_instance",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=True),
        sa.Column("blob", sa.String(length=512), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("sop_instance_uid"),
    )
    op.create_index(
        "ix_imaging_instance_study",
        "imaging_instance",
        ["study_instance_uid", "series_instance_uid"],
        unique=False,
    )
    op.create_table(
        "imaging_manifest",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("submission_set_unique_id", sa.String(length=128), nullable=False),
        sa.Column("blob", sa.String(length=512), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("sop_instance_uid"),
    )
    op.create_index(
        "ix_imaging_manifest_study",
        "imaging_manifest",
        ["study_instance_uid"],
        unique=False,
    )
    op.create_table(
        "registry_object",
        sa.Column("entry_uuid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("unique_id", sa.String(length=256), nullable=True),
        sa.Column("patient_id", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=80), nullable=False),
        sa.Column("object_type", sa.String(length=80), nullable=True),
        sa.Column("mime_type", sa.String(length=128), nullable=True),
        sa.Column("logical_id", sa.String(length=64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=40), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("repository_unique_id", sa.String(length=64), nullable=True),
        sa.Column("creation_time", sa.String(length=14), nullable=True),
        sa.Column("service_start_time", sa.String(length=14), nullable=True),
        sa.Column("service_stop_time", sa.String(length=14), nullable=True),
        sa.Column("submission_time", sa.String(length=14), nullable=True),
        sa.Column("last_update_time", sa.String(length=14), nullable=True),
        sa.Column("source_id", sa.String(length=64), nullable=True),
        sa.Column("resubmission", sa.String(length=64), nullable=False),
        sa.Column("association_type", sa.String(length=128), nullable=True),
        sa.Column("source_object", sa.String(length=64), nullable=True),
        sa.Column("target_object", sa.String(length=64), nullable=True),
        sa.Column("xml", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("entry_uuid"),
    )
    op.create_index(
        "ix_registry_object_patient",
        "registry_object",
        ["patient_id", "kind", "status"],
        unique=False,
    )
    op.create_index(
        "ix_registry_object_source", "registry_object", ["source_object"], unique=False
    )
    op.create_index(
        "ix_registry_object_source_id", "registry_object", ["source_id"], unique=False
    )
    op.create_index(
        "ix_registry_object_target", "registry_object", ["target_object"], unique=False
    )
    op.create_index(
        "ux_registry_object_unique_id",
        "registry_object",
        ["kind", "unique_id", "version", "resubmission"],
        unique=True,
    )
    op.create_table(
        "registry_patient",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("patient_id"),
    )
    op.create_table(
        "repository_document",
        sa.Column("unique_id", sa.String(length=256), nullable=False),
        sa.Column("mime_type", sa.String(length=128), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha1", sa.String(length=40), nullable=False),
        sa.Column("patient_id", sa.String(length=256), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("blob", sa.String(length=512), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("unique_id"),
    )
    op.create_table(
        "registry_code",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entry_uuid", sa.String(length=64), nullable=False),
        sa.Column("attribute", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=256), nullable=False),
        sa.Column("scheme", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_uuid"],
            ["registry_object.entry_uuid"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_registry_code_entry", "registry_code", ["entry_uuid"], unique=False
    )
    op.create_index(
        "ix_registry_code_lookup",
        "registry_code",
        ["attribute", "code", "scheme"],
        unique=False,
    )
    op.create_table(
        "registry_value",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entry_uuid", sa.String(length=64), nullable=False),
        sa.Column("attribute", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_uuid"],
            ["registry_object.entry_uuid"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_registry_value_entry", "registry_value", ["entry_uuid"], unique=False
    )
    op.create_index(
        "ix_registry_value_lookup",
        "registry_value",
        ["attribute", "value"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_registry_value_lookup", table_name="registry_value")
    op.drop_index("ix_registry_value_entry", table_name="registry_value")
    op.drop_table("registry_value")
    op.drop_index("ix_registry_code_lookup", table_name="registry_code")
    op.drop_index("ix_registry_code_entry", table_name="registry_code")
    op.drop_table("registry_code")
    op.drop_table("repository_document")
    op.drop_table("registry_patient")
    op.drop_index("ux_registry_object_unique_id", table_name="registry_object")
    op.drop_index("ix_registry_object_target", table_name="registry_object")
    op.drop_index("ix_registry_object_source_id", table_name="registry_object")
    op.drop_index("ix_registry_object_source", table_name="registry_object")
    op.drop_index("ix_registry_object_patient", table_name="registry_object")
    op.drop_table("registry_object")
    op.drop_index("ix_imaging_manifest_study", table_name="imaging_manifest")
    op.drop_table("imaging_manifest")
    op.drop_index("ix_imaging_instance_study", table_name="imaging_instance")
    op.drop_table("imaging_instance")

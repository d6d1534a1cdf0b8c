"""Database schema of every actor, and engine creation (SQLite or PostgreSQL).

The Document Registry keeps each submitted ebRIM object as submitted, plus
indexed columns and child tables for the stored-query parameters (DESIGN.md,
"store what was submitted, index what is queried"). The Document Repository
and the Imaging Document Source index the files they hold. The Audit Record
Repository keeps each audit message as received, indexed for its queries.
Each actor owns its tables; no actor reads another's.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import DisconnectionError

metadata = MetaData()

# --- Document Registry --------------------------------------------------

patient = Table(
    "registry_patient",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(256), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    # The surviving patient id once an ITI-8 A40 subsumed this one (ITI TF-2
    # 3.8.4.2.3); a subsumed patient takes no submission.
    Column("merged_into", String(256)),
    # When an ITI-8 A08 last updated the patient (ITI TF-2 3.8.4.1.1).
    Column("updated_at", DateTime(timezone=True)),
    Index("ix_registry_patient_merged_into", "merged_into"),
)

registry_object = Table(
    "registry_object",
    metadata,
    Column("entry_uuid", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("unique_id", String(256)),
    Column("patient_id", String(256)),
    Column("status", String(80), nullable=False),
    Column("object_type", String(80)),
    Column("mime_type", String(128)),
    Column("logical_id", String(64)),
    Column("version", Integer, nullable=False, default=1),
    Column("hash", String(40)),
    Column("size", BigInteger),
    Column("repository_unique_id", String(64)),
    # DTM values padded to 14 digits, so that ranges compare as strings.
    Column("creation_time", String(14)),
    Column("service_start_time", String(14)),
    Column("service_stop_time", String(14)),
    Column("submission_time", String(14)),
    # Folder lastUpdateTime, set by the Document Registry (ITI TF-3 4.2.3.4).
    Column("last_update_time", String(14)),
    # SubmissionSet sourceId (ITI TF-3 4.2.3.3).
    Column("source_id", String(64)),
    # Empty for the first registration of a uniqueId; the object's own
    # entryUUID when the same document (same hash) is registered again, which
    # ITI TF-3 Table 4.2.4.1-2 allows (only another hash is
    # XDSNonIdenticalHash).
    Column("resubmission", String(64), nullable=False, default=""),
    Column("association_type", String(128)),
    Column("source_object", String(64)),
    Column("target_object", String(64)),
    Column("xml", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    Index("ix_registry_object_patient", "patient_id", "kind", "status"),
    # ITI TF-3 4.2.3.2.26: a uniqueId names one object of its kind; the
    # index also settles two submissions racing for the same uniqueId.
    Index(
        "ux_registry_object_unique_id",
        "kind",
        "unique_id",
        "version",
        "resubmission",
        unique=True,
    ),
    Index("ix_registry_object_source", "source_object"),
    Index("ix_registry_object_target", "target_object"),
    Index("ix_registry_object_source_id", "source_id"),
)

# Coded attributes (classCode, eventCodeList, ...), one row per value.
registry_code = Table(
    "registry_code",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "entry_uuid",
        String(64),
        ForeignKey("registry_object.entry_uuid"),
        nullable=False,
    ),
    Column("attribute", String(64), nullable=False),
    Column("code", String(256), nullable=False),
    Column("scheme", String(256), nullable=False),
    Index("ix_registry_code_lookup", "attribute", "code", "scheme"),
    Index("ix_registry_code_entry", "entry_uuid"),
)

# Other multi-valued query attributes (authorPerson, referenceIdList).
registry_value = Table(
    "registry_value",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "entry_uuid",
        String(64),
        ForeignKey("registry_object.entry_uuid"),
        nullable=False,
    ),
    Column("attribute", String(64), nullable=False),
    Column("value", String(512), nullable=False),
    Index("ix_registry_value_lookup", "attribute", "value"),
    Index("ix_registry_value_entry", "entry_uuid"),
)

# --- Document Repository -------------------------------------------------

repository_document = Table(
    "repository_document",
    metadata,
    Column("unique_id", String(256), primary_key=True),
    Column("mime_type", String(128), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha1", String(40), nullable=False),
    # The DocumentEntry's patientId, for the ITI-43 audit record.
    Column("patient_id", String(256)),
    # "pending" from storing until the registry accepted the submission,
    # then "stored"; only stored documents are retrieved.
    Column("state", String(16), nullable=False, default="pending"),
    Column("blob", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
)

# --- Imaging Document Source ---------------------------------------------

# An attribute value an index column holds, compared by code point as
# QIDO-RS matching compares it (DICOM PS3.4 C.2.2.2): PostgreSQL compares in
# the database's collation unless the column's is "C"; SQLite's default
# (BINARY) compares UTF-8 bytes, which is code point order.
INDEXED_VALUE = String(256).with_variant(String(256, collation="C"), "postgresql")

imaging_instance = Table(
    "imaging_instance",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    # The affinity-domain patient id it was published under (RAD-69 audit).
    Column("patient_id", String(256)),
    Column("blob", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    # The QIDO-RS attributes of its header (xdsi.dicom.qido) as DICOM JSON
    # (DICOM PS3.18 F.2); NULL for an instance stored before they were kept,
    # until the Imaging Document Source reads its header once.
    Column("attributes", Text),
    # The attributes queries match on most (QIDO_COLUMNS), each the value
    # of ``attributes`` as text, "" when absent; NULL where no column can
    # match exactly (several values, or a value too long to index).
    Column("dicom_patient_id", INDEXED_VALUE),
    Column("accession_number", INDEXED_VALUE),
    Column("study_date", INDEXED_VALUE),
    Column("study_time", INDEXED_VALUE),
    Column("modality", INDEXED_VALUE),
    # Patient Name as text, case-folded (str.casefold), as PN matching
    # compares it.
    Column("patient_name", INDEXED_VALUE),
    Index("ix_imaging_instance_study", "study_instance_uid", "series_instance_uid"),
    Index("ix_imaging_instance_patient", "dicom_patient_id"),
    Index("ix_imaging_instance_accession", "accession_number"),
    Index("ix_imaging_instance_study_date", "study_date"),
    Index("ix_imaging_instance_modality", "modality", "study_instance_uid"),
    Index("ix_imaging_instance_patient_name", "patient_name"),
)
# The imaging_instance column of each attribute QIDO-RS matches in SQL.
QIDO_COLUMNS = {
    "PatientID": "dicom_patient_id",
    "AccessionNumber": "accession_number",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "Modality": "modality",
    "PatientName": "patient_name",
}

imaging_manifest = Table(
    "imaging_manifest",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("submission_set_unique_id", String(128), nullable=False),
    Column("blob", String(512), nullable=False),
    Column("created_at", DateTime(timezone=True), server_default=func.now()),
    # The DocumentEntry's entryUUID, the target of a later RPLC Association
    # (ITI TF-3 4.2.2.2); empty for manifests published before it was kept.
    Column("entry_uuid", String(64), nullable=False, server_default=""),
    # One of the MANIFEST_ values below.
    Column("status", String(16), nullable=False, server_default="current"),
    Index("ix_imaging_manifest_study", "study_instance_uid"),
)

# imaging_manifest.status: the study's Approved manifest, one an RPLC
# superseded, one whose study has no instance left, and one sent with RAD-68
# whose registration is not yet known.
MANIFEST_CURRENT = "current"
MANIFEST_PENDING = "pending"
MANIFEST_REPLACED = "replaced"
MANIFEST_WITHDRAWN = "withdrawn"

# An imaging_instance row is published once its study has a manifest whose
# registration is known (RAD TF-3 4.68): only then may an Imaging
# Document Consumer know of it, and only then is it served, by RAD-69 as by
# WADO-RS and WADO-URI. Asked of each row found, so that the rows are found by the
# other conditions' indexes.
instance_published = (
    select(imaging_manifest.c.study_instance_uid)
    .where(
        imaging_manifest.c.study_instance_uid == imaging_instance.c.study_instance_uid,
        imaging_manifest.c.status != MANIFEST_PENDING,
    )
    .exists()
)

# One row per study taken in by C-STORE, STOW-RS or import: when its last
# instance arrived or left, and whether the published manifest is behind.
imaging_study = Table(
    "imaging_study",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    # The affinity-domain patient id its manifest is published under.
    Column("patient_id", String(256), nullable=False),
    # Seconds since the epoch of the last change; the study is published
    # once it has been quiet for [imaging_source] publish_after seconds.
    Column("changed_at", Float, nullable=False),
    Column("dirty", Boolean, nullable=False, default=True),
    # Seconds since the epoch when a publisher claimed the study; None once
    # it has published or given up. A claim older than the lease is that of
    # a publisher killed on the way, and the study is published again.
    Column("claimed_at", Float, nullable=True),
    # Who claimed it: host name, process id and process start time, so that
    # a claim of a process gone from this host is taken over at once.
    Column("claimed_by", String(128), nullable=True),
    Index("ix_imaging_study_claimed", "claimed_at"),
)

# --- Audit Record Repository ----------------------------------------------

# ITI TF-2 3.20: one row per syslog message received, whole as it came
# (``raw``); a message that is no valid AuditMessage is kept with ``valid``
# false and ``error`` saying why, its coded columns empty.
audit_record = Table(
    "audit_record",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    # "tls" (RFC 5425) or "udp" (RFC 5426), and the sender's address.
    Column("transport", String(8), nullable=False),
    Column("peer", String(256), nullable=False),
    Column("valid", Boolean, nullable=False),
    Column("error", String(512)),
    Column("app_name", String(48)),
    Column("msgid", String(32)),
    Column("event_time", DateTime(timezone=True)),
    Column("event_id", String(64)),
    Column("event_type", String(64)),
    Column("event_action", String(1)),
    Column("outcome", Integer),
    Column("audit_source_id", String(256)),
    Column("raw", LargeBinary, nullable=False),
    # The AuditMessage as received, without the syslog header and BOM.
    Column("xml", LargeBinary),
    Index("ix_audit_record_event_time", "event_time"),
    Index("ix_audit_record_received_at", "received_at"),
)

# The patients a record names (ParticipantObjectTypeCodeRole 1).
audit_patient = Table(
    "audit_patient",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("record_id", Integer, ForeignKey("audit_record.id"), nullable=False),
    Column("patient_id", String(256), nullable=False),
    Index("ix_audit_patient_lookup", "patient_id"),
    Index("ix_audit_patient_record", "record_id"),
)


# A pooled connection idle longer than this is tested before use. A busy node
# reuses its connections within milliseconds and pays no extra round trip; one
# that sat idle may have been cut by a database restart or a firewall.
IDLE_PING_SECONDS = 1.0


def _mark_checked_in(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Test a connection that sat idle; a dead one is replaced by the pool.

    Raising DisconnectionError at checkout makes the pool discard the
    connection and check out another (SQLAlchemy, pessimistic disconnect
    handling).
    """
    checked_in = record.info.get("checked_in")
    if checked_in is None:
        return  # connected just now
    idle = time.monotonic() - checked_in
    if idle <= IDLE_PING_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as exc:
        raise DisconnectionError(f"connection idle {idle:.0f} s is gone") from exc


# The execution option under which a transaction locks what it reads.
_LOCKING = "xdsi_locking"


@contextmanager
def locking_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that checks rows and then writes on what it found.

    The rows it reads FOR UPDATE (or FOR SHARE) are locked on PostgreSQL to
    its end. SQLite has no row locks, and pysqlite would begin the
    transaction only at its first write, after the checks; there the
    transaction takes the database's write lock at once (BEGIN IMMEDIATE,
    SQLite "Transaction" docs), so that no other writer commits between
    its checks and its writes. Writers wait for it up to the busy timeout.
    """
    with engine.connect().execution_options(**{_LOCKING: True}) as conn:
        with conn.begin():
            yield conn


def _begin_immediate_if_locking(conn: Connection) -> None:
    """SQLite: begin a locking transaction with the write lock taken."""
    if conn.get_execution_options().get(_LOCKING):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# How long a new connection waits to put a SQLite database in WAL mode while
# another holds it locked, as long as its busy timeout.
WAL_WAIT_SECONDS = 30.0


def _write_ahead_log(cursor: Any) -> None:
    """Put the SQLite database in WAL mode (it stays so, in the file).

    Changing the journal mode needs the database unlocked, and SQLite
    answers "database is locked" at once, its busy timeout unused, while
    another connection holds it (one creating the schema of a new database,
    in another process started at the same moment): the change is tried
    again until WAL_WAIT_SECONDS have passed.
    """
    deadline = time.monotonic() + WAL_WAIT_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    """Create the engine and upgrade the database to the newest migration.

    Bound values stay out of error messages: they may be patient ids, and
    errors are logged. SQLite runs in WAL mode with a busy timeout, so that
    the actors' threads can share one file. A PostgreSQL connection idle for
    a while is tested before use (_ping_if_idle). The Alembic
    revisions of xdsi.store.migrations create the tables, or bring an older
    database up to this schema.
    """
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # The database names patients: a new one is its user's alone, and
        # SQLite makes its -wal and -shm files with the same mode.
        path.touch(mode=0o600, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            _write_ahead_log(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(engine, "begin", _begin_immediate_if_locking)
    else:
        # Text in UTF-8 whatever the database's encoding: psycopg hands back
        # bytes for a SQL_ASCII database's client encoding, which neither
        # SQLAlchemy nor the node reads.
        engine = create_engine(
            url, connect_args={"client_encoding": "utf8"}, hide_parameters=True
        )
        event.listen(engine, "checkin", _mark_checked_in)
        event.listen(engine, "checkout", _ping_if_idle)

    # Imported here because the migrations read this module's metadata.
    from xdsi.store import migrations

    # With the write lock taken first on SQLite (PostgreSQL: an advisory
    # lock in the upgrade), so that processes starting together on one new
    # database (xdsi serve and xdsi arr, say) create its tables once.
    with locking_transaction(engine) as connection:
        migrations.upgrade(connection)
    return engine

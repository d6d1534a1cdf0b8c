"""The durable audit spool and the Auditor that never blocks a transaction."""

import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from tests.unit.audit.conftest import RealIds
from xdsi.audit import (
    AuditEvent,
    Auditor,
    AuditSpool,
    DocumentRef,
    Endpoint,
    Outcome,
    build_audit_message,
)
from xdsi.audit.spool import LOCK_NAME
from xdsi.metadata.codes import Code

CONSUMER = Endpoint("http://www.w3.org/2005/08/addressing/anonymous", "127.0.0.1")
REPOSITORY = Endpoint("http://127.0.0.1:8081/xdsi/repository", "127.0.0.1")
AUDIT_SOURCE_ID = "xdsi@127.0.0.1"
WHEN = datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC)


def retrieve_event(ids: RealIds, **changes: object) -> AuditEvent:
    """An ITI-43 retrieve of the MR manifest, seen by the Repository."""
    fields: dict[str, object] = {
        "transaction": "ITI-43",
        "actor": "Document Repository",
        "outcome": Outcome.SUCCESS,
        "source": REPOSITORY,
        "destination": CONSUMER,
        "patient_id": ids.patient_id,
        "documents": (DocumentRef(ids.document_unique_id, ids.repository_unique_id),),
        "event_time": WHEN,
    }
    fields.update(changes)
    return AuditEvent(**fields)


def message(ids: RealIds, **changes: object) -> bytes:
    return build_audit_message(
        retrieve_event(ids, **changes), audit_source_id=AUDIT_SOURCE_ID
    )


def test_written_message_reads_back_as_its_record(
    tmp_path: Path, real_ids: RealIds
) -> None:
    """ITI TF-2 3.43.5.1: the spooled record lists the audit's key fields."""
    spool = AuditSpool(tmp_path / "spool")
    written = message(real_ids)

    path = spool.write(written)

    [record] = list(spool.records())
    assert record.valid
    assert record.path == path
    assert record.xml == written
    assert record.event_time == WHEN
    assert record.event_id == Code("110106", "DCM", "Export")
    assert record.event_type == "ITI-43"
    assert record.event_action == "R"
    assert record.outcome == 0
    assert record.actor_user_ids == (REPOSITORY.user_id, CONSUMER.user_id)
    assert record.patient_ids == (real_ids.patient_id,)
    assert record.object_ids == (real_ids.document_unique_id,)


def test_records_come_back_oldest_first(tmp_path: Path, real_ids: RealIds) -> None:
    """ITI TF-2 3.20: the spool keeps the order in which events are audited."""
    spool = AuditSpool(tmp_path)
    outcomes = [Outcome.SUCCESS, Outcome.MINOR_FAILURE, Outcome.SERIOUS_FAILURE] * 4

    paths = [spool.write(message(real_ids, outcome=o)) for o in outcomes]

    records = list(spool.records())
    assert [r.path for r in records] == paths
    assert [r.outcome for r in records] == [int(o) for o in outcomes]
    assert sorted(p.name for p in paths) == [p.name for p in paths]


def test_write_leaves_one_complete_private_file_and_no_temporary(
    tmp_path: Path, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: a spooled message is whole on disk when write returns."""
    spool = AuditSpool(tmp_path / "spool")
    written = message(real_ids)

    path = spool.write(written)

    assert path.parent == tmp_path / "spool"
    assert path.read_bytes() == written
    assert sorted(os.listdir(tmp_path / "spool")) == [LOCK_NAME, path.name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_spool_directory_removed_while_running_is_made_again(
    tmp_path: Path, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: a spool whose directory an operator removed keeps working."""
    spool = AuditSpool(tmp_path / "spool")
    spool.write(message(real_ids))
    for entry in (tmp_path / "spool").iterdir():
        entry.unlink()
    (tmp_path / "spool").rmdir()

    path = spool.write(message(real_ids))

    assert path.read_bytes() == message(real_ids)
    assert [r.path for r in spool.records()] == [path]
    spool.close()


def test_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """ITI TF-2 3.20: a write that fails leaves nothing half-written behind."""
    spool = AuditSpool(tmp_path)

    with pytest.raises(TypeError):
        spool.write("not bytes")  # type: ignore[arg-type]

    assert os.listdir(tmp_path) == []


def test_corrupt_files_are_flagged_not_dropped(
    tmp_path: Path, real_ids: RealIds
) -> None:
    """DICOM PS3.15 A.5.1: a file that is no AuditMessage is still listed."""
    spool = AuditSpool(tmp_path)
    whole = spool.write(message(real_ids))
    truncated_bytes = whole.read_bytes()[:200]
    truncated = spool.write(truncated_bytes)
    not_xml = spool.write(b"\x00\x01 syslog garbage")
    wrong_root = spool.write(b"<AuditMessage><EventIdentification/></AuditMessage>")

    records = list(spool.records())

    assert [r.path for r in records] == [whole, truncated, not_xml, wrong_root]
    assert [r.valid for r in records] == [True, False, False, False]
    broken = records[1]
    assert broken.xml == truncated_bytes
    assert broken.event_id is None
    assert broken.outcome is None
    assert broken.patient_ids == ()
    assert broken.event_time.tzinfo is not None


def test_temporary_files_in_the_spool_are_not_records(
    tmp_path: Path, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: a write in progress is not yet an audit record."""
    spool = AuditSpool(tmp_path)
    path = spool.write(message(real_ids))
    (tmp_path / ".in-progress.tmp").write_bytes(b"<AuditMessage")

    assert [r.path for r in spool.records()] == [path]


def test_a_spool_never_written_has_no_records(tmp_path: Path) -> None:
    """ITI TF-2 3.20: an empty spool lists nothing."""
    assert list(AuditSpool(tmp_path / "absent").records()) == []


def test_messages_written_together_are_all_or_none(
    tmp_path: Path, real_ids: RealIds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fails on the second of two messages (one RAD-69's records
    of two patients) leaves neither of them, nor a temporary file: none may
    name an event that then did not happen."""
    spool = AuditSpool(tmp_path / "spool")
    spool.write(message(real_ids))
    real_fsync = os.fsync
    synced = 0

    def failing_fsync(fd: int) -> None:
        nonlocal synced
        synced += 1
        if synced == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    auditor = Auditor(spool, audit_source_id=AUDIT_SOURCE_ID)
    events = [
        retrieve_event(real_ids),
        retrieve_event(real_ids, patient_id="OTHER^^^&1.2.3&ISO"),
    ]

    assert auditor.record_all(events) is False

    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(list(spool.records())) == 1
    assert [n for n in os.listdir(tmp_path / "spool") if n.endswith(".tmp")] == []
    assert auditor.record_all(events) is True
    assert len(list(spool.records())) == 3
    spool.close()


def test_auditor_spools_the_message_of_each_event(
    tmp_path: Path, real_ids: RealIds, audit_schema: etree.RelaxNG
) -> None:
    """ITI TF-2 3.43.5.1: the Repository's retrieve lands in the spool."""
    spool = AuditSpool(tmp_path)
    auditor = Auditor(
        spool, audit_source_id=AUDIT_SOURCE_ID, enterprise_site_id="IHE-EU-2024"
    )

    assert auditor.record(retrieve_event(real_ids)) is True

    [record] = list(spool.records())
    assert record.valid
    root = etree.fromstring(record.xml)
    assert audit_schema.validate(root)
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditEnterpriseSiteID") == "IHE-EU-2024"


def test_auditor_swallows_a_spool_failure_and_logs_it(
    tmp_path: Path, real_ids: RealIds, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.20: audit never blocks care; a failure is logged and
    reported to the caller."""
    not_a_directory = tmp_path / "spool"
    not_a_directory.write_bytes(b"")
    auditor = Auditor(AuditSpool(not_a_directory), audit_source_id=AUDIT_SOURCE_ID)
    caplog.set_level(logging.DEBUG, logger="xdsi.audit")

    assert auditor.record(retrieve_event(real_ids)) is False

    [failure] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failure.exc_info is not None
    assert "ITI-43" in failure.getMessage()
    assert not_a_directory.read_bytes() == b""


def test_auditor_swallows_an_event_it_cannot_build(
    tmp_path: Path, real_ids: RealIds, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.20: a malformed event is logged; the transaction goes on."""
    spool = AuditSpool(tmp_path)
    auditor = Auditor(spool, audit_source_id=AUDIT_SOURCE_ID)

    assert auditor.record(retrieve_event(real_ids, actor="Document Registry")) is False

    assert list(spool.records()) == []
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_no_patient_id_is_logged_at_info_or_above(
    tmp_path: Path, real_ids: RealIds, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.20: who saw which patient belongs in the audit trail only."""
    caplog.set_level(logging.DEBUG, logger="xdsi")
    good = Auditor(AuditSpool(tmp_path / "good"), audit_source_id=AUDIT_SOURCE_ID)
    (tmp_path / "bad").write_bytes(b"")
    bad = Auditor(AuditSpool(tmp_path / "bad"), audit_source_id=AUDIT_SOURCE_ID)
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "0-corrupt.xml").write_bytes(b"<AuditMessage")

    good.record(retrieve_event(real_ids))
    bad.record(retrieve_event(real_ids))
    bad.record(retrieve_event(real_ids, submission_set_unique_id="x"))
    list(AuditSpool(tmp_path / "good").records())

    formatter = logging.Formatter()
    loud = [formatter.format(r) for r in caplog.records if r.levelno >= logging.INFO]
    assert len(loud) == 3
    assert not [line for line in loud if real_ids.patient_id in line]

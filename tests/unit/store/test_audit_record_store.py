"""The Audit Record Repository's tables on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from xdsi.audit import AuditEvent, Endpoint, Outcome, build_audit_message
from xdsi.audit.repository import AuditRecordStore
from xdsi.audit.syslog import format_message
from xdsi.store.schema import make_engine

PATIENT = "IDS-AD002-a^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"
WHEN = datetime(2024, 5, 2, 9, 30, 15, tzinfo=UTC)


def _feed_audit() -> bytes:
    event = AuditEvent(
        transaction="ITI-8",
        actor="Document Registry",
        outcome=Outcome.SUCCESS,
        source=Endpoint("NIST_SENDER|NIST", "127.0.0.1"),
        destination=Endpoint("XDSI|XDSI", "127.0.0.1"),
        patient_id=PATIENT,
        message_id="NIST-MSG-0001",
        event_time=WHEN,
    )
    xml = build_audit_message(event, audit_source_id="xdsi")
    return format_message(xml, app_name="xdsi")


def test_stored_audit_reads_back_by_patient_and_time(database_url: str) -> None:
    """ITI TF-2 3.20: the ARR finds a stored event by patient and time."""
    engine = make_engine(database_url)
    try:
        store = AuditRecordStore(engine)
        store.store(_feed_audit(), transport="tls", peer="127.0.0.1:40000")
        store.store(b"not syslog", transport="udp", peer="127.0.0.1:40001")

        [found] = store.query(patient_id=PATIENT, since=WHEN)
        everything = store.query()
        later = store.query(since=WHEN + timedelta(seconds=1))
    finally:
        engine.dispose()

    assert (found.valid, found.event_id, found.event_type) == (True, "110110", "ITI-8")
    assert found.event_time == WHEN
    assert found.patient_ids == (PATIENT,)
    assert [r.valid for r in everything] == [True, False]
    # The malformed message has no event time; it is found by receipt time.
    assert [r.raw for r in later] == [b"not syslog"]

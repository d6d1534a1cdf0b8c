"""Both sides of every transaction write the audit record their row tables.

ITI TF-2 3.20 and each transaction's Security Considerations (ITI TF-2
3.8.5.1, 3.18.5.1, 3.41.5.1, 3.42.5.1, 3.43.5.1, RAD TF-3 4.68.5, 4.69.5):
the chain runs between real actors on loopback, and every (transaction,
actor) row of profiles/audit_events.toml that the chain plays must be found
in the spool as a message valid against DICOM PS3.15 A.5.1 with the row's
EventID, action, ActiveParticipant roles and participant objects.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.identity_source import send_feed
from xdsi.dicom import scan
from xdsi.hl7.mllp import MllpError
from xdsi.profiles_loader import load_profile_table

TABLE = load_profile_table("audit_events")

# The (transaction, actor) rows the chain below plays; the Imaging Document
# Consumer queries and retrieves the manifest as a Document Consumer.
PLAYED = [
    ("ITI-8", "Patient Identity Source"),
    ("ITI-8", "Document Registry"),
    ("ITI-41", "Document Source"),
    ("ITI-41", "Document Repository"),
    ("RAD-68", "Imaging Document Source"),
    ("RAD-68", "Document Repository"),
    ("ITI-42", "Document Repository"),
    ("ITI-42", "Document Registry"),
    ("ITI-18", "Document Consumer"),
    ("ITI-18", "Document Registry"),
    ("ITI-43", "Document Consumer"),
    ("ITI-43", "Document Repository"),
    ("RAD-69", "Imaging Document Consumer"),
    ("RAD-69", "Imaging Document Source"),
]

_KIND_BY_ID_TYPE = {
    spec["id_type"]["code"]: kind for kind, spec in TABLE["objects"].items()
}


def _row(transaction: str, actor: str) -> dict[str, Any]:
    (row,) = [
        r
        for r in TABLE["events"]
        if r["transaction"] == transaction and r["actor"] == actor
    ]
    return row


def _signature(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a record of the row shows: type, EventID, roles and requestors."""
    roles = TABLE["roles"]
    return (
        row["transaction"],
        row["event_id"]["code"],
        tuple(
            (roles[p["role"]]["code"] if "role" in p else None, p["requestor"])
            for p in row["participants"]
        ),
    )


def _record_signature(root: etree._Element) -> tuple[Any, ...]:
    identification = root.find("EventIdentification")
    (event_type,) = identification.findall("EventTypeCode")
    participants = tuple(
        (
            p.find("RoleIDCode").get("csd-code")
            if p.find("RoleIDCode") is not None
            else None,
            p.get("UserIsRequestor") == "true",
        )
        for p in root.findall("ActiveParticipant")
    )
    return (
        event_type.get("csd-code"),
        identification.find("EventID").get("csd-code"),
        participants,
    )


def _fits(root: etree._Element, row: dict[str, Any]) -> bool:
    """The record's action and participant objects are as the row allows."""
    action = root.find("EventIdentification").get("EventActionCode")
    if action not in [row["event_action"], *row.get("event_action_choices", [])]:
        return False
    kinds = Counter(
        _KIND_BY_ID_TYPE.get(
            o.find("ParticipantObjectIDTypeCode").get("csd-code"), "unknown"
        )
        for o in root.findall("ParticipantObjectIdentification")
    )
    allowed = {o["kind"]: o for o in row["objects"]}
    if set(kinds) - set(allowed):
        return False
    return all(
        o["min"] <= kinds[kind] <= o.get("max", kinds[kind])
        for kind, o in allowed.items()
    )


def test_every_transaction_is_audited_by_both_sides(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.20: each actor audits each transaction it plays, as tabled."""
    services = running_node.services
    settings = running_node.settings
    assert send_feed(settings, services.auditor, PATIENT).code == "AA"
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    services.imaging_source.publish(study, PATIENT)
    report = tmp_path / "report.txt"
    report.write_text("Findings: none.\n", encoding="utf-8")
    DocumentSource(settings, tmp_path / "source-spool", services.auditor).submit(
        [report], PATIENT, mime_type="text/plain", title="Report"
    )
    services.consumer.fetch(PATIENT, tmp_path / "out")

    records = list(services.audit_spool.records())
    assert records and all(r.valid for r in records), [
        r.path.name for r in records if not r.valid
    ]
    roots = [etree.fromstring(r.xml) for r in records]
    expected = Counter(_signature(_row(*played)) for played in PLAYED)
    for signature, count in expected.items():
        rows = [_row(*p) for p in PLAYED if _signature(_row(*p)) == signature]
        found = [
            root
            for root in roots
            if _record_signature(root) == signature
            and any(_fits(root, row) for row in rows)
        ]
        assert len(found) >= count, (signature, len(found), count)


def test_feed_without_an_answer_is_audited_as_a_serious_failure(
    running_node: RunningNode,
) -> None:
    """ITI TF-2 3.8.5.1: the source audits a feed the registry never took."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    services = running_node.services

    with pytest.raises((MllpError, OSError)):
        send_feed(running_node.settings, services.auditor, PATIENT, port=port)

    (record,) = [
        r
        for r in services.audit_spool.records()
        if r.event_type == "ITI-8" and f"127.0.0.1:{port}" in r.actor_user_ids
    ]
    assert record.outcome == 8
    assert record.patient_ids == (PATIENT,)

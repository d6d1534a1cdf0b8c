"""ITI-8 Patient Identity Feed into the Document Registry over MLLP
(ITI TF-2 3.8.4.1, 3.8.4.2), sent from a separate process over a real socket,
with the identifier domains it accepts and merges seen through ITI-18."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from sqlalchemy import select

from tests.conftest import shared_path
from tests.integration.conftest import RunningNode
from tests.nist_submissions import error_codes, nist_submission, register, run_query
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed, read_ack
from xdsi.hl7.mllp import MAX_FRAME_SIZE, send_message
from xdsi.metadata import ebrim, stored_query
from xdsi.store.schema import patient

ROOT = Path(__file__).resolve().parents[2]
VT, FS_CR = b"\x0b", b"\x1c\r"
AUTHORITY = Settings().node.assigning_authority
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


def new_patient() -> str:
    """A fresh patient id of the affinity domain, as an XDS CX."""
    return f"XDSI-ITI8-{uuid.uuid4().hex[:10]}^^^&{AUTHORITY}&ISO"


def frame(message: str) -> bytes:
    return VT + message.encode() + FS_CR


def peer(
    address: tuple[str, int],
    writes: list[tuple[bytes, float]],
    answers: int,
    *,
    timeout: float = 5.0,
    expect_close: bool = False,
) -> dict[str, Any]:
    """Run tests/integration/mllp_peer.py as its own process; its report.

    ``writes`` are (bytes, pause before sending) pairs, each one TCP send.
    """
    plan = {
        "writes": [{"hex": data.hex(), "pause": pause} for data, pause in writes],
        "answers": answers,
        "timeout": timeout,
        "expect_close": expect_close,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.mllp_peer", *map(str, address)],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=timeout + 60,
        check=True,
    )
    return json.loads(done.stdout)


def acks(report: dict[str, Any]) -> list[tuple[str, str]]:
    """MSA-1 and MSA-2 of each answer frame."""
    return [(a.code, a.control_id) for a in map(read_ack, report["frames"])]


def err(ack: str) -> str:
    """The ERR segments of an ACK, where its HL7 Table 0357 code stands (not
    MSH-7, whose date and time may hold any three digits)."""
    segments = ack.replace("\n", "\r").split("\r")
    return "\r".join(s for s in segments if s.startswith("ERR"))


def _node(tmp_path: Path, others: tuple[str, ...] = ()) -> Node:
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    return Node(
        replace(
            settings,
            node=replace(settings.node, other_assigning_authorities=others),
            registry=replace(settings.registry, feed_timeout=1.0),
        )
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node whose MLLP listener closes idle connections after 1 s."""
    with _node(tmp_path_factory.mktemp("iti8")) as running:
        yield running


def feed_address(node: Node) -> tuple[str, int]:
    return "127.0.0.1", node.settings.registry.feed_port


def patient_row(node: Node, patient_id: str) -> Any:
    assert node.services is not None
    with node.services.engine.connect() as conn:
        return conn.execute(
            select(patient).where(patient.c.patient_id == patient_id)
        ).first()


# --- identifier domains ------------------------------------------------------


def test_feed_of_the_affinity_domain_is_accepted_and_known(tmp_path):
    """ITI TF-2 3.8.4.1.3: the registry records the domain's patient id."""
    with _node(tmp_path, ()) as node:
        patient_id = new_patient()
        ack = send_message(*feed_address(node), build_feed(patient_id))
        assert read_ack(ack).code == "AA"
        assert node.services.registry.knows_patient(patient_id)


def test_feed_of_another_domain_is_refused_unless_configured(tmp_path):
    """A PID-3 of no accepted domain is AE; a configured second domain is
    accepted, and the affinity domain still is."""
    other = "SR7^^^&1.2.260&ISO"
    with _node(tmp_path / "one", ()) as node:
        ack = send_message(*feed_address(node), build_feed(other))
        assert read_ack(ack).code == "AE"
        assert not node.services.registry.knows_patient(other)
    with _node(tmp_path / "two", ("1.2.260",)) as node:
        ack = send_message(*feed_address(node), build_feed(other))
        assert read_ack(ack).code == "AA"
        assert node.services.registry.knows_patient(other)


# --- each trigger event, from another process -------------------------------


@pytest.mark.parametrize("trigger", ["A01", "A04", "A05"])
def test_create_event_is_acknowledged_aa_and_records_the_patient(
    node: Node, trigger: str
) -> None:
    """ITI TF-2 3.8.4.1.1: A01, A04 and A05 create the patient."""
    patient_id = new_patient()
    message = build_feed(patient_id, trigger=trigger, control_id=f"C-{trigger}")

    report = peer(feed_address(node), [(frame(message), 0.0)], 1)

    assert acks(report) == [("AA", f"C-{trigger}")]
    assert read_ack(report["frames"][0]).trigger == trigger
    assert node.services.registry.knows_patient(patient_id)


def test_a08_of_a_known_patient_is_acknowledged_aa_and_stamped(node: Node) -> None:
    """ITI TF-2 3.8.4.1.1: A08 updates a patient the registry knows."""
    patient_id = new_patient()
    created = build_feed(patient_id, control_id="U-1")
    updated = build_feed(patient_id, trigger="A08", control_id="U-2")
    assert patient_row(node, patient_id) is None

    report = peer(feed_address(node), [(frame(created) + frame(updated), 0.0)], 2)

    assert acks(report) == [("AA", "U-1"), ("AA", "U-2")]
    assert patient_row(node, patient_id).updated_at is not None


def test_a08_of_an_unknown_patient_is_ae_204_and_creates_nothing(node: Node) -> None:
    """ITI TF-2 3.8.4.1.1: an update does not stand in for a lost create."""
    patient_id = new_patient()
    message = build_feed(patient_id, trigger="A08", control_id="U-3")

    report = peer(feed_address(node), [(frame(message), 0.0)], 1)

    assert acks(report) == [("AE", "U-3")]
    assert "204" in err(report["frames"][0])
    assert patient_row(node, patient_id) is None


@pytest.mark.parametrize("message_type", ["ADT^A03^ADT_A03", "ADT^A31^ADT_A05"])
def test_event_iti8_does_not_name_is_rejected_ar_201(
    node: Node, message_type: str
) -> None:
    """ITI TF-2 3.8.4.1.1: other ADT events get an application reject."""
    patient_id = new_patient()
    message = build_feed(patient_id, control_id="R-1").replace(
        "ADT^A01^ADT_A01", message_type
    )

    report = peer(feed_address(node), [(frame(message), 0.0)], 1)

    assert acks(report) == [("AR", "R-1")]
    assert "201" in err(report["frames"][0])
    assert patient_row(node, patient_id) is None


def test_ack_keeps_the_request_encoding_characters(node: Node) -> None:
    """ITI TF-2x C.2.3: the ACK is written with the request's MSH-2."""
    patient_id = new_patient()
    message = (
        build_feed(patient_id, control_id="E-1")
        .replace("^", "#")
        .replace("MSH|#~\\&|", "MSH|#~\\&|")
    )

    report = peer(feed_address(node), [(frame(message), 0.0)], 1)

    ack = report["frames"][0]
    assert ack.startswith("MSH|#~\\&|")
    assert "ACK#A01#ACK" in ack and "|AA|E-1" in ack
    assert node.services.registry.knows_patient(patient_id)


# --- framing as real peers send it ------------------------------------------


def test_start_and_end_blocks_split_over_tcp_packets_are_reassembled(
    node: Node,
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame may arrive in any pieces."""
    patient_id = new_patient()
    data = frame(build_feed(patient_id, control_id="F-1"))
    pieces = [data[:1], data[1:30], data[30:-2], data[-2:-1], data[-1:]]

    report = peer(feed_address(node), [(p, 0.05) for p in pieces], 1)

    assert acks(report) == [("AA", "F-1")]
    assert node.services.registry.knows_patient(patient_id)


def test_two_messages_in_one_write_get_two_acks_in_order(node: Node) -> None:
    """HL7 v2.5 Implementation Guide C.4: frames follow on one stream."""
    first, second = new_patient(), new_patient()
    data = frame(build_feed(first, control_id="F-2")) + frame(
        build_feed(second, control_id="F-3")
    )

    report = peer(feed_address(node), [(data, 0.0)], 2)

    assert acks(report) == [("AA", "F-2"), ("AA", "F-3")]
    assert all(map(node.services.registry.knows_patient, (first, second)))


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_segments_ending_in_cr_lf_or_crlf_are_served(node: Node, ending: str) -> None:
    """ITI TF-2 3.8.4.1.2: segment ends as senders write them."""
    patient_id = new_patient()
    message = build_feed(patient_id, control_id="F-4").replace("\r", ending)

    report = peer(feed_address(node), [(frame(message), 0.0)], 1)

    assert acks(report) == [("AA", "F-4")]
    assert node.services.registry.knows_patient(patient_id)


def test_junk_before_the_start_block_is_skipped_and_logged(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: bytes outside frames are dropped."""
    patient_id = new_patient()
    junk = b"GET / HTTP/1.0\r\n\r\n"

    with caplog.at_level(logging.WARNING, logger="xdsi.hl7.mllp"):
        report = peer(
            feed_address(node),
            [(junk, 0.0), (frame(build_feed(patient_id, control_id="F-5")), 0.05)],
            1,
        )

    assert acks(report) == [("AA", "F-5")]
    assert any("skipped 14 bytes" in r.getMessage() for r in caplog.records)


def test_frame_that_never_ends_is_closed_after_the_timeout(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame without <FS> times out."""
    patient_id = new_patient()
    unfinished = VT + build_feed(patient_id).encode()

    with caplog.at_level(logging.WARNING, logger="xdsi.hl7.mllp"):
        report = peer(
            feed_address(node), [(unfinished, 0.0)], 0, expect_close=True, timeout=8
        )

    assert report["closed"] and report["frames"] == []
    assert report["seconds"] < 5.0
    assert any("unfinished" in r.getMessage() for r in caplog.records)
    assert patient_row(node, patient_id) is None


def test_oversized_frame_is_answered_ar_and_closed(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame past the cap earns AR."""
    patient_id = new_patient()
    message = build_feed(patient_id, control_id="F-6")
    oversized = VT + message.encode() + b"Z" * MAX_FRAME_SIZE + FS_CR

    with caplog.at_level(logging.WARNING, logger="xdsi.hl7.mllp"):
        report = peer(
            feed_address(node), [(oversized, 0.0)], 1, expect_close=True, timeout=20
        )

    assert acks(report) == [("AR", "F-6")] and report["closed"]
    assert any("exceeds" in r.getMessage() for r in caplog.records)
    assert patient_row(node, patient_id) is None


def test_bad_frame_does_not_stop_the_next_on_the_same_connection(
    node: Node,
) -> None:
    """ITI TF-2x C.2.3: garbage is answered AR, the listener serves on."""
    patient_id = new_patient()
    data = (
        VT + b"\x00\xffnot HL7\x1c\r" + frame(build_feed(patient_id, control_id="F-7"))
    )

    report = peer(feed_address(node), [(data, 0.0)], 2)

    assert acks(report) == [("AR", ""), ("AA", "F-7")]
    assert node.services.registry.knows_patient(patient_id)


# --- merges, checked through ITI-18 -----------------------------------------


def find_documents(url: str, patient_id: str) -> dict[str, str]:
    """FindDocuments for approved entries: entryUUID to patientId returned."""
    response = run_query(
        url,
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
        stored_query.RETURN_LEAF_CLASS,
    )
    assert response.get("status") == SUCCESS, error_codes(response)
    entries = ebrim.read_registry_objects(response).document_entries
    return {e.id: e.patient_id or "" for e in entries}


def submit_document(url: str, patient_id: str) -> etree._Element:
    return register(
        url, nist_submission("iti42-12374-submit_doc", {}, patient_id=patient_id)
    )


def test_a40_moves_the_subsumed_patients_documents_to_the_survivor(
    running_node: RunningNode,
) -> None:
    """ITI TF-2 3.8.4.2.3: after A40, ITI-18 by the surviving id finds both
    patients' documents under it, the subsumed id finds none and takes no
    new submission, and the merge is audited D and U."""
    url = running_node.settings.url("registry")
    address = (
        running_node.settings.node.host,
        running_node.settings.registry.feed_port,
    )
    survivor, subsumed = new_patient(), new_patient()
    for patient_id in (survivor, subsumed):
        assert read_ack(running_node.feed(patient_id)).code == "AA"
        assert submit_document(url, patient_id).get("status") == SUCCESS
    before = find_documents(url, survivor), find_documents(url, subsumed)
    assert [len(found) for found in before] == [1, 1]

    merge = build_feed(
        survivor, trigger="A40", subsumed_patient_id=subsumed, control_id="M-1"
    )
    report = peer(address, [(frame(merge), 0.0)], 1)

    assert acks(report) == [("AA", "M-1")]
    after = find_documents(url, survivor)
    assert set(after) == set(before[0]) | set(before[1])
    assert set(after.values()) == {survivor}
    assert find_documents(url, subsumed) == {}
    assert error_codes(submit_document(url, subsumed)) == ["XDSUnknownPatientId"]
    assert submit_document(url, survivor).get("status") == SUCCESS

    rng = etree.RelaxNG(
        etree.parse(shared_path("schemas", "dicom", "audit-message.rng"))
    )
    records = [
        r
        for r in running_node.services.audit_spool.records()
        if r.event_type == "ITI-8" and set(r.patient_ids) & {survivor, subsumed}
    ]
    merged = {(r.patient_ids, r.event_action, r.outcome) for r in records[-2:]}
    assert merged == {((subsumed,), "D", 0), ((survivor,), "U", 0)}
    assert all(rng.validate(etree.fromstring(r.xml)) for r in records)


def test_a40_refusals_leave_both_patients_as_they_were(
    running_node: RunningNode,
) -> None:
    """ITI TF-2 3.8.4.2.3: a merge into itself, of an unknown id or of an id
    already subsumed is answered AE and changes nothing."""
    url = running_node.settings.url("registry")
    address = (
        running_node.settings.node.host,
        running_node.settings.registry.feed_port,
    )
    survivor, subsumed, stranger = new_patient(), new_patient(), new_patient()
    for patient_id in (survivor, subsumed):
        assert read_ack(running_node.feed(patient_id)).code == "AA"
    assert submit_document(url, subsumed).get("status") == SUCCESS
    merges = [
        build_feed(
            survivor, trigger="A40", subsumed_patient_id=survivor, control_id="X-1"
        ),
        build_feed(
            survivor, trigger="A40", subsumed_patient_id=stranger, control_id="X-2"
        ),
        build_feed(
            stranger, trigger="A40", subsumed_patient_id=subsumed, control_id="X-3"
        ),
    ]

    report = peer(address, [(b"".join(map(frame, merges)), 0.0)], 3)

    assert acks(report) == [("AE", "X-1"), ("AE", "X-2"), ("AE", "X-3")]
    assert ["205" in err(f) for f in report["frames"]] == [True, False, False]
    assert all("204" in err(f) for f in report["frames"][1:])
    assert len(find_documents(url, subsumed)) == 1
    assert running_node.services.registry.knows_patient(subsumed)
    assert not running_node.services.registry.knows_patient(stranger)

    again = build_feed(survivor, trigger="A40", subsumed_patient_id=subsumed)
    assert read_ack(send_message(*address, again)).code == "AA"
    assert read_ack(send_message(*address, again)).code == "AE"
    assert read_ack(send_message(*address, build_feed(subsumed))).code == "AE"
    assert running_node.services.registry.merged_into(subsumed) == survivor

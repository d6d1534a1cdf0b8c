"""Audit messages per transaction and actor, checked against DICOM schemas."""

import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from lxml import etree

from tests.unit.audit.conftest import RealIds
from xdsi.audit import (
    AuditEvent,
    DocumentRef,
    Endpoint,
    Outcome,
    audit_event_rules,
    build_audit_message,
    media_type,
)
from xdsi.profiles_loader import load_profile_table

TABLE = load_profile_table("audit_events")
ROWS = TABLE["events"]
ROW_IDS = [f"{row['transaction']}/{row['actor']}" for row in ROWS]

SOURCE = Endpoint("http://www.w3.org/2005/08/addressing/anonymous", "127.0.0.1")
DESTINATION = Endpoint("http://localhost:8080/xdsi/registry", "localhost")
AUDIT_SOURCE_ID = "xdsi@127.0.0.1"
WHEN = datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC)
PEER_URI = "tls://127.0.0.1:50514"
MEDIUM = Endpoint("file:///media/cdrom", "", media_type("uri"))


def full_event(row: dict[str, Any], ids: RealIds, **changes: Any) -> AuditEvent:
    """Return a successful event with every object ``row`` has a place for."""
    kinds = {o["kind"] for o in row["objects"]}
    if row["transaction"] == "RAD-69":
        documents = (
            DocumentRef(ids.rad69_document_unique_id, ids.repository_unique_id),
        )
    else:
        documents = (
            DocumentRef(ids.document_unique_id, ids.repository_unique_id, None),
        )
    fields: dict[str, Any] = {
        "transaction": row["transaction"],
        "actor": row["actor"],
        "outcome": Outcome.SUCCESS,
        "source": MEDIUM if _reads_media(row) else SOURCE,
        "destination": DESTINATION,
        "event_time": WHEN,
        "patient_id": ids.patient_id if "patient" in kinds else None,
        "submission_set_unique_id": (
            ids.submission_set_unique_id if "submission_set" in kinds else None
        ),
        "documents": documents if "document" in kinds else (),
        "study_instance_uids": (
            ids.rad69_study_instance_uid,
            ids.study_instance_uid,
        )[: _studies_in(row)],
        "query_id": ids.query_id if kinds & {"query", "sop_queried"} else None,
        "query_request": (
            ids.query_request if kinds & {"query", "sop_queried"} else None
        ),
        "message_id": "NIST-MSG-0001" if row["transaction"] == "ITI-8" else None,
        "alert_subjects": (PEER_URI,) if "alert_subject" in kinds else (),
    }
    fields.update(changes)
    return AuditEvent(**fields)


def _reads_media(row: dict[str, Any]) -> bool:
    """Whether the row's source is a medium (DICOM PS3.15 A.5.3.5)."""
    return any(p.get("role") == "source_media" for p in row["participants"])


def _studies_in(row: dict[str, Any]) -> int:
    """How many studies an event of ``row`` is built with: two, where the
    row takes more than one."""
    limits = [o.get("max", 2) for o in row["objects"] if o["kind"] == "study"]
    return min(limits[0], 2) if limits else 0


def build(event: AuditEvent) -> etree._Element:
    message = build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)
    return etree.fromstring(message)


def coded(element: etree._Element) -> tuple[str, str, str]:
    return (
        element.get("csd-code"),
        element.get("codeSystemName"),
        element.get("originalText"),
    )


def row_code(entry: dict[str, str]) -> tuple[str, str, str]:
    return (entry["code"], entry["scheme"], entry["display"])


def detail(element: etree._Element, detail_type: str) -> str:
    found = element.find(f"ParticipantObjectDetail[@type='{detail_type}']")
    return base64.b64decode(found.get("value")).decode("utf-8")


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_row_builds_a_message_valid_against_the_dicom_schema(
    row: dict[str, Any], real_ids: RealIds, audit_schema: etree.RelaxNG
) -> None:
    """DICOM PS3.15 A.5.1: each (transaction, actor) row is valid."""
    root = build(full_event(row, real_ids))

    assert audit_schema.validate(root), audit_schema.error_log


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_row_writes_the_tabled_event_and_participant_roles(
    row: dict[str, Any], real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: EventID, EventTypeCode, action, roles as tabled."""
    root = build(full_event(row, real_ids))

    identification = root.find("EventIdentification")
    assert coded(identification.find("EventID")) == row_code(row["event_id"])
    assert [coded(e) for e in identification.findall("EventTypeCode")] == (
        [row_code(row["event_type"])] if "event_type" in row else []
    )
    assert identification.get("EventActionCode") == row["event_action"]
    assert identification.get("EventOutcomeIndicator") == "0"

    participants = root.findall("ActiveParticipant")
    expected_users = {
        "source": (MEDIUM if _reads_media(row) else SOURCE).user_id,
        "destination": DESTINATION.user_id,
    }
    assert [p.get("UserID") for p in participants] == [
        expected_users[p["endpoint"]] for p in row["participants"]
    ]
    assert [
        coded(p.find("RoleIDCode")) if p.find("RoleIDCode") is not None else None
        for p in participants
    ] == [
        row_code(TABLE["roles"][p["role"]]) if "role" in p else None
        for p in row["participants"]
    ]
    assert [p.get("UserIsRequestor") for p in participants] == [
        "true" if p["requestor"] else "false" for p in row["participants"]
    ]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_row_writes_its_participant_objects_in_table_order(
    row: dict[str, Any], real_ids: RealIds
) -> None:
    """DICOM PS3.15 A.5.1: object type, role and id type as the row says."""
    root = build(full_event(row, real_ids))

    written = [
        (
            o.get("ParticipantObjectTypeCode"),
            o.get("ParticipantObjectTypeCodeRole"),
            coded(o.find("ParticipantObjectIDTypeCode")),
        )
        for o in root.findall("ParticipantObjectIdentification")
    ]
    kinds = [o["kind"] for o in row["objects"]]
    assert [code for _, _, code in written] == [
        row_code(TABLE["objects"][kind]["id_type"])
        for kind in kinds
        for _ in range(_studies_in(row) if kind == "study" else 1)
    ]
    assert all(
        (type_code, role)
        in {
            (spec["type_code"], spec["type_code_role"])
            for spec in TABLE["objects"].values()
        }
        for type_code, role, _ in written
    )


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_a_failed_transaction_is_audited_without_its_objects(
    row: dict[str, Any], real_ids: RealIds, audit_schema: etree.RelaxNG
) -> None:
    """ITI TF-2 3.20: a failure is audited even if the request is unread."""
    event = AuditEvent(
        transaction=row["transaction"],
        actor=row["actor"],
        outcome=Outcome.SERIOUS_FAILURE,
        source=MEDIUM if _reads_media(row) else SOURCE,
        destination=DESTINATION,
        outcome_detail="XDSRegistryMetadataError",
    )

    root = build(event)

    assert audit_schema.validate(root), audit_schema.error_log
    identification = root.find("EventIdentification")
    assert identification.get("EventOutcomeIndicator") == "8"
    assert identification.findtext("EventOutcomeDescription") == (
        "XDSRegistryMetadataError"
    )
    assert root.findall("ParticipantObjectIdentification") == []


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_row_also_validates_against_the_ipf_dicom_2017c_schema(
    row: dict[str, Any], real_ids: RealIds, ipf_audit_schema: etree.XMLSchema
) -> None:
    """DICOM PS3.15 A.5.1: the XSD form many Audit Record Repositories use."""
    root = build(full_event(row, real_ids))

    assert ipf_audit_schema.validate(root), ipf_audit_schema.error_log


def test_every_table_row_is_loaded_as_a_rule() -> None:
    """ITI TF-2 3.20: one rule per (transaction, actor) row, none lost."""
    rules = audit_event_rules()

    assert sorted(rules) == sorted((r["transaction"], r["actor"]) for r in ROWS)
    assert len(rules) == len(ROWS)


def test_unknown_transaction_and_actor_pair_is_refused(real_ids: RealIds) -> None:
    """ITI TF-2 3.20: only tabled (transaction, actor) pairs have a record."""
    event = AuditEvent(
        transaction="ITI-41",
        actor="Document Consumer",
        outcome=Outcome.SUCCESS,
        source=SOURCE,
        destination=DESTINATION,
    )

    with pytest.raises(ValueError, match="Document Consumer in ITI-41"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def test_successful_register_without_submission_set_is_refused(
    real_ids: RealIds,
) -> None:
    """ITI TF-2 3.42.5.1: a successful ITI-42 names its SubmissionSet."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-42", "Document Registry")
    )
    event = full_event(row, real_ids, submission_set_unique_id=None)

    with pytest.raises(ValueError, match="at least 1 submission_set"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def test_object_the_row_has_no_place_for_is_refused(real_ids: RealIds) -> None:
    """ITI TF-2 3.41.5.1: an ITI-41 record carries no study objects."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")
    event = full_event(
        row, real_ids, study_instance_uids=(real_ids.study_instance_uid,)
    )

    with pytest.raises(ValueError, match="no place for study"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def test_query_id_without_query_request_is_refused(real_ids: RealIds) -> None:
    """ITI TF-2 3.18.5.1: the query object holds the id and the request."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-18")
    event = full_event(row, real_ids, query_request=None)

    with pytest.raises(ValueError, match="query_id and query_request together"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def test_stored_query_is_recorded_whole_with_its_encoding(real_ids: RealIds) -> None:
    """ITI TF-2 3.18.5.1: ParticipantObjectQuery is the AdhocQueryRequest."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-18", "Document Registry")
    )

    root = build(full_event(row, real_ids))

    query = root.find(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']"
    )
    assert query.get("ParticipantObjectID") == real_ids.query_id
    assert base64.b64decode(query.findtext("ParticipantObjectQuery")) == (
        real_ids.query_request
    )
    assert detail(query, "QueryEncoding") == "UTF-8"
    assert query.find("ParticipantObjectName") is None


def test_query_encoding_is_taken_from_the_xml_declaration(real_ids: RealIds) -> None:
    """ITI TF-2 3.18.5.1: QueryEncoding names the request's encoding."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-18")
    request = b'<?xml version="1.0" encoding="ISO-8859-1"?>\n' + real_ids.query_request

    root = build(full_event(row, real_ids, query_request=request))

    query = root.find(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']"
    )
    assert detail(query, "QueryEncoding") == "ISO-8859-1"


def test_retrieved_document_carries_repository_and_community_details(
    real_ids: RealIds,
) -> None:
    """ITI TF-2 3.43.5.1: Repository Unique Id, ihe:homeCommunityID details."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-43", "Document Consumer")
    )
    community = "urn:oid:1.3.6.1.4.1.21367.13.70.200"
    document = DocumentRef(
        real_ids.document_unique_id, real_ids.repository_unique_id, community
    )

    root = build(full_event(row, real_ids, documents=(document,)))

    written = root.find(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']"
    )
    assert written.get("ParticipantObjectID") == real_ids.document_unique_id
    assert detail(written, "Repository Unique Id") == real_ids.repository_unique_id
    assert detail(written, "ihe:homeCommunityID") == community


def test_patient_feed_records_msh10_and_takes_update_action(real_ids: RealIds) -> None:
    """ITI TF-2 3.8.5.1: MSH-10 on the patient; EventActionCode U for A08."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-8", "Document Registry")
    )

    root = build(full_event(row, real_ids, event_action="U"))

    assert root.find("EventIdentification").get("EventActionCode") == "U"
    patient = root.find("ParticipantObjectIdentification")
    assert patient.get("ParticipantObjectID") == real_ids.patient_id
    assert detail(patient, "MSH-10") == "NIST-MSG-0001"


@pytest.mark.parametrize("event_action", ["D", "U"], ids=["subsumed", "surviving"])
def test_patient_merge_records_each_patient_valid_against_the_dicom_schema(
    event_action: str,
    real_ids: RealIds,
    audit_schema: etree.RelaxNG,
    ipf_audit_schema: etree.XMLSchema,
) -> None:
    """ITI TF-2 3.8.5.1: A40 is audited D for MRG-1's patient, U for PID-3."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-8", "Document Registry")
    )

    root = build(full_event(row, real_ids, event_action=event_action))

    assert root.find("EventIdentification").get("EventActionCode") == event_action
    assert audit_schema.validate(root), audit_schema.error_log
    assert ipf_audit_schema.validate(root), ipf_audit_schema.error_log


def test_event_action_outside_the_row_choices_is_refused(real_ids: RealIds) -> None:
    """ITI TF-2 3.41.5.1: the Document Repository's ITI-41 action is C only."""
    row = next(
        r
        for r in ROWS
        if r["transaction"] == "ITI-41" and r["actor"] == "Document Repository"
    )

    with pytest.raises(ValueError, match="EventActionCode is 'C', not 'R'"):
        build_audit_message(
            full_event(row, real_ids, event_action="R"),
            audit_source_id=AUDIT_SOURCE_ID,
        )


@pytest.mark.parametrize(
    ("host", "type_code"),
    [("127.0.0.1", "2"), ("::1", "2"), ("[::1]", "2"), ("registry.example", "1")],
)
def test_network_access_point_type_follows_the_host_form(
    host: str, type_code: str, real_ids: RealIds
) -> None:
    """DICOM PS3.15 A.5.1: NetworkAccessPointTypeCode 2 for IP, 1 for name."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")

    root = build(full_event(row, real_ids, source=Endpoint(SOURCE.user_id, host)))

    participant = root.find("ActiveParticipant")
    assert participant.get("NetworkAccessPointID") == host
    assert participant.get("NetworkAccessPointTypeCode") == type_code


def test_endpoint_without_host_has_no_network_access_point(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.1: NetworkAccessPointID is optional."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")

    root = build(full_event(row, real_ids, source=Endpoint(SOURCE.user_id, "")))

    participant = root.find("ActiveParticipant")
    assert participant.get("NetworkAccessPointID") is None
    assert participant.get("NetworkAccessPointTypeCode") is None


def test_event_time_is_written_in_utc(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.1: EventDateTime is an xsd:dateTime with its zone."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")
    local = WHEN.astimezone(timezone(timedelta(hours=2)))

    root = build(full_event(row, real_ids, event_time=local))

    written = root.find("EventIdentification").get("EventDateTime")
    assert written == "2024-05-02T09:30:15.250Z"


def test_naive_event_time_is_refused(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.1: an EventDateTime without zone is ambiguous."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")
    event = full_event(row, real_ids, event_time=datetime(2024, 5, 2, 9, 30))

    with pytest.raises(ValueError, match="has no timezone"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def test_audit_source_names_the_node_and_its_site(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.1: AuditSourceID, AuditEnterpriseSiteID, type code."""
    row = next(r for r in ROWS if r["transaction"] == "ITI-41")

    message = build_audit_message(
        full_event(row, real_ids),
        audit_source_id=AUDIT_SOURCE_ID,
        enterprise_site_id="IHE-EU-2024",
    )

    source = etree.fromstring(message).find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == AUDIT_SOURCE_ID
    assert source.get("AuditEnterpriseSiteID") == "IHE-EU-2024"
    assert (
        source.find("AuditSourceTypeCode").get("csd-code")
        == (TABLE["audit_source"]["type_code"])
    )


def test_control_characters_from_a_peer_do_not_stop_the_record(
    real_ids: RealIds, audit_schema: etree.RelaxNG
) -> None:
    """ITI TF-2 3.8.5.1: a PID-3 with control characters is still audited."""
    row = next(
        r
        for r in ROWS
        if (r["transaction"], r["actor"]) == ("ITI-8", "Document Registry")
    )
    patient_id = real_ids.patient_id + "\x0b\x1c"

    root = build(full_event(row, real_ids, patient_id=patient_id))

    assert audit_schema.validate(root), audit_schema.error_log
    written = root.find("ParticipantObjectIdentification").get("ParticipantObjectID")
    assert written == real_ids.patient_id + "\ufffd\ufffd"


@pytest.mark.parametrize(
    ("transaction", "event_type"),
    [("Application Start", "110120"), ("Application Stop", "110121")],
)
def test_application_activity_names_only_the_application(
    transaction: str, event_type: str, audit_schema: etree.RelaxNG
) -> None:
    """DICOM PS3.15 A.5.3.1: one participant, role Application, no objects."""
    event = AuditEvent(
        transaction=transaction,
        actor="Secure Node",
        outcome=Outcome.SUCCESS,
        source=Endpoint("xdsi", "127.0.0.1"),
        event_time=WHEN,
    )

    root = build(event)

    assert audit_schema.validate(root), audit_schema.error_log
    identification = root.find("EventIdentification")
    assert coded(identification.find("EventID"))[0] == "110100"
    assert coded(identification.find("EventTypeCode"))[0] == event_type
    [participant] = root.findall("ActiveParticipant")
    assert participant.get("UserID") == "xdsi"
    assert coded(participant.find("RoleIDCode"))[0] == "110150"
    assert root.findall("ParticipantObjectIdentification") == []


def test_node_authentication_failure_names_the_refused_peer(
    audit_schema: etree.RelaxNG,
) -> None:
    """DICOM PS3.15 A.5.3.11: Security Alert, Node Authentication, subject."""
    event = AuditEvent(
        transaction="Node Authentication Failure",
        actor="Secure Node",
        outcome=Outcome.MINOR_FAILURE,
        source=Endpoint(PEER_URI, "127.0.0.1"),
        destination=Endpoint("xdsi", "127.0.0.1"),
        alert_subjects=(PEER_URI,),
        outcome_detail="peer did not return a certificate",
    )

    root = build(event)

    assert audit_schema.validate(root), audit_schema.error_log
    identification = root.find("EventIdentification")
    assert coded(identification.find("EventID"))[0] == "110113"
    assert coded(identification.find("EventTypeCode"))[0] == "110126"
    peer, node = root.findall("ActiveParticipant")
    assert (peer.get("UserID"), peer.get("UserIsRequestor")) == (PEER_URI, "true")
    assert node.get("UserIsRequestor") == "false"
    [subject] = root.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == PEER_URI
    assert subject.get("ParticipantObjectTypeCodeRole") == "13"


def test_a_row_with_a_destination_needs_one_in_the_event() -> None:
    """ITI TF-2 3.41.5.1: the Repository's import names both participants."""
    event = AuditEvent(
        transaction="ITI-41",
        actor="Document Repository",
        outcome=Outcome.SERIOUS_FAILURE,
        source=SOURCE,
    )

    with pytest.raises(ValueError, match="needs a destination participant"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)


def _media_import_row() -> dict[str, Any]:
    (row,) = [r for r in ROWS if r["transaction"] == "Media Import"]
    return row


def test_import_names_its_source_media_and_media_type(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.3.5: the Source Media participant (110155) is no
    requestor and carries a MediaIdentifier whose MediaType is of CID 405;
    the importing process (110152) is the requestor."""
    root = build(full_event(_media_import_row(), real_ids))

    importer, medium = root.findall("ActiveParticipant")
    assert importer.get("UserIsRequestor") == "true"
    assert importer.find("RoleIDCode").get("csd-code") == "110152"
    assert medium.get("UserIsRequestor") == "false"
    assert medium.get("UserID") == "file:///media/cdrom"
    assert medium.get("NetworkAccessPointID") is None
    assert medium.find("RoleIDCode").get("csd-code") == "110155"
    media = medium.find("MediaIdentifier/MediaType")
    assert (media.get("csd-code"), media.get("codeSystemName")) == ("110037", "DCM")
    event_id = root.find("EventIdentification/EventID")
    assert event_id.get("csd-code") == "110107"
    assert root.find("EventIdentification").get("EventActionCode") == "C"


def test_import_without_a_media_type_is_refused(real_ids: RealIds) -> None:
    """DICOM PS3.15 A.5.3.5: MediaIdentifier is mandatory for Source Media."""
    event = full_event(_media_import_row(), real_ids, source=SOURCE)

    with pytest.raises(ValueError, match="MediaType of its source medium"):
        build_audit_message(event, audit_source_id=AUDIT_SOURCE_ID)

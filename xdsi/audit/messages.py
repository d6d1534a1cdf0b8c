"""ATNA audit messages: the DICOM AuditMessage an actor writes per transaction.

Implements the message format of DICOM PS3.15 A.5.1 and the audit record
content of ITI TF-2 3.8.5.1, 3.18.5.1, 3.41.5.1, 3.42.5.1, 3.43.5.1,
RAD TF-3 4.68.5 and RAD TF-3 4.69.5 (DICOM PS3.15 A.5.3.7), the intake's
Data Import (DICOM PS3.15 A.5.3.5) and DICOM Instances Transferred, and the
node's Application Activity (DICOM PS3.15 A.5.3.1) and Security Alert (DICOM
PS3.15 A.5.3.11), as tabled in ``profiles/audit_events.toml``.
"""

import base64
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from functools import cache
from typing import Any, Protocol

from lxml import etree

from xdsi.metadata.codes import Code
from xdsi.profiles_loader import load_profile_table
from xdsi.wire.xml import xml_text

logger = logging.getLogger(__name__)

AUDIT_EVENTS_TABLE = "audit_events"

# DICOM PS3.15 A.5.1: NetworkAccessPointTypeCode.
_MACHINE_NAME = "1"
_IP_ADDRESS = "2"

_XML_ENCODING = re.compile(rb"""^<\?xml[^>]*encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


class Outcome(IntEnum):
    """EventOutcomeIndicator of DICOM PS3.15 A.5.1."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Endpoint:
    """One end of a transaction, as its ActiveParticipant names it.

    ``user_id`` is the SOAP endpoint URL of the responder, or the requestor's
    wsa:ReplyTo (``http://www.w3.org/2005/08/addressing/anonymous`` when it
    sent none); for ITI-8 it is the HL7 application and facility. ``host`` is
    the network access point: an IP address or a host name, or "" for none.
    ``media_type`` makes the endpoint a medium (DICOM PS3.15 A.5.3.5, Source
    Media): its MediaIdentifier's MediaType, a code of DICOM PS3.16 CID 405
    (:func:`media_type`); ``user_id`` then identifies the medium.
    """

    user_id: str
    host: str
    media_type: Code | None = None


@dataclass(frozen=True)
class DocumentRef:
    """A document named in a retrieve: ITI TF-2 3.43.5.1."""

    unique_id: str
    repository_unique_id: str | None
    home_community_id: str | None = None


@dataclass(frozen=True)
class AuditEvent:
    """What happened in one transaction, as the actor that played it saw it.

    ``source`` sent the message that carries the data (for a retrieve, the
    documents) and ``destination`` received it. ``message_id`` is written
    only where the table gives it a place: MSH-10 of ITI-8. ``event_action``
    overrides the table's EventActionCode where the row allows several
    (ITI-8: ``"U"`` for A08, ``"D"`` for the patient an A40 subsumes).
    ``event_time`` must be timezone-aware; it defaults to now, in UTC.
    ``alert_subjects`` are the URIs a Security Alert is about. An event
    whose row has one participant (Application Activity) has no
    ``destination``.
    """

    transaction: str
    actor: str
    outcome: Outcome
    source: Endpoint
    destination: Endpoint | None = None
    patient_id: str | None = None
    submission_set_unique_id: str | None = None
    documents: tuple[DocumentRef, ...] = ()
    study_instance_uids: tuple[str, ...] = ()
    query_id: str | None = None
    query_request: bytes | None = None
    message_id: str | None = None
    outcome_detail: str | None = None
    event_time: datetime | None = None
    event_action: str | None = None
    alert_subjects: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParticipantRule:
    """One ActiveParticipant of a row: endpoint, RoleIDCode, requestor."""

    endpoint: str
    role: Code | None
    requestor: bool


@dataclass(frozen=True)
class ObjectRule:
    """One kind of ParticipantObjectIdentification a row writes, and how many.

    ``maximum`` is None when unbounded; the counts bind successful
    transactions only (see :func:`build_audit_message`).
    """

    kind: str
    minimum: int
    maximum: int | None
    message_id_detail: str | None


@dataclass(frozen=True)
class AuditEventRule:
    """One row of ``profiles/audit_events.toml``: a (transaction, actor)."""

    transaction: str
    actor: str
    clause: str
    event_id: Code
    # None for an event of no transaction (DICOM Instances Accessed).
    event_type: Code | None
    event_action: str
    event_action_choices: tuple[str, ...]
    participants: tuple[ParticipantRule, ...]
    objects: tuple[ObjectRule, ...]


class _OfPatient(Protocol):
    """An instance as a study's audit record counts it."""

    patient_id: str | None
    study_instance_uid: str


def studies_by_patient(
    instances: Iterable[_OfPatient],
) -> dict[str | None, tuple[str, ...]]:
    """The studies of ``instances`` by patient, each in the order first
    met: one audit record names one patient (DICOM PS3.15 A.5.3.7)."""
    found: dict[str | None, dict[str, None]] = {}
    for instance in instances:
        found.setdefault(instance.patient_id, {})[instance.study_instance_uid] = None
    return {patient: tuple(studies) for patient, studies in found.items()}


def _code(entry: Mapping[str, str]) -> Code:
    return Code(code=entry["code"], scheme=entry["scheme"], display=entry["display"])


@cache
def _table() -> dict[str, Any]:
    return load_profile_table(AUDIT_EVENTS_TABLE)


def media_type(name: str) -> Code:
    """The MediaType ``name`` of ``[media_types]`` (DICOM PS3.16 CID 405)."""
    return _code(_table()["media_types"][name])


@cache
def audit_event_rules() -> dict[tuple[str, str], AuditEventRule]:
    """Return the rows of ``audit_events.toml`` by (transaction, actor)."""
    table = _table()
    roles = {name: _code(entry) for name, entry in table["roles"].items()}
    rules = {}
    for row in table["events"]:
        participants = tuple(
            ParticipantRule(
                p["endpoint"], roles[p["role"]] if "role" in p else None, p["requestor"]
            )
            for p in row["participants"]
        )
        objects = tuple(
            ObjectRule(o["kind"], o["min"], o.get("max"), o.get("message_id_detail"))
            for o in row["objects"]
        )
        rule = AuditEventRule(
            transaction=row["transaction"],
            actor=row["actor"],
            clause=row["clause"],
            event_id=_code(row["event_id"]),
            event_type=_code(row["event_type"]) if "event_type" in row else None,
            event_action=row["event_action"],
            event_action_choices=tuple(row.get("event_action_choices", ())),
            participants=participants,
            objects=objects,
        )
        rules[rule.transaction, rule.actor] = rule
    return rules


def _source_media() -> Code:
    return _code(_table()["roles"]["source_media"])


def _text(value: str) -> str:
    """Return ``value`` with characters XML cannot carry replaced by U+FFFD.

    A peer can put control characters in what it sends (a PID-3 over MLLP);
    the audit record of that transaction must still be written.
    """
    return xml_text(value)


def _coded(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    # DICOM PS3.15 A.5.1 CodedValueType: codeSystemName and originalText are
    # both mandatory.
    return etree.SubElement(
        parent,
        tag,
        {
            "csd-code": code.code,
            "codeSystemName": code.scheme,
            "originalText": code.display,
        },
    )


def _detail(parent: etree._Element, detail_type: str, value: str) -> None:
    # DICOM PS3.15 A.5.1 ValuePair: every value is base64, whatever it holds.
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    etree.SubElement(parent, "ParticipantObjectDetail", type=detail_type, value=encoded)


def _network_access_point_type(host: str) -> str:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return _MACHINE_NAME
    return _IP_ADDRESS


def _query_encoding(request: bytes) -> str:
    """Return an XML request's encoding: its declaration's, or UTF-8."""
    match = _XML_ENCODING.match(request.lstrip(b"\xef\xbb\xbf"))
    return match.group(1).decode("ascii") if match else "UTF-8"


def _event_time(event: AuditEvent) -> str:
    when = event.event_time or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError(
            f"{event.transaction} audit event_time {when.isoformat()} has no "
            "timezone; DICOM PS3.15 A.5.1 EventDateTime needs one"
        )
    text = when.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


@dataclass(frozen=True)
class _Object:
    """One participant object of an event, before a row shapes it."""

    object_id: str
    document: DocumentRef | None = None
    query_request: bytes | None = None


def _objects(event: AuditEvent, rule: AuditEventRule) -> dict[str, tuple[_Object, ...]]:
    """Return the participant objects the event carries, by kind.

    The query goes to the kind the row writes it as: the stored query of
    ITI-18 ("query") or the SOP queried of a DICOM Query event
    ("sop_queried").
    """
    if (event.query_id is None) != (event.query_request is None):
        raise ValueError(
            f"{event.transaction} audit needs query_id and query_request together "
            "(ITI TF-2 3.18.5.1 writes both on one participant object)"
        )
    objects: dict[str, tuple[_Object, ...]] = {
        "patient": (),
        "submission_set": (),
        "query": (),
        "sop_queried": (),
        "document": tuple(_Object(d.unique_id, document=d) for d in event.documents),
        "study": tuple(_Object(uid) for uid in event.study_instance_uids),
        "alert_subject": tuple(_Object(uri) for uri in event.alert_subjects),
    }
    if event.patient_id is not None:
        objects["patient"] = (_Object(event.patient_id),)
    if event.submission_set_unique_id is not None:
        objects["submission_set"] = (_Object(event.submission_set_unique_id),)
    if event.query_id is not None:
        kind = (
            "sop_queried"
            if any(o.kind == "sop_queried" for o in rule.objects)
            else "query"
        )
        objects[kind] = (_Object(event.query_id, query_request=event.query_request),)
    return objects


def _check_objects(
    rule: AuditEventRule, event: AuditEvent, objects: Mapping[str, tuple[_Object, ...]]
) -> None:
    """Raise ValueError unless the event's objects fit the row."""
    allowed = {o.kind for o in rule.objects}
    stray = sorted(
        kind for kind, found in objects.items() if found and kind not in allowed
    )
    if stray:
        raise ValueError(
            f"{rule.transaction} {rule.actor} audit record has no place for "
            f"{', '.join(stray)} ({rule.clause})"
        )
    for o in rule.objects:
        count = len(objects[o.kind])
        if o.maximum is not None and count > o.maximum:
            raise ValueError(
                f"{rule.transaction} {rule.actor} audit record takes at most "
                f"{o.maximum} {o.kind}, got {count} ({rule.clause})"
            )
        # A failed transaction is audited with whatever could be read from it.
        if event.outcome is Outcome.SUCCESS and count < o.minimum:
            raise ValueError(
                f"{rule.transaction} {rule.actor} audit record of a success needs "
                f"at least {o.minimum} {o.kind}, got {count} ({rule.clause})"
            )


def _event_action(rule: AuditEventRule, event: AuditEvent) -> str:
    if event.event_action is None or event.event_action == rule.event_action:
        return rule.event_action
    if event.event_action not in rule.event_action_choices:
        raise ValueError(
            f"{rule.transaction} {rule.actor} EventActionCode is "
            f"{rule.event_action!r}, not {event.event_action!r} ({rule.clause})"
        )
    return event.event_action


def _participant_object(
    spec: Mapping[str, Any], rule: ObjectRule, item: _Object, message_id: str | None
) -> etree._Element:
    """Return one ParticipantObjectIdentification, written as ``spec`` says."""
    element = etree.Element(
        "ParticipantObjectIdentification",
        ParticipantObjectID=_text(item.object_id),
        ParticipantObjectTypeCode=spec["type_code"],
        ParticipantObjectTypeCodeRole=spec["type_code_role"],
    )
    _coded(element, "ParticipantObjectIDTypeCode", _code(spec["id_type"]))

    if item.query_request is not None:
        query = etree.SubElement(element, "ParticipantObjectQuery")
        query.text = base64.b64encode(item.query_request).decode("ascii")
        if "encoding_detail" in spec:
            _detail(
                element, spec["encoding_detail"], _query_encoding(item.query_request)
            )
    else:
        # Limitation: the event carries no names, and DICOM PS3.15 A.5.1 wants
        # a ParticipantObjectName or ParticipantObjectQuery on every object,
        # so the name repeats the object's id.
        etree.SubElement(element, "ParticipantObjectName").text = _text(item.object_id)

    document = item.document
    if document is not None and document.repository_unique_id is not None:
        repository_type = spec["repository_unique_id_detail"]
        _detail(element, repository_type, document.repository_unique_id)
    if document is not None and document.home_community_id is not None:
        _detail(element, spec["home_community_id_detail"], document.home_community_id)
    if rule.message_id_detail is not None and message_id is not None:
        _detail(element, rule.message_id_detail, message_id)
    return element


def build_audit_message(
    event: AuditEvent, *, audit_source_id: str, enterprise_site_id: str | None = None
) -> bytes:
    """Return the AuditMessage XML ``event.actor`` writes for the transaction.

    The row of ``profiles/audit_events.toml`` for (transaction, actor) fixes
    EventID, EventTypeCode, EventActionCode, the participants' roles and
    which participant objects are written. The result is valid against the
    schema of DICOM PS3.15 A.5.1.

    A successful transaction must carry every object the row requires (for
    ITI-41, the patient and the SubmissionSet); a failed one is audited with
    whatever it carries, since a request that could not be read is exactly
    what the audit trail must still show.

    Raises
    ------
    ValueError
        No row for (transaction, actor); the event carries an object the row
        has no place for, or too few or too many; ``event_action`` is not
        allowed for the row; ``event_time`` is naive.
    """
    rule = audit_event_rules().get((event.transaction, event.actor))
    if rule is None:
        raise ValueError(
            f"no audit record is defined for {event.actor} in {event.transaction}; "
            f"{AUDIT_EVENTS_TABLE}.toml lists the pairs"
        )
    objects = _objects(event, rule)
    _check_objects(rule, event, objects)

    # EventIdentification: DICOM PS3.15 A.5.1.
    message = etree.Element("AuditMessage")
    identification = etree.SubElement(
        message,
        "EventIdentification",
        EventActionCode=_event_action(rule, event),
        EventDateTime=_event_time(event),
        EventOutcomeIndicator=str(int(event.outcome)),
    )
    _coded(identification, "EventID", rule.event_id)
    if rule.event_type is not None:
        _coded(identification, "EventTypeCode", rule.event_type)
    if event.outcome_detail is not None:
        description = etree.SubElement(identification, "EventOutcomeDescription")
        description.text = _text(event.outcome_detail)

    for participant in rule.participants:
        endpoint = getattr(event, participant.endpoint)
        if endpoint is None:
            raise ValueError(
                f"{rule.transaction} {rule.actor} audit record needs a "
                f"{participant.endpoint} participant ({rule.clause})"
            )
        active = etree.SubElement(
            message,
            "ActiveParticipant",
            UserID=_text(endpoint.user_id),
            UserIsRequestor="true" if participant.requestor else "false",
        )
        if endpoint.host:
            active.set("NetworkAccessPointID", _text(endpoint.host))
            active.set(
                "NetworkAccessPointTypeCode", _network_access_point_type(endpoint.host)
            )
        if participant.role is not None:
            _coded(active, "RoleIDCode", participant.role)
        # DICOM PS3.15 A.5.3.5: a Source Media participant names its medium.
        if participant.role == _source_media() and endpoint.media_type is None:
            raise ValueError(
                f"{rule.transaction} {rule.actor} audit record needs the "
                f"MediaType of its {participant.endpoint} medium ({rule.clause})"
            )
        if endpoint.media_type is not None:
            media = etree.SubElement(active, "MediaIdentifier")
            _coded(media, "MediaType", endpoint.media_type)

    source = etree.SubElement(
        message, "AuditSourceIdentification", AuditSourceID=_text(audit_source_id)
    )
    if enterprise_site_id is not None:
        source.set("AuditEnterpriseSiteID", _text(enterprise_site_id))
    etree.SubElement(
        source,
        "AuditSourceTypeCode",
        {"csd-code": _table()["audit_source"]["type_code"]},
    )

    # ParticipantObjectIdentification, in the row's order.
    specs = _table()["objects"]
    for object_rule in rule.objects:
        for item in objects[object_rule.kind]:
            spec = specs[object_rule.kind]
            message.append(
                _participant_object(spec, object_rule, item, event.message_id)
            )
    return etree.tostring(message, xml_declaration=True, encoding="UTF-8")

"""Document Registry: ITI-42 Register Document Set-b, ITI-18 Registry Stored
Query, and the patients of the ITI-8 Patient Identity Feed.

ITI TF-2 3.42 (register), 3.18 (query), 3.8 (feed). A submission lands whole
or not at all: one database transaction (DESIGN.md principle 6).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flask import Flask
from lxml import etree
from sqlalchemy import Engine, and_, exists, insert, or_, select
from sqlalchemy.exc import IntegrityError

from xdsi import audit, ns, wire
from xdsi.actors.soap_endpoint import Peer, Reply, soap_app, transaction
from xdsi.config import Settings
from xdsi.errors import (
    DuplicateUniqueIdInRegistry,
    MetadataInvalid,
    NonIdenticalHash,
    ResultNotSinglePatient,
    StoredQueryParamNumber,
    TooManyResults,
    UnknownPatientId,
    XdsError,
)
from xdsi.hl7.adt import PatientIdentity, handle_feed, read_ack
from xdsi.metadata import ebrim, stored_query, validation
from xdsi.metadata.ebrim import RegistryObject, Submission
from xdsi.metadata.responses import RegistryError, registry_response, status_of
from xdsi.store.schema import patient, registry_code, registry_object, registry_value
from xdsi.wire import SoapMessage
from xdsi.wire.schema import schema_errors

logger = logging.getLogger(__name__)

ACTOR = "registry"


def pad_dtm(value: str | None) -> str | None:
    """Pad a DTM to 14 digits so that ranges compare as strings."""
    if not value:
        return None
    return (value + "00000000000000")[:14]


@dataclass(frozen=True)
class RegisterOutcome:
    errors: list[RegistryError]
    submission_set_unique_id: str | None
    patient_id: str | None
    entry_uuids: tuple[str, ...]


def as_registry_errors(errors: Sequence[XdsError], actor: str) -> list[RegistryError]:
    return [RegistryError(e.code_for(actor), e.message, e.location) for e in errors]


class Registry:
    """The Document Registry's store and rules, over one database."""

    def __init__(
        self, settings: Settings, engine: Engine, auditor: audit.Auditor
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.auditor = auditor

    # --- ITI-8 ----------------------------------------------------------

    def feed(self, message: str) -> str:
        """Answer one ITI-8 message with its ACK, and audit it."""
        ack, identity = handle_feed(
            message,
            self.add_patient,
            assigning_authority=self.settings.node.assigning_authority,
        )
        # The ACK's MSH-5/MSH-6 name the feed's sender, MSH-3/MSH-4 this
        # registry (ITI TF-2 3.8.5.1: HL7 application|facility as UserID).
        summary = read_ack(ack)
        self.auditor.record(
            audit.AuditEvent(
                transaction="ITI-8",
                actor="Document Registry",
                outcome=audit.Outcome.SUCCESS
                if identity is not None
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(summary.receiver or "unknown", "unknown"),
                destination=audit.Endpoint(
                    summary.sender or "xdsi", self.settings.node.host
                ),
                patient_id=identity.patient_id if identity else None,
                message_id=summary.control_id or None,
            )
        )
        return ack

    def add_patient(self, identity: PatientIdentity) -> None:
        """Record a patient of the affinity domain (ITI TF-2 3.8.4.1.3)."""
        with self.engine.begin() as conn:
            known = conn.execute(
                select(patient.c.id).where(patient.c.patient_id == identity.patient_id)
            ).first()
            if known is None:
                conn.execute(insert(patient).values(patient_id=identity.patient_id))
        logger.info(
            "ITI-8 Patient Identity Feed: %s %s",
            identity.trigger,
            "new patient" if known is None else "known patient",
        )

    def knows_patient(self, patient_id: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(patient.c.id).where(patient.c.patient_id == patient_id)
                ).first()
                is not None
            )

    # --- ITI-42 ---------------------------------------------------------

    def register(self, request: etree._Element) -> RegisterOutcome:
        """Register a SubmitObjectsRequest; return the errors, if any."""
        schema = transaction("ITI-42")["request_schema"]
        problems = schema_errors(request, schema)
        if problems:
            error = MetadataInvalid(
                f"SubmitObjectsRequest is not valid against {schema}: "
                + "; ".join(problems)
            )
            return RegisterOutcome(as_registry_errors([error], ACTOR), None, None, ())
        submission = ebrim.read_registry_objects(request)
        errors = validation.check_submission(submission)
        submission_set = (
            submission.submission_sets[0]
            if len(submission.submission_sets) == 1
            else None
        )
        patient_id = submission_set.patient_id if submission_set else None
        ss_unique_id = submission_set.unique_id if submission_set else None
        if errors:
            return RegisterOutcome(
                as_registry_errors(errors, ACTOR), ss_unique_id, patient_id, ()
            )

        validation.assign_entry_uuids(submission)
        _gather_loose_classifications(submission)
        validation.set_status(submission, ebrim.STATUS_APPROVED)
        try:
            with self.engine.begin() as conn:
                errors = self._check_against_registry(conn, submission, patient_id)
                if errors:
                    raise _Rollback(errors)
                self._insert(conn, submission)
        except _Rollback as rollback:
            return RegisterOutcome(
                as_registry_errors(rollback.errors, ACTOR), ss_unique_id, patient_id, ()
            )
        except IntegrityError:
            # Another submission took a uniqueId between check and insert.
            error = DuplicateUniqueIdInRegistry(
                "a uniqueId of the submission was registered concurrently"
            )
            return RegisterOutcome(
                as_registry_errors([error], ACTOR), ss_unique_id, patient_id, ()
            )
        return RegisterOutcome(
            [], ss_unique_id, patient_id, tuple(o.id for o in submission.objects)
        )

    def _check_against_registry(
        self,
        conn,
        submission: Submission,  # type: ignore[no-untyped-def]
        patient_id: str | None,
    ) -> list[XdsError]:
        errors: list[XdsError] = []
        if (
            patient_id is None
            or conn.execute(
                select(patient.c.id).where(patient.c.patient_id == patient_id)
            ).first()
            is None
        ):
            errors.append(
                UnknownPatientId(
                    "the SubmissionSet's patientId is not known to this "
                    "Document Registry "
                    "(no Patient Identity Feed received for it)",
                    "SubmissionSet",
                )
            )

        for obj in submission.objects:
            held = conn.execute(
                select(registry_object.c.entry_uuid).where(
                    registry_object.c.entry_uuid == obj.id
                )
            ).first()
            if held is not None:
                errors.append(
                    MetadataInvalid(
                        f"entryUUID {obj.id} is already in the Document Registry",
                        obj.id,
                    )
                )
            if not obj.unique_id:
                continue
            row = conn.execute(
                select(registry_object.c.hash, registry_object.c.kind).where(
                    registry_object.c.unique_id == obj.unique_id
                )
            ).first()
            if row is None:
                continue
            new_hash = (obj.slot("hash") or "").lower()
            if (
                obj.kind == ebrim.DOCUMENT_ENTRY
                and row.hash
                and new_hash
                and row.hash != new_hash
            ):
                errors.append(
                    NonIdenticalHash(
                        f"DocumentEntry uniqueId {obj.unique_id} is registered with "
                        "another hash",
                        obj.unique_id,
                    )
                )
            else:
                errors.append(
                    DuplicateUniqueIdInRegistry(
                        f"{obj.kind} uniqueId {obj.unique_id} is already registered",
                        obj.unique_id,
                    )
                )
        return errors

    def _insert(self, conn, submission: Submission) -> None:  # type: ignore[no-untyped-def]
        submission_time = None
        for ss in submission.submission_sets:
            submission_time = pad_dtm(ss.slot("submissionTime"))
        for obj in submission.objects:
            if obj.kind == ebrim.DOCUMENT_ENTRY and not obj.logical_id:
                obj.element.set("lid", obj.id)
            conn.execute(
                insert(registry_object).values(
                    entry_uuid=obj.id,
                    kind=obj.kind,
                    unique_id=obj.unique_id,
                    patient_id=obj.patient_id,
                    status=ebrim.STATUS_APPROVED,
                    object_type=obj.object_type or None,
                    mime_type=obj.mime_type or None,
                    logical_id=obj.element.get("lid"),
                    version=1,
                    hash=(obj.slot("hash") or "").lower() or None,
                    size=int(obj.slot("size") or 0) if obj.slot("size") else None,
                    repository_unique_id=obj.slot("repositoryUniqueId"),
                    creation_time=pad_dtm(obj.slot("creationTime")),
                    service_start_time=pad_dtm(obj.slot("serviceStartTime")),
                    service_stop_time=pad_dtm(obj.slot("serviceStopTime")),
                    submission_time=(
                        pad_dtm(obj.slot("submissionTime")) or submission_time
                    ),
                    association_type=obj.association_type or None,
                    source_object=obj.source_object or None,
                    target_object=obj.target_object or None,
                    xml=etree.tostring(obj.element),
                )
            )
            self._insert_index(conn, obj)

    def _insert_index(self, conn, obj: RegistryObject) -> None:  # type: ignore[no-untyped-def]
        if obj.kind not in ebrim.metadata_table():
            return
        attributes = ebrim.metadata_table()[obj.kind]["attributes"]
        codes = []
        for name, spec in attributes.items():
            if spec["kind"] == "classification":
                codes.extend(
                    {
                        "entry_uuid": obj.id,
                        "attribute": name,
                        "code": c.code,
                        "scheme": c.scheme,
                    }
                    for c in obj.codes(name)
                )
        if codes:
            conn.execute(insert(registry_code), codes)
        values = [
            {"entry_uuid": obj.id, "attribute": "authorPerson", "value": person}
            for author in obj.authors()
            for person in author.get("authorPerson", [])
        ]
        reference_slot = attributes.get("referenceIdList", {}).get("slot")
        if reference_slot:
            values.extend(
                {"entry_uuid": obj.id, "attribute": "referenceIdList", "value": v}
                for v in obj.slots.get(reference_slot, [])
            )
        if values:
            conn.execute(insert(registry_value), values)

    # --- ITI-18 ---------------------------------------------------------

    def query(
        self, request: etree._Element
    ) -> tuple[etree._Element, stored_query.StoredQuery]:
        """Run a stored query and build its AdhocQueryResponse."""
        query = stored_query.read_query(request)
        if query.name == "FindDocuments":
            statement = self._find_documents(query)
        elif query.name == "GetDocuments":
            statement = self._get_documents(query)
        else:
            # Limitation: only FindDocuments and GetDocuments are answered; the
            # other stored queries of ITI TF-2 3.18.4.1.2.3.7 get XDSRegistryError.
            raise _Unsupported(query.name)

        limit = self.settings.registry.max_results
        with self.engine.connect() as conn:
            rows = conn.execute(statement.limit(limit + 1)).all()
        # ITI TF-2 3.18.4.1.2.3.7: a Get query answers for one patient only.
        if query.name.startswith("Get") and len({r.patient_id for r in rows}) > 1:
            raise ResultNotSinglePatient(
                f"{query.name} results belong to more than one patient"
            )
        if len(rows) > limit:
            raise TooManyResults(
                f"the query matches more than {limit} objects; narrow it"
            )
        return _query_response(rows, query.return_type), query

    def _find_documents(self, query: stored_query.StoredQuery):  # type: ignore[no-untyped-def]
        """ITI TF-2 3.18.4.1.2.3.7.1 FindDocuments."""
        ro = registry_object.c
        conditions = [
            ro.kind == ebrim.DOCUMENT_ENTRY,
            ro.patient_id == query.single("$XDSDocumentEntryPatientId"),
            ro.status.in_(query.values("$XDSDocumentEntryStatus")),
        ]
        object_types = query.values("$XDSDocumentEntryType") or [
            ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY]["object_type_stable"]
        ]
        conditions.append(ro.object_type.in_(object_types))

        for attribute, spec in ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY][
            "attributes"
        ].items():
            param = spec.get("query")
            if not param or param not in query.parameters:
                continue
            if spec["kind"] == "classification":
                for group in query.codes(param):
                    conditions.append(
                        exists().where(
                            registry_code.c.entry_uuid == ro.entry_uuid,
                            registry_code.c.attribute == attribute,
                            or_(
                                *[
                                    and_(
                                        registry_code.c.code == c.code,
                                        registry_code.c.scheme == c.scheme,
                                    )
                                    for c in group
                                ]
                            ),
                        )
                    )
            else:
                for group in query.parameters[param]:
                    conditions.append(
                        exists().where(
                            registry_value.c.entry_uuid == ro.entry_uuid,
                            registry_value.c.attribute == attribute,
                            registry_value.c.value.in_(group),
                        )
                    )

        for group in query.parameters.get("$XDSDocumentEntryAuthorPerson", []):
            conditions.append(
                exists().where(
                    registry_value.c.entry_uuid == ro.entry_uuid,
                    registry_value.c.attribute == "authorPerson",
                    or_(*[registry_value.c.value.like(v, escape="\\") for v in group]),
                )
            )

        ranges = {
            "CreationTime": ro.creation_time,
            "ServiceStartTime": ro.service_start_time,
            "ServiceStopTime": ro.service_stop_time,
        }
        for name, column in ranges.items():
            low = query.single(f"$XDSDocumentEntry{name}From")
            high = query.single(f"$XDSDocumentEntry{name}To")
            if low is not None:
                _check_dtm(f"$XDSDocumentEntry{name}From", low)
                conditions.append(column >= pad_dtm(low))
            if high is not None:
                _check_dtm(f"$XDSDocumentEntry{name}To", high)
                conditions.append(column < pad_dtm(high))
        return (
            select(ro.entry_uuid, ro.xml, ro.patient_id)
            .where(*conditions)
            .order_by(ro.creation_time, ro.entry_uuid)
        )

    def _get_documents(self, query: stored_query.StoredQuery):  # type: ignore[no-untyped-def]
        """ITI TF-2 3.18.4.1.2.3.7.5 GetDocuments."""
        ro = registry_object.c
        if "$XDSDocumentEntryEntryUUID" in query.parameters:
            match = ro.entry_uuid.in_(query.values("$XDSDocumentEntryEntryUUID"))
        else:
            match = ro.unique_id.in_(query.values("$XDSDocumentEntryUniqueId"))
        return (
            select(ro.entry_uuid, ro.xml, ro.patient_id)
            .where(ro.kind == ebrim.DOCUMENT_ENTRY, match)
            .order_by(ro.entry_uuid)
        )

    # --- SOAP edge -------------------------------------------------------

    def app(self, spool_root) -> Flask:  # type: ignore[no-untyped-def]
        return soap_app(
            "registry",
            self.settings.registry.path,
            {
                "ITI-42": self.handle_register,
                "ITI-18": self.handle_query,
            },
            spool_root,
        )

    def handle_register(self, message: SoapMessage, peer: Peer) -> Reply:
        started = time.monotonic()
        try:
            outcome = self.register(message.body)
        except wire.SoapFault:
            raise
        except Exception:
            logger.exception("ITI-42 Register Document Set-b failed")
            outcome = RegisterOutcome(
                [RegistryError("XDSRegistryError", "internal Document Registry error")],
                None,
                None,
                (),
            )
        status = status_of(outcome.errors)
        self.auditor.record(
            audit.AuditEvent(
                transaction="ITI-42",
                actor="Document Registry",
                outcome=audit.Outcome.SUCCESS
                if not outcome.errors
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(peer.reply_to, peer.host),
                destination=audit.Endpoint(peer.endpoint, self.settings.node.host),
                patient_id=outcome.patient_id,
                submission_set_unique_id=outcome.submission_set_unique_id,
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s, MessageID %s, SubmissionSet %s, %d objects, "
            "errors %s, %.3f s",
            "ITI-42",
            "Register Document Set-b",
            peer.host,
            status.name,
            message.message_id,
            outcome.submission_set_unique_id,
            len(outcome.entry_uuids),
            [e.code for e in outcome.errors] or "none",
            time.monotonic() - started,
        )
        return Reply(registry_response(outcome.errors))

    def handle_query(self, message: SoapMessage, peer: Peer) -> Reply:
        started = time.monotonic()
        query: stored_query.StoredQuery | None = None
        errors: list[RegistryError] = []
        try:
            body, query = self.query(message.body)
        except XdsError as exc:
            errors = as_registry_errors([exc], ACTOR)
        except _Unsupported as exc:
            errors = [
                RegistryError(
                    "XDSRegistryError",
                    f"stored query {exc.name} is not supported by this "
                    "Document Registry",
                )
            ]
        except Exception:
            logger.exception("ITI-18 Registry Stored Query failed")
            errors = [
                RegistryError("XDSRegistryError", "internal Document Registry error")
            ]
        if errors:
            body = _query_response([], stored_query.RETURN_OBJECT_REF, errors)
        patient_id = query.single("$XDSDocumentEntryPatientId") if query else None
        self.auditor.record(
            audit.AuditEvent(
                transaction="ITI-18",
                actor="Document Registry",
                outcome=audit.Outcome.SUCCESS
                if not errors
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(peer.reply_to, peer.host),
                destination=audit.Endpoint(peer.endpoint, self.settings.node.host),
                patient_id=patient_id,
                # ITI TF-2 3.18.5.1: a failed query is audited too, with the
                # id it asked for.
                query_id=message.body.find(f"{{{ns.RIM}}}AdhocQuery").get("id", ""),
                query_request=etree.tostring(message.body),
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s %s, MessageID %s, %d results, errors %s, %.3f s",
            "ITI-18",
            "Registry Stored Query",
            peer.host,
            query.name if query else "?",
            body.get("status", "").rsplit(":")[-1],
            message.message_id,
            len(body.findall(f"{{{ns.RIM}}}RegistryObjectList/*")),
            [e.code for e in errors] or "none",
            time.monotonic() - started,
        )
        return Reply(body)


class _Rollback(Exception):
    def __init__(self, errors: list[XdsError]) -> None:
        super().__init__("rollback")
        self.errors = errors


class _Unsupported(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _check_dtm(param: str, value: str) -> None:
    if not validation.is_dtm(value):
        raise StoredQueryParamNumber(
            f"{param} value {value!r} is not a DTM (ITI TF-3 4.2.3.1.6)", param
        )


def _gather_loose_classifications(submission: Submission) -> None:
    """Move stand-alone Classifications into the object they classify.

    ITI TF-3 4.2.3.3.1 lets a SubmissionSet's classification node stand
    alone in the RegistryObjectList; stored inside its object, it comes
    back with the object in a LeafClass query response.
    """
    by_id = {o.id: o for o in submission.objects}
    object_list = submission.element.find(f".//{{{ns.RIM}}}RegistryObjectList")
    if object_list is None:
        return
    for element in object_list.findall(f"{{{ns.RIM}}}Classification"):
        target = by_id.get(element.get("classifiedObject", ""))
        if target is None:
            continue
        moved = copy.deepcopy(element)
        identifiers = target.element.findall(f"{{{ns.RIM}}}ExternalIdentifier")
        if identifiers:
            identifiers[0].addprevious(moved)
        else:
            target.element.append(moved)


def _query_response(
    rows: Sequence, return_type: str, errors: list[RegistryError] | None = None
) -> etree._Element:
    """Build the AdhocQueryResponse (ITI TF-2 3.18.4.1.3)."""
    errors = errors or []
    response = etree.Element(
        f"{{{ns.QUERY}}}AdhocQueryResponse",
        nsmap={"query": ns.QUERY, "rim": ns.RIM, "rs": ns.RS},
    )
    response.set("status", status_of(errors).value)
    if errors:
        response.append(registry_response(errors)[0])
    object_list = etree.SubElement(response, f"{{{ns.RIM}}}RegistryObjectList")
    for row in rows:
        if return_type == stored_query.RETURN_LEAF_CLASS:
            object_list.append(wire.parse_xml(row.xml))
        else:
            etree.SubElement(object_list, f"{{{ns.RIM}}}ObjectRef", id=row.entry_uuid)
    return response

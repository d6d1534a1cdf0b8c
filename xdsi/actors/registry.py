"""Document Registry: ITI-42 Register Document Set-b, ITI-18 Registry Stored
Query, ITI-57 Update Document Set, and the patients of the ITI-8 feed.

ITI TF-2 3.42 (register, with the Associations of ITI TF-3 4.2.2 to objects
already registered and the document relationships of ITI TF-3 4.2.2.2),
3.18 (the stored queries of ITI TF-2 3.18.4.1.2.3.7), 3.57 (availabilityStatus
updates of ITI TF-2 3.57.4.1.3.3.2 only), 3.8 (feed). A
submission lands whole or not at all: one database transaction (DESIGN.md
principle 6). Queries are SQL on the indexed columns and child tables.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask
from lxml import etree
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    and_,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from xdsi import audit, logs, ns, wire
from xdsi.actors.soap_endpoint import Peer, Reply, soap_app, transaction
from xdsi.config import Settings
from xdsi.errors import (
    DuplicateUniqueIdInRegistry,
    MetadataInvalid,
    NonIdenticalHash,
    PatientIdDoesNotMatch,
    ResultNotSinglePatient,
    TooManyResults,
    UnknownPatientId,
    XdsError,
)
from xdsi.hl7.adt import (
    TRIGGER_EVENTS,
    FeedAction,
    FeedRejected,
    PatientIdentity,
    handle_feed,
    read_ack,
)
from xdsi.metadata import ebrim, stored_query, validation
from xdsi.metadata import update as metadata_update
from xdsi.metadata.ebrim import RegistryObject, Submission
from xdsi.metadata.responses import RegistryError, registry_response, status_of
from xdsi.store.schema import (
    locking_transaction,
    patient,
    registry_code,
    registry_object,
    registry_value,
)
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
        # Loaded once, so that a code set named in the configuration but
        # missing stops the node at start-up rather than at the first ITI-42.
        self.code_sets = validation.load_code_sets(settings.registry.code_sets)

    # --- ITI-8 ----------------------------------------------------------

    def feed(self, message: str) -> str:
        """Answer one ITI-8 message with its ACK, and audit it.

        ITI TF-2 3.8.5.1: a create is audited with EventActionCode C and an
        A08 with U; an A40 writes two records, D for the subsumed patient and
        U for the surviving one.
        """
        node = self.settings.node
        ack, identity = handle_feed(
            message,
            self.apply_feed,
            assigning_authority=node.assigning_authority,
            other_authorities=node.other_assigning_authorities,
        )
        # The ACK's MSH-5/MSH-6 name the feed's sender, MSH-3/MSH-4 this
        # registry (ITI TF-2 3.8.5.1: HL7 application|facility as UserID).
        summary = read_ack(ack)
        event = TRIGGER_EVENTS.get(summary.trigger)
        if identity is None:
            audited = [(None, _AUDIT_ACTION[event.action] if event else None)]
        elif identity.action is FeedAction.MERGE:
            audited = [
                (identity.subsumed_patient_id, _SUBSUMED_AUDIT_ACTION),
                (identity.patient_id, _AUDIT_ACTION[FeedAction.MERGE]),
            ]
        else:
            audited = [(identity.patient_id, _AUDIT_ACTION[identity.action])]
        for patient_id, event_action in audited:
            self.auditor.record(
                audit.AuditEvent(
                    transaction="ITI-8",
                    actor="Document Registry",
                    outcome=audit.Outcome.SUCCESS
                    if identity is not None
                    else audit.Outcome.SERIOUS_FAILURE,
                    source=audit.Endpoint(summary.receiver or "unknown", "unknown"),
                    destination=audit.Endpoint(
                        summary.sender or "xdsi", self.settings.node.advertised
                    ),
                    patient_id=patient_id,
                    message_id=summary.control_id or None,
                    event_action=event_action,
                )
            )
        return ack

    def apply_feed(self, identity: PatientIdentity) -> None:
        """Apply one ITI-8 message to the patients, as its event demands.

        Raises
        ------
        FeedRejected
            AE 204 or AE 205 when the patients named do not allow the event.
        """
        if identity.action is FeedAction.MERGE:
            self.merge_patients(identity.patient_id, identity.subsumed_patient_id)
        elif identity.action is FeedAction.UPDATE:
            self.update_patient(identity)
        else:
            self.add_patient(identity)

    def add_patient(self, identity: PatientIdentity) -> None:
        """Record a patient of the affinity domain (ITI TF-2 3.8.4.1.3).

        A create for a known patient changes nothing.

        Raises
        ------
        FeedRejected
            AE 205 when an A40 subsumed the patient id; ITI-8 has no unmerge.
        """
        with self.engine.begin() as conn:
            known = conn.execute(
                select(patient.c.merged_into).where(
                    patient.c.patient_id == identity.patient_id
                )
            ).first()
            if known is not None and known.merged_into is not None:
                raise FeedRejected(
                    "AE",
                    "205",
                    "the PID-3 patient id was merged into another by an A40; "
                    "it cannot be created again (ITI TF-2 3.8.4.2.3)",
                )
            if known is None:
                conn.execute(insert(patient).values(patient_id=identity.patient_id))
        logger.info(
            "ITI-8 Patient Identity Feed: %s %s",
            identity.trigger,
            "new patient" if known is None else "known patient",
        )

    def update_patient(self, identity: PatientIdentity) -> None:
        """Record an A08 Update Patient Information (ITI TF-2 3.8.4.1.1).

        The Document Registry keeps no demographics (ITI TF-2 3.8.4.1.3), so
        an update only stamps the patient's ``updated_at``.

        Raises
        ------
        FeedRejected
            AE 204 when the patient is unknown or subsumed by an A40: an
            update cannot stand in for a lost create.
        """
        with self.engine.begin() as conn:
            updated = conn.execute(
                update(patient)
                .where(
                    patient.c.patient_id == identity.patient_id,
                    patient.c.merged_into.is_(None),
                )
                .values(updated_at=datetime.now(UTC))
            ).rowcount
        if updated != 1:
            raise FeedRejected(
                "AE",
                "204",
                "the PID-3 patient is not known to this Document Registry, or "
                "was merged into another",
            )
        logger.info("ITI-8 Patient Identity Feed: %s patient updated", identity.trigger)

    def merge_patients(self, surviving: str, subsumed: str) -> int:
        """Merge patient ``subsumed`` into ``surviving`` (ITI TF-2 3.8.4.2.3).

        In one database transaction: the subsumed patient is marked merged
        (so ITI-42 under its id answers XDSUnknownPatientId), patients it had
        subsumed before follow it to the survivor, and every registry object
        of the subsumed patient is re-pointed to the survivor, its stored
        patientId rewritten to match. Re-pointing rather than resolving the
        merged ids at query time keeps each ITI-18 query one equality on the
        (patient_id, kind, status) index, with no join to the patient table
        and no IN list that grows with each merge; a merge is rare and
        touches one patient's rows, queries are many. Returns the number of
        registry objects re-pointed.

        Raises
        ------
        FeedRejected
            AE 204 when either patient is unknown or already subsumed.
        """
        with locking_transaction(self.engine) as conn:
            # Locks both rows, so that an ITI-42 for the subsumed patient
            # either lands before the merge (and is re-pointed) or after it
            # (and is refused).
            merged_into = {
                row.patient_id: row.merged_into
                for row in conn.execute(
                    select(patient.c.patient_id, patient.c.merged_into)
                    .where(patient.c.patient_id.in_([surviving, subsumed]))
                    .with_for_update()
                )
            }
            for field, patient_id in (("PID-3", surviving), ("MRG-1", subsumed)):
                if patient_id not in merged_into:
                    raise FeedRejected(
                        "AE",
                        "204",
                        f"the {field} patient is not known to this Document Registry",
                    )
                if merged_into[patient_id] is not None:
                    raise FeedRejected(
                        "AE",
                        "204",
                        f"the {field} patient was already merged into another",
                    )

            conn.execute(
                update(patient)
                .where(patient.c.patient_id == subsumed)
                .values(merged_into=surviving, updated_at=datetime.now(UTC))
            )
            conn.execute(
                update(patient)
                .where(patient.c.merged_into == subsumed)
                .values(merged_into=surviving)
            )
            moved = _repoint_patient(conn, subsumed, surviving)
        logger.info(
            "ITI-8 Patient Identity Feed: A40 merge, %d registry objects re-pointed",
            moved,
        )
        return moved

    def knows_patient(self, patient_id: str) -> bool:
        """Tell whether ``patient_id`` was fed and not subsumed by a merge."""
        with self.engine.connect() as conn:
            return _patient_id_error(conn, patient_id) is None

    def merged_into(self, patient_id: str) -> str | None:
        """Return the surviving patient id ``patient_id`` was merged into."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(patient.c.merged_into).where(patient.c.patient_id == patient_id)
            ).scalar()

    # --- ITI-42 ---------------------------------------------------------

    def register(self, request: etree._Element) -> RegisterOutcome:
        """Register a SubmitObjectsRequest; return the errors, if any.

        ITI TF-3 4.2.2: Associations may name objects already registered (a
        DocumentEntry added to a registered Folder, a replaced document);
        document relationships deprecate their targets as
        profiles/xds_metadata.toml says, in the same database transaction.
        """
        submission = _read_submission("ITI-42", request)
        if isinstance(submission, RegisterOutcome):
            return submission
        errors = validation.check_submission(submission)
        errors.extend(validation.check_codes(submission, self.code_sets))
        patient_id, ss_unique_id = _submission_set_ids(submission)
        if errors:
            return RegisterOutcome(
                as_registry_errors(errors, ACTOR), ss_unique_id, patient_id, ()
            )

        validation.assign_entry_uuids(submission)
        _gather_loose_classifications(submission)
        validation.set_status(submission, ebrim.STATUS_APPROVED)
        now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        for folder in submission.folders:
            ebrim.set_slot(folder.element, "lastUpdateTime", [now])
        try:
            with locking_transaction(self.engine) as conn:
                errors, resubmitted = self._check_against_registry(
                    conn, submission, patient_id
                )
                if errors:
                    raise _Rollback(errors)
                self._insert(conn, submission, resubmitted)
                self._apply_associations(conn, submission, now)
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
        self, conn: Connection, submission: Submission, patient_id: str | None
    ) -> tuple[list[XdsError], set[str]]:
        """Check the submission against what is registered.

        Returns the errors and the entryUUIDs of DocumentEntries that register
        an already registered document again (same uniqueId, same hash).
        """
        errors: list[XdsError] = []
        patient_error = _patient_id_error(conn, patient_id, lock=True)
        if patient_error is not None:
            errors.append(patient_error)

        # ITI TF-3 4.2.2: an entryUUID and a uniqueId name one object. Both
        # are checked with one statement, whatever the submission's size.
        ids = {o.id for o in submission.objects}
        unique_ids = {o.unique_id for o in submission.objects if o.unique_id}
        taken: set[str] = set()
        by_unique_id: dict[str, list[Row]] = {}
        for row in _held_ids(conn, ids, unique_ids):
            if row.entry_uuid in ids:
                taken.add(row.entry_uuid)
            if row.unique_id in unique_ids:
                by_unique_id.setdefault(row.unique_id, []).append(row)

        resubmitted: set[str] = set()
        for obj in submission.objects:
            if obj.id in taken:
                errors.append(
                    MetadataInvalid(
                        f"entryUUID {obj.id} is already in the Document Registry",
                        obj.id,
                    )
                )
            if obj.unique_id:
                error, again = _check_unique_id(obj, by_unique_id.get(obj.unique_id))
                if error is not None:
                    errors.append(error)
                if again:
                    resubmitted.add(obj.id)

        # The objects the Associations name are locked to the end of the
        # transaction (PostgreSQL; SQLite's transaction holds the write lock
        # already), in entryUUID order: a concurrent submission that replaces
        # the same DocumentEntry waits, then finds it Deprecated
        # (XDSRegistryDeprecatedDocumentError, ITI TF-3 4.2.2.2.3).
        ro = registry_object.c
        held_objects = {
            row.entry_uuid: validation.HeldObject(
                row.entry_uuid, row.kind, row.patient_id, row.status
            )
            for row in _select_in(
                conn,
                select(ro.entry_uuid, ro.kind, ro.patient_id, ro.status)
                .order_by(ro.entry_uuid)
                .with_for_update(),
                ro.entry_uuid,
                validation.external_references(submission),
            )
        }
        errors.extend(validation.check_references(submission, held_objects))
        return errors, resubmitted

    def _insert(
        self, conn: Connection, submission: Submission, resubmitted: set[str]
    ) -> None:
        """Insert the objects, then their index rows: one statement per table."""
        submission_time = None
        for ss in submission.submission_sets:
            submission_time = pad_dtm(ss.slot("submissionTime"))
        rows = []
        for obj in submission.objects:
            if obj.kind == ebrim.DOCUMENT_ENTRY and not obj.logical_id:
                obj.element.set("lid", obj.id)
            size = obj.slot("size")
            rows.append(
                {
                    "entry_uuid": obj.id,
                    "kind": obj.kind,
                    "unique_id": obj.unique_id,
                    "patient_id": obj.patient_id,
                    "status": ebrim.STATUS_APPROVED,
                    "object_type": obj.object_type or None,
                    "mime_type": obj.mime_type or None,
                    "logical_id": obj.element.get("lid"),
                    "version": 1,
                    "hash": (obj.slot("hash") or "").lower() or None,
                    "size": int(size) if size else None,
                    "repository_unique_id": obj.slot("repositoryUniqueId"),
                    "creation_time": pad_dtm(obj.slot("creationTime")),
                    "service_start_time": pad_dtm(obj.slot("serviceStartTime")),
                    "service_stop_time": pad_dtm(obj.slot("serviceStopTime")),
                    "submission_time": (
                        pad_dtm(obj.slot("submissionTime")) or submission_time
                    ),
                    "last_update_time": pad_dtm(obj.slot("lastUpdateTime")),
                    "source_id": obj.external_id("sourceId"),
                    "resubmission": obj.id if obj.id in resubmitted else "",
                    "association_type": obj.association_type or None,
                    "source_object": obj.source_object or None,
                    "target_object": obj.target_object or None,
                    "xml": etree.tostring(obj.element),
                }
            )
        conn.execute(insert(registry_object), rows)
        codes: list[dict[str, str]] = []
        values: list[dict[str, str]] = []
        for obj in submission.objects:
            _index_rows(obj, codes, values)
        if codes:
            conn.execute(insert(registry_code), codes)
        if values:
            conn.execute(insert(registry_value), values)

    def _apply_associations(
        self, conn: Connection, submission: Submission, now: str
    ) -> None:
        """Carry out what the submission's Associations do to registered objects.

        ITI TF-3 4.2.3.4: a Folder a submission adds to gets a new
        lastUpdateTime. ITI TF-3 4.2.2.2: a replacement deprecates its target
        (and the target's addenda and transformations) and joins the target's
        Folders.
        """
        new = {o.id for o in submission.objects}
        relationships = validation.relationship_types()
        for association in submission.associations:
            source, target = association.source_object, association.target_object
            if association.association_type == ebrim.HAS_MEMBER:
                if source not in new and _kind_of(conn, source) == ebrim.FOLDER:
                    self._touch_folder(conn, source, now)
                continue
            row = relationships[association.association_type]
            if row["deprecates_target"]:
                self._deprecate_with_dependants(conn, target)
            if row["inherits_folders"]:
                for folder in _folders_of(conn, target):
                    self._add_to_folder(conn, submission, folder, source)
                    self._touch_folder(conn, folder, now)

    def _deprecate_with_dependants(self, conn: Connection, entry_uuid: str) -> None:
        ro = registry_object.c
        dependant_types = [
            row["type"]
            for row in validation.relationship_types().values()
            if row["deprecated_with_target"]
        ]
        dependants = conn.execute(
            select(ro.source_object).where(
                ro.kind == ebrim.ASSOCIATION,
                ro.target_object == entry_uuid,
                ro.association_type.in_(dependant_types),
            )
        ).scalars()
        for uuid in [entry_uuid, *dependants]:
            _rewrite(
                conn,
                uuid,
                lambda element: element.set("status", ebrim.STATUS_DEPRECATED),
                status=ebrim.STATUS_DEPRECATED,
            )

    def _touch_folder(self, conn: Connection, folder: str, now: str) -> None:
        _rewrite(
            conn,
            folder,
            lambda element: ebrim.set_slot(element, "lastUpdateTime", [now]),
            last_update_time=now,
        )

    def _add_to_folder(
        self, conn: Connection, submission: Submission, folder: str, entry: str
    ) -> None:
        """Register Folder HasMember DocumentEntry, a member of the SubmissionSet."""
        membership = _association(folder, entry)
        record = _association(submission.submission_sets[0].id, membership.get("id"))
        for element in (membership, record):
            conn.execute(
                insert(registry_object).values(
                    entry_uuid=element.get("id"),
                    kind=ebrim.ASSOCIATION,
                    status=ebrim.STATUS_APPROVED,
                    object_type=ebrim.ASSOCIATION_TYPE,
                    association_type=ebrim.HAS_MEMBER,
                    source_object=element.get("sourceObject"),
                    target_object=element.get("targetObject"),
                    resubmission="",
                    xml=etree.tostring(element),
                )
            )

    # --- ITI-57 ---------------------------------------------------------

    def update_document_set(self, request: etree._Element) -> RegisterOutcome:
        """Carry out an Update Document Set; return the errors, if any.

        ITI TF-2 3.57.4.1.3.3.2: each UpdateAvailabilityStatus Association
        changes the availabilityStatus of a registered DocumentEntry of the
        SubmissionSet's patient from its OriginalStatus to its NewStatus. In
        one database transaction the SubmissionSet and the Associations are
        registered and the DocumentEntries' status column and stored XML
        changed; any error leaves everything as it was.
        """
        submission = _read_submission("ITI-57", request)
        if isinstance(submission, RegisterOutcome):
            return submission
        updates, errors = metadata_update.read_status_updates(submission)
        errors.extend(validation.check_codes(submission, self.code_sets))
        patient_id, ss_unique_id = _submission_set_ids(submission)
        if errors:
            return RegisterOutcome(
                as_registry_errors(errors, ACTOR), ss_unique_id, patient_id, ()
            )

        validation.assign_entry_uuids(submission)
        _gather_loose_classifications(submission)
        validation.set_status(submission, ebrim.STATUS_APPROVED)
        try:
            with locking_transaction(self.engine) as conn:
                errors = self._check_update(conn, submission, updates, patient_id)
                if errors:
                    raise _Rollback(errors)
                self._insert(conn, submission, set())
                for change in updates:
                    _rewrite(
                        conn,
                        change.entry_uuid,
                        lambda element, status=change.new_status: element.set(
                            "status", status
                        ),
                        status=change.new_status,
                    )
        except _Rollback as rollback:
            return RegisterOutcome(
                as_registry_errors(rollback.errors, ACTOR), ss_unique_id, patient_id, ()
            )
        except IntegrityError:
            error = DuplicateUniqueIdInRegistry(
                "the SubmissionSet's uniqueId was registered concurrently"
            )
            return RegisterOutcome(
                as_registry_errors([error], ACTOR), ss_unique_id, patient_id, ()
            )
        return RegisterOutcome(
            [], ss_unique_id, patient_id, tuple(u.entry_uuid for u in updates)
        )

    def _check_update(
        self,
        conn: Connection,
        submission: Submission,
        updates: list[metadata_update.StatusUpdate],
        patient_id: str | None,
    ) -> list[XdsError]:
        """Check an Update Document Set against what is registered.

        The targets are read with a row lock, so that two updates of one
        DocumentEntry are carried out one after the other and the second
        finds the OriginalStatus the first left.
        """
        errors: list[XdsError] = []
        patient_error = _patient_id_error(conn, patient_id, lock=True)
        if patient_error is not None:
            errors.append(patient_error)

        # ITI TF-3 4.2.2: an entryUUID and a uniqueId name one object.
        ids = {o.id for o in submission.objects}
        unique_ids = {o.unique_id for o in submission.objects if o.unique_id}
        for row in _held_ids(conn, ids, unique_ids):
            if row.entry_uuid in ids:
                errors.append(
                    MetadataInvalid(
                        f"entryUUID {row.entry_uuid} is already in the Document "
                        "Registry",
                        row.entry_uuid,
                    )
                )
            if row.unique_id in unique_ids:
                errors.append(
                    DuplicateUniqueIdInRegistry(
                        f"uniqueId {row.unique_id} is already registered",
                        row.unique_id,
                    )
                )

        ro = registry_object.c
        held = {
            row.entry_uuid: validation.HeldObject(
                row.entry_uuid, row.kind, row.patient_id, row.status
            )
            for row in _select_in(
                conn,
                select(ro.entry_uuid, ro.kind, ro.patient_id, ro.status)
                .order_by(ro.entry_uuid)
                .with_for_update(),
                ro.entry_uuid,
                [u.entry_uuid for u in updates],
            )
        }
        errors.extend(metadata_update.check_targets(updates, held, patient_id))
        return errors

    def handle_update(self, message: SoapMessage, peer: Peer) -> Reply:
        return self._handle_submission(
            "ITI-57", self.update_document_set, message, peer
        )

    # --- ITI-18 ---------------------------------------------------------

    def query(
        self, request: etree._Element
    ) -> tuple[etree._Element, stored_query.StoredQuery]:
        """Run a stored query and build its AdhocQueryResponse.

        ITI TF-2 3.18.4.1.2.3.7. $homeCommunityId names the community a Get
        query is for; this Document Registry answers for its own and does not
        narrow by it.
        """
        # Limitation: of the Metadata Update option only availabilityStatus
        # changes (ITI-57) are carried out; with no metadata versions,
        # $MetadataLevel 2 answers as level 1 does.
        query = stored_query.read_query(request)
        with self.engine.connect() as conn:
            search = _Search(conn, self.settings.registry.max_results)
            rows = _QUERIES[query.name](search, query)
        # ITI TF-2 3.18.4.1.2.3.7: a Get query answers for one patient only.
        patients = {r.patient_id for r in rows if r.patient_id}
        if query.name.startswith("Get") and len(patients) > 1:
            raise ResultNotSinglePatient(
                f"{query.name} results belong to more than one patient"
            )
        search.check(rows)
        return _query_response(rows, query.return_type), query

    # --- SOAP edge -------------------------------------------------------

    def app(self, spool_root) -> Flask:  # type: ignore[no-untyped-def]
        return soap_app(
            "registry",
            self.settings.registry.path,
            {
                "ITI-42": self.handle_register,
                "ITI-18": self.handle_query,
                "ITI-57": self.handle_update,
            },
            spool_root,
        )

    def handle_register(self, message: SoapMessage, peer: Peer) -> Reply:
        return self._handle_submission("ITI-42", self.register, message, peer)

    def _handle_submission(
        self,
        transaction_id: str,
        apply: Callable[[etree._Element], RegisterOutcome],
        message: SoapMessage,
        peer: Peer,
    ) -> Reply:
        """Carry out an ITI-42 or ITI-57 request, audit it and answer it."""
        started = time.monotonic()
        title = transaction(transaction_id)["title"]
        try:
            outcome = apply(message.body)
        except wire.SoapFault:
            raise
        except Exception:
            logger.exception("%s %s failed", transaction_id, title)
            outcome = RegisterOutcome(
                [RegistryError("XDSRegistryError", "internal Document Registry error")],
                None,
                None,
                (),
            )
        status = status_of(outcome.errors)
        self.auditor.record(
            audit.AuditEvent(
                transaction=transaction_id,
                actor="Document Registry",
                outcome=audit.Outcome.SUCCESS
                if not outcome.errors
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(peer.reply_to, peer.host),
                destination=audit.Endpoint(
                    peer.endpoint, self.settings.node.advertised
                ),
                patient_id=outcome.patient_id,
                submission_set_unique_id=outcome.submission_set_unique_id,
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s, MessageID %s, SubmissionSet %s, %d objects, "
            "errors %s, %.3f s",
            transaction_id,
            title,
            peer.host,
            status.value.rsplit(":", 1)[-1],
            logs.quoted(message.message_id),
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
        except Exception:
            logger.exception("ITI-18 Registry Stored Query failed")
            errors = [
                RegistryError("XDSRegistryError", "internal Document Registry error")
            ]
        if errors:
            body = _query_response([], stored_query.RETURN_OBJECT_REF, errors)
        patient_id = query.patient_id() if query else None
        query_id = message.body.find(f"{{{ns.RIM}}}AdhocQuery").get("id", "")
        self.auditor.record(
            audit.AuditEvent(
                transaction="ITI-18",
                actor="Document Registry",
                outcome=audit.Outcome.SUCCESS
                if not errors
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(peer.reply_to, peer.host),
                destination=audit.Endpoint(
                    peer.endpoint, self.settings.node.advertised
                ),
                patient_id=patient_id,
                # ITI TF-2 3.18.5.1: a failed query is audited too, with the
                # id it asked for.
                query_id=query_id,
                query_request=_compact(message.body),
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s %s, MessageID %s, %d results, errors %s, %.3f s",
            "ITI-18",
            "Registry Stored Query",
            peer.host,
            query.name if query else f"unknown query id {logs.shown(query_id, 64)}",
            body.get("status", "").rsplit(":")[-1],
            logs.quoted(message.message_id),
            len(body.findall(f"{{{ns.RIM}}}RegistryObjectList/*")),
            [e.code for e in errors] or "none",
            time.monotonic() - started,
        )
        return Reply(body)


# Bound parameters per IN list: SQLite allows 32766 per statement, PostgreSQL
# 65535; a submission may name more objects than that.
_IN_CHUNK = 1000


def _select_in(
    conn: Connection,
    statement: Select[Any],
    column: ColumnElement[Any],
    keys: Iterable[str],
) -> list[Row]:
    """Run ``statement`` for the rows whose ``column`` is one of ``keys``."""
    keys = sorted(set(keys))
    rows: list[Row] = []
    for start in range(0, len(keys), _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        rows.extend(conn.execute(statement.where(column.in_(chunk))))
    return rows


def _held_ids(
    conn: Connection, ids: Iterable[str], unique_ids: Iterable[str]
) -> list[Row]:
    """The registered objects whose entryUUID or uniqueId is in the sets."""
    ro = registry_object.c
    statement = select(ro.entry_uuid, ro.unique_id, ro.hash, ro.kind, ro.patient_id)
    ids, unique_ids = sorted(ids), sorted(unique_ids)
    half = _IN_CHUNK // 2
    rows: dict[str, Row] = {}
    for start in range(0, max(len(ids), len(unique_ids)), half):
        id_chunk = ids[start : start + half]
        unique_id_chunk = unique_ids[start : start + half]
        for row in conn.execute(
            statement.where(
                or_(ro.entry_uuid.in_(id_chunk), ro.unique_id.in_(unique_id_chunk))
            )
        ):
            rows[row.entry_uuid] = row
    return list(rows.values())


def _index_rows(
    obj: RegistryObject, codes: list[dict[str, str]], values: list[dict[str, str]]
) -> None:
    """Add the child-table rows that index ``obj``'s query parameters.

    ITI TF-2 3.18.4.1.2.3.7: coded attributes go to registry_code,
    authorPerson and referenceIdList values to registry_value.
    """
    if obj.kind not in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER):
        return
    attributes = ebrim.metadata_table()[obj.kind]["attributes"]
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
    values.extend(
        {"entry_uuid": obj.id, "attribute": "authorPerson", "value": person}
        for author in obj.authors()
        for person in author.get("authorPerson", [])
    )
    reference_slot = attributes.get("referenceIdList", {}).get("slot")
    if reference_slot:
        values.extend(
            {"entry_uuid": obj.id, "attribute": "referenceIdList", "value": v}
            for v in obj.slots.get(reference_slot, [])
        )


def _check_unique_id(
    obj: RegistryObject, rows: Sequence[Row] | None
) -> tuple[XdsError | None, bool]:
    """ITI TF-3 Table 4.2.4.1-2: a uniqueId names one object.

    ``rows`` are the registered objects with ``obj``'s uniqueId. A
    DocumentEntry may register an already registered document again when the
    hash is the same, for the same patient; another hash is
    XDSNonIdenticalHash, another patient XDSPatientIdDoesNotMatch (one
    document is of one patient, ITI TF-3 4.2.3.2.26). Returns the error, if
    any, and whether ``obj`` registers a document again.
    """
    if not rows:
        return None, False
    new_hash = (obj.slot("hash") or "").lower()
    if obj.kind == ebrim.DOCUMENT_ENTRY and all(
        row.kind == ebrim.DOCUMENT_ENTRY for row in rows
    ):
        if any(row.patient_id != obj.patient_id for row in rows):
            return (
                PatientIdDoesNotMatch(
                    f"DocumentEntry uniqueId {obj.unique_id} is registered for "
                    "another patient",
                    obj.unique_id,
                ),
                False,
            )
        if new_hash and all(row.hash == new_hash for row in rows):
            return None, True
        error: XdsError = NonIdenticalHash(
            f"DocumentEntry uniqueId {obj.unique_id} is registered with another hash",
            obj.unique_id,
        )
        return error, False
    error = DuplicateUniqueIdInRegistry(
        f"{obj.kind} uniqueId {obj.unique_id} is already registered",
        obj.unique_id,
    )
    return error, False


# ITI TF-2 3.8.5.1: the EventActionCode of the Document Registry's ITI-8
# audit record per action; an A40 also writes D for the subsumed patient.
_AUDIT_ACTION = {
    FeedAction.CREATE: "C",
    FeedAction.UPDATE: "U",
    FeedAction.MERGE: "U",
}
_SUBSUMED_AUDIT_ACTION = "D"


def _patient_id_error(
    conn: Connection, patient_id: str | None, *, lock: bool = False
) -> UnknownPatientId | None:
    """Check that an ITI-42 may name ``patient_id`` (ITI TF-3 Table 4.2.4.1-2).

    The patient must have been fed (ITI TF-2 3.8.4.1.3) and not subsumed by
    an A40 (ITI TF-2 3.8.4.2.3). With ``lock``, the patient row is share
    locked to the end of the transaction, so that a merge waits for it.
    """
    # PostgreSQL holds the share lock, so a merge waits for the ITI-42;
    # SQLite has no row locks, and the caller's locking_transaction holds
    # the database's write lock instead.
    statement = select(patient.c.merged_into).where(patient.c.patient_id == patient_id)
    if lock:
        statement = statement.with_for_update(read=True)
    row = None if patient_id is None else conn.execute(statement).first()
    if row is None:
        return UnknownPatientId(
            "the SubmissionSet's patientId is not known to this Document "
            "Registry (no Patient Identity Feed received for it)",
            "SubmissionSet",
        )
    if row.merged_into is not None:
        return UnknownPatientId(
            "the SubmissionSet's patientId was merged into another patient by "
            "an ITI-8 A40 (ITI TF-2 3.8.4.2.3); submit under the surviving id",
            "SubmissionSet",
        )
    return None


def _repoint_patient(conn: Connection, subsumed: str, surviving: str) -> int:
    """Move the registry objects of ``subsumed`` to ``surviving``.

    The indexed patient_id and the patientId ExternalIdentifier of the stored
    XML both change, so that what a query returns names the patient it was
    asked for. sourcePatientId, the id in the source's own domain, stays.
    """
    # Limitation: the objects are changed in place, not versioned as the
    # Metadata Update option would; the subsumed id survives only in the
    # patient table's merged_into and in the audit trail.
    columns = registry_object.c
    rows = conn.execute(
        select(columns.entry_uuid, columns.kind, columns.xml).where(
            columns.patient_id == subsumed
        )
    ).all()
    for row in rows:
        element = etree.fromstring(row.xml)
        scheme = ebrim.attribute_spec(row.kind, "patientId")["scheme"]
        for identifier in element.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
            if identifier.get("identificationScheme") == scheme:
                identifier.set("value", surviving)
        conn.execute(
            update(registry_object)
            .where(columns.entry_uuid == row.entry_uuid)
            .values(patient_id=surviving, xml=etree.tostring(element))
        )
    return len(rows)


def _compact(request: etree._Element) -> bytes:
    """The query as its audit record keeps it: without comments, processing
    instructions or whitespace between elements, whatever padding the
    sender added (ITI TF-2 3.18.5.1 records the AdhocQueryRequest)."""
    compact = copy.deepcopy(request)
    for node in list(compact.iter(etree.Comment, etree.ProcessingInstruction)):
        parent = node.getparent()
        if parent is not None:
            if node.tail and node.tail.strip():
                previous = node.getprevious()
                if previous is not None:
                    previous.tail = (previous.tail or "") + node.tail
                else:
                    parent.text = (parent.text or "") + node.tail
            parent.remove(node)
    for element in compact.iter():
        if element.text is not None and not element.text.strip() and len(element):
            element.text = None
        if element.tail is not None and not element.tail.strip():
            element.tail = None
    return etree.tostring(compact)


def _read_submission(
    transaction_id: str, request: etree._Element
) -> Submission | RegisterOutcome:
    """Read a SubmitObjectsRequest valid against the transaction's schema;
    else return the outcome that refuses it (XDSRegistryMetadataError).

    Its urn:uuid: ids are read in lower case (RFC 4122 3), so that the
    registry checks, stores and answers each UUID in one spelling.
    """
    schema = transaction(transaction_id)["request_schema"]
    problems = schema_errors(request, schema)
    if problems:
        error = MetadataInvalid(
            f"SubmitObjectsRequest is not valid against {schema}: "
            + "; ".join(problems)
        )
        return RegisterOutcome(as_registry_errors([error], ACTOR), None, None, ())
    ebrim.canonicalise_ids(request)
    return ebrim.read_registry_objects(request)


def _submission_set_ids(submission: Submission) -> tuple[str | None, str | None]:
    """The patientId and uniqueId of the submission's one SubmissionSet."""
    if len(submission.submission_sets) != 1:
        return None, None
    submission_set = submission.submission_sets[0]
    return submission_set.patient_id, submission_set.unique_id


class _Rollback(Exception):
    def __init__(self, errors: list[XdsError]) -> None:
        super().__init__("rollback")
        self.errors = errors


def _kind_of(conn: Connection, entry_uuid: str) -> str | None:
    return conn.execute(
        select(registry_object.c.kind).where(registry_object.c.entry_uuid == entry_uuid)
    ).scalar()


def _folders_of(conn: Connection, entry_uuid: str) -> list[str]:
    """Return the Folders a DocumentEntry is a member of."""
    ro = registry_object.c
    folders = select(ro.entry_uuid).where(ro.kind == ebrim.FOLDER)
    return list(
        conn.execute(
            select(ro.source_object).where(
                ro.kind == ebrim.ASSOCIATION,
                ro.association_type == ebrim.HAS_MEMBER,
                ro.target_object == entry_uuid,
                ro.source_object.in_(folders),
            )
        ).scalars()
    )


def _rewrite(
    conn: Connection,
    entry_uuid: str,
    change: Callable[[etree._Element], None],
    **columns: str,
) -> None:
    """Change a registered object's columns and its stored XML alike.

    The stored XML is what a LeafClass answer returns, so it must show the
    object's current status and lastUpdateTime.
    """
    xml = conn.execute(
        select(registry_object.c.xml).where(registry_object.c.entry_uuid == entry_uuid)
    ).scalar_one()
    element = wire.parse_xml(xml)
    change(element)
    conn.execute(
        update(registry_object)
        .where(registry_object.c.entry_uuid == entry_uuid)
        .values(xml=etree.tostring(element), **columns)
    )


def _association(source: str, target: str) -> etree._Element:
    """Build an Approved HasMember Association the Document Registry adds."""
    return ebrim.rim(
        "Association",
        id=ebrim.new_uuid(),
        objectType=ebrim.ASSOCIATION_TYPE,
        associationType=ebrim.HAS_MEMBER,
        sourceObject=source,
        targetObject=target,
        status=ebrim.STATUS_APPROVED,
    )


# --- stored queries ---------------------------------------------------------

RO = registry_object.c
_ROW = (RO.entry_uuid, RO.kind, RO.xml, RO.patient_id)


class _Search:
    """One stored query's reads, each capped at the configured limit."""

    def __init__(self, conn: Connection, limit: int) -> None:
        self.conn = conn
        self.limit = limit

    def rows(self, *conditions: ColumnElement[bool]) -> list[Row]:
        statement = select(*_ROW).where(*conditions).order_by(RO.entry_uuid)
        rows = self.conn.execute(statement.limit(self.limit + 1)).all()
        self.check(rows)
        return rows

    def check(self, rows: Sequence[Row]) -> None:
        # Limitation: results are not paged; a query matching more than
        # max_results objects answers XDSTooManyResults.
        if len(rows) > self.limit:
            raise TooManyResults(
                f"the query matches more than {self.limit} objects; narrow it"
            )


def _unique(rows: Sequence[Row]) -> list[Row]:
    """Drop repeated objects, keeping the first of each."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if row.entry_uuid not in seen:
            seen.add(row.entry_uuid)
            kept.append(row)
    return kept


def _entry_type(query: stored_query.StoredQuery) -> ColumnElement[bool]:
    """ITI TF-2 3.18.4.1.2.3.7: $XDSDocumentEntryType, stable when absent."""
    return RO.object_type.in_(
        query.values("$XDSDocumentEntryType")
        or [ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY]["object_type_stable"]]
    )


def _attribute_filters(
    kind: str, query: stored_query.StoredQuery
) -> list[ColumnElement[bool]]:
    """Conditions for the parameters profiles/xds_metadata.toml maps to
    attributes of ``kind``: OR within a slot, AND between slots."""
    conditions: list[ColumnElement[bool]] = []
    for attribute, spec in ebrim.metadata_table()[kind]["attributes"].items():
        param = spec.get("query")
        if not param or param not in query.parameters:
            continue
        if spec["kind"] == "classification":
            for group in query.codes(param):
                conditions.append(
                    exists().where(
                        registry_code.c.entry_uuid == RO.entry_uuid,
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
        elif spec["kind"] == "external_identifier":
            conditions.append(RO[spec["column"]].in_(query.values(param)))
        else:
            for group in query.parameters[param]:
                conditions.append(
                    exists().where(
                        registry_value.c.entry_uuid == RO.entry_uuid,
                        registry_value.c.attribute == attribute,
                        registry_value.c.value.in_(group),
                    )
                )
    return conditions


def _author_filter(
    query: stored_query.StoredQuery, param: str
) -> list[ColumnElement[bool]]:
    """authorPerson parameters match with LIKE wildcards (ITI TF-2
    3.18.4.1.2.3.4)."""
    return [
        exists().where(
            registry_value.c.entry_uuid == RO.entry_uuid,
            registry_value.c.attribute == "authorPerson",
            or_(*[registry_value.c.value.like(v, escape="\\") for v in group]),
        )
        for group in query.parameters.get(param, [])
    ]


def _time_ranges(
    query: stored_query.StoredQuery, ranges: dict[str, ColumnElement[str]]
) -> list[ColumnElement[bool]]:
    """ITI TF-2 3.18.4.1.2.3.7: From is inclusive, To exclusive."""
    conditions: list[ColumnElement[bool]] = []
    for prefix, column in ranges.items():
        low = query.single(f"{prefix}From")
        high = query.single(f"{prefix}To")
        if low is not None:
            conditions.append(column >= pad_dtm(low))
        if high is not None:
            conditions.append(column < pad_dtm(high))
    return conditions


def _by_ids(
    query: stored_query.StoredQuery, kind: str, uuid_param: str, unique_id_param: str
) -> ColumnElement[bool]:
    if uuid_param in query.parameters:
        match = RO.entry_uuid.in_(query.values(uuid_param))
    else:
        match = RO.unique_id.in_(query.values(unique_id_param))
    return and_(RO.kind == kind, match)


def _documents_by_ids(query: stored_query.StoredQuery) -> ColumnElement[bool]:
    return _by_ids(
        query,
        ebrim.DOCUMENT_ENTRY,
        "$XDSDocumentEntryEntryUUID",
        "$XDSDocumentEntryUniqueId",
    )


def _associations(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return and_(RO.kind == ebrim.ASSOCIATION, *conditions)


def _find_documents(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.1 FindDocuments and 3.18.4.1.2.3.7.14
    FindDocumentsByReferenceId."""
    return search.rows(
        RO.kind == ebrim.DOCUMENT_ENTRY,
        RO.patient_id == query.single("$XDSDocumentEntryPatientId"),
        RO.status.in_(query.values("$XDSDocumentEntryStatus")),
        _entry_type(query),
        *_attribute_filters(ebrim.DOCUMENT_ENTRY, query),
        *_author_filter(query, "$XDSDocumentEntryAuthorPerson"),
        *_time_ranges(
            query,
            {
                "$XDSDocumentEntryCreationTime": RO.creation_time,
                "$XDSDocumentEntryServiceStartTime": RO.service_start_time,
                "$XDSDocumentEntryServiceStopTime": RO.service_stop_time,
            },
        ),
    )


def _find_submission_sets(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.2 FindSubmissionSets."""
    return search.rows(
        RO.kind == ebrim.SUBMISSION_SET,
        RO.patient_id == query.single("$XDSSubmissionSetPatientId"),
        RO.status.in_(query.values("$XDSSubmissionSetStatus")),
        *_attribute_filters(ebrim.SUBMISSION_SET, query),
        *_author_filter(query, "$XDSSubmissionSetAuthorPerson"),
        *_time_ranges(query, {"$XDSSubmissionSetSubmissionTime": RO.submission_time}),
    )


def _find_folders(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.3 FindFolders."""
    return search.rows(
        RO.kind == ebrim.FOLDER,
        RO.patient_id == query.single("$XDSFolderPatientId"),
        RO.status.in_(query.values("$XDSFolderStatus")),
        *_attribute_filters(ebrim.FOLDER, query),
        *_time_ranges(query, {"$XDSFolderLastUpdateTime": RO.last_update_time}),
    )


def _between(search: _Search, objects: Sequence[Row]) -> list[Row]:
    """Associations between the given objects, and the HasMember
    Associations from them to those Associations (folder membership)."""
    ids = [r.entry_uuid for r in objects]
    direct = search.rows(
        _associations(RO.source_object.in_(ids), RO.target_object.in_(ids))
    )
    records = search.rows(
        _associations(
            RO.source_object.in_(ids),
            RO.target_object.in_([r.entry_uuid for r in direct]),
        )
    )
    return _unique(direct + records)


def _get_all(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.4 GetAll."""
    patient_id = query.single("$patientId")
    objects = (
        search.rows(
            RO.kind == ebrim.SUBMISSION_SET,
            RO.patient_id == patient_id,
            RO.status.in_(query.values("$XDSSubmissionSetStatus")),
        )
        + search.rows(
            RO.kind == ebrim.DOCUMENT_ENTRY,
            RO.patient_id == patient_id,
            RO.status.in_(query.values("$XDSDocumentEntryStatus")),
            _entry_type(query),
            *_attribute_filters(ebrim.DOCUMENT_ENTRY, query),
        )
        + search.rows(
            RO.kind == ebrim.FOLDER,
            RO.patient_id == patient_id,
            RO.status.in_(query.values("$XDSFolderStatus")),
        )
    )
    return objects + _between(search, objects)


def _get_documents(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.5 GetDocuments."""
    return search.rows(_documents_by_ids(query))


def _get_folders(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.6 GetFolders."""
    return search.rows(
        _by_ids(query, ebrim.FOLDER, "$XDSFolderEntryUUID", "$XDSFolderUniqueId")
    )


def _get_associations(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.7 GetAssociations."""
    ids = query.values("$uuid")
    return search.rows(
        _associations(or_(RO.source_object.in_(ids), RO.target_object.in_(ids)))
    )


def _get_documents_and_associations(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.8 GetDocumentsAndAssociations."""
    documents = search.rows(_documents_by_ids(query))
    ids = [r.entry_uuid for r in documents]
    return documents + search.rows(
        _associations(or_(RO.source_object.in_(ids), RO.target_object.in_(ids)))
    )


def _get_submission_sets(search: _Search, query: stored_query.StoredQuery) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.9 GetSubmissionSets."""
    submission_sets = select(RO.entry_uuid).where(RO.kind == ebrim.SUBMISSION_SET)
    memberships = search.rows(
        _associations(
            RO.association_type == ebrim.HAS_MEMBER,
            RO.target_object.in_(query.values("$uuid")),
            RO.source_object.in_(submission_sets),
        )
    )
    sources = {r.source_object for r in _association_ends(search, memberships)}
    return search.rows(RO.entry_uuid.in_(sources)) + memberships


def _association_ends(search: _Search, rows: Sequence[Row]) -> list[Row]:
    """Read source and target of Associations given as result rows."""
    return search.conn.execute(
        select(RO.entry_uuid, RO.source_object, RO.target_object).where(
            RO.entry_uuid.in_([r.entry_uuid for r in rows])
        )
    ).all()


def _package_and_contents(
    search: _Search, query: stored_query.StoredQuery, package: Row
) -> list[Row]:
    """A SubmissionSet or Folder, its members and the HasMember
    Associations to them; DocumentEntries filtered by format,
    confidentiality and type (ITI TF-2 3.18.4.1.2.3.7.10, 3.18.4.1.2.3.7.11)."""
    memberships = _association_ends(
        search,
        search.rows(
            _associations(
                RO.association_type == ebrim.HAS_MEMBER,
                RO.source_object == package.entry_uuid,
            )
        ),
    )
    members = [m.target_object for m in memberships]
    documents = search.rows(
        RO.kind == ebrim.DOCUMENT_ENTRY,
        RO.entry_uuid.in_(members),
        _entry_type(query),
        *_attribute_filters(ebrim.DOCUMENT_ENTRY, query),
    )
    others = search.rows(
        RO.kind.in_([ebrim.FOLDER, ebrim.ASSOCIATION]), RO.entry_uuid.in_(members)
    )
    filtered_out = set(members) - {r.entry_uuid for r in documents + others}
    kept_ends = {
        a.entry_uuid
        for a in _association_ends(search, others)
        if a.source_object not in filtered_out and a.target_object not in filtered_out
    }
    others = [
        r for r in others if r.kind != ebrim.ASSOCIATION or r.entry_uuid in kept_ends
    ]
    kept = {r.entry_uuid for r in documents + others}
    membership_rows = search.rows(
        RO.entry_uuid.in_(
            [m.entry_uuid for m in memberships if m.target_object in kept]
        )
    )
    return [package, *documents, *others, *membership_rows]


def _get_submission_set_and_contents(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.10 GetSubmissionSetAndContents."""
    found = search.rows(
        _by_ids(
            query,
            ebrim.SUBMISSION_SET,
            "$XDSSubmissionSetEntryUUID",
            "$XDSSubmissionSetUniqueId",
        )
    )
    return _package_and_contents(search, query, found[0]) if found else []


def _get_folder_and_contents(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.11 GetFolderAndContents."""
    found = search.rows(
        _by_ids(query, ebrim.FOLDER, "$XDSFolderEntryUUID", "$XDSFolderUniqueId")
    )
    return _package_and_contents(search, query, found[0]) if found else []


def _get_folders_for_document(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.12 GetFoldersForDocument."""
    documents = select(RO.entry_uuid).where(_documents_by_ids(query))
    folders = search.conn.execute(
        select(RO.source_object).where(
            RO.kind == ebrim.ASSOCIATION,
            RO.association_type == ebrim.HAS_MEMBER,
            RO.target_object.in_(documents),
        )
    ).scalars()
    return search.rows(RO.kind == ebrim.FOLDER, RO.entry_uuid.in_(list(folders)))


def _get_related_documents(
    search: _Search, query: stored_query.StoredQuery
) -> list[Row]:
    """ITI TF-2 3.18.4.1.2.3.7.13 GetRelatedDocuments.

    The DocumentEntry, the DocumentEntries linked to it by Associations of
    the $AssociationTypes, and those Associations; nothing when no document
    is related.
    """
    originals = search.rows(_documents_by_ids(query))
    ids = {r.entry_uuid for r in originals}
    links = _association_ends(
        search,
        search.rows(
            _associations(
                RO.association_type.in_(query.values("$AssociationTypes")),
                or_(RO.source_object.in_(ids), RO.target_object.in_(ids)),
            )
        ),
    )
    other_ends = {
        end for a in links for end in (a.source_object, a.target_object)
    } - ids
    related = search.rows(
        RO.kind == ebrim.DOCUMENT_ENTRY,
        RO.entry_uuid.in_(other_ends),
        _entry_type(query),
    )
    if not related:
        return []
    related_ids = {r.entry_uuid for r in related}
    kept = [
        a.entry_uuid
        for a in links
        if a.source_object in related_ids or a.target_object in related_ids
    ]
    return _unique(originals + related + search.rows(RO.entry_uuid.in_(kept)))


_QUERIES: dict[str, Callable[[_Search, stored_query.StoredQuery], list[Row]]] = {
    "FindDocuments": _find_documents,
    "FindDocumentsByReferenceId": _find_documents,
    "FindSubmissionSets": _find_submission_sets,
    "FindFolders": _find_folders,
    "GetAll": _get_all,
    "GetDocuments": _get_documents,
    "GetFolders": _get_folders,
    "GetAssociations": _get_associations,
    "GetDocumentsAndAssociations": _get_documents_and_associations,
    "GetSubmissionSets": _get_submission_sets,
    "GetSubmissionSetAndContents": _get_submission_set_and_contents,
    "GetFolderAndContents": _get_folder_and_contents,
    "GetFoldersForDocument": _get_folders_for_document,
    "GetRelatedDocuments": _get_related_documents,
}


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

"""Document Repository: ITI-41 / RAD-68 Provide and Register Document Set-b
and ITI-43 Retrieve Document Set.

ITI TF-2 3.41.4.1.3 (repository's expected actions), 3.43.4.1.3 (retrieve),
RAD TF-3 4.68 (the imaging variant travels the same way). The submission's
documents are stored before ITI-42 goes to the registry; when the registry
refuses, they are removed again (DESIGN.md principle 6). When ITI-42 went out
and no answer came back, the registry may have registered them: they stay
pending until the registry, asked, says whether it holds them.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask
from lxml import etree
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from xdsi import audit, logs, ns, tls, wire
from xdsi.actors.consumer import Consumer, ConsumerError
from xdsi.actors.soap_endpoint import Peer, Reply, soap_app, transaction
from xdsi.config import Settings
from xdsi.errors import (
    SEVERITY_WARNING,
    DocumentUniqueIdError,
    DuplicateUniqueIdInRegistry,
    HashMismatch,
    MetadataInvalid,
    MissingDocument,
    MissingDocumentMetadata,
    NonIdenticalHash,
    RegistryNotAvailable,
    SizeMismatch,
    StoredCopyMissing,
    UnknownRepositoryId,
    XdsError,
)
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.ebrim import RegistryObject
from xdsi.metadata.responses import (
    RegistryError,
    ResponseStatus,
    read_errors,
    read_status,
    registry_response,
    status_of,
)
from xdsi.metadata.stored_query import VALUE_LENGTH
from xdsi.store.blobs import Blobs
from xdsi.store.schema import repository_document
from xdsi.wire.mtom import StreamSource
from xdsi.wire.schema import schema_errors

logger = logging.getLogger(__name__)

ACTOR = "repository"

PENDING = "pending"
STORED = "stored"
# Claimed for removal: its blob goes, then its row.
REMOVING = "removing"

# uniqueIds asked of the registry in one GetDocuments.
QUERY_BATCH = 100
RESPONSE = f"{{{ns.RS}}}RegistryResponse"


class Registration(Enum):
    """What came of an ITI-42."""

    REGISTERED = "registered"
    REFUSED = "refused"
    # Sent, and no answer that says which: the registry may have registered.
    UNHEARD = "unheard"


class RegistryUnreachable(Exception):
    """The Document Registry could not be asked what it holds."""


@dataclass(frozen=True)
class StoredDocument:
    unique_id: str
    mime_type: str
    size: int
    sha1: str
    blob: str
    patient_id: str | None = None
    state: str = "pending"


class Repository:
    """The Document Repository over its blob store and its table."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        blobs: Blobs,
        auditor: audit.Auditor,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.auditor = auditor

    @property
    def repository_unique_id(self) -> str:
        return self.settings.repository.repository_unique_id

    def sweep_pending(self, older_than: timedelta = timedelta(minutes=10)) -> int:
        """Settle documents left pending by a submission that never finished.

        A process killed between storing a document and the registry's
        answer, or an ITI-42 whose answer never came, leaves a pending row
        and its blob, not retrievable. The registry is asked whether it
        holds them (ITI-18 GetDocuments): those it holds are confirmed, the
        others removed. Rows younger than ``older_than`` may belong to a
        submission still under way, or to an ITI-42 the registry is still
        working on, and are left alone (``[repository] pending_sweep_age``).
        What the registry cannot be asked about stays pending. Returns how
        many documents were settled.
        """
        # Aware: PostgreSQL reads a naive time in its session time zone.
        cutoff = datetime.now(UTC) - older_than
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(repository_document).where(
                    repository_document.c.state.in_((PENDING, REMOVING)),
                    repository_document.c.created_at < cutoff,
                )
            ).all()
        found = [
            StoredDocument(
                r.unique_id, r.mime_type, r.size, r.sha1, r.blob, r.patient_id, r.state
            )
            for r in rows
        ]
        # Documents whose removal was claimed and not finished go now.
        self._remove([r for r in found if r.state == REMOVING])
        stale = [r for r in found if r.state == PENDING]
        if not stale:
            return 0
        answered = self._registered({r.unique_id for r in stale})
        registered = [r for r in stale if answered.get(r.unique_id) == r.sha1]
        unregistered = [
            r for r in stale if r.unique_id in answered and r not in registered
        ]
        confirmed = [r for r in registered if r not in self._confirm(registered)]
        self._remove(unregistered)
        if confirmed:
            logger.warning(
                "%d pending documents were registered, unheard: now retrievable",
                len(confirmed),
            )
        if unregistered:
            logger.warning(
                "removed %d documents left pending by unfinished submissions",
                len(unregistered),
            )
        return len(registered) + len(unregistered)

    def _registered(self, unique_ids: set[str]) -> dict[str, str | None]:
        """Ask the Document Registry which of ``unique_ids`` it holds for
        this repository, whatever their status (ITI TF-2 3.18.4.1.2.3.7.5
        GetDocuments, LeafClass), as a Document Consumer.

        Returns, for each uniqueId the registry answered about, the hash of
        its entry, or None when it holds none for this repository. A
        uniqueId it could not be asked about (its batch failed, or it is too
        long to quote in a rim:Value) is left out: nothing is known of it.

        Limitation: ITI-18 is sent to the registry's ITI-42 endpoint
        (``[repository] registry_url``), as one URL serves both here.
        Limitation: a uniqueId too long to quote in a rim:Value (ebRIM
        LongName) is never asked about, so its pending document stays
        pending until removed by hand.
        """
        consumer = Consumer(self.settings, self.auditor, self.blobs.spool)
        answered: dict[str, str | None] = {}
        askable = sorted(
            u
            for u in unique_ids
            if len(stored_query.quote_value(u)) + 2 <= VALUE_LENGTH
        )
        if len(askable) < len(unique_ids):
            logger.warning(
                "%d pending documents have a uniqueId too long to ask the "
                "Document Registry about; they stay pending",
                len(unique_ids) - len(askable),
            )
        for start in range(0, len(askable), QUERY_BATCH):
            batch = askable[start : start + QUERY_BATCH]
            try:
                answered.update(self._ask(consumer, batch))
            except RegistryUnreachable as exc:
                logger.warning(
                    "the Document Registry could not be asked about %d pending "
                    "documents: %s",
                    len(batch),
                    exc,
                )
        return answered

    def _ask(self, consumer: Consumer, unique_ids: list[str]) -> dict[str, str | None]:
        """One GetDocuments for ``unique_ids``; see :meth:`_registered`.

        Raises
        ------
        RegistryUnreachable
            The query failed, or its answer is no LeafClass list.
        """
        request = stored_query.build_query(
            "GetDocuments", {"$XDSDocumentEntryUniqueId": unique_ids}
        )
        try:
            body = consumer.query(self.settings.registry_url, request)
        except ConsumerError as exc:
            raise RegistryUnreachable(str(exc)) from exc
        # Only a LeafClass answer says which entries the registry holds;
        # another answer is no "none" to remove documents on.
        objects = body.find(f"{{{ns.RIM}}}RegistryObjectList")
        if (
            body.tag != f"{{{ns.QUERY}}}AdhocQueryResponse"
            or objects is None
            or (
                objects.find(f"{{{ns.RIM}}}ObjectRef") is not None
                and objects.find(f"{{{ns.RIM}}}ExtrinsicObject") is None
            )
        ):
            raise RegistryUnreachable(
                "the Document Registry answered GetDocuments with no LeafClass "
                "RegistryObjectList"
            )
        answered: dict[str, str | None] = dict.fromkeys(unique_ids)
        for entry in ebrim.read_registry_objects(body).document_entries:
            ours = entry.slot("repositoryUniqueId") == self.repository_unique_id
            if ours and entry.unique_id in answered:
                answered[entry.unique_id] = (entry.slot("hash") or "").lower()
        return answered

    # --- ITI-41 / RAD-68 ------------------------------------------------

    def provide_and_register(
        self, message: wire.SoapMessage
    ) -> tuple[list[RegistryError], list[RegistryObject], str | None]:
        """Store the documents, register them, and undo on failure.

        Returns the errors (the registry's, when it refused), the
        DocumentEntries and the SubmissionSet's uniqueId for the audit trail.
        """
        request = message.body
        metadata = request.find(f"{{{ns.LCM}}}SubmitObjectsRequest")
        if metadata is None:
            error = MetadataInvalid(
                "ProvideAndRegisterDocumentSetRequest holds no "
                "SubmitObjectsRequest (ITI TF-2 3.41.4.1.2)"
            )
            return _errors([error]), [], None
        schema = transaction("ITI-41")["request_schema"]
        problems = schema_errors(metadata, schema)
        if problems:
            error = MetadataInvalid(
                f"SubmitObjectsRequest is not valid against {schema}: "
                + "; ".join(problems)
            )
            return _errors([error]), [], None
        # RFC 4122 3: a DocumentEntry and its Document pair by entryUUID
        # whatever the letter case of each (the registry reads ids so too).
        ebrim.canonicalise_ids(request)
        submission = ebrim.read_registry_objects(metadata)
        entries = submission.document_entries
        ss = submission.submission_sets
        ss_unique_id = ss[0].unique_id if len(ss) == 1 else None

        # ITI TF-2 3.41.4.1.3: pair every DocumentEntry with its document.
        documents: dict[str, wire.Attachment] = {}
        errors: list[XdsError] = []
        for element in request.findall(f"{{{ns.XDSB}}}Document"):
            if element.get("id", "") in documents:
                # One DocumentEntry pairs with one Document: of two under one
                # id, neither can be told to be the one it describes.
                errors.append(
                    MetadataInvalid(
                        f"two Documents have id {element.get('id')}; each "
                        "DocumentEntry pairs with one (ITI TF-2 3.41.4.1.2)",
                        element.get("id", ""),
                    )
                )
                continue
            try:
                documents[element.get("id", "")] = wire.attachment_for(element, message)
            except wire.MissingAttachment as exc:
                errors.append(
                    MissingDocument(
                        f"Document {element.get('id')} references attachment "
                        f"{exc.content_id}, which the message does not carry",
                        element.get("id", ""),
                    )
                )
        entry_ids = {e.id for e in entries}
        for entry in entries:
            if entry.id not in documents and not any(
                e.location == entry.id for e in errors
            ):
                errors.append(
                    MissingDocument(
                        f"DocumentEntry {entry.id} has no Document in the request",
                        entry.id,
                    )
                )
        for document_id in documents:
            if document_id not in entry_ids:
                errors.append(
                    MissingDocumentMetadata(
                        f"Document {document_id} has no DocumentEntry", document_id
                    )
                )
        if errors:
            return _errors(errors), entries, ss_unique_id

        # ITI TF-2 3.41.4.1.3: size and hash checked when given, else set;
        # repositoryUniqueId set to this repository's.
        for entry in entries:
            errors.extend(self._complete_entry(entry, documents[entry.id]))
        if errors:
            return _errors(errors), entries, ss_unique_id

        stored, errors = self._store(entries, documents)
        if errors:
            return _errors(errors), entries, ss_unique_id

        patient_id = ss[0].patient_id if len(ss) == 1 else None
        try:
            outcome, registry_errors = self._register(
                metadata, patient_id, ss_unique_id
            )
        except BaseException:
            self._remove(stored)
            raise
        if outcome is Registration.REGISTERED:
            registry_errors += self._confirm_registered(stored)
        elif outcome is Registration.REFUSED:
            self._remove(stored)
        else:
            registry_errors = self._settle_unheard(stored, registry_errors)
        return registry_errors, entries, ss_unique_id

    def _settle_unheard(
        self, stored: list[StoredDocument], errors: list[RegistryError]
    ) -> list[RegistryError]:
        """ITI-42 went out and no answer came: ask the registry at once.

        A registration is all or nothing (ITI TF-2 3.42.4.1.3), so when the
        registry holds every document the submission succeeded and they are
        confirmed. Otherwise they stay pending, not retrievable, and the
        submission fails as XDSRegistryNotAvailable: the registry may still
        be working on it, and the sweep settles them once it cannot be.
        """
        if not stored:
            return errors
        held = self._registered({record.unique_id for record in stored})
        if all(held.get(record.unique_id) == record.sha1 for record in stored):
            logger.warning(
                "ITI-42 went unanswered, but the Document Registry holds the "
                "submission's %d documents: confirmed",
                len(stored),
            )
            return self._confirm_registered(stored)
        said = errors[0].message if errors else "ITI-42 went unanswered"
        return _errors(
            [
                RegistryNotAvailable(
                    f"{said}; the registry may still register the submission, so "
                    "its documents are kept, not retrievable, until the registry "
                    "says whether it did"
                )
            ]
        )

    def _complete_entry(
        self, entry: RegistryObject, document: wire.Attachment
    ) -> list[XdsError]:
        errors: list[XdsError] = []
        size = entry.slot("size")
        if size is not None and size != str(document.size):
            errors.append(
                SizeMismatch(
                    f"DocumentEntry {entry.id} size is {size}, the document has "
                    f"{document.size} bytes (ITI TF-2 3.41.4.1.3)",
                    entry.id,
                )
            )
        digest = entry.slot("hash")
        if digest is not None and digest.lower() != document.sha1:
            errors.append(
                HashMismatch(
                    f"DocumentEntry {entry.id} hash {digest} is not the document's "
                    f"SHA-1 {document.sha1} (ITI TF-2 3.41.4.1.3)",
                    entry.id,
                )
            )
        repository = entry.slot("repositoryUniqueId")
        if repository is not None and repository != self.repository_unique_id:
            errors.append(
                MetadataInvalid(
                    f"DocumentEntry {entry.id} repositoryUniqueId {repository} is not "
                    f"this repository's {self.repository_unique_id}",
                    entry.id,
                )
            )
        if errors:
            return errors
        ebrim.set_slot(entry.element, "size", [str(document.size)])
        ebrim.set_slot(entry.element, "hash", [document.sha1])
        ebrim.set_slot(entry.element, "repositoryUniqueId", [self.repository_unique_id])
        return []

    def _store(
        self, entries: list[RegistryObject], documents: dict[str, wire.Attachment]
    ) -> tuple[list[StoredDocument], list[XdsError]]:
        """Put each new document in the blob store and the table, pending.

        A document already held with the same bytes is left as it is (the
        registry then decides on the duplicate uniqueId); with other bytes
        it is XDSNonIdenticalHash. One still pending belongs to a concurrent
        submission, which alone may complete or remove it.
        """
        stored: list[StoredDocument] = []
        errors: list[XdsError] = []
        for entry in entries:
            unique_id = entry.unique_id or ""
            document = documents[entry.id]
            held = self.find(unique_id)
            if held is None:
                try:
                    held = self._store_one(entry, unique_id, document, stored)
                except BaseException:
                    # A blob store that fails half-way leaves nothing behind.
                    self._remove(stored)
                    raise
                if held is None:
                    continue
            if held.state != STORED:
                age = self.settings.repository.pending_sweep_age
                errors.append(
                    DuplicateUniqueIdInRegistry(
                        f"document {unique_id} is pending: another submission of "
                        "it is under way, or went unanswered by the registry and "
                        f"is settled once {age} s old, when the registry can be "
                        "asked about it; submit again after that",
                        unique_id,
                    )
                )
            elif held.sha1 != document.sha1:
                errors.append(
                    NonIdenticalHash(
                        f"document uniqueId {unique_id} is held with another hash",
                        unique_id,
                    )
                )
        if errors:
            self._remove(stored)
            return [], errors
        return stored, []

    def _store_one(
        self,
        entry: RegistryObject,
        unique_id: str,
        document: wire.Attachment,
        stored: list[StoredDocument],
    ) -> StoredDocument | None:
        """Store one document as pending; return the row that won if another
        submission stored the same uniqueId first."""
        # Each copy gets a blob of its own, so that two submissions of one
        # uniqueId never share or remove each other's file.
        blob = self.blobs.put_file(f"{unique_id}\n{uuid.uuid4()}", document.path)
        record = StoredDocument(
            unique_id,
            entry.mime_type,
            document.size,
            document.sha1,
            blob,
            entry.patient_id,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(repository_document).values(
                        unique_id=unique_id,
                        mime_type=record.mime_type,
                        size=record.size,
                        sha1=record.sha1,
                        patient_id=record.patient_id,
                        state=PENDING,
                        blob=blob,
                    )
                )
        except IntegrityError:
            self.blobs.delete(blob)
            winner = self.find(unique_id)
            if winner is None:
                raise
            return winner
        stored.append(record)
        return None

    def _remove(self, stored: list[StoredDocument]) -> None:
        """Remove what this submission stored, and nothing else.

        Each row is first claimed for removal, from pending to removing, so
        that a document confirmed meanwhile (by its submission, or by a
        sweep in another process) is never removed, nor one removed
        confirmed. Then its blob goes, then its row: a blob the store fails
        to delete keeps its row, which the next sweep retries.
        """
        column = repository_document.c
        claimed = self._move(stored, (PENDING, REMOVING), REMOVING)
        removed = []
        for record in claimed:
            try:
                self.blobs.delete(record.blob)
            except Exception:
                logger.warning(
                    "blob %s of pending document %s not removed; the sweep retries",
                    record.blob,
                    record.unique_id,
                    exc_info=True,
                )
                continue
            removed.append(record)
        with self.engine.begin() as conn:
            for record in removed:
                conn.execute(
                    delete(repository_document).where(
                        column.unique_id == record.unique_id,
                        column.blob == record.blob,
                        column.state == REMOVING,
                    )
                )

    def _confirm(self, stored: list[StoredDocument]) -> list[StoredDocument]:
        """Mark this submission's documents retrievable; return those no
        longer held (swept meanwhile by another process)."""
        confirmed = self._move(stored, (PENDING,), STORED)
        return [record for record in stored if record not in confirmed]

    def _move(
        self, stored: list[StoredDocument], states: tuple[str, ...], state: str
    ) -> list[StoredDocument]:
        """Move each document still in one of ``states`` to ``state``, in one
        transaction; return those moved."""
        column = repository_document.c
        moved = []
        with self.engine.begin() as conn:
            for record in stored:
                changed = conn.execute(
                    update(repository_document)
                    .where(
                        column.unique_id == record.unique_id,
                        column.blob == record.blob,
                        column.state.in_(states),
                    )
                    .values(state=state)
                )
                if changed.rowcount == 1:
                    moved.append(record)
        return moved

    def _confirm_registered(self, stored: list[StoredDocument]) -> list[RegistryError]:
        """Confirm a submission the registry registered: no errors, unless a
        document was swept while its registration was under way; then the
        registry names a document this repository no longer holds."""
        gone = self._confirm(stored)
        if not gone:
            return []
        logger.error(
            "%d documents registered by the Document Registry were swept while "
            "their registration was under way; their entries name documents "
            "this repository no longer holds",
            len(gone),
        )
        return _errors(
            [
                StoredCopyMissing(
                    f"document {record.unique_id} was registered, but removed "
                    "here while its registration was under way; it cannot be "
                    "retrieved",
                    record.unique_id,
                )
                for record in gone
            ]
        )

    def _register(
        self, metadata: etree._Element, patient_id: str | None, ss_unique_id: str | None
    ) -> tuple[Registration, list[RegistryError]]:
        """ITI-42 to the registry: what came of it, and the errors (or
        warnings) to answer with.

        Only a RegistryResponse of status Success registers, and only one of
        status Failure, or a Sender Fault, refuses (ITI TF-2 3.42.4.2).
        Anything else after the request went out (a timeout, a connection
        broken off, a Receiver Fault, an answer that is no RegistryResponse,
        another status) leaves it unheard: the registry may have registered
        the submission.
        """
        url = self.settings.registry_url
        client = wire.SoapClient(
            url,
            timeout=self.settings.repository.registry_timeout,
            answer_within=self.settings.repository.registry_timeout,
            spool_dir=self.blobs.spool,
            ssl_context=tls.client_context_for(self.settings),
        )
        outcome = Registration.UNHEARD
        errors: list[RegistryError] = []
        message_id = None
        try:
            # ITI TF-2 3.42.4.2: the answer is a RegistryResponse alone, so an
            # MTOM package holds its root part only; a flood of parts is
            # refused before it fills the spool. answer_within bounds an
            # answer trickling in, sooner than a pace would.
            with client.call(
                transaction("ITI-42")["request_action"], metadata, max_parts=1
            ) as reply:
                message_id = reply.relates_to
                outcome, errors = _registry_answer(reply.body)
        except wire.PeerFault as exc:
            # SOAP 1.2 Part 1 5.4.6: a Sender Fault says the message was at
            # fault, so nothing was done; any other may come after a commit.
            if exc.code == "env:Sender":
                outcome = Registration.REFUSED
            logger.warning("ITI-42 to the Document Registry failed: %s", exc)
            # Its codes, not its reason, which may tell of the registry's
            # insides.
            codes = " ".join((exc.code or "no code", *exc.subcodes))
            errors = _errors(
                [
                    RegistryNotAvailable(
                        f"the Document Registry answered a Fault ({codes})"
                    )
                ]
            )
        except wire.TransportError as exc:
            logger.warning("ITI-42 to the Document Registry failed: %s", exc)
            if exc.answer is not None and exc.answer.tag == RESPONSE:
                # A RegistryResponse says what it says, whatever the HTTP
                # status it came with.
                outcome, errors = _registry_answer(exc.answer)
            else:
                if exc.unsent:
                    outcome = Registration.REFUSED
                # The registry's address is the repository's own business.
                errors = _errors(
                    [
                        RegistryNotAvailable(
                            "the Document Registry did not answer ITI-42: " + exc.reason
                        )
                    ]
                )
        finally:
            # ITI TF-2 3.42.5.1: the repository audits its ITI-42 as Export.
            self.auditor.record(
                audit.AuditEvent(
                    transaction="ITI-42",
                    actor="Document Repository",
                    outcome=audit.Outcome.SUCCESS
                    if outcome is Registration.REGISTERED
                    else audit.Outcome.SERIOUS_FAILURE,
                    source=audit.Endpoint(
                        ns.WSA_ANONYMOUS, self.settings.node.advertised
                    ),
                    destination=audit.Endpoint(url, urlsplit(url).hostname or ""),
                    patient_id=patient_id,
                    submission_set_unique_id=ss_unique_id,
                    message_id=message_id,
                )
            )
        return outcome, errors

    # --- ITI-43 ---------------------------------------------------------

    def find(self, unique_id: str) -> StoredDocument | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(repository_document).where(
                    repository_document.c.unique_id == unique_id
                )
            ).first()
        if row is None:
            return None
        return StoredDocument(
            row.unique_id,
            row.mime_type,
            row.size,
            row.sha1,
            row.blob,
            row.patient_id,
            row.state,
        )

    def retrieve(
        self, request: etree._Element
    ) -> tuple[etree._Element, list[wire.OutgoingPart], list[StoredDocument]]:
        """Answer a RetrieveDocumentSetRequest (ITI TF-2 3.43.4.2)."""
        errors: list[XdsError] = []
        found: list[tuple[StoredDocument, str | None]] = []
        asked: set[tuple[str, str]] = set()
        for item in request.findall(f"{{{ns.XDSB}}}DocumentRequest"):
            repository_id = child_text(item, "RepositoryUniqueId")
            unique_id = child_text(item, "DocumentUniqueId")
            # A document asked for twice is sent once.
            if (repository_id, unique_id) in asked:
                continue
            asked.add((repository_id, unique_id))
            community = child_text(item, "HomeCommunityId") or None
            if repository_id != self.repository_unique_id:
                errors.append(
                    UnknownRepositoryId(
                        f"repositoryUniqueId {repository_id} is not this repository's",
                        repository_id,
                    )
                )
                continue
            record = self.find(unique_id)
            if record is None or record.state != STORED:
                errors.append(
                    DocumentUniqueIdError(
                        f"document {unique_id} is not held by this repository",
                        unique_id,
                    )
                )
                continue
            # An answer's status and length are sent before its parts: a
            # stored copy that is gone or damaged is told now, not by a
            # connection that breaks off.
            if self.blobs.size(record.blob) != record.size:
                logger.error(
                    "ITI-43: the stored copy of document %s (%s) is missing or "
                    "not of its recorded size",
                    unique_id,
                    record.blob,
                )
                errors.append(
                    StoredCopyMissing(
                        f"document {unique_id} is registered but this repository "
                        "cannot read its stored copy",
                        unique_id,
                    )
                )
                continue
            found.append((record, community))

        body, parts = retrieve_response(
            [
                (
                    r.unique_id,
                    self.repository_unique_id,
                    r.mime_type,
                    StreamSource(partial(self.blobs.open, r.blob), r.size),
                    community,
                )
                for r, community in found
            ],
            errors,
            ACTOR,
        )
        return body, parts, [r for r, _ in found]

    # --- SOAP edge -------------------------------------------------------

    def app(self, spool_root: Path) -> Flask:
        return soap_app(
            "repository",
            self.settings.repository.path,
            {
                "ITI-41": self.handle_provide_and_register,
                "ITI-43": self.handle_retrieve,
            },
            spool_root,
        )

    def handle_provide_and_register(
        self, message: wire.SoapMessage, peer: Peer
    ) -> Reply:
        started = time.monotonic()
        try:
            errors, entries, ss_unique_id = self.provide_and_register(message)
        except wire.SoapFault:
            raise
        except Exception:
            logger.exception("ITI-41 Provide and Register Document Set-b failed")
            errors, entries, ss_unique_id = (
                [
                    RegistryError(
                        "XDSRepositoryError", "internal Document Repository error"
                    )
                ],
                [],
                None,
            )
        status = status_of(errors)
        patient_ids = {e.patient_id for e in entries if e.patient_id}
        # RAD-68 travels as ITI-41; an imaging manifest among the entries
        # tells it apart (RAD TF-3 4.68.4.1.2.3).
        manifest_format = ebrim.metadata_table()["XDS-I"]["format_code"]
        transaction_id = "ITI-41"
        if any(
            manifest_format in [c.code for c in e.codes("formatCode")] for e in entries
        ):
            transaction_id = "RAD-68"
        self.auditor.record(
            audit.AuditEvent(
                transaction=transaction_id,
                actor="Document Repository",
                outcome=audit.Outcome.SUCCESS
                if status == ResponseStatus.SUCCESS
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(peer.reply_to, peer.host),
                destination=audit.Endpoint(
                    peer.endpoint, self.settings.node.advertised
                ),
                patient_id=next(iter(patient_ids), None),
                submission_set_unique_id=ss_unique_id,
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s, MessageID %s, SubmissionSet %s, "
            "%d DocumentEntries, errors %s, %.3f s",
            transaction_id,
            "Provide and Register Document Set-b",
            peer.host,
            status.value.rsplit(":", 1)[-1],
            logs.quoted(message.message_id),
            ss_unique_id,
            len(entries),
            [e.code for e in errors] or "none",
            time.monotonic() - started,
        )
        return Reply(registry_response(errors))

    def handle_retrieve(self, message: wire.SoapMessage, peer: Peer) -> Reply:
        started = time.monotonic()
        body, parts, documents = self.retrieve(message.body)
        status = read_status(body)
        self.auditor.record(
            audit.AuditEvent(
                transaction="ITI-43",
                actor="Document Repository",
                outcome=retrieve_outcome(status, len(documents)),
                source=audit.Endpoint(
                    self.settings.url("repository"), self.settings.node.advertised
                ),
                destination=audit.Endpoint(peer.reply_to, peer.host),
                patient_id=next(
                    (d.patient_id for d in documents if d.patient_id), None
                ),
                documents=tuple(
                    audit.DocumentRef(d.unique_id, self.repository_unique_id)
                    for d in documents
                ),
                message_id=message.message_id,
            )
        )
        logger.info(
            "%s %s from %s: %s, MessageID %s, %d documents, %.3f s",
            "ITI-43",
            "Retrieve Document Set",
            peer.host,
            status.rsplit(":", 1)[-1],
            logs.quoted(message.message_id),
            len(parts),
            time.monotonic() - started,
        )
        return Reply(body, parts)


def _registry_answer(body: etree._Element) -> tuple[Registration, list[RegistryError]]:
    """Read the registry's answer to ITI-42 (ITI TF-2 3.42.4.2).

    Success registers, whatever RegistryErrors come with it (they are passed
    on as warnings); Failure refuses, with an error even when the registry
    gave none. Any other answer says nothing of what the registry did.
    """
    if body.tag != RESPONSE:
        return Registration.UNHEARD, _errors(
            [
                RegistryNotAvailable(
                    f"the Document Registry answered ITI-42 with {body.tag}, not "
                    "a RegistryResponse"
                )
            ]
        )
    status = read_status(body)
    errors = read_errors(body)
    if status == ResponseStatus.SUCCESS.value:
        return Registration.REGISTERED, [
            replace(e, severity=SEVERITY_WARNING) for e in errors
        ]
    if status == ResponseStatus.FAILURE.value:
        if not any(e.is_error for e in errors):
            errors.append(
                RegistryError(
                    "XDSRegistryError", "the Document Registry answered Failure"
                )
            )
        return Registration.REFUSED, errors
    return Registration.UNHEARD, _errors(
        [
            RegistryNotAvailable(
                f"the Document Registry answered ITI-42 with status {status!r}, "
                "neither Success nor Failure"
            )
        ]
    )


def _errors(errors: list[XdsError]) -> list[RegistryError]:
    return [RegistryError(e.code_for(ACTOR), e.message, e.location) for e in errors]


def child_text(parent: etree._Element, local: str, namespace: str = ns.XDSB) -> str:
    """Return an element's text, with surrounding white space removed."""
    child = parent.find(f"{{{namespace}}}{local}")
    return (child.text or "").strip() if child is not None else ""


def retrieve_outcome(status: str, returned: int) -> audit.Outcome:
    """The audit outcome of a retrieve: partial when some documents came back
    (DICOM PS3.15 A.5.3.1 EventOutcomeIndicator)."""
    if status == ResponseStatus.SUCCESS.value:
        return audit.Outcome.SUCCESS
    return audit.Outcome.MINOR_FAILURE if returned else audit.Outcome.SERIOUS_FAILURE


def retrieve_response(
    documents: list[tuple[str, str, str, Path | StreamSource, str | None]],
    errors: list[XdsError],
    actor: str,
) -> tuple[etree._Element, list[wire.OutgoingPart]]:
    """Build a RetrieveDocumentSetResponse with one MTOM part per document.

    ``documents`` holds (uniqueId, repositoryUniqueId, mimeType, file or
    stream, homeCommunityId). ITI TF-2 3.43.4.2.3: Success when every document came
    back, PartialSuccess when some did, Failure when none did. RAD TF-3
    4.69.4.2 answers with the same element.
    """
    registry_errors = [
        RegistryError(e.code_for(actor), e.message, e.location) for e in errors
    ]
    if registry_errors and documents:
        status = ResponseStatus.PARTIAL_SUCCESS
    else:
        status = status_of(registry_errors)
    response = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetResponse",
        nsmap={"xdsb": ns.XDSB, "rs": ns.RS},
    )
    response.append(registry_response(registry_errors, status))
    parts: list[wire.OutgoingPart] = []
    for unique_id, repository_id, mime_type, body, community in documents:
        item = etree.SubElement(response, f"{{{ns.XDSB}}}DocumentResponse")
        if community:
            etree.SubElement(item, f"{{{ns.XDSB}}}HomeCommunityId").text = community
        etree.SubElement(item, f"{{{ns.XDSB}}}RepositoryUniqueId").text = repository_id
        etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
        etree.SubElement(item, f"{{{ns.XDSB}}}mimeType").text = mime_type
        content_id = wire.new_content_id()
        document = etree.SubElement(item, f"{{{ns.XDSB}}}Document")
        document.append(wire.xop_include(content_id))
        if isinstance(body, Path):
            parts.append(wire.OutgoingPart(content_id, mime_type, path=body))
        else:
            parts.append(wire.OutgoingPart(content_id, mime_type, stream=body))
    return response, parts

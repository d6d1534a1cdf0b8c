"""Imaging Document Source: publish a study (KOS manifest + RAD-68) and serve
RAD-69 Retrieve Imaging Document Set.

RAD TF-3 4.68 (Provide and Register Imaging Document Set – MTOM/XOP) and
4.69 (Retrieve Imaging Document Set). The source keeps every published
instance in its own store; the manifest's Retrieve Location UID is this
actor's repositoryUniqueId. A study left with no instance has its manifest
deprecated with ITI-57 Update Document Set (ITI TF-2 3.57.4.1.3.3.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from flask import Flask
from lxml import etree
from pydicom.datadict import tag_for_keyword
from sqlalchemy import Engine, Row, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from xdsi import audit, logs, ns, tls, wire
from xdsi.actors.consumer import Consumer, ConsumerError
from xdsi.actors.dicomweb import dicomweb_blueprint
from xdsi.actors.provide import (
    Document,
    Sender,
    SubmitError,
    provide_and_register,
    update_document_set,
)
from xdsi.actors.repository import (
    child_text,
    retrieve_outcome,
    retrieve_response,
)
from xdsi.actors.soap_endpoint import Peer, Reply, soap_app
from xdsi.config import Settings
from xdsi.dicom import qido, scan, transcode
from xdsi.dicom.manifest import EncodedManifest, ManifestOptions, encoded_manifest
from xdsi.errors import (
    DocumentUniqueIdError,
    ImagingRequestError,
    StoredCopyMissing,
    TransferSyntaxUnavailable,
    UnknownRepositoryId,
    XdsError,
)
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.build import (
    ManifestEntry,
    SubmissionSetSpec,
    add_replacement,
    manifest_submission,
    new_oid,
    status_update_submission,
    utc_dtm,
)
from xdsi.metadata.codes import Code
from xdsi.metadata.ebrim import STATUS_APPROVED, STATUS_DEPRECATED, new_uuid
from xdsi.metadata.responses import (
    read_status,
)
from xdsi.store.blobs import BlobStore, spool_path
from xdsi.store.schema import (
    MANIFEST_CURRENT,
    MANIFEST_PENDING,
    MANIFEST_REPLACED,
    MANIFEST_WITHDRAWN,
    QIDO_COLUMNS,
    imaging_instance,
    imaging_manifest,
    instance_published,
)
from xdsi.wire.mtom import StreamSource

logger = logging.getLogger(__name__)

ACTOR = "imaging_source"

# A manifest sent without an answer heard and not found in the registry is
# taken as lost only after this many seconds: longer than RAD-68's timeout
# plus the repository's ITI-42 timeout (RAD_68_TIMEOUT each), so that no
# request carrying it can still be under way.
# Limitation: a registry that commits a registration later still (after
# its submitter gave up) can leave a second Approved manifest beside one
# sent after SETTLE_AFTER.
RAD_68_TIMEOUT = 120.0
SETTLE_AFTER = 2 * RAD_68_TIMEOUT + 60.0


def _age(created_at: datetime | None) -> float:
    """Seconds since a row's created_at (UTC; SQLite gives it naive)."""
    if created_at is None:
        return math.inf
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created_at).total_seconds()


class PublishError(SubmitError):
    """A study could not be published; ``errors`` holds the peer's answer."""


@dataclass(frozen=True)
class Published:
    """The outcome of publishing one study."""

    study_instance_uid: str
    manifest_uid: str
    submission_set_unique_id: str
    instances: int
    bytes: int
    # The manifest this one replaced (RPLC), if any.
    replaced: str | None = None


# Instances are copied into the store by this many threads, so that their
# fsyncs overlap (ext4 commits concurrent fsyncs in one journal transaction).
KEEP_THREADS = 8
# Rows written per transaction when instances stored before their QIDO-RS
# attributes were kept are indexed.
INDEX_BATCH = 500


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def instance_row(
    header: scan.InstanceHeader, blob: str, sha256: str, patient_id: str | None
) -> dict[str, object]:
    """The imaging_instance row of an instance kept in the store as ``blob``,
    its QIDO-RS attributes indexed (DICOM PS3.18 10.6)."""
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "size": header.size,
        "sha256": sha256,
        "patient_id": patient_id,
        "blob": blob,
        **attribute_columns(header.attributes),
    }


def attribute_columns(attributes: str | None) -> dict[str, str | None]:
    """The imaging_instance columns that hold ``attributes``, the DICOM JSON
    of an instance's QIDO-RS attributes: the JSON itself, and the value of
    each attribute of QIDO_COLUMNS in its own column."""
    if attributes is None:
        return {"attributes": None} | dict.fromkeys(QIDO_COLUMNS.values())
    elements = json.loads(attributes)
    return {"attributes": attributes} | {
        column: qido.indexed_value(elements, f"{tag_for_keyword(keyword):08X}")
        for keyword, column in QIDO_COLUMNS.items()
    }


def blob_key(sop_instance_uid: str) -> str:
    """A fresh key for a stored copy of an instance: each copy has a blob of
    its own, so that two intakes of one instance, or a removal and a new
    intake, never write or remove each other's file."""
    return f"{sop_instance_uid}\n{uuid.uuid4()}"


def copy_hashed(source: Path, target: Path) -> str:
    """Copy ``source`` to the new file ``target`` in one read; return the
    copy's SHA-256."""
    digest = hashlib.sha256()
    # Patient data: for the node's user alone, as a spooled intake is.
    created = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(source, "rb") as src, open(created, "wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


# Transfer syntaxes an error names of a request's list: each instance that
# cannot be sent has its error, and a list of thousands repeated in each
# would make an answer hundreds of times the request's size.
NAMED_SYNTAXES = 10


def _listed(syntaxes: list[str]) -> str:
    """The first NAMED_SYNTAXES of ``syntaxes``, and how many more there are."""
    named = ", ".join(syntaxes[:NAMED_SYNTAXES])
    more = len(syntaxes) - NAMED_SYNTAXES
    return f"{named} and {more} more" if more > 0 else named


@dataclass(frozen=True)
class _DocumentRequest:
    """One DocumentRequest of a RAD-69 request, its values stripped."""

    repository_id: str
    unique_id: str
    community_id: str | None

    @classmethod
    def read(cls, item: etree._Element) -> _DocumentRequest:
        return cls(
            child_text(item, "RepositoryUniqueId"),
            child_text(item, "DocumentUniqueId"),
            child_text(item, "HomeCommunityId") or None,
        )


@dataclass(frozen=True)
class TransferredInstance:
    """An instance a RAD-69 answer sends, with what its audit record names."""

    sop_instance_uid: str
    study_instance_uid: str
    # The affinity domain's patient id it was taken in under.
    patient_id: str | None


@dataclass(frozen=True)
class Rad69Answer:
    """A RetrieveDocumentSetResponse to send, and what it sends.

    ``studies_asked`` holds the study of each StudyRequest that named one,
    in request order.
    """

    body: etree._Element
    parts: list[wire.OutgoingPart]
    transferred: tuple[TransferredInstance, ...]
    studies_asked: tuple[str, ...]


class ImagingSource:
    """The Imaging Document Source over its instance store."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        blobs: BlobStore,
        auditor: audit.Auditor,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.auditor = auditor

    @property
    def repository_unique_id(self) -> str:
        return self.settings.imaging_source.repository_unique_id

    # --- intake and RAD-68 ----------------------------------------------

    def keep_instances(self, study: scan.Study, patient_id: str) -> int:
        """Copy the study's instances into the store; return the bytes kept.

        Each instance is read once (copied and hashed together) and made
        durable before the instance rows are written, all in one
        transaction; instances already held are left as they are.

        Raises
        ------
        PublishError
            A file could not be read (gone since it was scanned, say); no
            copy of the study's instances is kept then.
        """
        held = self.held_instances(h.sop_instance_uid for h in study.instances)
        fresh = list(
            {
                h.sop_instance_uid: h
                for h in study.instances
                if h.sop_instance_uid not in held
            }.values()
        )
        with ThreadPoolExecutor(KEEP_THREADS) as pool:
            copies = [pool.submit(self._keep, header) for header in fresh]
        kept: list[tuple[str, str]] = []
        unreadable: tuple[scan.InstanceHeader, OSError] | None = None
        for header, copy in zip(fresh, copies, strict=True):
            try:
                kept.append(copy.result())
            except OSError as exc:
                unreadable = unreadable or (header, exc)
        if unreadable is not None:
            # All or nothing: no stored copy stays without its row.
            for blob, _ in kept:
                self.blobs.delete(blob)
            header, exc = unreadable
            raise PublishError(
                f"cannot keep {header.path}: {exc.strerror or exc}; nothing kept"
            )
        rows = [
            instance_row(header, blob, sha256, patient_id)
            for header, (blob, sha256) in zip(fresh, kept, strict=True)
        ]
        try:
            if rows:
                with self.engine.begin() as conn:
                    conn.execute(insert(imaging_instance), rows)
        except IntegrityError:
            # Another intake took some of them in meanwhile: row by row,
            # and its copies are the ones held.
            for row in rows:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(insert(imaging_instance), [row])
                except IntegrityError:
                    self.blobs.delete(str(row["blob"]))
        return sum(header.size for header in study.instances)

    def _keep(self, header: scan.InstanceHeader) -> tuple[str, str]:
        """Copy one instance into the store; return its blob and SHA-256."""
        spooled = self.blobs.spool / f"keep-{uuid.uuid4().hex}"
        try:
            sha256 = copy_hashed(header.path, spooled)
            # A file cut short or grown since its header was read is not
            # the instance the manifest describes.
            # Limitation: a change that keeps the size is not seen here.
            size = spooled.stat().st_size
            if size != header.size:
                raise OSError(
                    f"it changed since it was read ({size} bytes, "
                    f"{header.size} when read)"
                )
            return self.blobs.put_file(
                blob_key(header.sop_instance_uid), spooled
            ), sha256
        finally:
            spooled.unlink(missing_ok=True)

    def index_attributes(self) -> int:
        """Keep the QIDO-RS attributes of the instances stored before they
        were kept (revision 0006); return how many were indexed.

        Each header is read once, and its row written in a batch of
        INDEX_BATCH. A file that cannot be read is counted at WARNING and
        its row left as it is: its instance is answered with its UIDs
        alone, and indexed when the next process tries again.
        """
        column = imaging_instance.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(column.sop_instance_uid, column.blob).where(
                    column.attributes.is_(None)
                )
            ).all()
        if not rows:
            return 0
        started = time.monotonic()
        statement = update(imaging_instance).where(
            column.sop_instance_uid == bindparam("uid"),
            column.attributes.is_(None),
        )
        indexed = unreadable = 0
        for first in range(0, len(rows), INDEX_BATCH):
            values = []
            for row in rows[first : first + INDEX_BATCH]:
                try:
                    header, _ = scan.read_header(self.blobs.path(row.blob))
                except scan.DicomInputError:
                    unreadable += 1
                    continue
                values.append(
                    {"uid": row.sop_instance_uid} | attribute_columns(header.attributes)
                )
            if values:
                with self.engine.begin() as conn:
                    conn.execute(statement, values)
                indexed += len(values)
        if unreadable:
            logger.warning(
                "QIDO-RS index: %d instance files cannot be read; they are "
                "found by their UIDs alone",
                unreadable,
            )
        logger.info(
            "QIDO-RS index: attributes of %d instances kept in %.1f s",
            indexed,
            time.monotonic() - started,
        )
        return indexed

    def publish(self, study: scan.Study, patient_id: str) -> Published:
        """Keep the study, build its manifest and submit it with RAD-68.

        ``patient_id`` is the affinity domain's id (CX, ITI TF-3 4.2.3.2.16);
        the study's own Patient ID becomes sourcePatientId, or the affinity
        domain's id when the images carry none. The manifest references every
        instance held of the study, those kept before included; when the
        study was published already, the new manifest replaces the old one
        (RAD TF-3 4.68.4.1.2.3, an RPLC Association of ITI TF-3 4.2.2.2).
        """
        # The manifest is built while the instances are kept when it will
        # reference exactly the study's instances: none held before but
        # those.
        read = {header.sop_instance_uid for header in study.instances}
        alone = self._held_uids(study.study_instance_uid) <= read
        early = None
        with ThreadPoolExecutor(1) as keeper:
            kept = keeper.submit(self.keep_instances, study, patient_id)
            if alone:
                early = self._manifest(study)
            kept.result()
        published = self.republish(study.study_instance_uid, patient_id, study, early)
        if published is None:
            raise PublishError(f"study {study.study_instance_uid} holds no instance")
        return published

    def _held_uids(self, study_instance_uid: str) -> set[str]:
        """The SOP Instance UIDs held of a study."""
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    select(imaging_instance.c.sop_instance_uid).where(
                        imaging_instance.c.study_instance_uid == study_instance_uid
                    )
                ).scalars()
            )

    def held_study(
        self, study_instance_uid: str, known: scan.Study | None = None
    ) -> scan.Study | None:
        """The study as held in the store now; None when nothing is held.

        ``known`` is the study as just read by the caller: when the store
        holds exactly its instances, it is the answer, and no header is read
        again.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    imaging_instance.c.sop_instance_uid, imaging_instance.c.blob
                ).where(imaging_instance.c.study_instance_uid == study_instance_uid)
            ).all()
        if not rows:
            return None
        if known is not None and known.study_instance_uid == study_instance_uid:
            read = {header.sop_instance_uid for header in known.instances}
            if read == {row.sop_instance_uid for row in rows}:
                return known
        blobs = sorted(row.blob for row in rows)
        studies = scan.scan_files(self.blobs.path(blob) for blob in blobs)
        return studies.studies[0] if studies.studies else None

    def current_manifest(self, study_instance_uid: str) -> Row | None:
        """The study's manifest now Approved in the registry, if any."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(imaging_manifest).where(
                    imaging_manifest.c.study_instance_uid == study_instance_uid,
                    imaging_manifest.c.status == MANIFEST_CURRENT,
                )
            ).first()

    def republish(
        self,
        study_instance_uid: str,
        patient_id: str,
        known: scan.Study | None = None,
        built: EncodedManifest | None = None,
    ) -> Published | None:
        """Publish what is held of a study now, replacing its manifest.

        Without any instance left, the current manifest is withdrawn (ITI-57
        deprecates it in the Document Registry) and None returned. ``known``
        saves reading the headers again (see :meth:`held_study`); ``built``
        is the manifest of ``known``, used when the store holds just that.
        """
        self._settle_pending(study_instance_uid)
        current = self.current_manifest(study_instance_uid)
        study = self.held_study(study_instance_uid, known)
        if study is None:
            if current is not None:
                self.withdraw(current, patient_id)
            return None
        if built is None or study is not known:
            built = self._manifest(study)
        try:
            return self._submit(study, patient_id, current, built)
        except PublishError as exc:
            if not self._deprecated_meanwhile(current, exc):
                raise
        # Another Document Administrator deprecated the current manifest
        # (ITI-57): there is nothing to replace, and the study is published
        # anew.
        assert current is not None
        logger.warning(
            "manifest %s of study %s was Deprecated in the registry by another: "
            "the study is published anew",
            current.sop_instance_uid,
            study_instance_uid,
        )
        self._mark_withdrawn(current)
        return self._submit(study, patient_id, None, built)

    def _deprecated_meanwhile(self, current: Row | None, exc: PublishError) -> bool:
        """Whether a replacement failed because the manifest it replaces is
        Deprecated in the registry (XDSRegistryDeprecatedDocumentError, ITI
        TF-3 4.2.2.2.3), as the registry, asked, confirms."""
        if current is None or not current.entry_uuid:
            return False
        if not any(e.code == "XDSRegistryDeprecatedDocumentError" for e in exc.errors):
            return False
        try:
            return self._entry_status(current.entry_uuid) == STATUS_DEPRECATED
        except PublishError:
            return False

    def _promote(self, study_instance_uid: str, sop_instance_uid: str) -> None:
        """Make a registered manifest the study's current one; the one it
        replaced (RPLC) is then replaced here too."""
        column = imaging_manifest.c
        with self.engine.begin() as conn:
            conn.execute(
                update(imaging_manifest)
                .where(
                    column.study_instance_uid == study_instance_uid,
                    column.status == MANIFEST_CURRENT,
                )
                .values(status=MANIFEST_REPLACED)
            )
            conn.execute(
                update(imaging_manifest)
                .where(column.sop_instance_uid == sop_instance_uid)
                .values(status=MANIFEST_CURRENT)
            )

    def _forget(self, sop_instance_uid: str, blob: str) -> None:
        """Drop a manifest the registry does not hold."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(imaging_manifest).where(
                    imaging_manifest.c.sop_instance_uid == sop_instance_uid
                )
            )
        self.blobs.delete(blob)

    def _settle_pending(self, study_instance_uid: str) -> None:
        """Settle the manifests of a study sent without an answer heard.

        A publisher killed, or a connection lost, after RAD-68 went out
        leaves its manifest pending. GetDocuments (ITI TF-2
        3.18.4.1.2.3.7.5) by its entryUUID tells whether the registry took
        it: then it is the current manifest (and what it replaced is
        replaced). One the registry does not hold is dropped only once no
        request that carries it can still be under way (SETTLE_AFTER);
        until then the study waits, so that a registration still in flight
        (a slow registry) never lands beside a second manifest.

        Raises
        ------
        PublishError
            The registry could not be asked; nothing is published until it
            can be.
        """
        column = imaging_manifest.c
        with self.engine.connect() as conn:
            pending = conn.execute(
                select(
                    column.sop_instance_uid,
                    column.entry_uuid,
                    column.blob,
                    column.created_at,
                ).where(
                    column.study_instance_uid == study_instance_uid,
                    column.status == MANIFEST_PENDING,
                )
            ).all()
        for row in pending:
            if self._registered(row.entry_uuid):
                logger.warning(
                    "manifest %s of study %s was registered, unheard: it is the "
                    "current one",
                    row.sop_instance_uid,
                    study_instance_uid,
                )
                self._promote(study_instance_uid, row.sop_instance_uid)
            elif _age(row.created_at) < SETTLE_AFTER:
                raise PublishError(
                    f"manifest {row.sop_instance_uid} was sent "
                    f"{_age(row.created_at):.0f} s ago with no answer heard and "
                    "is not registered yet; it may still be on its way, so the "
                    f"study waits until {SETTLE_AFTER:.0f} s have passed"
                )
            else:
                logger.warning(
                    "manifest %s of study %s was not registered: dropped",
                    row.sop_instance_uid,
                    study_instance_uid,
                )
                self._forget(row.sop_instance_uid, row.blob)

    def _registered(self, entry_uuid: str) -> bool:
        """Whether the Document Registry holds the DocumentEntry
        ``entry_uuid``, whatever its status."""
        return self._entry_status(entry_uuid) is not None

    def _entry_status(self, entry_uuid: str) -> str | None:
        """The availabilityStatus of the DocumentEntry ``entry_uuid`` in the
        Document Registry, None when it holds no such entry (ITI-18
        GetDocuments, ITI TF-2 3.18.4.1.2.3.7.5), asked as a Document
        Consumer.

        Raises
        ------
        PublishError
            The registry could not be asked.
        """
        request = stored_query.build_query(
            "GetDocuments", {"$XDSDocumentEntryEntryUUID": [entry_uuid]}
        )
        consumer = Consumer(self.settings, self.auditor, self.blobs.spool)
        try:
            body = consumer.query(self.settings.imaging_source_registry_url, request)
        except ConsumerError as exc:
            raise PublishError(str(exc), exc.errors) from exc
        for entry in ebrim.read_registry_objects(body).document_entries:
            if entry.id == entry_uuid:
                return entry.status
        return None

    def withdraw(self, manifest: Row, patient_id: str) -> None:
        """Deprecate a manifest whose study has no instance left.

        Deprecating a DocumentEntry without replacing it is ITI-57 Update
        Document Set (ITI TF-2 3.57.4.1.3.3.2, availabilityStatus Approved to
        Deprecated); an RPLC needs a replacement, and a manifest referencing
        no instance is no valid KOS (DICOM PS3.3 C.17.6.2.1: the Current
        Requested Procedure Evidence Sequence is Type 1). The update goes to
        the Document Registry of the repository the manifest was published
        to; the manifest is marked withdrawn here only once that registry
        accepted it.

        An ITI-57 that fails while the registry holds the entry Deprecated
        already (another Document Administrator's update, or this node's own
        whose answer was lost) has done its work: the manifest is withdrawn.

        Raises
        ------
        PublishError
            The Document Registry refused the update or could not be reached,
            and the entry is not Deprecated; the manifest stays current, so
            that the withdrawal is retried.
        """
        if manifest.entry_uuid:
            try:
                self._deprecate(manifest, patient_id)
            except PublishError:
                try:
                    status = self._entry_status(manifest.entry_uuid)
                except PublishError:
                    status = None
                if status != STATUS_DEPRECATED:
                    raise
                logger.warning(
                    "manifest %s of study %s is Deprecated in the registry already",
                    manifest.sop_instance_uid,
                    manifest.study_instance_uid,
                )
        else:
            # Limitation: a manifest published before its entryUUID was kept
            # cannot be named in an ITI-57; it is withdrawn here only and
            # stays Approved in the Document Registry.
            logger.warning(
                "manifest %s of study %s withdrawn here only: its entryUUID is "
                "not known, so the registry entry stays Approved",
                manifest.sop_instance_uid,
                manifest.study_instance_uid,
            )
        self._mark_withdrawn(manifest)
        logger.info(
            "manifest %s of study %s withdrawn: no instance left",
            manifest.sop_instance_uid,
            manifest.study_instance_uid,
        )

    def _mark_withdrawn(self, manifest: Row) -> None:
        """Note a manifest as no longer current here."""
        with self.engine.begin() as conn:
            conn.execute(
                update(imaging_manifest)
                .where(imaging_manifest.c.sop_instance_uid == manifest.sop_instance_uid)
                .values(status=MANIFEST_WITHDRAWN)
            )

    def _submission_set(self, patient_id: str) -> SubmissionSetSpec:
        """A fresh SubmissionSet of this Imaging Document Source."""
        cfg = self.settings.imaging_source
        return SubmissionSetSpec(
            entry_id="SubmissionSet01",
            unique_id=new_oid(),
            source_id=cfg.source_id,
            patient_id=patient_id,
            content_type_code=Code(*cfg.content_type_code),
            author_institution=cfg.institution_name,
            submission_time=utc_dtm(),
        )

    def _deprecate(self, manifest: Row, patient_id: str) -> None:
        """Send the ITI-57 that deprecates ``manifest``'s DocumentEntry."""
        submission_set = self._submission_set(patient_id)
        request = status_update_submission(
            submission_set, manifest.entry_uuid, STATUS_APPROVED, STATUS_DEPRECATED
        )
        sender = Sender(
            "ITI-57",
            "Document Administrator",
            self.auditor,
            self.settings.node.advertised,
        )
        try:
            update_document_set(
                self.settings.imaging_source_registry_url,
                request,
                sender=sender,
                patient_id=patient_id,
                submission_set_unique_id=submission_set.unique_id,
                spool_dir=self.blobs.spool,
                ssl_context=tls.client_context_for(self.settings),
            )
        except SubmitError as exc:
            raise PublishError(str(exc), exc.errors) from exc

    def _manifest(self, study: scan.Study) -> EncodedManifest:
        """Build and encode the manifest of ``study``; read its metadata.

        A large study's is built in a worker process, so that the node's
        threads are not held up meanwhile (see :mod:`xdsi.dicom.manifest`).
        """
        cfg = self.settings.imaging_source
        options = ManifestOptions(
            retrieve_ae_title=cfg.ae_title,
            retrieve_location_uid=self.repository_unique_id,
            retrieve_url=self.settings.dicomweb_url,
            institution_name=cfg.institution_name,
            accession_assigning_authority=cfg.accession_assigning_authority,
        )
        return encoded_manifest(study, options)

    def _submit(
        self,
        study: scan.Study,
        patient_id: str,
        current: Row | None,
        built: EncodedManifest,
    ) -> Published:
        """Send the manifest of ``study`` with RAD-68."""
        cfg = self.settings.imaging_source
        data, facts = built.data, built.facts
        source_patient_id = facts.source_patient_id
        if not source_patient_id:
            # ITI TF-3 4.2.3.2.23 requires sourcePatientId; without a Patient
            # ID (0010,0020) in the images the domain's id stands in.
            logger.warning(
                "study %s has no Patient ID (0010,0020); sourcePatientId is the "
                "affinity domain's patient id",
                study.study_instance_uid,
            )
            source_patient_id = patient_id
        # The entryUUID is ours, so that a later replacement can name it.
        entry = ManifestEntry(
            entry_id=new_uuid(),
            unique_id=facts.unique_id,
            patient_id=patient_id,
            source_patient_id=source_patient_id,
            source_patient_info=facts.source_patient_info,
            title=facts.title,
            creation_time=facts.creation_time,
            service_start_time=facts.service_start_time,
            service_stop_time=facts.service_stop_time,
            event_codes=facts.event_codes,
            reference_ids=facts.reference_ids,
            mime_type=facts.mime_type,
            format_code=facts.format_code,
            class_code=Code(*cfg.class_code),
            type_code=Code(*cfg.type_code),
            practice_setting_code=Code(*cfg.practice_setting_code),
            healthcare_facility_type_code=Code(*cfg.healthcare_facility_type_code),
            confidentiality_code=Code(*cfg.confidentiality_code),
            language_code=cfg.language_code,
            author_institution=cfg.institution_name,
            size=len(data),
            sha1=hashlib.sha1(data).hexdigest(),
        )
        submission_set = self._submission_set(patient_id)
        metadata = manifest_submission(entry, submission_set)
        if current is not None and current.entry_uuid:
            add_replacement(metadata, entry.entry_id, current.entry_uuid)
        sender = Sender(
            "RAD-68",
            "Imaging Document Source",
            self.auditor,
            self.settings.node.advertised,
        )
        # The manifest is noted as pending before it is sent: a process
        # killed after the registry took it but before it heard so leaves
        # the note, and the next publication asks the registry (see
        # _settle_pending) instead of registering a second manifest beside
        # the first.
        blob = self.blobs.put_bytes(f"manifest:{facts.unique_id}", data)
        with self.engine.begin() as conn:
            conn.execute(
                insert(imaging_manifest).values(
                    sop_instance_uid=facts.unique_id,
                    study_instance_uid=study.study_instance_uid,
                    submission_set_unique_id=submission_set.unique_id,
                    blob=blob,
                    entry_uuid=entry.entry_id,
                    status=MANIFEST_PENDING,
                )
            )
        try:
            provide_and_register(
                self.settings.repository_url,
                metadata,
                [Document(entry.entry_id, entry.mime_type, data=data)],
                sender=sender,
                patient_id=patient_id,
                submission_set_unique_id=submission_set.unique_id,
                spool_dir=self.blobs.spool,
                ssl_context=tls.client_context_for(self.settings),
                timeout=RAD_68_TIMEOUT,
            )
        except SubmitError as exc:
            cause = exc.__cause__
            if exc.errors and not any(
                e.code == "XDSRegistryNotAvailable" for e in exc.errors
            ):
                # The registry answered Failure: a submission is all or
                # nothing (ITI TF-2 3.42.4.1.3), so none of it is registered.
                self._forget(facts.unique_id, blob)
            elif isinstance(cause, wire.TransportError) and cause.unsent:
                # No connection was made (refused, say): nothing went out,
                # so there is nothing to wait for before trying again.
                self._forget(facts.unique_id, blob)
            # Else no answer came, or the repository heard none from the
            # registry (XDSRegistryNotAvailable): whether it was registered
            # is settled next time.
            raise PublishError(str(exc), exc.errors) from exc
        self._promote(study.study_instance_uid, facts.unique_id)
        logger.info(
            "%s %s: study %s, manifest %s%s, %d instances",
            "RAD-68",
            "published" if current is None else "replaced",
            study.study_instance_uid,
            facts.unique_id,
            "" if current is None else f" replacing {current.sop_instance_uid}",
            len(study.instances),
        )
        return Published(
            study.study_instance_uid,
            facts.unique_id,
            submission_set.unique_id,
            len(study.instances),
            sum(header.size for header in study.instances),
            replaced=None if current is None else current.sop_instance_uid,
        )

    # --- RAD-69 ---------------------------------------------------------

    def retrieve(self, request: etree._Element, spool: Path) -> Rad69Answer:
        """Answer a RetrieveImagingDocumentSetRequest (RAD TF-3 4.69.4.2).

        An instance comes back only when it is published (its study's
        manifest is registered) and belongs to the named study and series,
        in the first listed transfer syntax it can be produced in
        (RAD TF-3 4.69.4.2.3); a re-encoded instance is written under
        ``spool``, which the caller removes once the answer is sent.
        """
        syntaxes = [
            (e.text or "").strip()
            for e in request.iterfind(
                f"{{{ns.XDSIB}}}TransferSyntaxUIDList/{{{ns.XDSIB}}}TransferSyntaxUID"
            )
        ]
        # A syntax listed again adds nothing to the order of preference.
        syntaxes = list(dict.fromkeys(uid for uid in syntaxes if uid))
        errors: list[XdsError] = []
        studies: list[str] = []
        asked: list[tuple[str, str, _DocumentRequest]] = []
        for study in request.findall(f"{{{ns.XDSIB}}}StudyRequest"):
            study_uid = (study.get("studyInstanceUID") or "").strip()
            if not study_uid:
                errors.append(
                    ImagingRequestError(
                        "StudyRequest has an empty studyInstanceUID "
                        "(RAD TF-3 4.69.4.1.2)"
                    )
                )
                continue
            studies.append(study_uid)
            for series in study.findall(f"{{{ns.XDSIB}}}SeriesRequest"):
                series_uid = (series.get("seriesInstanceUID") or "").strip()
                if not series_uid:
                    errors.append(
                        ImagingRequestError(
                            "SeriesRequest has an empty seriesInstanceUID "
                            "(RAD TF-3 4.69.4.1.2)"
                        )
                    )
                    continue
                asked.extend(
                    (study_uid, series_uid, _DocumentRequest.read(item))
                    for item in series.findall(f"{{{ns.XDSB}}}DocumentRequest")
                )
        # An instance taken in but not yet published is unknown to RAD-69,
        # as to WADO-RS: XDSDocumentUniqueIdError (ITI TF-3 Table 4.2.4.1-2).
        held = self.held_instances(
            (item.unique_id for _, _, item in asked), published_only=True
        )
        # Each instance's stored copy found and checked first, so that those
        # to re-encode are made side by side (transcode.Production); one
        # asked for twice alike is made once.
        copies: list[tuple[Row, Path] | XdsError] = []
        jobs: list[transcode.Job] = []
        job_of: dict[tuple[str, str, str, str], int] = {}
        for study_uid, series_uid, item in asked:
            copy = self._held_copy(item, study_uid, series_uid, held)
            copies.append(copy)
            key = (item.repository_id, study_uid, series_uid, item.unique_id)
            if not isinstance(copy, XdsError) and key not in job_of:
                row, stored = copy
                # With no syntax listed the request fails as a whole (below).
                requested = syntaxes or [row.transfer_syntax_uid]
                job_of[key] = len(jobs)
                jobs.append((stored, row.transfer_syntax_uid, requested))
        documents = []
        transferred: list[TransferredInstance] = []
        sent: set[tuple[str, str, str, str]] = set()
        returned: set[str] = set()
        production = transcode.Production(jobs, spool)
        with production:
            found = zip(asked, copies, strict=True)
            for (study_uid, series_uid, item), copy in found:
                # An instance asked for twice alike is sent once; asked for
                # again under another study, series or repository, that
                # request is answered on its own (an error where it is
                # wrong), whatever came first.
                key = (item.repository_id, study_uid, series_uid, item.unique_id)
                if key in sent:
                    continue
                result = (
                    copy
                    if isinstance(copy, XdsError)
                    else self._instance(
                        item, *copy, production.result(job_of[key]), syntaxes
                    )
                )
                if isinstance(result, XdsError):
                    errors.append(result)
                elif result[0] in returned:
                    sent.add(key)
                else:
                    sent.add(key)
                    returned.add(result[0])
                    documents.append(result[:5])
                    transferred.append(
                        TransferredInstance(result[0], study_uid, result[5] or None)
                    )
        if not syntaxes:
            errors.append(
                TransferSyntaxUnavailable(
                    "TransferSyntaxUIDList lists no transfer syntax "
                    "(RAD TF-3 4.69.4.1.2)"
                )
            )
            documents, transferred = [], []
        body, parts = retrieve_response(documents, errors, ACTOR)
        return Rad69Answer(body, parts, tuple(transferred), tuple(studies))

    def _held_copy(
        self,
        item: _DocumentRequest,
        study_uid: str,
        series_uid: str,
        held: dict[str, Row],
    ) -> tuple[Row, Path] | XdsError:
        """The row and stored copy of an instance asked for under a study and
        series, or why it cannot be sent."""
        sop_uid = item.unique_id
        if item.repository_id != self.repository_unique_id:
            return UnknownRepositoryId(
                f"repositoryUniqueId {item.repository_id} is not this Imaging "
                "Document Source's",
                item.repository_id,
            )
        row = held.get(sop_uid)
        if (
            row is None
            or row.study_instance_uid != study_uid
            or row.series_instance_uid != series_uid
        ):
            return DocumentUniqueIdError(
                f"instance {sop_uid} is not held under study {study_uid} series "
                f"{series_uid}",
                sop_uid,
            )
        if not self.stored_copy_readable(row, "RAD-69"):
            return StoredCopyMissing(
                f"instance {sop_uid} is held but this Imaging Document Source "
                "cannot read its stored copy",
                sop_uid,
            )
        return row, self.blobs.path(row.blob)

    def _instance(
        self,
        item: _DocumentRequest,
        row: Row,
        stored: Path,
        produced: transcode.Produced | None,
        syntaxes: list[str],
    ) -> tuple[str, str, str, Path | StreamSource, str | None, str | None] | XdsError:
        """The DocumentResponse of an instance as ``produced``, or the error
        when it could be produced in none of ``syntaxes``."""
        sop_uid = item.unique_id
        if produced is None:
            return TransferSyntaxUnavailable(
                f"instance {sop_uid} is held in transfer syntax "
                f"{row.transfer_syntax_uid} and cannot be produced in any listed "
                f"transfer syntax ({_listed(syntaxes)}); RAD TF-3 4.69.4.2.3",
                sop_uid,
            )
        body: Path | StreamSource = produced.path
        if produced.path == stored:
            # The stored copy goes out as it is, of the size just checked.
            body = StreamSource(partial(open, stored, "rb"), row.size)
        return (
            sop_uid,
            self.repository_unique_id,
            "application/dicom",
            body,
            item.community_id,
            row.patient_id,
        )

    def _audit_events(
        self, answer: Rad69Answer, status: str, message: wire.SoapMessage, peer: Peer
    ) -> list[audit.AuditEvent]:
        """The audit records of one RAD-69 (RAD TF-3 4.69.5): DICOM Instances
        Transferred (DICOM PS3.15 A.5.3.7), one per patient whose instances
        were sent, since the message names exactly one Patient, each naming
        the studies of that patient that were sent; when nothing was sent,
        one record of the failure naming the studies asked for."""
        outcome = retrieve_outcome(status, len(answer.transferred))
        by_patient = audit.studies_by_patient(answer.transferred)
        if not by_patient:
            by_patient[None] = tuple(dict.fromkeys(answer.studies_asked))
        return [
            audit.AuditEvent(
                transaction="RAD-69",
                actor="Imaging Document Source",
                outcome=outcome,
                source=audit.Endpoint(
                    self.settings.url("imaging_source"), self.settings.node.advertised
                ),
                destination=audit.Endpoint(peer.reply_to, peer.host),
                patient_id=patient_id,
                study_instance_uids=studies,
                message_id=message.message_id,
            )
            for patient_id, studies in by_patient.items()
        ]

    def stored_copy_readable(self, row: Row, service: str) -> bool:
        """Whether an imaging_instance row's stored copy is there, of its
        recorded size; one that is not is logged for the operator, as the
        rot of the store it is, and ``service`` leaves it out.

        Limitation: the size is checked, not the SHA-256, which would read a
        whole study before its first byte; a copy damaged in place, its size
        kept, goes out as it is (``xdsi verify`` finds it).
        """
        try:
            size = os.stat(self.blobs.path(row.blob)).st_size
        except OSError:
            size = None
        if size == row.size:
            return True
        logger.error(
            "%s: the stored copy of instance %s (%s) is missing or not of its "
            "recorded size; left out",
            service,
            row.sop_instance_uid,
            row.blob,
        )
        return False

    def held_instances(
        self, sop_uids: Iterable[str], *, published_only: bool = False
    ) -> dict[str, Row]:
        """Return the stored instances among ``sop_uids``, by SOP Instance UID;
        with ``published_only``, those of a published study alone (see
        ``instance_published`` in :mod:`xdsi.store.schema`).

        One query per 500 UIDs, well under SQLite's limit on bound
        parameters, rather than one per instance.
        """
        wanted = sorted(set(sop_uids))
        scope = [instance_published] if published_only else []
        rows: dict[str, Row] = {}
        with self.engine.connect() as conn:
            for first in range(0, len(wanted), 500):
                batch = wanted[first : first + 500]
                for row in conn.execute(
                    select(imaging_instance).where(
                        imaging_instance.c.sop_instance_uid.in_(batch), *scope
                    )
                ):
                    rows[row.sop_instance_uid] = row
        return rows

    # --- SOAP edge -------------------------------------------------------

    def app(self, spool_root: Path) -> Flask:
        cfg = self.settings.imaging_source
        app = soap_app(
            "imaging_source",
            cfg.path,
            {
                "RAD-69": self.handle_retrieve,
            },
            spool_root,
            plain_prefixes=(cfg.dicomweb_path.rstrip("/"), cfg.wado_path),
        )
        # A spool of its own beside the SOAP one: a spool holds only entries
        # named after their makers, which its sweep may remove.
        dicomweb_spool = spool_root.with_name(f"{spool_root.name}-dicomweb")
        app.register_blueprint(dicomweb_blueprint(self, dicomweb_spool))
        return app

    def handle_retrieve(self, message: wire.SoapMessage, peer: Peer) -> Reply:
        """Answer a RAD-69 and audit it before the answer goes out.

        Raises
        ------
        wire.ReceiverFault
            Its audit record could not be spooled; no instance is sent.
        """
        started = time.monotonic()
        # Made only when an instance is transcoded (transcode.produce).
        spool = spool_path(self.blobs.spool, "rad69")
        try:
            answer = self.retrieve(message.body, spool)
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        body, parts = answer.body, answer.parts
        status = read_status(body)

        # The audit records, one per patient, are durable before any
        # instance leaves (DICOM PS3.15 A.5.3.7, RAD TF-3 4.69.5): without
        # them nothing is sent, and none stays naming a transfer refused.
        events = self._audit_events(answer, status, message, peer)
        if not self.auditor.record_all(events):
            shutil.rmtree(spool, ignore_errors=True)
            raise wire.ReceiverFault(
                "the audit record of this RAD-69 could not be spooled; no "
                "instance is sent without it"
            )
        logger.info(
            "%s %s from %s: %s, MessageID %s, %d instances, %.3f s",
            "RAD-69",
            "Retrieve Imaging Document Set",
            peer.host,
            status.rsplit(":", 1)[-1],
            logs.quoted(message.message_id),
            len(parts),
            time.monotonic() - started,
        )
        return Reply(
            body, parts, cleanup=[lambda: shutil.rmtree(spool, ignore_errors=True)]
        )

"""Imaging Document Source intake: keep instances as they arrive, publish
studies when quiet, keep the published manifest true as the study changes.

Instances come by C-STORE (DICOM PS3.4 B), STOW-RS (DICOM PS3.18 10.5) or
import from a folder or CD (DICOM PS3.10 8, DICOMDIR). Each is checked
(xdsi.dicom.check), stored once per SOP Instance UID, and its study marked
changed. A study quiet for ``publish_after`` seconds is published with
RAD-68 (RAD TF-3 4.68); a study changed after publication is published
again, the new manifest replacing the old with an RPLC Association (RAD TF-3
4.68.4.1.2.3, ITI TF-3 4.2.2.2). A study that cannot be published (its
patient unknown to the registry, the repository down) is retried with
exponential backoff, or as soon as it is quiet again after a change.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, MediaStorageDirectoryStorage
from sqlalchemy import Connection, Row, and_, delete, insert, or_, select, update
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from xdsi import audit, processes
from xdsi.actors.imaging_source import (
    ImagingSource,
    Published,
    blob_key,
    instance_row,
    sha256_file,
)
from xdsi.actors.provide import SubmitError, describe_errors
from xdsi.dicom import check, scan
from xdsi.metadata.validation import patient_id_problem
from xdsi.store.blobs import spool_path
from xdsi.store.schema import imaging_instance, imaging_study

logger = logging.getLogger(__name__)

# DICOM PS3.10 8.6: the name of the directory file of a file-set.
DICOMDIR = "DICOMDIR"
# A study that could not be published waits publish_after seconds, then
# twice as long after each further failure, up to this many seconds.
MAX_RETRY_DELAY = 3600.0
# The shortest wait, when publish_after is shorter.
MIN_RETRY_DELAY = 1.0

# A claim to publish a study lapses after this many seconds: the publisher
# was killed on the way (SIGKILL, power loss) and the study is published
# again. Publishing a study of tens of thousands of instances takes minutes.
# Limitation: a publisher still at work after the lease can see a second one
# publish the same study beside it.
CLAIM_LEASE = 3600.0

# Auto-publish rounds failing in a row (the database down) wait twice as
# long each time, from the round interval up to this many seconds.
MAX_ROUND_DELAY = 30.0
# The longest error text an auto-publish failure logs.
MAX_ERROR_TEXT = 200
# The command a refusal names to remove a study held under another patient;
# the command line puts its own --config in it (the reason itself reaches
# peers, C-STORE and STOW-RS senders, who have no business with local paths).
REMOVE_COMMAND = "xdsi remove"


def claimant() -> str:
    """This process as a claimant: host name, process id and start time."""
    return " ".join(str(part) for part in processes.this_process())


def claimant_gone(claimed_by: str | None) -> bool:
    """Whether the process that made a claim is known to be gone: it ran on
    this host and no process of its id and start time runs now. A claim
    from another host is never known to be gone; it lapses (CLAIM_LEASE)."""
    host, _, rest = (claimed_by or "").partition(" ")
    pid, _, started = rest.partition(" ")
    return bool(processes.gone(host, pid, started))


@dataclass(frozen=True)
class Accepted:
    """An instance taken in; ``duplicate`` when it was held already.

    ``patient_id`` is the affinity-domain patient id it is held under, ""
    when it has no Patient ID.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    duplicate: bool
    patient_id: str = ""


class _StopRequest:
    """While entered in the main thread, a first SIGINT (Ctrl-C) is taken
    as a request to stop between two instances, so that none is cut off
    half taken in; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        # Set when the work left must not be cut off: every SIGINT is then
        # a request to stop.
        self.holding = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.requested and not self.holding:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class ImportInterrupted(KeyboardInterrupt):
    """An import stopped half way; ``kept`` instances it took in stay,
    recorded as imported."""

    def __init__(self, kept: int) -> None:
        super().__init__(f"{kept} instances taken in stay")
        self.kept = kept


class NotAudited(Exception):
    """The audit record of instances taken in could not be spooled, so they
    were taken back out (DICOM PS3.15 A.5: none is kept unrecorded)."""


def received_events(
    transaction: str,
    accepted: Iterable[Accepted],
    refused: Sequence[check.Refused],
    *,
    source: audit.Endpoint,
    destination: audit.Endpoint,
) -> list[audit.AuditEvent]:
    """The audit records of instances received in one exchange.

    DICOM PS3.15 A.5.3.7 (C-STORE, STOW-RS) names one patient a record: one
    record per patient, action C for the instances the node did not hold,
    R for those it held already. A.5.3.5 (Media Import) allows several
    patients in one, but one each keeps the two alike; it is always C, so
    instances held already are not named. ``refused`` instances add a
    record per patient naming the studies they belong to, with outcome
    Minor failure when some were kept and Serious failure when none (as a
    retrieve that returns some documents and not others is audited); those
    whose header could not be read share one record naming no object.
    """
    kept = list(accepted)
    actions = {"C": [a for a in kept if not a.duplicate]}
    if transaction != MEDIA_IMPORT:
        actions["R"] = [a for a in kept if a.duplicate]
    events = [
        audit.AuditEvent(
            transaction=transaction,
            actor="Imaging Document Source",
            outcome=audit.Outcome.SUCCESS,
            source=source,
            destination=destination,
            patient_id=patient or None,
            study_instance_uids=studies,
            event_action=action,
        )
        for action, instances in actions.items()
        for patient, studies in audit.studies_by_patient(instances).items()
    ]
    total = len(refused) + len(kept)
    by_patient: dict[str, list[check.Refused]] = {}
    for refusal in refused:
        by_patient.setdefault(refusal.patient_id, []).append(refusal)
    for patient, refusals in by_patient.items():
        studies = dict.fromkeys(
            r.study_instance_uid for r in refusals if r.study_instance_uid
        )
        events.append(
            audit.AuditEvent(
                transaction=transaction,
                actor="Imaging Document Source",
                outcome=audit.Outcome.MINOR_FAILURE
                if kept
                else audit.Outcome.SERIOUS_FAILURE,
                source=source,
                destination=destination,
                patient_id=patient or None,
                study_instance_uids=tuple(studies),
                outcome_detail=f"{len(refusals)} of {total} instances refused",
            )
        )
    return events


@dataclass(frozen=True)
class Failing:
    """A study whose publication failed ``failures`` times in a row.

    ``changed_at`` is the study's change time when it last failed;
    ``failed_at`` when that was.
    """

    failures: int
    changed_at: float
    failed_at: float
    # The peer's error codes with their texts, or what went wrong on the
    # way; the texts may name the patient (see SubmitError).
    reason: str = ""
    # Whether waiting cannot help: the study is tried again once it changes.
    lasting: bool = False


class UnusablePatientId(SubmitError):
    """A study is held under a patient id no Document Registry takes (ITI
    TF-3 4.2.3.2.16): an image without Patient ID, or one holding an HL7
    delimiter. Waiting cannot change it; a change of the study can (its
    instances removed and taken in again under another id)."""


def retry_delay(quiet: float, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: the
    quiet time, doubled after each further failure, capped at an hour."""
    base = max(quiet, MIN_RETRY_DELAY)
    return min(base * 2 ** min(failures - 1, 32), MAX_RETRY_DELAY)


# profiles/audit_events.toml: the row of a folder or CD taken in.
MEDIA_IMPORT = "Media Import"

# Tries at taking an instance in when another intake creates its study's row
# at the same moment (a unique-key clash on PostgreSQL).
STUDY_ROW_ATTEMPTS = 3


@dataclass(frozen=True)
class ImportResult:
    """What an import took in, and the files it refused with why."""

    accepted: tuple[Accepted, ...]
    refused: tuple[tuple[Path, check.Refused], ...]

    @property
    def studies(self) -> tuple[str, ...]:
        return tuple(sorted({a.study_instance_uid for a in self.accepted}))


class Intake:
    """Takes instances into an Imaging Document Source's store."""

    def __init__(self, source: ImagingSource) -> None:
        self.source = source
        self.engine = source.engine
        self.blobs = source.blobs
        self.settings = source.settings
        # Serialises publication within this process; the claim on
        # imaging_study rows serialises it between processes.
        self._publishing = threading.Lock()
        # Studies that failed to publish, for backoff and log levels. Kept in
        # memory: one auto-publisher per node uses it, and after a restart a
        # failing study is merely tried once more at the quiet time.
        self._failing: dict[str, Failing] = {}

    # --- taking instances in ----------------------------------------------

    def accept(
        self,
        path: Path,
        *,
        move: bool = False,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        patient_id: str | None = None,
    ) -> Accepted:
        """Check one DICOM PS3.10 file and store it, once per SOP Instance UID.

        ``patient_id`` is the affinity domain's patient id its study is
        published under; by default the images' own (:meth:`patient_id`).

        With ``move`` the file is consumed (renamed into the store when on
        the same file system). A SOP Instance UID held already is accepted
        and the new copy dropped. ``sop_class_uid`` and ``sop_instance_uid``
        are the ones a C-STORE request names, ``study_instance_uid`` the
        study a STOW-RS request names (DICOM PS3.18 10.5.1).

        Raises
        ------
        check.Refused
            The file is not stored; ``dimse_status`` and ``failure_reason``
            say what to answer.
        """
        if not move:
            # An instance held already, or a study held under another
            # patient, is answered from the header alone: nothing of the
            # file would be kept, so it is not copied.
            # A request's own UIDs (C-STORE, STOW-RS) are checked in full.
            requested = (sop_class_uid, sop_instance_uid, study_instance_uid)
            if requested == (None, None, None):
                early = self._answer_from_header(path, patient_id)
                if early is not None:
                    return early
            # What is checked is what is kept: a private copy, which no one
            # can change between the check and the store.
            private = spool_path(self.blobs.spool, "accept")
            try:
                # Patient data: for the node's user alone, as a spooled
                # C-STORE or STOW-RS instance is.
                os.close(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                shutil.copyfile(path, private)
            except OSError as exc:
                private.unlink(missing_ok=True)
                raise check.Refused(
                    "unreadable", f"cannot read: {exc.strerror or exc}"
                ) from exc
            try:
                return self.accept(
                    private,
                    move=True,
                    sop_class_uid=sop_class_uid,
                    sop_instance_uid=sop_instance_uid,
                    study_instance_uid=study_instance_uid,
                    patient_id=patient_id,
                )
            finally:
                private.unlink(missing_ok=True)
        try:
            header, ds = check.check_file(
                path, sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid
            )
        except check.Refused as exc:
            exc.identify(*self._identity_of(path))
            raise
        try:
            return self._keep(
                path,
                header,
                ds,
                move=move,
                study_instance_uid=study_instance_uid,
                patient_id=patient_id,
            )
        except check.Refused as exc:
            exc.identify(self.patient_id(ds), header.study_instance_uid)
            raise

    def _identity_of(self, path: Path) -> tuple[str, str]:
        """The qualified patient id and Study Instance UID of a file that
        failed its check, where its header can be read; "" otherwise."""
        if scan.inflated_size_problem(path) is not None:
            # pydicom would inflate the data set whole to read its header.
            return "", ""
        try:
            ds = pydicom.dcmread(
                path,
                force=True,
                stop_before_pixels=True,
                specific_tags=[
                    "PatientID",
                    "IssuerOfPatientID",
                    "IssuerOfPatientIDQualifiersSequence",
                    "StudyInstanceUID",
                ],
            )
            study_instance_uid = UID(str(ds.get("StudyInstanceUID") or ""))
            patient_id = self.patient_id(ds)
        except Exception:
            # Whatever broke the instance may break this read too.
            return "", ""
        if not study_instance_uid.is_valid:
            study_instance_uid = UID("")
        return patient_id, str(study_instance_uid)

    def _keep(
        self,
        path: Path,
        header: scan.InstanceHeader,
        ds: Dataset,
        *,
        move: bool,
        study_instance_uid: str | None,
        patient_id: str | None,
    ) -> Accepted:
        """Store a checked file, once per SOP Instance UID (see accept)."""
        if study_instance_uid and study_instance_uid != header.study_instance_uid:
            raise check.Refused(
                "command_mismatch",
                f"instance {header.sop_instance_uid} belongs to study "
                f"{header.study_instance_uid}, not to {study_instance_uid}",
            )
        given = patient_id is not None
        if patient_id is None:
            patient_id = self.patient_id(ds)
        else:
            self._refuse_other_patient(header.study_instance_uid, patient_id)
        # An instance held already, but sent naming another patient than
        # its study's, is refused as such, not answered as held.
        with self.engine.connect() as conn:
            self._refuse_mixed_patients(conn, header, ds)
        if self._held(header):
            return self._duplicate(header, path, move, patient_id)
        # A study with nothing held and no current manifest (never taken in,
        # or emptied and withdrawn) starts anew, under this patient.
        anew = self.study_patient(header.study_instance_uid) is None

        try:
            # A blob of its own, so that two intakes of one instance at once
            # never write, or remove, each other's file.
            blob = self.blobs.put_file(
                blob_key(header.sop_instance_uid), path, move=move
            )
        except OSError as exc:
            raise check.Refused("storage", f"cannot store: {exc}") from exc
        try:
            digest = sha256_file(self.blobs.path(blob))
        except OSError as exc:
            # Kept but unreadable: no row will name it, so it goes too.
            try:
                self.blobs.delete(blob)
            except OSError:
                logger.error("intake: blob %s left in the store, unnamed", blob)
            raise check.Refused("storage", f"cannot store: {exc}") from exc
        for attempt in range(1, STUDY_ROW_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    # The study's row first: it stays locked until the
                    # commit, so that another intake of the study waits, and
                    # then finds this instance when it checks the patient.
                    self._touch(
                        conn, header.study_instance_uid, patient_id, given or anew
                    )
                    self._refuse_mixed_patients(conn, header, ds)
                    _refuse_held_under_another(conn, header, patient_id)
                    conn.execute(
                        insert(imaging_instance).values(
                            instance_row(header, blob, digest, patient_id)
                        )
                    )
                break
            except check.Refused:
                self.blobs.delete(blob)
                raise
            except IntegrityError:
                try:
                    held = self._held(header)
                except check.Refused:
                    self.blobs.delete(blob)
                    raise
                if held:
                    # Another intake stored the same instance meanwhile: its
                    # copy is the one held.
                    self.blobs.delete(blob)
                    return self._duplicate(header, path, False, patient_id)
                if attempt == STUDY_ROW_ATTEMPTS:
                    self.blobs.delete(blob)
                    raise
                # Another intake created the study's row meanwhile.
        return Accepted(
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            header.series_instance_uid,
            False,
            patient_id,
        )

    def import_folder(
        self, folder: Path, *, patient_id: str | None = None
    ) -> ImportResult:
        """Take in every instance of a folder or CD.

        With a DICOMDIR at the top (DICOM PS3.10 8.6), the files its records
        reference are read; otherwise every regular file under the folder.
        Files are copied, never moved. ``patient_id``, when given, is the
        patient the studies are published under instead of the images' own.
        The files refused are returned with why, for the caller to tell (the
        command line lists them), and are logged at DEBUG only.
        """
        accepted: list[Accepted] = []
        refused: list[tuple[Path, check.Refused]] = []
        with _StopRequest() as stop:
            try:
                for path in _files_of(folder):
                    if stop.requested:
                        break
                    try:
                        _refuse_special_file(path)
                        accepted.append(self.accept(path, patient_id=patient_id))
                    except check.Refused as exc:
                        # A folder may be named after its patient: the path
                        # is logged at DEBUG only, and returned to the caller.
                        logger.debug("Refused %s: %s", path, exc.reason)
                        refused.append((path, exc.detached()))
            except KeyboardInterrupt:
                # A second Ctrl-C, in the midst of an instance, which is not
                # kept (its transaction rolled back): those taken in before
                # it stay, and are recorded all the same (DICOM PS3.15 A.5).
                stop.requested = True
            # Further Ctrl-Cs while the record is written are taken as the
            # first was: the record is not cut off.
            stop.holding = True
            self.record_import(folder, accepted, refused)
        if stop.requested:
            # Stopped half way (Ctrl-C): each instance taken in so far is
            # kept, and recorded as imported.
            raise ImportInterrupted(sum(1 for a in accepted if not a.duplicate))
        return ImportResult(tuple(accepted), tuple(refused))

    def keep_read(
        self, study: scan.Study, patient_id: str, folder: Path
    ) -> list[Accepted]:
        """Keep a study read from ``folder`` by its headers alone (``publish
        --headers-only``), and record the import (DICOM PS3.15 A.5.3.5), as
        :meth:`import_folder` does; publishing it then finds it held. The
        study is claimed by this process, which publishes it next, so that a
        serving node's publisher leaves it alone meanwhile; the caller ends
        the claim with :meth:`note_published` or :meth:`publish_read_failed`.
        Returns its instances, those held already marked so.

        Raises
        ------
        PublishError
            A file could not be read; nothing of the study is kept.
        NotAudited
            The record could not be spooled; what was kept is taken back.
        """
        headers = {h.sop_instance_uid: h for h in study.instances}
        held = self.source.held_instances(headers)
        self.source.keep_instances(study, patient_id)
        accepted = [
            Accepted(
                header.sop_class_uid,
                uid,
                header.study_instance_uid,
                header.series_instance_uid,
                uid in held,
                patient_id,
            )
            for uid, header in headers.items()
        ]
        self.record_import(folder, accepted, [])
        column = imaging_study.c
        now = time.time()
        with self.engine.begin() as conn:
            _upsert_study(
                conn,
                study.study_instance_uid,
                patient_id,
                {"patient_id": patient_id},
                now,
            )
            # Not taken from another publisher still at it.
            conn.execute(
                update(imaging_study)
                .where(
                    column.study_instance_uid == study.study_instance_uid,
                    or_(
                        column.claimed_at.is_(None),
                        column.claimed_at < now - CLAIM_LEASE,
                    ),
                )
                .values(claimed_at=now, claimed_by=claimant())
            )
        return accepted

    def record_import(
        self,
        folder: Path,
        accepted: list[Accepted],
        refused: list[tuple[Path, check.Refused]],
    ) -> None:
        """Spool the audit records of an import; without them, take its
        instances back out and raise NotAudited."""
        # DICOM PS3.15 A.5.3.5: the import is recorded once its instances
        # are kept; files that are no DICOM at all were never instances.
        node = self.settings.node
        events = received_events(
            MEDIA_IMPORT,
            accepted,
            [exc for _, exc in refused if exc.rule != "not_dicom"],
            source=audit.Endpoint(
                folder.resolve().as_uri(), "", audit.media_type("uri")
            ),
            destination=audit.Endpoint(node.audit_source_id, node.advertised),
        )
        if not self.source.auditor.record_all(events):
            self.take_back(accepted)
            raise NotAudited(
                f"the audit record of the import could not be written; the "
                f"{sum(1 for a in accepted if not a.duplicate)} instances it "
                "took in were taken back out"
            )

    def take_back(self, accepted: Iterable[Accepted]) -> int:
        """Remove the instances an intake just kept (not those it found held
        already), unaudited, because their audit record could not be
        spooled; return how many went. Each study is marked changed, so
        that a manifest published meanwhile is replaced or withdrawn."""
        # Limitation: an instance a second intake offered meanwhile, found
        # held and answered as such, goes too.
        new = [a for a in accepted if not a.duplicate]
        column = imaging_instance.c
        gone = 0
        for study_instance_uid in {a.study_instance_uid for a in new}:
            uids = [
                a.sop_instance_uid
                for a in new
                if a.study_instance_uid == study_instance_uid
            ]
            where = (
                column.study_instance_uid == study_instance_uid,
                column.sop_instance_uid.in_(uids),
            )
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(column.blob, column.patient_id).where(*where)
                ).all()
                if not rows:
                    continue
                conn.execute(delete(imaging_instance).where(*where))
                self._touch(conn, study_instance_uid, rows[0].patient_id or "")
            for row in rows:
                self.blobs.delete(row.blob)
            gone += len(rows)
        if gone:
            logger.error(
                "%d instances taken back out: their audit record could not be written",
                gone,
            )
        return gone

    def remove(
        self,
        study_instance_uid: str,
        *,
        series_instance_uid: str | None = None,
        sop_instance_uids: Iterable[str] = (),
    ) -> int:
        """Remove instances of a study from the store; return how many.

        Without a series or SOP Instance UIDs the whole study goes. The study
        is marked changed, so that its manifest is replaced, or withdrawn
        when nothing is left.
        """
        column = imaging_instance.c
        where = [column.study_instance_uid == study_instance_uid]
        if series_instance_uid:
            where.append(column.series_instance_uid == series_instance_uid)
        wanted = list(sop_instance_uids)
        if wanted:
            where.append(column.sop_instance_uid.in_(wanted))
        with self.engine.begin() as conn:
            rows = conn.execute(select(column.blob, column.patient_id).where(*where))
            gone = rows.all()
            if not gone:
                return 0
            conn.execute(delete(imaging_instance).where(*where))
            left = conn.execute(
                select(column.sop_instance_uid)
                .where(column.study_instance_uid == study_instance_uid)
                .limit(1)
            ).first()
            self._touch(conn, study_instance_uid, gone[0].patient_id or "")
        for row in gone:
            self.blobs.delete(row.blob)
        logger.info("removed %d instances of study %s", len(gone), study_instance_uid)
        # DICOM PS3.15 A.5.3.6: who deleted which patient's instances; when
        # none of the study is left, DICOM Study Deleted (A.5.3.8) instead.
        node = self.settings.node
        self.source.auditor.record(
            audit.AuditEvent(
                transaction="Instances Deleted" if left else "Study Deleted",
                actor="Imaging Document Source",
                outcome=audit.Outcome.SUCCESS,
                source=audit.Endpoint(node.audit_source_id, node.advertised),
                patient_id=gone[0].patient_id or None,
                study_instance_uids=(study_instance_uid,),
            )
        )
        return len(gone)

    def patient_id(self, ds: Dataset) -> str:
        """The affinity-domain patient id of an instance (ITI TF-3 4.2.3.2.16).

        Patient ID (0010,0020) qualified by Issuer of Patient ID (0010,0021),
        or else by the issuer its Qualifiers Sequence (0010,0024) names, when
        that is one of the domain's assigning authorities; otherwise by the
        node's assigning authority.
        """
        # Limitation: no PIX cross-reference (ITI-9); the image's own Patient
        # ID is taken as the affinity domain's.
        node = self.settings.node
        known = (node.assigning_authority, *node.other_assigning_authorities)
        authority = next(
            (issuer for issuer in scan.patient_id_issuers(ds) if issuer in known),
            node.assigning_authority,
        )
        value = str(ds.get("PatientID") or "").strip()
        return f"{value}^^^&{authority}&ISO" if value else ""

    # --- publishing -----------------------------------------------------------

    def publish_due(self, quiet: float) -> list[Published]:
        """Publish every changed study quiet for ``quiet`` seconds.

        A study that failed to publish is tried again after
        :func:`retry_delay`, or once quiet again if it changed meanwhile.
        """
        now = time.time()
        cutoff = now - quiet
        self.take_back_claims()
        with self.engine.connect() as conn:
            due = conn.execute(
                select(
                    imaging_study.c.study_instance_uid, imaging_study.c.changed_at
                ).where(
                    or_(
                        and_(
                            imaging_study.c.dirty.is_(True),
                            imaging_study.c.changed_at <= cutoff,
                        ),
                        imaging_study.c.claimed_at < now - CLAIM_LEASE,
                    )
                )
            ).all()
        published = []
        for study_instance_uid, changed_at in due:
            failing = self._failing.get(study_instance_uid)
            if (
                failing is not None
                and failing.changed_at == changed_at
                and (
                    failing.lasting
                    or now < failing.failed_at + retry_delay(quiet, failing.failures)
                )
            ):
                continue
            try:
                result = self.publish_now(study_instance_uid, cutoff=cutoff)
            except Exception as exc:
                # One study whose manifest cannot be built (an instance that
                # breaks it) must not hold up the others: it is backed off
                # as a refused submission is.
                self._failed(study_instance_uid, changed_at, exc)
                continue
            if result is not None:
                published.append(result)
        return published

    def publish_now(
        self,
        study_instance_uid: str,
        *,
        cutoff: float | None = None,
        caller_tells: bool = False,
    ) -> Published | None:
        """Publish a changed study at once: first manifest, replacement or
        withdrawal. None when there was nothing to do or nothing is left.

        The study is claimed first, so that one publisher alone sends it; a
        change arriving meanwhile marks it changed again. With
        ``caller_tells`` (a command, whose user reads why from
        :meth:`last_failure`), a failure is logged at DEBUG only.
        """
        with self._publishing:
            self.take_back_claims(study_instance_uid)
            row = self._claim(study_instance_uid, cutoff)
            if row is None:
                return None
            try:
                # ITI TF-3 4.2.3.2.16: refused here, not by the registry.
                problem = patient_id_problem(row.patient_id or "")
                if problem is not None:
                    raise UnusablePatientId(f"its patient id {problem}")
                published = self.source.republish(study_instance_uid, row.patient_id)
            except SubmitError as exc:
                self._failed(study_instance_uid, row.changed_at, exc, caller_tells)
                return None
            except BaseException:
                # Anything else (an unreadable instance, Ctrl-C, the node
                # stopping) leaves the study to publish next time. A process
                # killed outright leaves its claim, which lapses
                # (CLAIM_LEASE).
                self._mark_changed(study_instance_uid)
                raise
            self._release(study_instance_uid)
            failing = self._failing.pop(study_instance_uid, None)
            if failing is not None:
                logger.info(
                    "study %s published after %d failed attempts",
                    study_instance_uid,
                    failing.failures,
                )
            return published

    def publish_read_failed(
        self, study_instance_uid: str, since: float, exc: SubmitError
    ) -> None:
        """Note that a study kept by :meth:`keep_read` at ``since`` was not
        published: it is left changed, so that a serving node publishes it
        by itself, as it does a study taken in, and the next import or
        publish of it sends it. The command that failed tells its user why,
        so that the failure is logged at DEBUG only."""
        self._failed(study_instance_uid, since, exc, caller_tells=True)

    def _failed(
        self,
        study_instance_uid: str,
        changed_at: float,
        exc: Exception,
        caller_tells: bool = False,
    ) -> None:
        """Mark a study changed again and note the failure for backoff.

        The first failure in a row is a WARNING naming the error codes (their
        texts may name the patient, and go to DEBUG), or an ERROR with its
        traceback for a failure of the node's own; later ones go to DEBUG, as
        a peer's refusal does when ``caller_tells``.
        """
        self._mark_changed(study_instance_uid)
        before = self._failing.get(study_instance_uid)
        failures = before.failures + 1 if before is not None else 1
        if isinstance(exc, SubmitError):
            codes = exc.codes
            reason = describe_errors(exc.errors) if exc.errors else str(exc)
        else:
            codes = reason = f"an error of this node: {type(exc).__name__}"
        lasting = isinstance(exc, UnusablePatientId)
        self._failing[study_instance_uid] = Failing(
            failures, changed_at, time.time(), reason, lasting
        )
        told = caller_tells and isinstance(exc, SubmitError)
        if failures == 1 and not told:
            logger.log(
                logging.WARNING if isinstance(exc, SubmitError) else logging.ERROR,
                "study %s not published (%s); %s",
                study_instance_uid,
                codes,
                "tried again once it changes"
                if lasting
                else f"a serving node retries, up to {MAX_RETRY_DELAY:.0f} s apart",
                exc_info=None if isinstance(exc, SubmitError) else exc,
            )
            logger.debug("study %s not published: %s", study_instance_uid, reason)
        else:
            logger.debug(
                "study %s not published, failure %d in a row: %s",
                study_instance_uid,
                failures,
                exc,
            )

    def last_failure(self, study_instance_uid: str) -> str | None:
        """Why the study's last publication in this process failed, if it
        did: the peer's error codes and their texts, or the transport error.
        For the user's terminal: the texts may name the patient."""
        failing = self._failing.get(study_instance_uid)
        return None if failing is None else failing.reason

    def _mark_changed(self, study_instance_uid: str) -> None:
        """Mark a study changed again, keeping when it last changed, and
        release its claim."""
        with self.engine.begin() as conn:
            conn.execute(
                update(imaging_study)
                .where(imaging_study.c.study_instance_uid == study_instance_uid)
                .values(dirty=True, claimed_at=None, claimed_by=None)
            )

    def _release(self, study_instance_uid: str) -> None:
        """Release the claim on a study once it is published."""
        with self.engine.begin() as conn:
            conn.execute(
                update(imaging_study)
                .where(imaging_study.c.study_instance_uid == study_instance_uid)
                .values(claimed_at=None, claimed_by=None)
            )

    def take_back_claims(self, study_instance_uid: str | None = None) -> int:
        """Mark changed again the studies (or the one study) claimed by a
        process of this host that is gone; return how many.

        Such a publisher was killed outright (SIGKILL, the OOM killer) and
        released nothing; its study would otherwise wait for CLAIM_LEASE.
        """
        column = imaging_study.c
        where = [column.claimed_at.is_not(None)]
        if study_instance_uid is not None:
            where.append(column.study_instance_uid == study_instance_uid)
        with self.engine.connect() as conn:
            claims = conn.execute(
                select(column.study_instance_uid, column.claimed_by).where(*where)
            ).all()
        taken = 0
        for study, claimed_by in claims:
            if not claimant_gone(claimed_by):
                continue
            with self.engine.begin() as conn:
                taken += conn.execute(
                    update(imaging_study)
                    .where(
                        column.study_instance_uid == study,
                        column.claimed_by == claimed_by,
                    )
                    .values(dirty=True, claimed_at=None, claimed_by=None)
                ).rowcount
            logger.warning(
                "study %s: the process that was publishing it (%s) is gone; "
                "it is published again",
                study,
                claimed_by,
            )
        return taken

    def claim_of(self, study_instance_uid: str) -> tuple[str, float] | None:
        """Who claimed the study for publishing and when, if anyone has."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(imaging_study.c.claimed_by, imaging_study.c.claimed_at).where(
                    imaging_study.c.study_instance_uid == study_instance_uid,
                    imaging_study.c.claimed_at.is_not(None),
                )
            ).first()
        return None if row is None else (row.claimed_by or "", row.claimed_at)

    def changed(self, study_instance_uid: str) -> bool:
        """Whether the study changed since it was last published, or its
        publisher was killed on the way."""
        self.take_back_claims(study_instance_uid)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(imaging_study.c.dirty, imaging_study.c.claimed_at).where(
                    imaging_study.c.study_instance_uid == study_instance_uid
                )
            ).first()
        if row is None:
            return False
        lapsed = row.claimed_at is not None and row.claimed_at < time.time() - (
            CLAIM_LEASE
        )
        return bool(row.dirty) or lapsed

    def _claim(self, study_instance_uid: str, cutoff: float | None) -> Row | None:
        """Claim a changed study for publishing, or one whose claim lapsed.

        The claim clears ``dirty`` (a change arriving meanwhile sets it
        again) and notes the time; only one publisher, of all the processes
        sharing the database, gets it.
        """
        column = imaging_study.c
        now = time.time()
        changed = column.dirty.is_(True)
        if cutoff is not None:
            changed = and_(changed, column.changed_at <= cutoff)
        where = [
            column.study_instance_uid == study_instance_uid,
            or_(changed, column.claimed_at < now - CLAIM_LEASE),
        ]
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(imaging_study)
                .where(*where)
                .values(dirty=False, claimed_at=now, claimed_by=claimant())
            )
            if claimed.rowcount != 1:
                return None
            return conn.execute(
                select(imaging_study).where(
                    column.study_instance_uid == study_instance_uid
                )
            ).first()

    # --- helpers ----------------------------------------------------------

    def _answer_from_header(
        self, path: Path, patient_id: str | None
    ) -> Accepted | None:
        """Answer for a file that would not be kept, from its header alone;
        None when the file must be copied and checked."""
        try:
            header, ds = scan.read_header(path)
        except scan.DicomInputError:
            return None  # the full check says why
        own = self.patient_id(ds)
        if patient_id is not None:
            self._refuse_other_patient(header.study_instance_uid, patient_id)
        elif own:
            # An instance of another patient than the study's is refused as
            # such (other_patient); one of the same, taken in under the
            # images' own patient, would not be published under it when the
            # study is held under another given to publish it.
            with self.engine.connect() as conn:
                self._refuse_mixed_patients(conn, header, ds)
            self._refuse_other_patient(header.study_instance_uid, own, given=False)
        if self._held(header):
            return self._duplicate(header, path, False, patient_id or own)
        return None

    def _refuse_other_patient(
        self, study_instance_uid: str, patient_id: str, *, given: bool = True
    ) -> None:
        """Refuse an instance of a study held under another patient.

        The reason is logged: it names no patient. Under the images' own
        Patient ID (not ``given``) the instance names another patient than
        its study's, which is what other_patient refuses, whether this check
        or the one of the instances held (_refuse_mixed_patients) sees it
        first while another intake of the study commits.
        """
        reason = self.other_patient(study_instance_uid, patient_id, given=given)
        if reason is not None:
            raise check.Refused(
                "command_mismatch" if given else "other_patient", reason
            )

    def other_patient(
        self, study_instance_uid: str, patient_id: str, *, given: bool = True
    ) -> str | None:
        """Why a study cannot take instances under ``patient_id`` (given by
        the user, or else the images' own); None when it can.

        The registry would refuse the study's replacement manifest under
        another patient (XDSPatientIdDoesNotMatch, ITI TF-3 4.2.2.2.3); the
        study keeps the patient it is held under, or its current manifest
        names, until it is removed and its manifest withdrawn. The reason
        names no patient.
        """
        if self.study_patient(study_instance_uid) in (None, patient_id):
            return None
        remove = f"{REMOVE_COMMAND} {study_instance_uid}"
        whose = "the one given" if given else "its images' Patient ID"
        if self._holds_instances(study_instance_uid):
            return (
                f"study {study_instance_uid} is held under another patient than "
                f"{whose}; remove it first ({remove}) to publish it under this one"
            )
        return (
            f"study {study_instance_uid} holds no instance, but its manifest is "
            "still published under another patient; withdraw it first "
            f"({remove}) to publish it under this one"
        )

    def _refuse_mixed_patients(
        self, conn: Connection, header: scan.InstanceHeader, ds: Dataset
    ) -> None:
        """Refuse an instance whose Patient ID (and Issuer) differ from those
        of its study's instances held already: a study is of one patient
        (DICOM PS3.3 C.7.2.1, C.7.1.1), and another patient's images must
        not reach this one's manifest. The reason names no patient. Asked in
        the transaction that takes the instance in, on ``conn``."""
        blob = conn.execute(
            select(imaging_instance.c.blob)
            .where(imaging_instance.c.study_instance_uid == header.study_instance_uid)
            .limit(1)
        ).scalar()
        same = _same_patient
        if blob is None:
            # Emptied (remove --no-publish) but its manifest still current:
            # that names the images' Patient ID and its first issuer.
            current = self.source.current_manifest(header.study_instance_uid)
            if current is None:
                return
            blob, same = current.blob, _same_as_in_manifest
        try:
            held = pydicom.dcmread(
                self.blobs.path(blob),
                stop_before_pixels=True,
                specific_tags=[
                    "PatientID",
                    "IssuerOfPatientID",
                    "IssuerOfPatientIDQualifiersSequence",
                ],
            )
        except (OSError, InvalidDicomError) as exc:
            raise check.Refused(
                "storage",
                f"study {header.study_instance_uid} has a held instance that "
                f"cannot be read ({exc}); its patient cannot be checked",
            ) from exc
        if not same(held, ds):
            raise check.Refused(
                "other_patient",
                f"instance {header.sop_instance_uid} names another patient than "
                f"study {header.study_instance_uid} as held or published "
                "already; a study is of one patient",
            )

    def study_patient(self, study_instance_uid: str) -> str | None:
        """The patient a study is held under: None when it holds no instance
        and has no current manifest, since then it starts anew (taken in
        again after ``remove``, under whichever patient it comes with)."""
        with self.engine.connect() as conn:
            patient = conn.execute(
                select(imaging_study.c.patient_id).where(
                    imaging_study.c.study_instance_uid == study_instance_uid
                )
            ).scalar()
        if patient is None:
            return None
        if (
            not self._holds_instances(study_instance_uid)
            and self.source.current_manifest(study_instance_uid) is None
        ):
            return None
        return patient

    def _holds_instances(self, study_instance_uid: str) -> bool:
        """Whether any instance of the study is held."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(imaging_instance.c.sop_instance_uid)
                    .where(imaging_instance.c.study_instance_uid == study_instance_uid)
                    .limit(1)
                ).first()
                is not None
            )

    def _held(self, header: scan.InstanceHeader) -> bool:
        """Whether an instance of this SOP Instance UID is held already.

        One SOP Instance UID names one instance (DICOM PS3.3 C.12.1.1.1):
        what is held is that instance, however the file now offered was
        written (another File Meta, another transfer syntax, a re-encoded
        data set), and the one held, maybe published, stays.

        Raises
        ------
        check.Refused
            It is held in another study or series, or as an instance of
            another SOP Class: the file is not that instance.
        """
        # Limitation: a copy with other content (cut short, edited) under the
        # same SOP Instance UID, study, series and SOP Class passes for the
        # instance held; its bytes cannot tell it from the same instance
        # written by another toolkit or in another transfer syntax.
        column = imaging_instance.c
        with self.engine.connect() as conn:
            held = conn.execute(
                select(
                    column.study_instance_uid,
                    column.series_instance_uid,
                    column.sop_class_uid,
                ).where(column.sop_instance_uid == header.sop_instance_uid)
            ).first()
        if held is None:
            return False
        uid = header.sop_instance_uid
        if held.study_instance_uid != header.study_instance_uid:
            raise check.Refused(
                "identification",
                f"SOP Instance UID {uid} is held already in study "
                f"{held.study_instance_uid}, not in {header.study_instance_uid}",
            )
        if held.series_instance_uid != header.series_instance_uid:
            raise check.Refused(
                "identification",
                f"SOP Instance UID {uid} is held already in series "
                f"{held.series_instance_uid}, not in {header.series_instance_uid}",
            )
        if held.sop_class_uid != header.sop_class_uid:
            # DICOM PS3.4 6.5: an instance is of one SOP Class.
            raise check.Refused(
                "identification",
                f"SOP Instance UID {uid} is held already as an instance of SOP "
                f"Class {held.sop_class_uid}, not of {header.sop_class_uid}",
            )
        return True

    def _duplicate(
        self, header: scan.InstanceHeader, path: Path, move: bool, patient_id: str
    ) -> Accepted:
        logger.debug("instance %s held already", header.sop_instance_uid)
        if move:
            path.unlink(missing_ok=True)
        return Accepted(
            header.sop_class_uid,
            header.sop_instance_uid,
            header.study_instance_uid,
            header.series_instance_uid,
            True,
            patient_id,
        )

    def _touch(
        self,
        conn: Connection,
        study_instance_uid: str,
        patient_id: str,
        settled: bool = False,
    ) -> None:
        """Mark a study changed now; create its row on first sight. With
        ``settled`` the patient id is the study's from now (one the user
        named, or the one of a study that starts anew)."""
        now = time.time()
        values: dict[str, object] = {"changed_at": now, "dirty": True}
        if settled:
            values["patient_id"] = patient_id
        _upsert_study(conn, study_instance_uid, patient_id, values, now)

    def note_published(
        self, study_instance_uid: str, patient_id: str, since: float
    ) -> None:
        """Note a study published outside intake (``publish --headers-only``)
        under ``patient_id``: the study is held under that patient from now,
        and unchanged unless it changed after ``since`` (seconds since the
        epoch), when that publication began; this process's claim on it
        (:meth:`keep_read`) ends."""
        column = imaging_study.c
        with self.engine.begin() as conn:
            _upsert_study(
                conn, study_instance_uid, patient_id, {"patient_id": patient_id}, since
            )
            conn.execute(
                update(imaging_study)
                .where(
                    column.study_instance_uid == study_instance_uid,
                    column.changed_at <= since,
                )
                .values(dirty=False)
            )
            conn.execute(
                update(imaging_study)
                .where(
                    column.study_instance_uid == study_instance_uid,
                    column.claimed_by == claimant(),
                )
                .values(claimed_at=None, claimed_by=None)
            )


class AutoPublisher:
    """A background thread publishing quiet studies of an :class:`Intake`.

    A round that fails (the database down) is logged once, at ERROR; the
    rounds that fail after it in a row go to DEBUG, and wait twice as long
    each time, up to MAX_ROUND_DELAY, so as not to hammer a database on its
    way back up; the first round to succeed again says so at WARNING.
    """

    def __init__(self, intake: Intake, quiet: float, interval: float = 1.0) -> None:
        self.intake = intake
        self.quiet = quiet
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="xdsi-auto-publish", daemon=True
        )
        # Rounds failed in a row, and what the last one failed of: "database"
        # or the type of an error of this node.
        self._failures = 0
        self._failed_of = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        delay = self.interval
        while not self._stop.wait(delay):
            delay = self.run_round()

    def run_round(self) -> float:
        """Publish what is due once; return the seconds to wait before the
        next round."""
        try:
            self.intake.publish_due(self.quiet)
        except Exception as exc:
            # The thread must outlive a failing database; the next round
            # tries again.
            self._round_failed(exc)
            return min(self.interval * 2 ** min(self._failures, 32), MAX_ROUND_DELAY)
        if self._failures:
            logger.warning(
                "auto-publish back after %d failed rounds in a row", self._failures
            )
        self._failures, self._failed_of = 0, ""
        return self.interval

    def _round_failed(self, exc: Exception) -> None:
        """Log a failed round: once at ERROR for a run of failures of one
        kind, then at DEBUG. A database that cannot be reached is one line;
        an error of this node's own keeps its traceback."""
        unreachable = database_unreachable(exc)
        failed_of = "database" if unreachable else type(exc).__qualname__
        self._failures += 1
        if self._failed_of == failed_of:
            logger.debug(
                "auto-publish round failed, %d in a row: %s",
                self._failures,
                short_error(exc),
                exc_info=not unreachable,
            )
        elif unreachable:
            logger.error(
                "auto-publish round failed: the database cannot be reached "
                "(%s); rounds are retried, up to %.0f s apart",
                short_error(exc),
                MAX_ROUND_DELAY,
            )
        else:
            logger.exception("auto-publish round failed")
        self._failed_of = failed_of


def database_unreachable(exc: BaseException) -> bool:
    """Whether an error says the database cannot be reached (down,
    restarting, the connection lost) rather than that this node is at fault:
    a DBAPI OperationalError or InterfaceError (PEP 249), a connection the
    pool found broken, or none free in the pool in time."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout
    )


def short_error(exc: BaseException) -> str:
    """One line naming an error's type and saying what it is: the DBAPI's
    own error behind SQLAlchemy's, without the statement and parameters
    (which may name a patient)."""
    error = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 1] + "…"
    name = type(error).__qualname__
    module = type(error).__module__
    if module != "builtins":
        name = f"{module.partition('.')[0]}.{name}"
    return f"{name}: {text}" if text else name


def _files_of(folder: Path) -> Iterator[Path]:
    """The files of a file-set by its DICOMDIR, or every file under folder."""
    dicomdir = folder / DICOMDIR
    if dicomdir.is_symlink():
        # Its file-set would be the folder it links into, outside this one.
        logger.warning(
            "the DICOMDIR is a symbolic link; every file under the folder is "
            "read instead"
        )
    elif dicomdir.is_file():
        try:
            listed = _listed_files(dicomdir)
        except Exception as exc:  # a damaged DICOMDIR, or one naming odd paths
            logger.warning(
                "the DICOMDIR cannot be read (%s); every file under the folder "
                "is read instead",
                type(exc).__name__,
            )
        else:
            yield from listed
            return
    # The DICOMDIR names the file-set's files and is none of them (DICOM
    # PS3.10 8.6): one that cannot be read is said above, not taken in as an
    # instance and refused as a broken one.
    yield from (path for path in scan.regular_files(folder) if path != dicomdir)


def _refuse_special_file(path: Path) -> None:
    """Refuse a path of a file-set that is no regular file.

    A DICOMDIR may name any path of its folder (DICOM PS3.3 F.3.2.2): a
    FIFO, whose reading would wait for a writer for ever, a socket, a
    device or a folder. Such a path is refused unread, as the folder's own
    walk leaves it out; a missing one is left to :meth:`Intake.accept`,
    which says so.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise check.Refused(
            "unreadable", "no regular file (a folder, FIFO, socket or device)"
        )


def _listed_files(dicomdir: Path) -> list[Path]:
    """The files a DICOMDIR's records reference, those missing included.

    Each record's Referenced File ID (0004,1500) names a file of the
    file-set, relative to the DICOMDIR's folder (DICOM PS3.3 F.3.2.2). The
    records are read as the Directory Record Sequence holds them, not through
    the offsets that link them into a tree (F.3.2.1): a CD whose offsets
    loop would have pydicom's FileSet follow them for ever. A file named
    twice is listed once. A CD that lost files must not pass for whole: a
    Referenced File ID that names no file is listed too, and the import
    refuses it as unreadable.

    Raises
    ------
    ValueError
        The file is no Media Storage Directory, or a Referenced File ID
        names a path outside the DICOMDIR's folder (absolute, through "..",
        or through a symbolic link).
    """
    directory = pydicom.dcmread(dicomdir)
    if (
        directory.file_meta.get("MediaStorageSOPClassUID")
        != MediaStorageDirectoryStorage
        or "DirectoryRecordSequence" not in directory
    ):
        # DICOM PS3.10 8.6, PS3.3 F.2.2.
        raise ValueError("no Media Storage Directory with directory records")
    root = dicomdir.parent.resolve()
    listed: dict[Path, None] = {}
    for record in directory.DirectoryRecordSequence:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        relative = Path(*map(str, parts))
        path = dicomdir.parent / relative
        if relative.anchor or not path.resolve().is_relative_to(root):
            raise ValueError("a Referenced File ID names a path outside the file-set")
        listed[path] = None
    return list(listed)


def _upsert_study(
    conn: Connection,
    study_instance_uid: str,
    patient_id: str,
    values: dict[str, object],
    changed_at: float,
) -> None:
    """Update a study's row with ``values``; create it, changed at
    ``changed_at``, under ``patient_id``, when there is none."""
    changed = conn.execute(
        update(imaging_study)
        .where(imaging_study.c.study_instance_uid == study_instance_uid)
        .values(**values)
    )
    if changed.rowcount == 0:
        conn.execute(
            insert(imaging_study).values(
                study_instance_uid=study_instance_uid,
                patient_id=patient_id,
                changed_at=changed_at,
                dirty=bool(values.get("dirty", False)),
            )
        )


def _refuse_held_under_another(
    conn: Connection, header: scan.InstanceHeader, patient_id: str
) -> None:
    """Refuse an instance taken in under ``patient_id`` when its study holds
    instances under another patient id already.

    Asked in the transaction that takes the instance in, after the study's
    row was written: two intakes of one study at once under two patients
    given (``--patient-id``) both found it held under no one before, and
    the second must not take the study over (ITI TF-3 4.2.2.2.3). The
    reason names no patient.
    """
    other = conn.execute(
        select(imaging_instance.c.sop_instance_uid)
        .where(
            imaging_instance.c.study_instance_uid == header.study_instance_uid,
            imaging_instance.c.patient_id != patient_id,
        )
        .limit(1)
    ).first()
    if other is not None:
        raise check.Refused(
            "command_mismatch",
            f"study {header.study_instance_uid} is held under another patient "
            "than this instance is taken in under; remove it first "
            f"({REMOVE_COMMAND} {header.study_instance_uid}) to publish it under "
            "this one",
        )


def _patient_of(ds: Dataset) -> tuple[str, str, str]:
    """Patient ID (0010,0020) and its issuers: Issuer of Patient ID
    (0010,0021) and the issuer of its Qualifiers Sequence (0010,0024)."""
    return (str(ds.get("PatientID") or "").strip(), *scan.patient_id_issuers(ds))


def _patient_as_in_manifest(ds: Dataset) -> tuple[str, str]:
    """Patient ID and the first issuer given, which is the Issuer of Patient
    ID of the manifest built of the images (kos.build_manifest)."""
    patient_id, *issuers = _patient_of(ds)
    return patient_id, next((issuer for issuer in issuers if issuer), "")


def _same_patient(first: Dataset, second: Dataset) -> bool:
    """Whether two data sets name one patient: one Patient ID, and issuers
    that agree (DICOM PS3.3 C.7.1.1).

    An issuer given in the same attribute by both must be the same;
    where no attribute is given by both, their first issuers must be (so
    that Issuer of Patient ID 1.2.3 and a Qualifiers Sequence naming 1.2.3
    alone agree, and an issuer given against none does not).
    """
    first_id, *first_issuers = _patient_of(first)
    second_id, *second_issuers = _patient_of(second)
    if first_id != second_id:
        return False
    pairs = list(zip(first_issuers, second_issuers, strict=True))
    if any(a and b and a != b for a, b in pairs):
        return False
    if any(a and b for a, b in pairs):
        return True
    return _patient_as_in_manifest(first) == _patient_as_in_manifest(second)


def _same_as_in_manifest(manifest: Dataset, ds: Dataset) -> bool:
    """Whether a data set names the patient its study's manifest names."""
    return _patient_as_in_manifest(manifest) == _patient_as_in_manifest(ds)

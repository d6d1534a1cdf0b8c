"""Durable local audit spool: audit messages land on disk before transport.

Keeps the AuditMessages (DICOM PS3.15 A.5.1) that ITI TF-2 3.20 sends to the
Audit Record Repository, and reads them back. The spool is a directory with
one file per message, named so that names sort in the order of writing.
"""

import fcntl
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path

from lxml import etree

from xdsi.audit.messages import AuditEvent, build_audit_message
from xdsi.metadata.codes import Code

logger = logging.getLogger(__name__)

SUFFIX = ".xml"

# Held while a message is named and renamed into place, so that names appear
# in the directory in the order they sort, whichever process writes them.
LOCK_NAME = ".lock"

# ITI TF-2 3.20: codeSystemName of an EventTypeCode that names a transaction.
IHE_TRANSACTIONS = "IHE Transactions"

# DICOM PS3.15 A.5.1: ParticipantObjectTypeCodeRole 1 is Patient.
_PATIENT_ROLE = "1"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


@cache
def audit_message_schema() -> etree.RelaxNG:
    """Return the DICOM PS3.15 A.5.1 schema from the package's schema copy."""
    rng = resources.files("xdsi") / "schemas" / "dicom" / "audit-message.rng"
    return etree.RelaxNG(etree.fromstring(rng.read_bytes(), _PARSER))


@dataclass(frozen=True)
class AuditRecord:
    """One spooled audit message, with the fields an audit view lists.

    A file that is not a valid AuditMessage is still a record, with ``valid``
    False, ``event_time`` taken from the file's modification time, the coded
    fields None and the id tuples empty; ``xml`` then holds the raw bytes.
    """

    path: Path
    event_time: datetime
    event_id: Code | None
    event_type: str | None
    event_action: str | None
    outcome: int | None
    actor_user_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    object_ids: tuple[str, ...]
    xml: bytes
    valid: bool = True


def _parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _read_record(path: Path, xml: bytes) -> AuditRecord:
    """Return the record of a well-formed, schema-valid AuditMessage.

    Raises
    ------
    ValueError
        The bytes are not an AuditMessage valid against DICOM PS3.15 A.5.1.
    """
    root = etree.fromstring(xml, _PARSER)
    schema = audit_message_schema()
    if not schema.validate(root):
        raise ValueError(f"{path.name}: {schema.error_log.last_error}")

    identification = root.find("EventIdentification")
    event_id = identification.find("EventID")
    transactions = [
        code.get("csd-code")
        for code in identification.findall("EventTypeCode")
        if code.get("codeSystemName") == IHE_TRANSACTIONS
    ]
    objects = root.findall("ParticipantObjectIdentification")
    return AuditRecord(
        path=path,
        event_time=_parse_time(identification.get("EventDateTime")),
        event_id=Code(
            event_id.get("csd-code"),
            event_id.get("codeSystemName"),
            event_id.get("originalText"),
        ),
        event_type=transactions[0] if transactions else None,
        event_action=identification.get("EventActionCode"),
        outcome=int(identification.get("EventOutcomeIndicator")),
        actor_user_ids=tuple(
            p.get("UserID") for p in root.findall("ActiveParticipant")
        ),
        patient_ids=tuple(
            o.get("ParticipantObjectID")
            for o in objects
            if o.get("ParticipantObjectTypeCodeRole") == _PATIENT_ROLE
        ),
        object_ids=tuple(
            o.get("ParticipantObjectID")
            for o in objects
            if o.get("ParticipantObjectTypeCodeRole") != _PATIENT_ROLE
        ),
        xml=xml,
    )


class AuditSpool:
    """A directory of audit messages, one file each, oldest name first.

    The directory is created on the first write. A message is written to a
    hidden temporary file in the same directory, flushed to disk, renamed into
    place and the directory entry flushed too, so that after a crash a
    message is either whole or absent.
    """

    _lock = threading.Lock()
    _last_ns = 0

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # The directory, opened once for the fsync that makes each new entry
        # durable; made on the first write.
        self._directory_fd: int | None = None
        self._fd_lock = threading.Lock()

    def _open_directory(self) -> int:
        with self._fd_lock:
            if self._directory_fd is None:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._directory_fd = os.open(
                    self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                )
            return self._directory_fd

    def close(self) -> None:
        """Release the directory handle; a later write opens it again."""
        with self._fd_lock:
            if self._directory_fd is not None:
                os.close(self._directory_fd)
                self._directory_fd = None

    def _next_name(self) -> str:
        # Names sort by write time: nanoseconds since the epoch, strictly
        # increasing within this process, then the process id and a random
        # tag so that processes sharing the directory never collide.
        # Limitation: across processes or restarts, a clock stepped backwards
        # sorts later messages before earlier ones.
        now = max(time.time_ns(), AuditSpool._last_ns + 1)
        AuditSpool._last_ns = now
        return f"{now:020d}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"

    def _publish(self, temporaries: list[str]) -> list[Path]:
        """Rename written temporary files to the next names, in order.

        A reader that has seen a name never later finds a smaller one appear
        (the forwarder's cursors rely on it): naming and renaming happen under
        a lock shared by the threads of this process and, through a lock
        file, by other processes. A rename that fails takes back those made
        before it.
        """
        paths: list[Path] = []
        with AuditSpool._lock:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                for temporary in temporaries:
                    path = self.directory / self._next_name()
                    os.replace(temporary, path)
                    paths.append(path)
            except BaseException:
                for path in paths:
                    path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
        return paths

    def _sync_directory(self) -> None:
        os.fsync(self._open_directory())

    def _write_hidden(self, messages: list[bytes]) -> list[str]:
        """Write and fsync each message to a hidden temporary file; on any
        failure remove those written and raise."""
        temporaries: list[str] = []
        try:
            for message in messages:
                fd, temporary = tempfile.mkstemp(
                    prefix=".", suffix=".tmp", dir=self.directory
                )
                temporaries.append(temporary)
                with os.fdopen(fd, "wb") as stream:
                    stream.write(message)
                    stream.flush()
                    os.fsync(stream.fileno())
        except BaseException:
            for temporary in temporaries:
                Path(temporary).unlink(missing_ok=True)
            raise
        return temporaries

    def write(self, message: bytes) -> Path:
        """Store one audit message durably and return its file.

        Raises
        ------
        OSError
            The spool directory cannot be created or written.
        """
        (path,) = self.write_all([message])
        return path

    def write_all(self, messages: list[bytes]) -> list[Path]:
        """Store audit messages durably, all or none, and return their files.

        Each is written and fsynced under a hidden name first, which no
        reader takes; only when all are is each given its spool name. So a
        disk that fills half-way leaves none of them, not some naming an
        event that then did not happen.

        Raises
        ------
        OSError
            The spool directory cannot be created or written.
        """
        self._open_directory()
        try:
            temporaries = self._write_hidden(messages)
        except FileNotFoundError:
            # The directory was removed under the running node: make it
            # again, and write them all in it.
            self.close()
            self._open_directory()
            temporaries = self._write_hidden(messages)
        try:
            paths = self._publish(temporaries)
        except BaseException:
            for temporary in temporaries:
                Path(temporary).unlink(missing_ok=True)
            raise
        self._sync_directory()
        for path, message in zip(paths, messages, strict=True):
            logger.debug("spooled audit message %s (%d bytes)", path.name, len(message))
        return paths

    def records(self) -> Iterator[AuditRecord]:
        """Yield every spooled message, oldest first.

        A file that is not a valid AuditMessage (truncated, edited, not XML)
        is yielded with ``valid`` False; it is never skipped. A file removed
        while the spool is read is no longer in the spool and is not yielded.
        """
        if not self.directory.is_dir():
            return
        names = sorted(
            entry.name
            for entry in os.scandir(self.directory)
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".")
        )
        for name in names:
            path = self.directory / name
            try:
                xml = path.read_bytes()
                modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except FileNotFoundError:
                continue
            try:
                yield _read_record(path, xml)
            except (etree.XMLSyntaxError, ValueError, TypeError, AttributeError):
                logger.warning("audit spool file %s is not a valid AuditMessage", name)
                yield AuditRecord(
                    path=path,
                    event_time=modified,
                    event_id=None,
                    event_type=None,
                    event_action=None,
                    outcome=None,
                    actor_user_ids=(),
                    patient_ids=(),
                    object_ids=(),
                    xml=xml,
                    valid=False,
                )


class Auditor:
    """Builds each transaction's audit message and spools it; never raises.

    Audit never blocks care: a failure to build or store a message is logged
    with its traceback and :meth:`record` returns False; a transaction goes
    on unless its actor promises the record durable before it answers
    (RAD-69 sends no instance without it).
    """

    def __init__(
        self,
        spool: AuditSpool,
        *,
        audit_source_id: str,
        enterprise_site_id: str | None = None,
    ) -> None:
        self.spool = spool
        self.audit_source_id = audit_source_id
        self.enterprise_site_id = enterprise_site_id

    def record(self, event: AuditEvent) -> bool:
        """Build the audit message for ``event`` and spool it; return whether
        it is now durable in the spool."""
        return self.record_all([event])

    def record_all(self, events: list[AuditEvent]) -> bool:
        """Build the audit messages for ``events`` and spool them, all or
        none (:meth:`AuditSpool.write_all`); return whether they are now
        durable in the spool."""
        if not events:
            return True
        try:
            messages = [
                build_audit_message(
                    event,
                    audit_source_id=self.audit_source_id,
                    enterprise_site_id=self.enterprise_site_id,
                )
                for event in events
            ]
            paths = self.spool.write_all(messages)
        except Exception:
            for event in events:
                logger.exception(
                    "audit record of %s by %s (outcome %s) was not spooled",
                    event.transaction,
                    event.actor,
                    int(event.outcome),
                )
            return False
        for event, path in zip(events, paths, strict=True):
            logger.debug(
                "audit record of %s by %s is %s", event.transaction, event.actor, path
            )
        return True

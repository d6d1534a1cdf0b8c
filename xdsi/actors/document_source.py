"""Document Source: submit plain files with ITI-41 Provide and Register
Document Set-b.

ITI TF-2 3.41.4.1 (one DocumentEntry and one MTOM/XOP part per document,
streamed from its file), ITI TF-3 4.2.3 (the metadata; the affinity-domain
codes come from the ``[source]`` settings).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from xdsi import audit, tls
from xdsi.actors.provide import Document, Sender, provide_and_register
from xdsi.config import Settings
from xdsi.metadata.build import (
    DocumentEntrySpec,
    SubmissionSetSpec,
    new_oid,
    submission,
    utc_dtm,
)
from xdsi.metadata.codes import Code

logger = logging.getLogger(__name__)

# The mimeType of a file whose type neither the caller nor its name tells.
DEFAULT_MIME_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Submitted:
    """The uniqueIds of a SubmissionSet the repository accepted."""

    submission_set_unique_id: str
    document_unique_ids: tuple[str, ...]


def file_digest(path: Path) -> tuple[int, str]:
    """Return a file's size and SHA-1 (ITI TF-3 4.2.3.2.18, 4.2.3.2.10)."""
    digest = hashlib.sha1()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class DocumentSource:
    """The Document Source of plain documents over one repository URL."""

    def __init__(
        self,
        settings: Settings,
        spool_dir: Path,
        auditor: audit.Auditor | None = None,
    ) -> None:
        self.settings = settings
        self.auditor = auditor
        self.spool_dir = spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    def entry(
        self,
        path: Path,
        entry_id: str,
        patient_id: str,
        *,
        mime_type: str | None = None,
        title: str | None = None,
    ) -> DocumentEntrySpec:
        """Describe one file as a DocumentEntry.

        The affinity domain's patient id also stands as sourcePatientId
        (ITI TF-3 4.2.3.2.23), since a plain file names no local id;
        creationTime is the file's modification time.
        """
        cfg = self.settings.source
        size, sha1 = file_digest(path)
        modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        return DocumentEntrySpec(
            entry_id=entry_id,
            unique_id=new_oid(),
            patient_id=patient_id,
            source_patient_id=patient_id,
            source_patient_info=(),
            title=title or path.name,
            creation_time=utc_dtm(modified),
            service_start_time=None,
            service_stop_time=None,
            event_codes=(),
            reference_ids=(),
            mime_type=mime_type
            or mimetypes.guess_type(path.name)[0]
            or DEFAULT_MIME_TYPE,
            format_code=Code(*cfg.format_code),
            class_code=Code(*cfg.class_code),
            type_code=Code(*cfg.type_code),
            practice_setting_code=Code(*cfg.practice_setting_code),
            healthcare_facility_type_code=Code(*cfg.healthcare_facility_type_code),
            confidentiality_code=Code(*cfg.confidentiality_code),
            language_code=cfg.language_code,
            author_institution=cfg.author_institution,
            size=size,
            sha1=sha1,
        )

    def submit(
        self,
        files: Sequence[Path],
        patient_id: str,
        *,
        mime_type: str | None = None,
        title: str | None = None,
    ) -> Submitted:
        """Send ``files`` as one SubmissionSet, one DocumentEntry each.

        ``patient_id`` is the affinity domain's (CX, ITI TF-3 4.2.3.2.16).
        Each document streams from its file; nothing is held in memory.

        Raises
        ------
        SubmitError
            The repository answered other than Success, or could not be
            reached.
        """
        if not files:
            raise ValueError("submit needs at least one file")
        cfg = self.settings.source
        entries = [
            self.entry(
                path,
                f"Document{n:02d}",
                patient_id,
                mime_type=mime_type,
                title=title,
            )
            for n, path in enumerate(files, start=1)
        ]
        submission_set = SubmissionSetSpec(
            entry_id="SubmissionSet01",
            unique_id=new_oid(),
            source_id=cfg.source_id,
            patient_id=patient_id,
            content_type_code=Code(*cfg.content_type_code),
            author_institution=cfg.author_institution,
            submission_time=utc_dtm(),
        )
        provide_and_register(
            self.settings.source_repository_url,
            submission(entries, submission_set),
            [
                Document(entry.entry_id, entry.mime_type, path=path)
                for entry, path in zip(entries, files, strict=True)
            ],
            sender=Sender(
                "ITI-41", "Document Source", self.auditor, self.settings.node.advertised
            ),
            patient_id=patient_id,
            submission_set_unique_id=submission_set.unique_id,
            spool_dir=self.spool_dir,
            ssl_context=tls.client_context_for(self.settings),
            timeout=self.settings.source.timeout,
        )
        return Submitted(submission_set.unique_id, tuple(e.unique_id for e in entries))

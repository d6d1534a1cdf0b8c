"""The sending side of Provide and Register (ITI-41 and RAD-68 as MTOM) and
of Update Document Set (ITI-57).

ITI TF-2 3.41.4.1 and RAD TF-3 4.68.4.1: the metadata and one xdsb:Document
per DocumentEntry, each document an MTOM part streamed from a file or
bytes. Used by the Document Source and the Imaging Document Source, which
differ only in their metadata and in the transaction they audit. ITI TF-2
3.57.4.1: the Imaging Document Source sends the Update Document Set that
deprecates a withdrawn manifest to the Document Registry.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

from xdsi import audit, logs, ns, wire
from xdsi.actors.soap_endpoint import transaction
from xdsi.metadata.responses import (
    RegistryError,
    ResponseStatus,
    read_errors,
    read_status,
)

logger = logging.getLogger(__name__)


class SubmitError(Exception):
    """Provide and Register did not succeed; ``errors`` holds the repository's
    RegistryErrors (none when it could not be reached).

    The message quotes the errors' codeContext texts, which a peer writes
    as it likes and may name the patient: it is for the user's terminal and
    the DEBUG log, :attr:`codes` for a log line above DEBUG.
    """

    def __init__(self, message: str, errors: list[RegistryError] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    @property
    def codes(self) -> str:
        """The errors' codes, escaped and cut (logs.quoted), comma-separated;
        the message when there are none (the peer could not be reached)."""
        if not self.errors:
            return str(self)
        return ", ".join(logs.quoted(e.code) or "" for e in self.errors)


# An errorCode is a short name (ITI TF-3 Table 4.2.4.1-2); a longer one is
# cut here.
QUOTED_CODE = 80


def describe_errors(errors: Sequence[RegistryError]) -> str:
    """The RegistryErrors as a user reads them: each code with its
    codeContext (ITI TF-3 4.2.4.1), escaped and cut as a peer's text is
    shown (logs.shown)."""
    return "; ".join(
        f"{logs.shown(e.code, QUOTED_CODE)}: {logs.shown(e.message)}"
        if e.message
        else logs.shown(e.code, QUOTED_CODE)
        for e in errors
    )


@dataclass(frozen=True)
class Document:
    """One document to send: its DocumentEntry id, mimeType and content."""

    entry_id: str
    mime_type: str
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Sender:
    """Who sends, for the audit record: transaction and actor of the table."""

    transaction: str
    actor: str
    auditor: audit.Auditor | None
    host: str


def provide_and_register(
    url: str,
    metadata: etree._Element,
    documents: Sequence[Document],
    *,
    sender: Sender,
    patient_id: str,
    submission_set_unique_id: str,
    spool_dir: Path,
    timeout: float = 120.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Send one submission to the Document Repository at ``url``.

    Raises
    ------
    SubmitError
        The repository answered other than Success, or could not be
        reached.
    """
    request = etree.Element(
        f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    request.append(metadata)
    parts = []
    for document in documents:
        content_id = wire.new_content_id()
        element = etree.SubElement(
            request, f"{{{ns.XDSB}}}Document", id=document.entry_id
        )
        element.append(wire.xop_include(content_id))
        parts.append(
            wire.OutgoingPart(
                content_id, document.mime_type, path=document.path, data=document.data
            )
        )

    _send(
        url,
        "ITI-41",
        request,
        parts,
        refused_by="the Document Repository",
        default_code="XDSRepositoryError",
        summary=f"{len(documents)} DocumentEntries",
        sender=sender,
        patient_id=patient_id,
        submission_set_unique_id=submission_set_unique_id,
        spool_dir=spool_dir,
        timeout=timeout,
        ssl_context=ssl_context,
    )


def update_document_set(
    url: str,
    request: etree._Element,
    *,
    sender: Sender,
    patient_id: str,
    submission_set_unique_id: str,
    spool_dir: Path,
    timeout: float = 120.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Send one Update Document Set to the Document Registry at ``url``.

    ITI TF-2 3.57.4.1: the SubmitObjectsRequest travels as a plain SOAP 1.2
    message; the answer is a RegistryResponse.

    Raises
    ------
    SubmitError
        The registry answered other than Success, or could not be reached.
    """
    _send(
        url,
        "ITI-57",
        request,
        [],
        refused_by="the Document Registry",
        default_code="XDSRegistryError",
        summary="status update",
        sender=sender,
        patient_id=patient_id,
        submission_set_unique_id=submission_set_unique_id,
        spool_dir=spool_dir,
        timeout=timeout,
        ssl_context=ssl_context,
    )


def _send(
    url: str,
    transaction_id: str,
    request: etree._Element,
    parts: list[wire.OutgoingPart],
    *,
    refused_by: str,
    default_code: str,
    summary: str,
    sender: Sender,
    patient_id: str,
    submission_set_unique_id: str,
    spool_dir: Path,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> None:
    """Send one request answered by a RegistryResponse, audit it and log it.

    The answer must keep wire.ANSWER_PACE, pausing ``timeout`` at most.

    Raises
    ------
    SubmitError
        The peer answered other than Success, could not be reached, or
        answered too slowly or with MIME parts beside the RegistryResponse.
    """
    spec = transaction(transaction_id)
    started = time.monotonic()
    outcome = "not delivered"
    message_id = None
    try:
        client = wire.SoapClient(
            url,
            timeout=timeout,
            min_rate=wire.ANSWER_PACE,
            spool_dir=spool_dir,
            ssl_context=ssl_context,
        )
        # ITI TF-2 3.41.4.2, 3.57.4.2 and RAD TF-3 4.68.4.2: the answer is a
        # RegistryResponse alone, so an MTOM package holds its root part
        # only; a flood of parts is refused before it fills the spool.
        with client.call(
            spec["request_action"], request, parts=parts, max_parts=1
        ) as reply:
            message_id = reply.relates_to
            status = read_status(reply.body)
            errors = read_errors(reply.body)
        outcome = status.rsplit(":", 1)[-1]
        if status != ResponseStatus.SUCCESS.value:
            errors = errors or [RegistryError(default_code, f"the answer is {outcome}")]
            raise SubmitError(
                f"{refused_by} refused the {spec['title']}: {describe_errors(errors)}",
                errors,
            )
    except (wire.TransportError, wire.PeerFault) as exc:
        raise SubmitError(f"{sender.transaction} to {url} failed: {exc}") from exc
    finally:
        if sender.auditor is not None:
            sender.auditor.record(
                audit.AuditEvent(
                    transaction=sender.transaction,
                    actor=sender.actor,
                    outcome=audit.Outcome.SUCCESS
                    if outcome == "Success"
                    else audit.Outcome.SERIOUS_FAILURE,
                    source=audit.Endpoint(ns.WSA_ANONYMOUS, sender.host),
                    destination=audit.Endpoint(url, urlsplit(url).hostname or ""),
                    patient_id=patient_id,
                    submission_set_unique_id=submission_set_unique_id,
                    message_id=message_id,
                )
            )
        logger.info(
            "%s %s to %s: %s, SubmissionSet %s, %s, %.3f s",
            sender.transaction,
            spec["title"],
            url,
            outcome,
            submission_set_unique_id,
            summary,
            time.monotonic() - started,
        )

"""Send DICOM PS3.10 files to a storage SCP by C-STORE, as they are stored.

Implements the Storage Service Class as an SCU (DICOM PS3.4 B): one
presentation context per SOP Class and transfer syntax found in the files'
File Meta Information (DICOM PS3.10 7.1), at most 128 per association (DICOM
PS3.8 9.3.2.2); each data set is sent as the file holds it, never decoded
or re-encoded, so that the peer receives the same bytes. Given a TLS
context, each association runs over TLS (DICOM PS3.15 B.1, the Basic TLS
Secure Transport Connection Profile; ITI TF-2 3.19).
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.presentation import build_context

from xdsi.logs import shown

logger = logging.getLogger(__name__)

# pynetdicom's loggers that tell of a failed association request at ERROR,
# each reason over three lines; the StoreScuError says it once instead.
ASSOCIATION_LOGGERS = ("pynetdicom.acse", "pynetdicom.dul", "pynetdicom.transport")

# DICOM PS3.8 9.3.2.2: presentation context IDs are odd numbers 1 to 255.
MAX_CONTEXTS = 128

# DICOM PS3.4 Table B.2-1: Success.
SUCCESS = 0x0000

# AE@host:port, AE title at most 16 characters (DICOM PS3.5 6.2).
DESTINATION = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})")

Progress = Callable[[int, int], None]


class StoreScuError(Exception):
    """The storage SCP could not be reached or refused the association.

    ``unanswered`` when the SCP took the connection but gave no DICOM answer
    (no A-ASSOCIATE-AC or -RJ, no A-ABORT; DICOM PS3.8 9.3): what listens
    there may speak another protocol, TLS say (DICOM PS3.15 B.1).
    """

    def __init__(self, message: str, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered


@dataclass(frozen=True)
class Destination:
    """A storage SCP: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Read ``AE@host:port``."""
        match = DESTINATION.fullmatch(text.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(
                f"{text!r} is no storage SCP; write AE@host:port, the AE title "
                "at most 16 characters (DICOM PS3.5 6.2)"
            )
        return cls(match["ae"], match["host"], int(match["port"]))


@dataclass
class SendResult:
    """The C-STORE status of every file sent, and files that could not be."""

    statuses: dict[Path, int] = field(default_factory=dict)
    unsendable: dict[Path, str] = field(default_factory=dict)

    @property
    def failed(self) -> dict[Path, int]:
        """Files the SCP answered with a Failure or Warning status."""
        return {p: s for p, s in self.statuses.items() if s != SUCCESS}


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    progress: Progress | None = None,
    timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> SendResult:
    """C-STORE every file of ``paths`` to ``destination``, over TLS with
    ``ssl_context`` (its certificate presented, the SCP's checked).

    A file without File Meta Information (SOP Class, SOP Instance and
    transfer syntax) is not sent and lands in ``unsendable``.

    Raises
    ------
    StoreScuError
        No association could be established.
    """
    # Data sets go out as the files hold them (DICOM PS3.8 9.3.5 fragments).
    _config.STORE_SEND_CHUNKED_DATASET = True
    result = SendResult()
    contexts: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            key = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except Exception as exc:
            result.unsendable[path] = f"{type(exc).__name__}: {exc}"
            continue
        contexts.setdefault(key, []).append(path)

    keys = list(contexts)
    total = sum(len(v) for v in contexts.values())
    for start in range(0, len(keys), MAX_CONTEXTS):
        batch = keys[start : start + MAX_CONTEXTS]
        files = [p for key in batch for p in contexts[key]]
        ae = _application_entity(calling_ae_title, timeout, batch)
        refusal = _Refusal()
        with refusal.told_once():
            assoc = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                tls_args=(
                    None if ssl_context is None else (ssl_context, destination.host)
                ),
                evt_handlers=[
                    (evt.EVT_CONN_OPEN, refusal.on_open),
                    (evt.EVT_PDU_RECV, refusal.on_pdu),
                ],
            )
        if not assoc.is_established:
            over = " over TLS" if ssl_context is not None else ""
            raise StoreScuError(
                f"no association with {destination.ae_title}@{destination.host}:"
                f"{destination.port}{over}: {refusal.reason(timeout)}",
                unanswered=refusal.connected and refusal.answer is None,
            )
        try:
            for path in files:
                try:
                    status = assoc.send_c_store(path)
                except ValueError as exc:
                    # The SCP accepted no context for this SOP Class and
                    # transfer syntax (DICOM PS3.8 9.3.3.2).
                    result.unsendable[path] = str(exc)
                    continue
                if not status:
                    raise StoreScuError(
                        f"{destination.ae_title} sent no C-STORE response for {path}"
                    )
                result.statuses[path] = int(status.Status)
                if progress:
                    progress(len(result.statuses), total)
        finally:
            assoc.release()
    logger.info(
        "C-STORE to %s@%s:%s: %d sent, %d failed, %d unsendable",
        destination.ae_title,
        destination.host,
        destination.port,
        len(result.statuses),
        len(result.failed),
        len(result.unsendable),
    )
    return result


class _Refusal:
    """Why an association request failed, from the peer's answer.

    An A-ASSOCIATE-RJ carries its result, source and reason (DICOM PS3.8
    9.3.4), an A-ABORT its source and reason (PS3.8 9.3.8); no answer at all
    means the peer could not be reached or never answered.
    """

    def __init__(self) -> None:
        self.connected = False
        self.answer: str | None = None
        self.suppressed: list[str] = []

    def on_open(self, event: Event) -> None:
        self.connected = True

    def on_pdu(self, event: Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ASSOCIATE_RJ):
            self.answer = f"{pdu.result_str} by the {pdu.source_str}: {pdu.reason_str}"
        elif isinstance(pdu, A_ABORT_RQ):
            self.answer = f"aborted by the {pdu.source_str}: {pdu.reason_str}"

    def reason(self, timeout: float) -> str:
        if self.answer is not None:
            return self.answer
        if self.suppressed:
            # pynetdicom's own words: "TCP Initialisation Error: [Errno 111]
            # Connection refused", "No accepted presentation contexts", ...
            return "; ".join(shown(line) for line in self.suppressed[-2:])
        return f"no answer within {timeout:g} s"

    @contextmanager
    def told_once(self) -> Iterator[None]:
        """Keep pynetdicom's ERROR lines about the request out of the log
        (DEBUG keeps them), for reason() to sum up."""

        def demote(record: logging.LogRecord) -> bool:
            if record.levelno < logging.ERROR:
                return True
            self.suppressed.append(record.getMessage())
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

        loggers = [logging.getLogger(name) for name in ASSOCIATION_LOGGERS]
        for each in loggers:
            each.addFilter(demote)
        try:
            yield
        finally:
            for each in loggers:
                each.removeFilter(demote)


def _application_entity(
    calling_ae_title: str, timeout: float, keys: list[tuple[str, str]]
) -> AE:
    """An SCU proposing one context per SOP Class and transfer syntax."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in keys]
    return ae

"""The intake's C-STORE SCP: the Storage Service Class as an SCP.

Implements DICOM PS3.4 B (Storage Service Class) for the storage SOP
Classes of DICOM PS3.4 B.5 in the transfer syntaxes of TRANSFER_SYNTAXES,
and C-ECHO (DICOM PS3.4 A). Each received data set is written to a file as
it arrives (never held whole in memory), checked, and stored once per SOP
Instance UID; a refused one is answered with the status of
``profiles/intake_refusals.toml`` and nothing is stored. A peer sending a
PDU longer than the Maximum Length Received offered (DICOM PS3.8 D.1.1) is
aborted before its body is read.

When an association ends (released, aborted or broken off) the instances it
brought are audited as DICOM Instances Transferred (DICOM PS3.15 A.5.3.7),
one record per patient, the peer's AE title as Source and this SCP as
Destination, and one log line tells how it ended: INFO when released,
WARNING with the reason when rejected (DICOM PS3.8 Table 9-21) or aborted
(DICOM PS3.8 Table 9-26).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    ThreadedAssociationServer,
)

from xdsi import audit
from xdsi.actors.intake import Accepted, Intake, received_events
from xdsi.dicom.check import Refused
from xdsi.tls import TlsGate

logger = logging.getLogger(__name__)

# The transfer syntaxes accepted: those of the bundled test objects
# (shared dicom/singles), uncompressed and compressed alike.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# DICOM PS3.4 Table B.2-1: Success.
SUCCESS = 0x0000
# DICOM PS3.7 C.4.2: Processing failure, for a data set whose association
# closed before it could be answered.
PROCESSING_FAILURE = 0x0110

# DICOM PS3.8 Table 9-21: A-ASSOCIATE-RJ Source and Reason/Diag.
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}

# DICOM PS3.8 Table 9-26: A-ABORT Reason/Diag of a service-provider abort.
PROVIDER_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}

# DICOM PS3.8 Table 9-18: Result/Reason of a presentation context.
CONTEXT_REJECTIONS = {
    1: "user-rejection",
    2: "no-reason (provider rejection)",
    3: "abstract-syntax-not-supported (provider rejection)",
    4: "transfer-syntaxes-not-supported (provider rejection)",
}

# Rejected presentation contexts a log line names at most.
NAMED_CONTEXTS = 3
# Associations served at once (pynetdicom's default is 10): a PACS sends a
# study over several in parallel, and each holds only a thread and the data
# set it is writing to disk.
MAX_ASSOCIATIONS = 64
# The Maximum Length Received this SCP offers (DICOM PS3.8 D.1.1): a peer
# sends no P-DATA-TF PDU longer (PS3.8 9.3.5), and pynetdicom holds each PDU
# whole in memory before its fragments are written out, so an SCP offering
# no limit (0) would take a data set of any size in one PDU, in memory.
MAX_PDU_SIZE = 1 << 20
# DICOM PS3.8 D.1.1 bounds the variable field of a P-DATA-TF PDU, its PDV
# items, by the Maximum Length Received; some peers bound a PDV's value by
# it and send its Item-length, Presentation-context-ID and Message Control
# Header (DICOM PS3.8 9.3.5.1) on top, which is tolerated. An A-ASSOCIATE-RQ
# (a few kilobytes for 128 presentation contexts) and the PDUs of 4 bytes
# (DICOM PS3.8 9.3.6 to 9.3.8) fall within the same bound.
PDV_HEADER = 6
# DICOM PS3.8 9.3.1: a PDU opens with its type, a reserved byte and its
# length (big endian), the bytes that follow.
PDU_HEADER = 6
# DICOM PS3.8 Table 9-11: the PDU types.
PDU_TYPES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
# Bytes of a refused PDU's body read and dropped at a time, until the peer
# closes the connection or the ARTIM timer ends the association.
DISCARD_SIZE = 1 << 16
# Seconds a connection may take to send its A-ASSOCIATE-RQ (the ARTIM timer,
# DICOM PS3.8 9.1.5), and an association to answer an A-RELEASE: a
# connection that sends nothing, even one its peer closed, holds its place
# among MAX_ASSOCIATIONS until then (pynetdicom's default is 30 s).
ACSE_TIMEOUT = 10.0


@dataclass
class _Association:
    """One association from its connection to its end: what it brought,
    and what is known of how it ended."""

    started: float = field(default_factory=time.monotonic)
    kept: list[Accepted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    # C-STORE requests being answered; the association ends after them.
    storing: int = 0
    # Each file pynetdicom received a data set into, until the C-STORE
    # handler takes it; those left when the association ends are removed.
    received: dict[Path, IO[bytes]] = field(default_factory=dict)
    closed: bool = False
    requested: bool = False
    released: bool = False
    rejection: str = ""
    abort: str = ""


# The data set files of each association, by the thread (pynetdicom's DUL
# reactor) that receives its P-DATA.
_RECEIVING: weakref.WeakKeyDictionary[threading.Thread, dict[Path, IO[bytes]]] = (
    weakref.WeakKeyDictionary()
)
_NAMED_TEMPORARY_FILE = dimse_messages.NamedTemporaryFile
# The most bytes a data set may have, by the same thread; none where absent.
_MAX_DATA_SET: weakref.WeakKeyDictionary[threading.Thread, int] = (
    weakref.WeakKeyDictionary()
)


class DataSetTooLarge(Exception):
    """A data set being received grew past the SCP's maximum size."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a data set is larger than {limit} bytes")
        self.limit = limit


class _CappedFile:
    """pynetdicom's temporary file for a data set, refusing the write that
    would make it larger than ``limit`` bytes: the disk is not filled by
    one data set of no end."""

    def __init__(self, file: Any, limit: int) -> None:
        self._file = file
        self._limit = limit
        self._size = 0

    def write(self, data: bytes) -> int:
        self._size += len(data)
        if self._size > self._limit:
            raise DataSetTooLarge(self._limit)
        return int(self._file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _data_set_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a data set being received, noted for
    the association receiving it.

    pynetdicom opens one as a C-STORE command ends (DICOM PS3.7 9.3.1.1) and
    hands it to the C-STORE handler once the data set's last fragment came
    (DICOM PS3.8 9.3.5). A file it never hands on is not removed: the data
    set of an association broken off before its last fragment, one cut off
    by the next command (a peer that sends another before it), and each
    data set received whole but not yet answered when the association ends.
    """
    file = _NAMED_TEMPORARY_FILE(*args, **kwargs)
    thread = threading.current_thread()
    received = _RECEIVING.get(thread)
    if received is not None:
        received[Path(file.name)] = file
    limit = _MAX_DATA_SET.get(thread)
    return file if limit is None else _CappedFile(file, limit)


_RECEIVE_PRIMITIVE = DIMSEServiceProvider.receive_primitive


def _receive_primitive(dimse: DIMSEServiceProvider, primitive: Any) -> None:
    """pynetdicom's decoding of a P-DATA-TF, an undecodable one taken as an
    invalid PDU (DICOM PS3.8 Table 9-10, Evt19): the association is aborted
    (A-P-ABORT) and ends as any other does.

    pynetdicom decodes a message's command as its last fragment comes, in
    the thread that reads the peer's PDUs. A command it cannot take (one
    with no Command Field, a C-STORE with no Affected SOP Class UID, or on a
    presentation context that was not accepted) raises there and ends that
    thread: the association then ends without a word of it to the handlers,
    so what it brought was neither logged nor audited, and the data set
    file opened for it stayed.
    """
    try:
        _RECEIVE_PRIMITIVE(dimse, primitive)
    except DataSetTooLarge as exc:
        # Limitation: the association is aborted, not answered A700 (Out of
        # Resources, DICOM PS3.4 B.2.3), which would mean reading the rest.
        logger.warning(
            "C-STORE SCP: a data set from %s is larger than [node] "
            "max_request_size (%d bytes); the association is aborted",
            dimse.assoc.requestor.ae_title,
            exc.limit,
        )
        dimse.message = None
        dimse.dul.event_queue.put("Evt19")
    except Exception:
        logger.warning(
            "C-STORE SCP: a DIMSE message from %s cannot be decoded; the "
            "association is aborted",
            dimse.assoc.requestor.ae_title,
        )
        logger.debug("the undecodable DIMSE message", exc_info=True)
        dimse.message = None
        dimse.dul.event_queue.put("Evt19")


class _PduLengthGate:
    """pynetdicom's reading of a PDU from one association's peer, refusing
    one whose length field says more than ``limit`` before its body is read:
    an invalid PDU (DICOM PS3.8 Table 9-10, Evt19), the association aborted
    (A-ABORT) as for any other.

    pynetdicom reads a PDU whole into memory, however long its length field
    says it is (up to 4 GiB), whatever Maximum Length Received this SCP
    offered (DICOM PS3.8 D.1.1). The PDU's header is read here; one within
    the limit is handed, header and all, to pynetdicom's own reading. After
    a refusal what the peer still sends is read and dropped, unparsed (Sta13,
    AA-6: PDUs received are ignored), until it closes the connection or the
    ARTIM timer closes it.
    """

    def __init__(self, dul: DULServiceProvider, limit: int) -> None:
        self._dul = dul
        self._read_pdu = dul._read_pdu_data
        self._limit = limit
        self._refused = False

    def __call__(self) -> None:
        socket: AssociationSocket = self._dul.socket  # type: ignore[assignment]
        if self._refused:
            self._discard(socket)
            return
        head: bytes | BaseException
        try:
            head = bytes(socket.recv(PDU_HEADER))
        except (OSError, TimeoutError) as exc:
            head = exc
        if isinstance(head, bytes) and len(head) == PDU_HEADER:
            pdu_type, _, length = struct.unpack(">BBL", head)
            if length > self._limit:
                self._refuse(pdu_type, length)
                return
        self._replayed(socket, head)

    def _replayed(self, socket: AssociationSocket, head: bytes | BaseException) -> None:
        """pynetdicom's reading of the PDU whose header (or the error
        reading it) is ``head``, its first read of the socket given that."""

        def first(size: int) -> bytearray:
            del socket.recv
            if isinstance(head, BaseException):
                raise head
            return bytearray(head)

        socket.recv = first  # type: ignore[method-assign]
        try:
            self._read_pdu()
        finally:
            socket.__dict__.pop("recv", None)

    def _refuse(self, pdu_type: int, length: int) -> None:
        requestor = self._dul.assoc.requestor
        logger.warning(
            "C-STORE SCP: a %s PDU of %d bytes from %s:%s, more than the %d "
            "this SCP takes (DICOM PS3.8 D.1.1); the association is aborted",
            PDU_TYPES.get(pdu_type, f"type 0x{pdu_type:02X}"),
            length,
            requestor.address,
            requestor.port,
            self._limit,
        )
        self._refused = True
        self._dul.event_queue.put("Evt19")

    def _discard(self, socket: AssociationSocket) -> None:
        connection = socket.socket
        try:
            dropped = connection.recv(DISCARD_SIZE) if connection else b""
        except (OSError, TimeoutError):
            dropped = b""
        if not dropped:
            # The peer closed the connection (Evt17).
            socket.close()


class _GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; each connection passes the TLS gate.

    pynetdicom's own ``ssl_context`` runs the handshake in the accepting
    thread, where a peer that never finishes it would stall every other;
    the gate runs it in the connection's own thread. The association then
    owns the secured socket and closes it when it ends.
    """

    tls_gate: TlsGate

    def finish_request(self, request: Any, client_address: Any) -> None:
        secured = self.tls_gate.accept(request, client_address)
        if secured is not None:
            super().finish_request(secured, client_address)

    def shutdown(self) -> None:
        # Made with AE.make_server, so not among the AE's own servers.
        super(AssociationServer, self).shutdown()
        self.server_close()


class StoreScp:
    """A C-STORE SCP feeding an :class:`Intake`, on one host and port.

    With ``tls_gate`` every association runs over mutual TLS (DICOM PS3.15
    B.1, ITI TF-2 3.19); a peer that cannot authenticate is refused at the
    handshake and audited by the gate.
    """

    def __init__(
        self,
        intake: Intake,
        ae_title: str,
        host: str,
        port: int,
        *,
        tls_gate: TlsGate | None = None,
        max_data_set_size: int | None = None,
    ) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.address = (host, port)
        self.tls_gate = tls_gate
        # Bytes a data set may have as received, its File Meta included.
        self.max_data_set_size = max_data_set_size
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        # Each association from its connection until it ends, is logged and
        # is audited.
        self._associations: dict[int, _Association] = {}
        self._lock = threading.Lock()

    def start(self) -> tuple[str, int]:
        """Bind and serve in the background; return the bound address."""
        # pynetdicom then writes each data set to a file as its P-DATA
        # fragments arrive (DICOM PS3.8 9.3.5) instead of in memory.
        # Limitation: pynetdicom makes these files in the system's temporary
        # directory, under names that do not say who made them, not in the
        # storage's spool; those of a node killed mid-association stay there
        # (tmp*.dcm) until the system cleans it.
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Limitation: pynetdicom tells of no file it receives a data set
        # into, nor of a message it could not decode; its name for the
        # temporary file and its P-DATA decoding are replaced, process-wide,
        # by ones that note each file (_data_set_file) and abort on such a
        # message (_receive_primitive).
        dimse_messages.NamedTemporaryFile = _data_set_file
        provider: Any = DIMSEServiceProvider
        provider.receive_primitive = _receive_primitive
        ae = AE(ae_title=self.ae_title)
        # DICOM PS3.8 9.3.4: an association for another called AE title is
        # rejected (reason 7, called AE title not recognised) rather than
        # taken in under ours.
        ae.require_called_aet = True
        # A peer that sends longer PDUs all the same is aborted as each
        # association's reader (_PduLengthGate, set as the connection
        # opens) finds their length.
        # Limitation: the A-ABORT gives no reason (0; pynetdicom's AA-8
        # sends no other), not invalid-PDU-parameter value (6, DICOM PS3.8
        # Table 9-26); and the reader replaced is pynetdicom's own, private
        # one (DULServiceProvider._read_pdu_data), on this SCP's
        # associations only.
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.acse_timeout = ACSE_TIMEOUT
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # The transport closes before pynetdicom's reactor tells of an
        # abort (EVT_ABORTED), so the end is taken from EVT_CONN_CLOSE and
        # the reason from the A-ABORT seen (EVT_ACSE_RECV, EVT_ACSE_SENT).
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ACSE_RECV, self._on_acse_received),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        if self.tls_gate is None:
            self._server = ae.start_server(
                self.address, block=False, evt_handlers=handlers
            )
        else:
            server = ae.make_server(
                self.address,
                evt_handlers=handlers,
                server_class=_GatedAssociationServer,
            )
            server.tls_gate = self.tls_gate
            self._thread = threading.Thread(
                target=server.serve_forever, daemon=True, name="xdsi-store-scp"
            )
            self._thread.start()
            self._server = server
        self.address = self._server.server_address[:2]
        logger.info("C-STORE SCP %s listening on %s:%s", self.ae_title, *self.address)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _association(self, assoc: Any) -> _Association:
        with self._lock:
            return self._associations.setdefault(id(assoc), _Association())

    def _on_open(self, event: evt.Event) -> None:
        association = self._association(event.assoc)
        dul = event.assoc.dul
        dul._read_pdu_data = _PduLengthGate(  # type: ignore[method-assign]
            dul, MAX_PDU_SIZE + PDV_HEADER
        )
        _RECEIVING[event.assoc.dul] = association.received
        if self.max_data_set_size is not None:
            _MAX_DATA_SET[event.assoc.dul] = self.max_data_set_size

    def _on_requested(self, event: evt.Event) -> None:
        self._association(event.assoc).requested = True

    def _on_rejected(self, event: evt.Event) -> None:
        """Note why an A-ASSOCIATE-RQ was rejected (DICOM PS3.8 9.3.4)."""
        answer = event.assoc.acceptor.primitive
        key = (answer.result_source, answer.diagnostic)
        reason = REJECT_REASONS.get(key, f"source {key[0]}, reason {key[1]}")
        if key == (1, 7):
            called = event.assoc.requestor.primitive.called_ae_title
            reason = f"called AE title {called!r} is not this SCP's {self.ae_title!r}"
        self._association(event.assoc).rejection = reason

    def _on_released(self, event: evt.Event) -> None:
        self._association(event.assoc).released = True

    def _on_acse_received(self, event: evt.Event) -> None:
        """Note why the peer aborted, from the A-ABORT or A-P-ABORT received
        (DICOM PS3.8 Table 9-26)."""
        reason = _abort_reason(event.primitive, sent=False)
        if reason:
            self._association(event.assoc).abort = reason

    def _on_acse_sent(self, event: evt.Event) -> None:
        """Note that this SCP aborted, from the A-ABORT sent."""
        reason = _abort_reason(event.primitive, sent=True)
        if reason:
            self._association(event.assoc).abort = reason

    def _on_store(self, event: evt.Event) -> int:
        """Answer one C-STORE request (DICOM PS3.7 9.1.1)."""
        started = time.monotonic()
        request = event.request
        path = Path(event.dataset_path)
        with self._lock:
            association = self._associations.get(id(event.assoc))
            if association is None or association.closed:
                # The peer is gone and can learn of no answer: nothing is
                # kept that it would not know was.
                path.unlink(missing_ok=True)
                return PROCESSING_FAILURE
            association.storing += 1
            association.received.pop(path, None)
        try:
            accepted = self.intake.accept(
                path,
                move=True,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
            association.kept.append(accepted)
        except Refused as exc:
            logger.warning(
                "C-STORE from %s refused, status 0x%04X: %s",
                event.assoc.requestor.ae_title,
                exc.dimse_status,
                exc.reason,
            )
            association.refused.append(exc.detached())
            return exc.dimse_status
        finally:
            path.unlink(missing_ok=True)
            self._stored(event.assoc, association)
        logger.debug(
            "C-STORE %s from %s%s in %.3f s",
            accepted.sop_instance_uid,
            event.assoc.requestor.ae_title,
            " (held already)" if accepted.duplicate else "",
            time.monotonic() - started,
        )
        return SUCCESS

    def _stored(self, assoc: Any, association: _Association) -> None:
        """End the association after its last C-STORE answered, if it
        closed meanwhile."""
        with self._lock:
            association.storing -= 1
            ended = association.closed and association.storing == 0
            if ended:
                self._associations.pop(id(assoc), None)
        if ended:
            self._ended(assoc, association)

    def _on_close(self, event: evt.Event) -> None:
        """The transport closed: the association ended, once the C-STORE
        request being answered, if any, is."""
        association = self._association(event.assoc)
        if not association.abort and not association.released:
            # An A-ABORT the reactor has not taken yet.
            next_primitive = event.assoc.dul.peek_next_pdu()
            association.abort = _abort_reason(next_primitive, sent=False)
        with self._lock:
            association.closed = True
            ended = association.storing == 0
            if ended:
                self._associations.pop(id(event.assoc), None)
            left = dict(association.received)
            association.received.clear()
        _remove_received(event.assoc, left)
        if ended:
            self._ended(event.assoc, association)

    def _ended(self, assoc: Any, association: _Association) -> None:
        """Log how an association ended, and audit what it brought."""
        requestor = assoc.requestor
        peer = f"{requestor.address}:{requestor.port}"
        seconds = time.monotonic() - association.started
        stored = sum(1 for a in association.kept if not a.duplicate)
        held = len(association.kept) - stored
        if association.rejection:
            logger.warning(
                "C-STORE association from %s at %s: rejected (%s), %.3f s",
                requestor.ae_title,
                peer,
                association.rejection,
                seconds,
            )
        elif not association.requested:
            # No A-ASSOCIATE-RQ came: a port probe, or no DICOM peer.
            logger.debug(
                "connection from %s closed before any association was requested",
                peer,
            )
        elif association.released:
            logger.info(
                "C-STORE association from %s at %s: released, %d stored, "
                "%d held already, %d refused, %.3f s",
                requestor.ae_title,
                peer,
                stored,
                held,
                len(association.refused),
                seconds,
            )
        else:
            reasons = [association.abort or "the connection closed without A-RELEASE"]
            if not assoc.accepted_contexts and assoc.rejected_contexts:
                reasons.insert(0, _no_context(assoc.rejected_contexts))
            logger.warning(
                "C-STORE association from %s at %s: aborted (%s), %d stored, "
                "%d held already, %d refused, %.3f s",
                requestor.ae_title,
                peer,
                "; ".join(reasons),
                stored,
                held,
                len(association.refused),
                seconds,
            )
        if association.kept or association.refused:
            self._audit(assoc, association)

    def _audit(self, assoc: Any, association: _Association) -> None:
        """Spool the audit records of what an association brought, as it
        ends: DICOM Instances Transferred (DICOM PS3.15 A.5.3.7), one per
        patient, action C for instances new to the node, R for those held
        already, and one more with a failure outcome when some were refused.
        """
        requestor = assoc.requestor
        events = received_events(
            "C-STORE",
            association.kept,
            association.refused,
            source=audit.Endpoint(requestor.ae_title, requestor.address),
            destination=audit.Endpoint(self.ae_title, self.address[0]),
        )
        # Limitation: each instance was answered Success as it was kept;
        # when the records cannot be spooled at the association's end, the
        # instances stay (the peer may have let go of its copies) without
        # their record, and this ERROR is all that tells of it.
        if not self.intake.source.auditor.record_all(events):
            logger.error(
                "C-STORE association from %s: the audit record of %d "
                "instances kept could not be written",
                requestor.ae_title,
                len(association.kept),
            )


def _abort_reason(primitive: object, *, sent: bool) -> str:
    """Why an A-ABORT or A-P-ABORT was sent or received; DICOM PS3.8 Table
    9-26. Empty for any other primitive."""
    if isinstance(primitive, A_ABORT):
        who = "this SCP" if sent else "the peer"
        if primitive.abort_source == 2:
            who = "this SCP's upper layer" if sent else "the peer's upper layer"
        return f"A-ABORT by {who}"
    if isinstance(primitive, A_P_ABORT):
        if not primitive.provider_reason:
            # What pynetdicom's upper layer issues when the connection closed.
            return "the connection closed without A-RELEASE"
        reason = PROVIDER_ABORT_REASONS.get(
            primitive.provider_reason, f"reason {primitive.provider_reason}"
        )
        return f"A-P-ABORT by the upper layer: {reason}"
    return ""


def _no_context(rejected: list[PresentationContext]) -> str:
    """Why no presentation context was accepted, by abstract syntax;
    DICOM PS3.8 Table 9-18."""
    named = []
    for context in rejected[:NAMED_CONTEXTS]:
        why = CONTEXT_REJECTIONS.get(context.result or 0, f"result {context.result}")
        if context.result == 4:
            offered = ", ".join(UID(ts).name for ts in context.transfer_syntax)
            why = f"{why}: {offered}"
        named.append(f"{UID(context.abstract_syntax or '').name} {why}")
    if len(rejected) > NAMED_CONTEXTS:
        named.append(f"{len(rejected) - NAMED_CONTEXTS} more")
    return "no presentation context accepted: " + "; ".join(named)


def _remove_received(assoc: Any, left: dict[Path, IO[bytes]]) -> None:
    """Remove the data sets an association received and did not answer.

    pynetdicom writes each data set to a temporary file of its own as its
    P-DATA fragments arrive, and gives the file to the C-STORE handler, which
    removes it, once the last one came (DICOM PS3.8 9.3.5). A data set broken
    off mid-way, cut off by the next command, or received whole when the
    association ended before it was answered leaves a file, patient data
    included, that no handler sees.
    """
    for path, file in left.items():
        file.close()
        path.unlink(missing_ok=True)
    if left:
        logger.info(
            "C-STORE from %s: %d data sets received but not answered were "
            "removed as the association ended",
            assoc.requestor.ae_title,
            len(left),
        )

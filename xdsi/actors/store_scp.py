"""The intake's C-STORE SCP: the Storage Service Class as an SCP.

Implements DICOM PS3.4 B (Storage Service Class) for the storage SOP
Classes of DICOM PS3.4 B.5 in the transfer syntaxes of TRANSFER_SYNTAXES,
and C-ECHO (DICOM PS3.4 A). Each received data set is written to a file as
it arrives (never held whole in memory), checked, and stored once per SOP
Instance UID; a refused one is answered with the status of
``profiles/intake_refusals.toml`` and nothing is stored.

When an association ends (released, aborted or broken off) the instances it
brought are audited as DICOM Instances Transferred (DICOM PS3.15 A.5.3.7),
one record per patient, the peer's AE title as Source and this SCP as
Destination.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
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
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

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


@dataclass
class _Received:
    """What one association brought so far: instances kept, and how many
    were refused."""

    kept: list[Accepted] = field(default_factory=list)
    refused: int = 0


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
    ) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.address = (host, port)
        self.tls_gate = tls_gate
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        # What each association brought so far, kept and refused, until it
        # ends and is audited.
        self._received: dict[int, _Received] = {}
        self._received_lock = threading.Lock()

    def start(self) -> tuple[str, int]:
        """Bind and serve in the background; return the bound address."""
        # pynetdicom then writes each data set to a file as its P-DATA
        # fragments arrive (DICOM PS3.8 9.3.5) instead of in memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.ae_title)
        # DICOM PS3.8 9.3.4: an association for another called AE title is
        # rejected (reason 7, called AE title not recognised) rather than
        # taken in under ours.
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, _drop_partial_data_set),
            (evt.EVT_CONN_CLOSE, self._audit_association),
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

    def _on_store(self, event: evt.Event) -> int:
        """Answer one C-STORE request (DICOM PS3.7 9.1.1)."""
        started = time.monotonic()
        request = event.request
        path = Path(event.dataset_path)
        try:
            accepted = self.intake.accept(
                path,
                move=True,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except Refused as exc:
            logger.warning(
                "C-STORE from %s refused, status 0x%04X: %s",
                event.assoc.requestor.ae_title,
                exc.dimse_status,
                exc.reason,
            )
            self._note(event.assoc, refused=1)
            return exc.dimse_status
        finally:
            path.unlink(missing_ok=True)
        self._note(event.assoc, accepted=accepted)
        logger.debug(
            "C-STORE %s from %s%s in %.3f s",
            accepted.sop_instance_uid,
            event.assoc.requestor.ae_title,
            " (held already)" if accepted.duplicate else "",
            time.monotonic() - started,
        )
        return SUCCESS

    def _note(
        self, assoc: Any, *, accepted: Accepted | None = None, refused: int = 0
    ) -> None:
        with self._received_lock:
            received = self._received.setdefault(id(assoc), _Received())
        if accepted is not None:
            received.kept.append(accepted)
        received.refused += refused

    def _audit_association(self, event: evt.Event) -> None:
        """Spool the audit records of what an association brought, as it
        ends: DICOM Instances Transferred (DICOM PS3.15 A.5.3.7), one per
        patient, action C for instances new to the node, R for those held
        already, and one more with a failure outcome when some were refused.
        """
        with self._received_lock:
            received = self._received.pop(id(event.assoc), None)
        if received is None:
            return
        requestor = event.assoc.requestor
        events = received_events(
            "C-STORE",
            received.kept,
            received.refused,
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
                len(received.kept),
            )


def _drop_partial_data_set(event: evt.Event) -> None:
    """Remove the data set an association was receiving when it closed.

    pynetdicom writes each data set to a temporary file of its own as its
    P-DATA fragments arrive, and gives the file to the C-STORE handler, which
    removes it, once the last one came (DICOM PS3.8 9.3.5); an association
    aborted or broken off mid-way leaves a partial data set, patient data
    included, that no handler sees.
    """
    # Limitation: this reads pynetdicom's decoder state (dimse.message),
    # which it offers no event for.
    message = getattr(event.assoc.dimse, "message", None)
    file = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if file is not None:
        file.close()
    if path is not None:
        Path(path).unlink(missing_ok=True)
        logger.info(
            "C-STORE from %s broke off mid-way; its partial data set was removed",
            event.assoc.requestor.ae_title,
        )

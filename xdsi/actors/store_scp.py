"""The intake's C-STORE SCP: the Storage Service Class as an SCP.

Implements DICOM PS3.4 B (Storage Service Class) for the storage SOP
Classes of DICOM PS3.4 B.5 in the transfer syntaxes of TRANSFER_SYNTAXES,
and C-ECHO (DICOM PS3.4 A). Each received data set is written to a file as
it arrives (never held whole in memory), checked, and stored once per SOP
Instance UID; a refused one is answered with the status of
``profiles/intake_refusals.toml`` and nothing is stored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

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
from pynetdicom.transport import ThreadedAssociationServer

from xdsi.actors.intake import Intake
from xdsi.dicom.check import Refused

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


class StoreScp:
    """A C-STORE SCP feeding an :class:`Intake`, on one host and port."""

    def __init__(self, intake: Intake, ae_title: str, host: str, port: int) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.address = (host, port)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in the background; return the bound address."""
        # pynetdicom then writes each data set to a file as its P-DATA
        # fragments arrive (DICOM PS3.8 9.3.5) instead of in memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            self.address,
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self.address = self._server.server_address[:2]
        logger.info("C-STORE SCP %s listening on %s:%s", self.ae_title, *self.address)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

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
            return exc.dimse_status
        finally:
            path.unlink(missing_ok=True)
        logger.debug(
            "C-STORE %s from %s%s in %.3f s",
            accepted.sop_instance_uid,
            event.assoc.requestor.ae_title,
            " (held already)" if accepted.duplicate else "",
            time.monotonic() - started,
        )
        return SUCCESS

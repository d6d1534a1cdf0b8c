"""A storage SCP that refuses or cannot be reached: the C-STORE SCU says why
in one error, and pynetdicom's own ERROR lines stay out of the log."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import dicom_path
from xdsi.dicom.store_scu import Destination, StoreScuError, send_files


@pytest.fixture
def picky_scp() -> Iterator[Destination]:
    """A storage SCP on 127.0.0.1 that answers only to the AE title PACS."""
    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield Destination("PACS", "127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()


@pytest.fixture
def mr_only_scp() -> Iterator[Destination]:
    """A storage SCP on 127.0.0.1 that takes CT images only."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield Destination("PACS", "127.0.0.1", server.server_address[1])
    finally:
        server.shutdown()


def _pynetdicom_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR
    ]


def test_a_rejected_association_says_who_rejected_it_and_why(picky_scp, caplog):
    caplog.set_level(logging.INFO)
    path = dicom_path("study-mr", "images", "000001.dcm")
    wrong = Destination("NOTPACS", picky_scp.host, picky_scp.port)

    with pytest.raises(StoreScuError) as raised:
        send_files([path], wrong, calling_ae_title="XDSI")

    message = str(raised.value)
    assert f"NOTPACS@127.0.0.1:{picky_scp.port}" in message
    assert "Rejected (Permanent) by the DUL service-user" in message
    assert "Called AE title not recognised" in message
    assert _pynetdicom_errors(caplog) == []


def test_an_unreachable_scp_says_the_connection_was_refused(caplog):
    caplog.set_level(logging.INFO)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = dicom_path("study-mr", "images", "000001.dcm")

    with pytest.raises(StoreScuError, match="Connection refused"):
        send_files(
            [path], Destination("PACS", "127.0.0.1", port), calling_ae_title="XDSI"
        )

    assert _pynetdicom_errors(caplog) == []


def test_pynetdicom_lines_are_kept_at_debug(picky_scp, caplog):
    caplog.set_level(logging.DEBUG)
    path = dicom_path("study-mr", "images", "000001.dcm")

    with pytest.raises(StoreScuError):
        send_files(
            [path],
            Destination("OTHER", "127.0.0.1", picky_scp.port),
            calling_ae_title="XDSI",
        )

    lines = [r.getMessage() for r in caplog.records if r.name == "pynetdicom.acse"]
    assert "Association Rejected" in lines
    assert _pynetdicom_errors(caplog) == []


def test_an_scp_accepting_no_context_says_so(mr_only_scp, caplog):
    caplog.set_level(logging.INFO)
    path = dicom_path("study-mr", "images", "000001.dcm")

    with pytest.raises(StoreScuError, match="No accepted presentation contexts"):
        send_files([path], mr_only_scp, calling_ae_title="XDSI")

    assert _pynetdicom_errors(caplog) == []

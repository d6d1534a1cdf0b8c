"""The SOAP edge of an actor (xdsi.actors.soap_endpoint), served by Flask's
test client: what the operator and the peer learn when this node fails."""

import logging
import shutil
from pathlib import Path

from lxml import etree

from xdsi.actors.soap_endpoint import soap_app, transaction
from xdsi.ns import SOAP12, XDSB
from xdsi.wire import OutgoingPart, build_envelope, new_content_id, write_message

ACTION = transaction("ITI-41")["request_action"]


def test_a_request_that_cannot_be_spooled_is_logged_plainly_and_answered_receiver(
    tmp_path: Path, caplog
) -> None:
    """SOAP 1.2 Part 2 7.5.1.2: a spool this node cannot write (its folder
    a file, as a disk gone) is this node's failure, an env:Receiver Fault
    that names no path of the node; the log says what failed, at ERROR,
    without a traceback."""
    spool = tmp_path / "spool"
    app = soap_app("repository", "/xds", {"ITI-41": lambda *_: None}, spool)
    shutil.rmtree(spool)
    spool.write_bytes(b"")
    content_id = new_content_id()
    request = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest")
    content_type, _, chunks = write_message(
        build_envelope(request, ACTION),
        ACTION,
        [OutgoingPart(content_id, "text/plain", data=b"a document")],
    )

    with caplog.at_level(logging.INFO, logger="xdsi"):
        answer = app.test_client().post(
            "/xds", data=b"".join(chunks), content_type=content_type
        )

    assert answer.status_code == 500
    fault = etree.fromstring(answer.data)
    assert fault.findtext(f".//{{{SOAP12}}}Code/{{{SOAP12}}}Value") == "env:Receiver"
    assert str(tmp_path).encode() not in answer.data
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "could not be spooled" in record.getMessage()
    assert str(spool) in record.getMessage()
    assert record.exc_info is None

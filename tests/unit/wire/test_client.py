"""Tests of xdsi.wire.client against a real HTTP server on 127.0.0.1."""

import hashlib
import logging
import multiprocessing
import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lxml import etree
from werkzeug.wsgi import get_input_stream

from xdsi import tls
from xdsi.ns import RS, SOAP12, XDSB
from xdsi.wire import (
    ActionNotSupported,
    AnswerTooLarge,
    OutgoingPart,
    PeerFault,
    SoapClient,
    SoapMessage,
    SpoolError,
    TransportError,
    attachment_for,
    build_envelope,
    fault_envelope,
    read_message,
    write_message,
    xop_include,
)
from xdsi.wire.mtom import READ_SIZE

from .conftest import DICOM

pytestmark = pytest.mark.usefixtures("shared_data")

PNR = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
RETRIEVE_RESPONSE = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FILES = [
    DICOM / "study-mr" / "manifest" / "kos.dcm",
    DICOM / "study-ct" / "S2010" / "I0010.dcm",
    DICOM / "singles" / "mg-screening-jpegll__GH133.dcm",
]
DOCUMENT = f"{{{XDSB}}}Document"

StartResponse = Callable[[str, list[tuple[str, str]]], object]


class _Streamed:
    """A WSGI body that closes the request (and its spool) once it is sent."""

    def __init__(self, chunks: Iterator[bytes], request: SoapMessage) -> None:
        self._chunks = chunks
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._request.close()


def _echo_app(spool: Path, seen: list[dict[str, str]]) -> Callable:
    """A repository stand-in: sends each xdsb:Document back as ITI-43 does."""

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        seen.append({k: str(v) for k, v in environ.items() if k.isupper()})
        request = read_message(
            get_input_stream(environ), environ["CONTENT_TYPE"], spool
        )
        response = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetResponse")
        etree.SubElement(response, f"{{{RS}}}RegistryResponse", status=SUCCESS)
        parts = []
        for index, document in enumerate(request.body.iter(DOCUMENT)):
            attachment = attachment_for(document, request)
            answer = etree.SubElement(response, f"{{{XDSB}}}DocumentResponse")
            etree.SubElement(answer, f"{{{XDSB}}}RepositoryUniqueId").text = "1.2.3"
            etree.SubElement(
                answer, f"{{{XDSB}}}DocumentUniqueId"
            ).text = f"1.2.3.{index}"
            etree.SubElement(
                answer, f"{{{XDSB}}}mimeType"
            ).text = attachment.content_type
            content_id = f"answer-{index}@xdsi.test"
            etree.SubElement(answer, DOCUMENT).append(xop_include(content_id))
            parts.append(
                OutgoingPart(content_id, attachment.content_type, path=attachment.path)
            )
        envelope = build_envelope(
            response, RETRIEVE_RESPONSE, relates_to=request.message_id
        )
        content_type, length, chunks = write_message(envelope, RETRIEVE_RESPONSE, parts)
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(length))]
        )
        return _Streamed(chunks, request)

    return app


def _fixed_app(
    status: str, content_type: str, body: bytes, delay: float = 0.0
) -> Callable:
    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        get_input_stream(environ).read()
        time.sleep(delay)
        start_response(status, [("Content-Type", content_type)])
        return [body]

    return app


def _request(paths: list[Path]) -> tuple[etree._Element, list[OutgoingPart]]:
    """An ITI-41-shaped request carrying ``paths`` as MTOM parts."""
    request = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest")
    parts = []
    for index, path in enumerate(paths):
        content_id = f"doc-{index}@xdsi.test"
        document = etree.SubElement(request, DOCUMENT, id=f"Document{index:02d}")
        document.append(xop_include(content_id))
        parts.append(OutgoingPart(content_id, "application/dicom", path=path))
    return request, parts


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_mtom_round_trip_over_http_returns_identical_documents(
    serve: Callable, tmp_path: Path
) -> None:
    """SOAP 1.2 MTOM 4.3: DICOM files go out and come back byte for byte."""
    seen: list[dict[str, str]] = []
    url = serve(_echo_app(tmp_path, seen))
    client_spool = tmp_path / "client"
    client_spool.mkdir()
    request, parts = _request(FILES)

    with SoapClient(url, spool_dir=client_spool, timeout=30).call(
        PNR, request, parts=parts
    ) as response:
        assert response.action == RETRIEVE_RESPONSE
        assert response.relates_to is not None
        documents = list(response.body.iter(DOCUMENT))
        for document, source in zip(documents, FILES, strict=True):
            attachment = attachment_for(document, response)
            assert attachment.read_bytes() == source.read_bytes()
            assert attachment.sha1 == _sha1(source)
            assert attachment.size == source.stat().st_size
    assert list(client_spool.iterdir()) == []

    # RFC 9112 6.3: the request went with an exact Content-Length, unchunked.
    (environ,) = seen
    assert "HTTP_TRANSFER_ENCODING" not in environ
    assert int(environ["CONTENT_LENGTH"]) > sum(path.stat().st_size for path in FILES)
    assert environ["CONTENT_TYPE"].startswith("multipart/related")


def test_request_without_parts_is_plain_soap_xml_with_addressing(
    serve: Callable, tmp_path: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 3: wsa:To is the URL; plain SOAP 1.2."""
    seen: list[dict[str, str]] = []
    url = serve(_echo_app(tmp_path, seen))
    request = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetRequest")
    with SoapClient(url, spool_dir=tmp_path).call(
        "urn:ihe:iti:2007:RetrieveDocumentSet", request
    ) as response:
        assert response.attachments == {}
    assert seen[0]["CONTENT_TYPE"] == (
        "application/soap+xml; charset=UTF-8; "
        'action="urn:ihe:iti:2007:RetrieveDocumentSet"'
    )


def test_fault_answer_is_peer_fault_whatever_the_status(
    serve: Callable, tmp_path: Path
) -> None:
    """SOAP 1.2 Part 2 7.5.1.2: a Fault comes with 400 or 500; it is raised."""
    fault = ActionNotSupported("no such operation", detail="urn:bogus")
    url = serve(
        _fixed_app("400 Bad Request", "application/soap+xml", fault_envelope(fault))
    )
    with pytest.raises(PeerFault) as raised:
        SoapClient(url, spool_dir=tmp_path).call("urn:bogus", etree.Element("x"))
    assert raised.value.code == "env:Sender"
    assert raised.value.subcodes == ("wsa:ActionNotSupported",)
    assert raised.value.reason == "no such operation"
    assert list(tmp_path.iterdir()) == []


def test_html_error_page_is_transport_error(serve: Callable, tmp_path: Path) -> None:
    """SOAP 1.2 Part 2 7.5.2: an answer that is not SOAP is a failure."""
    url = serve(_fixed_app("502 Bad Gateway", "text/html", b"<html>proxy down</html>"))
    with pytest.raises(TransportError, match="502") as raised:
        SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x"))
    assert (raised.value.url, raised.value.status) == (url, 502)
    assert list(tmp_path.iterdir()) == []


def test_garbled_soap_answer_is_transport_error(
    serve: Callable, tmp_path: Path
) -> None:
    """SOAP 1.2 Part 1 5: an answer that is not well-formed is not SOAP."""
    url = serve(_fixed_app("200 OK", "application/soap+xml", b"<env:Envelope"))
    with pytest.raises(TransportError, match="not a SOAP 1.2 message") as raised:
        SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x"))
    assert raised.value.status == 200


def test_answers_are_asked_for_without_content_coding(
    serve: Callable, tmp_path: Path
) -> None:
    """RFC 9110 12.5.3: the client asks for the answer as it is
    (Accept-Encoding: identity), never for gzip or deflate, whose output
    could inflate past every bound on what is read."""
    seen: list[dict[str, str]] = []
    url = serve(_echo_app(tmp_path, seen))
    with SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x")):
        pass
    assert seen[0]["HTTP_ACCEPT_ENCODING"] == "identity"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_an_answer_with_a_content_coding_not_asked_for_is_transport_error(
    serve: Callable, tmp_path: Path, coding: str
) -> None:
    """RFC 9110 12.5.3: a content coding the client did not ask for is
    refused before the body is read, not decoded."""

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        get_input_stream(environ).read()
        start_response(
            "200 OK",
            [("Content-Type", "application/soap+xml"), ("Content-Encoding", coding)],
        )
        return [b"\x1f\x8b compressed, or so it says"]

    with pytest.raises(TransportError, match=f"Content-Encoding {coding}"):
        SoapClient(serve(app), spool_dir=tmp_path).call(PNR, etree.Element("x"))
    assert list(tmp_path.iterdir()) == []


def test_an_answer_announcing_more_than_max_bytes_is_refused_unread(
    serve: Callable, tmp_path: Path
) -> None:
    """An answer whose Content-Length passes ``max_bytes`` is AnswerTooLarge
    before its body is read; one within it is read."""
    seen: list[dict[str, str]] = []
    url = serve(_echo_app(tmp_path / "server", seen))
    (tmp_path / "server").mkdir()
    request, parts = _request(FILES[:1])
    client = SoapClient(url, spool_dir=tmp_path)

    with pytest.raises(AnswerTooLarge, match="the message is larger than 1000 bytes"):
        client.call(PNR, request, parts=parts, max_bytes=1000)

    assert list(tmp_path.glob("xdsi-msg-*")) == []
    request, parts = _request(FILES[:1])
    with client.call(PNR, request, parts=parts, max_bytes=1 << 20) as response:
        assert len(response.attachments) == 1


def test_refused_connection_is_transport_error(tmp_path: Path) -> None:
    """SOAP 1.2 Part 2 7.5: no HTTP exchange at all; status is None."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/soap"
    with pytest.raises(TransportError) as raised:
        SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x"))
    assert (raised.value.url, raised.value.status) == (url, None)
    assert "cannot connect (Connection refused)" in str(raised.value)
    # Nothing reached the peer, so a caller may take the request as not made.
    assert raised.value.unsent


@contextmanager
def _peer_that_hangs_up(*, reset: bool) -> Iterator[str]:
    """A TCP peer that reads each request whole and then closes without an
    answer: an orderly close, or with ``reset`` a reset; yield its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def hang_up_on_each() -> None:
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(0.5)
            try:
                while conn.recv(65536):
                    pass
            except TimeoutError:
                pass  # the whole request read; the client waits
            if reset:
                # SO_LINGER with a zero timeout: close() sends RST (RFC 793 3.5).
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            conn.close()

    threading.Thread(target=hang_up_on_each, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/soap"
    finally:
        listener.close()


def test_peer_that_closes_without_answering_is_transport_error(
    tmp_path: Path,
) -> None:
    """SOAP 1.2 Part 2 7.5: connected, then closed before any answer; said
    as such, not as a failure to connect."""
    with _peer_that_hangs_up(reset=False) as url:
        with pytest.raises(TransportError, match="closed the connection without"):
            SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x"))


def test_peer_that_resets_instead_of_answering_is_transport_error(
    tmp_path: Path,
) -> None:
    """SOAP 1.2 Part 2 7.5: connected, the request read, then the connection
    reset; said as a break-off, not as a failure to connect."""
    with _peer_that_hangs_up(reset=True) as url:
        with pytest.raises(TransportError) as raised:
            SoapClient(url, spool_dir=tmp_path).call(PNR, etree.Element("x"))
    assert "cannot connect" not in str(raised.value)
    assert "broke off before an answer (Connection reset by peer)" in str(raised.value)
    assert not raised.value.unsent


def test_slow_peer_is_transport_error(serve: Callable, tmp_path: Path) -> None:
    """SOAP 1.2 Part 2 7.5: a peer that does not answer in time."""
    url = serve(_fixed_app("200 OK", "application/soap+xml", b"", delay=2.0))
    with pytest.raises(TransportError, match="no answer within 0.3 s") as raised:
        SoapClient(url, spool_dir=tmp_path, timeout=0.3).call(PNR, etree.Element("x"))
    # The request went out: the peer may act on it all the same.
    assert not raised.value.unsent


def test_exchange_logs_one_debug_line_and_nothing_at_info(
    serve: Callable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2x Appendix V: wire detail is DEBUG only; no body at INFO."""
    url = serve(_echo_app(tmp_path, []))
    request, parts = _request(FILES[:1])
    with caplog.at_level(logging.DEBUG, logger="xdsi.wire"):
        SoapClient(url, spool_dir=tmp_path).call(PNR, request, parts=parts).close()
    records = [r for r in caplog.records if r.name.startswith("xdsi.wire")]
    assert [r.levelno for r in records] == [logging.DEBUG]
    assert url in records[0].getMessage() and "HTTP 200" in records[0].getMessage()


def test_fifty_megabyte_document_crosses_http_with_flat_memory(
    serve_process: Callable, tmp_path: Path
) -> None:
    """DESIGN principle 5: client and server both stream; memory stays flat.

    The server runs in its own process (werkzeug's development server drains
    sockets through a 10 MB buffer of its own); it reports the peak of our
    code's allocations while it read the request and streamed the answer.
    """
    source = tmp_path / "large.bin"
    with source.open("wb") as file:
        for _ in range(50):
            file.write(os.urandom(1 << 20))
    server_spool = tmp_path / "server"
    server_spool.mkdir()
    server_peaks = multiprocessing.get_context("fork").Queue()
    url = serve_process(_measured(_echo_app(server_spool, []), server_peaks))
    request, parts = _request([source])

    tracemalloc.start()
    try:
        response = SoapClient(url, spool_dir=tmp_path, timeout=60).call(
            PNR, request, parts=parts
        )
        _, client_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    with response:
        attachment = attachment_for(next(response.body.iter(DOCUMENT)), response)
        assert attachment.size == source.stat().st_size
        assert attachment.sha1 == _sha1(source)
    # A few read pieces (READ_SIZE, 1 MiB) in flight at once, whatever the
    # 50 MB document.
    limit = 8 * READ_SIZE
    assert client_peak < limit, f"the client peaked at {client_peak} bytes"
    server_peak = server_peaks.get(timeout=10)
    assert server_peak < limit, f"the server peaked at {server_peak} bytes"


def _measured(app: Callable, peaks: "multiprocessing.Queue[int]") -> Callable:
    """Trace ``app``'s allocations from the request until it has answered."""

    def measured(environ: dict, start_response: StartResponse) -> Iterator[bytes]:
        tracemalloc.start()
        body = app(environ, start_response)
        try:
            yield from body
            peaks.put(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
            body.close()

    return measured


def test_fault_element_in_answer_body_is_recognised_by_namespace() -> None:
    """SOAP 1.2 Part 1 5.4: env:Fault is the Body's only child in a fault."""
    envelope = etree.fromstring(fault_envelope(ActionNotSupported("x")))
    assert envelope.find(f"{{{SOAP12}}}Body")[0].tag == f"{{{SOAP12}}}Fault"


# A TLS alert record (RFC 8446 5.1, 6): warning, close_notify.
CLOSE_NOTIFY = b"\x15\x03\x03\x00\x02\x01\x00"


@pytest.mark.parametrize("ending", [b"", CLOSE_NOTIFY], ids=["closed", "close-notify"])
def test_a_peer_closing_the_tls_handshake_is_told_as_a_possible_refusal(
    tmp_path: Path, ending: bytes
) -> None:
    """ITI TF-2 3.19: a server that closes the connection during the
    handshake (under TLS 1.3, how a refused client certificate may show)
    is reported as such, not as OpenSSL's "EOF occurred in violation of
    protocol" or "TLS/SSL connection has been closed (EOF)", which a
    close_notify, or a bare close on some Python and OpenSSL versions,
    gives."""
    ca = tls.make_ca(tmp_path / "ca")
    node = tls.make_cert(tmp_path / "ca", ca)
    listener = socket.create_server(("127.0.0.1", 0))

    def close_each() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            connection.recv(4096)
            connection.sendall(ending)
            connection.close()

    closing = threading.Thread(target=close_each, daemon=True)
    closing.start()
    port = listener.getsockname()[1]
    context = tls.client_context(tls.tls_settings(node, ca.certificate))
    client = SoapClient(f"https://127.0.0.1:{port}/xds", ssl_context=context)
    try:
        with pytest.raises(TransportError) as failed:
            client.call("urn:test", etree.Element("{urn:test}Request"))
    finally:
        listener.close()

    assert "may not accept this node's certificate" in str(failed.value)


def _mtom_answer(path: Path) -> tuple[str, bytes]:
    """An MTOM answer carrying ``path`` as its one part, in memory."""
    envelope = build_envelope(_request([path])[0], RETRIEVE_RESPONSE)
    content_type, _, chunks = write_message(
        envelope,
        RETRIEVE_RESPONSE,
        [OutgoingPart("doc-0@xdsi.test", "application/dicom", path=path)],
        mtom=True,
    )
    return content_type, b"".join(chunks)


def test_a_spool_that_cannot_be_written_is_a_spool_error_not_the_peers(
    serve: Callable, tmp_path: Path
) -> None:
    """A part this side cannot write (its spool folder a file here) is this
    side's failure: SpoolError, not a TransportError blaming the answer."""
    content_type, body = _mtom_answer(FILES[1])
    url = serve(_fixed_app("200 OK", content_type, body))
    not_a_folder = tmp_path / "spool"
    not_a_folder.write_bytes(b"")

    with pytest.raises(SpoolError) as raised:
        SoapClient(url, spool_dir=not_a_folder, timeout=30).call(PNR, _request([])[0])

    assert not isinstance(raised.value, TransportError)
    assert str(not_a_folder) in str(raised.value)


def _call_under_file_size_limit(
    url: str, spool: str, limit: int, answers: "multiprocessing.Queue[str]"
) -> None:
    """Call ``url`` with files capped at ``limit`` bytes (RLIMIT_FSIZE), as
    a disk that fills up mid-part; put what was raised on ``answers``."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        SoapClient(url, spool_dir=Path(spool), timeout=30).call(
            PNR, _request([])[0]
        ).close()
        answers.put("no error")
    except Exception as exc:
        answers.put(f"{type(exc).__name__}: {exc}")


def test_a_part_cut_by_a_full_disk_is_a_spool_error(
    serve: Callable, tmp_path: Path
) -> None:
    """A part that cannot be written whole (EFBIG here, as ENOSPC on a full
    disk) is a SpoolError naming the file, and nothing of it stays."""
    content_type, body = _mtom_answer(FILES[1])
    url = serve(_fixed_app("200 OK", content_type, body))
    spool = tmp_path / "spool"
    spool.mkdir()
    answers = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=_call_under_file_size_limit, args=(url, str(spool), 64 * 1024, answers)
    )
    child.start()
    child.join(60)

    answer = answers.get(timeout=10)
    assert answer.startswith(f"SpoolError: cannot write {spool}"), answer
    assert "File too large" in answer
    assert list(spool.iterdir()) == []

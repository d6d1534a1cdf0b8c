"""A request body must keep coming at the node's minimum pace (xdsi.app
BODY_MIN_RATE, with BODY_SLACK seconds of pause at most): one trickled in
slower is cut off and nothing of it is kept, at the SOAP endpoints and at
STOW-RS (DICOM PS3.18 10.5); one sent steadily at the pace is taken however
long it takes; and the node's own time to answer is not limited."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from lxml import etree

from tests.integration.conftest import PATIENT
from xdsi import app, ns, wire
from xdsi.actors import soap_endpoint
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.metadata.ebrim import STATUS_APPROVED
from xdsi.metadata.stored_query import build_query

QUERY = "urn:ihe:iti:2007:RegistryStoredQuery"
PROVIDE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'

# The rule as the tests lower it: a body must come at 1,000 bytes a second
# and may pause for 2 s; the node reads it 256 bytes at a time.
RATE = 1000
SLACK = 2.0
STEP = 256
# Longer than SLACK and the watch's one-second round together.
SLOW = 4.0
# What a trickled body sends at once before it slows down: more than the
# 1 MiB that the MTOM and STOW-RS readers take at a time, so that its part
# is spooled.
AT_ONCE = 3 << 19


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    settings = (
        Settings()
        .with_storage(tmp_path_factory.mktemp("node"))
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    node = Node(settings)
    effective = node.start()
    send_message(effective.node.host, effective.registry.feed_port, build_feed(PATIENT))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(autouse=True)
def quick_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "BODY_MIN_RATE", RATE)
    monkeypatch.setattr(app, "BODY_SLACK", SLACK)
    monkeypatch.setattr(app, "BODY_STEP", STEP)


def _stow_url(settings: Settings) -> str:
    return (
        f"http://{settings.node.host}:{settings.imaging_source.port}"
        f"{settings.imaging_source.stow_path}"
    )


def _connect(url: str, content_type: str, length: int) -> socket.socket:
    """Open a connection and send the head of a POST of ``length`` bytes."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Connection: close\r\n\r\n".encode("ascii")
    )
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer, read to the end."""
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    assert received, "the connection was closed without an answer"
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            assert len(body) == int(value), "the answer was cut short"
    return int(head.split(b" ", 2)[1]), body


def _trickled_until_closed(sock: socket.socket, rest: bytes, within: float) -> bool:
    """Send ``rest`` a byte every quarter second, 4 bytes a second; whether
    the node closed the connection before ``within`` seconds."""
    deadline = time.monotonic() + within
    for byte in rest:
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
        sock.settimeout(0.25)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True
        assert answer == b"", f"the node answered a body it never had: {answer!r}"
        return True
    return False


def _sent_steadily(sock: socket.socket, body: bytes, per_second: int) -> float:
    """Send ``body`` in tenths of ``per_second`` bytes; the seconds it took."""
    started = time.monotonic()
    piece = per_second // 10
    for offset in range(0, len(body), piece):
        sock.sendall(body[offset : offset + piece])
        time.sleep(0.1)
    return time.monotonic() - started


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kept(spool: Path) -> list[Path]:
    """What the spool holds; a listing that meets a file or folder being
    removed is made again."""
    while True:
        try:
            return list(spool.rglob("*")) if spool.exists() else []
        except FileNotFoundError:
            continue


def _pace_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING
        and "fell behind the minimum pace" in r.getMessage()
    ]


def _query_envelope(padding: int = 0) -> bytes:
    """An ITI-18 FindDocuments request, with ``padding`` spaces after the
    envelope (XML 1.0 2.1 lets whitespace follow the document element)."""
    request = build_query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": PATIENT,
            "$XDSDocumentEntryStatus": [STATUS_APPROVED],
        },
    )
    return etree.tostring(wire.build_envelope(request, QUERY)) + b" " * padding


def _query_status(status: int, body: bytes) -> str:
    assert status == 200, body
    response = etree.fromstring(body).find(f".//{{{ns.QUERY}}}AdhocQueryResponse")
    assert response is not None, body
    return response.get("status", "").rsplit(":", 1)[-1]


def test_a_provide_and_register_trickling_in_is_cut_off_and_nothing_kept(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI-41 whose document part stops coming at the pace: the connection is
    closed, the spooled part removed, and one WARNING says so, naming no
    patient."""
    caplog.set_level(logging.INFO)
    request = etree.Element(f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest")
    etree.SubElement(request, f"{{{ns.RIM}}}ExternalIdentifier", value=PATIENT)
    part = wire.OutgoingPart("doc@xdsi", "text/plain", data=bytes(2 << 20))
    content_type, _, chunks = wire.write_message(
        wire.build_envelope(request, PROVIDE), PROVIDE, [part]
    )
    whole = b"".join(chunks)
    spool = node.settings.storage / "spool" / "repository"

    with _connect(node.settings.url("repository"), content_type, len(whole)) as sock:
        sock.sendall(whole[:AT_ONCE])
        assert _wait(lambda: any(p.is_file() for p in _kept(spool)))
        closed = _trickled_until_closed(sock, whole[AT_ONCE:], within=SLACK + 8)

    assert closed
    assert _wait(lambda: _kept(spool) == []), _kept(spool)
    assert len(_pace_warnings(caplog)) == 1
    assert PATIENT.split("^")[0] not in caplog.text


def test_a_stow_rs_body_trickling_in_is_cut_off_and_nothing_kept(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.18 10.5: STOW-RS whose part stops coming at the pace: the
    connection is closed and the part's spool file removed."""
    caplog.set_level(logging.INFO)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + bytes(2 << 20)
    body += b"\r\n--b--\r\n"
    spool = node.settings.storage / "imaging-source" / ".spool"

    with _connect(_stow_url(node.settings), STOW_TYPE, len(body)) as sock:
        sock.sendall(body[:AT_ONCE])
        assert _wait(lambda: _kept(spool) != [])
        closed = _trickled_until_closed(sock, body[AT_ONCE:], within=SLACK + 8)

    assert closed
    assert _wait(lambda: _kept(spool) == []), _kept(spool)
    assert len(_pace_warnings(caplog)) == 1


def test_a_body_sent_steadily_at_the_pace_is_taken_however_long(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """An ITI-18 request whose body comes at four times the pace takes longer
    than the slack the body starts with, and is answered."""
    body = _query_envelope(padding=4 * RATE * 4)

    with _connect(
        node.settings.url("registry"), "application/soap+xml", len(body)
    ) as sock:
        took = _sent_steadily(sock, body, 4 * RATE)
        answer = _answer(sock)

    assert took > 2 * SLACK
    assert _query_status(*answer) == "Success"
    assert _pace_warnings(caplog) == []


def test_an_answer_slow_to_come_is_not_cut_off(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry takes longer over an ITI-18 query than a body may pause:
    the rule ended with the body, and the answer comes."""
    assert node.services is not None
    registry = node.services.registry
    query = registry.query

    def slow_query(*args: Any) -> Any:
        time.sleep(SLOW)
        return query(*args)

    monkeypatch.setattr(registry, "query", slow_query)

    _assert_query_answered(node)


def test_an_answer_slow_to_stream_is_not_cut_off(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer to an ITI-18 query streams out slower than a body may
    pause (as a large RAD-69 answer may): it is sent whole."""
    streamed = soap_endpoint._streamed

    def slowly(chunks: Iterator[bytes], cleanup: Any) -> Iterator[bytes]:
        # The status line, the headers and a byte go out, then a pause.
        for chunk in streamed(chunks, cleanup):
            yield chunk[:1]
            time.sleep(SLOW)
            yield chunk[1:]

    monkeypatch.setattr(soap_endpoint, "_streamed", slowly)

    _assert_query_answered(node)


def test_a_stow_rs_answer_slow_to_come_is_not_cut_off(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.18 10.5.3: the intake takes longer over a part than a body
    may pause; the Store Instances Response still comes (a Failed SOP
    Sequence here, as the part is no DICOM data set)."""
    assert node.services is not None
    intake = node.services.intake
    accept = intake.accept

    def slow_accept(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW)
        return accept(*args, **kwargs)

    monkeypatch.setattr(intake, "accept", slow_accept)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\nnot DICOM\r\n--b--\r\n"

    with _connect(_stow_url(node.settings), STOW_TYPE, len(body)) as sock:
        sock.sendall(body)
        status, answer = _answer(sock)

    assert status == 409, answer
    assert b"00081198" in answer


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        # Answered before the body is read: an action this endpoint does not
        # serve is found in the envelope's head; a GET takes no body at all.
        ("dicomweb-get", ""),
        ("registry-wrong-type", "text/plain"),
    ],
)
def test_a_peer_still_sending_after_its_answer_is_cut_off(
    node: Node, monkeypatch: pytest.MonkeyPatch, path: str, content_type: str
) -> None:
    """An answer sent before the request's body was read (an error, a
    413) does not leave the connection to the peer: what it still sends is
    read and dropped for DRAIN_DEADLINE seconds, then the connection is
    shut down, however steadily the peer trickles."""
    monkeypatch.setattr(app, "DRAIN_DEADLINE", 1.0)
    settings = node.settings
    if path == "dicomweb-get":
        url = f"{settings.dicomweb_url}/studies"
        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        sock.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Length: 30000000\r\n\r\n".encode("ascii")
        )
    else:
        sock = _connect(settings.url("registry"), content_type, 30_000_000)
    with sock:
        sock.sendall(b"x" * 1000)
        received = bytearray()
        sock.settimeout(5)
        while not _whole_answer(bytes(received)):
            chunk = sock.recv(65536)
            # The answer must be whole before the connection closes.
            assert chunk, bytes(received[:300])
            received += chunk
        started = time.monotonic()
        closed = _trickled_until_closed(sock, b"x" * 200, within=20)
    assert received.startswith(b"HTTP/1.1 ")
    assert closed
    assert time.monotonic() - started < 10


def _whole_answer(received: bytes) -> bool:
    """Whether ``received`` holds an answer's head and all its body."""
    head, found, body = received.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value:
            # RFC 9112 7.1: the last chunk, of size 0, and no trailer.
            return body.endswith(b"0\r\n\r\n")
    return False


def _assert_query_answered(node: Node) -> None:
    """Send an ITI-18 query at once; its answer must come, Success."""
    body = _query_envelope()
    with _connect(
        node.settings.url("registry"), "application/soap+xml", len(body)
    ) as sock:
        sock.sendall(body)
        assert _query_status(*_answer(sock)) == "Success"

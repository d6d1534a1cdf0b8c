"""A request body larger than [node] max_request_size is refused with HTTP
413 (RFC 9110 15.5.14) before it fills the spool: a SOAP 1.2 Sender Fault at
the SOAP endpoints (SOAP 1.2 Part 2 7.5.1), a plain 413 at STOW-RS (DICOM
PS3.18 8.6.2), whether the size is announced (Content-Length) or only sent
(chunked). Nothing of it is kept, and the node goes on serving."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from lxml import etree

from tests.integration.conftest import PATIENT
from xdsi import ns, wire
from xdsi.actors.document_source import DocumentSource
from xdsi.app import Node
from xdsi.config import MIN_REQUEST_SIZE, Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message

LIMIT = MIN_REQUEST_SIZE
PROVIDE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Settings]:
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(settings, node=replace(settings.node, max_request_size=LIMIT))
    running = Node(settings)
    effective = running.start()
    send_message(effective.node.host, effective.registry.feed_port, build_feed(PATIENT))
    try:
        yield effective
    finally:
        running.stop()


def _exchange(url: str, head: str, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send a request head (and body) over a bare socket; the status, head
    and body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode("ascii") + body)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    answer_head, _, answer_body = bytes(received).partition(b"\r\n\r\n")
    return int(answer_head.split(b" ", 2)[1]), answer_head, answer_body


def _head(url: str, content_type: str, framing: str) -> str:
    parts = urlsplit(url)
    return (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: {content_type}\r\n{framing}\r\nConnection: close\r\n\r\n"
    )


def _fault(head: bytes, body: bytes) -> tuple[str, str]:
    """The SOAP 1.2 fault code and reason of an answer."""
    assert b"application/soap+xml" in head
    if b"Transfer-Encoding: chunked" in head:
        body = _dechunked(body)
    envelope = etree.fromstring(body)
    code = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    reason = envelope.find(f".//{{{ns.SOAP12}}}Reason/{{{ns.SOAP12}}}Text")
    assert code is not None and reason is not None
    return code.text or "", reason.text or ""


def _dechunked(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


def _spooled(settings: Settings) -> list[Path]:
    spool = settings.storage / "spool"
    return [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []


def test_an_announced_body_over_the_limit_gets_a_sender_fault_413(
    node: Settings,
) -> None:
    """The Content-Length alone says the body is too large: the answer comes
    before any of it is read."""
    status, head, body = _exchange(
        node.url("repository"),
        _head(
            node.url("repository"),
            'multipart/related; type="application/xop+xml"; boundary=b',
            f"Content-Length: {LIMIT + 1}",
        ),
    )

    assert status == 413
    code, reason = _fault(head, body)
    assert code == "env:Sender"
    assert f"{LIMIT} bytes" in reason and "max_request_size" in reason


def test_a_chunked_body_over_the_limit_gets_a_sender_fault_413(
    node: Settings,
) -> None:
    """A chunked ITI-41 that grows past the limit is refused once it does;
    what it spooled is removed, and the repository keeps nothing."""
    envelope = wire.build_envelope(
        etree.Element(f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest"), PROVIDE
    )
    part = wire.OutgoingPart("doc@xdsi", "text/plain", data=bytes(LIMIT))
    content_type, _, chunks = wire.write_message(envelope, PROVIDE, [part])
    whole = b"".join(chunks)
    # One chunk, no last-chunk: the node stops reading at the limit.
    framed = f"{len(whole):x}\r\n".encode("ascii") + whole[: LIMIT + 1]

    status, head, body = _exchange(
        node.url("repository"),
        _head(node.url("repository"), content_type, "Transfer-Encoding: chunked"),
        framed,
    )

    assert status == 413
    assert _fault(head, body)[0] == "env:Sender"
    assert _spooled(node) == []


def test_stow_rs_over_the_limit_gets_413(node: Settings) -> None:
    """DICOM PS3.18 10.5: STOW-RS answers a too large body with a status."""
    url = (
        f"http://{node.node.host}:{node.imaging_source.port}"
        f"{node.imaging_source.stow_path}"
    )
    content_type = 'multipart/related; type="application/dicom"; boundary=b'
    head = _head(url, content_type, "Transfer-Encoding: chunked")
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + bytes(LIMIT)
    framed = f"{len(body) + 64:x}\r\n".encode("ascii") + body[: LIMIT + 1]

    status, answer_head, answer_body = _exchange(url, head, framed)

    assert status == 413, answer_body
    assert b"max_request_size" in answer_body
    assert not any((node.storage / "imaging-source" / ".spool").iterdir())


def test_a_body_under_the_limit_is_taken(node: Settings, tmp_path: Path) -> None:
    """The limit refuses only what exceeds it: an ITI-41 just under it is
    registered."""
    document = tmp_path / "report.txt"
    document.write_bytes(b"x" * (LIMIT - 64 * 1024))
    source = DocumentSource(node, tmp_path / "source-spool")

    result = source.submit([document], PATIENT)

    assert len(result.document_unique_ids) == 1

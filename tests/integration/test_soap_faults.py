"""Bad input at every SOAP endpoint gets a SOAP 1.2 Fault, never a traceback
or an HTML page (SOAP 1.2 Part 1 5.4, Part 2 7.5.1; WS-Addressing 1.0 SOAP
Binding 6)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from lxml import etree

from tests.conftest import assert_valid
from tests.integration.conftest import RunningNode, assert_valid_envelope
from xdsi import app, ns
from xdsi.actors import soap_endpoint

QUERY = "urn:ihe:iti:2007:RegistryStoredQuery"
PROVIDE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"

MESSAGE_ID = "urn:uuid:0a3b2f9e-1d2c-4b5a-9e8f-7a6b5c4d3e2f"
SOAP12 = (
    '<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:wsa="http://www.w3.org/2005/08/addressing"><env:Header>'
    "<wsa:Action>{action}</wsa:Action><wsa:MessageID>"
    + MESSAGE_ID
    + "</wsa:MessageID></env:Header><env:Body>{body}</env:Body></env:Envelope>"
)
QUERY_BODY = (
    '<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:'
    'query:3.0" xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">'
    '<query:ResponseOption returnType="ObjectRef"/><rim:AdhocQuery '
    'id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"/></query:AdhocQueryRequest>'
)

MUST_UNDERSTAND_BLOCK = (
    '<x:Security xmlns:x="urn:example:security" env:mustUnderstand="true"/>'
)

BOUNDARY = "xdsi-fault-boundary"
MTOM = (
    f'multipart/related; type="application/xop+xml"; boundary="{BOUNDARY}"; '
    'start="<root@xdsi.test>"; start-info="application/soap+xml"'
)
# An MTOM package whose root part is complete and well-formed, then a part
# with the headers given and "DICM" as its body, then the close delimiter.
MTOM_PACKAGE = (
    f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
    'type="application/soap+xml"\r\nContent-ID: <root@xdsi.test>\r\n\r\n'
    + SOAP12.format(action=QUERY, body=QUERY_BODY)
    + f"\r\n--{BOUNDARY}\r\n{{headers}}\r\nDICM\r\n--{BOUNDARY}--\r\n"
)

CASES = {
    "malformed-xml": (
        SOAP12.format(action=QUERY, body="<unclosed>"),
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "soap-1.1-envelope": (
        '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
        f"<soap:Body>{QUERY_BODY}</soap:Body></soap:Envelope>",
        "text/xml",
        "env:VersionMismatch",
        None,
    ),
    "unknown-action": (
        SOAP12.format(action="urn:example:NoSuchAction", body=QUERY_BODY),
        "application/soap+xml",
        "env:Sender",
        "ActionNotSupported",
    ),
    "no-action": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            f"<wsa:Action>{QUERY}</wsa:Action>", ""
        ),
        "application/soap+xml",
        "env:Sender",
        "MessageAddressingHeaderRequired",
    ),
    "xxe-file-entity": (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        + SOAP12.format(action=QUERY, body="<d>&x;</d>"),
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "billion-laughs": (
        '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        + SOAP12.format(action=QUERY, body="<l>&b;</l>"),
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "not-xml-at-all": ("GET me a page", "application/soap+xml", "env:Sender", None),
    "unknown-must-understand-header": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            "</env:Header>", MUST_UNDERSTAND_BLOCK + "</env:Header>"
        ),
        "application/soap+xml",
        "env:MustUnderstand",
        None,
    ),
    "two-different-actions": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            "</env:Header>", "<wsa:Action>urn:example:Other</wsa:Action></env:Header>"
        ),
        "application/soap+xml",
        "env:Sender",
        "InvalidAddressingHeader",
    ),
    "wrong-media-type": (
        SOAP12.format(action=QUERY, body=QUERY_BODY),
        "application/json",
        "env:Sender",
        None,
    ),
    "media-type-action-differs": (
        SOAP12.format(action=QUERY, body=QUERY_BODY),
        'application/soap+xml; action="urn:example:Other"',
        "env:Sender",
        "InvalidAddressingHeader",
    ),
    "two-body-elements": (
        SOAP12.format(action=QUERY, body=QUERY_BODY + QUERY_BODY),
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "no-message-id": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            f"<wsa:MessageID>{MESSAGE_ID}</wsa:MessageID>", MUST_UNDERSTAND_BLOCK
        ),
        "application/soap+xml",
        "env:MustUnderstand",
        None,
    ),
    "header-after-body": (
        SOAP12.format(action=QUERY, body=QUERY_BODY)
        .replace("<env:Header>", "<env:Body>" + QUERY_BODY + "</env:Body><env:Header>")
        .replace(f"</env:Header><env:Body>{QUERY_BODY}</env:Body>", "</env:Header>"),
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "trailing-garbage": (
        SOAP12.format(action=QUERY, body=QUERY_BODY) + "<garbage",
        "application/soap+xml",
        "env:Sender",
        None,
    ),
    "mtom-no-closing-boundary": (
        MTOM_PACKAGE.format(headers="Content-ID: <a@xdsi.test>\r\n").removesuffix(
            f"--{BOUNDARY}--\r\n"
        ),
        MTOM,
        "env:Sender",
        None,
    ),
    "mtom-part-without-content-id": (
        MTOM_PACKAGE.format(headers="Content-Type: application/dicom\r\n"),
        MTOM,
        "env:Sender",
        None,
    ),
    "mtom-duplicate-content-ids": (
        MTOM_PACKAGE.format(
            headers="Content-ID: <a@xdsi.test>\r\n\r\nDICM\r\n"
            f"--{BOUNDARY}\r\nContent-ID: <a@xdsi.test>\r\n"
        ),
        MTOM,
        "env:Sender",
        None,
    ),
    "mtom-bad-base64": (
        MTOM_PACKAGE.format(
            headers="Content-ID: <a@xdsi.test>\r\nContent-Transfer-Encoding: base64\r\n"
        ).replace("DICM", "!!!!"),
        MTOM,
        "env:Sender",
        None,
    ),
    "mtom-too-many-part-headers": (
        MTOM_PACKAGE.format(
            headers="Content-ID: <a@xdsi.test>\r\n" + "X-N: n\r\n" * 40
        ),
        MTOM,
        "env:Sender",
        None,
    ),
}

# The cases whose wsa:MessageID can be read, even where the envelope or the
# package around it is broken; the others are refused before their envelope
# is read, declare a DTD, or have no MessageID.
MESSAGE_ID_READ = {
    "header-after-body",
    "malformed-xml",
    "media-type-action-differs",
    "mtom-bad-base64",
    "mtom-duplicate-content-ids",
    "mtom-no-closing-boundary",
    "mtom-part-without-content-id",
    "mtom-too-many-part-headers",
    "no-action",
    "trailing-garbage",
    "two-body-elements",
    "two-different-actions",
    "unknown-action",
    "unknown-must-understand-header",
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("actor", ["registry", "repository", "imaging_source"])
def test_bad_request_gets_a_soap_fault(shared_node: RunningNode, actor: str, case: str):
    """Every endpoint answers bad input with a schema-valid SOAP 1.2 Fault."""
    body, content_type, code, subcode = CASES[case]
    answer = requests.post(
        shared_node.settings.url(actor),
        data=body.encode(),
        headers={"Content-Type": content_type},
        timeout=30,
    )
    assert answer.status_code in (400, 415, 500)
    assert answer.headers["Content-Type"].startswith("application/soap+xml")
    assert b"Traceback" not in answer.content and b"<html" not in answer.content.lower()
    assert b"root:" not in answer.content
    envelope = etree.fromstring(answer.content)
    assert_valid(envelope, "w3/soap-envelope.xsd")
    value = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == code
    if subcode:
        sub = envelope.find(f".//{{{ns.SOAP12}}}Subcode/{{{ns.SOAP12}}}Value")
        assert sub is not None and sub.text.endswith(subcode)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("actor", ["registry", "repository", "imaging_source"])
def test_a_fault_relates_to_the_message_id_it_could_read(
    shared_node: RunningNode, actor: str, case: str, tmp_path: Path
):
    """WS-Addressing 1.0 Core 3.4, SOAP Binding 6: a Fault relates to the
    wsa:MessageID of the message in error whenever that could be read, even
    where reading the envelope failed; otherwise it relates to nothing."""
    body, content_type, _, _ = CASES[case]

    answer = requests.post(
        shared_node.settings.url(actor),
        data=body.encode(),
        headers={"Content-Type": content_type},
        timeout=30,
    )

    assert_valid_envelope(answer.headers["Content-Type"], answer.content, tmp_path)
    envelope = etree.fromstring(answer.content)
    relates_to = envelope.findall(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}RelatesTo")
    expected = [MESSAGE_ID] if case in MESSAGE_ID_READ else []
    assert [r.text for r in relates_to] == expected


def test_the_fault_for_an_error_of_the_node_relates_to_the_request(
    shared_node: RunningNode, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """WS-Addressing 1.0 SOAP Binding 6, SOAP 1.2 Part 1 5.4.6: the Receiver
    Fault for an error no handler caught relates to the request read."""

    def fail(*_: object) -> None:
        raise RuntimeError("the document store is gone")

    monkeypatch.setattr(shared_node.services.repository, "retrieve", fail)
    body = SOAP12.format(
        action=RETRIEVE,
        body='<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="urn:ihe:iti:xds-b:2007">'
        "<xdsb:DocumentRequest><xdsb:RepositoryUniqueId>1.2.3</xdsb:RepositoryUniqueId>"
        "<xdsb:DocumentUniqueId>1.2.3.4</xdsb:DocumentUniqueId></xdsb:DocumentRequest>"
        "</xdsb:RetrieveDocumentSetRequest>",
    )

    answer = requests.post(
        shared_node.settings.url("repository"),
        data=body.encode(),
        headers={"Content-Type": "application/soap+xml"},
        timeout=30,
    )

    assert answer.status_code == 500
    assert_valid_envelope(answer.headers["Content-Type"], answer.content, tmp_path)
    envelope = etree.fromstring(answer.content)
    value = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == "env:Receiver"
    relates_to = envelope.findall(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}RelatesTo")
    assert [r.text for r in relates_to] == [MESSAGE_ID]


@pytest.mark.parametrize("method", ["GET", "PUT", "OPTIONS"])
def test_other_http_requests_get_a_soap_fault(shared_node: RunningNode, method: str):
    """Even a browser's GET or a wrong path gets SOAP, not an HTML error page."""
    for url in (
        shared_node.settings.url("registry"),
        shared_node.settings.url("registry") + "/nowhere",
    ):
        answer = requests.request(method, url, timeout=30)
        assert answer.status_code >= 400
        assert answer.headers["Content-Type"].startswith("application/soap+xml")
        etree.fromstring(answer.content)


def test_must_understand_fault_names_each_block_not_understood(
    shared_node: RunningNode,
):
    """SOAP 1.2 Part 1 5.4.8: env:NotUnderstood names the refused block."""
    body = SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
        "</env:Header>", MUST_UNDERSTAND_BLOCK + "</env:Header>"
    )
    answer = requests.post(
        shared_node.settings.url("registry"),
        data=body.encode(),
        headers={"Content-Type": "application/soap+xml"},
        timeout=30,
    )

    assert answer.status_code == 500
    envelope = etree.fromstring(answer.content)
    (block,) = envelope.findall(f"{{{ns.SOAP12}}}Header/{{{ns.SOAP12}}}NotUnderstood")
    prefix, local = block.get("qname").split(":")
    assert (block.nsmap[prefix], local) == ("urn:example:security", "Security")


def test_must_understand_block_for_another_role_is_ignored(shared_node: RunningNode):
    """SOAP 1.2 Part 1 5.2.2: a block for a role this node does not play."""
    block = MUST_UNDERSTAND_BLOCK.replace(
        "/>", ' env:role="http://www.w3.org/2003/05/soap-envelope/role/none"/>'
    )
    body = SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
        "</env:Header>", block + "</env:Header>"
    )
    answer = requests.post(
        shared_node.settings.url("registry"),
        data=body.encode(),
        headers={"Content-Type": "application/soap+xml"},
        timeout=30,
    )

    assert answer.status_code == 200
    assert b"env:Fault" not in answer.content and b":Fault " not in answer.content


RAW_REQUESTS = {
    "garbled-request-line": b"GARBAGE\r\n\r\n",
    "unknown-http-version": b"POST / HTTP/9.9\r\nHost: x\r\n\r\n",
    "oversized-header": b"POST / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    "too-many-headers": b"POST / HTTP/1.1\r\n"
    + b"".join(b"X-%d: 1\r\n" % n for n in range(200))
    + b"\r\n",
    # RFC 9112 6.3, 6.1 and 5.1: heads that could be read to end their body
    # in two places (request smuggling behind a proxy) are refused.
    "two-content-lengths": b"POST /xds/registry HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4\r\nContent-Length: 10\r\n\r\nabcd",
    "content-length-not-a-number": b"POST /xds/registry HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4x\r\n\r\nabcd",
    "both-framings": b"POST /xds/registry HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "field-line-without-colon": b"POST /xds/registry HTTP/1.1\r\nHost: x\r\n"
    b"NoColonHere\r\nContent-Length: 4\r\n\r\nabcd",
}


@pytest.mark.parametrize("case", sorted(RAW_REQUESTS))
def test_request_the_http_layer_refuses_gets_a_soap_fault(
    shared_node: RunningNode, case: str
):
    """SOAP 1.2 Part 2 7.5.1.2: even a request HTTP cannot parse gets SOAP."""
    host = shared_node.settings.node.host
    with socket.create_connection(
        (host, shared_node.settings.registry.port), timeout=30
    ) as sock:
        sock.sendall(RAW_REQUESTS[case])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    # Even a one-word request line, which reads as HTTP/0.9, gets a status
    # line and headers.
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.")
    assert head.split(b" ")[1][:1] in (b"4", b"5")
    assert b"content-type: application/soap+xml" in head.lower()
    envelope = etree.fromstring(body)
    assert_valid(envelope, "w3/soap-envelope.xsd")
    value = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == "env:Sender"


# Bytes no HTTP parser takes, each with a name past its first hundred bytes
# that no log line above DEBUG may quote, and what the log line quotes first.
SECRET = b"DOE^JANE^PID-4711"
GARBAGE = {
    # A TLS ClientHello sent to a plain HTTP port: record and handshake
    # headers, then bytes as random as a client's, none of them white space
    # once decoded as ISO 8859-1, so that the request line is one word.
    "tls-client-hello": (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        + bytes(range(0xA1, 0x100))
        + SECRET
        + b"\r\n\r\n",
        r"\x16\x03\x01\x02",
    ),
    "overlong-request-line": (
        b"POST /" + b"a" * 200 + b"?patient=" + SECRET + b" x HTTP/1.1\r\n\r\n",
        "Bad request syntax ('POST /aaaa",
    ),
    # A DICOMweb search with an unencoded space: the request line has four
    # words, and its query string carries the patient's name.
    "query-with-a-space": (
        b"GET /dicomweb/studies?PatientName="
        + SECRET.replace(b"^", b" ")
        + b"&PatientBirthDate=19700101 HTTP/1.1\r\n\r\n",
        "Bad request syntax ('GET /dicomweb/studies?... (query left out)",
    ),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_bytes_http_cannot_parse_are_logged_at_info_as_an_escaped_prefix(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """SOAP 1.2 Part 2 7.5.1.2: a request HTTP cannot parse is the peer's
    fault, logged at INFO, not ERROR; no log line above DEBUG quotes more of
    it than a short prefix, escaped, without its query string."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="werkzeug")
    data, quoted = GARBAGE[case]
    address = (shared_node.settings.node.host, shared_node.settings.registry.port)

    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(data)
        answer = _read_all(sock)

    assert answer.startswith(b"HTTP/1.1 400")
    # The Fault quotes no more of the request than the log does.
    assert SECRET not in answer and b"PatientName" not in answer
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    http = [r for r in shown if r.name in ("werkzeug", "xdsi.app")]
    assert [r.getMessage() for r in http if r.levelno > logging.INFO] == []
    (refused,) = [r.getMessage() for r in http if "HTTP peer" in r.getMessage()]
    assert quoted in refused
    assert refused.isascii() and refused.isprintable()
    for record in shown:
        assert SECRET.decode() not in record.getMessage()
        assert "PatientName" not in record.getMessage()


def _raw_post(
    url: str, content_type: str, body: bytes, *, answer: bool = True
) -> bytes:
    """POST ``body`` as written, chunked framing included, over a bare socket.

    Without ``answer`` the socket is closed right after sending, as a peer
    that goes away does.
    """
    parts = urlsplit(url)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        if not answer:
            return b""
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return bytes(received)


def _fault_code(response: bytes) -> tuple[int, str]:
    """The HTTP status and SOAP 1.2 fault code of a raw HTTP response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/soap+xml" in head
    if b"Transfer-Encoding: chunked" in head:
        body = _dechunk(body)
    value = etree.fromstring(body).find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None
    return status, value.text or ""


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return bytes(out)


def _chunked(data: bytes) -> bytes:
    return f"{len(data):X}\r\n".encode("ascii") + data + b"\r\n"


def _mtom(boundary: str, tail: bytes = b"") -> tuple[str, bytes]:
    """An ITI-41 MTOM/XOP package whose root is a Provide and Register
    request; ``tail`` follows the root part in place of the closing
    boundary when given."""
    envelope = SOAP12.format(
        action=PROVIDE,
        body='<xdsb:ProvideAndRegisterDocumentSetRequest xmlns:xdsb="urn:ihe:iti:'
        'xds-b:2007"/>',
    )
    root = (
        f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
        'type="application/soap+xml"\r\nContent-ID: <root@xdsi>\r\n\r\n'
        f"{envelope}\r\n"
    ).encode("ascii")
    content_type = (
        f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
        'start="<root@xdsi>"; start-info="application/soap+xml"'
    )
    return content_type, root + (tail or f"--{boundary}--\r\n".encode("ascii"))


def _xdsi_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR or (r.exc_info and r.name.startswith("xdsi"))
    ]


def test_an_overlong_mtom_boundary_is_the_senders_fault(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 2046 5.1.1, SOAP 1.2 Part 2 7.5.1.2: a boundary the parser cannot
    take is env:Sender with HTTP 400, logged at INFO without a traceback."""
    caplog.set_level(logging.INFO, logger="xdsi")
    content_type, body = _mtom("b" * 300)

    answer = requests.post(
        shared_node.settings.url("repository"),
        data=body,
        headers={"Content-Type": content_type},
        timeout=30,
    )

    assert answer.status_code == 400
    value = etree.fromstring(answer.content).find(
        f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value"
    )
    assert value is not None and value.text == "env:Sender"
    assert b"boundary" in answer.content
    assert _xdsi_errors(caplog) == []
    assert any(
        r.levelno == logging.INFO and "boundary" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("actor", ["registry", "repository", "imaging_source"])
def test_garbled_chunked_framing_is_the_senders_fault(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture, actor: str
) -> None:
    """RFC 9112 7.1, SOAP 1.2 Part 2 7.5.1.2: a chunk size that is no hex
    number is env:Sender with HTTP 400, not an internal error."""
    caplog.set_level(logging.INFO, logger="xdsi")
    envelope = SOAP12.format(action=QUERY, body=QUERY_BODY).encode()

    response = _raw_post(
        shared_node.settings.url(actor),
        "application/soap+xml",
        b"ZZZ\r\n" + envelope + b"\r\n0\r\n\r\n",
    )

    assert _fault_code(response) == (400, "env:Sender")
    assert b"chunked" in response
    assert _xdsi_errors(caplog) == []


def test_a_peer_dropping_an_upload_leaves_nothing_behind(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.41.4.1.3, RFC 9112 7.1: an ITI-41 upload cut off midway is
    logged at INFO as the peer's doing; its spooled parts are removed."""
    caplog.set_level(logging.INFO, logger="xdsi")
    boundary = "xdsi-drop"
    part = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n"
        "Content-ID: <doc@xdsi>\r\n\r\n"
    ).encode("ascii") + bytes(200_000)
    content_type, body = _mtom(boundary, tail=part)
    spool = shared_node.settings.storage / "spool" / "repository"

    _raw_post(
        shared_node.settings.url("repository"),
        content_type,
        _chunked(body),
        answer=False,
    )

    deadline = time.monotonic() + 30
    while not any("broke off" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the server never noticed"
        time.sleep(0.1)
    assert _xdsi_errors(caplog) == []
    assert list(spool.glob("msg@*")) == []


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_connections_beyond_the_limit_get_503_and_the_node_recovers(
    running_node: RunningNode, monkeypatch: pytest.MonkeyPatch
):
    """SOAP 1.2 Part 2 7.5.1.2: peers that open connections and send nothing
    hold at most the listener's limit of threads; one more connection is
    answered at once with 503 and a Receiver Fault, and once they go the
    node serves again."""
    monkeypatch.setattr(app._HttpServer, "max_connections", 2)
    address = (running_node.settings.node.host, running_node.settings.registry.port)
    idle = [socket.create_connection(address, timeout=30) for _ in range(2)]
    try:
        time.sleep(0.5)
        with socket.create_connection(address, timeout=30) as third:
            answer = _read_all(third)
    finally:
        for sock in idle:
            sock.close()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    envelope = etree.fromstring(body)
    assert_valid(envelope, "w3/soap-envelope.xsd")
    value = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == "env:Receiver"

    deadline = time.monotonic() + 10
    while True:
        answer = requests.get(running_node.settings.url("registry"), timeout=30)
        if answer.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.status_code == 405


def test_a_request_head_trickling_in_is_cut_off(
    shared_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that sends a header line now and then, each within the read
    timeout, does not hold its connection (one of a listener's slots) for
    good: past the head deadline the connection is closed."""
    monkeypatch.setattr(app, "HEAD_DEADLINE", 2.0)
    parts = urlsplit(shared_node.settings.url("registry"))
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: x\r\n".encode("ascii"))
        closed = False
        for n in range(40):
            time.sleep(0.25)
            try:
                sock.sendall(f"X-Slow-{n}: y\r\n".encode("ascii"))
            except OSError:
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
    assert closed


# Envelopes this node refuses to parse, each well-formed, and what the
# Fault's reason says: one over 32 MiB, one of 2 million empty elements.
OVERSIZED = {
    "larger than MAX_ROOT_PART": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            "</env:Header>", " " * (32 << 20) + "</env:Header>"
        ),
        "exceeds",
    ),
    "more markup than MAX_MARKUP": (
        SOAP12.format(action=QUERY, body=QUERY_BODY).replace(
            "</env:Header>",
            '<x:Junk xmlns:x="urn:example:junk">'
            + "<a/>" * 2_000_000
            + "</x:Junk></env:Header>",
        ),
        "tags and attributes",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_an_envelope_too_large_to_parse_gets_a_sender_fault(
    shared_node: RunningNode, case: str
) -> None:
    """SOAP 1.2 Part 2 7.5.1.2: an envelope past the node's parsing bounds is
    the sender's fault; the Fault relates to its wsa:MessageID when that can
    be read (WS-Addressing 1.0 SOAP Binding 6)."""
    envelope, reason = OVERSIZED[case]

    answer = requests.post(
        shared_node.settings.url("registry"),
        data=envelope.encode(),
        headers={"Content-Type": "application/soap+xml"},
        timeout=60,
    )

    assert answer.status_code == 400
    fault = etree.fromstring(answer.content)
    value = fault.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == "env:Sender"
    text = fault.find(f".//{{{ns.SOAP12}}}Reason/{{{ns.SOAP12}}}Text")
    assert text is not None and reason in text.text


@pytest.mark.parametrize(
    ("method", "endpoint", "allowed"),
    [
        ("GET", "registry", {"POST"}),
        ("PUT", "imaging_source", {"POST"}),
        ("DELETE", "dicomweb", {"GET", "HEAD"}),
    ],
)
def test_a_method_not_allowed_names_those_allowed(
    shared_node: RunningNode, method: str, endpoint: str, allowed: set[str]
) -> None:
    """RFC 9110 15.5.6: a 405 answer carries Allow, the methods the resource
    takes, whether a SOAP Fault or plain text."""
    settings = shared_node.settings
    url = (
        f"{settings.dicomweb_url}/studies"
        if endpoint == "dicomweb"
        else settings.url(endpoint)
    )

    answer = requests.request(method, url, timeout=30)

    assert answer.status_code == 405
    listed = {m.strip() for m in answer.headers["Allow"].split(",")}
    assert allowed <= listed


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_expect_100_continue_gets_one_interim_answer_and_none_for_http_10(
    shared_node: RunningNode, version: str
) -> None:
    """RFC 9110 10.1.1 and 15.2.1: a peer that waits for 100 (Continue)
    before its body gets one, not two; an HTTP/1.0 peer's expectation is
    ignored, as no 1xx may go to it. Its request is answered either way."""
    parts = urlsplit(shared_node.settings.url("registry"))
    body = b"<not-soap/>"
    head = (
        f"POST {parts.path} {version}\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/soap+xml; charset=UTF-8\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        answer = _read_all(sock)

    interim = answer.count(b" 100 Continue\r\n")
    assert interim == (1 if version == "HTTP/1.1" else 0), answer[:200]
    final = answer.split(b"\r\n\r\n", interim)[-1]
    assert final.startswith(f"{version} 400 ".encode()), answer[:300]
    assert b"env:Sender" in final


def test_an_mtom_package_of_too_many_parts_is_the_senders_fault(
    shared_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package of more MIME parts than the node takes in one request is
    refused as it streams, before their files pile up in the spool: a
    Sender Fault that says so, and nothing left behind."""
    monkeypatch.setattr(soap_endpoint, "MAX_REQUEST_PARTS", 3)
    boundary = "many-parts"
    parts = b"".join(
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-ID: <part{n}@xdsi>\r\n\r\nx\r\n".encode("ascii")
        for n in range(5)
    )
    content_type, body = _mtom(boundary, parts + f"--{boundary}--\r\n".encode())
    spool = shared_node.settings.storage / "spool" / "repository"
    before = set(spool.rglob("*"))
    assert spool.is_dir()

    answer = requests.post(
        shared_node.settings.url("repository"),
        data=body,
        headers={"Content-Type": content_type},
        timeout=30,
    )

    assert answer.status_code == 400
    assert b"env:Sender" in answer.content
    assert b"more than 3 MIME parts" in answer.content
    assert set(spool.rglob("*")) <= before


@pytest.mark.parametrize(
    "case",
    [
        "two-content-lengths",
        "content-length-not-a-number",
        "both-framings",
        "field-line-without-colon",
    ],
)
def test_a_head_that_could_end_its_body_in_two_places_is_refused_for_it(
    shared_node: RunningNode, case: str
) -> None:
    """RFC 9112 6.1, 6.3 and 11.2: the node never picks one of two readings
    of where a body ends (a proxy in front may have picked the other); it
    answers 400 saying so, before reading any body."""
    host = shared_node.settings.node.host
    with socket.create_connection(
        (host, shared_node.settings.registry.port), timeout=30
    ) as sock:
        sock.sendall(RAW_REQUESTS[case])
        answer = _read_all(sock)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"RFC 9112" in body


def test_a_long_message_id_is_quoted_short_in_the_log(
    shared_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer's wsa:MessageID of a megabyte, line breaks in it, is logged at
    INFO as its escaped start and its length: one request cannot add a
    megabyte to the log, nor a line of its own making."""
    long_id = "urn:x:\nFORGED LINE " + "9" * 1_000_000
    body = SOAP12.format(action=QUERY, body=QUERY_BODY).replace(MESSAGE_ID, long_id)

    with caplog.at_level(logging.INFO):
        requests.post(
            shared_node.settings.url("registry"),
            data=body.encode(),
            headers={"Content-Type": "application/soap+xml"},
            timeout=30,
        )

    (line,) = [r.getMessage() for r in caplog.records if "ITI-18" in r.getMessage()]
    assert len(line) < 400
    assert "\n" not in line
    assert line.count("FORGED LINE") == 1
    assert f"({len(long_id)} characters)" in line


@pytest.mark.parametrize(
    ("path", "plain"),
    [("/dicomweb/studies", True), ("/wado", True), ("/xdsi/imaging-source", False)],
    ids=["qido", "wado-uri", "rad-69"],
)
def test_the_http_layer_answers_dicomweb_paths_in_plain_text(
    shared_node: RunningNode, path: str, plain: bool
) -> None:
    """DICOM PS3.18 8.7.1: a request the HTTP layer refuses before routing
    (too many header fields, 431; a request line too long, 414) gets plain
    text on a DICOMweb path, as the service would answer it, and a SOAP
    Fault on the RAD-69 endpoint."""
    host = shared_node.settings.node.host
    requests_refused = {
        431: f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"".join(b"X-%d: 1\r\n" % n for n in range(200))
        + b"\r\n",
        414: f"GET {path}?q={'x' * 70_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    }
    for status, request in requests_refused.items():
        with socket.create_connection(
            (host, shared_node.settings.imaging_source.port), timeout=30
        ) as sock:
            sock.sendall(request)
            answer = _read_all(sock)

        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status)
        if plain:
            assert b"content-type: text/plain" in head.lower()
            assert body.startswith(b"%d " % status)
        else:
            assert b"content-type: application/soap+xml" in head.lower()
            assert b"env:Sender" in body


def test_a_spool_failing_mid_upload_gets_a_receiver_fault_related_to_the_request(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """SOAP 1.2 Part 2 7.5.1.2, WS-Addressing 1.0 SOAP Binding 6: a spool
    that fails once the root part is read (its folder gone, as a disk
    failing) is this node's failure, a Receiver Fault, related to the
    request's wsa:MessageID; nothing of the request stays."""
    boundary = "xdsi-spool-gone"
    content_type, body = _mtom(boundary)
    head = body.removesuffix(f"--{boundary}--\r\n".encode("ascii"))
    part = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n"
        "Content-ID: <doc{}@xdsi>\r\n\r\n"
    ).encode("ascii")
    spool = shared_node.settings.storage / "spool" / "repository"
    before = set(spool.iterdir())
    url = urlsplit(shared_node.settings.url("repository"))

    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
        )
        # More than the node reads at once, so that parts are spooled.
        first = b"".join(
            part.replace(b"{}", str(n).encode()) + bytes(100_000) + b"\r\n"
            for n in range(30)
        )
        sock.sendall(_chunked(head + first))
        deadline = time.monotonic() + 30
        while not any(any(d.glob("part-*")) for d in set(spool.iterdir()) - before):
            assert time.monotonic() < deadline, "nothing was spooled"
            time.sleep(0.05)
        (folder,) = set(spool.iterdir()) - before
        folder.rename(tmp_path / "gone")
        rest = b"".join(
            part.replace(b"{}", str(n).encode()) + bytes(100_000) + b"\r\n"
            for n in range(30, 60)
        )
        sock.sendall(_chunked(rest + f"--{boundary}--\r\n".encode("ascii")))
        sock.sendall(b"0\r\n\r\n")
        answer = _read_all(sock)

    assert _fault_code(answer) == (500, "env:Receiver")
    envelope = etree.fromstring(_dechunk_if(answer))
    relates_to = envelope.findall(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}RelatesTo")
    assert [r.text for r in relates_to] == [MESSAGE_ID]
    assert set(spool.iterdir()) == before


def _dechunk_if(response: bytes) -> bytes:
    """The body of a raw HTTP response, its chunked framing undone."""
    head, _, body = response.partition(b"\r\n\r\n")
    return _dechunk(body) if b"Transfer-Encoding: chunked" in head else body

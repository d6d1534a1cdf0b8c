"""Bad input at every SOAP endpoint gets a SOAP 1.2 Fault, never a traceback
or an HTML page (SOAP 1.2 Part 1 5.4, Part 2 7.5.1; WS-Addressing 1.0 SOAP
Binding 6)."""

from __future__ import annotations

import socket

import pytest
import requests
from lxml import etree

from tests.conftest import assert_valid
from tests.integration.conftest import RunningNode
from xdsi import ns

QUERY = "urn:ihe:iti:2007:RegistryStoredQuery"

SOAP12 = (
    '<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:wsa="http://www.w3.org/2005/08/addressing"><env:Header>'
    "<wsa:Action>{action}</wsa:Action><wsa:MessageID>urn:uuid:"
    "0a3b2f9e-1d2c-4b5a-9e8f-7a6b5c4d3e2f</wsa:MessageID></env:Header>"
    "<env:Body>{body}</env:Body></env:Envelope>"
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


@pytest.mark.parametrize("method", ["GET", "PUT"])
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

    if answer.startswith(b"HTTP/"):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1][:1] in (b"4", b"5")
        assert b"content-type: application/soap+xml" in head.lower()
    else:
        # A one-word request line is HTTP/0.9, whose answer is the body alone.
        body = answer
    envelope = etree.fromstring(body)
    assert_valid(envelope, "w3/soap-envelope.xsd")
    value = envelope.find(f".//{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    assert value is not None and value.text == "env:Sender"

"""Tests of xdsi.wire.soap: SOAP 1.2 envelopes and WS-Addressing headers."""

import shutil
from pathlib import Path

import pytest
from lxml import etree

from xdsi.ns import SOAP11, SOAP12, WSA, XDSB
from xdsi.wire import (
    ANONYMOUS,
    MalformedMessage,
    MessageAddressingHeaderRequired,
    SoapMessage,
    VersionMismatch,
    build_envelope,
    parse_envelope,
    parse_xml,
    serialize,
)
from xdsi.wire.faults import InvalidCardinality, MustUnderstand, SoapFault
from xdsi.wire.soap import read_message_id

NS = {"env": SOAP12, "wsa": WSA}
PNR = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
RETRIEVE = (
    f'<RetrieveDocumentSetRequest xmlns="{XDSB}"><DocumentRequest>'
    "<RepositoryUniqueId>1.3.6.1.4.1.21367.13.80.110</RepositoryUniqueId>"
    "<DocumentUniqueId>1.2.840.114158.332609592172.20160623221738902.1.0.173871"
    "</DocumentUniqueId></DocumentRequest></RetrieveDocumentSetRequest>"
)


def test_nist_capture_envelope_yields_addressing_headers_and_body(
    pnr_envelope: etree._Element,
) -> None:
    """WS-Addressing 1.0 SOAP Binding 3: Action, MessageID, To are read."""
    message = parse_envelope(pnr_envelope)
    assert message.action == PNR
    assert message.message_id == "urn:uuid:A51311F0AFB3EBCF891467743286288"
    assert message.to == "http://localhost:8000/sim/bill__rr/rep/prb"
    assert message.relates_to is None
    assert message.body.tag == f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest"


def test_soap_11_envelope_is_version_mismatch(pnr_envelope: etree._Element) -> None:
    """SOAP 1.2 Part 1 5.4.7: an Envelope in the SOAP 1.1 namespace."""
    text = serialize(pnr_envelope).replace(SOAP12.encode(), SOAP11.encode())
    with pytest.raises(VersionMismatch, match="SOAP 1.1"):
        parse_envelope(parse_xml(text))


def test_missing_wsa_action_is_addressing_header_required(
    pnr_envelope: etree._Element,
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6.4.3: no wsa:Action."""
    action = pnr_envelope.find("env:Header/wsa:Action", NS)
    action.getparent().remove(action)
    with pytest.raises(MessageAddressingHeaderRequired) as raised:
        parse_envelope(pnr_envelope)
    assert raised.value.detail == "wsa:Action"


def test_envelope_without_header_is_addressing_header_required() -> None:
    """WS-Addressing 1.0 SOAP Binding 6.4.3: no Header, so no wsa:Action."""
    root = parse_xml(
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Body>{RETRIEVE}</env:Body>'
        "</env:Envelope>".encode()
    )
    with pytest.raises(MessageAddressingHeaderRequired):
        parse_envelope(root)


@pytest.mark.parametrize(
    "text",
    [
        RETRIEVE,
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Header/></env:Envelope>',
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Body/></env:Envelope>',
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Body>{RETRIEVE}{RETRIEVE}'
        "</env:Body></env:Envelope>",
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Body>{RETRIEVE}</env:Body>'
        "<env:Header/></env:Envelope>",
    ],
    ids=["no envelope", "no body", "empty body", "two body elements", "header last"],
)
def test_envelope_without_one_body_element_is_malformed(text: str) -> None:
    """SOAP 1.2 Part 1 5.1: Header (optional) then Body, one payload here."""
    with pytest.raises(MalformedMessage):
        parse_envelope(parse_xml(text.encode()))


def test_built_request_validates_and_reads_back(soap_schema: etree.XMLSchema) -> None:
    """WS-Addressing 1.0 SOAP Binding 3: a request's headers, schema-valid."""
    envelope = build_envelope(
        etree.fromstring(RETRIEVE),
        "urn:ihe:iti:2007:RetrieveDocumentSet",
        to="http://127.0.0.1:9/repository",
        reply_to_anonymous=True,
    )
    reparsed = parse_xml(serialize(envelope))
    soap_schema.assertValid(reparsed)
    action = reparsed.find("env:Header/wsa:Action", NS)
    assert action.get(f"{{{SOAP12}}}mustUnderstand") == "1"
    assert reparsed.findtext("env:Header/wsa:ReplyTo/wsa:Address", namespaces=NS) == (
        ANONYMOUS
    )
    message = parse_envelope(reparsed)
    assert message.action == "urn:ihe:iti:2007:RetrieveDocumentSet"
    assert message.to == "http://127.0.0.1:9/repository"
    assert message.message_id.startswith("urn:uuid:")
    assert message.body.tag == f"{{{XDSB}}}RetrieveDocumentSetRequest"


def test_built_response_relates_to_the_request(soap_schema: etree.XMLSchema) -> None:
    """WS-Addressing 1.0 Core 3.2: a reply relates to the request MessageID."""
    envelope = build_envelope(
        etree.fromstring(RETRIEVE),
        "urn:ihe:iti:2007:RetrieveDocumentSetResponse",
        message_id="urn:uuid:0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
        relates_to="urn:uuid:A51311F0AFB3EBCF891467743286288",
    )
    soap_schema.assertValid(envelope)
    assert envelope.find("env:Header/wsa:ReplyTo", NS) is None
    message = parse_envelope(envelope)
    assert message.relates_to == "urn:uuid:A51311F0AFB3EBCF891467743286288"
    assert message.message_id == "urn:uuid:0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"


def test_serialize_writes_utf8_with_declaration() -> None:
    """SOAP 1.2 Part 2 7.1: the HTTP binding sends UTF-8 soap+xml."""
    data = serialize(etree.fromstring('<a xmlns="urn:x">é</a>'))
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    assert "é".encode() in data


def test_close_removes_spool_but_not_files_moved_away(tmp_path: Path) -> None:
    """DESIGN principle 5: spooled parts go with the message unless kept."""
    spool = tmp_path / "msg"
    spool.mkdir()
    (spool / "part-00001").write_bytes(b"dropped")
    (spool / "part-00002").write_bytes(b"kept")
    kept = tmp_path / "blob"
    root = build_envelope(etree.fromstring(RETRIEVE), "urn:x")
    with parse_envelope(root, spool_dir=spool) as message:
        assert isinstance(message, SoapMessage)
        shutil.move(spool / "part-00002", kept)
    assert not spool.exists()
    assert kept.read_bytes() == b"kept"


def test_a_line_break_in_the_message_id_is_collapsed() -> None:
    """XML Schema Part 2 4.3.6: wsa:MessageID is an xs:anyURI, whose white
    space collapses; a line break a peer puts in it (to forge a log line)
    is read as one space."""
    envelope = build_envelope(
        etree.fromstring(RETRIEVE),
        "urn:ihe:iti:2007:RetrieveDocumentSet",
        message_id="urn:x\n2026-12-05 10:00:00,000 CRITICAL forged\r\n",
    )

    message = parse_envelope(parse_xml(serialize(envelope)))

    assert message.message_id == "urn:x 2026-12-05 10:00:00,000 CRITICAL forged"


MESSAGE_ID = "urn:uuid:6c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
ACTION = "<wsa:Action>urn:ihe:iti:2007:RetrieveDocumentSet</wsa:Action>"
MESSAGE_ID_HEADER = f"<wsa:MessageID>{MESSAGE_ID}</wsa:MessageID>"
NOT_UNDERSTOOD = (
    '<x:Security xmlns:x="urn:example:security" env:mustUnderstand="true"/>'
)


def _envelope(header: str, body: str = RETRIEVE) -> bytes:
    return (
        f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}">'
        f"<env:Header>{header}</env:Header><env:Body>{body}</env:Body>"
        "</env:Envelope>"
    ).encode()


# Envelopes whose wsa:MessageID is readable but which are faulted all the
# same, and the fault each gets.
FAULTED_WITH_MESSAGE_ID = {
    "header block not understood": (
        _envelope(ACTION + MESSAGE_ID_HEADER + NOT_UNDERSTOOD),
        MustUnderstand,
    ),
    "two different actions": (
        _envelope(
            ACTION + MESSAGE_ID_HEADER + "<wsa:Action>urn:example:Other</wsa:Action>"
        ),
        InvalidCardinality,
    ),
    "no action": (_envelope(MESSAGE_ID_HEADER), MessageAddressingHeaderRequired),
    "empty body": (_envelope(ACTION + MESSAGE_ID_HEADER, body=""), MalformedMessage),
    "two body elements": (
        _envelope(ACTION + MESSAGE_ID_HEADER, body=RETRIEVE + RETRIEVE),
        MalformedMessage,
    ),
    "header after body": (
        f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}"><env:Body>'
        f"{RETRIEVE}</env:Body><env:Header>{ACTION}{MESSAGE_ID_HEADER}"
        "</env:Header></env:Envelope>".encode(),
        MalformedMessage,
    ),
}


@pytest.mark.parametrize("case", FAULTED_WITH_MESSAGE_ID)
def test_a_fault_in_an_envelope_carries_its_message_id(case: str) -> None:
    """WS-Addressing 1.0 Core 3.4, SOAP Binding 6: a fault about an envelope
    whose wsa:MessageID was read carries it, for the Fault to relate to."""
    text, fault = FAULTED_WITH_MESSAGE_ID[case]

    with pytest.raises(fault) as raised:
        parse_envelope(parse_xml(text))

    assert raised.value.message_id == MESSAGE_ID


def test_a_fault_in_an_envelope_without_a_message_id_carries_none() -> None:
    """WS-Addressing 1.0 Core 3.4: no MessageID read, nothing to relate to."""
    with pytest.raises(SoapFault) as raised:
        parse_envelope(parse_xml(_envelope(ACTION + NOT_UNDERSTOOD)))

    assert raised.value.message_id is None


# Bytes no envelope can be read from whole, and the MessageID still readable.
PARTLY_READABLE = {
    "trailing garbage": (_envelope(ACTION + MESSAGE_ID_HEADER) + b"<", MESSAGE_ID),
    "cut in the body": (_envelope(ACTION + MESSAGE_ID_HEADER)[:-40], MESSAGE_ID),
    "header after body": (
        f'<env:Envelope xmlns:env="{SOAP12}" xmlns:wsa="{WSA}"><env:Body>'
        f"{RETRIEVE}</env:Body><env:Header>{ACTION}{MESSAGE_ID_HEADER}"
        "</env:Header></env:Envelope>garbage".encode(),
        MESSAGE_ID,
    ),
    "cut in the message id": (
        _envelope(ACTION + MESSAGE_ID_HEADER).split(b"</wsa:MessageID>")[0],
        None,
    ),
    "message id outside the header": (
        _envelope(ACTION, body=MESSAGE_ID_HEADER) + b"<",
        None,
    ),
    "soap 1.1 envelope": (
        _envelope(ACTION + MESSAGE_ID_HEADER).replace(SOAP12.encode(), SOAP11.encode()),
        None,
    ),
    "document type declaration": (
        b"<!DOCTYPE env:Envelope>" + _envelope(ACTION + MESSAGE_ID_HEADER),
        None,
    ),
}


@pytest.mark.parametrize("case", PARTLY_READABLE)
def test_the_message_id_is_read_from_an_envelope_broken_after_it(case: str) -> None:
    """WS-Addressing 1.0 SOAP Binding 6: a Fault relates to the wsa:MessageID
    of env:Header whenever it can be read, and to nothing otherwise."""
    data, expected = PARTLY_READABLE[case]

    assert read_message_id(data) == expected

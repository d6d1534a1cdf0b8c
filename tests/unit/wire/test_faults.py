"""Tests of xdsi.wire.faults: fault classes and the Fault envelopes we send."""

import pytest
from lxml import etree

from xdsi.ns import SOAP12, WSA
from xdsi.wire import (
    FAULT_ACTION,
    ActionMismatch,
    ActionNotSupported,
    MalformedMessage,
    MessageAddressingHeaderRequired,
    PeerFault,
    ReceiverFault,
    SoapFault,
    UnsupportedMediaType,
    VersionMismatch,
    fault_envelope,
)

NS = {"env": SOAP12, "wsa": WSA}

# SOAP 1.2 Part 1 5.4.6 and WS-Addressing 1.0 SOAP Binding 6.4: class, its
# code chain, and the HTTP status of SOAP 1.2 Part 2 7.5.1.2.
FAULTS = {
    "VersionMismatch": (VersionMismatch, ["env:VersionMismatch"], 500),
    "MalformedMessage": (MalformedMessage, ["env:Sender"], 400),
    "MessageAddressingHeaderRequired": (
        MessageAddressingHeaderRequired,
        ["env:Sender", "wsa:MessageAddressingHeaderRequired"],
        400,
    ),
    "ActionNotSupported": (
        ActionNotSupported,
        ["env:Sender", "wsa:ActionNotSupported"],
        400,
    ),
    "ActionMismatch": (
        ActionMismatch,
        ["env:Sender", "wsa:InvalidAddressingHeader", "wsa:ActionMismatch"],
        400,
    ),
    "UnsupportedMediaType": (UnsupportedMediaType, ["env:Sender"], 415),
    "ReceiverFault": (ReceiverFault, ["env:Receiver"], 500),
}


def _codes(envelope: etree._Element) -> list[str]:
    return [v.text for v in envelope.iterfind(".//env:Code//env:Value", NS)]


@pytest.mark.parametrize("name", FAULTS)
@pytest.mark.parametrize("detail", [None, "wsa:Action"], ids=["no detail", "detail"])
def test_fault_envelope_is_valid_soap_and_ws_addressing(
    name: str, detail: str | None, soap_schema: etree.XMLSchema
) -> None:
    """SOAP 1.2 Part 1 5.4: each fault envelope validates, headers included."""
    fault_class, _, _ = FAULTS[name]
    envelope = etree.fromstring(
        fault_envelope(
            fault_class("it went wrong", detail=detail), relates_to="urn:uuid:1"
        )
    )
    soap_schema.assertValid(envelope)


@pytest.mark.parametrize("name", FAULTS)
def test_fault_envelope_carries_the_class_codes(name: str) -> None:
    """SOAP 1.2 Part 1 5.4.6: Code/Value then nested Subcode/Values."""
    fault_class, codes, status = FAULTS[name]
    envelope = etree.fromstring(fault_envelope(fault_class("reason")))
    assert _codes(envelope) == codes
    assert fault_class.http_status == status


def test_fault_envelope_has_fault_action_fresh_message_id_and_relates_to() -> None:
    """WS-Addressing 1.0 SOAP Binding 6: fault action, MessageID, RelatesTo."""
    first = etree.fromstring(
        fault_envelope(ReceiverFault("x"), relates_to="urn:uuid:abc")
    )
    second = etree.fromstring(fault_envelope(ReceiverFault("x")))
    assert first.findtext("env:Header/wsa:Action", namespaces=NS) == FAULT_ACTION
    assert first.findtext("env:Header/wsa:RelatesTo", namespaces=NS) == "urn:uuid:abc"
    assert second.find("env:Header/wsa:RelatesTo", NS) is None
    ids = {
        e.findtext("env:Header/wsa:MessageID", namespaces=NS) for e in (first, second)
    }
    assert len(ids) == 2 and all(i.startswith("urn:uuid:") for i in ids)


def test_version_mismatch_fault_carries_upgrade_header() -> None:
    """SOAP 1.2 Part 1 Appendix A: env:Upgrade names the supported envelope."""
    envelope = etree.fromstring(fault_envelope(VersionMismatch("SOAP 1.1")))
    supported = envelope.find("env:Header/env:Upgrade/env:SupportedEnvelope", NS)
    assert supported is not None
    prefix, _, local = supported.get("qname").partition(":")
    assert (supported.nsmap[prefix], local) == (SOAP12, "Envelope")
    assert (
        etree.fromstring(fault_envelope(ReceiverFault("x"))).find(
            "env:Header/env:Upgrade", NS
        )
        is None
    )


def test_fault_reason_is_english_text() -> None:
    """SOAP 1.2 Part 1 5.4.2: env:Reason/env:Text with xml:lang."""
    envelope = etree.fromstring(fault_envelope(MalformedMessage("no env:Body")))
    text = envelope.find(".//env:Reason/env:Text", NS)
    assert text.text == "no env:Body"
    assert text.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"


def test_addressing_fault_detail_uses_ws_addressing_elements() -> None:
    """WS-Addressing 1.0 SOAP Binding 6.4: ProblemHeaderQName and such."""
    required = etree.fromstring(
        fault_envelope(MessageAddressingHeaderRequired("none", detail="wsa:Action"))
    )
    assert required.findtext(".//env:Detail/wsa:ProblemHeaderQName", namespaces=NS) == (
        "wsa:Action"
    )
    unsupported = etree.fromstring(
        fault_envelope(ActionNotSupported("no", detail="urn:x"))
    )
    assert unsupported.findtext(
        ".//env:Detail/wsa:ProblemAction/wsa:Action", namespaces=NS
    ) == ("urn:x")


@pytest.mark.parametrize("name", FAULTS)
def test_peer_fault_reads_back_what_fault_envelope_wrote(name: str) -> None:
    """SOAP 1.2 Part 1 5.4: code, subcodes, reason and detail survive."""
    fault_class, codes, _ = FAULTS[name]
    envelope = etree.fromstring(
        fault_envelope(fault_class("bad thing", detail="wsa:Action"))
    )
    fault = PeerFault.from_element(envelope.find("env:Body/env:Fault", NS))
    assert (fault.code, fault.subcodes) == (codes[0], tuple(codes[1:]))
    assert fault.reason == "bad thing"
    assert fault.detail == "wsa:Action"


def test_peer_fault_normalises_the_peers_prefixes() -> None:
    """SOAP 1.2 Part 1 5.4.6: codes are QNames; prefixes are the peer's."""
    fault = PeerFault.from_element(
        etree.fromstring(
            b'<s:Fault xmlns:s="http://www.w3.org/2003/05/soap-envelope"'
            b' xmlns:a="http://www.w3.org/2005/08/addressing" xmlns:v="urn:vendor">'
            b"<s:Code><s:Value>s:Sender</s:Value><s:Subcode>"
            b"<s:Value>a:ActionNotSupported</s:Value><s:Subcode>"
            b"<s:Value>v:Special</s:Value></s:Subcode></s:Subcode>"
            b'</s:Code><s:Reason><s:Text xml:lang="en">nope</s:Text></s:Reason>'
            b"</s:Fault>"
        )
    )
    assert fault.code == "env:Sender"
    assert fault.subcodes == ("wsa:ActionNotSupported", "v:Special")
    assert fault.detail is None
    assert str(fault) == "env:Sender wsa:ActionNotSupported v:Special: nope"


def test_every_fault_class_is_a_soap_fault() -> None:
    """SOAP 1.2 Part 1 5.4.6: each class answers with a defined fault code."""
    for fault_class, codes, _ in FAULTS.values():
        assert issubclass(fault_class, SoapFault)
        assert fault_class.code == codes[0]

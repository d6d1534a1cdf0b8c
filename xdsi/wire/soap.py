"""SOAP 1.2 envelopes with WS-Addressing 1.0 headers: read, build, serialize.

Implements SOAP 1.2 Part 1 5.1 to 5.3 (Envelope, Header, Body) and 5.4.7
(VersionMismatch), WS-Addressing 1.0 Core 3.2 and SOAP Binding 2 and 3
(wsa:Action, wsa:MessageID, wsa:To, wsa:ReplyTo, wsa:RelatesTo), as ITI TF-2x
Appendix V requires for every XDS.b and XDS-I.b transaction.
"""

import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING

from lxml import etree
from lxml.etree import _Element

from xdsi.ns import SOAP11, SOAP12, WSA, qname
from xdsi.wire.faults import (
    InvalidCardinality,
    MalformedMessage,
    MessageAddressingHeaderRequired,
    MustUnderstand,
    SoapFault,
    VersionMismatch,
)

if TYPE_CHECKING:
    from xdsi.wire.mtom import Attachment

# WS-Addressing 1.0 Core 2.1: the address meaning "reply on this connection".
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"

_NSMAP = {"env": SOAP12, "wsa": WSA}
_MUST_UNDERSTAND = qname(SOAP12, "mustUnderstand")


@dataclass(frozen=True)
class SoapMessage:
    """A SOAP 1.2 message as read: its addressing headers, body and parts.

    ``attachments`` is keyed by Content-ID without angle brackets.
    ``close()`` removes ``spool_dir`` and the attachment files still in it;
    a file moved out of it first stays where it was moved.
    """

    action: str
    message_id: str | None
    relates_to: str | None
    to: str | None
    body: _Element
    attachments: Mapping[str, "Attachment"] = field(
        default_factory=lambda: MappingProxyType({})
    )
    spool_dir: Path | None = None

    def close(self) -> None:
        """Remove the spooled attachment files and their directory."""
        if self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def __enter__(self) -> "SoapMessage":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _header_text(header: _Element | None, local: str) -> str | None:
    """Return the text of the first wsa header ``local``, if any, its white
    space collapsed as for the xs:anyURI it is (XML Schema Part 2 4.3.6):
    a line break a peer put in its MessageID reaches no log line."""
    if header is None:
        return None
    element = header.find(qname(WSA, local))
    if element is None:
        return None
    return " ".join((element.text or "").split())


# Where wsa:MessageID sits in an envelope: Envelope, Header, MessageID.
_MESSAGE_ID_PATH = [
    qname(SOAP12, "Envelope"),
    qname(SOAP12, "Header"),
    qname(WSA, "MessageID"),
]
# Bytes fed at once to the parser that looks for the MessageID.
_FEED_SIZE = 1 << 16


class _MessageIdReader:
    """An lxml parser target that keeps the first wsa:MessageID in env:Header
    and builds no tree."""

    def __init__(self) -> None:
        self.path: list[str] = []
        self.text: list[str] | None = None
        self.message_id: str | None = None
        self.has_doctype = False

    def start(self, tag: str, attrib: object, nsmap: object = None) -> None:
        self.path.append(tag)
        if self.path == _MESSAGE_ID_PATH and self.message_id is None:
            self.text = []

    def data(self, data: str) -> None:
        if self.text is not None and len(self.path) == len(_MESSAGE_ID_PATH):
            self.text.append(data)

    def end(self, tag: str) -> None:
        if self.text is not None and self.path == _MESSAGE_ID_PATH:
            self.message_id = " ".join("".join(self.text).split())
            self.text = None
        self.path.pop()

    def doctype(self, *args: object) -> None:
        self.has_doctype = True

    def close(self) -> None:
        """Nothing to return: the MessageID is read from the attribute."""


def read_message_id(data: bytes) -> str | None:
    """Return the wsa:MessageID of an envelope that could not be read whole.

    WS-Addressing 1.0 SOAP Binding 6: a Fault relates to the message in error
    whenever its wsa:MessageID can be read. The bytes are read as far as
    they are well-formed, up to the first wsa:MessageID in an env:Header of
    a SOAP 1.2 Envelope, wherever that Header stands; no tree is built. An
    envelope with a document type declaration (SOAP 1.2 Part 1 5) is not
    read, and gives None, as does one without a MessageID.
    """
    reader = _MessageIdReader()
    parser = etree.XMLParser(
        target=reader, resolve_entities=False, no_network=True, load_dtd=False
    )
    try:
        for offset in range(0, len(data), _FEED_SIZE):
            parser.feed(data[offset : offset + _FEED_SIZE])
            if reader.message_id is not None or reader.has_doctype:
                break
    except etree.XMLSyntaxError:
        pass
    return None if reader.has_doctype else reader.message_id


# WS-Addressing 1.0 Core 3.2: wsa:Action occurs once. Other headers that
# should occur once are read from their first copy: some stacks (zeep with a
# WSDL that declares the addressing and its addressing plugin) send two.
_SINGLE_HEADERS = ("Action",)

# SOAP 1.2 Part 1 5.2.2: the roles this node plays, as the ultimate
# receiver; a block without env:role targets the ultimate receiver.
_ROLES = (
    None,
    "http://www.w3.org/2003/05/soap-envelope/role/next",
    "http://www.w3.org/2003/05/soap-envelope/role/ultimateReceiver",
)


def _check_header_blocks(header: _Element | None) -> None:
    """Refuse header blocks this node must understand but does not.

    SOAP 1.2 Part 1 5.2.3 and 5.4.8: a block targeted at this node with
    mustUnderstand true is processed or faulted; this node processes the
    WS-Addressing headers only. WS-Addressing 1.0 SOAP Binding 6.4.1:
    wsa:Action given twice, with different values, is InvalidCardinality.
    """
    if header is None:
        return
    blocks = [child for child in header if isinstance(child.tag, str)]
    not_understood = tuple(
        block.tag
        for block in blocks
        if block.get(_MUST_UNDERSTAND, "").strip() in ("true", "1")
        and block.get(qname(SOAP12, "role")) in _ROLES
        and etree.QName(block).namespace != WSA
    )
    if not_understood:
        raise MustUnderstand(
            "header blocks marked mustUnderstand that this node does not "
            "process: " + ", ".join(not_understood),
            not_understood,
        )
    for local in _SINGLE_HEADERS:
        # Copies alike are harmless; copies that differ leave the message
        # without one action to dispatch on.
        copies = {
            etree.tostring(b, method="c14n")
            for b in blocks
            if b.tag == qname(WSA, local)
        }
        if len(copies) > 1:
            raise InvalidCardinality(
                f"wsa:{local} appears more than once with different values "
                "(WS-Addressing 1.0 Core 3.2 allows one)",
                detail=f"wsa:{local}",
            )


def _body_element(after_header: list[_Element]) -> _Element:
    """Return the one element of env:Body, which alone follows env:Header."""
    if len(after_header) != 1 or after_header[0].tag != qname(SOAP12, "Body"):
        raise MalformedMessage("the Envelope must hold one env:Body after env:Header")
    payload = [child for child in after_header[0] if isinstance(child.tag, str)]
    if len(payload) != 1:
        raise MalformedMessage(
            f"env:Body holds {len(payload)} elements; this node expects exactly one"
        )
    return payload[0]


def parse_envelope(
    root: _Element,
    attachments: Mapping[str, "Attachment"] = MappingProxyType({}),
    spool_dir: Path | None = None,
) -> SoapMessage:
    """Check a parsed envelope and return its addressing headers and body.

    SOAP 1.2 Part 1 5.4.7 answers an envelope of another SOAP version with
    VersionMismatch. A root not named Envelope is answered MalformedMessage
    (Part 1 would say VersionMismatch; a peer learns more from Sender).

    Raises
    ------
    VersionMismatch
        The root is an Envelope in a namespace other than SOAP 1.2's.
    MalformedMessage
        The root is no Envelope, or env:Body is missing or does not hold
        exactly one element.
    MustUnderstand
        A header block for this node is marked mustUnderstand and is not
        WS-Addressing.
    InvalidCardinality
        wsa:Action appears twice with different values.
    MessageAddressingHeaderRequired
        There is no wsa:Action (WS-Addressing 1.0 SOAP Binding 6.4.3).

    A fault raised once env:Header is found, before or after env:Body,
    carries its wsa:MessageID, if any, as ``message_id``.
    """
    if root.tag != qname(SOAP12, "Envelope"):
        namespace = etree.QName(root).namespace
        if etree.QName(root).localname == "Envelope":
            version = "SOAP 1.1" if namespace == SOAP11 else f"namespace {namespace}"
            raise VersionMismatch(
                f"the Envelope is {version}; this node speaks SOAP 1.2 ({SOAP12})"
            )
        raise MalformedMessage(
            f"the root element is {root.tag}, not a SOAP 1.2 Envelope"
        )

    # SOAP 1.2 Part 1 5.1: an optional Header, then exactly one Body.
    children = [child for child in root if isinstance(child.tag, str)]
    header = (
        children[0] if children and children[0].tag == qname(SOAP12, "Header") else None
    )
    rest = children[1:] if header is not None else children

    # WS-Addressing 1.0 Core 3.4, SOAP Binding 6: a Fault about this envelope
    # relates to its wsa:MessageID, which is known once env:Header is, even
    # one standing where it should not.
    headers = [child for child in children if child.tag == qname(SOAP12, "Header")]
    message_id = _header_text(headers[0] if headers else None, "MessageID")
    try:
        body = _body_element(rest)
        _check_header_blocks(header)
        action = _header_text(header, "Action")
        if not action:
            raise MessageAddressingHeaderRequired(
                "the message has no wsa:Action header", detail="wsa:Action"
            )
    except SoapFault as fault:
        fault.message_id = message_id
        raise
    return SoapMessage(
        action=action,
        message_id=message_id,
        relates_to=_header_text(header, "RelatesTo"),
        to=_header_text(header, "To"),
        body=body,
        attachments=MappingProxyType(dict(attachments)),
        spool_dir=spool_dir,
    )


def build_envelope(
    body: _Element,
    action: str,
    *,
    message_id: str | None = None,
    relates_to: str | None = None,
    to: str | None = None,
    reply_to_anonymous: bool = False,
) -> _Element:
    """Wrap ``body`` in a SOAP 1.2 envelope with WS-Addressing headers.

    ``body`` is moved into env:Body, not copied. wsa:Action carries
    mustUnderstand as ITI TF-2x Appendix V asks; wsa:MessageID is a fresh
    ``urn:uuid:`` unless given; a request sets ``reply_to_anonymous`` so
    that the response comes back on the same connection.
    """
    envelope = etree.Element(qname(SOAP12, "Envelope"), nsmap=_NSMAP)
    header = etree.SubElement(envelope, qname(SOAP12, "Header"))
    element = etree.SubElement(header, qname(WSA, "Action"))
    element.set(_MUST_UNDERSTAND, "1")
    element.text = action
    etree.SubElement(header, qname(WSA, "MessageID")).text = (
        message_id if message_id is not None else f"urn:uuid:{uuid.uuid4()}"
    )
    if to is not None:
        etree.SubElement(header, qname(WSA, "To")).text = to
    if reply_to_anonymous:
        reply_to = etree.SubElement(header, qname(WSA, "ReplyTo"))
        etree.SubElement(reply_to, qname(WSA, "Address")).text = ANONYMOUS
    if relates_to is not None:
        etree.SubElement(header, qname(WSA, "RelatesTo")).text = relates_to
    etree.SubElement(envelope, qname(SOAP12, "Body")).append(body)
    return envelope


def serialize(element: _Element) -> bytes:
    """Return ``element`` as UTF-8 bytes with an XML declaration."""
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")

"""Errors of the wire layer and the SOAP 1.2 Fault envelopes that report them.

Implements SOAP 1.2 Part 1 5.4 (Fault), 5.4.7 and Appendix A (VersionMismatch
and the Upgrade header), SOAP 1.2 Part 2 7.5.1.2 (HTTP status per fault code)
and the WS-Addressing 1.0 SOAP Binding 6 (fault subcodes, fault action).

The tree::

    WireError
     +-- SoapFault                      we answer a peer with a Fault
     |    +-- VersionMismatch           env:VersionMismatch
     |    +-- MalformedMessage          env:Sender
     |    |    +-- UnreadableBody       the HTTP body broke off
     |    +-- MessageAddressingHeaderRequired   env:Sender, wsa:...
     |    +-- ActionNotSupported        env:Sender, wsa:ActionNotSupported
     |    +-- ActionMismatch            env:Sender,
     |    |                             wsa:InvalidAddressingHeader,
     |    |                             wsa:ActionMismatch
     |    +-- UnsupportedMediaType      env:Sender
     |    +-- ReceiverFault             env:Receiver
     +-- PeerFault                      a peer answered us with a Fault
     +-- TransportError                 no SOAP answer from a peer
     +-- AnswerTooLarge                 a message larger than its reader takes
     +-- MissingAttachment              an xop:Include names no MIME part
"""

import uuid
from typing import ClassVar

from lxml import etree
from lxml.etree import _Element

from xdsi.ns import SOAP12, WSA, qname

# WS-Addressing 1.0 SOAP Binding 6: the action of every fault message.
FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"

_NSMAP = {"env": SOAP12, "wsa": WSA}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


class WireError(Exception):
    """Root of every error raised by ``xdsi.wire``."""


class SoapFault(WireError):
    """A fault this node answers with, its SOAP fault code on the class.

    ``code`` and ``subcode`` are QName text with the prefixes ``env`` and
    ``wsa`` that :func:`fault_envelope` declares; ``subcode`` is the most
    specific subcode and ``parent_subcode``, when set, the one it nests in.
    ``http_status`` is the status SOAP 1.2 Part 2 7.5.1.2 gives the fault.
    ``message_id`` is the wsa:MessageID of the message in error, when it
    could be read before the fault arose; the Fault answering it relates to
    that message (WS-Addressing 1.0 Core 3.4, SOAP Binding 6).
    """

    code: ClassVar[str] = "env:Receiver"
    subcode: ClassVar[str | None] = None
    parent_subcode: ClassVar[str | None] = None
    http_status: ClassVar[int] = 500

    def __init__(
        self,
        reason: str,
        detail: str | None = None,
        *,
        message_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.message_id = message_id

    def detail_element(self) -> _Element | None:
        """Return the child of env:Detail that carries ``detail``, if any."""
        if self.detail is None:
            return None
        element = etree.Element("message")
        element.text = self.detail
        return element


class VersionMismatch(SoapFault):
    """The message is not a SOAP 1.2 envelope (SOAP 1.2 Part 1 5.4.7)."""

    code = "env:VersionMismatch"


class MalformedMessage(SoapFault):
    """Not well-formed XML, a DTD, no SOAP 1.2 Body, or a broken package."""

    code = "env:Sender"
    http_status = 400


class UnreadableBody(MalformedMessage):
    """The HTTP request body could not be read to its end.

    The peer went away, sent fewer bytes than its Content-Length, or garbled
    its chunked transfer coding (RFC 9112 7.1); the sender's fault either way.
    """


class RequestTooLarge(MalformedMessage):
    """The HTTP request body is larger than the node takes.

    RFC 9110 15.5.14 (413 Content Too Large); the Fault is the sender's.
    """

    http_status = 413


class _ProblemHeader(SoapFault):
    """A WS-Addressing fault whose detail names the header at fault."""

    def detail_element(self) -> _Element | None:
        """Return wsa:ProblemHeaderQName (WS-Addressing SOAP Binding 6.4)."""
        if self.detail is None:
            return None
        element = etree.Element(qname(WSA, "ProblemHeaderQName"), nsmap=_NSMAP)
        element.text = self.detail
        return element


class _ProblemAction(SoapFault):
    """A WS-Addressing fault whose detail is the action received."""

    def detail_element(self) -> _Element | None:
        """Return wsa:ProblemAction (WS-Addressing 1.0 SOAP Binding 6.4)."""
        if self.detail is None:
            return None
        element = etree.Element(qname(WSA, "ProblemAction"), nsmap=_NSMAP)
        etree.SubElement(element, qname(WSA, "Action")).text = self.detail
        return element


class MessageAddressingHeaderRequired(_ProblemHeader):
    """A required WS-Addressing header, wsa:Action, is absent.

    WS-Addressing 1.0 SOAP Binding 6.4.3; pass ``detail="wsa:Action"``.
    """

    code = "env:Sender"
    subcode = "wsa:MessageAddressingHeaderRequired"
    http_status = 400


class ActionNotSupported(_ProblemAction):
    """wsa:Action names no operation here.

    WS-Addressing 1.0 SOAP Binding 6.4.4; pass the action received as
    ``detail``.
    """

    code = "env:Sender"
    subcode = "wsa:ActionNotSupported"
    http_status = 400


class ActionMismatch(_ProblemAction):
    """The media type's ``action`` parameter differs from wsa:Action.

    WS-Addressing 1.0 SOAP Binding 4.1 and 6.4.1.6; pass the wsa:Action
    received as ``detail``.
    """

    code = "env:Sender"
    subcode = "wsa:ActionMismatch"
    parent_subcode = "wsa:InvalidAddressingHeader"
    http_status = 400


class InvalidCardinality(_ProblemHeader):
    """A WS-Addressing header that may appear once appears more often.

    WS-Addressing 1.0 SOAP Binding 6.4.1; pass the header's QName text as
    ``detail``.
    """

    code = "env:Sender"
    subcode = "wsa:InvalidCardinality"
    parent_subcode = "wsa:InvalidAddressingHeader"
    http_status = 400


class MustUnderstand(SoapFault):
    """Header blocks marked mustUnderstand that this node does not process.

    SOAP 1.2 Part 1 5.4.8: the fault's env:Header carries one env:NotUnderstood
    per block, naming it by ``qname``; Part 2 7.5.1.2 gives HTTP 500.
    """

    code = "env:MustUnderstand"
    http_status = 500

    def __init__(self, reason: str, not_understood: tuple[str, ...]) -> None:
        super().__init__(reason)
        # Clark notation, {namespace}local.
        self.not_understood = not_understood


class UnsupportedMediaType(SoapFault):
    """The HTTP body is neither application/soap+xml nor MTOM/XOP."""

    code = "env:Sender"
    http_status = 415


class ReceiverFault(SoapFault):
    """This node failed to process a valid message (SOAP 1.2 Part 1 5.4.6)."""

    code = "env:Receiver"


class PeerFault(WireError):
    """A SOAP 1.2 Fault from a peer: code, subcodes, reason and detail as sent.

    Codes in the SOAP 1.2 and WS-Addressing namespaces are given with the
    prefixes ``env`` and ``wsa`` whatever prefix the peer used; other codes
    keep the peer's text.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        subcodes: tuple[str, ...] = (),
        detail: str | None = None,
    ) -> None:
        super().__init__(f"{' '.join((code, *subcodes))}: {reason}")
        self.code = code
        self.subcodes = subcodes
        self.reason = reason
        self.detail = detail

    @classmethod
    def from_element(cls, fault: _Element) -> "PeerFault":
        """Read an env:Fault element received from a peer."""
        value = fault.find(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value")
        code = _qname_text(value) if value is not None else ""
        subcodes = []
        node = fault.find(f"{{{SOAP12}}}Code/{{{SOAP12}}}Subcode")
        while node is not None:
            value = node.find(f"{{{SOAP12}}}Value")
            if value is not None:
                subcodes.append(_qname_text(value))
            node = node.find(f"{{{SOAP12}}}Subcode")
        text = fault.find(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text")
        reason = (text.text or "").strip() if text is not None else ""
        detail_node = fault.find(f"{{{SOAP12}}}Detail")
        detail = None
        if detail_node is not None:
            detail = " ".join("".join(detail_node.itertext()).split()) or None
        return cls(code, reason, tuple(subcodes), detail)


class TransportError(WireError):
    """A peer gave no SOAP answer: connection failure, timeout, not SOAP.

    ``unsent`` is true only when no connection was made, so the request
    surely never reached the peer; otherwise the peer may have acted on it.
    ``answer`` is the SOAP Body's element of an answer that was SOAP all the
    same (sent with an error status, say), for a caller that can read it.
    """

    def __init__(
        self,
        message: str,
        url: str,
        status: int | None = None,
        *,
        unsent: bool = False,
        answer: _Element | None = None,
    ) -> None:
        shown = f"HTTP {status}" if status is not None else "no HTTP status"
        super().__init__(f"{url} ({shown}): {message}")
        self.url = url
        self.status = status
        self.unsent = unsent
        self.answer = answer
        # What went wrong, without the peer's address.
        self.reason = message


class SpoolError(OSError):
    """This node could not write a message it reads to its spool (the disk
    full, no permission): its own failure, not the peer's, though it shows
    as the message breaking off. ``message_id`` is the message's
    wsa:MessageID when its envelope was read before the spool failed, for
    the Fault that answers it (WS-Addressing 1.0 SOAP Binding 6)."""

    def __init__(self, error: OSError, path: object = None) -> None:
        super().__init__(error.errno, error.strerror, error.filename or path)
        self.message_id: str | None = None

    def __str__(self) -> str:
        where = f" {self.filename}" if self.filename else ""
        return f"cannot write{where} ({self.strerror or 'error'})"


class AnswerTooLarge(WireError):
    """A message is larger than its reader takes: refused as it streamed,
    before the bytes beyond ``limit`` were kept. ``part`` tells whether the
    limit was on one MIME part (a document, decoded) or on the whole HTTP
    body. The reader's own bound, not the peer's failure to follow a rule."""

    def __init__(self, limit: int, *, part: bool = False) -> None:
        what = "a MIME part" if part else "the message"
        super().__init__(f"{what} is larger than {limit} bytes")
        self.limit = limit
        self.part = part


class MissingAttachment(WireError):
    """An xop:Include names a Content-ID no MIME part carries (XOP 1.0 3)."""

    def __init__(self, content_id: str) -> None:
        super().__init__(f"xop:Include names cid:{content_id}, which no MIME part has")
        self.content_id = content_id


def _qname_text(element: _Element) -> str:
    """Return a QName-valued element's text, known namespaces as env/wsa."""
    text = (element.text or "").strip()
    prefix, _, local = text.rpartition(":")
    namespace = element.nsmap.get(prefix or None)
    if namespace == SOAP12:
        return f"env:{local}"
    if namespace == WSA:
        return f"wsa:{local}"
    return text


def fault_envelope(fault: SoapFault, relates_to: str | None = None) -> bytes:
    """Return a complete SOAP 1.2 envelope reporting ``fault``, as UTF-8 bytes.

    The header carries the fault action, a fresh wsa:MessageID and, when
    given, wsa:RelatesTo (WS-Addressing 1.0 SOAP Binding 6); a
    VersionMismatch also carries env:Upgrade (SOAP 1.2 Part 1 Appendix A).

    Limitation: a SOAP 1.1 sender gets a SOAP 1.2 VersionMismatch envelope,
    not the SOAP 1.1 fault that Appendix A suggests for it.
    """
    envelope = etree.Element(qname(SOAP12, "Envelope"), nsmap=_NSMAP)
    header = etree.SubElement(envelope, qname(SOAP12, "Header"))
    if isinstance(fault, VersionMismatch):
        upgrade = etree.SubElement(header, qname(SOAP12, "Upgrade"))
        supported = etree.SubElement(upgrade, qname(SOAP12, "SupportedEnvelope"))
        supported.set("qname", "env:Envelope")
    if isinstance(fault, MustUnderstand):
        for number, name in enumerate(fault.not_understood):
            namespace = etree.QName(name).namespace
            prefix = f"nu{number}"
            block = etree.SubElement(
                header,
                qname(SOAP12, "NotUnderstood"),
                nsmap={prefix: namespace} if namespace else None,
            )
            local = etree.QName(name).localname
            block.set("qname", f"{prefix}:{local}" if namespace else local)
    etree.SubElement(header, qname(WSA, "Action")).text = FAULT_ACTION
    etree.SubElement(header, qname(WSA, "MessageID")).text = f"urn:uuid:{uuid.uuid4()}"
    if relates_to is not None:
        etree.SubElement(header, qname(WSA, "RelatesTo")).text = relates_to

    # SOAP 1.2 Part 1 5.4.1 to 5.4.5: Code (Subcodes nested), Reason, Detail.
    body = etree.SubElement(envelope, qname(SOAP12, "Body"))
    element = etree.SubElement(body, qname(SOAP12, "Fault"))
    code = etree.SubElement(element, qname(SOAP12, "Code"))
    etree.SubElement(code, qname(SOAP12, "Value")).text = fault.code
    parent = code
    for subcode in (fault.parent_subcode, fault.subcode):
        if subcode is not None:
            parent = etree.SubElement(parent, qname(SOAP12, "Subcode"))
            etree.SubElement(parent, qname(SOAP12, "Value")).text = subcode
    reason = etree.SubElement(element, qname(SOAP12, "Reason"))
    text = etree.SubElement(reason, qname(SOAP12, "Text"))
    text.set(_XML_LANG, "en")
    text.text = fault.reason
    detail = fault.detail_element()
    if detail is not None:
        etree.SubElement(element, qname(SOAP12, "Detail")).append(detail)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")

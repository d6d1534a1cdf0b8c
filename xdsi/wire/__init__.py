"""The wire: SOAP 1.2, WS-Addressing 1.0, streamed MTOM/XOP, faults, a client.

Implements the web-service profile of ITI TF-2x Appendix V that every XDS.b
and XDS-I.b transaction travels on; knows no actor.
"""

from xdsi.wire.client import ACCEPT_ENCODING, SoapClient
from xdsi.wire.faults import (
    FAULT_ACTION,
    ActionMismatch,
    ActionNotSupported,
    AnswerTooLarge,
    MalformedMessage,
    MessageAddressingHeaderRequired,
    MissingAttachment,
    PeerFault,
    ReceiverFault,
    RequestTooLarge,
    SoapFault,
    SpoolError,
    TransportError,
    UnreadableBody,
    UnsupportedMediaType,
    VersionMismatch,
    WireError,
    fault_envelope,
)
from xdsi.wire.mtom import (
    Attachment,
    OutgoingPart,
    attachment_for,
    new_content_id,
    read_message,
    write_message,
    xop_include,
)
from xdsi.wire.soap import (
    ANONYMOUS,
    SoapMessage,
    build_envelope,
    parse_envelope,
    serialize,
)
from xdsi.wire.xml import parse_xml

# The pace, in bytes a second on average, that this node asks of a peer's
# answer (SoapClient's min_rate), pausing the client's timeout at most: what
# the node asks of a request body it serves (README, HTTP), so that a peer
# trickling its answer (a byte every few seconds) cannot hold the exchange
# forever. A 1 GB RAD-69 answer at 2 MB/s never comes near it.
ANSWER_PACE = 8 * 1024

__all__ = [
    "ACCEPT_ENCODING",
    "ANONYMOUS",
    "ANSWER_PACE",
    "FAULT_ACTION",
    "ActionMismatch",
    "ActionNotSupported",
    "AnswerTooLarge",
    "Attachment",
    "MalformedMessage",
    "MessageAddressingHeaderRequired",
    "MissingAttachment",
    "OutgoingPart",
    "PeerFault",
    "ReceiverFault",
    "RequestTooLarge",
    "SoapClient",
    "SoapFault",
    "SoapMessage",
    "SpoolError",
    "TransportError",
    "UnreadableBody",
    "UnsupportedMediaType",
    "VersionMismatch",
    "WireError",
    "attachment_for",
    "build_envelope",
    "fault_envelope",
    "new_content_id",
    "parse_envelope",
    "parse_xml",
    "read_message",
    "serialize",
    "write_message",
    "xop_include",
]

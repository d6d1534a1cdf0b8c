"""Safe XML parsing for everything a peer sends.

Implements the SOAP 1.2 Part 1 5 rule that a SOAP message carries no
document type declaration, and so refuses every DTD and entity declaration
(closing XML external entity and entity expansion attacks).
"""

import re

from lxml import etree
from lxml.etree import _Element

from xdsi.wire.faults import MalformedMessage

# Characters XML 1.0 cannot carry, even escaped (XML 1.0 2.2, Char): C0
# controls but TAB, LF and CR, surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: object) -> str:
    """``value`` as text with each character XML 1.0 cannot carry replaced
    by U+FFFD (Unicode 4.8, REPLACEMENT CHARACTER), so that free text a
    peer or an image gave (a control character in a Study Description, a
    PID-3, a syslog message) can be written into an XML document at all."""
    return _NOT_XML.sub("\ufffd", str(value))


def parse_xml(data: bytes) -> _Element:
    """Parse ``data`` and return its root element.

    External entities, DTDs and the network are never loaded, entities are
    never expanded and lxml's size guards stay on. A document with any DOCTYPE
    (and so any entity declaration) is refused, as SOAP 1.2 Part 1 5 demands.

    Raises
    ------
    MalformedMessage
        The data is not well-formed XML or holds a document type declaration.
    """
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise MalformedMessage(f"the message is not well-formed XML: {exc}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise MalformedMessage(
            "the message holds a document type declaration; SOAP 1.2 Part 1 5 "
            "forbids one"
        )
    return root

"""Safe XML parsing for everything a peer sends.

Implements the SOAP 1.2 Part 1 5 rule that a SOAP message carries no
document type declaration, and so refuses every DTD and entity declaration
(closing XML external entity and entity expansion attacks).
"""

from lxml import etree
from lxml.etree import _Element

from xdsi.wire.faults import MalformedMessage


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

"""``xdsi audit list --xml``: the audit messages as one XML document."""

from __future__ import annotations

from lxml import etree

from xdsi.cli import _xml_document


def test_messages_and_a_malformed_record_make_one_document() -> None:
    """Each AuditMessage (DICOM PS3.15 A.5) without its own declaration, and
    a record that is not XML as escaped text, in one AuditMessages element."""
    messages = [
        b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage><A/></AuditMessage>',
        b"<AuditMessage><B/></AuditMessage>",
        b"not <xml> & broken",
    ]

    document = etree.fromstring(_xml_document(messages).encode("utf-8"))

    assert document.tag == "AuditMessages"
    assert [m.tag for m in document] == [
        "AuditMessage",
        "AuditMessage",
        "MalformedRecord",
    ]
    assert document[2].text == "not <xml> & broken"

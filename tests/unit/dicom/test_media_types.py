"""Which media type an Accept header takes (RFC 9110 12.5.1, DICOM PS3.18
8.7): the weighing STOW-RS, WADO-RS metadata and QIDO-RS answers share."""

from __future__ import annotations

import pytest

from xdsi.dicom.media_types import (
    DICOM_JSON_TYPE,
    JSON_TYPE,
    MULTIPART_XML_TYPE,
    preferred,
)

OFFERED = (DICOM_JSON_TYPE, JSON_TYPE, MULTIPART_XML_TYPE)
XML = 'multipart/related; type="application/dicom+xml"'


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, DICOM_JSON_TYPE),
        ("", DICOM_JSON_TYPE),
        ("*/*", DICOM_JSON_TYPE),
        (XML, MULTIPART_XML_TYPE),
        (f"{XML}; charset=utf-8", MULTIPART_XML_TYPE),
        (f"{XML}; level=1", None),
        ("multipart/*", MULTIPART_XML_TYPE),
        (f"*/*;q=0.9, {XML};q=0.8", DICOM_JSON_TYPE),
        (f"{XML}, application/dicom+json", DICOM_JSON_TYPE),
        (f"multipart/*;q=0.1, {XML};q=0", None),
        ("application/dicom+json;q=0, application/*", JSON_TYPE),
        (f"{XML};q=1.5", None),
        (f"{XML};q=1.5, application/json;q=0.2", JSON_TYPE),
        ("multipart/related; type=application/dicom+xml", MULTIPART_XML_TYPE),
        (
            "multipart/related;type=application/dicom+xml;q=0.5, */*;q=0.1",
            MULTIPART_XML_TYPE,
        ),
        ("multipart/related; type=application/dicom", None),
    ],
    ids=[
        "absent",
        "empty",
        "anything",
        "xml",
        "utf-8-charset",
        "parameter-not-offered",
        "multipart-wildcard",
        "wildcard-weighed-higher",
        "tie-goes-to-the-first",
        "most-specific-range-refuses",
        "json-as-json",
        "q-above-1-left-out",
        "q-above-1-and-json",
        "xml-type-unquoted",
        "xml-type-unquoted-weighed",
        "other-type-unquoted",
    ],
)
def test_the_most_specific_matching_range_weighs(
    accept: str | None, expected: object
) -> None:
    """RFC 9110 12.5.1: the weight of the most specific range matching each
    media type offered; RFC 9110 12.4.2: a range whose q is no qvalue is
    malformed and left out; DICOM PS3.18 8.7.8.1: None is a 406."""
    assert preferred(accept, OFFERED) == expected

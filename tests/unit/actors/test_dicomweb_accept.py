"""WADO-RS content negotiation (DICOM PS3.18 8.7.3, RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from werkzeug.exceptions import BadRequest, NotAcceptable

from xdsi.actors.dicomweb import _accepted_dicom, _rendered_media_type

MULTI = 'multipart/related; type="application/dicom"'
MULTI_UPPER = 'MULTIPART/RELATED; TYPE="APPLICATION/DICOM"'
RLE_HALF = f"{MULTI}; transfer-syntax={RLELossless}; q=0.5"


@pytest.mark.parametrize(
    ("accept", "single_allowed", "expected"),
    [
        ("", True, ([ExplicitVRLittleEndian], True)),
        ("*/*", False, ([ExplicitVRLittleEndian], True)),
        (f"{MULTI}; transfer-syntax={RLELossless}", False, ([RLELossless], True)),
        (
            f"application/dicom; transfer-syntax={JPEGBaseline8Bit}, application/dicom",
            True,
            ([JPEGBaseline8Bit, ExplicitVRLittleEndian], False),
        ),
        ("image/jpeg, */*", False, ([ExplicitVRLittleEndian], True)),
        ("multipart/*", False, ([ExplicitVRLittleEndian], True)),
        ("application/*", True, ([ExplicitVRLittleEndian], False)),
        ("Application/DICOM", True, ([ExplicitVRLittleEndian], False)),
        (
            'MULTIPART/RELATED; TYPE="APPLICATION/DICOM"',
            False,
            ([ExplicitVRLittleEndian], True),
        ),
        (
            f"{RLE_HALF}, {MULTI}; transfer-syntax=*",
            False,
            (["*", RLELossless], True),
        ),
        (
            f"application/dicom; q=0.9, {MULTI}",
            True,
            ([ExplicitVRLittleEndian], True),
        ),
    ],
    ids=[
        "none",
        "anything",
        "multipart-syntax",
        "alternatives-in-order",
        "wildcard-in-a-list",
        "multipart-wildcard",
        "application-wildcard",
        "type-case",
        "multipart-case",
        "q-orders",
        "q-picks-the-framing",
    ],
)
def test_accept_names_the_syntaxes_and_framing(
    accept: str, single_allowed: bool, expected: tuple[list[str], bool]
) -> None:
    assert _accepted_dicom(accept, single_allowed) == expected


@pytest.mark.parametrize(
    "accept",
    [
        "image/jpeg",
        f"{MULTI}; q=0",
        "application/dicom",
        f"{MULTI}; q=1.5",
        f"{MULTI}; q=high",
    ],
    ids=[
        "other-type",
        "q-zero",
        "single-part-for-a-study",
        "q-above-1",
        "q-no-number",
    ],
)
def test_nothing_acceptable_is_406(accept: str) -> None:
    """DICOM PS3.18 8.7.8.1: no range takes what the resource is sent in; a
    range whose q is no qvalue (RFC 9110 12.4.2) is malformed and left out,
    as the DICOM JSON and XML answers leave it out."""
    with pytest.raises(NotAcceptable):
        _accepted_dicom(accept, single_allowed=False)


@pytest.mark.parametrize(
    ("accept", "parameter"),
    [
        ("application/dicom, image/png", None),
        ("image/jpeg; q=0.5, application/dicom+xml", None),
        ('MULTIPART/RELATED; TYPE="APPLICATION/DICOM", text/html', None),
        ("application/dicom+json", "image/gif"),
        ("*/*", "application/dicom, image/jpeg"),
    ],
    ids=["dicom-and-png", "q-values", "multipart-case", "across", "in-parameter"],
)
def test_dicom_and_rendered_media_types_at_once_are_a_400(
    accept: str, parameter: str | None
) -> None:
    """DICOM PS3.18 8.7.5: the Acceptable Media Types, of the accept query
    parameter and Accept header together, are of one kind."""
    with pytest.raises(BadRequest, match="8.7.5"):
        _rendered_media_type(accept, parameter, "a rendered image")


@pytest.mark.parametrize(
    ("accept", "parameter", "expected"),
    [
        ("application/dicom; q=0, image/png", None, "image/png"),
        ('multipart/related; type="image/jpeg", application/dicom', None, None),
        ("application/dicom, image/*, */*", None, "image/jpeg"),
        ("application/octet-stream, image/gif", None, "image/gif"),
        ("", None, "image/jpeg"),
    ],
    ids=["q-zero-is-not-accepted", "bulk-data", "wildcards", "octet-stream", "none"],
)
def test_types_of_one_kind_or_neither_are_no_400(
    accept: str, parameter: str | None, expected: str | None
) -> None:
    """DICOM PS3.18 8.7.5 and 8.7.8.1: a range of q 0 is not acceptable,
    wildcards and bulk data types are of neither kind; what is left is
    answered, or else not acceptable (406)."""
    if expected is None:
        with pytest.raises(NotAcceptable):
            _rendered_media_type(accept, parameter, "a rendered image")
    else:
        assert _rendered_media_type(accept, parameter, "a rendered image") == expected

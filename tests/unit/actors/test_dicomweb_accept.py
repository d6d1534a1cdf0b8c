"""WADO-RS content negotiation (DICOM PS3.18 8.7.3, RFC 9110 12.5.1)."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from werkzeug.exceptions import NotAcceptable

from xdsi.actors.dicomweb import _accepted_dicom

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
    ["image/jpeg", f"{MULTI}; q=0", "application/dicom"],
    ids=["other-type", "q-zero", "single-part-for-a-study"],
)
def test_nothing_acceptable_is_406(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        _accepted_dicom(accept, single_allowed=False)

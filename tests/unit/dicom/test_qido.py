"""QIDO-RS attributes read from a header for the index (DICOM PS3.18 10.6,
F.2)."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from xdsi.actors.imaging_source import attribute_columns
from xdsi.cli import bundled_study
from xdsi.dicom import qido, scan

SOURCE = bundled_study() / "S1000" / "I0010.dcm"


def test_scan_keeps_the_attributes_an_answer_carries() -> None:
    """DICOM PS3.18 Tables 10.6.3-3 to 10.6.3-5: each attribute present in
    the header, as DICOM JSON, empty ones included."""
    held = pydicom.dcmread(SOURCE, stop_before_pixels=True)

    header, _ = scan.read_header(SOURCE)

    kept = Dataset.from_json(json.loads(header.attributes or ""))
    present = [k for k in qido.HEADER_ATTRIBUTES if k in held]
    assert [k for k in qido.HEADER_ATTRIBUTES if k in kept] == present
    for keyword in present:
        assert kept[keyword].value == held[keyword].value, keyword
    assert "PixelData" not in kept


def test_a_value_its_vr_does_not_allow_is_left_out() -> None:
    """DICOM PS3.5 6.2: an IS that is no integer cannot be written as DICOM
    JSON; the other attributes are kept all the same."""
    ds = Dataset()
    ds.PatientID = "P1"
    # As read from a file: converted to its VR only when it is asked for.
    ds[0x00200013] = RawDataElement(
        Tag(0x00200013), "IS", 12, b"not a number", 0, False, True
    )

    kept = json.loads(qido.header_attributes(ds))

    assert kept == {"00100020": {"vr": "LO", "Value": ["P1"]}}


def test_an_attribute_written_with_another_vr_is_kept_under_its_own() -> None:
    """DICOM PS3.18 F.2.3: an answer carries the dictionary VR."""
    ds = Dataset()
    ds.add(DataElement(0x00100020, "SH", "P1"))

    kept = json.loads(qido.header_attributes(ds))

    assert kept["00100020"]["vr"] == "LO"


@pytest.mark.parametrize(
    ("element", "column"),
    [
        (None, ""),
        ({"vr": "LO"}, ""),
        ({"vr": "LO", "Value": ["P1"]}, "P1"),
        ({"vr": "LO", "Value": ["P1", "P2"]}, None),
        ({"vr": "LO", "Value": ["x" * (qido.MAX_INDEXED_LENGTH + 1)]}, None),
    ],
    ids=["absent", "empty", "single", "several", "too-long"],
)
def test_index_columns_hold_single_values_only(
    element: dict | None, column: str | None
) -> None:
    """DICOM PS3.4 C.2.2.2: a column matches exactly a single value; it is
    NULL where it could not, and the attributes are matched instead."""
    attributes = json.dumps({} if element is None else {"00100020": element})

    assert attribute_columns(attributes)["dicom_patient_id"] == column


@pytest.mark.parametrize(
    ("element", "column"),
    [
        ({"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}, "doe^jane"),
        (
            {
                "vr": "PN",
                "Value": [
                    {
                        "Alphabetic": "Yamada^Tarou",
                        "Ideographic": "山田^太郎",
                    }
                ],
            },
            "yamada^tarou=山田^太郎",
        ),
        ({"vr": "PN", "Value": [{"Alphabetic": "STRAẞE^Ida"}]}, "strasse^ida"),
        ({"vr": "PN", "Value": [{"Alphabetic": "A"}, {"Alphabetic": "B"}]}, None),
        ({"vr": "PN"}, ""),
    ],
    ids=["alphabetic", "ideographic", "folded", "several", "empty"],
)
def test_patient_name_is_indexed_case_folded_as_names_are_matched(
    element: dict, column: str | None
) -> None:
    """DICOM PS3.4 C.2.2.2.1: this node matches PN without regard to case;
    the column keeps the name's text, every component group, case-folded."""
    attributes = json.dumps({"00100010": element})

    assert attribute_columns(attributes)["patient_name"] == column

"""The Native DICOM Model writer (DICOM PS3.19 A.1) over DICOM JSON (DICOM
PS3.18 F.2); every document is validated against the schema of A.1.6."""

from __future__ import annotations

import pydicom
import pytest
from lxml import etree
from pydicom.dataset import Dataset

from tests.conftest import assert_native_dicom_model, dicom_path
from xdsi.dicom.native_xml import NATIVE_DICOM_MODEL, native_dicom_model

NS = {"n": NATIVE_DICOM_MODEL}


def _attribute(root: etree._Element, tag: str) -> etree._Element:
    (found,) = root.xpath(f"n:DicomAttribute[@tag='{tag}']", namespaces=NS)
    return found


def test_person_name_groups_are_split_into_their_components() -> None:
    """DICOM PS3.19 Table A.1.5-2: a PN value is a PersonName with an
    Alphabetic, Ideographic and Phonetic group, each of the name components
    it holds, in the order of DICOM PS3.5 6.2."""
    root = assert_native_dicom_model(
        native_dicom_model(
            {
                "00100010": {
                    "vr": "PN",
                    "Value": [
                        {
                            "Alphabetic": "Yamada^Tarou^^Dr^Jr",
                            "Ideographic": "山田^太郎",
                            "Phonetic": "やまだ^たろう",
                        },
                        None,
                        {"Alphabetic": "^^Middle"},
                    ],
                }
            }
        )
    )

    names = _attribute(root, "00100010")
    assert names.get("keyword") == "PatientName"
    first, empty, third = names
    assert first.get("number") == "1"
    alphabetic = first.find("n:Alphabetic", NS)
    assert [(etree.QName(c).localname, c.text) for c in alphabetic] == [
        ("FamilyName", "Yamada"),
        ("GivenName", "Tarou"),
        ("NamePrefix", "Dr"),
        ("NameSuffix", "Jr"),
    ]
    assert first.findtext("n:Ideographic/n:FamilyName", namespaces=NS) == "山田"
    assert first.findtext("n:Phonetic/n:GivenName", namespaces=NS) == "たろう"
    assert (empty.get("number"), len(empty)) == ("2", 0)
    assert third.findtext("n:Alphabetic/n:MiddleName", namespaces=NS) == "Middle"


def test_private_data_element_carries_its_creator_and_block_less_tag() -> None:
    """DICOM PS3.19 Table A.1.5-2: a Private Data Element (gggg,xxee) goes
    as gggg00ee with its Private Creator as privateCreator, no keyword; the
    Private Creator Data Element goes as it is."""
    root = assert_native_dicom_model(
        native_dicom_model(
            {
                "00091010": {"vr": "LO", "Value": ["a private value"]},
                "00090010": {"vr": "LO", "Value": ["XDSI TEST"]},
                "00111001": {"vr": "LO", "Value": ["no creator"]},
            }
        )
    )

    creator, value, orphan = root
    assert (creator.get("tag"), creator.get("privateCreator")) == ("00090010", None)
    assert value.get("tag") == "00090010"
    assert value.get("privateCreator") == "XDSI TEST"
    assert value.get("keyword") is None
    assert value.findtext("n:Value", namespaces=NS) == "a private value"
    assert (orphan.get("tag"), orphan.get("privateCreator")) == ("00111001", None)


def test_values_binaries_sequences_and_empty_attributes() -> None:
    """DICOM PS3.19 Table A.1.5-2: one Value per value, numbered from 1, an
    empty one without text; BulkData by its URI; InlineBinary as base64;
    an Item per sequence item; an empty attribute without children; no
    Group Length (A.1.1)."""
    root = assert_native_dicom_model(
        native_dicom_model(
            {
                "00080000": {"vr": "UL", "Value": [12]},
                "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
                "00281050": {"vr": "DS", "Value": [40.5]},
                "00200013": {"vr": "IS", "Value": [7]},
                "00080050": {"vr": "SH"},
                "7FE00010": {"vr": "OW", "BulkDataURI": "http://127.0.0.1/b/7FE00010"},
                "00420011": {"vr": "OB", "InlineBinary": "AAEC"},
                "00081115": {
                    "vr": "SQ",
                    "Value": [{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}, {}],
                },
            }
        )
    )

    assert "00080000" not in root.xpath("n:DicomAttribute/@tag", namespaces=NS)
    assert [(v.get("number"), v.text) for v in _attribute(root, "00080008")] == [
        ("1", "ORIGINAL"),
        ("2", None),
        ("3", "AXIAL"),
    ]
    assert _attribute(root, "00281050").findtext("n:Value", namespaces=NS) == "40.5"
    assert _attribute(root, "00200013").findtext("n:Value", namespaces=NS) == "7"
    assert len(_attribute(root, "00080050")) == 0
    (bulk,) = _attribute(root, "7FE00010")
    assert bulk.get("uri") == "http://127.0.0.1/b/7FE00010"
    assert _attribute(root, "00420011").findtext("n:InlineBinary", namespaces=NS) == (
        "AAEC"
    )
    first, second = _attribute(root, "00081115")
    assert first.get("number") == "1"
    assert _attribute(first, "0020000E").findtext("n:Value", namespaces=NS) == "1.2.3"
    assert (second.get("number"), len(second)) == ("2", 0)
    assert root.get("{http://www.w3.org/XML/1998/namespace}space") == "preserve"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        ("A\x01B", "A\ufffdB"),
        ("page\x0cbreak", "page\ufffdbreak"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("tab\tline\r\nend", "tab\tline\r\nend"),
    ],
    ids=["c0-control", "form-feed", "surrogate", "allowed-white-space"],
)
def test_characters_xml_cannot_carry_are_replaced_not_a_failure(
    value: str, sent: str
) -> None:
    """XML 1.0 2.2: a value holding a character no XML document may hold
    is sent with U+FFFD in its place, in values, name components and a
    Private Creator alike, not refused by lxml."""
    root = assert_native_dicom_model(
        native_dicom_model(
            {
                "00081030": {"vr": "LO", "Value": [value]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": value}]},
                "00190010": {"vr": "LO", "Value": [value]},
                "00191001": {"vr": "LT", "Value": [value]},
            }
        )
    )

    assert _attribute(root, "00081030").findtext("n:Value", namespaces=NS) == sent
    assert root.findtext(".//n:FamilyName", namespaces=NS) == sent
    (private,) = root.xpath("n:DicomAttribute[@privateCreator]", namespaces=NS)
    assert private.get("privateCreator") == sent


def test_every_attribute_of_a_real_instance_is_written() -> None:
    """DICOM PS3.19 A.1: every attribute of an instance with names,
    sequences and private attributes is a DicomAttribute, in tag order."""
    ds = pydicom.dcmread(
        dicom_path("singles", "mg-screening-jpegll__GH133.dcm"),
        stop_before_pixels=True,
    )
    attributes = ds.to_json_dict(
        bulk_data_element_handler=lambda element: f"http://127.0.0.1/{element.tag}",
        bulk_data_threshold=4096,
    )

    root = assert_native_dicom_model(native_dicom_model(attributes))

    written = len(root.xpath("n:DicomAttribute", namespaces=NS))
    assert written == len([key for key in attributes if not key.endswith("0000")])
    assert root.xpath("n:DicomAttribute[@vr='SQ']/n:Item", namespaces=NS)
    assert root.xpath("n:DicomAttribute[@privateCreator]", namespaces=NS)
    assert root.xpath("n:DicomAttribute/n:BulkData", namespaces=NS)
    assert Dataset.from_json(attributes).SOPInstanceUID == root.findtext(
        "n:DicomAttribute[@keyword='SOPInstanceUID']/n:Value", namespaces=NS
    )

"""The Native DICOM Model: a data set in DICOM JSON written as XML.

Implements DICOM PS3.19 A.1 (Table A.1.5-1 and the schema of A.1.6) for
the attributes of the DICOM JSON Model (DICOM PS3.18 F.2), the form the
DICOMweb services build their answers in: WADO-RS metadata (DICOM PS3.18
10.4.3.3.2), QIDO-RS results (10.6.3.3) and the Store Instances Response
Module of STOW-RS (10.5.3) go as ``application/dicom+xml`` documents of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lxml import etree
from pydicom.datadict import keyword_for_tag

from xdsi.wire.xml import xml_text

# DICOM PS3.19 A.1: the namespace of the Native DICOM Model.
NATIVE_DICOM_MODEL = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"

# DICOM PS3.18 F.2.3: the members of an attribute's object.
VALUE, BULK_DATA_URI, INLINE_BINARY = "Value", "BulkDataURI", "InlineBinary"
# DICOM PS3.18 F.2.2: the component groups of a PN value, as DICOM JSON and
# the Native DICOM Model both name them.
NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# DICOM PS3.19 Table 10.2-1 elements, in the order of DICOM PS3.5 6.2's
# components of a name group.
NAME_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")

_DICOM_ATTRIBUTE = f"{{{NATIVE_DICOM_MODEL}}}DicomAttribute"


def native_dicom_model(attributes: Mapping[str, Any]) -> bytes:
    """A data set in DICOM JSON (DICOM PS3.18 F.2) as a Native DICOM Model
    document (DICOM PS3.19 A.1), UTF-8 with an XML declaration.

    Each attribute becomes a DicomAttribute, in the order of its tag, with
    its Values, PersonNames (each component group split into its name
    components), sequence Items, BulkData (its URI) or InlineBinary, and
    none of them when it is empty. Group Length attributes are left out
    (DICOM PS3.19 A.1.1). A private attribute carries its Private Creator
    and no keyword (DICOM PS3.19 Table A.1.5-2).

    Limitation: a character that XML 1.0 cannot carry (a C0 control other
    than tab, line feed and carriage return, such as the form feed DICOM
    PS3.5 6.2 allows in LT, ST and UT values) is sent as U+FFFD; the DICOM
    JSON answer carries it as it is held.
    """
    root = etree.Element(
        f"{{{NATIVE_DICOM_MODEL}}}NativeDicomModel", nsmap={None: NATIVE_DICOM_MODEL}
    )
    # DICOM PS3.19 Table A.1.5-1: the values' white space is kept.
    root.set(XML_SPACE, "preserve")
    _add_attributes(root, attributes)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _add_attributes(
    parent: etree._Element, attributes: Mapping[str, Mapping[str, Any]]
) -> None:
    """Add a DicomAttribute to ``parent`` for each attribute of a data set."""
    for key in sorted(attributes):
        tag = int(key, 16)
        if tag & 0xFFFF == 0:
            # DICOM PS3.19 A.1.1: Group Length is never included.
            continue
        element = attributes[key]
        vr = _vr(element.get("vr", "UN"))
        node = etree.SubElement(parent, _DICOM_ATTRIBUTE, tag=key.upper(), vr=vr)
        if tag >> 16 & 1:
            _name_private(node, tag, attributes)
        elif keyword := keyword_for_tag(tag):
            node.set("keyword", keyword)
        _add_value(node, vr, element)


def _name_private(
    node: etree._Element, tag: int, attributes: Mapping[str, Mapping[str, Any]]
) -> None:
    """Give the DicomAttribute ``node`` of a private tag its Private Creator.

    DICOM PS3.19 Table A.1.5-2: a Private Data Element (gggg,xxee) goes as
    tag gggg00ee with the value of its Private Creator Data Element
    (gggg,00xx), PS3.5 7.8.1, as privateCreator; the block xx is not sent.
    A Private Creator Data Element itself goes as it is.

    Limitation: a Private Data Element whose Private Creator Data Element
    the data set lacks (or holds empty) keeps its own tag and goes without
    a privateCreator, which the Native DICOM Model wants of it.
    """
    group, element = tag >> 16, tag & 0xFFFF
    if element < 0x1000:
        return
    creator = attributes.get(f"{group:04X}{element >> 8:04X}", {}).get(VALUE) or []
    if creator and isinstance(creator[0], str) and creator[0]:
        node.set("tag", f"{group:04X}00{element & 0xFF:02X}")
        node.set("privateCreator", xml_text(creator[0]))


def _add_value(node: etree._Element, vr: str, element: Mapping[str, Any]) -> None:
    """Add the Value Field of one DICOM JSON attribute to ``node``."""
    if BULK_DATA_URI in element:
        # DICOM PS3.19 Table A.1.5-2: one BulkData for the whole Value
        # Field, naming it by the URI a WADO-RS user agent retrieves.
        etree.SubElement(
            node,
            f"{{{NATIVE_DICOM_MODEL}}}BulkData",
            uri=xml_text(element[BULK_DATA_URI]),
        )
        return
    if INLINE_BINARY in element:
        inline = etree.SubElement(node, f"{{{NATIVE_DICOM_MODEL}}}InlineBinary")
        inline.text = xml_text(element[INLINE_BINARY])
        return
    for number, value in enumerate(element.get(VALUE) or [], start=1):
        if vr == "SQ":
            item = etree.SubElement(
                node, f"{{{NATIVE_DICOM_MODEL}}}Item", number=str(number)
            )
            _add_attributes(item, value or {})
        elif vr == "PN":
            _add_person_name(node, number, value)
        else:
            # DICOM PS3.19 Table A.1.5-2: an empty value of several (null in
            # DICOM JSON, PS3.18 F.2.5) is a Value without text.
            child = etree.SubElement(
                node, f"{{{NATIVE_DICOM_MODEL}}}Value", number=str(number)
            )
            if value is not None:
                child.text = xml_text(value)


def _add_person_name(node: etree._Element, number: int, value: object) -> None:
    """Add a PersonName of a DICOM JSON PN value (DICOM PS3.18 F.2.2) to
    ``node``: each component group present, each split at "^" into the name
    components that are not empty (DICOM PS3.19 A.1.5, PS3.5 6.2).

    Limitation: a group of more than five components (PS3.5 6.2 allows
    five) has the sixth and later joined to the name suffix with "^".
    """
    person_name = etree.SubElement(
        node, f"{{{NATIVE_DICOM_MODEL}}}PersonName", number=str(number)
    )
    groups = {"Alphabetic": value} if isinstance(value, str) else value
    if not isinstance(groups, Mapping):
        return
    for group in NAME_GROUPS:
        text = groups.get(group)
        if not text:
            continue
        components = str(text).split("^", len(NAME_COMPONENTS) - 1)
        written = etree.SubElement(person_name, f"{{{NATIVE_DICOM_MODEL}}}{group}")
        for name, component in zip(NAME_COMPONENTS, components, strict=False):
            if component:
                child = etree.SubElement(written, f"{{{NATIVE_DICOM_MODEL}}}{name}")
                child.text = xml_text(component)


def _vr(vr: str) -> str:
    """A VR as the Native DICOM Model names it: the first of those an
    ambiguous VR of the data dictionary names ("US or SS"), which a data
    set read without its VRs may keep (DICOM PS3.5 Annex A)."""
    return vr.split(" or ")[0]

"""Tests of xdsi.metadata.ebrim: the ids a Document Registry reads.

RFC 4122 3: a UUID's hex digits are case insensitive on input and output in
lower case; ITI TF-3 4.2.3.1.2: symbolic ids are the submitter's own.
"""

from __future__ import annotations

from lxml import etree

from tests.nist_submissions import (
    UNIQUE_ID_SCHEMES,
    in_upper_case,
    nist_submission,
    upper_case_uuid,
)
from xdsi import ns
from xdsi.metadata import ebrim
from xdsi.metadata.validation import assign_entry_uuids

PATIENT_ID = "PAT-a1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"


def _values(request: etree._Element) -> list[str]:
    """Every ExternalIdentifier value and Slot value, in document order."""
    return [
        element.get("value") or element.text or ""
        for element in request.iter(
            f"{{{ns.RIM}}}ExternalIdentifier", f"{{{ns.RIM}}}Value"
        )
    ]


def test_canonical_id_lowers_uuids_only() -> None:
    """RFC 4122 3: only a urn:uuid: id is case insensitive."""
    entry_uuid = ebrim.new_uuid()

    assert ebrim.canonical_id(upper_case_uuid(entry_uuid)) == entry_uuid
    assert ebrim.canonical_id("Document01") == "Document01"
    assert ebrim.canonical_id(entry_uuid.upper()) == entry_uuid.upper()


def test_canonicalise_ids_lowers_every_id_and_reference() -> None:
    """RFC 4122 3: ids, lids and the references to them, in lower case."""
    request = nist_submission("iti42-12346-doc_w_fol", {"$patientid$": PATIENT_ID})
    assign_entry_uuids(ebrim.read_registry_objects(request))
    expected = etree.tostring(request)
    in_upper_case(request, ebrim.ID_ATTRIBUTES)
    assert etree.tostring(request) != expected

    ebrim.canonicalise_ids(request)

    assert etree.tostring(request) == expected


def test_canonicalise_ids_keeps_symbolic_ids_and_values_as_sent() -> None:
    """ITI TF-3 4.2.3.1.2: symbolic ids, uniqueIds, patient ids and slot
    values are no UUIDs to normalise."""
    request = nist_submission("iti42-12346-doc_w_fol", {"$patientid$": PATIENT_ID})
    # Values that look like UUIDs are values all the same.
    for identifier in request.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
        if identifier.get("identificationScheme") in UNIQUE_ID_SCHEMES:
            identifier.set("value", upper_case_uuid(ebrim.new_uuid()))
    next(request.iter(f"{{{ns.RIM}}}Value")).text = upper_case_uuid(ebrim.new_uuid())
    symbolic = [e.get("id") for e in request.iter() if e.get("id")]
    values = _values(request)

    ebrim.canonicalise_ids(request)

    assert [e.get("id") for e in request.iter() if e.get("id")] == symbolic
    assert _values(request) == values
    assert PATIENT_ID in values

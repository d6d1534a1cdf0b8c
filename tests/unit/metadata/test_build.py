"""Tests of xdsi.metadata.build: the SubmitObjectsRequest of a manifest.

RAD TF-3 4.68.4.1.2.3 on top of ITI TF-3 4.2.3; the request must be valid
against ebRS 3.0 lcm.xsd and read back to the values it was built from.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

from lxml import etree

from tests.conftest import assert_valid
from tests.unit.metadata.test_validation import (
    ENTRY_ID,
    KOS_FORMAT,
    SUBMISSION_SET_ID,
    manifest_entry,
    submission_set_spec,
)
from xdsi import ns
from xdsi.metadata import ebrim
from xdsi.metadata.build import manifest_submission, utc_dtm
from xdsi.metadata.ebrim import read_registry_objects, set_slot
from xdsi.metadata.validation import check_submission, is_dtm

RIM = f"{{{ns.RIM}}}"

# ebRIM 3.0 rim.xsd: the order of a RegistryObject's children.
CHILD_ORDER = [
    "Slot",
    "Name",
    "Description",
    "VersionInfo",
    "Classification",
    "ExternalIdentifier",
]


def _build(**changes: object) -> etree._Element:
    entry = dataclasses.replace(manifest_entry(), **changes)
    return manifest_submission(entry, submission_set_spec(entry.patient_id))


def test_manifest_submission_reads_back_to_its_entry() -> None:
    """RAD TF-3 4.68.4.1.2.3: every DocumentEntry value is carried."""
    entry = manifest_entry()

    submission = read_registry_objects(_build())
    document_entry = submission.document_entries[0]

    assert document_entry.id == ENTRY_ID
    assert document_entry.unique_id == entry.unique_id
    assert document_entry.patient_id == entry.patient_id
    assert document_entry.mime_type == "application/dicom"
    assert (
        document_entry.object_type
        == (ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY]["object_type_stable"])
    )
    assert document_entry.name == "Manifest"
    assert document_entry.slot("hash") == entry.sha1
    assert document_entry.slot("size") == str(entry.size)
    assert document_entry.slot("sourcePatientId") == entry.source_patient_id
    assert document_entry.slots["sourcePatientInfo"] == list(entry.source_patient_info)
    assert document_entry.slots["urn:ihe:iti:xds:2013:referenceIdList"] == list(
        entry.reference_ids
    )
    assert document_entry.codes("formatCode") == [KOS_FORMAT]
    assert document_entry.codes("classCode") == [entry.class_code]
    assert document_entry.codes("eventCodeList") == list(entry.event_codes)
    assert document_entry.authors() == [{"authorInstitution": ["xdsi"]}]


def test_manifest_submission_set_reads_back_to_its_spec() -> None:
    """ITI TF-3 4.2.3.3: the SubmissionSet's values are carried."""
    spec = submission_set_spec(manifest_entry().patient_id)

    submission = read_registry_objects(_build())
    submission_set = submission.submission_sets[0]

    assert submission_set.id == SUBMISSION_SET_ID
    assert submission_set.unique_id == spec.unique_id
    assert submission_set.external_id("sourceId") == spec.source_id
    assert submission_set.patient_id == spec.patient_id
    assert submission_set.codes("contentTypeCode") == [spec.content_type_code]
    assert submission_set.slot("submissionTime") == spec.submission_time


def test_manifest_is_a_has_member_of_its_submission_set() -> None:
    """ITI TF-3 4.2.2.1: one HasMember Association, status Original."""
    associations = read_registry_objects(_build()).associations

    assert len(associations) == 1
    assert associations[0].association_type == ebrim.HAS_MEMBER
    assert associations[0].source_object == SUBMISSION_SET_ID
    assert associations[0].target_object == ENTRY_ID
    assert associations[0].slots == {"SubmissionSetStatus": ["Original"]}


def test_optional_values_left_out_give_a_valid_request() -> None:
    """ITI TF-3 4.2.3.2: service times and reference ids are R2 and O."""
    request = _build(
        service_start_time=None,
        service_stop_time=None,
        source_patient_info=(),
        reference_ids=(),
        event_codes=(),
    )
    assert_valid(request, "ebRS/lcm.xsd")

    document_entry = read_registry_objects(request).document_entries[0]

    assert "serviceStartTime" not in document_entry.slots
    assert "serviceStopTime" not in document_entry.slots
    assert "sourcePatientInfo" not in document_entry.slots
    assert "urn:ihe:iti:xds:2013:referenceIdList" not in document_entry.slots
    assert document_entry.codes("eventCodeList") == []
    # What the Document Repository adds before ITI-42 (ITI TF-2 3.41.4.1.3).
    set_slot(document_entry.element, "repositoryUniqueId", ["1.2.3.4"])
    assert check_submission(read_registry_objects(request)) == []


def test_children_follow_the_ebrim_order() -> None:
    """ebRIM 3.0 rim.xsd: Slot, Name, Classification, ExternalIdentifier."""
    request = _build()
    for element in request.iter(f"{RIM}ExtrinsicObject", f"{RIM}RegistryPackage"):
        names = [etree.QName(child).localname for child in element]
        ranks = [
            CHILD_ORDER.index(n) if n in CHILD_ORDER else len(CHILD_ORDER)
            for n in names
        ]

        assert ranks == sorted(ranks), names


def test_every_classification_and_identifier_has_a_fresh_uuid() -> None:
    """ITI TF-3 4.2.3.1.2: ids of nested objects are UUIDs, none repeated."""
    request = _build()
    ids = [
        element.get("id")
        for element in request.iter(f"{RIM}Classification", f"{RIM}ExternalIdentifier")
    ]

    assert all(ebrim.is_uuid(i) for i in ids)
    assert len(ids) == len(set(ids))


def test_utc_dtm_is_a_dtm_in_utc_to_the_second() -> None:
    """ITI TF-3 4.2.3.1.6: times are UTC, here to the second."""
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))

    assert utc_dtm(moment) == "20240102010405"
    assert is_dtm(utc_dtm())
    assert utc_dtm(datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)) == (
        "20240102030405"
    )

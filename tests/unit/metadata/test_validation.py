"""Tests of xdsi.metadata.validation: a valid submission, one rule broken.

Rules of ITI TF-3 4.1.4, 4.2.2 and 4.2.3, and RAD TF-3 4.68.4.1.2.3 for the
imaging manifest's DocumentEntry.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from pathlib import Path
from xml.sax.saxutils import escape

import pydicom
import pytest
from lxml import etree

from tests.conftest import assert_valid, dicom_path, shared_path
from xdsi import ns
from xdsi.errors import (
    DuplicateUniqueIdInMessage,
    MetadataInvalid,
    PatientIdDoesNotMatch,
    UnresolvedReference,
    XdsError,
)
from xdsi.metadata import ebrim
from xdsi.metadata.build import ManifestEntry, SubmissionSetSpec, manifest_submission
from xdsi.metadata.codes import Code
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.validation import (
    MAX_PATIENT_ID,
    assign_entry_uuids,
    check_submission,
    is_dtm,
    patient_id_problem,
)

RIM = f"{{{ns.RIM}}}"
ENTRY_ID = "Document01"
SUBMISSION_SET_ID = "SubmissionSet01"
AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
OTHER_PATIENT = f"OTHER-PATIENT^^^&{AUTHORITY}&ISO"
KOS_FORMAT = Code(
    "1.2.840.10008.5.1.4.1.1.88.59",
    "1.2.840.10008.2.6.1",
    "Key Object Selection Document",
)

TABLE = ebrim.metadata_table()


def _required(kind: str) -> list[str]:
    return [
        name
        for name, spec in TABLE[kind]["attributes"].items()
        if spec["required"] == "R"
    ]


# --- the valid submission ------------------------------------------------


def manifest_entry() -> ManifestEntry:
    """The DocumentEntry of the IHE MR test study's reference manifest."""
    path: Path = dicom_path("study-mr", "manifest", "kos.dcm")
    data = path.read_bytes()
    kos = pydicom.dcmread(path)
    patient_id = f"{kos.PatientID}^^^&{AUTHORITY}&ISO"
    return ManifestEntry(
        entry_id=ENTRY_ID,
        unique_id=kos.SOPInstanceUID,
        patient_id=patient_id,
        source_patient_id=patient_id,
        source_patient_info=(f"PID-3|{patient_id}",),
        title="Manifest",
        creation_time="20161220092948",
        service_start_time="200612230800",
        service_stop_time="200612230900",
        event_codes=(Code("MR", "1.2.840.10008.2.16.4", "Magnetic Resonance"),),
        reference_ids=(
            f"{kos.StudyInstanceUID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
        ),
        mime_type="application/dicom",
        format_code=KOS_FORMAT,
        class_code=Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images"),
        type_code=Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging"),
        practice_setting_code=Code("394914008", "2.16.840.1.113883.6.96", "Radiology"),
        healthcare_facility_type_code=Code(
            "22232009", "2.16.840.1.113883.6.96", "Hospital"
        ),
        confidentiality_code=Code("N", "2.16.840.1.113883.5.25", "Normal"),
        language_code="en-US",
        author_institution="xdsi",
        size=len(data),
        sha1=hashlib.sha1(data).hexdigest(),
    )


REPOSITORY_UNIQUE_ID = "2.25.127890502356717902159250805506845543275.1"


def submission_set_spec(patient_id: str) -> SubmissionSetSpec:
    """The SubmissionSet that carries the manifest."""
    return SubmissionSetSpec(
        entry_id=SUBMISSION_SET_ID,
        unique_id="2.25.127890502356717902159250805506845543275.9.1",
        source_id="2.25.127890502356717902159250805506845543275.3",
        patient_id=patient_id,
        content_type_code=Code("18748-4", "2.16.840.1.113883.6.1", "Imaging"),
        author_institution="xdsi",
        submission_time="20240102030405",
    )


def manifest_request() -> etree._Element:
    """The ITI-42 metadata of the IHE MR test study's reference manifest.

    That is the RAD-68 metadata with the repositoryUniqueId that the
    Document Repository adds before registering (ITI TF-2 3.41.4.1.3).
    """
    entry = manifest_entry()
    request = manifest_submission(entry, submission_set_spec(entry.patient_id))
    document_entry = request.find(f".//{RIM}ExtrinsicObject")
    ebrim.set_slot(document_entry, "repositoryUniqueId", [REPOSITORY_UNIQUE_ID])
    return request


@pytest.fixture
def request_element() -> etree._Element:
    return manifest_request()


def _object(request: etree._Element, object_id: str) -> etree._Element:
    return request.find(f".//{RIM}RegistryObjectList/*[@id='{object_id}']")


def _external_identifier(
    request: etree._Element, object_id: str, kind: str, attribute: str
) -> etree._Element:
    scheme = ebrim.attribute_spec(kind, attribute)["scheme"]
    return _object(request, object_id).find(
        f"{RIM}ExternalIdentifier[@identificationScheme='{scheme}']"
    )


def _slot_value(request: etree._Element, object_id: str, name: str) -> etree._Element:
    return _object(request, object_id).find(
        f"{RIM}Slot[@name='{name}']/{RIM}ValueList/{RIM}Value"
    )


def _errors(request: etree._Element) -> list[XdsError]:
    return check_submission(read_registry_objects(request))


def _single_error(request: etree._Element) -> XdsError:
    errors = _errors(request)
    assert len(errors) == 1, [f"{type(e).__name__}: {e}" for e in errors]
    return errors[0]


def _remove(request: etree._Element, kind: str, attribute: str) -> None:
    """Remove every trace of one attribute from the object of ``kind``."""
    object_id = ENTRY_ID if kind == ebrim.DOCUMENT_ENTRY else SUBMISSION_SET_ID
    element = _object(request, object_id)
    spec = ebrim.attribute_spec(kind, attribute)
    if spec["kind"] == "external_identifier":
        element.remove(_external_identifier(request, object_id, kind, attribute))
    elif spec["kind"] in ("classification", "author"):
        for child in element.findall(
            f"{RIM}Classification[@classificationScheme='{spec['scheme']}']"
        ):
            element.remove(child)
    elif spec["kind"] == "attribute":
        del element.attrib[spec["name"]]
    else:
        element.remove(element.find(f"{RIM}Slot[@name='{attribute}']"))


def test_valid_manifest_submission_breaks_no_rule(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3, RAD TF-3 4.68.4.1.2.3: the valid fixture passes."""
    submission = read_registry_objects(request_element)

    assert [o.kind for o in submission.objects] == [
        ebrim.DOCUMENT_ENTRY,
        ebrim.SUBMISSION_SET,
        ebrim.ASSOCIATION,
    ]
    assert check_submission(submission) == []


def test_valid_manifest_submission_is_valid_against_lcm_schema(
    request_element: etree._Element,
) -> None:
    """ebRS 3.0 lcm.xsd: the built SubmitObjectsRequest is schema-valid."""
    assert_valid(request_element, "ebRS/lcm.xsd")


def test_read_registry_objects_reads_codes_ids_and_slots(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2: the DocumentEntry's attributes are read from ebRIM."""
    submission = read_registry_objects(request_element)
    entry = submission.document_entries[0]
    kos = pydicom.dcmread(dicom_path("study-mr", "manifest", "kos.dcm"))

    assert entry.unique_id == kos.SOPInstanceUID
    assert entry.patient_id == f"{kos.PatientID}^^^&{AUTHORITY}&ISO"
    assert entry.mime_type == "application/dicom"
    assert entry.codes("formatCode") == [KOS_FORMAT]
    assert entry.slot("creationTime") == "20161220092948"
    assert submission.submission_sets[0].external_id("sourceId") == (
        "2.25.127890502356717902159250805506845543275.3"
    )
    assert submission.associations[0].source_object == SUBMISSION_SET_ID
    assert submission.associations[0].target_object == ENTRY_ID


# --- required attributes -------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "attribute"),
    [(ebrim.DOCUMENT_ENTRY, a) for a in _required(ebrim.DOCUMENT_ENTRY)]
    + [(ebrim.SUBMISSION_SET, a) for a in _required(ebrim.SUBMISSION_SET)],
    ids=lambda value: value,
)
def test_missing_required_attribute_is_metadata_invalid(
    request_element: etree._Element, kind: str, attribute: str
) -> None:
    """ITI TF-3 4.2.3.2, 4.2.3.3: a required ("R") attribute is present."""
    _remove(request_element, kind, attribute)
    object_id = ENTRY_ID if kind == ebrim.DOCUMENT_ENTRY else SUBMISSION_SET_ID

    errors = _errors(request_element)

    # Removing mimeType also breaks the KOS formatCode pairing: both are
    # MetadataInvalid, and the first names the missing attribute.
    assert {type(e) for e in errors} == {MetadataInvalid}, errors
    assert f"{kind} {object_id} has no {attribute}" in str(errors[0])
    assert errors[0].location == object_id


# --- formats -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["2016", "201612", "20161220", "2016122009", "201612200929", "20161220092948"],
)
def test_every_dtm_precision_is_accepted(value: str) -> None:
    """ITI TF-3 4.2.3.1.6: DTM is YYYY[MM[DD[hh[mm[ss]]]]], UTC."""
    assert is_dtm(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "16",
        "20161",
        "20161320",
        "20160230",
        "2016122025",
        "20161220096",
        "2016-12-20",
        "20161220092948.123",
        "20161220092948+0100",
        "201612200929481",
    ],
)
def test_malformed_dtm_is_refused(value: str) -> None:
    """ITI TF-3 4.2.3.1.6: no separators, no fractions, no zone, valid date."""
    assert not is_dtm(value)


def test_creation_time_that_is_no_dtm_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.6: creationTime is a DTM."""
    _slot_value(request_element, ENTRY_ID, "creationTime").text = "20161320"

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert ENTRY_ID in str(error)
    assert "creationTime '20161320' is not a DTM" in str(error)


def test_submission_time_that_is_no_dtm_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.3.11: submissionTime is a DTM."""
    _slot_value(
        request_element, SUBMISSION_SET_ID, "submissionTime"
    ).text = "2024-01-02T03:04:05Z"

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert f"SubmissionSet {SUBMISSION_SET_ID} submissionTime" in str(error)


def test_hash_of_39_hex_digits_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.10: hash is the SHA-1 in 40 hex digits."""
    value = _slot_value(request_element, ENTRY_ID, "hash")
    value.text = value.text[:39]

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == ENTRY_ID
    assert f"{ENTRY_ID} hash has 39 characters" in str(error)


def test_hash_with_non_hex_digit_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.10: hash holds hex digits only."""
    value = _slot_value(request_element, ENTRY_ID, "hash")
    value.text = "g" + value.text[1:]

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "hash" in str(error)


@pytest.mark.parametrize(
    "size", ["-1", "12kB", "1.5", "", "\u0661\u0662", "99999999999999999999999999"]
)
def test_size_that_is_no_non_negative_integer_is_metadata_invalid(
    request_element: etree._Element, size: str
) -> None:
    """ITI TF-3 4.2.3.2.19: size is a non-negative integer of octets."""
    _slot_value(request_element, ENTRY_ID, "size").text = size

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == ENTRY_ID
    assert "size" in str(error)


@pytest.mark.parametrize(
    "patient_id",
    [
        "IDS-DEPT002-a",
        f"IDS-DEPT002-a^^^{AUTHORITY}",
        f"IDS-DEPT002-a^^^&{AUTHORITY}",
        "IDS-DEPT002-a^^^&NOT-AN-OID&ISO",
        f"^^^&{AUTHORITY}&ISO",
    ],
)
def test_patient_id_that_is_no_cx_is_metadata_invalid(
    request_element: etree._Element, patient_id: str
) -> None:
    """ITI TF-3 4.2.3.2.16: patientId is ID^^^&OID&ISO."""
    for object_id, kind in (
        (ENTRY_ID, ebrim.DOCUMENT_ENTRY),
        (SUBMISSION_SET_ID, ebrim.SUBMISSION_SET),
    ):
        _external_identifier(request_element, object_id, kind, "patientId").set(
            "value", patient_id
        )

    errors = _errors(request_element)

    assert [type(e) for e in errors] == [MetadataInvalid, MetadataInvalid]
    assert [e.location for e in errors] == [ENTRY_ID, SUBMISSION_SET_ID]
    assert all("patientId is not a CX" in str(e) for e in errors)


# ITI TF-3 4.2.3.2.16, 4.2.3.1.5: what is wrong with a patientId, by value.
PATIENT_ID_PROBLEMS = {
    "empty": ("", "is empty"),
    "bare ID": ("PAT-1", "is not a CX"),
    "no &ISO": (f"PAT-1^^^&{AUTHORITY}", "is not a CX"),
    "empty ID": (f"^^^&{AUTHORITY}&ISO", "its ID is empty"),
    "ID holding |": (f"PAT|1^^^&{AUTHORITY}&ISO", "its ID holds an HL7 delimiter"),
    "ID holding ~": (f"PAT~1^^^&{AUTHORITY}&ISO", "its ID holds an HL7 delimiter"),
    "ID holding a line break": (
        f"PAT\n1^^^&{AUTHORITY}&ISO",
        "its ID holds an HL7 delimiter (^ & ~ \\ |) or a control character",
    ),
    "authority with blanks": (
        "PAT-1^^^&not an oid&ISO",
        "assigning authority is not an ISO OID",
    ),
    "authority of one arc": ("PAT-1^^^&1&ISO", "assigning authority is not an ISO OID"),
    "authority with an empty arc": (
        "PAT-1^^^&1..2&ISO",
        "assigning authority is not an ISO OID",
    ),
    "too long": (
        "P" * MAX_PATIENT_ID + f"^^^&{AUTHORITY}&ISO",
        f"at most {MAX_PATIENT_ID}",
    ),
}


@pytest.mark.parametrize(
    ("patient_id", "problem"),
    PATIENT_ID_PROBLEMS.values(),
    ids=PATIENT_ID_PROBLEMS.keys(),
)
def test_patient_id_problem_names_the_part_that_is_wrong(
    patient_id: str, problem: str
) -> None:
    """ITI TF-3 4.2.3.2.16: patientId is ID^^^&OID&ISO, the OID of ITI TF-3
    4.2.3.1.5; the reason names no part of the value."""
    found = patient_id_problem(patient_id)

    assert found is not None and problem in found
    assert "PAT" not in found and "not an oid" not in found


def test_patient_id_of_the_affinity_domain_has_no_problem() -> None:
    """ITI TF-3 4.2.3.2.16: ID^^^&OID&ISO, blanks inside the ID allowed."""
    assert patient_id_problem(f"PAT 1-A.b^^^&{AUTHORITY}&ISO") is None


def test_patient_id_whose_authority_is_no_oid_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.16, 4.2.3.1.5: the assigning authority is an OID."""
    _external_identifier(
        request_element, SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "patientId"
    ).set("value", "IDS-DEPT002-a^^^&1..2&ISO")

    errors = _errors(request_element)

    assert MetadataInvalid in [type(e) for e in errors]
    assert any("assigning authority is not an ISO OID" in str(e) for e in errors)


@pytest.mark.parametrize("unique_id", ["1.2.3.abc", "1.02.3", "3.1.2", "1.2.3^"])
def test_document_unique_id_that_is_no_oid_is_metadata_invalid(
    request_element: etree._Element, unique_id: str
) -> None:
    """ITI TF-3 4.2.3.2.26: DocumentEntry uniqueId is OID[^extension]."""
    _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, "uniqueId"
    ).set("value", unique_id)

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert f"uniqueId {unique_id!r} is not an OID" in str(error)


@pytest.mark.parametrize("attribute", ["patientId", "uniqueId"])
def test_a_second_identifier_of_one_scheme_is_metadata_invalid(
    request_element: etree._Element, attribute: str
) -> None:
    """ITI TF-3 4.2.3.2.16, 4.2.3.2.26: patientId and uniqueId are 1..1; a
    second ExternalIdentifier of the scheme (naming another patient, or
    another document) is not read past."""
    identifier = _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, attribute
    )
    second = copy.deepcopy(identifier)
    second.set("id", f"urn:uuid:{uuid.uuid4()}")
    identifier.addnext(second)

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert f"has 2 values of {attribute}; one is allowed" in str(error)


@pytest.mark.parametrize(
    ("object_id", "kind", "attribute", "value"),
    [
        (ENTRY_ID, ebrim.DOCUMENT_ENTRY, "uniqueId", "1.2.3\n"),
        (SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "uniqueId", "1.2.3\n"),
        (SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "sourceId", "1.2.3\n"),
        (ENTRY_ID, ebrim.DOCUMENT_ENTRY, "patientId", f"ID^^^&{AUTHORITY}&ISO\n"),
        (ENTRY_ID, ebrim.DOCUMENT_ENTRY, "uniqueId", "1." + "2" * 70),
    ],
    ids=["entry-newline", "set-newline", "source-newline", "cx-newline", "long"],
)
def test_an_identifier_with_a_final_newline_or_too_long_is_metadata_invalid(
    request_element: etree._Element,
    object_id: str,
    kind: str,
    attribute: str,
    value: str,
) -> None:
    """ITI TF-3 4.2.3.1.5: an OID is digits and dots, at most 64 of them;
    a final newline makes another value, not the same one."""
    _external_identifier(request_element, object_id, kind, attribute).set(
        "value", value
    )

    errors = _errors(request_element)

    assert any(type(e) is MetadataInvalid and attribute in str(e) for e in errors)


def test_a_lid_naming_another_object_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2 (logicalID): ITI-42 registers first versions, whose
    lid is their own id; a lid naming another entry would make this one a
    version of it."""
    _object(request_element, ENTRY_ID).set("lid", f"urn:uuid:{uuid.uuid4()}")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "a first version's logicalID is its own id" in str(error)


def test_a_lid_equal_to_the_id_is_accepted(request_element: etree._Element) -> None:
    """ITI TF-3 4.2.3.2 (logicalID): lid equal to id is the first version."""
    _object(request_element, ENTRY_ID).set("lid", ENTRY_ID)

    assert _errors(request_element) == []


def test_document_unique_id_with_extension_is_accepted(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.26: an OID may carry a ^extension of 16 characters."""
    _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, "uniqueId"
    ).set("value", "1.2.840.113619.2.62^abcdef0123456789")

    assert _errors(request_element) == []


def test_submission_set_unique_id_with_extension_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.3.12: a SubmissionSet uniqueId is a plain OID."""
    _external_identifier(
        request_element, SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "uniqueId"
    ).set("value", "1.2.3^ext")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == SUBMISSION_SET_ID


def test_source_id_that_is_no_oid_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.3.9: sourceId is an OID."""
    _external_identifier(
        request_element, SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "sourceId"
    ).set("value", "urn:oid:1.2.3")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "sourceId 'urn:oid:1.2.3' is not an OID" in str(error)


def test_code_without_coding_scheme_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.7: a coded value names its coding scheme."""
    scheme = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "classCode")["scheme"]
    classification = _object(request_element, ENTRY_ID).find(
        f"{RIM}Classification[@classificationScheme='{scheme}']"
    )
    classification.remove(classification.find(f"{RIM}Slot"))

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "classCode 'IMAGES' needs exactly one codingScheme" in str(error)


def test_two_values_of_single_valued_code_are_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.4: a DocumentEntry has exactly one classCode."""
    scheme = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "classCode")["scheme"]
    classification = _object(request_element, ENTRY_ID).find(
        f"{RIM}Classification[@classificationScheme='{scheme}']"
    )
    twin = copy.deepcopy(classification)
    twin.set("id", ebrim.new_uuid())
    classification.addnext(twin)

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "has 2 values of classCode" in str(error)


def test_wrong_object_type_is_metadata_invalid(request_element: etree._Element) -> None:
    """ITI TF-3 4.2.5.2: a DocumentEntry's objectType is the stable UUID."""
    _object(request_element, ENTRY_ID).set("objectType", ebrim.new_uuid())

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert f"DocumentEntry {ENTRY_ID} objectType" in str(error)


def test_kos_format_code_with_other_mime_type_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """RAD TF-3 4.68.4.1.2.3: a KOS manifest entry is application/dicom."""
    _object(request_element, ENTRY_ID).set("mimeType", "text/xml")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == ENTRY_ID
    assert "KOS manifest formatCode but mimeType 'text/xml'" in str(error)


def test_other_format_code_with_other_mime_type_is_accepted(
    request_element: etree._Element,
) -> None:
    """RAD TF-3 4.68.4.1.2.3: only manifests are bound to application/dicom."""
    scheme = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "formatCode")["scheme"]
    _object(request_element, ENTRY_ID).find(
        f"{RIM}Classification[@classificationScheme='{scheme}']"
    ).set("nodeRepresentation", "urn:ihe:rad:TEXT")
    _object(request_element, ENTRY_ID).set("mimeType", "text/xml")

    assert _errors(request_element) == []


# --- the submission as a whole -------------------------------------------


def test_document_entry_of_another_patient_is_patient_id_does_not_match(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.16: DocumentEntry and SubmissionSet share patientId."""
    _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, "patientId"
    ).set("value", OTHER_PATIENT)

    error = _single_error(request_element)

    assert type(error) is PatientIdDoesNotMatch
    assert error.location == ENTRY_ID
    assert f"DocumentEntry {ENTRY_ID} patientId differs" in str(error)


def test_patient_id_mismatch_message_holds_no_patient_id(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.2.16: the message names the object, not the patient."""
    _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, "patientId"
    ).set("value", OTHER_PATIENT)

    error = _single_error(request_element)

    assert "OTHER-PATIENT" not in str(error)


def test_unique_id_used_twice_is_duplicate_unique_id_in_message(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 Table 4.2.4.1-2: XDSRegistryDuplicateUniqueIdInMessage."""
    document_unique_id = _external_identifier(
        request_element, ENTRY_ID, ebrim.DOCUMENT_ENTRY, "uniqueId"
    ).get("value")
    _external_identifier(
        request_element, SUBMISSION_SET_ID, ebrim.SUBMISSION_SET, "uniqueId"
    ).set("value", document_unique_id)

    error = _single_error(request_element)

    assert type(error) is DuplicateUniqueIdInMessage
    assert error.location == document_unique_id
    assert f"uniqueId {document_unique_id} is used by 2 objects" in str(error)


def _add_submission_set(request: etree._Element, package_id: str) -> None:
    """Append a second valid SubmissionSet and its classification."""
    twin = copy.deepcopy(_object(request, SUBMISSION_SET_ID))
    twin.set("id", package_id)
    for child in twin:
        if child.get("classifiedObject") is not None:
            child.set("classifiedObject", package_id)
        if child.get("registryObject") is not None:
            child.set("registryObject", package_id)
        if child.get("id") is not None:
            child.set("id", ebrim.new_uuid())
    scheme = ebrim.attribute_spec(ebrim.SUBMISSION_SET, "uniqueId")["scheme"]
    twin.find(f"{RIM}ExternalIdentifier[@identificationScheme='{scheme}']").set(
        "value", "2.25.127890502356717902159250805506845543275.9.2"
    )
    object_list = request.find(f"{RIM}RegistryObjectList")
    object_list.append(twin)
    etree.SubElement(
        object_list,
        f"{RIM}Classification",
        id=ebrim.new_uuid(),
        classifiedObject=package_id,
        classificationNode=TABLE[ebrim.SUBMISSION_SET]["classification_node"],
    )


def test_two_submission_sets_are_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.1.4: a submission holds exactly one SubmissionSet."""
    _add_submission_set(request_element, "SubmissionSet02")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "submission holds 2 SubmissionSets" in str(error)


def test_submission_without_submission_set_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.1.4: a submission holds exactly one SubmissionSet."""
    object_list = request_element.find(f"{RIM}RegistryObjectList")
    for element in list(object_list):
        if element.get("id") != ENTRY_ID:
            object_list.remove(element)

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "submission holds 0 SubmissionSets" in str(error)


def test_unclassified_registry_package_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.3, 4.2.3.4: a RegistryPackage is classified."""
    object_list = request_element.find(f"{RIM}RegistryObjectList")
    etree.SubElement(object_list, f"{RIM}RegistryPackage", id="Package01")

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == "Package01"
    assert "RegistryPackage Package01 is not classified as exactly one" in str(error)


def test_registry_package_classified_as_both_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.3, 4.2.3.4: a RegistryPackage is a SubmissionSet or a
    Folder, not both; the SubmissionSet classified as a Folder too is
    refused, not read as whichever came first."""
    submission_set = _object(request_element, SUBMISSION_SET_ID)
    etree.SubElement(
        submission_set,
        f"{RIM}Classification",
        id="FolderClassification01",
        classifiedObject=SUBMISSION_SET_ID,
        classificationNode=ebrim.metadata_table()[ebrim.FOLDER]["classification_node"],
    )

    errors = _errors(request_element)

    assert any(
        "is not classified as exactly one of SubmissionSet and Folder" in str(e)
        for e in errors
    )


def test_two_objects_with_one_id_are_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ebRIM 3.0 2.5.1: an id names one object of the submission."""
    association = request_element.find(f"{RIM}RegistryObjectList/{RIM}Association")
    association.set("id", ENTRY_ID)

    errors = _errors(request_element)

    assert [type(e) for e in errors] == [MetadataInvalid]
    assert f"id {ENTRY_ID} names 2 objects" in str(errors[0])


def test_document_entry_that_is_no_member_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.2.1: each DocumentEntry is a SubmissionSet member."""
    association = request_element.find(f"{RIM}RegistryObjectList/{RIM}Association")
    association.getparent().remove(association)

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == ENTRY_ID
    assert f"DocumentEntry {ENTRY_ID} is not a member" in str(error)


def test_association_to_an_absent_symbolic_id_is_unresolved_reference(
    request_element: etree._Element,
) -> None:
    """ebRS 3.0 UnresolvedReferenceException: targetObject names no object."""
    association = request_element.find(f"{RIM}RegistryObjectList/{RIM}Association")
    dangling = copy.deepcopy(association)
    dangling.set("id", "Association02")
    dangling.set("targetObject", "Document99")
    association.addnext(dangling)

    error = _single_error(request_element)

    assert type(error) is UnresolvedReference
    assert error.location == "Association02"
    assert "targetObject Document99" in str(error)


def test_association_to_an_outside_entry_uuid_is_left_to_the_registry(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.2.1: an entryUUID may name an object already registered."""
    association = request_element.find(f"{RIM}RegistryObjectList/{RIM}Association")
    outside = copy.deepcopy(association)
    outside.set("id", "Association02")
    outside.set("targetObject", "urn:uuid:" + str(uuid.uuid4()))
    association.addnext(outside)

    assert check_submission(read_registry_objects(request_element)) == []


def test_association_type_outside_iti_tf_3_4_2_2_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.2: HasMember and the document relationships only."""
    association_type = "urn:ihe:iti:2010:AssociationType:IsSnapshotOf"
    etree.SubElement(
        request_element.find(f"{RIM}RegistryObjectList"),
        f"{RIM}Association",
        id="Association02",
        associationType=association_type,
        sourceObject=ENTRY_ID,
        targetObject="urn:uuid:" + str(uuid.uuid4()),
    )

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert error.location == "Association02"
    assert association_type in str(error)


def test_submission_set_status_other_than_original_is_metadata_invalid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.2.1.1: SubmissionSetStatus is Original or Reference."""
    request_element.find(
        f".//{RIM}Association/{RIM}Slot[@name='SubmissionSetStatus']"
        f"/{RIM}ValueList/{RIM}Value"
    ).text = "Copy"

    error = _single_error(request_element)

    assert type(error) is MetadataInvalid
    assert "SubmissionSetStatus 'Copy'" in str(error)


# --- entryUUIDs ----------------------------------------------------------

REFERENCE_ATTRIBUTES = (
    "id",
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
)


def test_assign_entry_uuids_replaces_symbolic_ids_and_references(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.2: the registry gives symbolic ids fresh entryUUIDs."""
    submission = read_registry_objects(request_element)

    mapping = assign_entry_uuids(submission)

    assert set(mapping) == {ENTRY_ID, SUBMISSION_SET_ID}
    assert all(ebrim.is_uuid(v) for v in mapping.values())
    assert mapping[ENTRY_ID] != mapping[SUBMISSION_SET_ID]
    for element in request_element.iter():
        for attribute in REFERENCE_ATTRIBUTES:
            value = element.get(attribute)
            assert value is None or ebrim.is_uuid(value), (element.tag, attribute)
    association = submission.associations[0]
    assert association.source_object == mapping[SUBMISSION_SET_ID]
    assert association.target_object == mapping[ENTRY_ID]
    assert submission.document_entries[0].id == mapping[ENTRY_ID]


def test_submission_with_assigned_uuids_reads_back_valid(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.2: rewriting ids keeps every reference resolved."""
    mapping = assign_entry_uuids(read_registry_objects(request_element))

    reread = read_registry_objects(request_element)

    assert check_submission(reread) == []
    entry = reread.document_entries[0]
    assert entry.id == mapping[ENTRY_ID]
    assert {c.classified_object for c in entry.classifications} == {mapping[ENTRY_ID]}
    assert_valid(request_element, "ebRS/lcm.xsd")


def test_assign_entry_uuids_keeps_given_uuids(request_element: etree._Element) -> None:
    """ITI TF-3 4.2.3.1.2: an object sent with a UUID keeps it."""
    given = ebrim.new_uuid()
    for element in request_element.iter():
        for attribute in REFERENCE_ATTRIBUTES:
            if element.get(attribute) == ENTRY_ID:
                element.set(attribute, given)

    mapping = assign_entry_uuids(read_registry_objects(request_element))

    assert set(mapping) == {SUBMISSION_SET_ID}
    assert _object(request_element, given) is not None


# --- NIST Register Document Set-b messages --------------------------------

CONFORMANCE_CASES = Path("conformance", "cases")
FED_PATIENT = f"PAT-FED-1^^^&{AUTHORITY}&ISO"
SECOND_PATIENT = f"PAT-FED-2^^^&{AUTHORITY}&ISO"
NIST_SOURCE_ID = "1.3.6.1.4.1.21367.4"


def _nist_submission(case: str, file: str) -> etree._Element:
    """A NIST ITI-42 message, preprocessed as the conformance README says."""
    path = shared_path(*CONFORMANCE_CASES.parts, case, file)
    text = path.read_text(encoding="utf-8")
    text = text.replace("$patientid$", escape(FED_PATIENT))
    text = text.replace("$altpatientid$", escape(SECOND_PATIENT))
    request = etree.fromstring(text.encode("utf-8"))
    unique_id_schemes = {
        ebrim.attribute_spec(kind, "uniqueId")["scheme"]
        for kind in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER)
    }
    source_id_scheme = ebrim.attribute_spec(ebrim.SUBMISSION_SET, "sourceId")["scheme"]
    for identifier in request.iter(f"{RIM}ExternalIdentifier"):
        if identifier.get("identificationScheme") in unique_id_schemes:
            identifier.set("value", f"2.25.{uuid.uuid4().int}")
        # The NIST engine sends its own sourceId; some files hold 129.6...,
        # which is no OID (its first arc is not 0, 1 or 2).
        if identifier.get("identificationScheme") == source_id_scheme:
            identifier.set("value", NIST_SOURCE_ID)
    return request


def test_nist_single_document_submission_breaks_no_rule() -> None:
    """ITI TF-3 4.2.3: NIST test 12346 single_doc is accepted."""
    request = _nist_submission("iti42-12346-single_doc", "single_doc.ebrim30.xml")
    assert_valid(request, "ebRS/lcm.xsd")

    assert check_submission(read_registry_objects(request)) == []


def test_nist_symbolic_ids_all_become_uuids() -> None:
    """ITI TF-3 4.2.3.1.2: ids such as id_1 and Document01 are replaced."""
    request = _nist_submission("iti42-12346-single_doc", "single_doc.ebrim30.xml")

    mapping = assign_entry_uuids(read_registry_objects(request))

    assert {"Document01", "SubmissionSet01", "id_1"} <= set(mapping)
    for element in request.iter():
        for attribute in REFERENCE_ATTRIBUTES:
            value = element.get(attribute)
            assert value is None or ebrim.is_uuid(value), (element.tag, attribute)
    assert check_submission(read_registry_objects(request)) == []


@pytest.mark.parametrize("attribute", ["classCode", "creationTime", "sourcePatientId"])
def test_nist_submission_missing_attribute_is_metadata_invalid(attribute: str) -> None:
    """ITI TF-3 Table 4.2.4.1-2: NIST 11998a, XDSRegistryMetadataError."""
    request = _nist_submission(
        f"iti42-11998a-missing_{attribute}", "single_doc.ebrim30.xml"
    )

    errors = check_submission(read_registry_objects(request))

    assert [type(e) for e in errors] == [MetadataInvalid]
    assert f"DocumentEntry Document01 has no {attribute}" in str(errors[0])


def test_nist_submission_of_two_patients_is_patient_id_does_not_match() -> None:
    """ITI TF-3 Table 4.2.4.1-2: NIST 11997, XDSPatientIdDoesNotMatch."""
    request = _nist_submission("iti42-11997-pid_mismatch", "single_doc.ebrim30.xml")

    errors = check_submission(read_registry_objects(request))

    assert [type(e) for e in errors] == [PatientIdDoesNotMatch]
    assert errors[0].location == "Document01"


@pytest.mark.parametrize(
    ("value", "is_one"),
    [
        ("urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1", True),
        ("urn:uuid:7EDCA82F-054D-47F2-A032-9B2A5B5186C1", True),
        ("urn:uuid:{7edca82f-054d-47f2-a032-9b2a5b5186c1}", False),
        ("urn:uuid:7edca82f054d47f2a0329b2a5b5186c1", False),
        ("urn:uuid:urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1", False),
        ("urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1" + "-" * 20, False),
        ("urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1\n", False),
        ("Document01", False),
    ],
)
def test_only_the_canonical_uuid_form_is_a_uuid(value: str, is_one: bool) -> None:
    """ITI TF-3 4.2.3.1.2, RFC 4122 3: urn:uuid: and 8-4-4-4-12 hex digits;
    any other spelling is a symbolic id, replaced by a UUID of the
    registry's own, so that one UUID is not registered under several."""
    assert ebrim.is_uuid(value) is is_one

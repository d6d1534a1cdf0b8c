"""Tests of xdsi.metadata.validation.check_references: Associations that name
objects already in the Document Registry.

ITI TF-3 4.2.2.1 (HasMember) and 4.2.2.2 (document relationships), on the
NIST submissions of tests 12346 (replacement) and 12002 (adding to a Folder).
"""

from __future__ import annotations

import pytest

from tests.nist_submissions import nist_submission
from xdsi.errors import (
    DeprecatedDocument,
    MetadataInvalid,
    PatientIdDoesNotMatch,
    UnresolvedReference,
)
from xdsi.metadata import ebrim
from xdsi.metadata.ebrim import Submission, read_registry_objects
from xdsi.metadata.validation import (
    HeldObject,
    assign_entry_uuids,
    check_references,
    check_submission,
    external_references,
    relationship_types,
)

PATIENT = "PAT-12346^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
OTHER_PATIENT = "PAT-OTHER^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
ORIGINAL = "urn:uuid:0d6e0a1c-2b3c-4d5e-8f90-a1b2c3d4e5f6"
FOLDER = "urn:uuid:f01de700-2b3c-4d5e-8f90-a1b2c3d4e5f6"


def _ready(case_id: str, values: dict[str, str]) -> Submission:
    submission = read_registry_objects(nist_submission(case_id, values))
    assert check_submission(submission) == []
    assign_entry_uuids(submission)
    return submission


@pytest.fixture
def replacement() -> Submission:
    """NIST 12346 rplc: Document01 replaces ORIGINAL, same patient."""
    return _ready(
        "iti42-12346-rplc", {"$patientid$": PATIENT, "$rplc_doc_uuid$": ORIGINAL}
    )


def _original(
    status: str = ebrim.STATUS_APPROVED,
    patient_id: str = PATIENT,
    kind: str = ebrim.DOCUMENT_ENTRY,
) -> dict[str, HeldObject]:
    return {ORIGINAL: HeldObject(ORIGINAL, kind, patient_id, status)}


def _replacing(submission: Submission) -> str:
    (rplc,) = [a for a in submission.associations if a.target_object == ORIGINAL]
    return rplc.id


def test_replacement_of_an_approved_document_breaks_no_rule(
    replacement: Submission,
) -> None:
    """ITI TF-3 4.2.2.2: RPLC of an Approved DocumentEntry of the patient."""
    assert external_references(replacement) == {ORIGINAL}
    assert check_references(replacement, _original()) == []


def test_replacement_of_an_unknown_document_is_unresolved_reference(
    replacement: Submission,
) -> None:
    """ebRS 3.0 UnresolvedReferenceException: the target is not registered."""
    (error,) = check_references(replacement, {})

    assert type(error) is UnresolvedReference
    assert error.location == _replacing(replacement)
    assert ORIGINAL in str(error)


def test_replacement_of_a_deprecated_document_is_deprecated_document(
    replacement: Submission,
) -> None:
    """ITI TF-3 4.2.2.2: XDSRegistryDeprecatedDocumentError."""
    (error,) = check_references(replacement, _original(ebrim.STATUS_DEPRECATED))

    assert type(error) is DeprecatedDocument
    assert error.code_for("registry") == "XDSRegistryDeprecatedDocumentError"
    assert error.location == _replacing(replacement)


def test_replacement_of_another_patients_document_is_patient_id_does_not_match(
    replacement: Submission,
) -> None:
    """ITI TF-3 4.2.2.2: the original is of the replacement's patient."""
    (error,) = check_references(replacement, _original(patient_id=OTHER_PATIENT))

    assert type(error) is PatientIdDoesNotMatch
    assert PATIENT not in str(error) and OTHER_PATIENT not in str(error)


def test_replacement_of_a_folder_is_metadata_invalid(
    replacement: Submission,
) -> None:
    """ITI TF-3 4.2.2.2: a relationship's target is a DocumentEntry."""
    (error,) = check_references(replacement, _original(kind=ebrim.FOLDER))

    assert type(error) is MetadataInvalid
    assert "targetObject must be a DocumentEntry" in str(error)


@pytest.mark.parametrize("association_type", sorted(relationship_types()))
def test_every_relationship_type_needs_an_approved_target(
    replacement: Submission, association_type: str
) -> None:
    """ITI TF-3 4.2.2.2: RPLC, APND, XFRM, XFRM_RPLC and signs alike."""
    for association in replacement.associations:
        if association.target_object == ORIGINAL:
            association.association_type = association_type

    (error,) = check_references(replacement, _original(ebrim.STATUS_DEPRECATED))

    assert type(error) is DeprecatedDocument


def _added_to_folder(patient_id: str) -> Submission:
    """NIST 12002 add_to_folder: Document01 joins the registered FOLDER."""
    return _ready(
        "iti42-12002-add_doc_other_patient",
        {"$altpatientid$": patient_id, "$Folder$": FOLDER},
    )


def test_document_added_to_a_registered_folder_breaks_no_rule() -> None:
    """ITI TF-3 4.2.2.1: a HasMember may start at a registered Folder."""
    submission = _added_to_folder(PATIENT)
    held = {FOLDER: HeldObject(FOLDER, ebrim.FOLDER, PATIENT, ebrim.STATUS_APPROVED)}

    assert check_references(submission, held) == []


def test_document_of_another_patient_added_to_a_folder_is_patient_id_mismatch() -> None:
    """ITI TF-3 4.2.2.1: NIST 12002 expects XDSPatientIdDoesNotMatch."""
    submission = _added_to_folder(OTHER_PATIENT)
    held = {FOLDER: HeldObject(FOLDER, ebrim.FOLDER, PATIENT, ebrim.STATUS_APPROVED)}

    (error,) = check_references(submission, held)

    assert type(error) is PatientIdDoesNotMatch
    assert error.code_for("registry") == "XDSPatientIdDoesNotMatch"


def test_has_member_from_a_registered_document_is_metadata_invalid() -> None:
    """ITI TF-3 4.2.2.1: HasMember starts at a SubmissionSet or a Folder."""
    submission = _added_to_folder(PATIENT)
    held = {
        FOLDER: HeldObject(FOLDER, ebrim.DOCUMENT_ENTRY, PATIENT, ebrim.STATUS_APPROVED)
    }

    (error,) = check_references(submission, held)

    assert type(error) is MetadataInvalid
    assert "HasMember from DocumentEntry" in str(error)

"""Tests of xdsi.metadata.update: the availabilityStatus updates of ITI-57.

ITI TF-2 3.57.4.1.3.3.2: one SubmissionSet and an UpdateAvailabilityStatus
Association from it to the DocumentEntry, with OriginalStatus and NewStatus.
Each rule test starts from the valid request the Imaging Document Source
sends and breaks one thing.
"""

from __future__ import annotations

import dataclasses

import pytest
from lxml import etree

from tests.conftest import assert_valid
from tests.unit.metadata.test_validation import (
    OTHER_PATIENT,
    manifest_entry,
    submission_set_spec,
)
from xdsi import ns
from xdsi.errors import (
    MetadataInvalid,
    MetadataUpdateInvalid,
    MetadataUpdateOperationUnsupported,
    PatientIdDoesNotMatch,
    XdsError,
)
from xdsi.metadata import ebrim
from xdsi.metadata.build import manifest_submission, status_update_submission
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.update import (
    StatusUpdate,
    check_targets,
    read_status_updates,
    update_table,
)
from xdsi.metadata.validation import HeldObject

RIM = f"{{{ns.RIM}}}"
TARGET = "urn:uuid:0f5a6f8e-4a35-4f1c-9c55-5d1f0a3c2b71"
APPROVED = ebrim.STATUS_APPROVED
DEPRECATED = ebrim.STATUS_DEPRECATED


def _patient() -> str:
    return manifest_entry().patient_id


def _request(
    original: str = APPROVED, new: str = DEPRECATED, target: str = TARGET
) -> etree._Element:
    return status_update_submission(
        submission_set_spec(_patient()), target, original, new
    )


def _association(request: etree._Element) -> etree._Element:
    return request.find(f"{RIM}RegistryObjectList/{RIM}Association")


def _read(request: etree._Element) -> tuple[list[StatusUpdate], list[XdsError]]:
    return read_status_updates(read_registry_objects(request))


def _types(errors: list[XdsError]) -> list[type]:
    return [type(e) for e in errors]


def test_status_update_request_is_valid_against_lcm_schema() -> None:
    """ITI TF-2 3.57.4.1.2: the request is an ebRS 3.0 SubmitObjectsRequest."""
    assert_valid(_request(), "ebRS/lcm.xsd")


def test_status_update_reads_back_to_its_change() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: the Association names the entry and change."""
    request = _request()

    updates, errors = _read(request)

    assert errors == []
    assert updates == [
        StatusUpdate(_association(request).get("id"), TARGET, APPROVED, DEPRECATED)
    ]
    association = _association(request)
    assert association.get("associationType") == (
        "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
    )
    assert association.get("sourceObject") == "SubmissionSet01"


def test_deprecated_back_to_approved_is_allowed() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: Deprecated to Approved is a status change."""
    assert _read(_request(DEPRECATED, APPROVED))[1] == []


@pytest.mark.parametrize(
    ("original", "new"),
    [
        (APPROVED, APPROVED),
        (APPROVED, ebrim.STATUS_SUBMITTED),
        (ebrim.STATUS_SUBMITTED, APPROVED),
    ],
    ids=["unchanged", "to-submitted", "from-submitted"],
)
def test_change_not_in_the_table_is_an_update_error(original: str, new: str) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: only the tabled changes; XDSMetadataUpdateError."""
    assert (original, new) not in {
        (r["original"], r["new"]) for r in update_table()["status_changes"]
    }

    errors = _read(_request(original, new))[1]

    assert _types(errors) == [MetadataUpdateInvalid]
    assert errors[0].code_for("registry") == "XDSMetadataUpdateError"


@pytest.mark.parametrize("slot", ["OriginalStatus", "NewStatus"])
def test_missing_status_slot_is_a_metadata_error(slot: str) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: both Slots, one value each."""
    request = _request()
    association = _association(request)
    association.remove(association.find(f"{RIM}Slot[@name='{slot}']"))

    errors = _read(request)[1]

    assert _types(errors) == [MetadataInvalid]
    assert slot in errors[0].message


def test_association_not_from_the_submission_set_is_a_metadata_error() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: the sourceObject is the SubmissionSet."""
    request = _request()
    _association(request).set("sourceObject", TARGET)

    assert _types(_read(request)[1]) == [MetadataInvalid]


def test_two_updates_of_one_entry_are_an_update_error() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: one change per DocumentEntry and request."""
    request = _request()
    association = _association(request)
    twin = etree.fromstring(etree.tostring(association))
    twin.set("id", ebrim.new_uuid())
    association.addnext(twin)

    assert _types(_read(request)[1]) == [MetadataUpdateInvalid]


def test_new_document_entry_version_is_an_unsupported_operation() -> None:
    """ITI TF-2 3.57.4.1.3.3.1: a new version is not carried out here."""
    entry = dataclasses.replace(manifest_entry(), entry_id=ebrim.new_uuid())
    request = manifest_submission(entry, submission_set_spec(entry.patient_id))
    request.find(f"{RIM}RegistryObjectList/{RIM}ExtrinsicObject").set("lid", TARGET)

    errors = _read(request)[1]

    assert MetadataUpdateOperationUnsupported in _types(errors)
    assert {e.code_for("registry") for e in errors} == {
        "XDSMetadataUpdateOperationError"
    }


def test_request_without_submission_set_is_a_metadata_error() -> None:
    """ITI TF-2 3.57.4.1.3.1: an Update Document Set holds one SubmissionSet."""
    request = _request()
    object_list = request.find(f"{RIM}RegistryObjectList")
    object_list.remove(object_list.find(f"{RIM}RegistryPackage"))

    errors = _read(request)[1]

    assert MetadataInvalid in _types(errors)


def _held(**changes: str | None) -> dict[str, HeldObject]:
    held = HeldObject(TARGET, ebrim.DOCUMENT_ENTRY, _patient(), APPROVED)
    return {TARGET: dataclasses.replace(held, **changes)}


def _update() -> StatusUpdate:
    return StatusUpdate("urn:uuid:association", TARGET, APPROVED, DEPRECATED)


def test_registered_approved_entry_of_the_patient_passes() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: the target as the update states it."""
    assert check_targets([_update()], _held(), _patient()) == []


def test_unknown_target_is_an_update_error() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: the target must be registered."""
    errors = check_targets([_update()], {}, _patient())

    assert _types(errors) == [MetadataUpdateInvalid]
    assert errors[0].code_for("registry") == "XDSMetadataUpdateError"


def test_target_that_is_no_document_entry_is_an_update_error() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: only a DocumentEntry's status changes here."""
    errors = check_targets([_update()], _held(kind=ebrim.FOLDER), _patient())

    assert _types(errors) == [MetadataUpdateInvalid]


def test_target_of_another_patient_does_not_match() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: XDSPatientIdDoesNotMatch."""
    errors = check_targets([_update()], _held(patient_id=OTHER_PATIENT), _patient())

    assert _types(errors) == [PatientIdDoesNotMatch]
    assert errors[0].code_for("registry") == "XDSPatientIdDoesNotMatch"


def test_target_not_in_the_original_status_is_an_update_error() -> None:
    """ITI TF-2 3.57.4.1.3.3.2: OriginalStatus is the target's status now."""
    errors = check_targets([_update()], _held(status=DEPRECATED), _patient())

    assert _types(errors) == [MetadataUpdateInvalid]
    assert "OriginalStatus" in errors[0].message

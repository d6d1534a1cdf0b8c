"""ITI-42 Register Document Set-b against a Document Registry on loopback.

ITI TF-2 3.42 and ITI TF-3 4.2.2: Associations to objects already
registered, document replacement and its effects, and re-registration of a
document, with the NIST XDS Toolkit submissions of tests 12346, 12002 and
12004; entryUUIDs of either letter case (RFC 4122 3). Each test starts from
an accepted submission and changes one thing.
"""

from __future__ import annotations

import time
import uuid

import pytest
from lxml import etree

from tests.integration.conftest import RunningNode
from tests.nist_submissions import (
    OBJECT_ID_ATTRIBUTES,
    UNIQUE_ID_SCHEMES,
    entry_uuids,
    error_codes,
    in_upper_case,
    nist_submission,
    register,
    run_query,
    upper_case_uuid,
)
from xdsi import ns
from xdsi.metadata import ebrim
from xdsi.metadata.build import new_oid
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.responses import read_errors

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
APND = "urn:ihe:iti:2007:AssociationType:APND"


def new_patient(node: RunningNode) -> str:
    patient_id = f"XDSI-{uuid.uuid4().hex[:12]}^^^&{AUTHORITY}&ISO"
    node.feed(patient_id)
    return patient_id


def submit(
    node: RunningNode, case_id: str, values: dict[str, str]
) -> tuple[etree._Element, dict[str, str]]:
    """Register a NIST submission; return the response and its entryUUIDs."""
    request = nist_submission(case_id, values)
    uuids = entry_uuids(request)
    return register(node.settings.url("registry"), request), uuids


def accepted(node: RunningNode, case_id: str, values: dict[str, str]) -> dict[str, str]:
    response, uuids = submit(node, case_id, values)
    assert response.get("status") == SUCCESS, error_codes(response)
    return uuids


def leaf(
    node: RunningNode, name: str, parameters: dict[str, str | list[str]]
) -> list[ebrim.RegistryObject]:
    response = run_query(node.settings.url("registry"), name, parameters)
    assert response.get("status") == SUCCESS, error_codes(response)
    return read_registry_objects(response).objects


def document(node: RunningNode, entry_uuid: str) -> ebrim.RegistryObject:
    (entry,) = leaf(node, "GetDocuments", {"$XDSDocumentEntryEntryUUID": [entry_uuid]})
    return entry


def test_replacement_deprecates_the_original(running_node: RunningNode) -> None:
    """ITI TF-3 4.2.2.2: RPLC deprecates the original, in LeafClass answers too."""
    patient_id = new_patient(running_node)
    original = accepted(
        running_node, "iti42-12346-doc_for_rplc", {"$patientid$": patient_id}
    )["Document01"]

    replacement = accepted(
        running_node,
        "iti42-12346-rplc",
        {"$patientid$": patient_id, "$rplc_doc_uuid$": original},
    )["Document01"]

    assert document(running_node, original).status == ebrim.STATUS_DEPRECATED
    assert document(running_node, replacement).status == ebrim.STATUS_APPROVED
    approved = leaf(
        running_node,
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
    )
    assert [e.id for e in approved] == [replacement]


def test_replacement_of_a_deprecated_document_is_refused_whole(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.2: XDSRegistryDeprecatedDocumentError; nothing lands."""
    patient_id = new_patient(running_node)
    values = {"$patientid$": patient_id}
    values["$rplc_doc_uuid$"] = accepted(
        running_node, "iti42-12346-doc_for_rplc", values
    )["Document01"]
    accepted(running_node, "iti42-12346-rplc", values)

    response, uuids = submit(running_node, "iti42-12346-rplc", values)

    assert response.get("status") == FAILURE
    assert error_codes(response) == ["XDSRegistryDeprecatedDocumentError"]
    got = run_query(
        running_node.settings.url("registry"),
        "GetDocuments",
        {"$XDSDocumentEntryEntryUUID": [uuids["Document01"]]},
    )
    assert len(got.find(f"{{{ns.RIM}}}RegistryObjectList")) == 0


def test_replacement_of_an_unknown_document_is_registry_metadata_error(
    running_node: RunningNode,
) -> None:
    """ebRS 3.0 UnresolvedReferenceException: XDSRegistryMetadataError."""
    patient_id = new_patient(running_node)

    response, _ = submit(
        running_node,
        "iti42-12346-rplc",
        {"$patientid$": patient_id, "$rplc_doc_uuid$": ebrim.new_uuid()},
    )

    assert error_codes(response) == ["XDSRegistryMetadataError"]


def test_replacement_of_another_patients_document_is_patient_id_mismatch(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.2: the original is of the SubmissionSet's patient."""
    original = accepted(
        running_node,
        "iti42-12346-doc_for_rplc",
        {"$patientid$": new_patient(running_node)},
    )["Document01"]

    response, _ = submit(
        running_node,
        "iti42-12346-rplc",
        {"$patientid$": new_patient(running_node), "$rplc_doc_uuid$": original},
    )

    assert error_codes(response) == ["XDSPatientIdDoesNotMatch"]


def test_replacement_deprecates_the_addenda_of_the_original(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.2: an addendum of a replaced document is deprecated too."""
    patient_id = new_patient(running_node)
    values = {"$patientid$": patient_id}
    values["$rplc_doc_uuid$"] = accepted(
        running_node, "iti42-12346-doc_for_rplc", values
    )["Document01"]
    request = nist_submission("iti42-12346-rplc", values)
    for association in request.iter(f"{{{ns.RIM}}}Association"):
        if association.get("targetObject") == values["$rplc_doc_uuid$"]:
            association.set("associationType", APND)
    addendum = entry_uuids(request)["Document01"]
    response = register(running_node.settings.url("registry"), request)
    assert response.get("status") == SUCCESS
    assert document(running_node, addendum).status == ebrim.STATUS_APPROVED

    accepted(running_node, "iti42-12346-rplc", values)

    assert document(running_node, addendum).status == ebrim.STATUS_DEPRECATED


def test_replacement_joins_the_folders_of_the_original(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.2: the replacement becomes a member of the original's
    Folders."""
    patient_id = new_patient(running_node)
    first = accepted(running_node, "iti42-12346-doc_w_fol", {"$patientid$": patient_id})

    replacement = accepted(
        running_node,
        "iti42-12346-rplc",
        {"$patientid$": patient_id, "$rplc_doc_uuid$": first["Document01"]},
    )["Document01"]

    folders = leaf(
        running_node,
        "GetFoldersForDocument",
        {"$XDSDocumentEntryEntryUUID": replacement},
    )
    assert [f.id for f in folders] == [first["Folder"]]


def _last_update_time(node: RunningNode, folder: str) -> str:
    (found,) = leaf(node, "GetFolders", {"$XDSFolderEntryUUID": [folder]})
    value = found.slot("lastUpdateTime")
    assert value is not None
    return value


def test_document_added_to_a_registered_folder_updates_its_last_update_time(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.1, 4.2.3.4: HasMember from a registered Folder."""
    patient_id = new_patient(running_node)
    folder = accepted(
        running_node, "iti42-12002-create_folder", {"$patientid$": patient_id}
    )["Folder"]
    created = _last_update_time(running_node, folder)
    time.sleep(1.1)

    added = accepted(
        running_node,
        "iti42-12002-add_doc_other_patient",
        {"$altpatientid$": patient_id, "$Folder$": folder},
    )["Document01"]

    assert _last_update_time(running_node, folder) > created
    contents = leaf(
        running_node, "GetFolderAndContents", {"$XDSFolderEntryUUID": folder}
    )
    assert added in {o.id for o in contents}


def test_document_of_another_patient_added_to_a_folder_is_patient_id_mismatch(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.2.1: NIST 12002 add_to_folder, XDSPatientIdDoesNotMatch."""
    folder = accepted(
        running_node,
        "iti42-12002-create_folder",
        {"$patientid$": new_patient(running_node)},
    )["Folder"]

    response, _ = submit(
        running_node,
        "iti42-12002-add_doc_other_patient",
        {"$altpatientid$": new_patient(running_node), "$Folder$": folder},
    )

    assert error_codes(response) == ["XDSPatientIdDoesNotMatch"]


def _unique_id(request_values: dict[str, str], node: RunningNode) -> str:
    request = nist_submission("iti42-12004-submit", request_values)
    (entry,) = read_registry_objects(request).document_entries
    assert register(node.settings.url("registry"), request).get("status") == SUCCESS
    assert entry.unique_id is not None
    return entry.unique_id


@pytest.mark.parametrize(
    ("case_id", "codes"),
    [
        ("iti42-12004-resubmit_same_hash", []),
        ("iti42-12004-resubmit_diff_hash", ["XDSNonIdenticalHash"]),
    ],
    ids=["same-hash", "other-hash"],
)
def test_document_registered_again_is_accepted_only_with_the_same_hash(
    running_node: RunningNode, case_id: str, codes: list[str]
) -> None:
    """ITI TF-3 Table 4.2.4.1-2: XDSNonIdenticalHash only for another hash."""
    values = {"$patientid$": new_patient(running_node)}
    values["$doc_uid$"] = _unique_id(values, running_node)

    response, _ = submit(running_node, case_id, values)

    assert error_codes(response) == codes
    entries = leaf(
        running_node,
        "GetDocuments",
        {"$XDSDocumentEntryUniqueId": [values["$doc_uid$"]]},
    )
    assert len(entries) == 1 + (not codes)


def test_entry_uuid_registered_before_is_refused_whole(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.3.1.2: an entryUUID names one object; a second use fails."""
    patient_id = new_patient(running_node)
    request = nist_submission("iti42-12004-submit", {"$patientid$": patient_id})
    entry_uuids(request)
    url = running_node.settings.url("registry")
    assert register(url, request).get("status") == SUCCESS
    for identifier in request.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
        if identifier.get("identificationScheme") in UNIQUE_ID_SCHEMES:
            identifier.set("value", new_oid())

    response = register(url, request)

    assert response.get("status") == FAILURE
    assert set(error_codes(response)) == {"XDSRegistryMetadataError"}
    assert any(
        "already in the Document Registry" in e.message for e in read_errors(response)
    )
    entries = leaf(
        running_node,
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
    )
    assert len(entries) == 1


# --- entryUUID letter case ---------------------------------------------------


SCHEME_ATTRIBUTES = (
    "classificationScheme",
    "classificationNode",
    "identificationScheme",
    "objectType",
)


def _spellings(element: etree._Element) -> list[str]:
    """Every urn:uuid: value of an id attribute under ``element``."""
    return [
        value
        for child in element.iter(tag=etree.Element)
        for attribute in (*OBJECT_ID_ATTRIBUTES, *SCHEME_ATTRIBUTES)
        if (value := child.get(attribute)) is not None and ebrim.is_uuid(value)
    ]


def test_entry_uuids_sent_in_upper_case_are_stored_and_answered_in_lower_case(
    running_node: RunningNode,
) -> None:
    """RFC 4122 3: a UUID is case insensitive on input, output in lower case."""
    patient_id = new_patient(running_node)
    request = nist_submission("iti42-12346-doc_w_fol", {"$patientid$": patient_id})
    uuids = entry_uuids(request)

    registered = register(running_node.settings.url("registry"), in_upper_case(request))

    assert registered.get("status") == SUCCESS, error_codes(registered)
    response = run_query(
        running_node.settings.url("registry"),
        "GetSubmissionSetAndContents",
        {"$XDSSubmissionSetEntryUUID": uuids["SubmissionSet01"]},
    )
    objects = read_registry_objects(response).objects
    assert {uuids["SubmissionSet01"], uuids["Document01"], uuids["Folder"]} <= {
        o.id for o in objects
    }
    spellings = _spellings(response)
    assert spellings and spellings == [v.lower() for v in spellings]


def test_associations_naming_objects_of_the_submission_in_another_case(
    running_node: RunningNode,
) -> None:
    """RFC 4122 3: sourceObject and targetObject in upper case name the
    SubmissionSet, Folder and DocumentEntry sent in lower case."""
    request = nist_submission(
        "iti42-12346-doc_w_fol", {"$patientid$": new_patient(running_node)}
    )
    uuids = entry_uuids(request)
    in_upper_case(request, ("sourceObject", "targetObject"))

    response = register(running_node.settings.url("registry"), request)

    assert response.get("status") == SUCCESS, error_codes(response)
    (folder,) = leaf(
        running_node,
        "GetFoldersForDocument",
        {"$XDSDocumentEntryEntryUUID": uuids["Document01"]},
    )
    assert folder.id == uuids["Folder"]


@pytest.mark.parametrize(
    "original_in_upper_case",
    [True, False],
    ids=["upper-then-lower", "lower-then-upper"],
)
def test_replacement_names_the_original_in_either_case(
    running_node: RunningNode, original_in_upper_case: bool
) -> None:
    """ITI TF-3 4.2.2.2, RFC 4122 3: RPLC finds and deprecates the original
    whatever the letter case of its entryUUID in either submission."""
    patient_id = new_patient(running_node)
    values = {"$patientid$": patient_id}
    request = nist_submission("iti42-12346-doc_for_rplc", values)
    original = entry_uuids(request)["Document01"]
    if original_in_upper_case:
        in_upper_case(request)
    url = running_node.settings.url("registry")
    assert register(url, request).get("status") == SUCCESS
    values["$rplc_doc_uuid$"] = (
        original if original_in_upper_case else upper_case_uuid(original)
    )

    replacement = accepted(running_node, "iti42-12346-rplc", values)["Document01"]

    assert document(running_node, original).status == ebrim.STATUS_DEPRECATED
    assert document(running_node, replacement).status == ebrim.STATUS_APPROVED


def test_entry_uuid_registered_before_in_lower_case_is_refused_in_upper_case(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.3.1.2, RFC 4122 3: the same UUID in another letter case
    is the same entryUUID, and a second use of it fails whole."""
    patient_id = new_patient(running_node)
    request = nist_submission("iti42-12004-submit", {"$patientid$": patient_id})
    entry_uuids(request)
    url = running_node.settings.url("registry")
    assert register(url, request).get("status") == SUCCESS
    for identifier in request.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
        if identifier.get("identificationScheme") in UNIQUE_ID_SCHEMES:
            identifier.set("value", new_oid())

    response = register(url, in_upper_case(request))

    assert set(error_codes(response)) == {"XDSRegistryMetadataError"}
    assert any(
        "already in the Document Registry" in e.message for e in read_errors(response)
    )
    entries = leaf(
        running_node,
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
    )
    assert len(entries) == 1


def test_schemes_and_object_types_in_upper_case_are_read_as_the_tabled_uuids(
    running_node: RunningNode,
) -> None:
    """ITI TF-3 4.2.5, RFC 4122 3: classificationScheme, classificationNode,
    identificationScheme and objectType UUIDs in upper case are the ones
    ITI TF-3 tables; the registry stores and answers them in lower case."""
    request = nist_submission(
        "iti42-12346-single_doc", {"$patientid$": new_patient(running_node)}
    )
    document_entry = entry_uuids(request)["Document01"]
    in_upper_case(request, SCHEME_ATTRIBUTES)

    response = register(running_node.settings.url("registry"), request)

    assert response.get("status") == SUCCESS, error_codes(response)
    entry = document(running_node, document_entry)
    assert (
        entry.object_type
        == ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY]["object_type_stable"]
    )
    assert entry.unique_id is not None
    assert entry.codes("classCode")

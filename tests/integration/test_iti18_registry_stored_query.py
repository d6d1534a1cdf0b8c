"""ITI-18 Registry Stored Query against a Document Registry on loopback.

From an independent SOAP stack (zeep, loading the official IHE registry
WSDL), and every stored query of ITI TF-2 3.18.4.1.2.3.7 on the NIST 12346
data set, with the counts the NIST testkit expects.
"""

from __future__ import annotations

import base64
import copy
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import zeep
from lxml import etree
from zeep.wsa import WsAddressingPlugin

from tests.conftest import dicom_path, shared_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.nist_submissions import (
    entry_uuids,
    error_codes,
    nist_submission,
    register,
    run_query,
    upper_case_uuid,
)
from xdsi import ns, wire
from xdsi.dicom import scan
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.responses import read_errors

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


def _zeep_find_documents(url: str, patient_id: str, return_type: str) -> Any:
    wsdl = shared_path("schemas", "wsdl", "XDS.b_DocumentRegistry.wsdl")
    client = zeep.Client(str(wsdl), plugins=[WsAddressingPlugin()])
    service = client.create_service(
        "{urn:ihe:iti:xds-b:2007}DocumentRegistry_Binding_Soap12", url
    )
    slots = [
        {
            "name": "$XDSDocumentEntryPatientId",
            "ValueList": {"_value_1": [{"Value": f"'{patient_id}'"}]},
        },
        {
            "name": "$XDSDocumentEntryStatus",
            "ValueList": {"_value_1": [{"Value": f"('{ebrim.STATUS_APPROVED}')"}]},
        },
    ]
    with client.settings(raw_response=True):
        return service["DocumentRegistry_RegistryStoredQuery"](
            ResponseOption={"returnType": return_type, "returnComposedObjects": True},
            AdhocQuery={"id": FIND_DOCUMENTS, "Slot": slots},
        )


def test_zeep_find_documents_returns_the_published_manifest(running_node: RunningNode):
    """ITI TF-2 3.18.4.1.2.3.7.1: FindDocuments by patient and status, LeafClass."""
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    published = running_node.services.imaging_source.publish(study, PATIENT)

    answer = _zeep_find_documents(
        running_node.settings.url("registry"), PATIENT, "LeafClass"
    )
    assert answer.status_code == 200
    envelope = etree.fromstring(answer.content)
    response = envelope.find(f".//{{{ns.QUERY}}}AdhocQueryResponse")
    assert response.get("status").endswith(":Success")
    entries = ebrim.read_registry_objects(response).document_entries
    assert [e.unique_id for e in entries] == [published.manifest_uid]
    assert entries[0].mime_type == "application/dicom"


def test_zeep_find_documents_for_other_patient_is_empty(running_node: RunningNode):
    """ITI TF-2 3.18.4.1.2.3.7.1: ObjectRef answer with no match is an empty list."""
    answer = _zeep_find_documents(
        running_node.settings.url("registry"), "NOBODY^^^&1.2.3&ISO", "ObjectRef"
    )
    response = etree.fromstring(answer.content).find(
        f".//{{{ns.QUERY}}}AdhocQueryResponse"
    )
    assert response.get("status").endswith(":Success")
    assert response.find(f"{{{ns.RIM}}}RegistryObjectList") is not None
    assert len(response.find(f"{{{ns.RIM}}}RegistryObjectList")) == 0


def test_zeep_find_documents_for_a_patient_id_not_a_cx_is_refused(
    running_node: RunningNode, caplog: pytest.LogCaptureFixture
):
    """ITI TF-3 4.2.3.2.16: $XDSDocumentEntryPatientId is a CX
    ID^^^&OID&ISO. A bare id matches no patient a registry can hold, so it
    is refused (XDSStoredQueryParamNumber, codeContext naming the
    parameter), not answered with an empty Success that reads as "no
    documents"; neither answer nor log quotes the value."""
    caplog.set_level(logging.INFO)
    answer = _zeep_find_documents(
        running_node.settings.url("registry"), "NOBODY-AT-ALL", "ObjectRef"
    )
    response = etree.fromstring(answer.content).find(
        f".//{{{ns.QUERY}}}AdhocQueryResponse"
    )
    assert response.get("status").endswith(":Failure")
    (error,) = read_errors(response)
    assert error.code == "XDSStoredQueryParamNumber"
    assert "$XDSDocumentEntryPatientId is not a CX" in error.message
    assert "NOBODY-AT-ALL" not in answer.content.decode()
    assert "NOBODY-AT-ALL" not in caplog.text


def test_failed_query_is_audited(running_node: RunningNode):
    """ITI TF-2 3.18.5.1: the registry audits a query that it refuses, too."""
    request = stored_query.build_query(
        "FindDocuments", {"$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED]}
    )
    client = wire.SoapClient(running_node.settings.url("registry"))
    with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
        assert [e.code for e in read_errors(reply.body)] == [
            "XDSStoredQueryMissingParam"
        ]
    records = [
        r
        for r in running_node.services.audit_spool.records()
        if r.event_type == "ITI-18"
    ]
    assert records and all(r.valid for r in records)
    assert records[-1].outcome == 8


def test_an_unknown_stored_query_is_logged_with_the_id_it_asked_for(
    running_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-3 Table 4.2.4.1-2: XDSUnknownStoredQuery; the registry's log
    line names the query id asked for (escaped, peer text), not "?"."""
    request = stored_query.build_query(
        "FindDocuments", {"$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED]}
    )
    unknown = "urn:uuid:00000000-0000-4000-8000-000000000000"
    request.find(f"{{{ns.RIM}}}AdhocQuery").set("id", unknown)
    client = wire.SoapClient(running_node.settings.url("registry"))

    with caplog.at_level(logging.INFO, logger="xdsi.actors.registry"):
        with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
            codes = [e.code for e in read_errors(reply.body)]

    assert codes == ["XDSUnknownStoredQuery"]
    (line,) = [r.getMessage() for r in caplog.records if "ITI-18" in r.getMessage()]
    assert f"unknown query id {unknown}" in line


# --- every stored query, on the NIST 12346 data set -------------------------

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
APPROVED = ebrim.STATUS_APPROVED
DEPRECATED = ebrim.STATUS_DEPRECATED
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"


@dataclass(frozen=True)
class DataSet:
    """The NIST 12346 submissions, registered for one patient, and one of
    NIST 12374 for another."""

    url: str
    patient_id: str
    ids: dict[str, dict[str, str]]

    def query(
        self,
        name: str,
        parameters: dict[str, str | list[str]],
        return_type: str = stored_query.RETURN_LEAF_CLASS,
    ) -> etree._Element:
        return run_query(self.url, name, parameters, return_type)


@pytest.fixture(scope="module")
def data_set(shared_node: RunningNode) -> DataSet:
    patient_id = f"XDSI-12346-{uuid.uuid4().hex[:8]}^^^&{AUTHORITY}&ISO"
    other_patient = f"XDSI-12374-{uuid.uuid4().hex[:8]}^^^&{AUTHORITY}&ISO"
    shared_node.feed(patient_id)
    shared_node.feed(other_patient)
    url = shared_node.settings.url("registry")
    values = {"$patientid$": patient_id}
    ids = {}
    for case in (
        "single_doc",
        "doc_w_fol",
        "two_doc_w_fol",
        "doc_for_rplc",
        "rplc",
        "12374",
    ):
        if case == "rplc":
            values["$rplc_doc_uuid$"] = ids["doc_for_rplc"]["Document01"]
        if case == "12374":
            request = nist_submission(
                "iti42-12374-submit_doc", {}, patient_id=other_patient
            )
        else:
            request = nist_submission(f"iti42-12346-{case}", values)
        ids[case] = entry_uuids(request)
        assert register(url, request).get("status") == SUCCESS
    return DataSet(url, patient_id, ids)


def counts(response: etree._Element) -> dict[str, int]:
    """Count an AdhocQueryResponse's objects as the NIST testkit does."""
    assert response.get("status") == SUCCESS, error_codes(response)
    submission = ebrim.read_registry_objects(response)
    object_refs = response.findall(
        f"{{{ns.RIM}}}RegistryObjectList/{{{ns.RIM}}}ObjectRef"
    )
    found = {
        "Documents": len(submission.document_entries),
        "SubmissionSets": len(submission.submission_sets),
        "Folders": len(submission.folders),
        "Associations": len(submission.associations),
        "ObjectRefs": len(object_refs),
    }
    return {kind: count for kind, count in found.items() if count}


def ids_of(response: etree._Element) -> set[str]:
    return {o.id for o in ebrim.read_registry_objects(response).objects}


def test_find_documents_answers_approved_entries_only(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: NIST 11897 approved, 5 of 6 after the RPLC."""
    response = data_set.query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED],
        },
        stored_query.RETURN_OBJECT_REF,
    )

    assert counts(response) == {"ObjectRefs": 5}


def test_find_documents_for_deprecated_answers_the_replaced_entry(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: NIST 11897 deprecated."""
    response = data_set.query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [DEPRECATED],
        },
    )

    assert ids_of(response) == {data_set.ids["doc_for_rplc"]["Document01"]}
    (entry,) = ebrim.read_registry_objects(response).document_entries
    assert entry.status == DEPRECATED


def test_find_documents_by_reference_id(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.14: NIST 11897 refid finds one entry."""
    response = data_set.query(
        "FindDocumentsByReferenceId",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED],
            "$XDSDocumentEntryReferenceIdList": [
                "20061223^^^&1.2.5643.2&ISO^urn:ihe:iti:xds:2013:uniqueId"
            ],
        },
        stored_query.RETURN_OBJECT_REF,
    )

    assert counts(response) == {"ObjectRefs": 1}


def test_find_submission_sets_answers_all_five(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.2: NIST 11898 simple."""
    response = data_set.query(
        "FindSubmissionSets",
        {
            "$XDSSubmissionSetPatientId": data_set.patient_id,
            "$XDSSubmissionSetStatus": [APPROVED],
        },
    )

    assert counts(response) == {"SubmissionSets": 5}


def test_find_submission_sets_by_submission_time_after_all_is_empty(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.2: $XDSSubmissionSetSubmissionTimeFrom."""
    response = data_set.query(
        "FindSubmissionSets",
        {
            "$XDSSubmissionSetPatientId": data_set.patient_id,
            "$XDSSubmissionSetStatus": [APPROVED],
            "$XDSSubmissionSetSubmissionTimeFrom": "2099",
        },
    )

    assert counts(response) == {}


def test_find_folders_answers_both_folders(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.3: NIST 11899 basic."""
    response = data_set.query(
        "FindFolders",
        {"$XDSFolderPatientId": data_set.patient_id, "$XDSFolderStatus": [APPROVED]},
    )

    assert ids_of(response) == {
        data_set.ids["doc_w_fol"]["Folder"],
        data_set.ids["two_doc_w_fol"]["Folder"],
    }


def test_get_all_answers_every_object_of_the_patient(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.4: NIST 15803 all."""
    response = data_set.query(
        "GetAll",
        {
            "$patientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED, DEPRECATED],
            "$XDSSubmissionSetStatus": [APPROVED, DEPRECATED],
            "$XDSFolderStatus": [APPROVED, DEPRECATED],
        },
    )

    assert counts(response) == {
        "Documents": 6,
        "SubmissionSets": 5,
        "Folders": 2,
        "Associations": 15,
    }


def test_get_documents_by_unique_id(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: NIST 11901 uniqueid."""
    request = nist_submission("iti42-12346-single_doc", {"$patientid$": "x"})
    unique_id = ebrim.read_registry_objects(request).document_entries[0].unique_id
    response = data_set.query(
        "GetDocuments",
        {"$XDSDocumentEntryEntryUUID": [data_set.ids["single_doc"]["Document01"]]},
    )
    (entry,) = ebrim.read_registry_objects(response).document_entries

    by_unique_id = data_set.query(
        "GetDocuments", {"$XDSDocumentEntryUniqueId": [entry.unique_id or ""]}
    )

    assert unique_id != entry.unique_id
    assert ids_of(by_unique_id) == {data_set.ids["single_doc"]["Document01"]}


def test_get_documents_of_two_patients_is_result_not_single_patient(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7: NIST 12368, XDSResultNotSinglePatient."""
    response = data_set.query(
        "GetDocuments",
        {
            "$XDSDocumentEntryEntryUUID": [
                data_set.ids["single_doc"]["Document01"],
                data_set.ids["12374"]["Document01"],
            ]
        },
    )

    assert error_codes(response) == ["XDSResultNotSinglePatient"]


def test_get_folders_by_entry_uuid(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.6: NIST 11902 uuid."""
    folders = [
        data_set.ids["doc_w_fol"]["Folder"],
        data_set.ids["two_doc_w_fol"]["Folder"],
    ]

    response = data_set.query("GetFolders", {"$XDSFolderEntryUUID": folders})

    assert counts(response) == {"Folders": 2}
    assert ids_of(response) == set(folders)


def test_get_associations_of_a_document(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.7: NIST 11903 single_from_doc."""
    response = data_set.query(
        "GetAssociations", {"$uuid": [data_set.ids["single_doc"]["Document01"]]}
    )

    (association,) = ebrim.read_registry_objects(response).associations
    assert association.source_object == data_set.ids["single_doc"]["SubmissionSet01"]


def test_get_documents_and_associations(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.8: NIST 11904 uuid."""
    response = data_set.query(
        "GetDocumentsAndAssociations",
        {"$XDSDocumentEntryEntryUUID": [data_set.ids["single_doc"]["Document01"]]},
    )

    assert counts(response) == {"Documents": 1, "Associations": 1}


def test_get_submission_sets_of_a_document(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.9: NIST 11905 doc_uuid."""
    response = data_set.query(
        "GetSubmissionSets", {"$uuid": [data_set.ids["single_doc"]["Document01"]]}
    )

    assert counts(response) == {"SubmissionSets": 1, "Associations": 1}
    assert data_set.ids["single_doc"]["SubmissionSet01"] in ids_of(response)


def test_get_submission_set_and_contents_with_folder_membership(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.10: a SubmissionSet with a Folder answers the
    Folder, the DocumentEntry and all four Associations."""
    response = data_set.query(
        "GetSubmissionSetAndContents",
        {"$XDSSubmissionSetEntryUUID": data_set.ids["doc_w_fol"]["SubmissionSet01"]},
    )

    assert counts(response) == {
        "SubmissionSets": 1,
        "Documents": 1,
        "Folders": 1,
        "Associations": 4,
    }


def test_get_submission_set_and_contents_filters_by_format_code(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.10: $XDSDocumentEntryFormatCode leaves out
    other DocumentEntries and their Associations."""
    response = data_set.query(
        "GetSubmissionSetAndContents",
        {
            "$XDSSubmissionSetEntryUUID": data_set.ids["single_doc"]["SubmissionSet01"],
            "$XDSDocumentEntryFormatCode": ["no-such-format^^1.2.3"],
        },
    )

    assert counts(response) == {"SubmissionSets": 1}


def test_get_folder_and_contents(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.11: NIST 11907 uuid."""
    response = data_set.query(
        "GetFolderAndContents",
        {"$XDSFolderEntryUUID": data_set.ids["doc_w_fol"]["Folder"]},
    )

    assert counts(response) == {"Folders": 1, "Documents": 1, "Associations": 1}


def test_get_folders_for_document(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.12: NIST 11908 uuid."""
    response = data_set.query(
        "GetFoldersForDocument",
        {"$XDSDocumentEntryEntryUUID": data_set.ids["two_doc_w_fol"]["Document01"]},
    )

    assert ids_of(response) == {data_set.ids["two_doc_w_fol"]["Folder"]}


def test_get_related_documents_of_the_replaced_document(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.13: NIST 11909, the original and its
    replacement with the RPLC Association."""
    response = data_set.query(
        "GetRelatedDocuments",
        {
            "$XDSDocumentEntryEntryUUID": data_set.ids["doc_for_rplc"]["Document01"],
            "$AssociationTypes": [ebrim.HAS_MEMBER, RPLC],
        },
    )

    assert counts(response) == {"Documents": 2, "Associations": 1}
    assert data_set.ids["rplc"]["Document01"] in ids_of(response)


def test_get_related_documents_of_an_unrelated_document_is_empty(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.13: no relationship, no answer."""
    response = data_set.query(
        "GetRelatedDocuments",
        {
            "$XDSDocumentEntryEntryUUID": data_set.ids["single_doc"]["Document01"],
            "$AssociationTypes": [RPLC],
        },
    )

    assert counts(response) == {}


# Per query of ITI TF-2 3.18.4.1.2.3.7 that names objects by entryUUID: the
# parameter, and the submission and symbol of the object it is given.
QUERIES_BY_ENTRY_UUID = {
    "GetDocuments": ("$XDSDocumentEntryEntryUUID", "single_doc", "Document01"),
    "GetFolders": ("$XDSFolderEntryUUID", "doc_w_fol", "Folder"),
    "GetAssociations": ("$uuid", "single_doc", "Document01"),
    "GetDocumentsAndAssociations": (
        "$XDSDocumentEntryEntryUUID",
        "single_doc",
        "Document01",
    ),
    "GetSubmissionSets": ("$uuid", "single_doc", "Document01"),
    "GetSubmissionSetAndContents": (
        "$XDSSubmissionSetEntryUUID",
        "doc_w_fol",
        "SubmissionSet01",
    ),
    "GetFolderAndContents": ("$XDSFolderEntryUUID", "doc_w_fol", "Folder"),
    "GetFoldersForDocument": (
        "$XDSDocumentEntryEntryUUID",
        "two_doc_w_fol",
        "Document01",
    ),
    "GetRelatedDocuments": ("$XDSDocumentEntryEntryUUID", "doc_for_rplc", "Document01"),
}


@pytest.mark.parametrize("name", QUERIES_BY_ENTRY_UUID)
def test_entry_uuid_in_upper_case_finds_what_lower_case_finds(
    data_set: DataSet, name: str
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7, RFC 4122 3: an entryUUID parameter is case
    insensitive; the answer spells every entryUUID in lower case."""
    parameter, case, symbol = QUERIES_BY_ENTRY_UUID[name]
    entry_uuid = data_set.ids[case][symbol]
    extra: dict[str, str | list[str]] = (
        {"$AssociationTypes": [RPLC]} if name == "GetRelatedDocuments" else {}
    )
    lower = data_set.query(name, {parameter: [entry_uuid], **extra})

    upper = data_set.query(name, {parameter: [upper_case_uuid(entry_uuid)], **extra})

    assert ids_of(upper) == ids_of(lower)
    assert ids_of(upper) and all(i == i.lower() for i in ids_of(upper))


def test_query_id_in_upper_case_names_the_stored_query(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5, RFC 4122 3: the query id is a UUID, case
    insensitive like any."""
    entry_uuid = data_set.ids["single_doc"]["Document01"]
    request = stored_query.build_query(
        "GetDocuments", {"$XDSDocumentEntryEntryUUID": [entry_uuid]}
    )
    adhoc = request.find(f"{{{ns.RIM}}}AdhocQuery")
    adhoc.set("id", upper_case_uuid(adhoc.get("id")))

    client = wire.SoapClient(data_set.url)
    with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
        assert ids_of(reply.body) == {entry_uuid}


def test_document_entry_type_in_upper_case_is_the_stable_type(
    data_set: DataSet,
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1, RFC 4122 3: $XDSDocumentEntryType names
    objectType UUIDs, whatever their letter case."""
    stable = ebrim.metadata_table()[ebrim.DOCUMENT_ENTRY]["object_type_stable"]

    response = data_set.query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED],
            "$XDSDocumentEntryType": [upper_case_uuid(stable)],
        },
        stored_query.RETURN_OBJECT_REF,
    )

    assert counts(response) == {"ObjectRefs": 5}


@pytest.mark.parametrize(
    ("parameter", "count"),
    [
        ("$XDSDocumentEntryClassCode", stored_query.MAX_PARAMETER_VALUES + 1),
        ("$XDSDocumentEntryEventCodeList", 700),
    ],
)
def test_query_with_too_many_values_is_param_number_without_patient_in_log(
    data_set: DataSet, parameter: str, count: int, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7: a bounded answer, not a failing database query."""
    caplog.set_level(logging.INFO)
    request = stored_query.build_query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED],
            parameter: ["('C0^^1.2.3')"],
        },
    )
    # One value per Value element, as ITI TF-2 3.18.4.1.2.3.5 allows.
    (value_list,) = [
        slot.find(f"{{{ns.RIM}}}ValueList")
        for slot in request.iter(f"{{{ns.RIM}}}Slot")
        if slot.get("name") == parameter
    ]
    for n in range(1, count):
        etree.SubElement(value_list, f"{{{ns.RIM}}}Value").text = f"('C{n}^^1.2.3')"
    client = wire.SoapClient(data_set.url)
    with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
        response = reply.body

    assert error_codes(response) == ["XDSStoredQueryParamNumber"]
    assert data_set.patient_id.split("^")[0] not in caplog.text


def test_query_with_too_many_slots_is_param_number(data_set: DataSet) -> None:
    """ITI TF-2 3.18.4.1.2.3.7: the registry bounds the slots of one query."""
    request = stored_query.build_query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": data_set.patient_id,
            "$XDSDocumentEntryStatus": [APPROVED],
        },
    )
    adhoc = request.find(f"{{{ns.RIM}}}AdhocQuery")
    template = adhoc.find(f"{{{ns.RIM}}}Slot")
    for _ in range(stored_query.MAX_QUERY_VALUES):
        adhoc.append(copy.deepcopy(template))
    client = wire.SoapClient(data_set.url)
    with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
        assert error_codes(reply.body) == ["XDSStoredQueryParamNumber"]


def test_padding_in_a_query_does_not_grow_its_audit_record(
    running_node: RunningNode,
) -> None:
    """ITI TF-2 3.18.5.1: the record keeps the query, not the sender's padding."""
    running_node.feed()
    request = stored_query.build_query(
        "FindDocuments",
        {"$XDSDocumentEntryPatientId": PATIENT, "$XDSDocumentEntryStatus": [APPROVED]},
    )
    request.insert(0, etree.Comment("x" * 70_000))
    request[0].tail = " " * 70_000
    client = wire.SoapClient(running_node.settings.url("registry"))
    with client.call("urn:ihe:iti:2007:RegistryStoredQuery", request) as reply:
        assert reply.body.get("status", "").endswith(":Success")

    (record,) = [
        r
        for r in running_node.services.audit_spool.records()
        if r.event_type == "ITI-18" and "registry" in " ".join(r.actor_user_ids)
    ]
    assert len(record.xml) < 10_000
    query = etree.fromstring(record.xml).find(
        "ParticipantObjectIdentification/ParticipantObjectQuery"
    )
    kept = etree.fromstring(base64.b64decode(query.text))
    assert kept.find(f"{{{ns.RIM}}}AdhocQuery") is not None

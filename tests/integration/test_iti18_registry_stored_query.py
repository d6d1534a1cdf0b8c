"""ITI-18 Registry Stored Query from an independent SOAP stack: zeep, loading
the official IHE registry WSDL, queries our Document Registry."""

from __future__ import annotations

import zeep
from lxml import etree
from zeep.wsa import WsAddressingPlugin

from tests.conftest import shared_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi import ns, wire
from xdsi.dicom import scan
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.responses import read_errors

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"


def _zeep_find_documents(url: str, patient_id: str, return_type: str):  # type: ignore[no-untyped-def]
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
    (study,) = scan.scan_directory(shared_path("dicom", "study-mr", "images")).studies
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

"""ITI-43 Retrieve Document Set from independent parsers: zeep, loading the
official IHE repository WSDL, calls our Document Repository, and Python's
``email`` package reads our MTOM answer as a second MIME parser."""

from __future__ import annotations

import email
import email.policy
import hashlib
from pathlib import Path

import requests
import zeep
from lxml import etree
from zeep.wsa import WsAddressingPlugin

from tests.conftest import dicom_path, shared_path
from tests.integration.conftest import PATIENT
from tests.integration.s3_peer import (  # noqa: F401 (fixtures)
    RepositoryNode,
    blob_store_fixture,
    repository_node_fixture,
    s3_peer_fixture,
)
from xdsi import ns, wire
from xdsi.actors.consumer import retrieve_request
from xdsi.actors.document_source import DocumentSource
from xdsi.metadata.responses import read_errors, read_status

RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"


def _submit(node: RepositoryNode, tmp_path: Path) -> tuple[str, Path]:
    node.feed()
    document = dicom_path("study-ct", "S1000", "I0010.dcm")
    submitted = DocumentSource(node.settings, tmp_path / "spool").submit(
        [document], PATIENT, mime_type="application/dicom"
    )
    return submitted.document_unique_ids[0], document


def _retrieve_request(node: RepositoryNode, unique_id: str) -> etree._Element:
    """A RetrieveDocumentSetRequest for one document of the node's repository."""
    return retrieve_request(node.settings.repository.repository_unique_id, unique_id)


def test_zeep_retrieves_the_document(repository_node: RepositoryNode, tmp_path: Path):
    """ITI TF-2 3.43.4.1.2: a RetrieveDocumentSetRequest built by zeep from the
    official WSDL is answered with the document."""
    unique_id, document = _submit(repository_node, tmp_path)
    wsdl = shared_path("schemas", "wsdl", "XDS.b_DocumentRepository.wsdl")
    client = zeep.Client(str(wsdl), plugins=[WsAddressingPlugin()])
    service = client.create_service(
        "{urn:ihe:iti:xds-b:2007}DocumentRepository_Binding",
        repository_node.settings.url("repository"),
    )
    answer = service["DocumentRepository_RetrieveDocumentSet"](
        DocumentRequest=[
            {
                "RepositoryUniqueId": (
                    repository_node.settings.repository.repository_unique_id
                ),
                "DocumentUniqueId": unique_id,
            }
        ]
    )
    assert answer.RegistryResponse.status.endswith(":Success")
    (item,) = answer.DocumentResponse
    assert item.DocumentUniqueId == unique_id
    assert item.mimeType == "application/dicom"
    assert item.Document == document.read_bytes()


def test_mtom_answer_parses_with_the_email_package(
    repository_node: RepositoryNode, tmp_path: Path
):
    """SOAP 1.2 MTOM 4.3, RFC 2387: the answer is a multipart/related package
    whose start part is the envelope and whose other part is the document."""
    unique_id, document = _submit(repository_node, tmp_path)
    request = _retrieve_request(repository_node, unique_id)
    url = repository_node.settings.url("repository")
    content_type, _, chunks = wire.write_message(
        wire.build_envelope(request, RETRIEVE, to=url), RETRIEVE, mtom=False
    )
    answer = requests.post(
        url, data=b"".join(chunks), headers={"Content-Type": content_type}, timeout=60
    )
    assert answer.status_code == 200

    head = f"Content-Type: {answer.headers['Content-Type']}\r\n\r\n".encode()
    package = email.message_from_bytes(head + answer.content, policy=email.policy.HTTP)
    assert package.get_content_type() == "multipart/related"
    root, part = package.get_payload()
    assert f"<{package.get_param('start').strip('<>')}>" == root["Content-ID"]
    assert root.get_content_type() == "application/xop+xml"
    envelope = etree.fromstring(root.get_payload(decode=True))
    include = envelope.find(f".//{{{ns.XDSB}}}Document/{{{ns.XOP}}}Include")
    assert include.get("href") == "cid:" + part["Content-ID"].strip("<>")
    body = part.get_payload(decode=True)
    assert (
        hashlib.sha1(body).hexdigest()
        == hashlib.sha1(document.read_bytes()).hexdigest()
    )


def test_document_whose_stored_copy_is_gone_is_an_error_not_a_broken_answer(
    repository_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-2 3.43.4.2.3: a registered document the repository cannot read
    is answered with XDSRepositoryError before any part is sent, never with
    Success and a connection that breaks off."""
    unique_id, _ = _submit(repository_node, tmp_path)
    repository = repository_node.services.repository
    record = repository.find(unique_id)
    assert record is not None
    repository.blobs.delete(record.blob)
    request = _retrieve_request(repository_node, unique_id)

    client = wire.SoapClient(repository_node.settings.url("repository"))
    with client.call(RETRIEVE, request) as reply:
        assert read_status(reply.body).endswith(":Failure")
        assert [e.code for e in read_errors(reply.body)] == ["XDSRepositoryError"]
        assert not reply.attachments

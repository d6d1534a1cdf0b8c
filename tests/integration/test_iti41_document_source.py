"""ITI-41 Provide and Register Document Set-b from our Document Source
(``xdsi submit``) into the Document Repository on each blob store, and back
with ITI-43; all or nothing when the registry is down or refuses."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from lxml import etree

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT
from tests.integration.s3_peer import (  # noqa: F401 (fixtures)
    RepositoryNode,
    blob_store_fixture,
    repository_node_fixture,
    repository_settings,
    run_repository_node,
    s3_peer_fixture,
)
from xdsi import ns, wire
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.provide import SubmitError
from xdsi.cli import main
from xdsi.config import to_toml

RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"


def retrieve(
    node: RepositoryNode, unique_ids: list[str], out: Path
) -> dict[str, bytes]:
    """ITI-43 for ``unique_ids``; return each document's bytes by uniqueId."""
    request = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    for unique_id in unique_ids:
        item = etree.SubElement(request, f"{{{ns.XDSB}}}DocumentRequest")
        etree.SubElement(
            item, f"{{{ns.XDSB}}}RepositoryUniqueId"
        ).text = node.settings.repository.repository_unique_id
        etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
    out.mkdir(parents=True, exist_ok=True)
    client = wire.SoapClient(node.settings.url("repository"), spool_dir=out)
    got = {}
    with client.call(RETRIEVE, request) as reply:
        for item in reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse"):
            unique_id = item.findtext(f"{{{ns.XDSB}}}DocumentUniqueId")
            document = item.find(f"{{{ns.XDSB}}}Document")
            got[unique_id] = wire.attachment_for(document, reply).read_bytes()
    return got


def source(node: RepositoryNode, tmp_path: Path) -> DocumentSource:
    return DocumentSource(node.settings, tmp_path / "source-spool")


def test_submitted_documents_come_back_byte_identical(
    repository_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-2 3.41.4.1.3 and 3.43.4.2.3: what ITI-41 stored, ITI-43 returns."""
    repository_node.feed()
    files = [
        dicom_path("study-ct", "S1000", "I0010.dcm"),
        dicom_path("study-ct", "S2010", "I0010.dcm"),
    ]
    submitted = source(repository_node, tmp_path).submit(
        files, PATIENT, mime_type="application/dicom"
    )
    assert len(submitted.document_unique_ids) == 2
    assert len(repository_node.blobs()) == 2

    got = retrieve(repository_node, list(submitted.document_unique_ids), tmp_path / "r")
    for unique_id, path in zip(submitted.document_unique_ids, files, strict=True):
        assert (
            hashlib.sha1(got[unique_id]).hexdigest()
            == hashlib.sha1(path.read_bytes()).hexdigest()
        )


def test_registry_failure_leaves_no_blob_and_no_row(
    repository_node: RepositoryNode, tmp_path: Path
):
    """DESIGN.md principle 6, ITI TF-2 3.41.4.1.3: when the registry answers
    Failure (an unknown patient), the repository keeps nothing."""
    document = tmp_path / "report.txt"
    document.write_bytes(b"a report for a patient the registry never heard of\n")
    with pytest.raises(SubmitError) as failed:
        source(repository_node, tmp_path).submit([document], PATIENT)
    assert [e.code for e in failed.value.errors] == ["XDSUnknownPatientId"]
    assert repository_node.rows() == 0
    assert repository_node.blobs() == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry_down_node(tmp_path, blob_store):  # type: ignore[no-untyped-def]
    settings = repository_settings(
        tmp_path,
        blob_store,
        registry_url=f"http://127.0.0.1:{_closed_port()}/xds/registry",
    )
    yield from run_repository_node(settings, blob_store)


def test_registry_down_leaves_no_blob_and_no_row(
    registry_down_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-3 Table 4.2.4.1-2: a registry that cannot be reached is
    XDSRegistryNotAvailable, and the repository keeps nothing."""
    document = tmp_path / "report.txt"
    document.write_bytes(b"x" * 100_000)
    with pytest.raises(SubmitError) as failed:
        source(registry_down_node, tmp_path).submit([document], PATIENT)
    assert [e.code for e in failed.value.errors] == ["XDSRegistryNotAvailable"]
    assert registry_down_node.rows() == 0
    assert registry_down_node.blobs() == []


@pytest.mark.parametrize("blob_store", ["local"], indirect=True)
def test_submit_command_prints_the_uniqueids(
    repository_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-3 4.2.3.3.12 and 4.2.3.2.26: ``xdsi submit`` prints the
    SubmissionSet uniqueId and one document uniqueId per file."""
    repository_node.feed()
    config = tmp_path / "xdsi.toml"
    config.write_text(to_toml(repository_node.settings))
    files = [tmp_path / "a.pdf", tmp_path / "b.txt"]
    for n, path in enumerate(files):
        path.write_bytes(b"%PDF-1.4\n" * (n + 1))
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(config),
            "submit",
            *map(str, files),
            "--patient-id",
            PATIENT,
            "--title",
            "Discharge summary",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("SubmissionSet 2.25.")
    assert [line.split()[1] for line in lines[1:]] == [str(p) for p in files]
    unique_ids = [line.split()[0] for line in lines[1:]]
    assert retrieve(repository_node, unique_ids, tmp_path / "r") == {
        unique_ids[0]: files[0].read_bytes(),
        unique_ids[1]: files[1].read_bytes(),
    }


@pytest.mark.parametrize("blob_store", ["local"], indirect=True)
def test_submit_command_fails_with_the_registry_codes(
    repository_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-3 Table 4.2.4.1-2: on Failure ``xdsi submit`` exits non-zero
    and prints the error codes."""
    config = tmp_path / "xdsi.toml"
    config.write_text(to_toml(repository_node.settings))
    document = tmp_path / "a.txt"
    document.write_bytes(b"unknown patient")
    result = CliRunner().invoke(
        main,
        ["--config", str(config), "submit", str(document), "--patient-id", "NOBODY"],
    )
    assert result.exit_code == 1
    assert "XDSUnknownPatientId" in result.output
    assert repository_node.rows() == 0


def test_source_settings_name_the_repository(repository_node: RepositoryNode):
    """The ``[source]`` repository_url overrides the node's own repository."""
    settings = replace(
        repository_node.settings,
        source=replace(repository_node.settings.source, repository_url="http://x/y"),
    )
    assert settings.source_repository_url == "http://x/y"
    assert repository_node.settings.source_repository_url == (
        repository_node.settings.url("repository")
    )


def test_submission_is_audited_as_an_export(
    repository_node: RepositoryNode, tmp_path: Path
):
    """ITI TF-2 3.41.5.1.1: the Document Source audits ITI-41 as Export."""
    repository_node.feed()
    note = tmp_path / "note.txt"
    note.write_text("a plain document")
    services = repository_node.services
    DocumentSource(
        repository_node.settings, tmp_path / "spool", services.auditor
    ).submit([note], PATIENT)
    events = [
        (r.event_type, r.event_id.display)
        for r in services.audit_spool.records()
        if r.valid
    ]
    assert ("ITI-41", "Export") in events
    assert ("ITI-41", "Import") in events

"""ITI-41 Provide and Register Document Set-b from our Document Source
(``xdsi submit``) into the Document Repository on each blob store, and back
with ITI-43; all or nothing when the registry is down or refuses."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from lxml import etree
from werkzeug.serving import make_server
from werkzeug.wrappers import Request

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
from xdsi.config import Settings, to_toml
from xdsi.metadata.responses import registry_response

RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"
ITI_41_RESPONSE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"


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


class _HostileRepository:
    """A Document Repository on 127.0.0.1 that answers every ITI-41 with a
    WSGI ``app`` of the test's choosing."""

    def __init__(self, app: Callable[[dict, Callable], Iterable[bytes]]) -> None:
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}/repository"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _source_of(url: str, tmp_path: Path, timeout: float = 120.0) -> DocumentSource:
    settings = Settings().with_storage(tmp_path / "node")
    settings = replace(
        settings,
        source=replace(settings.source, repository_url=url, timeout=timeout),
    )
    return DocumentSource(settings, tmp_path / "source-spool")


def _success() -> etree._Element:
    """The envelope of an ITI-41 answer of status Success."""
    return wire.build_envelope(registry_response([]), ITI_41_RESPONSE)


def test_an_answer_of_more_parts_than_a_registry_response_is_refused(
    tmp_path: Path,
):
    """ITI TF-2 3.41.4.2: the answer is a RegistryResponse, and no part
    beside it. A repository answering Success in an MTOM package with
    thousands of parts more (each a spool file) is refused at the first
    part too many, so the submission is not taken as done."""
    envelope = _success()
    flood = [
        wire.OutgoingPart(f"flood{n}@peer", "application/octet-stream", data=b"")
        for n in range(5_000)
    ]
    content_type, _, chunks = wire.write_message(envelope, ITI_41_RESPONSE, flood)
    answer = b"".join(chunks)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        Request(environ).get_data()
        start_response("200 OK", [("Content-Type", content_type)])
        return [answer]

    note = tmp_path / "note.txt"
    note.write_text("a plain document")
    repository = _HostileRepository(app)
    try:
        with pytest.raises(SubmitError, match="more than 1 MIME parts"):
            _source_of(repository.url, tmp_path).submit([note], PATIENT)
    finally:
        repository.close()


def test_an_answer_trickling_in_is_given_up(tmp_path: Path):
    """A repository that sends its RegistryResponse a byte at a time, each
    within the per-read timeout, held the submission for as long as it
    liked. The answer must keep wire.ANSWER_PACE on average, pausing
    [source] timeout at most; this one is given up within about twice the
    timeout."""
    stop = threading.Event()
    answer = wire.serialize(_success())

    def app(environ: dict, start_response: Callable) -> Iterator[bytes]:
        Request(environ).get_data()
        start_response("200 OK", [("Content-Type", "application/soap+xml")])
        for byte in answer:
            if stop.wait(0.5):
                return
            yield bytes([byte])

    note = tmp_path / "note.txt"
    note.write_text("a plain document")
    repository = _HostileRepository(app)
    try:
        with pytest.raises(SubmitError, match="slower than 8192 bytes a second"):
            _source_of(repository.url, tmp_path, timeout=2.0).submit([note], PATIENT)
    finally:
        stop.set()
        repository.close()

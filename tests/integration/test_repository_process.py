"""The Document Repository as a separate ``xdsi serve`` process: memory stays
flat for big documents (ITI-41 in, ITI-43 out), and a registration whose
answer never came (a process killed, a registry too slow) is settled by
asking the registry: kept if it was registered, else removed."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import func, select

from tests.integration.conftest import PATIENT
from tests.integration.node_process import NodeProcess, node_settings
from tests.integration.registry_relay import HoldingRelay
from xdsi import ns, wire
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.provide import SubmitError
from xdsi.app import build_services
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import make_engine, repository_document

MB = 1024 * 1024


def _feed(settings: Settings) -> None:
    send_message(settings.node.host, settings.registry.feed_port, build_feed(PATIENT))


def _document(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that no compression or dedup shortcuts."""
    block = os.urandom(MB)
    with path.open("wb") as out:
        for n in range(size // MB):
            out.write(hashlib.sha256(n.to_bytes(8, "big")).digest() + block[32:])
    return path


def _peak_rss_for(size: int, tmp_path: Path) -> int:
    """Peak RSS of a fresh node that took one document in and gave it back."""
    work = tmp_path / f"{size}"
    work.mkdir()
    settings = node_settings(work / "node")
    node = NodeProcess.start(settings, work / "xdsi.toml")
    try:
        settings = node.effective(settings)
        _feed(settings)
        document = _document(work / "document.bin", size)
        submitted = DocumentSource(settings, work / "spool").submit(
            [document], PATIENT, mime_type="application/octet-stream"
        )
        (unique_id,) = submitted.document_unique_ids
        client_spool = work / "retrieved"
        client_spool.mkdir()
        _assert_retrieved(settings, unique_id, document, client_spool)
        return node.peak_rss()
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


def _assert_retrieved(
    settings: Settings, unique_id: str, document: Path, spool: Path
) -> None:
    request = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    item = etree.SubElement(request, f"{{{ns.XDSB}}}DocumentRequest")
    etree.SubElement(
        item, f"{{{ns.XDSB}}}RepositoryUniqueId"
    ).text = settings.repository.repository_unique_id
    etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
    client = wire.SoapClient(settings.url("repository"), spool_dir=spool)
    with client.call("urn:ihe:iti:2007:RetrieveDocumentSet", request) as reply:
        (attachment,) = reply.attachments.values()
        assert attachment.size == document.stat().st_size
        digest = hashlib.sha1()
        with document.open("rb") as handle:
            while chunk := handle.read(MB):
                digest.update(chunk)
        assert attachment.sha1 == digest.hexdigest()


def test_peak_rss_does_not_grow_with_document_size(tmp_path: Path):
    """DESIGN.md principle 5: a 1 GB document through ITI-41 and ITI-43
    costs the node no more peak memory (within 20 %) than a 10 MB one."""
    small = _peak_rss_for(10 * MB, tmp_path)
    big = _peak_rss_for(1024 * MB, tmp_path)
    assert big <= 1.2 * small, (small, big)


@pytest.fixture
def relay() -> Iterator[HoldingRelay]:
    relay = HoldingRelay()
    yield relay
    relay.close()


def _pending(settings: Settings) -> tuple[int, list[Path]]:
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(func.count()).select_from(repository_document)
            ).scalar_one()
    finally:
        engine.dispose()
    root = settings.storage / "repository"
    blobs = [p for p in root.rglob("*") if p.is_file() and ".spool" not in p.parts]
    return rows, blobs


def _states(settings: Settings) -> list[str]:
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(repository_document.c.state)).scalars())
    finally:
        engine.dispose()


def _settled(settings: Settings, wanted: object, seconds: float = 60) -> None:
    """Wait for the node's sweep to leave the repository as ``wanted``
    (rows and blobs, as ``_pending`` gives them)."""
    deadline = time.monotonic() + seconds
    while _pending(settings) != wanted:
        assert time.monotonic() < deadline, _pending(settings)
        time.sleep(0.2)


def _submit_in_background(
    source: DocumentSource, document: Path
) -> tuple[threading.Thread, list[BaseException]]:
    failures: list[BaseException] = []

    def submit() -> None:
        try:
            source.submit([document], PATIENT)
        except BaseException as exc:  # the node dies under the request
            failures.append(exc)

    submitter = threading.Thread(target=submit, daemon=True)
    submitter.start()
    return submitter, failures


@pytest.mark.parametrize(
    "registered", [False, True], ids=["never-registered", "registered-unheard"]
)
def test_a_killed_submission_is_settled_at_restart(
    tmp_path: Path, relay: HoldingRelay, registered: bool
):
    """DESIGN.md principle 6: a node killed (SIGKILL) after storing a document
    and before the registry's answer came asks the registry once started
    again (ITI-18 GetDocuments): a document the registry holds is kept and
    retrievable, one it does not hold leaves nothing behind."""
    settings = node_settings(tmp_path / "node", registry_url=relay.url)
    node = NodeProcess.start(settings, tmp_path / "xdsi.toml")
    submitter = None
    try:
        effective = node.effective(settings)
        relay.target = effective.url("registry")
        relay.forward_first = registered
        _feed(effective)
        document = tmp_path / "report.txt"
        document.write_bytes(b"held at the registry\n" * 1000)
        source = DocumentSource(effective, tmp_path / "spool")
        submitter, failures = _submit_in_background(source, document)
        assert relay.arrived.wait(60), "ITI-42 never reached the relay"
        assert _pending(effective)[0] == 1
        assert len(_pending(effective)[1]) == 1
        node.kill()
    finally:
        node.stop()
    submitter.join(60)
    assert failures, "the submission should not have succeeded"

    # Started again on the same ports, so that the relay reaches its
    # registry, and with a short sweep age, so that the test need not wait.
    quick = replace(effective.repository, registry_timeout=1.0, pending_sweep_age=2)
    restarted = NodeProcess.start(
        replace(effective, repository=quick), tmp_path / "xdsi.toml"
    )
    try:
        if not registered:
            _settled(effective, (0, []))
            return
        deadline = time.monotonic() + 60
        while _states(effective) != ["stored"]:
            assert time.monotonic() < deadline, _states(effective)
            time.sleep(0.2)
        engine = make_engine(effective.database_url)
        with engine.connect() as conn:
            unique_id = conn.execute(
                select(repository_document.c.unique_id)
            ).scalar_one()
        engine.dispose()
        spool = tmp_path / "retrieved"
        spool.mkdir()
        _assert_retrieved(effective, unique_id, document, spool)
    finally:
        restarted.stop()


@contextmanager
def _behind(relay: HoldingRelay, tmp_path: Path) -> Iterator[Settings]:
    """A node whose ITI-42 goes through ``relay`` and waits 1 s for an
    answer; the patient is fed. Yields its settings."""
    settings = node_settings(
        tmp_path / "node", registry_url=relay.url, registry_timeout=1.0
    )
    node = NodeProcess.start(settings, tmp_path / "xdsi.toml")
    try:
        effective = node.effective(settings)
        relay.target = effective.url("registry")
        _feed(effective)
        yield effective
    finally:
        node.stop()


def test_an_unanswered_registration_the_registry_holds_succeeds(
    tmp_path: Path, relay: HoldingRelay
):
    """ITI TF-2 3.42.4.1.3: the registry registered the submission, but its
    answer never came back within ``[repository] registry_timeout``. The
    repository asks the registry, finds every document and answers Success;
    the document is retrievable, not orphaned."""
    relay.forward_first = True
    with _behind(relay, tmp_path) as effective:
        document = tmp_path / "report.txt"
        document.write_bytes(b"registered, answer lost\n" * 1000)
        submitted = DocumentSource(effective, tmp_path / "spool").submit(
            [document], PATIENT
        )
        assert relay.arrived.is_set()
        (unique_id,) = submitted.document_unique_ids
        assert _states(effective) == ["stored"]
        spool = tmp_path / "retrieved"
        spool.mkdir()
        _assert_retrieved(effective, unique_id, document, spool)


def test_an_unanswered_registration_the_registry_lacks_stays_pending(
    tmp_path: Path, relay: HoldingRelay
):
    """No answer within ``registry_timeout``, and the registry, asked, does
    not hold the document: it may still register it, so the submission
    fails as XDSRegistryNotAvailable and the document is kept pending, not
    retrievable. A sweep past ``pending_sweep_age`` asks again and, the
    registry still without it, removes it."""
    with _behind(relay, tmp_path) as effective:
        document = tmp_path / "report.txt"
        document.write_bytes(b"never registered\n" * 1000)
        with pytest.raises(SubmitError) as failed:
            DocumentSource(effective, tmp_path / "spool").submit([document], PATIENT)
        (error,) = failed.value.errors
        assert error.code == "XDSRegistryNotAvailable"
        assert "no answer within 1 s" in error.message
        assert "kept, not retrievable" in error.message
        assert _states(effective) == ["pending"]
        assert len(_pending(effective)[1]) == 1

        # Another process on the same store sweeps, as the node does each
        # minute.
        services = build_services(effective)
        try:
            assert services.repository.sweep_pending(timedelta(0)) == 1
        finally:
            services.engine.dispose()
        assert _pending(effective) == (0, [])

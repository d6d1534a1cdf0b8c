"""Several HTTP worker processes serve one node's actors on the same sockets.

DESIGN.md (Storage): web workers are stateless, so a node scales over cores
by running more of them over one database; ``[node] workers``. The audit
spool names each message after the process that wrote it, which tells which
worker answered.
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from tests.conftest import PostgresCluster, dicom_path
from tests.integration.node_process import NodeProcess, node_settings
from tests.nist_submissions import error_codes, run_query
from xdsi import tls
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message

PATIENT = "XDSI-WORKERS^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


@pytest.fixture
def node(postgresql: PostgresCluster, tmp_path: Path) -> Iterator[Node]:
    database_url = postgresql.create_database()
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings, node=replace(settings.node, database_url=database_url, workers=2)
    )
    node = Node(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop()
        postgresql.drop_database(database_url)


def _query(node: Node) -> str:
    return _query_at(node.settings)


def _query_at(settings: Settings) -> str:
    response = run_query(
        settings.url("registry"),
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": PATIENT,
            "$XDSDocumentEntryStatus": [
                "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
            ],
        },
    )
    assert response.get("status") == SUCCESS, error_codes(response)
    return "ok"


def _answering_pids(node: Node) -> set[int]:
    """The processes that wrote audit messages: ``<ns>-<pid>-<tag>.xml``."""
    return _audit_writers(node.settings)


def _audit_writers(settings: Settings) -> set[int]:
    spool = settings.storage / "audit"
    return {int(path.name.split("-")[1]) for path in spool.glob("*.xml")}


def _answering_pids_of(settings: Settings) -> set[int]:
    """The processes that audit 16 queries sent at once, and those before."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _query_at(settings), range(16)))
    return _audit_writers(settings)


def _wait_for(condition, seconds: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_requests_are_answered_by_more_than_one_process(node: Node) -> None:
    """ITI TF-2 3.18: every worker answers stored queries of the same registry."""
    assert "MSA|AA" in send_message(
        node.settings.node.host, node.settings.registry.feed_port, build_feed(PATIENT)
    )
    (worker,) = node.worker_pids
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        # A worker takes a few seconds to start; until then the node's own
        # process answers every request.
        while time.monotonic() < deadline:
            list(pool.map(lambda _: _query(node), range(16)))
            seen = _answering_pids(node)
            if {os.getpid(), worker} <= seen:
                break
    assert {os.getpid(), worker} <= seen, seen


def _stow(settings: Settings, data: bytes) -> int:
    """Store one instance by STOW-RS (DICOM PS3.18 10.5); the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = requests.post(
        f"http://{settings.node.host}:{settings.imaging_source.port}"
        f"{settings.imaging_source.stow_path}",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; '
            f"boundary={boundary}",
            "Accept": "application/dicom+json",
        },
        timeout=30,
    )
    return response.status_code


def test_no_worker_logs_the_values_pydicom_finds_invalid(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    """No patient data in the log above DEBUG: pydicom quotes an invalid
    value it reads ("Invalid value for VR IS: ..."), and a worker process of
    ``xdsi serve`` keeps that out of the log as the node's own process does."""
    database_url = postgresql.create_database()
    settings = node_settings(tmp_path / "node")
    settings = replace(
        settings, node=replace(settings.node, database_url=database_url, workers=2)
    )
    log = tmp_path / "serve.log"
    served = NodeProcess.start(settings, tmp_path / "node.toml", log)
    try:
        node = served.effective(settings)
        # Once a second process answers queries, the worker is up and takes
        # its share of the STOW-RS requests too.
        assert _wait_for(lambda: len(_answering_pids_of(node)) >= 2)
        ds = pydicom.dcmread(dicom_path("study-mr", "images", "000001.dcm"))
        # A name where Instance Number (IS) belongs, as a garbled modality
        # might send.
        ds[0x00200013] = RawDataElement(
            Tag(0x00200013), "IS", 8, b"DOE^JOHN", 0, False, True
        )

        instances = []
        for _ in range(48):
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buffer = io.BytesIO()
            ds.save_as(buffer)
            instances.append(buffer.getvalue())

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda data: _stow(node, data), instances))
    finally:
        served.stop()
        postgresql.drop_database(database_url)

    assert set(statuses) == {200}
    assert "DOE^JOHN" not in log.read_text()


def test_a_worker_that_dies_is_replaced_and_the_node_keeps_answering(
    node: Node,
) -> None:
    """ITI TF-2 3.18: the registry answers while a worker is restarted."""
    (worker,) = node.worker_pids
    os.kill(worker, 9)

    assert _query(node) == "ok"
    assert _wait_for(lambda: node.worker_pids and node.worker_pids != [worker])
    (replacement,) = node.worker_pids
    assert _wait_for(lambda: replacement in _serving_after_queries(node))


def _serving_after_queries(node: Node) -> set[int]:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _query(node), range(16)))
    return _answering_pids(node)


def test_stop_ends_every_worker(node: Node) -> None:
    """A stopped node leaves no worker process behind."""
    workers = list(node.worker_pids)

    node.stop()

    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_every_worker_refuses_a_peer_without_a_trusted_certificate(
    tmp_path: Path,
) -> None:
    """ITI TF-2 3.19: mutual TLS holds on the workers' connections too."""
    ca = tls.make_ca(tmp_path / "ca")
    rogue_ca = tls.make_ca(tmp_path / "rogue-ca", common_name="rogue CA")
    node_files = tls.make_cert(tmp_path / "ca", ca)
    rogue = tls.make_cert(tmp_path / "rogue-ca", rogue_ca, name="rogue")
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        node=replace(settings.node, workers=2),
        tls=tls.tls_settings(node_files, ca.certificate),
    )
    with Node(settings) as node:
        host, port = node.settings.node.host, node.settings.registry.port
        trusted = tls.client_context(node.settings.tls)
        untrusted = tls.client_context(tls.tls_settings(rogue, ca.certificate))

        def post(context: ssl.SSLContext) -> bytes:
            with socket.create_connection((host, port), timeout=10) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname=host) as secured:
                        secured.sendall(
                            b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                            b"Connection: close\r\n\r\n"
                        )
                        return secured.recv(64)
                except (ssl.SSLError, ConnectionError):
                    return b""

        alerts: set[int] = set()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(trusted), range(32)))
            # A worker takes a few seconds to start; until then the node's
            # own process answers every connection.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                refused = list(pool.map(lambda _: post(untrusted), range(16)))
                assert refused == [b""] * 16
                alerts = _alerting_pids(tmp_path / "node" / "audit")
                if len(alerts) == 2:
                    break

    assert all(a.startswith(b"HTTP/1.1") for a in answers), answers
    assert len(alerts) == 2, "both processes refuse and audit"


def _alerting_pids(spool: Path) -> set[int]:
    """The processes that spooled a Security Alert (DICOM PS3.15 A.5.3.11)."""
    return {
        int(path.name.split("-")[1])
        for path in spool.glob("*.xml")
        if b'csd-code="110113"' in path.read_bytes()
    }

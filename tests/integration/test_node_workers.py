"""Several HTTP worker processes serve one node's actors on the same sockets.

DESIGN.md (Storage): web workers are stateless, so a node scales over cores
by running more of them over one database; ``[node] workers``. The audit
spool names each message after the process that wrote it, which tells which
worker answered.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import ssl
import subprocess
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


# A bound on liveness, not on speed: a worker spawned takes seconds to import
# its modules, many more on a machine busy with other tests.
def _wait_for(  # type: ignore[no-untyped-def]
    condition, seconds: float = 120.0
) -> bool:
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


def _children(pid: int) -> set[int]:
    """The child processes of ``pid`` (proc(5): /proc/pid/task/tid/children)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return children


def _started(pid: int) -> int | None:
    """When process ``pid`` started (proc(5): /proc/pid/stat, field 22), or
    None once it has ended, a zombie left unreaped included; with the pid,
    it names one process even if the pid is used again."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields from the third (state) on follow the command name in brackets.
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _workers_of(served: NodeProcess) -> dict[int, int]:
    """The processes the node started, by pid: HTTP workers and the
    multiprocessing resource tracker that ends after them."""
    workers = {}
    for pid in _children(served.process.pid):
        started = _started(pid)
        if started is not None:
            workers[pid] = started
    return workers


def _running(processes: dict[int, int]) -> set[int]:
    return {pid for pid, started in processes.items() if _started(pid) == started}


def _serve_with_workers(tmp_path: Path) -> tuple[NodeProcess, Settings]:
    """``xdsi serve`` with ``[node] workers = 2``, once its worker answers."""
    settings = node_settings(tmp_path / "node")
    settings = replace(settings, node=replace(settings.node, workers=2))
    served = NodeProcess.start(settings, tmp_path / "node.toml", tmp_path / "log")
    node = served.effective(settings)
    # Once a second process answers queries, the worker is up.
    assert _wait_for(lambda: len(_answering_pids_of(node)) >= 2)
    return served, node


def _end_node_process(tmp_path: Path, signum: signal.Signals) -> tuple[Settings, int]:
    """Send ``signum`` to a serving node's process; return its settings and
    exit status once it and every process it started have ended."""
    served, node = _serve_with_workers(tmp_path)
    workers = _workers_of(served)
    try:
        assert set(_answering_pids_of(node)) - {served.process.pid} <= set(workers)
        served.process.send_signal(signum)
        try:
            status = served.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            # What the node did last tells where its stop waits.
            pytest.fail(
                "the node has not ended 120 s after the signal; its log ends:\n"
                + "\n".join((tmp_path / "log").read_text().splitlines()[-30:])
            )
        # A bound on liveness, not on speed.
        assert _wait_for(lambda: not _running(workers), seconds=30), _running(workers)
    finally:
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)
        served.stop()
    return node, status


def _can_listen_again(node: Settings) -> None:
    """Every port of ``node`` can be bound again, as a new node binds it."""
    for port in (
        node.registry.port,
        node.repository.port,
        node.imaging_source.port,
        node.registry.feed_port,
    ):
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((node.node.host, port))
            listener.listen()


def test_no_worker_outlives_a_killed_node(tmp_path: Path) -> None:
    """A worker whose node was killed (SIGKILL, no stop() run) stops too:
    alone it would answer HTTP with no ITI-8 feed, C-STORE, publishing or
    audit delivery behind it, and hold the ports a restarted node needs."""
    node, _ = _end_node_process(tmp_path, signal.SIGKILL)

    _can_listen_again(node)


def test_a_hang_up_stops_the_node_as_sigterm_does(tmp_path: Path) -> None:
    """SIGHUP (its terminal closed) stops ``xdsi serve`` cleanly: logged,
    its Application Stop audited (DICOM PS3.15 A.5.3.1, EV (110121, DCM)),
    and its workers ended; it exits with status 0, as on SIGTERM."""
    node, status = _end_node_process(tmp_path, signal.SIGHUP)

    assert status == 0
    _can_listen_again(node)
    log = (tmp_path / "log").read_text()
    assert "hang-up (SIGHUP)" in log
    assert "node xdsi stopped" in log
    stops = [
        path
        for path in (node.storage / "audit").glob("*.xml")
        if b'csd-code="110121"' in path.read_bytes()
    ]
    assert len(stops) == 1


def _takes_sigint(pid: int) -> bool:
    """Whether process ``pid`` catches SIGINT or holds it back (proc(5):
    SigCgt, SigBlk), so that one sent now is not its end by default."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    masks = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool((int(masks["SigCgt"], 16) | int(masks["SigBlk"], 16)) & bit)


def test_a_worker_interrupted_while_it_starts_prints_no_traceback(
    tmp_path: Path,
) -> None:
    """Ctrl-C reaches every process of the terminal's group; a worker still
    importing its modules stops without a KeyboardInterrupt traceback. The
    SIGINT goes to the worker alone here: the node's own process would stop
    the worker with SIGTERM at once, and could end it before it printed."""
    settings = node_settings(tmp_path / "node")
    settings = replace(settings, node=replace(settings.node, workers=2))
    log = tmp_path / "log"
    served = NodeProcess.start(settings, tmp_path / "node.toml", log)
    workers = _workers_of(served)
    try:
        (worker,) = [
            pid
            for pid in workers
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        # The worker is spawned before the node prints its endpoints, and
        # takes seconds to import its modules.
        deadline = time.monotonic() + 30
        while not _takes_sigint(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(worker, signal.SIGINT)
        # The node starts another in its place.
        assert _wait_for(
            lambda: f"HTTP worker process {worker} ended" in log.read_text()
        )
    finally:
        served.stop()
        for pid in _running(workers):
            os.kill(pid, signal.SIGKILL)

    text = log.read_text()
    assert "KeyboardInterrupt" not in text
    assert "Traceback" not in text

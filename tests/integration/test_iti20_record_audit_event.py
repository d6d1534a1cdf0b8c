"""ITI-20 Record Audit Event against rsyslog, a real Audit Record Repository.

rsyslogd (tests/integration/peers/rsyslog-arr.conf) receives what our
forwarder sends from the spool over TLS (RFC 5425) and UDP (RFC 5426).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import require
from tests.pki import Pki, make_pki
from xdsi.app import Node
from xdsi.audit import (
    AuditEvent,
    Auditor,
    AuditSpool,
    DocumentRef,
    Endpoint,
    Outcome,
)
from xdsi.audit.forwarder import AuditForwarder, Backoff
from xdsi.audit.repository import AuditRecordStore, AuditRepository
from xdsi.audit.syslog import BOM
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import make_engine

CONFIG = Path(__file__).resolve().parent / "peers" / "rsyslog-arr.conf"
REPOSITORY = Endpoint("http://127.0.0.1:9082/xds/repository", "127.0.0.1")
CONSUMER = Endpoint("http://www.w3.org/2005/08/addressing/anonymous", "127.0.0.1")
PATIENT = "IDS-AD002-a^^^&1.3.6.1.4.1.21367.2005.13.20.1000&ISO"
DOCUMENT = "1.3.6.1.4.1.21367.2005.13.20.1000.1.1"
REPOSITORY_UNIQUE_ID = "1.3.6.1.4.1.21367.13.40.216"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Rsyslog:
    """One rsyslogd on loopback ports, started and stopped by the test."""

    program: str
    directory: Path
    tls_port: int
    udp_port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        environment = {
            **os.environ,
            "XDSI_ARR_DIR": str(self.directory),
            "XDSI_ARR_TLS_PORT": str(self.tls_port),
            "XDSI_ARR_UDP_PORT": str(self.udp_port),
        }
        log = (self.directory / "rsyslogd.out").open("ab")
        self.process = subprocess.Popen(
            [
                self.program,
                "-n",
                "-f",
                str(CONFIG),
                "-i",
                str(self.directory / "rsyslogd.pid"),
            ],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_for(lambda: _listening(self.tls_port), 20, "rsyslogd TLS input")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def received(self) -> list[dict[str, str]]:
        path = self.directory / "received.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def _rsyslogd() -> str:
    path = shutil.which("rsyslogd", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    require("program rsyslogd (apt rsyslog rsyslog-gnutls)", path is not None)
    assert path is not None
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "arr")


@pytest.fixture
def rsyslog(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    server = Rsyslog(
        _rsyslogd(),
        pki.directory,
        _free_port(socket.SOCK_STREAM),
        _free_port(socket.SOCK_DGRAM),
    )
    server.start()
    yield server
    server.stop()


def retrieve_event(number: int) -> AuditEvent:
    """The Repository's ITI-43 audit of one retrieve; ``number`` marks it."""
    return AuditEvent(
        transaction="ITI-43",
        actor="Document Repository",
        outcome=Outcome.SUCCESS,
        source=REPOSITORY,
        destination=CONSUMER,
        patient_id=PATIENT,
        documents=(DocumentRef(f"{DOCUMENT}.{number}", REPOSITORY_UNIQUE_ID),),
        event_time=datetime.now(UTC),
    )


def _numbers(received: list[dict[str, str]], input_name: str) -> Counter[int]:
    """Count, per marked event, the audit messages rsyslog stored."""
    counts: Counter[int] = Counter()
    for entry in received:
        if entry.get("inputname") != input_name:
            continue
        xml = entry["msg"].encode("utf-8").removeprefix(BOM)
        root = etree.fromstring(xml.lstrip())
        document = root.find(
            "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']"
        )
        counts[int(document.get("ParticipantObjectID").rsplit(".", 1)[1])] += 1
    return counts


def _forwarder(spool: AuditSpool, targets: list[str], pki: Pki) -> AuditForwarder:
    return AuditForwarder(
        spool,
        targets,
        app_name="xdsi",
        hostname="localhost",
        tls_context=pki.client_context(),
        backoff=Backoff(initial=0.1, maximum=0.5),
        poll_interval=0.05,
    )


def test_rsyslog_receives_our_audit_over_tls_and_udp(
    rsyslog: Rsyslog, pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.20.6: RFC 5425 and RFC 5426 messages, as rsyslog reads."""
    spool = AuditSpool(tmp_path / "spool")
    auditor = Auditor(spool, audit_source_id="xdsi")
    for number in range(3):
        auditor.record(retrieve_event(number))
    sending = _forwarder(
        spool,
        [f"tls://127.0.0.1:{rsyslog.tls_port}", f"udp://127.0.0.1:{rsyslog.udp_port}"],
        pki,
    )
    sending.start()
    try:
        _wait_for(lambda: len(rsyslog.received()) >= 6, 30, "six messages")
    finally:
        sending.stop()
    rsyslog.stop()

    received = rsyslog.received()
    assert _numbers(received, "tls") == Counter({0: 1, 1: 1, 2: 1})
    assert _numbers(received, "udp") == Counter({0: 1, 1: 1, 2: 1})
    for entry in received:
        assert (entry["app-name"], entry["msgid"]) == ("xdsi", "IHE+RFC-3881")
        assert entry["structured-data"] == "-"


def test_rsyslog_stopped_under_load_gets_every_event_exactly_once(
    rsyslog: Rsyslog, pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.20: an ARR down for a while loses and repeats nothing."""
    spool = AuditSpool(tmp_path / "spool")
    auditor = Auditor(spool, audit_source_id="xdsi")
    target = f"tls://127.0.0.1:{rsyslog.tls_port}"
    sending = _forwarder(spool, [target], pki)
    total = 300
    recorded: list[float] = []

    def load() -> None:
        # About 60 events a second, each timed: audit must never wait for
        # the ARR.
        for number in range(total):
            started = time.monotonic()
            auditor.record(retrieve_event(number))
            sending.notify()
            recorded.append(time.monotonic() - started)
            time.sleep(1 / 60)

    producer = threading.Thread(target=load, daemon=True)
    sending.start()
    try:
        producer.start()
        time.sleep(1.5)
        rsyslog.stop()
        time.sleep(2.0)
        assert sending.backlog()[target] > 0
        rsyslog.start()
        producer.join(timeout=60)
        _wait_for(lambda: sending.backlog()[target] == 0, 60, "an empty backlog")
        # Anything sent twice would arrive by now.
        time.sleep(1.0)
    finally:
        sending.stop()
    rsyslog.stop()

    counts = _numbers(rsyslog.received(), "tls")
    assert sorted(set(range(total)) - set(counts)) == []
    assert [n for n, count in counts.items() if count > 1] == []
    assert max(recorded) < 1.0


def test_rsyslog_refuses_a_sender_without_a_trusted_certificate(
    rsyslog: Rsyslog, pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.19: the ARR takes nothing from an unauthenticated node."""
    spool = AuditSpool(tmp_path / "spool")
    Auditor(spool, audit_source_id="xdsi").record(retrieve_event(0))
    untrusted = AuditForwarder(
        spool,
        [f"tls://127.0.0.1:{rsyslog.tls_port}"],
        app_name="xdsi",
        tls_context=pki.client_context("untrusted"),
        backoff=Backoff(initial=0.1, maximum=0.5),
        poll_interval=0.05,
    )
    untrusted.start()
    time.sleep(2.0)
    untrusted.stop()
    rsyslog.stop()

    assert rsyslog.received() == []
    # Refused, the message still waits for a session that is accepted.
    assert untrusted.backlog() == {f"tls://127.0.0.1:{rsyslog.tls_port}": 1}


def test_node_audits_its_start_feed_and_stop_to_our_arr_over_tls(
    pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.20: a node's audit trail reaches an ARR over mutual TLS."""
    engine = make_engine(f"sqlite:///{tmp_path / 'arr.sqlite'}")
    store = AuditRecordStore(engine)
    feed_patient = "XDSI-ATNA-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    with AuditRepository(store, tls_port=0, tls_context=pki.server_context()) as arr:
        settings = (
            Settings()
            .with_storage(tmp_path / "node")
            .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
        )
        settings = replace(
            settings,
            audit=replace(settings.audit, targets=(f"tls://127.0.0.1:{arr.tls_port}",)),
        )
        node = Node(settings, audit_tls_context=pki.client_context())
        effective = node.start()
        try:
            send_message(
                effective.node.host,
                effective.registry.feed_port,
                build_feed(feed_patient),
            )
            _wait_for(
                lambda: store.query(patient_id=feed_patient) != [], 30, "ITI-8 audit"
            )
        finally:
            node.stop()
        # The Stop record went out as the node stopped, not with its next
        # start (DICOM PS3.15 A.5.3.1).
        _wait_for(lambda: len(store.query()) >= 3, 30, "three audit messages")
    records = store.query()
    engine.dispose()

    assert all(r.valid and r.transport == "tls" for r in records)
    events = [(r.event_id, r.event_type) for r in records]
    assert events == [
        ("110100", "110120"),
        ("110110", "ITI-8"),
        ("110100", "110121"),
    ]
    assert records[1].patient_ids == (feed_patient,)

"""Delivery of the audit spool to syslog targets (ITI TF-2 3.20, RFC 5425)."""

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.pki import Pki, make_pki
from tests.unit.audit.conftest import RealIds
from tests.unit.audit.test_repository import wait_for
from tests.unit.audit.test_syslog import audit_xml
from xdsi.app import audit_forwarder
from xdsi.audit import AuditSpool
from xdsi.audit.forwarder import AuditForwarder, Backoff, Target
from xdsi.audit.repository import AuditRecordStore, AuditRepository
from xdsi.audit.syslog import parse_message
from xdsi.config import Settings
from xdsi.store.schema import make_engine

FAST = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditRecordStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'arr.sqlite'}")
    yield AuditRecordStore(engine)
    engine.dispose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def forwarder(spool: AuditSpool, targets: list[str], pki: Pki) -> AuditForwarder:
    return AuditForwarder(
        spool,
        targets,
        app_name="xdsi",
        hostname="localhost",
        tls_context=pki.client_context(),
        backoff=FAST,
        poll_interval=0.05,
    )


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("tls://127.0.0.1:6514", Target("tls", "127.0.0.1", 6514)),
        ("udp://arr.example:514", Target("udp", "arr.example", 514)),
        ("tls://[::1]:6514", Target("tls", "::1", 6514)),
    ],
)
def test_target_urls_name_transport_host_and_port(url: str, target: Target) -> None:
    """ITI TF-2 3.20.6: TLS (RFC 5425) and UDP (RFC 5426) targets."""
    assert Target.parse(url) == target
    assert target.url == url


@pytest.mark.parametrize(
    "url", ["tcp://127.0.0.1:514", "tls://127.0.0.1", "udp://:514", "tls://h:x"]
)
def test_target_without_scheme_host_or_port_is_refused(url: str) -> None:
    """ITI TF-2 3.20.6: only TLS and UDP syslog carry audit messages."""
    with pytest.raises(ValueError, match="audit target"):
        Target.parse(url)


def test_tls_target_without_a_context_is_refused(tmp_path: Path) -> None:
    """RFC 5425 4.2: a TLS target needs this node's certificate and trust."""
    with pytest.raises(ValueError, match="needs a TLS context"):
        AuditForwarder(AuditSpool(tmp_path), ["tls://127.0.0.1:6514"], app_name="x")


def test_every_spooled_message_reaches_each_target_once(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20.6: the spool goes, in order, to a TLS and a UDP target."""
    spool = AuditSpool(tmp_path / "spool")
    written = [spool.write(audit_xml(real_ids)) for _ in range(5)]
    with AuditRepository(
        store, tls_port=0, udp_port=0, tls_context=pki.server_context()
    ) as arr:
        sending = forwarder(
            spool,
            [f"tls://127.0.0.1:{arr.tls_port}", f"udp://127.0.0.1:{arr.udp_port}"],
            pki,
        )
        sending.start()
        try:
            written += [spool.write(audit_xml(real_ids)) for _ in range(5)]
            sending.notify()
            wait_for(lambda: len(store.query()) == 20)
            wait_for(lambda: set(sending.backlog().values()) == {0})
        finally:
            sending.stop()

    records = store.query()
    for transport in ("tls", "udp"):
        received = [r for r in records if r.transport == transport]
        assert [r.xml for r in received] == [p.read_bytes() for p in written]
        assert all(r.valid for r in received)
    message = parse_message(records[0].raw)
    assert (message.app_name, message.msgid) == ("xdsi", "IHE+RFC-3881")


def test_a_target_down_for_a_while_loses_and_repeats_nothing(
    tmp_path: Path,
    pki: Pki,
    store: AuditRecordStore,
    real_ids: RealIds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ITI TF-2 3.20: events audited while the ARR is down arrive later."""
    caplog.set_level(logging.INFO, logger="xdsi")
    spool = AuditSpool(tmp_path / "spool")
    port = free_port()
    sending = forwarder(spool, [f"tls://127.0.0.1:{port}"], pki)
    sending.start()
    try:
        # Audit goes on while nothing listens.
        started = time.monotonic()
        written = [spool.write(audit_xml(real_ids)) for _ in range(10)]
        assert time.monotonic() - started < 5
        time.sleep(0.5)
        assert sending.backlog() == {f"tls://127.0.0.1:{port}": 10}

        with AuditRepository(
            store, tls_port=port, tls_context=pki.server_context()
        ) as arr:
            wait_for(lambda: len(store.query()) == 10)
            written += [spool.write(audit_xml(real_ids)) for _ in range(5)]
            sending.notify()
            wait_for(lambda: len(store.query()) == 15)
            arr.stop()
            # Down again, then up: the cursor resumes where it stopped.
            written += [spool.write(audit_xml(real_ids)) for _ in range(5)]
            time.sleep(0.5)
        with AuditRepository(store, tls_port=port, tls_context=pki.server_context()):
            wait_for(lambda: len(store.query()) >= 20)
            time.sleep(0.5)
    finally:
        sending.stop()

    assert [r.xml for r in store.query()] == [p.read_bytes() for p in written]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("down" in line for line in warnings)
    assert any("is back" in line for line in warnings)
    assert not [line for line in warnings if real_ids.patient_id in line]


def test_cursor_survives_a_restart_of_the_forwarder(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: a restarted node sends only what it had not sent."""
    spool = AuditSpool(tmp_path / "spool")
    written = [spool.write(audit_xml(real_ids)) for _ in range(3)]
    with AuditRepository(store, udp_port=0) as arr:
        target = [f"udp://127.0.0.1:{arr.udp_port}"]
        first = forwarder(spool, target, pki)
        first.start()
        wait_for(lambda: len(store.query()) == 3)
        first.stop()
        written += [spool.write(audit_xml(real_ids)) for _ in range(2)]

        second = forwarder(spool, target, pki)
        assert second.backlog() == {target[0]: 2}
        second.start()
        wait_for(lambda: len(store.query()) >= 5)
        time.sleep(0.3)
        second.stop()

    assert [r.xml for r in store.query()] == [p.read_bytes() for p in written]


def test_oversize_message_is_skipped_for_udp_only(
    tmp_path: Path,
    pki: Pki,
    store: AuditRecordStore,
    real_ids: RealIds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 5426 3.2: a message above one datagram is not sent truncated."""
    spool = AuditSpool(tmp_path / "spool")
    small = spool.write(audit_xml(real_ids))
    spool.write(audit_xml(real_ids).replace(b"xdsi", b"x" * 3000))
    last = spool.write(audit_xml(real_ids))
    with AuditRepository(store, udp_port=0) as arr:
        sending = AuditForwarder(
            spool,
            [f"udp://127.0.0.1:{arr.udp_port}"],
            app_name="xdsi",
            backoff=FAST,
            poll_interval=0.05,
            udp_max_payload=2048,
        )
        sending.start()
        wait_for(lambda: len(store.query()) == 2)
        wait_for(lambda: set(sending.backlog().values()) == {0})
        sending.stop()

    assert [r.xml for r in store.query()] == [small.read_bytes(), last.read_bytes()]
    assert any("larger than one datagram" in r.getMessage() for r in caplog.records)


def test_a_refused_session_counts_nothing_as_delivered(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.19: a target refusing our certificate gets nothing yet."""
    spool = AuditSpool(tmp_path / "spool")
    spool.write(audit_xml(real_ids))
    with AuditRepository(store, tls_port=0, tls_context=pki.server_context()) as arr:
        url = f"tls://127.0.0.1:{arr.tls_port}"
        sending = AuditForwarder(
            spool,
            [url],
            app_name="xdsi",
            tls_context=pki.client_context("untrusted"),
            backoff=FAST,
            poll_interval=0.05,
        )
        sending.start()
        time.sleep(1.0)
        sending.stop()

    assert store.query() == []
    assert sending.backlog() == {url: 1}


def test_udp_target_nobody_listens_on_is_logged_down_once(
    tmp_path: Path, real_ids: RealIds, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 5426 has no acknowledgement: a send that the kernel takes proves
    nothing, so a port answering ICMP Port Unreachable to every other
    datagram is logged down once, not down and back in turn."""
    spool = AuditSpool(tmp_path / "spool")
    for _ in range(8):
        spool.write(audit_xml(real_ids))
    sending = AuditForwarder(
        spool,
        [f"udp://127.0.0.1:{free_port()}"],
        app_name="xdsi",
        backoff=Backoff(initial=0.02, maximum=0.05),
        poll_interval=0.02,
    )
    with caplog.at_level(logging.DEBUG, logger="xdsi.audit.forwarder"):
        sending.start()
        wait_for(lambda: sum("down" in r.getMessage() for r in caplog.records) >= 3)
        sending.stop()

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "down" in warnings[0], warnings


def test_one_process_at_a_time_delivers_a_spool(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """A command line client's delivery pass does not send what a node
    serving the same storage delivers (each message goes once); once the
    node stops, the pass sends what waits."""
    spool = AuditSpool(tmp_path / "spool")
    with AuditRepository(store, udp_port=0) as arr:
        target = [f"udp://127.0.0.1:{arr.udp_port}"]
        serving = forwarder(spool, target, pki)
        serving.start()
        try:
            wait_for(serving.claim)
            spool.write(audit_xml(real_ids))
            # Left to the node at once, not after waiting for its lock.
            started = time.monotonic()
            assert forwarder(spool, target, pki).deliver_pending(5) is None
            assert time.monotonic() - started < 1
            serving.notify()
            wait_for(lambda: len(store.query()) == 1)
        finally:
            serving.stop()
        spool.write(audit_xml(real_ids))
        left = forwarder(spool, target, pki).deliver_pending(5)
        wait_for(lambda: len(store.query()) == 2)

    assert left == {target[0]: 0}


def test_a_tls_target_without_tls_enabled_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.19: a node without [tls] presents no certificate, which an
    ARR demanding mutual TLS refuses; the node says so when it sets out to
    deliver, rather than retry quietly for ever."""
    settings = Settings().with_storage(tmp_path)
    settings = replace(
        settings, audit=replace(settings.audit, targets=("tls://127.0.0.1:6514",))
    )
    caplog.set_level(logging.WARNING, logger="xdsi.app")

    audit_forwarder(settings, AuditSpool(tmp_path / "audit"))

    (warning,) = [r.getMessage() for r in caplog.records]
    assert "[tls] is not enabled" in warning


def test_a_client_pass_waits_for_another_clients_pass(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """Two command line clients end at once: the second waits for the
    first's pass to end, then sends what it wrote, rather than leave it."""
    spool = AuditSpool(tmp_path / "spool")
    with AuditRepository(store, udp_port=0) as arr:
        target = [f"udp://127.0.0.1:{arr.udp_port}"]
        first = forwarder(spool, target, pki)
        assert first.claim()
        spool.write(audit_xml(real_ids))
        releasing = threading.Timer(0.5, first._release)
        releasing.start()
        left = forwarder(spool, target, pki).deliver_pending(5)
        releasing.join()
        wait_for(lambda: len(store.query()) == 1)

    assert left == {target[0]: 0}


def test_a_target_that_never_answers_holds_up_no_other(
    tmp_path: Path, pki: Pki, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """A client's pass sends to each target at once: one that takes the
    connection and never completes the TLS handshake does not keep the
    events from the others, and the pass ends within its allowance."""
    spool = AuditSpool(tmp_path / "spool")
    spool.write(audit_xml(real_ids))
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        with AuditRepository(store, udp_port=0) as arr:
            dead = f"tls://127.0.0.1:{silent.getsockname()[1]}"
            alive = f"udp://127.0.0.1:{arr.udp_port}"
            started = time.monotonic()
            left = forwarder(spool, [dead, alive], pki).deliver_pending(2)
            took = time.monotonic() - started
            wait_for(lambda: len(store.query()) == 1)
    finally:
        silent.close()

    assert left == {dead: 1, alive: 0}
    assert took < 5


def test_a_stop_gives_all_targets_that_never_answer_one_allowance(
    tmp_path: Path, pki: Pki, real_ids: RealIds
) -> None:
    """Two targets that take the connection and never complete the TLS
    handshake hold a stopping forwarder up for its timeout once, not once
    each; the message waits in the spool for them still."""
    spool = AuditSpool(tmp_path / "spool")
    spool.write(audit_xml(real_ids))
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    taken = []
    try:
        targets = [f"tls://127.0.0.1:{s.getsockname()[1]}" for s in silent]
        delivery = forwarder(spool, targets, pki)
        allowed: list[float | None] = []
        for worker in delivery._workers:
            # Each stays in its handshake for as long as the test runs.
            worker.sender.timeout = 600.0

            def noted(timeout: float | None = None, join=worker.join) -> None:
                allowed.append(timeout)
                join(timeout)

            worker.join = noted  # type: ignore[method-assign]
        delivery.start()
        # Both connections made: each worker waits in its handshake.
        taken = [s.accept()[0] for s in silent]

        delivery.stop(timeout=0.5, drain=0.5)

        assert len(allowed) == 2
        assert sum(allowed) <= 0.5
        assert delivery.backlog() == {target: 1 for target in targets}
    finally:
        for sock in [*taken, *silent]:
            sock.close()

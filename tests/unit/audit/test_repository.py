"""The Audit Record Repository: syslog in over TLS and UDP, queries out."""

import json
import logging
import re
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import event
from werkzeug.serving import make_server

from tests.pki import Pki, make_pki
from tests.unit.audit.conftest import RealIds
from tests.unit.audit.test_syslog import audit_xml
from xdsi.audit import Auditor, AuditSpool
from xdsi.audit import repository as audit_repository
from xdsi.audit.repository import (
    MAX_QUERY_LIMIT,
    AuditRecordStore,
    AuditRepository,
    JsonErrorHandler,
    OwnRecords,
    query_app,
    read_audit,
)
from xdsi.audit.syslog import BOM, TlsSender, UdpSender, format_message, frame
from xdsi.logs import Throttle
from xdsi.store.schema import make_engine


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditRecordStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'arr.sqlite'}")
    yield AuditRecordStore(engine)
    engine.dispose()


@pytest.fixture
def repository(
    store: AuditRecordStore, pki: Pki, tmp_path: Path
) -> Iterator[AuditRepository]:
    auditor = Auditor(AuditSpool(tmp_path / "arr-spool"), audit_source_id="arr")
    with AuditRepository(
        store,
        tls_port=0,
        udp_port=0,
        tls_context=pki.server_context(),
        auditor=auditor,
    ) as running:
        yield running


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_tls_messages_are_stored_parsed_and_queryable_by_patient(
    repository: AuditRepository, store: AuditRecordStore, pki: Pki, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20.6: our RFC 5425 sender to our ARR, each message stored."""
    sender = TlsSender("127.0.0.1", repository.tls_port, pki.client_context())
    xml = audit_xml(real_ids)
    other = audit_xml(real_ids, patient_id="OTHER^^^&1.2.3&ISO")
    try:
        for message in (xml, other, xml):
            sender.send(format_message(message, app_name="xdsi"))
    finally:
        sender.close()

    wait_for(lambda: len(store.query()) == 3)
    found = store.query(patient_id=real_ids.patient_id)
    assert [r.xml for r in found] == [xml, xml]
    record = found[0]
    assert record.valid and record.error is None
    assert (record.transport, record.event_id, record.event_type) == (
        "tls",
        "110106",
        "ITI-43",
    )
    assert record.event_time == datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC)
    assert record.patient_ids == (real_ids.patient_id,)
    # A bare ID finds its CX in any assigning authority, and only its own.
    bare = real_ids.patient_id.split("^", 1)[0]
    assert [r.xml for r in store.query(patient_id=bare)] == [xml, xml]
    assert [r.xml for r in store.query(patient_id="OTHER")] == [other]
    assert store.query(patient_id=bare[:-1] + "%") == []


def test_udp_messages_are_stored(
    repository: AuditRepository, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """RFC 5426 3.1: one datagram, one stored message."""
    sender = UdpSender("127.0.0.1", repository.udp_port)
    xml = audit_xml(real_ids)
    try:
        sender.send(format_message(xml, app_name="xdsi"))
    finally:
        sender.close()

    wait_for(lambda: len(store.query()) == 1)
    [record] = store.query()
    assert (record.transport, record.valid, record.xml) == ("udp", True, xml)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"no syslog header at all", "RFC 5424"),
        (b"<85>1 - h xdsi - IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage", "not XML"),
        (b"<85>1 - h xdsi - IHE+RFC-3881 - <AuditMessage/>", "PS3.15 A.5.1"),
    ],
    ids=["not-syslog", "truncated-xml", "not-an-audit-message"],
)
def test_malformed_messages_are_stored_raw_and_flagged(
    raw: bytes,
    error: str,
    repository: AuditRepository,
    store: AuditRecordStore,
) -> None:
    """ITI TF-2 3.20: a malformed message is kept and flagged, not dropped."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(raw, ("127.0.0.1", repository.udp_port))

    wait_for(lambda: len(store.query()) == 1)
    [record] = store.query()
    assert not record.valid
    assert error in record.error
    assert record.raw == raw
    assert record.event_id is None


def _utf16(xml: bytes, codec: str) -> bytes:
    """The AuditMessage ``xml`` in UTF-16, its declaration saying so."""
    text = xml.decode("utf-8").replace('encoding="UTF-8"', 'encoding="UTF-16"')
    return text.encode(codec)


# The syslog header our sender writes, before MSG.
_HEADER = b"<85>1 2024-05-02T09:30:15Z node.example xdsi 1 IHE+RFC-3881 - "


@pytest.mark.parametrize(
    ("codec", "prefix"),
    [("utf-16", b""), ("utf-16-le", b""), ("utf-16-be", BOM)],
    ids=["utf-16-bom", "utf-16-declared", "utf-8-bom-then-utf-16"],
)
def test_a_utf16_audit_message_is_stored_flagged_as_not_utf8(
    codec: str, prefix: bytes, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20.6.1, RFC 5424 6.4: MSG is UTF-8; UTF-16 is malformed."""
    raw = _HEADER + prefix + _utf16(audit_xml(real_ids), codec)

    received = store.store(raw, transport="udp", peer="127.0.0.1:514")

    assert not received.valid
    assert received.error.startswith("MSG is not UTF-8")
    [record] = store.query()
    assert (record.valid, record.raw, record.event_id) == (False, raw, None)


@pytest.mark.parametrize("bom", [BOM, b""], ids=["bom", "no-bom"])
def test_a_utf8_audit_message_is_valid_with_or_without_its_bom(
    bom: bytes, real_ids: RealIds
) -> None:
    """RFC 5424 6.4: the UTF-8 BOM before MSG may be left out."""
    received = read_audit(_HEADER + bom + audit_xml(real_ids))

    assert (received.valid, received.error) == (True, None)


def test_malformed_messages_of_a_host_are_warned_of_once_an_interval_all_stored(
    store: AuditRecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.20: a flood of malformed messages from one host is stored
    whole but warned of once an interval for each reason; the next warning
    counts those held back. Another host, or another reason, is news."""
    clock = _Clock()
    store._warnings = Throttle(60.0, clock)
    caplog.set_level(logging.WARNING, logger="xdsi.audit.repository")
    not_xml = b"<85>1 - h xdsi - IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage"

    for port in range(1000, 1005):
        store.store(not_xml, transport="udp", peer=f"192.0.2.7:{port}")
    store.store(b"no syslog header", transport="udp", peer="192.0.2.7:1005")
    store.store(not_xml, transport="tls", peer="192.0.2.8:1000")
    clock.now += 60.0
    store.store(not_xml, transport="udp", peer="192.0.2.7:1006")

    assert len(store.query()) == 8
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4
    assert "192.0.2.7:1000 over udp stored as malformed: MSG is not XML" in warned[0]
    assert "192.0.2.7:1005 over udp stored as malformed: not an RFC 5424" in warned[1]
    assert "192.0.2.8:1000 over tls stored as malformed: MSG is not XML" in warned[2]
    assert warned[3].endswith(
        "192.0.2.7:1006 over udp stored as malformed: MSG is not XML; 4 more "
        "from 192.0.2.7 since the last warning, not logged one by one"
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stream_that_breaks_framing_is_kept_raw(
    repository: AuditRepository, store: AuditRecordStore, pki: Pki, real_ids: RealIds
) -> None:
    """RFC 5425 4.3: after a good frame, unframed bytes are stored flagged."""
    good = format_message(audit_xml(real_ids), app_name="xdsi")
    context = pki.client_context()
    with socket.create_connection(("127.0.0.1", repository.tls_port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(frame(good) + b"<85>1 not counted")

    wait_for(lambda: len(store.query()) == 2)
    first, second = store.query()
    assert first.valid and first.raw == good
    assert not second.valid and second.raw == b"<85>1 not counted"


def _cut_frames(m: bytes) -> dict[str, tuple[bytes, bytes, str]]:
    """Frames of message ``m`` cut short by the end of the session: what the
    sender writes, what is stored of it, and what its error says."""
    return {
        "inside-the-message": (
            b"%d " % len(m) + m[:100],
            m[:100],
            f"MSG-LEN {len(m)}, 100 bytes before the stream ended",
        ),
        # A whole, valid message is still flagged when MSG-LEN promised more.
        "msg-len-longer-than-message": (
            b"%d " % (len(m) + 50) + m,
            m,
            f"MSG-LEN {len(m) + 50}, {len(m)} bytes before the stream ended",
        ),
        "inside-msg-len": (b"12", b"12", "the stream ended inside MSG-LEN"),
    }


@pytest.mark.parametrize(
    "case", ["inside-the-message", "msg-len-longer-than-message", "inside-msg-len"]
)
def test_a_frame_cut_short_by_the_end_of_the_session_is_kept_raw_and_flagged(
    case: str,
    repository: AuditRepository,
    store: AuditRecordStore,
    pki: Pki,
    real_ids: RealIds,
) -> None:
    """RFC 5425 4.3: the bytes received of a frame that MSG-LEN says is
    longer than what came before the session ended are stored, flagged."""
    good = format_message(audit_xml(real_ids), app_name="xdsi")
    sent, kept, error = _cut_frames(good)[case]
    context = pki.client_context()
    with socket.create_connection(("127.0.0.1", repository.tls_port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(frame(good) + sent)

    wait_for(lambda: len(store.query()) == 2)
    first, second = store.query()
    assert first.valid and first.raw == good
    assert not second.valid and second.event_id is None
    assert second.raw == kept
    assert second.error.startswith("truncated frame: ") and error in second.error


def _refused(context: ssl.SSLContext, port: int) -> bool:
    """Return True if the ARR ends the session without taking a message."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(frame(b"<85>1 - h xdsi - IHE+RFC-3881 - x"))
                # TLS 1.3 finishes the client's handshake before the server
                # has checked the certificate; the refusal comes on read.
                return tls.recv(1) == b""
    except (ssl.SSLError, OSError):
        return True


def _no_certificate(pki: Pki) -> ssl.SSLContext:
    return pki.client_context(name="")


def _untrusted(pki: Pki) -> ssl.SSLContext:
    return pki.client_context(name="untrusted")


def _tls_1_1(pki: Pki) -> ssl.SSLContext:
    context = pki.client_context()
    # Security level 0 lets this client offer TLS 1.1 at all, so that the
    # refusal is the server's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


@pytest.mark.parametrize(
    "client", [_no_certificate, _untrusted, _tls_1_1], ids=lambda f: f.__name__[1:]
)
def test_peer_failing_node_authentication_is_refused_and_audited(
    client: Callable[[Pki], ssl.SSLContext],
    repository: AuditRepository,
    store: AuditRecordStore,
    pki: Pki,
    audit_schema: etree.RelaxNG,
    tmp_path: Path,
) -> None:
    """ITI TF-2 3.19: no trusted certificate or TLS below 1.2 is refused."""
    try:
        context = client(pki)
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")

    assert _refused(context, repository.tls_port)

    time.sleep(0.2)
    assert store.query() == []
    spool = AuditSpool(tmp_path / "arr-spool")
    wait_for(lambda: len(list(spool.records())) == 1)
    [alert] = spool.records()
    root = etree.fromstring(alert.xml)
    assert audit_schema.validate(root), audit_schema.error_log
    assert alert.event_id.code == "110113"
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"


def test_the_repositorys_own_alerts_are_kept_in_its_own_store_once_a_minute(
    store: AuditRecordStore, pki: Pki, audit_schema: etree.RelaxNG
) -> None:
    """An ARR's Security Alerts go to its own tables, where its audit trail
    is read (no spool that nothing forwards); a peer refused again and again
    for one reason writes one of them in REPEAT_INTERVAL, not one each."""
    with AuditRepository(
        store,
        tls_port=0,
        tls_context=pki.server_context(),
        auditor=OwnRecords(store, audit_source_id="arr"),
        node_id="arr",
    ) as repository:
        for _ in range(10):
            assert _refused(_untrusted(pki), repository.tls_port)
        wait_for(lambda: len(store.query()) == 1)
        time.sleep(0.3)

    (alert,) = store.query()
    assert alert.valid and alert.transport == "local"
    assert alert.event_id == "110113"
    root = etree.fromstring(alert.xml)
    assert audit_schema.validate(root), audit_schema.error_log
    assert root.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "arr"


def test_query_bounds_event_time(
    repository: AuditRepository, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: a query by time finds the events of that period."""
    sender = UdpSender("127.0.0.1", repository.udp_port)
    try:
        sender.send(format_message(audit_xml(real_ids), app_name="xdsi"))
    finally:
        sender.close()
    wait_for(lambda: len(store.query()) == 1)
    when = datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC)

    assert len(store.query(since=when)) == 1
    assert store.query(since=when + timedelta(seconds=1)) == []
    assert store.query(until=when) == []
    assert len(store.query(until=when + timedelta(seconds=1))) == 1


def _at(xml: bytes, event_date_time: str) -> bytes:
    """The audit message ``xml`` with its EventDateTime replaced."""
    return re.sub(
        rb'EventDateTime="[^"]*"', f'EventDateTime="{event_date_time}"'.encode(), xml
    )


# EventDateTime as sent, and the UTC instant stored (None: left unset).
EVENT_TIMES = {
    "offset": (
        "2024-05-02T11:30:15.250+02:00",
        datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC),
    ),
    "year-1-west": ("0001-01-01T00:00:00-14:00", datetime(1, 1, 1, 14, tzinfo=UTC)),
    "year-9999-east": (
        "9999-12-31T23:59:59+14:00",
        datetime(9999, 12, 31, 9, 59, 59, tzinfo=UTC),
    ),
    "before-year-1-in-utc": ("0001-01-01T00:00:00+14:00", None),
    "after-year-9999-in-utc": ("9999-12-31T23:59:59-14:00", None),
}


@pytest.mark.parametrize("case", list(EVENT_TIMES))
def test_event_date_time_is_stored_as_its_utc_instant_or_left_unset_with_why(
    case: str,
    repository: AuditRepository,
    store: AuditRecordStore,
    real_ids: RealIds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DICOM PS3.15 A.5.1: EventDateTime is an xs:dateTime whose offset is
    kept as the UTC instant; one with no UTC instant in the years 1 to 9999
    is stored valid, found by patient, its time unset and the reason given."""
    caplog.set_level(logging.WARNING, logger="xdsi.audit.repository")
    sent, instant = EVENT_TIMES[case]
    sender = UdpSender("127.0.0.1", repository.udp_port)
    try:
        sender.send(format_message(_at(audit_xml(real_ids), sent), app_name="xdsi"))
    finally:
        sender.close()

    wait_for(lambda: len(store.query()) == 1)
    [record] = store.query(patient_id=real_ids.patient_id)
    assert record.valid and record.event_id == "110106"
    assert record.event_time == instant
    if instant is None:
        assert record.error == (
            f"EventDateTime {sent} falls outside the years 1 to 9999 in UTC; "
            "event time left unset"
        )
        assert any("without its event time" in r.getMessage() for r in caplog.records)
    else:
        assert record.error is None


def test_a_listing_reads_the_records_a_page_at_a_time(
    store: AuditRecordStore, real_ids: RealIds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many records match, a listing holds one page of them: each
    page is read from the database when the one before has been taken."""
    monkeypatch.setattr(audit_repository, "PAGE_SIZE", 2)
    raw = format_message(audit_xml(real_ids), app_name="xdsi")
    for port in range(1000, 1005):
        store.store(raw, transport="udp", peer=f"127.0.0.1:{port}")
    pages: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def read(*args: object) -> None:
        statement = str(args[2])
        if "FROM audit_record" in statement and "LIMIT" in statement:
            pages.append(statement)

    listing = store.records()
    first = next(listing)
    assert len(pages) == 1
    rest = list(listing)
    assert len(pages) == 3
    assert [r.id for r in (first, *rest)] == [1, 2, 3, 4, 5]
    assert all(r.patient_ids == (real_ids.patient_id,) for r in (first, *rest))
    assert [r.id for r in store.query(limit=3)] == [1, 2, 3]


def test_http_query_bounds_are_utc_instants(
    repository: AuditRepository, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: since and until with an offset bound the instant they
    name; one with no UTC instant in the years 1 to 9999 is answered 400."""
    sender = UdpSender("127.0.0.1", repository.udp_port)
    try:
        # 2024-05-02T09:30:15.250Z.
        sender.send(format_message(audit_xml(real_ids), app_name="xdsi"))
    finally:
        sender.close()
    wait_for(lambda: len(store.query()) == 1)
    client = query_app(store).test_client()

    def found(**bounds: str) -> int:
        answer = client.get("/audit", query_string=bounds)
        assert answer.status_code == 200, answer.get_json()
        return len(answer.get_json())

    assert found(since="2024-05-02T11:30:00+02:00") == 1
    assert found(since="2024-05-02T11:31:00+02:00") == 0
    assert found(until="2024-05-02T11:31:00+02:00") == 1
    assert found(until="2024-05-02T05:31:00-04:00") == 1
    assert found(until="2024-05-02T05:30:00-04:00") == 0
    refused = client.get("/audit", query_string={"since": "0001-01-01T00:00+14:00"})
    assert refused.status_code == 400
    assert "within the years 1 to 9999 in UTC" in refused.get_json()["error"]


def test_http_query_answers_json_filtered_by_patient(
    repository: AuditRepository, store: AuditRecordStore, real_ids: RealIds
) -> None:
    """ITI TF-2 3.20: the ARR answers queries over HTTP, as JSON."""
    sender = UdpSender("127.0.0.1", repository.udp_port)
    try:
        sender.send(format_message(audit_xml(real_ids), app_name="xdsi"))
        other = audit_xml(real_ids, "OTHER^^^&1.2&ISO")
        sender.send(format_message(other, app_name="xdsi"))
    finally:
        sender.close()
    wait_for(lambda: len(store.query()) == 2)
    client = query_app(store).test_client()

    answer = client.get(
        "/audit", query_string={"patient": real_ids.patient_id, "since": "2024-05-02"}
    )

    assert answer.status_code == 200
    [record] = answer.get_json()
    assert record["patient_ids"] == [real_ids.patient_id]
    assert record["xml"].startswith("<?xml")
    refused = client.get("/audit", query_string={"since": "yesterday"})
    assert refused.status_code == 400
    assert "since must be an ISO 8601" in refused.get_json()["error"]
    for limit in ("0", "-3", "ten", "١"):
        refused = client.get("/audit", query_string={"limit": limit})
        assert refused.status_code == 400
        assert "limit must be a whole number" in refused.get_json()["error"]


@pytest.mark.parametrize(
    "limit",
    ["99999999999999999999999", "9" * 5000, str(MAX_QUERY_LIMIT + 1), "1.5", ""],
    ids=["overflows-sqlite", "5000-digits", "above-maximum", "fraction", "empty"],
)
def test_http_query_limit_out_of_range_is_answered_400_naming_the_range(
    store: AuditRecordStore, limit: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.20: a limit that is not a whole number from 1 to the
    maximum is the client's error, answered 400 with the allowed range."""
    caplog.set_level(logging.WARNING)
    client = query_app(store).test_client()

    refused = client.get("/audit", query_string={"limit": limit})

    assert refused.status_code == 400
    assert refused.get_json() == {
        "error": f"limit must be a whole number from 1 to {MAX_QUERY_LIMIT}"
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_http_query_takes_a_limit_up_to_the_maximum(
    store: AuditRecordStore,
) -> None:
    """ITI TF-2 3.20: the largest limit served is MAX_QUERY_LIMIT."""
    client = query_app(store).test_client()

    answer = client.get("/audit", query_string={"limit": str(MAX_QUERY_LIMIT)})

    assert answer.status_code == 200 and answer.get_json() == []


def test_no_patient_id_is_logged_at_info_or_above(
    repository: AuditRepository,
    store: AuditRecordStore,
    real_ids: RealIds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ITI TF-2 3.20: who saw which patient is in the audit, not the log."""
    caplog.set_level(logging.DEBUG, logger="xdsi")
    bad = audit_xml(real_ids).replace(b"EventIdentification", b"EventIdentificatio")
    sender = UdpSender("127.0.0.1", repository.udp_port)
    try:
        sender.send(format_message(audit_xml(real_ids), app_name="xdsi"))
        sender.send(format_message(bad, app_name="xdsi"))
    finally:
        sender.close()
    wait_for(lambda: len(store.query()) == 2)

    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("malformed" in line for line in loud)
    assert not [line for line in loud if real_ids.patient_id in line]


SECRET = b"DOE^JANE-19700101"
# Request lines HTTP cannot parse, and what the log line quotes of them.
REFUSED_LINES = {
    "overlong": (
        b"GET /" + b"a" * 200 + b"?patient=" + SECRET + b" x HTTP/1.1\r\n\r\n",
        "Bad request syntax ('GET /aaaa",
    ),
    # An unencoded space in the query string makes four words of the line.
    "query-with-a-space": (
        b"GET /audit?patient=DOE JANE&birth=19700101 HTTP/1.1\r\n\r\n",
        "Bad request syntax ('GET /audit?... (query left out)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_LINES))
def test_a_request_line_http_cannot_parse_is_answered_in_json_and_logged_at_info(
    store: AuditRecordStore, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """What the query service's HTTP layer refuses is the peer's doing: a
    JSON error, one INFO line quoting a short escaped prefix of the request
    line without its query string, nothing of the rest above DEBUG, in the
    log or the answer."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="werkzeug")
    web = make_server(
        "127.0.0.1",
        0,
        query_app(store),
        threaded=True,
        request_handler=JsonErrorHandler,
    )
    serving = threading.Thread(target=web.serve_forever, daemon=True)
    serving.start()
    line, quoted = REFUSED_LINES[case]
    try:
        with socket.create_connection(web.server_address[:2], timeout=30) as sock:
            sock.sendall(line)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        web.shutdown()
        serving.join(timeout=10)
        web.server_close()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body) == {"error": "HTTP 400: request refused"}
    assert SECRET not in answer and b"JANE" not in answer
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in shown if r.levelno > logging.INFO] == []
    (refused,) = [r.getMessage() for r in shown if "HTTP peer" in r.getMessage()]
    assert quoted in refused
    assert refused.isascii() and refused.isprintable()
    for record in shown:
        assert "JANE" not in record.getMessage()


@pytest.fixture
def small_repository(
    store: AuditRecordStore, pki: Pki, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[AuditRepository]:
    """A TLS-only repository built with the keyword arguments the test
    gives as this fixture's parameter."""
    options = request.param
    auditor = Auditor(AuditSpool(tmp_path / "arr-spool"), audit_source_id="arr")
    with AuditRepository(
        store, tls_port=0, tls_context=pki.server_context(), auditor=auditor, **options
    ) as running:
        yield running


def _silent(port: int) -> socket.socket:
    """A TCP connection to the TLS port that never starts its handshake."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_repository(sock: socket.socket, timeout: float = 20.0) -> bool:
    """Return True if the repository closes ``sock`` within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _send_once_accepted(port: int, context: ssl.SSLContext, message: bytes) -> None:
    """Send one framed message, connecting again while the ARR refuses."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(frame(message))
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize(
    "small_repository",
    [{"handshake_timeout": 0.5, "idle_timeout": 300.0}],
    ids=["handshake-0.5s"],
    indirect=True,
)
def test_a_peer_that_never_starts_its_handshake_is_dropped_after_handshake_timeout(
    small_repository: AuditRepository,
    store: AuditRecordStore,
    pki: Pki,
    real_ids: RealIds,
) -> None:
    """RFC 5425 4.2: a peer that has not finished the TLS handshake within
    the handshake timeout is dropped; after it, the idle timeout applies."""
    with _silent(small_repository.tls_port) as silent:
        assert _closed_by_repository(silent)

    message = format_message(audit_xml(real_ids), app_name="xdsi")
    port = small_repository.tls_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            # An authenticated session pausing longer than the handshake
            # timeout is kept.
            time.sleep(1.5)
            tls.sendall(frame(message))
    wait_for(lambda: len(store.query()) == 1)


@pytest.mark.parametrize(
    "small_repository",
    [{"max_connections": 2, "handshake_timeout": 60.0}],
    ids=["2-connections"],
    indirect=True,
)
def test_connections_beyond_max_connections_are_closed_at_once_warning_once(
    small_repository: AuditRepository,
    store: AuditRecordStore,
    pki: Pki,
    real_ids: RealIds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 5425 4.2: a connection beyond the repository's cap is closed
    before its handshake; one WARNING for the burst, one when it ends."""
    caplog.set_level(logging.WARNING, logger="xdsi.audit.repository")
    port = small_repository.tls_port
    held = [_silent(port), _silent(port)]
    try:
        for _ in range(3):
            with _silent(port) as extra:
                assert _closed_by_repository(extra)
    finally:
        for sock in held:
            sock.close()

    message = format_message(audit_xml(real_ids), app_name="xdsi")
    _send_once_accepted(port, pki.client_context(), message)
    wait_for(lambda: len(store.query()) == 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "refusing more" in line]) == 1
    [ended] = [line for line in lines if "accepts again" in line]
    assert int(ended.split("; ")[1].split()[0]) >= 3

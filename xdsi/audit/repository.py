"""Audit Record Repository: receives syslog audit messages, stores, answers.

Implements the receiving side of ITI TF-2 3.20 (Record Audit Event): syslog
over TLS with octet counting (RFC 5425) and over UDP (RFC 5426), RFC 5424
messages carrying DICOM PS3.15 A.5.1 AuditMessages. Every message received
is stored whole; one that is not a valid AuditMessage is stored raw and
flagged, never dropped. A peer that fails TLS node authentication
(ITI TF-2 3.19) is refused and the refusal audited as a Security Alert.
"""

import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, jsonify, request
from lxml import etree
from sqlalchemy import Connection, Engine, Row, Select, func, insert, select
from werkzeug.exceptions import HTTPException
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from xdsi.audit.messages import AuditEvent, Endpoint, Outcome, build_audit_message
from xdsi.audit.spool import IHE_TRANSACTIONS, Auditor, audit_message_schema
from xdsi.audit.syslog import (
    MAX_UDP_PAYLOAD,
    FrameReader,
    FramingError,
    SyslogFormatError,
    format_message,
    parse_message,
)
from xdsi.connections import BoundedConnections
from xdsi.logs import PeerRefusalLog, Throttle
from xdsi.store.schema import audit_patient, audit_record
from xdsi.tls import (
    REFUSAL_ACTOR,
    REFUSAL_TRANSACTION,
    RefusedPeer,
    refresh_revocation,
)

logger = logging.getLogger(__name__)

# The largest message either listener takes (rsyslog's default is 8 kB;
# AuditMessages with queries are often larger).
MAX_MESSAGE = 256 * 1024
# TLS sessions the syslog listener serves at once (a thread each); a sender
# keeps one open, so this is also how many nodes may send at the same time.
MAX_CONNECTIONS = 256
# Connections the query endpoint serves at once (a thread each); one more is
# answered 503. Few people query an audit trail at the same time.
MAX_QUERY_CONNECTIONS = 32

# Records one answer of the query endpoint holds, by default and at most; the
# answer is built whole in memory, and an AuditMessage is a few kilobytes.
QUERY_LIMIT = 1000
MAX_QUERY_LIMIT = 10_000
# Records a listing reads from the database at once; the command line
# prints each page before it reads the next.
PAGE_SIZE = 500

# DICOM PS3.15 A.5.1: ParticipantObjectTypeCodeRole 1 is Patient.
_PATIENT_ROLE = "1"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)

_ERROR_LENGTH = 512

_UTF8 = "UTF-8"


@dataclass(frozen=True)
class ReceivedAudit:
    """What one received syslog message says, or why it says nothing.

    ``valid`` is True for an RFC 5424 message whose MSG is an AuditMessage
    valid against DICOM PS3.15 A.5.1; otherwise ``error`` says what is wrong
    and the fields that could not be read are None. A valid message whose
    EventDateTime names no instant this repository can hold in UTC has
    ``event_time`` None and ``error`` saying why; its other fields are read.
    """

    valid: bool
    error: str | None
    app_name: str | None = None
    msgid: str | None = None
    xml: bytes | None = None
    event_time: datetime | None = None
    event_id: str | None = None
    event_type: str | None = None
    event_action: str | None = None
    outcome: int | None = None
    audit_source_id: str | None = None
    patient_ids: tuple[str, ...] = ()


def _event_time(text: str) -> datetime:
    """Return EventDateTime (xs:dateTime) as its UTC instant; UTC if no zone.

    Raises
    ------
    ValueError
        ``text`` is not a date-time.
    OverflowError
        Its UTC instant falls before year 1 or after year 9999 (an offset
        at either end of the calendar).
    """
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when.astimezone(UTC) if when.tzinfo is not None else when.replace(tzinfo=UTC)


def read_audit(raw: bytes) -> ReceivedAudit:
    """Return the fields of a received syslog audit message; never raises."""
    try:
        message = parse_message(raw)
    except SyslogFormatError as exc:
        return ReceivedAudit(valid=False, error=str(exc))
    header = {"app_name": message.app_name, "msgid": message.msgid}
    # ITI TF-2 3.20.6.1, RFC 5424 6.4: MSG is UTF-8, after its UTF-8 BOM; a
    # UTF-16 AuditMessage (a BOM of its own, or a declaration naming it)
    # would parse, and be read in an encoding the sender was not to use.
    try:
        message.msg.decode("utf-8")
    except UnicodeDecodeError as exc:
        error = f"MSG is not UTF-8: {exc.reason} at byte {exc.start}"
        return ReceivedAudit(False, error, xml=message.msg, **header)
    try:
        root = etree.fromstring(message.msg, _PARSER)
    except etree.XMLSyntaxError as exc:
        return ReceivedAudit(False, f"MSG is not XML: {exc}", xml=message.msg, **header)
    encoding = root.getroottree().docinfo.encoding or _UTF8
    if encoding.upper().replace("-", "") != "UTF8":
        error = f"MSG is not UTF-8: its XML declaration names {encoding[:32]}"
        return ReceivedAudit(False, error, xml=message.msg, **header)
    schema = audit_message_schema()
    if not schema.validate(root):
        error = f"not a DICOM PS3.15 A.5.1 AuditMessage: {schema.error_log.last_error}"
        return ReceivedAudit(False, error[:_ERROR_LENGTH], xml=message.msg, **header)

    identification = root.find("EventIdentification")
    types = identification.findall("EventTypeCode")
    transactions = [
        t.get("csd-code") for t in types if t.get("codeSystemName") == IHE_TRANSACTIONS
    ]
    event_type = transactions[0] if transactions else None
    if event_type is None and types:
        event_type = types[0].get("csd-code")
    text = identification.get("EventDateTime")
    event_time, time_error = None, None
    try:
        event_time = _event_time(text)
    except ValueError as exc:
        return ReceivedAudit(False, f"EventDateTime: {exc}", xml=message.msg, **header)
    except OverflowError:
        # Stored as it came, the time would be read back as UTC, up to 14
        # hours off; the message, valid, is kept with the time unset.
        time_error = (
            f"EventDateTime {text[:64]} falls outside the years 1 to 9999 in "
            "UTC; event time left unset"
        )
    return ReceivedAudit(
        valid=True,
        error=time_error,
        xml=message.msg,
        event_time=event_time,
        event_id=identification.find("EventID").get("csd-code"),
        event_type=event_type,
        event_action=identification.get("EventActionCode"),
        outcome=int(identification.get("EventOutcomeIndicator")),
        audit_source_id=root.find("AuditSourceIdentification").get("AuditSourceID"),
        patient_ids=tuple(
            o.get("ParticipantObjectID")
            for o in root.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == _PATIENT_ROLE
        ),
        **header,
    )


@dataclass(frozen=True)
class StoredAudit:
    """One row of the repository, as a query returns it."""

    id: int
    received_at: datetime
    transport: str
    peer: str
    valid: bool
    error: str | None
    event_time: datetime | None
    event_id: str | None
    event_type: str | None
    event_action: str | None
    outcome: int | None
    audit_source_id: str | None
    patient_ids: tuple[str, ...]
    raw: bytes
    xml: bytes | None

    def as_json(self) -> dict[str, object]:
        """Return the row as JSON-ready values; the XML as received, text."""
        return {
            "id": self.id,
            "received_at": self.received_at.isoformat(),
            "transport": self.transport,
            "peer": self.peer,
            "valid": self.valid,
            "error": self.error,
            "event_time": self.event_time.isoformat() if self.event_time else None,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_action": self.event_action,
            "outcome": self.outcome,
            "audit_source_id": self.audit_source_id,
            "patient_ids": list(self.patient_ids),
            "xml": self.xml.decode("utf-8", "replace") if self.xml else None,
        }


def _aware(when: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every value stored is UTC.
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC)


class AuditRecordStore:
    """The repository's tables: store what arrives, query it back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # A peer sending malformed messages in a loop would otherwise write
        # a WARNING per message; each is still stored (ITI TF-2 3.20).
        self._warnings = Throttle()

    def store(
        self, raw: bytes, *, transport: str, peer: str, malformed: str | None = None
    ) -> ReceivedAudit:
        """Store one received message, valid or not; return what it says.

        ``malformed`` is why the transport found the message broken (a frame
        cut short); such a message is stored raw and flagged, unread.
        """
        if malformed is None:
            received = read_audit(raw)
        else:
            received = ReceivedAudit(valid=False, error=malformed)
        with self.engine.begin() as connection:
            record_id = connection.execute(
                insert(audit_record).values(
                    received_at=datetime.now(UTC),
                    transport=transport,
                    peer=peer[:256],
                    valid=received.valid,
                    error=received.error[:_ERROR_LENGTH] if received.error else None,
                    app_name=received.app_name and received.app_name[:48],
                    msgid=received.msgid and received.msgid[:32],
                    event_time=received.event_time,
                    event_id=received.event_id and received.event_id[:64],
                    event_type=received.event_type and received.event_type[:64],
                    event_action=received.event_action,
                    outcome=received.outcome,
                    audit_source_id=(
                        received.audit_source_id and received.audit_source_id[:256]
                    ),
                    raw=raw,
                    xml=received.xml,
                )
            ).inserted_primary_key[0]
            if received.patient_ids:
                connection.execute(
                    insert(audit_patient),
                    [
                        {"record_id": record_id, "patient_id": p[:256]}
                        for p in received.patient_ids
                    ],
                )
        if not received.valid:
            # The reason names the schema rule broken, never the value.
            self._warn(
                "stored as malformed",
                received.error.split(":", 1)[0] if received.error else "",
                record_id,
                peer,
                transport,
            )
        elif received.error:
            self._warn(
                "stored without its event time",
                "EventDateTime outside the years 1 to 9999 in UTC",
                record_id,
                peer,
                transport,
            )
        return received

    def _warn(
        self, what: str, reason: str, record_id: int, peer: str, transport: str
    ) -> None:
        """Log a message stored flawed at WARNING, at most once a
        :data:`~xdsi.logs.REPEAT_INTERVAL` per peer host and reason; those
        held back are logged at DEBUG and counted into the next WARNING."""
        host = peer.rsplit(":", 1)[0]
        held = self._warnings.admit(host, f"{what}: {reason}")
        if held is None:
            logger.debug(
                "audit message %d from %s over %s %s: %s",
                record_id,
                peer,
                transport,
                what,
                reason,
            )
            return
        logger.warning(
            "audit message %d from %s over %s %s: %s%s",
            record_id,
            peer,
            transport,
            what,
            reason,
            f"; {held} more from {host} since the last warning, not logged one by one"
            if held
            else "",
        )

    def query(
        self,
        *,
        patient_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = QUERY_LIMIT,
    ) -> list[StoredAudit]:
        """Return stored messages, oldest first, filtered as asked.

        ``patient_id`` is a CX (ID^^^&OID&ISO) or a bare ID, which matches
        that ID in any assigning authority.

        ``since`` and ``until`` bound the event time, or for a message
        without one (a malformed message, or one whose EventDateTime has no
        UTC instant within the years 1 to 9999), the time it was received.
        """
        return list(
            self.records(patient_id=patient_id, since=since, until=until, limit=limit)
        )

    def records(
        self,
        *,
        patient_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        through: int | None = None,
    ) -> Iterator[StoredAudit]:
        """Yield stored messages, oldest first, filtered as :meth:`query`
        filters them, reading PAGE_SIZE at a time: a listing of any length
        holds one page.

        ``through`` is the id of the last record a listing may reach; by
        default, the last one stored when the listing begins, so that it
        ends however fast messages arrive.
        """
        statement = select(audit_record).order_by(audit_record.c.id)
        statement = _matching(statement, patient_id, since, until)
        after, left = 0, limit
        if through is None:
            with self.engine.connect() as connection:
                through = connection.scalar(select(func.max(audit_record.c.id)))
        while through is not None and (left is None or left > 0):
            size = PAGE_SIZE if left is None else min(PAGE_SIZE, left)
            page = statement.where(
                audit_record.c.id > after, audit_record.c.id <= through
            )
            with self.engine.connect() as connection:
                rows = connection.execute(page.limit(size)).all()
                patients = _patients(connection, [row.id for row in rows])
            yield from (_stored(row, patients.get(row.id, ())) for row in rows)
            if len(rows) < size:
                return
            after = rows[-1].id
            left = None if left is None else left - len(rows)


def _matching(
    statement: Select[Any],
    patient_id: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Select[Any]:
    """``statement`` narrowed to the records :meth:`AuditRecordStore.query`
    is asked for."""
    time = audit_record.c.event_time
    received = audit_record.c.received_at
    if patient_id is not None:
        stored = audit_patient.c.patient_id
        matches = stored == patient_id
        if "^" not in patient_id:
            # A bare ID matches its CX in every assigning authority
            # (ID^^^&OID&ISO, ITI TF-2x Appendix E).
            matches = matches | stored.startswith(f"{patient_id}^", autoescape=True)
        named = select(audit_patient.c.record_id).where(matches)
        statement = statement.where(audit_record.c.id.in_(named))
    if since is not None:
        statement = statement.where(
            (time >= since) | (time.is_(None) & (received >= since))
        )
    if until is not None:
        statement = statement.where(
            (time < until) | (time.is_(None) & (received < until))
        )
    return statement


def _patients(connection: Connection, record_ids: list[int]) -> dict[int, list[str]]:
    """The patient ids each of the records ``record_ids`` names, in order."""
    patients: dict[int, list[str]] = {}
    if record_ids:
        found = select(audit_patient.c.record_id, audit_patient.c.patient_id)
        found = found.where(audit_patient.c.record_id.in_(record_ids))
        for record_id, patient in connection.execute(
            found.order_by(audit_patient.c.id)
        ):
            patients.setdefault(record_id, []).append(patient)
    return patients


def _stored(row: Row[Any], patient_ids: Iterable[str]) -> StoredAudit:
    return StoredAudit(
        id=row.id,
        received_at=_aware(row.received_at),
        transport=row.transport,
        peer=row.peer,
        valid=row.valid,
        error=row.error,
        event_time=_aware(row.event_time),
        event_id=row.event_id,
        event_type=row.event_type,
        event_action=row.event_action,
        outcome=row.outcome,
        audit_source_id=row.audit_source_id,
        patient_ids=tuple(patient_ids),
        raw=row.raw,
        xml=row.xml,
    )


def query_app(store: AuditRecordStore) -> Flask:
    """Return the HTTP query endpoint: ``GET /audit`` answers JSON.

    Parameters ``patient`` (a patient id as the AuditMessage writes it),
    ``since`` and ``until`` (ISO 8601 date-times, UTC if no zone) and
    ``limit``, from 1 to MAX_QUERY_LIMIT (QUERY_LIMIT if not given); any
    other ``limit`` is answered 400.
    """
    app = Flask("xdsi.audit_repository")

    def _time(name: str) -> datetime | None:
        value = request.args.get(name)
        if not value:
            return None
        try:
            return parse_time(value)
        except ValueError:
            raise ValueError(
                f"{name} must be an ISO 8601 date or date-time within the years "
                "1 to 9999 in UTC, such as 2026-01-31 or 2026-01-31T08:00:00Z"
            ) from None

    def _limit() -> int:
        value = request.args.get("limit", str(QUERY_LIMIT))
        # A digit string this long is far out of range; int() is not asked
        # to convert thousands of digits.
        digits = value.isascii() and value.isdigit() and len(value) <= 20
        if not digits or not 1 <= int(value) <= MAX_QUERY_LIMIT:
            raise ValueError(
                f"limit must be a whole number from 1 to {MAX_QUERY_LIMIT}"
            )
        return int(value)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": f"{exc.code} {exc.name}: GET /audit"}), exc.code or 400

    @app.get("/audit")
    def audit() -> Response | tuple[Response, int]:
        try:
            since, until = _time("since"), _time("until")
            limit = _limit()
        except ValueError as exc:
            return jsonify({"error": str(exc)}), 400
        # Limitation: answers are not paged; a query matching more than limit
        # records answers the oldest received, and the rest are reached by
        # narrowing since and until.
        records = store.query(
            patient_id=request.args.get("patient"),
            since=since,
            until=until,
            limit=limit,
        )
        return jsonify([r.as_json() for r in records])

    return app


class JsonErrorHandler(PeerRefusalLog, WSGIRequestHandler):
    """Answer what the HTTP layer refuses (a garbled request line, oversized
    headers) with JSON like the query endpoint's, never an HTML page, and
    log it at INFO as the peer's doing."""

    timeout = 60
    # A request line too garbled to name its HTTP version is answered with
    # an HTTP/1.1 status line and headers, not as HTTP/0.9 (body alone).
    default_request_version = "HTTP/1.1"
    error_content_type = "application/json"
    # The message quotes what the peer sent, which could break the JSON.
    error_message_format = '{"error": "HTTP %(code)d: request refused"}'


class CannotBind(Exception):
    """The query port cannot be bound; the OS's reason is the message."""


class QueryServer(BoundedConnections, ThreadedWSGIServer):
    """The query endpoint's HTTP server: a thread per connection, at most
    ``max_connections`` at once.

    One more is answered at once with 503 and closed, so that peers holding
    idle connections cannot take the file descriptors and threads the
    syslog listeners need to accept audit messages (ITI TF-2 3.20).
    """

    max_connections = MAX_QUERY_CONNECTIONS
    listener_name = "audit query"

    def __init__(self, host: str, port: int, store: AuditRecordStore) -> None:
        super().__init__(host, port, query_app(store), handler=JsonErrorHandler)

    def server_bind(self) -> None:
        """Bind, or raise CannotBind: werkzeug would print advice of its own
        (an option the command does not have) and exit."""
        try:
            super().server_bind()
        except OSError as exc:
            raise CannotBind(exc.strerror or str(exc)) from None

    def refuse_connection(self, request: socket.socket, client_address: Any) -> None:
        body = b'{"error": "HTTP 503: as many queries in progress as served"}'
        try:
            request.settimeout(1.0)
            request.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\n"
                b"Content-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        except OSError:
            logger.debug("audit query peer %s gone before its 503", client_address)
        finally:
            self.shutdown_request(request)


def parse_time(value: str) -> datetime:
    """Return an ISO 8601 date or date-time as its UTC instant; without a
    zone, UTC.

    Raises
    ------
    ValueError
        ``value`` is no date-time, or its UTC instant falls outside the
        years 1 to 9999.
    """
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value} falls outside the years 1 to 9999 in UTC") from None


class _TlsHandler(socketserver.BaseRequestHandler):
    server: "_TlsServer"

    def handle(self) -> None:
        repository = self.server.repository
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        # A peer that has not finished its handshake within handshake_timeout
        # is dropped; once authenticated, it may pause idle_timeout between
        # messages.
        self.request.settimeout(repository.handshake_timeout)
        try:
            context = refresh_revocation(repository.tls_context)
            sock = context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            repository.refused(host, port, exc)
            return
        sock.settimeout(repository.idle_timeout)
        reader = FrameReader(repository.max_message)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                for message in reader.feed(data):
                    repository.keep(message, transport="tls", peer=peer)
        except FramingError as exc:
            logger.warning("tls session from %s ended: %s", peer, exc)
            # What could not be framed is still kept, raw and flagged.
            repository.keep(reader.drain(), transport="tls", peer=peer)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("tls session from %s ended: %s", peer, exc)
        finally:
            # A last message cut short is kept too, raw and flagged.
            cut = reader.truncated()
            if cut is not None:
                raw, reason = cut
                repository.keep(raw, transport="tls", peer=peer, malformed=reason)
            sock.close()


class _TlsServer(BoundedConnections, socketserver.ThreadingTCPServer):
    """A thread per TLS session, at most ``max_connections`` at once.

    A connection beyond them is closed as soon as it is accepted, before
    its handshake, so that peers that never send cannot pile up threads.
    """

    daemon_threads = True
    allow_reuse_address = True
    listener_name = "tls syslog"

    def __init__(
        self,
        address: tuple[str, int],
        repository: "AuditRepository",
        max_connections: int,
    ):
        self.repository = repository
        self.max_connections = max_connections
        super().__init__(address, _TlsHandler)


class _UdpHandler(socketserver.BaseRequestHandler):
    server: "_UdpServer"

    def handle(self) -> None:
        data = self.request[0]
        host, port = self.client_address[:2]
        self.server.repository.keep(data, transport="udp", peer=f"{host}:{port}")


class _UdpServer(socketserver.UDPServer):
    # RFC 5426 3.2: a receiver takes datagrams up to the IPv4 UDP maximum.
    max_packet_size = MAX_UDP_PAYLOAD + 28

    def __init__(self, address: tuple[str, int], repository: "AuditRepository"):
        self.repository = repository
        super().__init__(address, _UdpHandler)


class OwnRecords:
    """An auditor for the repository's own events (its Security Alerts):
    each message is stored in its own tables, as if received over the
    transport ``local``, where its users read the audit trail. An ARR
    forwards no audit spool, so one written there would never be read.

    It has :class:`~xdsi.audit.spool.Auditor`'s ``record``: it never
    raises, and says whether the record is kept.
    """

    def __init__(self, store: AuditRecordStore, *, audit_source_id: str) -> None:
        self.store = store
        self.audit_source_id = audit_source_id

    def record(self, event: AuditEvent) -> bool:
        try:
            xml = build_audit_message(event, audit_source_id=self.audit_source_id)
            raw = format_message(xml, app_name=self.audit_source_id)
            self.store.store(raw, transport="local", peer=self.audit_source_id)
        except Exception:
            logger.exception(
                "audit record of %s by %s (outcome %s) was not stored",
                event.transaction,
                event.actor,
                int(event.outcome),
            )
            return False
        return True


class AuditRepository:
    """The listening Audit Record Repository: TLS and UDP syslog inputs.

    Parameters
    ----------
    tls_port, udp_port
        Ports to bind on ``host``; 0 picks a free one, None leaves that
        input off.
    tls_context
        The server context, holding this node's certificate and the trusted
        ones; with ``ssl.CERT_REQUIRED`` a peer without a trusted certificate
        is refused (ITI TF-2 3.19).
    auditor
        Where refusals go as Security Alerts: :class:`OwnRecords` for the
        repository's own tables; None records none.
    handshake_timeout
        Seconds a TLS peer has to finish its handshake after connecting.
    idle_timeout
        Seconds an authenticated TLS peer may send nothing before its
        session is closed.
    max_connections
        TLS sessions served at once; one more is closed unanswered.
    """

    def __init__(
        self,
        store: AuditRecordStore,
        *,
        host: str = "127.0.0.1",
        tls_port: int | None = None,
        udp_port: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        auditor: Auditor | OwnRecords | None = None,
        node_id: str = "xdsi",
        max_message: int = MAX_MESSAGE,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if tls_port is not None and tls_context is None:
            raise ValueError("the TLS syslog input (RFC 5425) needs a TLS context")
        self.store = store
        self.host = host
        self.tls_context = tls_context
        self.auditor = auditor
        self.node_id = node_id
        self.max_message = max_message
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._refusals = Throttle()
        self._tls: _TlsServer | None = None
        self._udp: _UdpServer | None = None
        if tls_port is not None:
            self._tls = _TlsServer((host, tls_port), self, max_connections)
            self._servers.append(self._tls)
        if udp_port is not None:
            self._udp = _UdpServer((host, udp_port), self)
            self._servers.append(self._udp)

    @property
    def tls_port(self) -> int | None:
        return self._tls.server_address[1] if self._tls else None

    @property
    def udp_port(self) -> int | None:
        return self._udp.server_address[1] if self._udp else None

    def start(self) -> None:
        """Serve each input in its own thread."""
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.1},
                daemon=True,
                name=f"xdsi-arr-{server.server_address[1]}",
            )
            thread.start()
            self._threads.append(thread)
        logger.info(
            "Audit Record Repository listening on %s: tls %s, udp %s",
            self.host,
            self.tls_port or "off",
            self.udp_port or "off",
        )

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def keep(
        self, raw: bytes, *, transport: str, peer: str, malformed: str | None = None
    ) -> None:
        """Store one received message; a failure is logged, not raised."""
        try:
            self.store.store(raw, transport=transport, peer=peer, malformed=malformed)
        except Exception:
            logger.exception(
                "audit message of %d bytes from %s over %s was not stored",
                len(raw),
                peer,
                transport,
            )

    def refused(self, host: str, port: int, error: Exception) -> None:
        """Log and audit a peer that failed node authentication, at most
        once a :data:`~xdsi.logs.REPEAT_INTERVAL` per host and reason.

        ITI TF-2 3.19; DICOM PS3.15 A.5.3.11 Security Alert.
        """
        reason = getattr(error, "reason", None) or type(error).__name__
        unrecorded = self._refusals.admit(host, str(reason))
        if unrecorded is None:
            logger.debug("refused tls peer %s:%s: %s", host, port, reason)
            return
        refused = RefusedPeer("tls syslog", host, port, str(reason), unrecorded)
        logger.warning("refused tls peer %s:%s: %s", host, port, refused.detail)
        if self.auditor is None:
            return
        uri = f"tls://{host}:{port}"
        self.auditor.record(
            AuditEvent(
                transaction=REFUSAL_TRANSACTION,
                actor=REFUSAL_ACTOR,
                outcome=Outcome.MINOR_FAILURE,
                source=Endpoint(uri, host),
                destination=Endpoint(self.node_id, self.host),
                alert_subjects=(uri,),
                outcome_detail=refused.detail,
            )
        )

    def __enter__(self) -> "AuditRepository":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

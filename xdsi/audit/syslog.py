"""Syslog for ATNA: RFC 5424 messages over TLS (RFC 5425) and UDP (RFC 5426).

Implements the transport of ITI TF-2 3.20.6 (Record Audit Event): the
message format of RFC 5424 with MSGID "IHE+RFC-3881" and a UTF-8 BOM before
the AuditMessage, octet-counted framing over TLS (RFC 5425 4.3), and one
message per datagram over UDP (RFC 5426 3.1). Both the sending and the
receiving side live here.
"""

import errno
import logging
import os
import re
import select
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

# ITI TF-2 3.20.6.1: the MSGID of an audit message.
AUDIT_MSGID = "IHE+RFC-3881"

# ITI TF-2 3.20.6.1: facility 10 (security/authorization) or 13 (log audit),
# severity 5 (notice).
AUTHPRIV_FACILITY = 10
LOG_AUDIT_FACILITY = 13
NOTICE_SEVERITY = 5

# RFC 5424 6.4: MSG-UTF8 starts with a byte order mark.
BOM = b"\xef\xbb\xbf"

# RFC 5424 6.2: NILVALUE.
NIL = "-"

# RFC 5426 3.2: the largest UDP payload over IPv4 (65535 less the IP and UDP
# headers).
MAX_UDP_PAYLOAD = 65507

# RFC 5424 6.2.3 to 6.2.7: field lengths in PRINTUSASCII characters.
_HOSTNAME_LENGTH = 255
_APP_NAME_LENGTH = 48
_PROCID_LENGTH = 128
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")

# RFC 5424 6: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP
# MSGID SP STRUCTURED-DATA [SP MSG]. Structured data with SD-ELEMENTs is kept
# whole, not parsed further.
_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<timestamp>\S+) "
    rb"(?P<hostname>\S+) (?P<app_name>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    rb"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: (?P<msg>.*))?\Z",
    re.DOTALL,
)

# RFC 5425 4.3: MSG-LEN is a NONZERO-DIGIT and at most 8 more digits.
_MAX_LENGTH_DIGITS = 9
# A socket error pending once a session ended: what was written met a
# closed socket, so the peer never read it.
_UNREAD = (errno.EPIPE, errno.ECONNRESET)


class SyslogFormatError(ValueError):
    """Bytes that are not an RFC 5424 syslog message."""


class FramingError(ValueError):
    """A TLS stream whose next frame is not RFC 5425 4.3 octet counting."""


@dataclass(frozen=True)
class SyslogMessage:
    """One RFC 5424 message as received: header fields and the MSG bytes.

    ``msg`` is the MSG part without its BOM; ``raw`` is the whole message.
    """

    facility: int
    severity: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes
    raw: bytes


def _field(value: str, length: int) -> str:
    """Return ``value`` as an RFC 5424 header field: PRINTUSASCII, bounded."""
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:length]
    return cleaned or NIL


def format_message(
    xml: bytes,
    *,
    app_name: str,
    hostname: str | None = None,
    facility: int = AUTHPRIV_FACILITY,
    timestamp: datetime | None = None,
) -> bytes:
    """Return an audit message as an RFC 5424 SYSLOG-MSG (ITI TF-2 3.20.6.1).

    PRI is ``facility`` at severity 5 (notice), MSGID is "IHE+RFC-3881",
    there is no structured data, and MSG is a BOM and the UTF-8 XML.
    """
    if facility not in (AUTHPRIV_FACILITY, LOG_AUDIT_FACILITY):
        raise ValueError(
            f"syslog facility {facility}; ITI TF-2 3.20.6.1 allows "
            f"{AUTHPRIV_FACILITY} or {LOG_AUDIT_FACILITY}"
        )
    when = (timestamp or datetime.now(UTC)).astimezone(UTC)
    header = " ".join(
        (
            f"<{facility * 8 + NOTICE_SEVERITY}>1",
            when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            _field(hostname or socket.getfqdn(), _HOSTNAME_LENGTH),
            _field(app_name, _APP_NAME_LENGTH),
            _field(str(os.getpid()), _PROCID_LENGTH),
            AUDIT_MSGID,
            NIL,
        )
    )
    return header.encode("ascii") + b" " + BOM + xml


def parse_message(raw: bytes) -> SyslogMessage:
    """Return the fields of one RFC 5424 message.

    Raises
    ------
    SyslogFormatError
        The bytes do not follow the header syntax of RFC 5424 6.
    """
    match = _HEADER.match(raw)
    if match is None:
        raise SyslogFormatError("not an RFC 5424 message (RFC 5424 6 header)")
    pri = int(match["pri"])
    if pri > 191:
        raise SyslogFormatError(f"PRI {pri} exceeds 191 (RFC 5424 6.2.1)")
    msg = match["msg"] or b""
    return SyslogMessage(
        facility=pri // 8,
        severity=pri % 8,
        timestamp=match["timestamp"].decode("ascii", "replace"),
        hostname=match["hostname"].decode("ascii", "replace"),
        app_name=match["app_name"].decode("ascii", "replace"),
        procid=match["procid"].decode("ascii", "replace"),
        msgid=match["msgid"].decode("ascii", "replace"),
        structured_data=match["sd"].decode("utf-8", "replace"),
        msg=msg.removeprefix(BOM),
        raw=raw,
    )


def frame(message: bytes) -> bytes:
    """Return ``message`` framed by octet counting (RFC 5425 4.3).

    MSG-LEN counts bytes, not characters: a UTF-8 AuditMessage with
    non-ASCII names is longer in bytes than in characters.
    """
    return b"%d %s" % (len(message), message)


class FrameReader:
    """Splits a TLS byte stream into syslog messages (RFC 5425 4.3)."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add received bytes; yield the messages they complete, in order.

        Raises
        ------
        FramingError
            After the whole messages before it: MSG-LEN is missing, not a
            number, or above ``max_length``; the stream cannot be
            resynchronised and the session must end.
        """
        self._buffer += data
        while True:
            space = self._buffer.find(b" ", 0, _MAX_LENGTH_DIGITS + 1)
            if space < 0:
                if len(self._buffer) > _MAX_LENGTH_DIGITS:
                    raise FramingError("no MSG-LEN before the message (RFC 5425 4.3)")
                return
            digits = bytes(self._buffer[:space])
            if not digits.isdigit() or digits.startswith(b"0"):
                raise FramingError("MSG-LEN is not a number (RFC 5425 4.3)")
            length = int(digits)
            if length > self.max_length:
                raise FramingError(
                    f"MSG-LEN {length} exceeds this receiver's {self.max_length}"
                )
            end = space + 1 + length
            if len(self._buffer) < end:
                return
            message = bytes(self._buffer[space + 1 : end])
            del self._buffer[:end]
            yield message

    def drain(self) -> bytes:
        """Return and forget the bytes not yet a whole message."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest

    def truncated(self) -> tuple[bytes, str] | None:
        """Return and forget what arrived of a last, incomplete frame.

        For a stream that ended inside a frame: the bytes received of its
        SYSLOG-MSG (or of MSG-LEN, when the stream ended inside it) and why
        the frame is incomplete (RFC 5425 4.3). None when it ended between
        frames.
        """
        if not self._buffer:
            return None
        rest = self.drain()
        length, space, message = rest.partition(b" ")
        if not space:
            return rest, "truncated frame: the stream ended inside MSG-LEN"
        return message, (
            f"truncated frame: MSG-LEN {length.decode('ascii', 'replace')}, "
            f"{len(message)} bytes before the stream ended (RFC 5425 4.3)"
        )

    @property
    def pending(self) -> int:
        """Bytes received but not yet a whole message."""
        return len(self._buffer)


class TargetDown(OSError):
    """The audit target could not be reached or dropped the connection."""


class TlsSender:
    """Sends syslog messages over one TLS connection (RFC 5425).

    The connection is opened on the first send and kept; a send that finds
    it closed by the peer opens a new one first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        timeout: float = 10.0,
        settle_time: float = 0.2,
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.timeout = timeout
        self.settle_time = settle_time
        self._sock: ssl.SSLSocket | None = None
        self._last_sent: bytes | None = None
        self._resend: bytes | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        try:
            self._settle(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _settle(self, sock: ssl.SSLSocket) -> None:
        """Wait briefly for the server's verdict on our certificate.

        Under TLS 1.3 the client's handshake ends before the server has
        checked the client certificate (RFC 8446 4.4.2); a refusal comes as
        an alert afterwards. Reading for a moment takes it before the first
        message is written into a session that is already refused.

        Raises
        ------
        ssl.SSLError, OSError
            The server refused the session or closed it.
        """
        if sock.version() != "TLSv1.3":
            return
        sock.settimeout(self.settle_time)
        try:
            data = sock.recv(1)
        except (TimeoutError, ssl.SSLWantReadError):
            return
        finally:
            sock.settimeout(self.timeout)
        raise ConnectionAbortedError(
            "the server ended the session after the handshake"
            if not data
            else "the server sent data (RFC 5425 gives it none to send)"
        )

    def _session_end(self, sock: ssl.SSLSocket) -> str | None:
        """Return how the peer ended the session: None, "closed" or "reset".

        RFC 5425 gives the receiver nothing to say, so readable data or EOF
        means the session is over (a close_notify, a FIN or an alert). A
        reset means the peer closed with bytes it had not read: the reset
        read, or one pending behind the FIN when what was written after the
        peer closed met a closed socket (Linux keeps it as EPIPE once the FIN
        is in, and a read gives the FIN first).
        """
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable and not sock.pending():
            return None
        # Taken before the read below, whose TLS layer may itself write into
        # the closed session and so leave an error of its own.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in _UNREAD:
            return "reset"
        try:
            sock.setblocking(False)
            try:
                data = sock.recv(1)
            finally:
                sock.setblocking(True)
                sock.settimeout(self.timeout)
        except ssl.SSLWantReadError:
            return None
        except ConnectionResetError:
            return "reset"
        except (OSError, ssl.SSLError):
            return "closed"
        if data:
            logger.warning(
                "tls://%s:%s sent data, which RFC 5425 gives it no place for; "
                "reconnecting",
                self.host,
                self.port,
            )
        return "closed"

    def _lost_last(self) -> None:
        # A reset says the peer closed with unread bytes; what it read came
        # first, so the last message sent is among the unread.
        if self._last_sent is not None:
            logger.warning(
                "tls://%s:%s reset the session; the last message goes again",
                self.host,
                self.port,
            )
            self._resend = self._last_sent
        self._last_sent = None

    def send(self, message: bytes) -> None:
        """Write one framed message and return once the kernel holds it.

        A session the peer reset is reopened and the last message sent on it
        written again first, since a reset means it was not read.

        Raises
        ------
        TargetDown
            The target refused the connection, the TLS handshake failed, or
            the write failed.
        """
        try:
            if self._sock is not None:
                ended = self._session_end(self._sock)
                if ended == "reset":
                    self._lost_last()
                if ended is not None:
                    self.close()
            if self._sock is None:
                self._sock = self._connect()
                self._last_sent = None
            if self._resend is not None:
                self._sock.sendall(frame(self._resend))
                self._resend = None
            self._sock.sendall(frame(message))
            self._last_sent = message
        except (ConnectionResetError, BrokenPipeError) as exc:
            self._lost_last()
            self.close()
            raise TargetDown(f"tls://{self.host}:{self.port}: {exc}") from exc
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise TargetDown(f"tls://{self.host}:{self.port}: {exc}") from exc

    def close(self) -> None:
        """End the session; the next send opens a new one."""
        if self._sock is None:
            return
        try:
            self._sock.close()
        except OSError:
            logger.debug("closing tls://%s:%s failed", self.host, self.port)
        self._sock = None


class UdpSender:
    """Sends syslog messages as UDP datagrams (RFC 5426)."""

    def __init__(
        self, host: str, port: int, max_payload: int = MAX_UDP_PAYLOAD
    ) -> None:
        self.host = host
        self.port = port
        self.max_payload = max_payload
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        # Connected, the socket takes the local address of the route to the
        # target (loopback for a local ARR) and no datagram from elsewhere.
        self._sock.connect((host, port))

    def send(self, message: bytes) -> None:
        """Send one message in one datagram (RFC 5426 3.1).

        Raises
        ------
        ValueError
            The message is larger than ``max_payload``; RFC 5426 3.1 puts one
            whole message in one datagram, and a truncated AuditMessage is
            not XML.
        TargetDown
            The datagram could not be sent.
        """
        if len(message) > self.max_payload:
            raise ValueError(
                f"syslog message of {len(message)} bytes exceeds the UDP "
                f"limit of {self.max_payload} (RFC 5426 3.2)"
            )
        try:
            self._sock.send(message)
        except OSError as exc:
            raise TargetDown(f"udp://{self.host}:{self.port}: {exc}") from exc

    def close(self) -> None:
        self._sock.close()

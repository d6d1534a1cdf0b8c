"""MLLP: HL7 v2 messages framed over TCP; a threaded server and a client.

Implements the Minimal Lower Layer Protocol (HL7 v2.5 Implementation Guide,
Appendix C.4) that ITI TF-2x C.2.1 names for HL7 v2 transactions such as
ITI-8: each message travels as <VT> message <FS><CR>. The character set of a
frame is MSH-18 (HL7 v2.5 2.15.9.18, Table 0211). Over mutual TLS (MLLPS,
ITI TF-2 3.19) when given a TLS gate or client context.
"""

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable

from xdsi.connections import BoundedConnections
from xdsi.hl7.adt import build_ack
from xdsi.tls import TlsGate, TlsServerMixin

logger = logging.getLogger(__name__)

START_BLOCK = 0x0B  # <VT>
END_BLOCK = 0x1C  # <FS>
CARRIAGE_RETURN = 0x0D  # <CR>

# A frame larger than this is answered AR and its connection closed; ITI-8
# messages are a few KiB.
MAX_FRAME_SIZE = 4 * 1024 * 1024

# HL7 v2.5 Table 0211 (Alternate character sets): MSH-18 values and the
# Python codec that reads them. The first repetition of MSH-18 is the
# message's default character set.
CHARACTER_SETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
}

# Connections served at once; one more is closed at once. Each may hold an
# unfinished frame of up to MAX_FRAME_SIZE, so this bounds what peers can
# make the listener hold (256 MiB); ITI-8 sources are a few systems.
MAX_CONNECTIONS = 64
# Seconds a connection may stay silent after connecting, before its first
# byte: a sender connects to send (HL7 v2.5 Implementation Guide C.4), so
# one that sends nothing holds one of MAX_CONNECTIONS for no message; the
# server's timeout applies once it has sent something.
FIRST_BYTE_TIMEOUT = 10.0
# Connections the system queues before they are accepted.
LISTEN_BACKLOG = 128

# The most bytes of a frame kept to read its MSH when the frame is refused.
_HEADER_BYTES = 4096

_RECV_SIZE = 65536
# How long an oversized frame's connection is drained after its AR, seconds.
_LINGER = 2.0
# How soon stop() is noticed by the accepting thread, in seconds.
_POLL_INTERVAL = 0.05
_WHITESPACE = b"\r\n \t"


class MllpError(Exception):
    """An MLLP exchange failed: refused, timed out or closed before an answer."""


class FrameTooLarge(MllpError):
    """A peer sent a frame of more than the size cap.

    ``head`` holds the frame's first bytes, for an answer naming its MSH-10.
    """

    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"MLLP frame exceeds {limit} bytes")
        self.limit = limit
        self.head = head


def encode_frame(message: str, encoding: str = "utf-8") -> bytes:
    """Wrap ``message`` as one MLLP frame: <VT> message <FS><CR>."""
    payload = message.encode(encoding, errors="replace")
    return bytes([START_BLOCK]) + payload + bytes([END_BLOCK, CARRIAGE_RETURN])


def decode_payload(payload: bytes) -> tuple[str, str]:
    """Decode a frame's bytes in MSH-18's character set; return text and codec.

    Without MSH-18, or with a value Table 0211 has and this node cannot read,
    the bytes are read as UTF-8, else as Latin-1 (what senders that leave
    MSH-18 empty most often write).
    """
    # Limitation: the multi-byte sets of Table 0211 (UNICODE, ISO IR87 and
    # the like) and code switching within a message are not read; such a
    # message is decoded by the fallback.
    codec = CHARACTER_SETS.get(_character_set(payload))
    if codec is not None:
        try:
            return payload.decode(codec), codec
        except UnicodeDecodeError:
            logger.warning("MLLP frame is not valid %s as MSH-18 says", codec)
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return payload.decode("latin-1"), "latin-1"


def _character_set(payload: bytes) -> str:
    """Return MSH-18's first repetition in the frame's bytes, or ``""``."""
    header = payload[:_HEADER_BYTES].lstrip(_WHITESPACE)
    if not header.startswith(b"MSH") or len(header) < 8:
        return ""
    segment = header.replace(b"\n", b"\r").split(b"\r", 1)[0]
    field, repetition = segment[3:4], segment[5:6]
    if not field or not repetition:
        # A segment that ends before MSH-2 ("MSH" then a line end) names
        # no separators to read MSH-18 with.
        return ""
    # fields[n - 1] is MSH-n: MSH-1 is the field separator itself.
    fields = segment.split(field)
    if len(fields) < 18:
        return ""
    return fields[17].split(repetition)[0].decode("ascii", errors="replace").strip()


class _Deframer:
    """Cut a TCP byte stream into MLLP frame payloads.

    More lenient than HL7 v2.5 Implementation Guide C.4 on three points: CR or
    LF between frames is ignored, an <FS> ends the frame even when its <CR>
    has not come (yet), and a <VT> inside a frame abandons the unfinished
    frame and starts a new one. A frame longer than ``max_frame_size`` raises
    FrameTooLarge, whether its <FS> has come or not.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size
        self.in_frame = False
        # How much of the unfinished frame was searched already, so that a
        # frame trickling in is searched once, not once per read.
        self._searched = 0

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """Add received bytes; return the frames completed and bytes skipped."""
        self._buffer += data
        frames: list[bytes] = []
        skipped = 0
        while self._buffer:
            if not self.in_frame:
                start = self._buffer.find(START_BLOCK)
                outside = self._buffer if start < 0 else self._buffer[:start]
                skipped += len(bytes(outside).strip(_WHITESPACE))
                if start < 0:
                    self._buffer.clear()
                    break
                del self._buffer[: start + 1]
                self.in_frame = True
                self._searched = 0

            # Of several <VT> before the frame's end, the last opens the
            # frame that counts: found at once, not one <VT> at a time, so
            # that a stream of them costs no more than any other bytes.
            end = self._buffer.find(END_BLOCK, self._searched)
            restart = self._buffer.rfind(
                START_BLOCK, self._searched, None if end < 0 else end
            )
            if restart >= 0:
                skipped += restart - self._buffer.count(START_BLOCK, 0, restart)
                del self._buffer[: restart + 1]
                self._searched = 0
                continue
            if (end if end >= 0 else len(self._buffer)) > self._max_frame_size:
                raise FrameTooLarge(
                    self._max_frame_size, bytes(self._buffer[:_HEADER_BYTES])
                )
            if end < 0:
                self._searched = len(self._buffer)
                break
            frames.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
            self.in_frame = False
            self._searched = 0
        return frames, skipped


class _Connection(socketserver.BaseRequestHandler):
    """One TCP connection: answer each frame with the handler's reply."""

    server: "_TcpServer"

    def handle(self) -> None:
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        owner = self.server.owner
        sock = owner._open(self.request)
        owner._track(sock, True)
        logger.debug("MLLP connection from %s", peer)
        try:
            self._serve(sock, peer, owner)
        finally:
            owner._track(sock, False)
            logger.debug("MLLP connection from %s closed", peer)

    def _serve(self, sock: socket.socket, peer: str, owner: "MllpServer") -> None:
        """Read frames until the peer closes, a timeout or a protocol error.

        Bytes outside a frame are logged when first skipped and, if more
        follow, once more in all as the connection ends: a peer streaming
        junk writes two lines, not one per read.
        """
        skipped = _Skipped(peer)
        try:
            self._read_frames(sock, peer, owner, skipped)
        finally:
            skipped.close()

    def _read_frames(
        self,
        sock: socket.socket,
        peer: str,
        owner: "MllpServer",
        outside: "_Skipped",
    ) -> None:
        handler, timeout = owner._handler, owner._timeout
        deframer = _Deframer(owner._max_frame_size)
        deadline = time.monotonic() + min(timeout, FIRST_BYTE_TIMEOUT)
        silent = True
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                data = sock.recv(_RECV_SIZE)
            except TimeoutError:
                if deframer.in_frame:
                    logger.warning(
                        "MLLP %s: frame unfinished after %.1f s, closing", peer, timeout
                    )
                return
            except OSError:
                return
            if not data:
                if deframer.in_frame:
                    logger.warning("MLLP %s: connection closed inside a frame", peer)
                return
            if silent:
                silent = False
                deadline = max(deadline, time.monotonic() + timeout)

            try:
                frames, skipped = deframer.feed(data)
            except FrameTooLarge as exc:
                _refuse_oversized(sock, peer, exc)
                return
            outside.add(skipped)

            for payload in frames:
                try:
                    text, codec = decode_payload(payload)
                    reply = handler(text)
                except Exception:
                    # One frame's failure never ends the connection: the
                    # frames after it are still answered.
                    logger.exception("MLLP %s: handler failed; frame unanswered", peer)
                    continue
                try:
                    sock.sendall(encode_frame(reply, codec))
                except OSError:
                    return
            if frames:
                deadline = time.monotonic() + timeout


class _Skipped:
    """The bytes a connection's peer sent outside a frame, for the log."""

    def __init__(self, peer: str) -> None:
        self._peer = peer
        self._first = 0
        self._total = 0

    def add(self, count: int) -> None:
        if count and not self._total:
            logger.warning(
                "MLLP %s: skipped %d bytes outside a frame", self._peer, count
            )
            self._first = count
        self._total += count

    def close(self) -> None:
        if self._total > self._first:
            logger.warning(
                "MLLP %s: skipped %d bytes outside a frame in all on this connection",
                self._peer,
                self._total,
            )


def _refuse_oversized(sock: socket.socket, peer: str, exc: FrameTooLarge) -> None:
    """Answer an oversized frame with an ACK AR and end the connection.

    The rest of the frame is not served: the connection ends after the
    answer. What the peer still sends is read and dropped for a moment
    (_LINGER seconds), so that closing with unread bytes does not reset the
    connection before the peer has read the AR.
    """
    text, codec = decode_payload(exc.head)
    ack = build_ack(
        text.partition("\r")[0].partition("\n")[0],
        "AR",
        text=f"MLLP frame exceeds {exc.limit} bytes; message not read",
        error_code="207",
    )
    logger.warning(
        "MLLP %s: frame exceeds %d bytes; answered AR and closing", peer, exc.limit
    )
    try:
        sock.sendall(encode_frame(ack, codec))
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not sock.recv(_RECV_SIZE):
                break
    except OSError:
        logger.debug("MLLP %s: peer gone before the AR to its oversized frame", peer)


class _TcpServer(BoundedConnections, TlsServerMixin, socketserver.ThreadingTCPServer):
    """A thread per connection, at most ``max_connections`` at once; threads
    die with the process."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    # MLLP has no answer for a message not read: a connection beyond the
    # bound is closed (BoundedConnections.refuse_connection), and the sender
    # retries as after any broken connection.
    max_connections = MAX_CONNECTIONS
    listener_name = "MLLP"

    def __init__(self, address: tuple[str, int], owner: "MllpServer") -> None:
        self.owner = owner
        super().__init__(address, _Connection)


class MllpServer:
    """An MLLP listener that answers every frame with ``handler(message)``.

    Several messages may travel on one connection. A connection is closed
    when no frame completes within ``timeout`` seconds of the previous one
    (or of connecting). A handler exception leaves that frame unanswered and
    the connection and server running. A frame longer than
    ``max_frame_size`` bytes is answered with an ACK AR and its connection
    closed. The socket is bound on construction, so ``address`` gives the
    port even when ``port`` is 0. With ``tls_gate`` every connection must
    pass its mutual TLS handshake first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[str], str],
        *,
        timeout: float = 30.0,
        max_frame_size: int = MAX_FRAME_SIZE,
        tls_gate: TlsGate | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout {timeout}: must be more than 0 seconds")
        if max_frame_size < 1:
            raise ValueError(f"max_frame_size {max_frame_size}: must be at least 1")
        self._handler = handler
        self._timeout = timeout
        self._max_frame_size = max_frame_size
        self._server = _TcpServer((host, port), self)
        self._server.tls_gate = tls_gate
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a daemon thread until stop()."""
        if self._thread is not None:
            raise RuntimeError("MllpServer already started")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"mllp-{self.address[0]}:{self.address[1]}",
            daemon=True,
        )
        self._thread.start()
        logger.info("MLLP listening on %s:%d", *self.address)

    def stop(self) -> None:
        """Close the listening socket and open connections; join the thread."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("MLLP connection already closed at stop")
        logger.info("MLLP on %s:%d stopped", *self.address)

    def _open(self, sock: socket.socket) -> socket.socket:
        """Prepare an accepted connection; every connection passes here.

        ACKs are small and answer at once, so Nagle's delay is turned off.
        """
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _track(self, sock: socket.socket, is_open: bool) -> None:
        """Remember open connections so stop() can close them."""
        with self._lock:
            if is_open:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)


def _connect(
    host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None
) -> socket.socket:
    """Open the connection, over TLS when ``ssl_context`` is given."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if ssl_context is None:
        return sock
    try:
        return ssl_context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def send_message(
    host: str,
    port: int,
    message: str,
    *,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """Send one message in an MLLP frame and return the answer frame's text.

    With ``ssl_context`` the frame travels over TLS (MLLPS), the server's
    certificate checked against the context's trust.

    Raises
    ------
    MllpError
        The connection is refused or closed before an answer frame, or no
        answer arrives within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    deframer = _Deframer()
    try:
        with _connect(host, port, timeout, ssl_context) as sock:
            sock.sendall(encode_frame(message))
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise MllpError(f"MLLP {host}:{port} closed before an answer frame")
                frames, _ = deframer.feed(data)
                if frames:
                    return decode_payload(frames[0])[0]
    except TimeoutError as exc:
        raise MllpError(f"MLLP {host}:{port}: no answer within {timeout} s") from exc
    except ssl.SSLCertVerificationError as exc:
        # This node refused the listener's certificate: nothing was sent.
        raise MllpError(
            f"MLLP {host}:{port}: TLS handshake failed, the peer's certificate "
            f"is not trusted ({exc.reason}: {exc.verify_message})"
        ) from exc
    except ssl.SSLError as exc:
        # ITI TF-2 3.19: under TLS 1.3 the listener refuses this node's
        # certificate after the client's side of the handshake is done, and
        # closes the session; its alert (certificate revoked, unknown CA)
        # may come first, after the end of the session, or not at all.
        if isinstance(exc, ssl.SSLEOFError):
            what = "the peer closed the session during the handshake"
        else:
            what = str(exc.reason or exc).replace("_", " ").lower()
        raise MllpError(
            f"MLLP {host}:{port}: TLS failed ({what}); the peer may not accept "
            "this node's certificate (revoked, expired, or of a CA it does not "
            "trust)"
        ) from exc
    except OSError as exc:
        raise MllpError(f"MLLP {host}:{port}: {exc}") from exc

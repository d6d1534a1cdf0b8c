"""MLLP: HL7 v2 messages framed over TCP; a threaded server and a client.

Implements the Minimal Lower Layer Protocol (HL7 v2.5 Implementation Guide,
Appendix C.4) that ITI TF-2x C.2.1 names for HL7 v2 transactions such as
ITI-8: each message travels as <VT> message <FS><CR>. Over mutual TLS
(MLLPS, ITI TF-2 3.19) when given a TLS gate or client context.
"""

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable

from xdsi.tls import TlsGate, TlsServerMixin

logger = logging.getLogger(__name__)

START_BLOCK = 0x0B  # <VT>
END_BLOCK = 0x1C  # <FS>
CARRIAGE_RETURN = 0x0D  # <CR>

# A frame larger than this closes the connection; ITI-8 messages are a few KiB.
MAX_FRAME_SIZE = 4 * 1024 * 1024

_RECV_SIZE = 65536
# How soon stop() is noticed by the accepting thread, in seconds.
_POLL_INTERVAL = 0.05
_WHITESPACE = b"\r\n \t"


class MllpError(Exception):
    """An MLLP exchange failed: refused, timed out or closed before an answer."""


class FrameTooLarge(MllpError):
    """A peer sent more than MAX_FRAME_SIZE bytes without ending the frame."""


def encode_frame(message: str, encoding: str = "utf-8") -> bytes:
    """Wrap ``message`` as one MLLP frame: <VT> message <FS><CR>."""
    payload = message.encode(encoding, errors="replace")
    return bytes([START_BLOCK]) + payload + bytes([END_BLOCK, CARRIAGE_RETURN])


def decode_payload(payload: bytes) -> tuple[str, str]:
    """Decode a frame's bytes as UTF-8, else Latin-1; return text and codec."""
    # Limitation: MSH-18 Character Set is not consulted; a message in any
    # other character set reads as Latin-1 (or as UTF-8 when it happens to be
    # valid UTF-8).
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return payload.decode("latin-1"), "latin-1"


class _Deframer:
    """Cut a TCP byte stream into MLLP frame payloads.

    More lenient than HL7 v2.5 Implementation Guide C.4 on three points: CR or
    LF between frames is ignored, an <FS> ends the frame even when its <CR>
    has not come (yet), and a <VT> inside a frame abandons the unfinished
    frame and starts a new one.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.in_frame = False

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

            end = self._buffer.find(END_BLOCK)
            restart = self._buffer.find(START_BLOCK, 0, None if end < 0 else end)
            if restart >= 0:
                skipped += restart
                del self._buffer[: restart + 1]
                continue
            if end < 0:
                if len(self._buffer) > MAX_FRAME_SIZE:
                    raise FrameTooLarge(
                        f"MLLP frame exceeds {MAX_FRAME_SIZE} bytes without <FS>"
                    )
                break
            frames.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
            self.in_frame = False
        return frames, skipped


class _Connection(socketserver.BaseRequestHandler):
    """One TCP connection: answer each frame with the handler's reply."""

    server: "_TcpServer"

    def handle(self) -> None:
        host, port = self.client_address[:2]
        peer = f"{host}:{port}"
        sock: socket.socket = self.request
        owner = self.server.owner
        owner._track(sock, True)
        logger.debug("MLLP connection from %s", peer)
        try:
            self._serve(sock, peer, owner._handler, owner._timeout)
        finally:
            owner._track(sock, False)
            logger.debug("MLLP connection from %s closed", peer)

    def _serve(
        self,
        sock: socket.socket,
        peer: str,
        handler: Callable[[str], str],
        timeout: float,
    ) -> None:
        """Read frames until the peer closes, a timeout or a protocol error."""
        deframer = _Deframer()
        deadline = time.monotonic() + timeout
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

            try:
                frames, skipped = deframer.feed(data)
            except FrameTooLarge as exc:
                logger.warning("MLLP %s: %s, closing", peer, exc)
                return
            if skipped:
                logger.warning(
                    "MLLP %s: skipped %d bytes outside a frame", peer, skipped
                )

            for payload in frames:
                text, codec = decode_payload(payload)
                try:
                    reply = handler(text)
                except Exception:
                    logger.exception("MLLP %s: handler failed; frame unanswered", peer)
                    continue
                try:
                    sock.sendall(encode_frame(reply, codec))
                except OSError:
                    return
            if frames:
                deadline = time.monotonic() + timeout


class _TcpServer(TlsServerMixin, socketserver.ThreadingTCPServer):
    """A thread per connection; threads die with the process."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: "MllpServer") -> None:
        self.owner = owner
        super().__init__(address, _Connection)


class MllpServer:
    """An MLLP listener that answers every frame with ``handler(message)``.

    Several messages may travel on one connection. A connection is closed
    when no frame completes within ``timeout`` seconds of the previous one
    (or of connecting). A handler exception leaves that frame unanswered and
    the connection and server running. The socket is bound on construction,
    so ``address`` gives the port even when ``port`` is 0. With ``tls_gate``
    every connection must pass its mutual TLS handshake first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Callable[[str], str],
        *,
        timeout: float = 30.0,
        tls_gate: TlsGate | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout {timeout}: must be more than 0 seconds")
        self._handler = handler
        self._timeout = timeout
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
    except OSError as exc:
        raise MllpError(f"MLLP {host}:{port}: {exc}") from exc

"""A SOAP 1.2 client over HTTP that streams MTOM/XOP both ways.

Implements the SOAP 1.2 Part 2 7 HTTP binding (request-response, Fault on
any status), WS-Addressing 1.0 SOAP Binding 3 for requests (wsa:To,
anonymous wsa:ReplyTo) and ITI TF-2x Appendix V for the IHE transactions.
"""

import errno
import logging
import re
import ssl
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import requests
import urllib3.exceptions
from lxml.etree import _Element
from requests.adapters import HTTPAdapter

from xdsi.ns import SOAP12, qname
from xdsi.wire.faults import (
    AnswerTooLarge,
    PeerFault,
    SoapFault,
    SpoolError,
    TransportError,
)
from xdsi.wire.mtom import OutgoingPart, read_message, write_message
from xdsi.wire.soap import SoapMessage, build_envelope

logger = logging.getLogger(__name__)

_E = TypeVar("_E", bound=BaseException)

# OpenSSL's reasons for a TLS alert the peer sent about the handshake
# (RFC 8446 6.2): it refused our certificate, or the session itself.
_HANDSHAKE_ALERT = re.compile(
    r"ALERT_(BAD_CERTIFICATE|UNSUPPORTED_CERTIFICATE|CERTIFICATE_\w+|UNKNOWN_CA"
    r"|ACCESS_DENIED|HANDSHAKE_FAILURE|PROTOCOL_VERSION|INSUFFICIENT_SECURITY)"
)

# A connection made, then reset or broken by the peer before its answer.
_BROKEN_OFF = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}

# RFC 9110 12.5.3: an answer's content as sent, uncompressed. A compressed
# answer could inflate far beyond what came over the wire (a decompression
# bomb), past the bounds set on what is read; requests would otherwise ask
# for gzip and deflate.
ACCEPT_ENCODING = "identity"


class _SizedBody:
    """An iterable body of known length, so requests sends Content-Length.

    requests sends a bare generator with chunked transfer coding; with a
    length it streams the chunks under an exact Content-Length instead.
    """

    def __init__(self, length: int, chunks: Iterator[bytes]) -> None:
        self._length = length
        self._chunks = chunks

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


class _AnswerTooSlow(Exception):
    """The answer was still coming when its time was up."""


class _Deadline:
    """An answer stream read piece by piece, refused past ``deadline``.

    Each read takes what one read of the socket gives (``read1``), so that a
    peer sending a byte at a time cannot keep one read going past the
    deadline; each read still waits at most the client's per-read timeout.
    """

    def __init__(self, stream: BinaryIO, deadline: float, within: float) -> None:
        self._stream = stream
        self._deadline = deadline
        self._within = within
        self._read = getattr(stream, "read1", stream.read)

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._deadline:
            raise _AnswerTooSlow(f"not whole within {self._within:g} s")
        return self._read(size)


class _Pace:
    """An answer stream that must keep up an average pace: each byte read
    buys ``1 / rate`` s, and at most ``bank`` s are held in advance (the
    longest pause allowed), so that a peer trickling its answer cannot keep
    the reader forever, while a large answer at a sound rate has all the
    time it needs. Reads take what one read of the socket gives
    (``read1``), as for _Deadline."""

    def __init__(self, stream: BinaryIO, rate: float, bank: float) -> None:
        self._stream = stream
        self._rate = rate
        self._bank = bank
        self._due = time.monotonic() + bank
        self._read = getattr(stream, "read1", stream.read)

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self._due:
            raise _AnswerTooSlow(
                f"it came slower than {self._rate:g} bytes a second on average"
            )
        data = self._read(size)
        self._due = min(
            self._due + len(data) / self._rate, time.monotonic() + self._bank
        )
        return data


class _ContextAdapter(HTTPAdapter):
    """HTTPS through one ssl.SSLContext, whose settings alone decide trust.

    requests would otherwise load its own CA bundle into the context; a node
    authenticates its peers against its configured trust only
    (ITI TF-2 3.19).
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: object, url: str, verify: object, cert: object) -> None:
        """Leave the connection's trust to the context."""


def tls_session(context: ssl.SSLContext) -> requests.Session:
    """Return a session whose https:// requests use ``context``."""
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", _ContextAdapter(context))
    return session


class SoapClient:
    """Send SOAP 1.2 requests to one endpoint and read the responses.

    Redirects are not followed: an IHE endpoint answers where it is. With
    ``ssl_context`` an https:// endpoint is reached over that context (mutual
    TLS, ITI TF-2 3.19); a given ``session`` is used as it is. ``timeout``
    bounds each wait for the connection or for more of the answer; with
    ``answer_within``, an answer still coming that many seconds after the
    request started is given up (a TransportError), however steadily it
    trickles in; with ``min_rate`` (bytes a second), an answer whose body
    falls behind that average pace, with a pause of ``timeout`` at most
    banked, is given up the same way.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 120.0,
        answer_within: float | None = None,
        min_rate: float | None = None,
        spool_dir: Path | None = None,
        session: requests.Session | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.answer_within = answer_within
        self.min_rate = min_rate
        self.spool_dir = (
            spool_dir if spool_dir is not None else Path(tempfile.gettempdir())
        )
        if session is None:
            session = (
                requests.Session() if ssl_context is None else tls_session(ssl_context)
            )
        self.session = session

    def call(
        self,
        action: str,
        body: _Element,
        *,
        parts: Sequence[OutgoingPart] = (),
        mtom: bool = False,
        digest: bool = True,
        max_parts: int | None = None,
        max_bytes: int | None = None,
        max_part_bytes: int | None = None,
    ) -> SoapMessage:
        """Send ``body`` with wsa:Action ``action`` and return the response.

        The request is MTOM/XOP when ``parts`` are given or ``mtom`` is set;
        it streams from the parts' files. ``body`` is moved into the request
        envelope. The caller closes the returned message to remove its
        spooled attachments. With ``digest`` false the answer's parts are
        not hashed (their ``sha1`` is None). With ``max_parts`` an MTOM
        answer of more MIME parts (its root part included) is refused as it
        streams, before their files pile up. With ``max_bytes`` an answer
        whose body is larger (announced or sent), and with
        ``max_part_bytes`` one with a larger MIME part, is refused as it
        streams, before more is spooled. The answer is asked for without
        content coding (ACCEPT_ENCODING); one sent with another is refused.

        Raises
        ------
        PeerFault
            The peer answered with a SOAP Fault, whatever the HTTP status.
        TransportError
            No connection, a timeout, or an answer that is not SOAP 1.2.
        SpoolError
            The answer could not be written to ``spool_dir``.
        AnswerTooLarge
            The answer exceeds ``max_bytes`` or ``max_part_bytes``.
        """
        envelope = build_envelope(body, action, to=self.url, reply_to_anonymous=True)
        content_type, length, chunks = write_message(
            envelope, action, parts, mtom=mtom or bool(parts)
        )
        started = time.monotonic()
        status: int | None = None
        outcome = "no answer"
        try:
            response = self._post(content_type, _SizedBody(length, chunks))
            status = response.status_code
            with response:
                message = self._read(
                    response, digest, started, max_parts, max_bytes, max_part_bytes
                )
            if message.body.tag == qname(SOAP12, "Fault"):
                message.close()
                fault = PeerFault.from_element(message.body)
                outcome = f"Fault {fault.code} {' '.join(fault.subcodes)}"
                raise fault
            if not 200 <= status < 300:
                message.close()
                raise TransportError(
                    "a non-Fault SOAP answer with an error status",
                    self.url,
                    status,
                    answer=message.body,
                )
            outcome = f"{message.action}, {len(message.attachments)} attachments"
            return message
        finally:
            logger.debug(
                "POST %s %s (%d bytes): HTTP %s, %s, %.3f s",
                self.url,
                action,
                length,
                status,
                outcome,
                time.monotonic() - started,
            )

    def _post(self, content_type: str, body: _SizedBody) -> requests.Response:
        """POST the body; map every requests failure to TransportError."""
        try:
            return self.session.post(
                self.url,
                data=body,
                headers={
                    "Content-Type": content_type,
                    "Accept-Encoding": ACCEPT_ENCODING,
                },
                timeout=self.timeout,
                stream=True,
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            # A certificate refused in the handshake: nothing was sent.
            refused = _in_chain(exc, ssl.SSLCertVerificationError)
            if refused is not None:
                raise TransportError(
                    "TLS handshake failed, the peer's certificate is not trusted "
                    f"({refused.reason}: {refused.verify_message})",
                    self.url,
                    unsent=True,
                ) from exc
            failure = _in_chain(exc, ssl.SSLError)
            if failure is None:
                raise TransportError(str(exc), self.url) from exc
            if isinstance(failure, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                # Under TLS 1.3 a server refuses the client's certificate
                # after the client's handshake is done; its alert may come
                # after the connection is closed, or not at all. The closed
                # connection shows as an EOF in violation of the protocol
                # or, as OpenSSL reads it at times, as a session closed.
                raise TransportError(
                    "TLS failed: the peer closed the session during the "
                    "handshake; it may not accept this node's certificate "
                    "(revoked, expired, or of a CA it does not trust)",
                    self.url,
                ) from exc
            # An alert from the peer about the handshake (our certificate
            # refused, no common version): it acted on no request.
            alert = bool(_HANDSHAKE_ALERT.search(failure.reason or ""))
            raise TransportError(
                f"TLS failed ({failure.reason or failure})", self.url, unsent=alert
            ) from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise TransportError(
                f"cannot connect (no connection within {self.timeout:g} s)",
                self.url,
                unsent=True,
            ) from exc
        except requests.exceptions.ReadTimeout as exc:
            # The request went out; the peer may still be acting on it.
            raise TransportError(
                f"no answer within {self.timeout:g} s", self.url
            ) from exc
        except requests.ConnectionError as exc:
            # requests' own text is a chain of wrapped exceptions; the
            # operating system's reason is what a user can act on.
            error = _os_error(exc)
            if error is None:
                # Connected, then closed by the peer before it answered.
                raise TransportError(
                    "the peer closed the connection without answering", self.url
                ) from exc
            if error.errno in _BROKEN_OFF:
                # Connected, then reset before an answer came.
                raise TransportError(
                    f"the connection broke off before an answer ({error.strerror})",
                    self.url,
                ) from exc
            raise TransportError(
                f"cannot connect ({error.strerror})",
                self.url,
                unsent=_unconnected(exc),
            ) from exc
        except requests.RequestException as exc:
            raise TransportError(str(exc), self.url) from exc

    def _read(
        self,
        response: requests.Response,
        digest: bool,
        started: float,
        max_parts: int | None = None,
        max_bytes: int | None = None,
        max_part_bytes: int | None = None,
    ) -> SoapMessage:
        """Read the response as SOAP; anything else is a TransportError, as
        is an answer not read whole ``answer_within`` seconds after
        ``started``, or falling behind ``min_rate``, or content coded
        otherwise than asked (ACCEPT_ENCODING). An answer announcing more
        than ``max_bytes`` is AnswerTooLarge before its body is read."""
        content_type = response.headers.get("Content-Type", "")
        coding = response.headers.get("Content-Encoding", "").strip().lower()
        if coding not in ("", ACCEPT_ENCODING):
            raise TransportError(
                f"the answer is sent with Content-Encoding {coding[:100]}, which "
                f"this side did not ask for (Accept-Encoding: {ACCEPT_ENCODING}, "
                "RFC 9110 12.5.3)",
                self.url,
                response.status_code,
            )
        announced = response.headers.get("Content-Length", "")
        # isdigit() alone takes digits int() refuses, such as "²".
        known = announced.isascii() and announced.isdigit()
        if max_bytes is not None and known and int(announced) > max_bytes:
            raise AnswerTooLarge(max_bytes)
        # The body is read as sent: nothing is decoded on the way.
        response.raw.decode_content = False
        stream: BinaryIO = response.raw
        if self.answer_within is not None:
            # Limitation: the status line and headers are read under the
            # per-read timeout alone; the deadline is checked from the body on.
            stream = _Deadline(stream, started + self.answer_within, self.answer_within)
        if self.min_rate is not None:
            stream = _Pace(stream, self.min_rate, self.timeout)
        try:
            return read_message(
                stream,
                content_type,
                self.spool_dir,
                digest=digest,
                max_parts=max_parts,
                max_bytes=max_bytes,
                max_part_bytes=max_part_bytes,
            )
        except _AnswerTooSlow as exc:
            raise TransportError(
                f"the answer broke off ({exc})", self.url, response.status_code
            ) from None
        except SpoolError:
            # This side's disk, not the peer's answer: the caller says so.
            raise
        except SoapFault as exc:
            shown = content_type or "no Content-Type"
            raise TransportError(
                f"the answer is not a SOAP 1.2 message ({shown}): {exc.reason}",
                self.url,
                response.status_code,
            ) from exc
        except (
            urllib3.exceptions.HTTPError,
            requests.RequestException,
            OSError,
        ) as exc:
            if _in_chain(exc, urllib3.exceptions.ReadTimeoutError) is not None:
                why = f"nothing more came within {self.timeout:g} s"
            elif (error := _os_error(exc)) is not None:
                why = error.strerror
            else:
                # urllib3's own text names the peer's host and port.
                why = type(exc).__name__
            raise TransportError(
                f"the answer broke off ({why})", self.url, response.status_code
            ) from exc


def _unconnected(exc: BaseException) -> bool:
    """Whether a requests failure happened before any connection was made
    (refused or unresolvable), so that nothing was sent."""
    # urllib3's NewConnectionError is a ConnectTimeoutError.
    return _in_chain(exc, urllib3.exceptions.ConnectTimeoutError) is not None


def _in_chain(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in the chain of wrapped exceptions
    under a requests or urllib3 failure, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        reason = getattr(current, "reason", None)
        wrapped = [a for a in current.args if isinstance(a, BaseException)]
        if isinstance(reason, BaseException):
            current = reason
        elif wrapped:
            current = wrapped[0]
        else:
            current = current.__cause__ or current.__context__
    return None


def _os_error(exc: BaseException) -> OSError | None:
    """The operating system's error deepest in an exception chain that says
    why (``Connection refused``, ``Name or service not known``), if any."""
    seen: set[int] = set()
    found: OSError | None = None
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            found = current
        for arg in current.args:
            if isinstance(arg, BaseException):
                current = arg
                break
        else:
            current = current.__cause__ or current.__context__
            continue
    return found

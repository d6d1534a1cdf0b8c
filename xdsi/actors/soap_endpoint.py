"""The HTTP edge of every SOAP actor: read, dispatch by wsa:Action, answer.

A request is read with the streaming MTOM codec, dispatched to the handler
of its wsa:Action (profiles/transactions.toml) and answered with the
handler's body, as MTOM when the transaction's response travels so. Every
failure becomes a SOAP 1.2 Fault (SOAP 1.2 Part 2, 7.5.1: env:Sender with
HTTP 400, env:Receiver with HTTP 500; an unsupported media type 415); no
traceback or HTML page ever reaches a peer. A request body that cannot be
read to its end (the peer went away, or garbled its chunked transfer coding,
RFC 9112 7.1) is the sender's fault; a spool that cannot be written is ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from flask import Flask, Response, g, request
from lxml import etree
from werkzeug.exceptions import (
    ClientDisconnected,
    HTTPException,
    RequestEntityTooLarge,
)

from xdsi import ns, wire
from xdsi.profiles_loader import load_profile_table
from xdsi.store.blobs import open_spool
from xdsi.wire.mtom import MAX_REQUEST_PARTS
from xdsi.wire.schema import schema_errors

logger = logging.getLogger(__name__)

# The WSGI environ key under which the node's HTTP server offers a
# wire.mtom.SendFile, so that MTOM parts on disk go out by os.sendfile.
SENDFILE_KEY = "xdsi.sendfile"
# The WSGI environ key under which the node's HTTP server offers the BodyPace
# that a request body must keep to.
BODY_PACE_KEY = "xdsi.body_pace"


@cache
def transactions() -> dict[str, dict[str, Any]]:
    """Return profiles/transactions.toml, keyed by transaction id."""
    return load_profile_table("transactions")


def transaction(name: str) -> dict[str, Any]:
    return transactions()[name]


@dataclass
class Peer:
    """Who sent a request, as the audit trail records it."""

    host: str
    reply_to: str
    endpoint: str


@dataclass
class Reply:
    """A handler's answer: the body element and the parts it references."""

    body: etree._Element
    parts: list[wire.OutgoingPart] = field(default_factory=list)
    # Run after the response has been streamed (e.g. remove temp files).
    cleanup: list[Callable[[], None]] = field(default_factory=list)


Handler = Callable[[wire.SoapMessage, Peer], Reply]


class BodyPace(Protocol):
    """The pace a request body must keep, which the HTTP server enforces by
    shutting the connection down when the body falls behind."""

    # The most bytes to read at once, so that each step is counted as it
    # comes rather than when a large read is at last filled.
    step: int
    # Set once the server has shut the connection down for want of pace.
    cut_off: bool

    def start(self) -> None:
        """The body's first read begins."""

    def arrived(self, count: int) -> None:
        """``count`` more bytes of the body were read."""

    def done(self) -> None:
        """The body is read, or no more of it will be: stop the rule."""


class RequestBody:
    """The body of the request being answered, whose read errors are the
    sender's.

    werkzeug raises OSError when chunked framing is garbled or the socket
    fails, and ClientDisconnected when fewer bytes come than announced; both
    become :class:`wire.UnreadableBody`, as does a body that fell behind the
    server's :class:`BodyPace`, if it offers one. The rule holds from
    here to the end of the body or of the ``with`` block, whichever comes
    first. A body larger than the app's MAX_CONTENT_LENGTH ([node]
    max_request_size), announced or sent, is :class:`wire.RequestTooLarge`.
    Errors of whoever consumes the bytes (a full disk) pass through
    unchanged.
    """

    def __init__(self) -> None:
        self._limit = request.max_content_length
        try:
            self._stream = request.stream
        except RequestEntityTooLarge:
            raise self._too_large() from None
        self._pace: BodyPace | None = request.environ.get(BODY_PACE_KEY)
        if self._pace is not None:
            self._pace.start()

    def __enter__(self) -> RequestBody:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pace rule: what follows is the node's own time."""
        if self._pace is not None:
            self._pace.done()

    def _too_large(self) -> wire.RequestTooLarge:
        return wire.RequestTooLarge(
            f"the request body is larger than the {self._limit} bytes this "
            "node takes ([node] max_request_size)"
        )

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes, all that is left if negative; fewer only at
        the end of the body."""
        if self._pace is None:
            return self._read(size)
        pieces = []
        while size != 0:
            step = self._pace.step if size < 0 else min(size, self._pace.step)
            piece = self._read(step)
            if not piece:
                self.close()
                break
            self._pace.arrived(len(piece))
            pieces.append(piece)
            if size > 0:
                size -= len(piece)
        return b"".join(pieces)

    def _read(self, size: int) -> bytes:
        try:
            data = self._stream.read(size)
        except RequestEntityTooLarge:
            raise self._too_large() from None
        except (OSError, ClientDisconnected) as exc:
            self._check_pace()
            raise wire.UnreadableBody(
                "the HTTP request body broke off or its chunked framing is "
                f"garbled: {exc}"
            ) from None
        self._check_pace()
        return data

    def _check_pace(self) -> None:
        if self._pace is not None and self._pace.cut_off:
            raise wire.UnreadableBody(
                "the HTTP request body fell behind the minimum pace this node "
                "takes; the connection was closed"
            )


def with_allow(response: Response, exc: HTTPException) -> Response:
    """Keep the Allow header of a 405 (RFC 9110 15.5.6: the methods the
    resource takes) on the answer that replaces werkzeug's page."""
    for name, value in exc.get_headers():
        if name.lower() == "allow":
            response.headers["Allow"] = value
    return response


def _fault_response(fault: wire.SoapFault, relates_to: str | None = None) -> Response:
    status = fault.http_status
    body = wire.fault_envelope(fault, relates_to)
    return Response(
        body,
        status=status,
        content_type="application/soap+xml; charset=UTF-8; "
        'action="http://www.w3.org/2005/08/addressing/soap/fault"',
    )


def _streamed(
    chunks: Iterator[bytes], cleanup: list[Callable[[], None]]
) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        for step in cleanup:
            step()


def soap_app(
    name: str,
    path: str,
    handlers: dict[str, Handler],
    spool_root: Path,
    plain_prefixes: tuple[str, ...] = (),
) -> Flask:
    """Build the WSGI app of one actor: one SOAP endpoint at ``path``.

    ``handlers`` maps a transaction id of profiles/transactions.toml to the
    function that answers it. An HTTP error under one of ``plain_prefixes``
    (DICOMweb services on the same port) is answered in plain text.
    """
    app = Flask(name)
    by_action = {transaction(t)["request_action"]: t for t in handlers}
    open_spool(spool_root, name)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if request.path.startswith(plain_prefixes):
            response = Response(
                f"{exc.description}\n", status=exc.code or 500, mimetype="text/plain"
            )
        else:
            fault = wire.MalformedMessage(
                f"HTTP {exc.code}: {exc.name}; this endpoint takes SOAP 1.2 POST "
                f"requests at {path}"
            )
            response = _fault_response(fault)
            response.status_code = exc.code or 400
        return with_allow(response, exc)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        if isinstance(exc, wire.SpoolError):
            # This node's disk, not a defect: the operator is told what
            # failed, without a traceback; the peer learns no path.
            logger.error("%s: a request could not be spooled: %s", name, exc)
        else:
            logger.exception("%s: unhandled error", name)
        if request.path.startswith(plain_prefixes):
            return Response(
                "internal error of the origin server\n",
                status=500,
                mimetype="text/plain",
            )
        return _fault_response(
            wire.ReceiverFault("internal error of the responder"),
            g.get("message_id"),
        )

    # SOAP 1.2 Part 2 7: POST only; an OPTIONS gets the 405 Fault too.
    @app.post(path, provide_automatic_options=False)
    def endpoint() -> Response:
        started = time.monotonic()
        message: wire.SoapMessage | None = None
        try:
            with RequestBody() as body:
                message = wire.read_message(
                    body,
                    request.headers.get("Content-Type", ""),
                    spool_root,
                    max_parts=MAX_REQUEST_PARTS,
                )
            # internal_error relates its Fault to this request too
            # (WS-Addressing 1.0 SOAP Binding 6).
            g.message_id = message.message_id
            transaction_id = by_action.get(message.action)
            if transaction_id is None:
                raise wire.ActionNotSupported(
                    f"wsa:Action {message.action} is not served at this endpoint; "
                    f"it serves {', '.join(sorted(by_action))}"
                )
            expected = transaction(transaction_id)["request_element"]
            if message.body.tag != expected:
                raise wire.MalformedMessage(
                    f"{transaction_id} wants body element {expected}, "
                    f"got {message.body.tag}"
                )
            spec = transaction(transaction_id)
            if spec["invalid_request"] == "fault":
                problems = schema_errors(message.body, spec["request_schema"])
                if problems:
                    raise wire.MalformedMessage(
                        f"{transaction_id} request is not valid against "
                        f"{spec['request_schema']}: " + "; ".join(problems)
                    )
            peer = Peer(
                host=request.remote_addr or "",
                reply_to=ns.WSA_ANONYMOUS,
                endpoint=request.base_url,
            )
            reply = handlers[transaction_id](message, peer)
        except wire.SoapFault as fault:
            if message is not None:
                message.close()
            logger.info(
                "%s: SOAP fault %s %s: %s",
                name,
                fault.code,
                fault.subcode or "",
                fault.reason,
            )
            # WS-Addressing 1.0 SOAP Binding 6: the Fault relates to the
            # request whenever its wsa:MessageID could be read, even where
            # reading the envelope itself failed.
            relates_to = message.message_id if message else fault.message_id
            return _fault_response(fault, relates_to)
        except Exception as exc:
            if message is not None:
                message.close()
            elif isinstance(exc, wire.SpoolError) and exc.message_id:
                # The request's spool failed after its envelope was read:
                # internal_error's Fault relates to it all the same.
                g.message_id = exc.message_id
            raise

        envelope = wire.build_envelope(
            reply.body, spec["response_action"], relates_to=message.message_id
        )
        content_type, length, chunks = wire.write_message(
            envelope,
            spec["response_action"],
            reply.parts,
            mtom=spec["response_mtom"],
            sendfile=request.environ.get(SENDFILE_KEY),
        )
        logger.debug(
            "%s: %s answered in %.3f s",
            name,
            transaction_id,
            time.monotonic() - started,
        )
        response = Response(
            _streamed(chunks, [*reply.cleanup, message.close]),
            content_type=content_type,
        )
        response.headers["Content-Length"] = str(length)
        return response

    return app

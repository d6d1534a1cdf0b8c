"""MTOM/XOP packages, streamed: read into spooled parts, written from files.

Implements SOAP 1.2 MTOM 3 and 4.3 (the HTTP SOAP Transmission Optimization
Feature), XOP 1.0 3 to 5 (packages, xop:Include), RFC 2387 (multipart/related
and its ``start`` parameter), RFC 2046 5.1.1 (boundaries), RFC 2045 6
(Content-Transfer-Encoding) and RFC 2392 (cid: URLs), as ITI TF-2x Appendix V
requires for ITI-41, ITI-43 and RAD-69.

Every part but the root is written to a file (by a thread of its own, as
the next bytes are parsed) while its size (and, unless the reader declines
it, its SHA-1) is computed, so memory stays flat whatever the document
size; the root part (the SOAP envelope) is held in memory up to
:data:`MAX_ROOT_PART` bytes.
"""

import binascii
import hashlib
import io
import os
import queue
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote, unquote

from lxml import etree
from lxml.etree import _Element
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from xdsi.ns import XMIME, XOP, qname
from xdsi.store.blobs import spool_path
from xdsi.wire.faults import (
    ActionMismatch,
    AnswerTooLarge,
    MalformedMessage,
    MissingAttachment,
    SoapFault,
    SpoolError,
    UnsupportedMediaType,
    VersionMismatch,
    WireError,
)
from xdsi.wire.soap import SoapMessage, parse_envelope, read_message_id, serialize
from xdsi.wire.xml import parse_xml

# Write in 256 KiB pieces: a quarter of the Python calls per byte that
# 64 KiB pieces cost. Parts on disk go out by sendfile where the server
# offers it (SendFile).
CHUNK_SIZE = 1 << 18
# Read in 1 MiB pieces: in the RAD-69 benchmark the reader, not the sender,
# bounds the transfer, and 1 MiB reads took a sixth off its time per byte
# against 256 KiB reads.
READ_SIZE = 1 << 20
# How much of each spooled part is kept in memory too (Attachment.head): a
# DICOM file's preamble, prefix and File Meta Information fit in it but for
# unusually long meta elements.
HEAD_SIZE = 1024
# Pieces of spooled parts that wait at most for the write-behind thread
# (_WriteBehind), each at most READ_SIZE: 4 MiB.
WRITE_BEHIND_CHUNKS = 4
# The SOAP envelope is parsed in memory; a larger root part (or plain
# envelope) is refused. The largest IHE message this node parses is an
# ITI-41 or ITI-42 submission: a DocumentEntry of the NIST ITI-41 test
# cases, with its ebRIM Association, is about 8 KB, so 32 MiB carries some
# 4,000 of them; a RAD-69 request of 20,000 DocumentRequests is about 6 MB.
# Documents travel as MTOM parts, outside this bound (ITI TF-2x Appendix V).
# An ITI-18 response, which can be larger, is parsed by the consumer side
# only, never by this server.
MAX_ROOT_PART = 32 * 1024 * 1024
# MIME parts a server takes in one request (MTOM or STOW-RS): each is a
# spool file and a check, so a body of many empty parts would hold a worker
# for minutes. Several times the instances of a large CT study (a few
# thousand images); a larger upload goes in several requests.
MAX_REQUEST_PARTS = 20_000
# lxml's tree takes some 120 bytes a node, so that an envelope of empty
# elements or attributes takes 30 times its size (18 MB of 4.5 million empty
# elements took 530 MB), and a freed tree's memory stays with the thread's
# allocator. Markup (each "<" opens a tag, comment or end tag, each "="
# follows an attribute name) is bounded instead of nodes: the NIST ITI-41
# test cases carry one of them per 29 bytes, so a 32 MiB submission has
# some 1.2 million; 2 million bound the tree near 500 MB whatever the shape.
MAX_MARKUP = 2_000_000
# Bytes tolerated before the first boundary (RFC 2046 5.1.1 preamble).
MAX_PREAMBLE = 64 * 1024
# Longest header or boundary line when repairing bare-LF framing.
MAX_LINE = 8 * 1024

_CRLF = b"\r\n"
_WHITESPACE = b" \t\r\n"
_IDENTITY_ENCODINGS = {"binary", "8bit", "7bit"}
# RFC 3986 characters that stay literal in a cid: URL (RFC 2392).
_CID_SAFE = "@!$&'()*+,;=:~-._"


@dataclass(frozen=True)
class Attachment:
    """A MIME part spooled to a file, with the SHA-1 and size XDS asks for.

    ``sha1`` is None when the message was read with ``digest=False``.
    """

    content_id: str
    content_type: str
    path: Path
    size: int
    sha1: str | None
    # The first HEAD_SIZE bytes of the part (all of it, if shorter), kept
    # as they streamed by: enough to read a DICOM file's File Meta
    # Information without opening the file again.
    head: bytes = b""

    def open(self) -> BinaryIO:
        """Open the spooled file for reading."""
        return self.path.open("rb")

    def read_bytes(self) -> bytes:
        """Return the whole part; for small parts only."""
        return self.path.read_bytes()


@dataclass(frozen=True)
class StreamSource:
    """A part body of ``size`` bytes, read from the stream ``open`` returns.

    ``open`` is called when the part is sent, and the stream is closed after
    it, so that a body held elsewhere (an object store) streams in
    CHUNK_SIZE pieces and is never whole in memory.
    """

    open: Callable[[], BinaryIO]
    size: int


@dataclass(frozen=True)
class OutgoingPart:
    """A MIME part to send, from a file (``path``), a ``stream`` or ``data``."""

    content_id: str
    content_type: str
    path: Path | None = None
    data: bytes | None = None
    stream: StreamSource | None = None

    def __post_init__(self) -> None:
        if [self.path, self.data, self.stream].count(None) != 2:
            raise ValueError("OutgoingPart needs exactly one of path, data and stream")
        if not self.content_id or not _is_header_safe(self.content_id, "<> "):
            raise ValueError(f"content_id {self.content_id!r} is not a bare Content-ID")
        if not _is_header_safe(self.content_type, ""):
            raise ValueError(
                f"content_type {self.content_type!r} is not a header value"
            )


def _is_header_safe(value: str, forbidden: str) -> bool:
    """Return whether ``value`` is printable ASCII without ``forbidden``."""
    return value.isascii() and value.isprintable() and not set(forbidden) & set(value)


def _quoted(value: str) -> str:
    """Return ``value`` as an RFC 2045 quoted-string parameter value."""
    if not _is_header_safe(value, ""):
        raise ValueError(f"{value!r} cannot travel in a MIME header parameter")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def new_content_id() -> str:
    """Return a fresh Content-ID (RFC 2392 addr-spec, no angle brackets)."""
    return f"{uuid.uuid4()}@xdsi"


def xop_include(content_id: str) -> _Element:
    """Return ``<xop:Include href="cid:..."/>`` for ``content_id``.

    XOP 1.0 3.2; the Content-ID is percent-encoded as RFC 2392 requires of
    a cid: URL.
    """
    include = etree.Element(qname(XOP, "Include"), nsmap={"xop": XOP})
    include.set("href", "cid:" + quote(content_id, safe=_CID_SAFE))
    return include


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type value into its lower-case type and parameters."""
    media_type, params = parse_options_header(value)
    return media_type.decode("latin-1"), {
        key.decode("latin-1"): param.decode("latin-1") for key, param in params.items()
    }


def _bare_content_id(value: str | None) -> str | None:
    """Return a Content-ID or ``start`` without blanks or angle brackets."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


class _Sink(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...


class _FileSink:
    """Write a part to a file, computing size and SHA-1 on the way and
    keeping its first HEAD_SIZE bytes; with ``max_size``, refuse the bytes
    that would make it larger.

    The file is opened, written and closed by ``writer``: at once, or, with a
    :class:`_WriteBehind`, by its thread, an error showing at a later call or
    when the writer is joined.
    """

    def __init__(
        self,
        path: Path,
        digest: bool = True,
        max_size: int | None = None,
        writer: "_Writer | None" = None,
    ) -> None:
        self.path = path
        self.sha1 = hashlib.sha1() if digest else None
        self.size = 0
        self.head = b""
        self._max_size = max_size
        self._writer = writer or _WriteNow()
        self.file: BinaryIO | None = None
        self._writer.put(_OPEN, self)

    def write(self, data: bytes | memoryview) -> None:
        if self._max_size is not None and self.size + len(data) > self._max_size:
            raise AnswerTooLarge(self._max_size, part=True)
        self._writer.put(_WRITE, self, data)
        if self.sha1 is not None:
            self.sha1.update(data)
        if self.size < HEAD_SIZE:
            self.head += bytes(data[: HEAD_SIZE - self.size])
        self.size += len(data)

    def hexdigest(self) -> str | None:
        return None if self.sha1 is None else self.sha1.hexdigest()

    def close(self) -> None:
        # The buffer's last bytes are written here: a full disk shows too.
        self._writer.put(_CLOSE, self)


_OPEN, _WRITE, _CLOSE = "open", "write", "close"


class _Writer(Protocol):
    def put(self, op: str, sink: _FileSink, data: bytes | memoryview = b"") -> None: ...


def _perform(op: str, sink: _FileSink, data: bytes | memoryview) -> None:
    """Open, write or close a part's file."""
    if op is _OPEN:
        sink.file = sink.path.open("xb")
        return
    assert sink.file is not None
    if op is _WRITE:
        sink.file.write(data)
    else:
        sink.file.close()


class _WriteNow:
    """Each step done at once, in the calling thread."""

    def put(self, op: str, sink: _FileSink, data: bytes | memoryview = b"") -> None:
        try:
            _perform(op, sink, data)
        except OSError as exc:
            raise SpoolError(exc, sink.path) from exc


class _WriteBehind:
    """A thread that opens, writes and closes the spool files of a package
    while the reader goes on parsing the next bytes.

    Reading the socket and splitting the parts hold the GIL, creating and
    writing files mostly do not, so that on two cores the two overlap: a
    RAD-69 answer of the bundled CT (60 files, 33 MB) was read and filed in
    28 ms instead of 33 ms. At most WRITE_BEHIND_CHUNKS pieces (each no
    larger than a read, READ_SIZE) wait for the thread, so that memory stays
    flat; the reader waits beyond that. The first error stops the writing;
    the reader sees it at its next call or at :meth:`join`.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, _FileSink, bytes | memoryview] | None]
        self._queue = queue.Queue(WRITE_BEHIND_CHUNKS)
        self._error: BaseException | None = None
        self._open: set[_FileSink] = set()
        self._thread = threading.Thread(
            target=self._run, name="xdsi-spool-writer", daemon=True
        )
        self._thread.start()

    def put(self, op: str, sink: _FileSink, data: bytes | memoryview = b"") -> None:
        """Hand one step to the thread; raise the error it met, if any."""
        self._raise()
        # Written later: bytes that the caller may change meanwhile (a
        # reused buffer) go as a copy.
        owner = data.obj if isinstance(data, memoryview) else data
        self._queue.put((op, sink, data if isinstance(owner, bytes) else bytes(data)))

    def join(self) -> None:
        """Wait until every step handed over is done; raise its error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop writing, wait for the thread, and close every open file."""
        if self._error is None:
            self._error = _Aborted()
        self._queue.put(None)
        self._thread.join()
        for sink in self._open:
            assert sink.file is not None
            with suppress(OSError):
                sink.file.close()
        self._open.clear()

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            op, sink, data = item
            try:
                _perform(op, sink, data)
                if op is _OPEN:
                    self._open.add(sink)
                elif op is _CLOSE:
                    self._open.discard(sink)
            except OSError as exc:
                self._error = SpoolError(exc, sink.path)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                self._error = exc


class _Aborted(Exception):
    """The reader gave up the package: what is left is not written."""


class _MemorySink:
    """Keep the root part in memory, refusing more than MAX_ROOT_PART bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if len(self.buffer) + len(data) > MAX_ROOT_PART:
            raise MalformedMessage(
                f"the SOAP envelope exceeds {MAX_ROOT_PART} bytes; send documents "
                "as MTOM attachments"
            )
        self.buffer += data

    def close(self) -> None:
        """Nothing to release."""


class _Base64Sink:
    """Decode base64 (RFC 2045 6.8) on the fly into another sink."""

    def __init__(self, inner: _Sink) -> None:
        self._inner = inner
        self._carry = b""

    def write(self, data: bytes | memoryview) -> None:
        text = self._carry + bytes(data).translate(None, _WHITESPACE)
        cut = len(text) - len(text) % 4
        self._carry = text[cut:]
        if cut:
            self._inner.write(_b64decode(text[:cut]))

    def close(self) -> None:
        self._inner.close()
        if self._carry:
            raise MalformedMessage("a base64 MIME part ends in the middle of a quantum")


def _b64decode(text: bytes) -> bytes:
    """Decode whitespace-free base64, refusing anything else."""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise MalformedMessage(f"invalid base64 content: {exc}") from None


class _LfFraming:
    """Rewrite bare-LF MIME framing (boundary and header lines) to CRLF.

    RFC 2046 5.1.1 frames parts with CRLF; some captured and hand-made
    messages use LF alone. Part bodies pass through untouched; the LF
    before a boundary becomes the CRLF the delimiter needs.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._marker = b"\n--" + boundary
        self._state = "delimiter"
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        while self._pending:
            if self._state == "epilogue":
                out += self._pending
                self._pending.clear()
            elif self._state == "body":
                if not self._take_body(out):
                    break
            else:
                end = self._pending.find(b"\n")
                if end < 0:
                    if len(self._pending) > MAX_LINE:
                        raise MalformedMessage("a MIME header line is too long")
                    break
                line = bytes(self._pending[:end]).removesuffix(b"\r")
                del self._pending[: end + 1]
                out += line + _CRLF
                self._next_line_state(line)
        return bytes(out)

    def _take_body(self, out: bytearray) -> bool:
        """Move body bytes to ``out``; return False when input runs out."""
        found = self._pending.find(self._marker)
        if found < 0:
            # What may begin a delimiter stays: the marker but its last byte,
            # and the CR before it, which goes with it.
            keep = len(self._marker)
            if len(self._pending) > keep:
                out += self._pending[:-keep]
                del self._pending[:-keep]
            return False
        end = found - 1 if found and self._pending[found - 1] == ord("\r") else found
        out += self._pending[:end] + _CRLF
        del self._pending[: found + 1]
        self._state = "delimiter"
        return True

    def _next_line_state(self, line: bytes) -> None:
        if self._state == "delimiter":
            closing = line.startswith(self._delimiter + b"--")
            self._state = "epilogue" if closing else "headers"
        elif not line:
            self._state = "body"


def _parser(boundary: bytes, callbacks: dict[str, Any]) -> MultipartParser:
    """Return a multipart parser, or refuse a boundary it cannot take.

    More lenient than RFC 2046 5.1.1, which allows 70 characters: a boundary
    is taken up to python-multipart's limit (MAX_BOUNDARY_LENGTH, 256).
    """
    try:
        return MultipartParser(boundary, callbacks, max_header_count=32)
    except FormParserError as exc:
        raise MalformedMessage(
            f"the multipart boundary cannot be used ({exc}); RFC 2046 5.1.1 "
            "allows 1 to 70 characters"
        ) from None


class _Package:
    """A multipart/related MTOM package read chunk by chunk."""

    def __init__(
        self,
        boundary: str,
        start: str | None,
        directory: Path,
        digest: bool = True,
        max_parts: int | None = None,
        max_part_bytes: int | None = None,
    ) -> None:
        self._max_parts = max_parts
        self._max_part_bytes = max_part_bytes
        self._boundary = boundary.encode("latin-1")
        self._start = start
        self._directory = directory
        self._digest = digest
        self._parser = _parser(
            self._boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        self._head: bytearray | None = bytearray()
        self._framing: _LfFraming | None = None
        self._index = -1
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._sink: _Sink | None = None
        self._part: tuple[str, str, _FileSink | _MemorySink] | None = None
        # Made with the first spooled part (a plain envelope needs none).
        self._writer: _WriteBehind | None = None
        self._ended = False
        self.root: bytes | None = None
        self.root_params: dict[str, str] = {}
        self.attachments: dict[str, Attachment] = {}

    def feed(self, data: bytes) -> None:
        """Parse the next chunk of the HTTP body."""
        if self._head is None:
            self._write(data)
            return
        self._head += data
        first = self._first_delimiter()
        if first is not None:
            head, self._head = bytes(self._head[first:]), None
            self._write(head)
        elif len(self._head) > MAX_PREAMBLE:
            raise MalformedMessage("no MIME boundary starts the multipart body")

    def _first_delimiter(self) -> int | None:
        """Find the first boundary line and choose CRLF or bare-LF framing."""
        assert self._head is not None
        delimiter = b"--" + self._boundary
        if self._head.startswith(delimiter):
            found = 0
        else:
            found = self._head.find(b"\n" + delimiter)
            if found < 0:
                return None
            found += 1
        end = self._head.find(b"\n", found)
        if end < 0:
            return None
        if self._head[end - 1] != ord("\r"):
            self._framing = _LfFraming(self._boundary)
        return found

    def _write(self, data: bytes) -> None:
        if self._framing is not None:
            data = self._framing.feed(data)
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise MalformedMessage(f"the multipart body is garbled: {exc}") from None

    def finish(self) -> None:
        """Check that the package ended and its root part was found."""
        if not self._ended:
            raise MalformedMessage(
                "the multipart body is truncated: no closing boundary"
            )
        if self.root is None:
            wanted = f"with Content-ID <{self._start}>" if self._start else "at all"
            raise MalformedMessage(f"the multipart body has no root part {wanted}")
        if self._writer is not None:
            self._writer.join()

    def abort(self) -> None:
        """Stop writing and close every spooled file, without checks."""
        self._sink = None
        if self._writer is not None:
            self._writer.abort()

    def _on_part_begin(self) -> None:
        self._index += 1
        if self._max_parts is not None and self._index >= self._max_parts:
            raise MalformedMessage(
                f"the package holds more than {self._max_parts} MIME parts, the "
                "most this node takes in one message"
            )
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        content_id = _bare_content_id(self._headers.get("content-id"))
        content_type = self._headers.get("content-type", "application/octet-stream")
        encoding = self._headers.get("content-transfer-encoding", "binary").lower()
        if self._start is None:
            is_root = self._index == 0
        else:
            is_root = content_id == self._start

        # XOP 1.0 4.1: a part is found by its Content-ID, once.
        if not is_root and not content_id:
            raise MalformedMessage(f"MIME part {self._index + 1} has no Content-ID")
        if content_id in self.attachments or (is_root and self.root is not None):
            raise MalformedMessage(f"two MIME parts have Content-ID <{content_id}>")

        # RFC 2045 6: identity encodings pass through, base64 is decoded.
        # Limitation: quoted-printable parts are refused as MalformedMessage.
        if encoding not in _IDENTITY_ENCODINGS and encoding != "base64":
            raise MalformedMessage(
                f"Content-Transfer-Encoding {encoding} is not supported; use binary"
            )
        target: _FileSink | _MemorySink
        if is_root:
            self._check_root_type(content_type)
            target = _MemorySink()
        else:
            if self._writer is None:
                self._writer = _WriteBehind()
            target = _FileSink(
                self._directory / f"part-{self._index:05d}",
                self._digest,
                self._max_part_bytes,
                self._writer,
            )
        self._part = (content_id or "", content_type, target)
        self._sink = _Base64Sink(target) if encoding == "base64" else target

    def _check_root_type(self, content_type: str) -> None:
        """XOP 1.0 4.1 and SOAP 1.2 MTOM 4.3: the root is SOAP 1.2 XOP."""
        media_type, params = _media_type(content_type)
        if media_type != "application/xop+xml":
            raise MalformedMessage(
                f"the root MIME part is {media_type}, not application/xop+xml"
            )
        inner_type, inner_params = _media_type(params.get("type", ""))
        if inner_type == "text/xml":
            raise VersionMismatch("the root MIME part is SOAP 1.1 (type text/xml)")
        self.root_params = {**inner_params, **params}

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._sink is not None
        self._sink.write(memoryview(data)[start:end])

    def _on_part_end(self) -> None:
        assert self._sink is not None and self._part is not None
        self._sink.close()
        self._sink = None
        content_id, content_type, target = self._part
        if isinstance(target, _MemorySink):
            self.root = bytes(target.buffer)
            return
        self.attachments[content_id] = Attachment(
            content_id=content_id,
            content_type=content_type,
            path=target.path,
            size=target.size,
            sha1=target.hexdigest(),
            head=target.head,
        )

    def _on_end(self) -> None:
        self._ended = True


class _Capped:
    """A stream refused once more than ``limit`` bytes have come from it:
    the read that goes past is not handed on, so nothing beyond the limit
    is spooled."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._count += len(data)
        if self._count > self._limit:
            raise AnswerTooLarge(self._limit)
        return data


def _read_capped(stream: BinaryIO, chunk_size: int) -> bytes:
    """Read a plain SOAP envelope, refusing more than MAX_ROOT_PART bytes."""
    buffer = bytearray()
    while chunk := stream.read(chunk_size):
        buffer += chunk
        if len(buffer) > MAX_ROOT_PART:
            raise MalformedMessage(
                f"the SOAP envelope exceeds {MAX_ROOT_PART} bytes; send documents "
                "as MTOM attachments"
            )
    return bytes(buffer)


def _parse_envelope_bytes(data: bytes) -> _Element:
    """Parse an envelope, refusing one with more than MAX_MARKUP tags and
    attributes before lxml builds its tree."""
    markup = data.count(b"<") + data.count(b"=")
    if markup > MAX_MARKUP:
        raise MalformedMessage(
            f"the SOAP envelope holds {markup} tags and attributes; this node "
            f"parses at most {MAX_MARKUP}"
        )
    return parse_xml(data)


def _check_action(declared: str | None, message: SoapMessage) -> None:
    """WS-Addressing 1.0 SOAP Binding 4.1: media type action is wsa:Action."""
    action = message.action
    if declared is not None and declared.strip() != action:
        raise ActionMismatch(
            f"the media type names action {declared.strip()}; wsa:Action is {action}",
            detail=action,
            message_id=message.message_id,
        )


def read_message(
    stream: BinaryIO,
    content_type: str,
    spool_dir: Path,
    *,
    chunk_size: int = READ_SIZE,
    digest: bool = True,
    max_parts: int | None = None,
    max_bytes: int | None = None,
    max_part_bytes: int | None = None,
) -> SoapMessage:
    """Read a SOAP 1.2 message, plain or MTOM/XOP, from ``stream`` until EOF.

    ``stream`` must end where the HTTP body ends (Flask's ``request.stream``,
    werkzeug's ``get_input_stream``, a requests ``raw`` response). Parts are
    spooled under a fresh directory in ``spool_dir`` that the message's
    ``close()`` removes; on any error it is removed at once. A plain SOAP
    message has no parts: its directory is named but made only when inline
    base64 content is decoded into it (``attachment_for``). With ``digest``
    false the parts' SHA-1 is not computed (``Attachment.sha1`` is None), for
    readers that never check it. With ``max_parts`` a package of more MIME
    parts is refused as it streams, before their files pile up. With
    ``max_bytes`` a message of more bytes (as read from ``stream``), and
    with ``max_part_bytes`` a part of more bytes (as decoded), is refused
    as it streams: what lies beyond the bound is never spooled.

    More lenient than RFC 2046 5.1.1: a package framed with bare LF instead of
    CRLF is read, its part bodies kept byte for byte.

    Without ``max_bytes`` the size of what is read is the stream's to cap:
    the node's HTTP edge stops reading a request body past [node]
    max_request_size.

    Raises
    ------
    VersionMismatch
        ``text/xml``, a SOAP 1.1 root part or a SOAP 1.1 envelope.
    UnsupportedMediaType
        Neither application/soap+xml nor multipart/related MTOM/XOP.
    MalformedMessage
        Not XML, a DTD, no SOAP 1.2 Body, a truncated or garbled package.
    MessageAddressingHeaderRequired
        No wsa:Action.
    ActionMismatch
        The ``action`` parameter differs from wsa:Action.
    SpoolError
        A part could not be written under ``spool_dir`` (the disk full, say).
    AnswerTooLarge
        More than ``max_bytes`` in the message, or ``max_part_bytes`` in a
        part.

    A fault raised once the envelope's env:Header is read carries its
    wsa:MessageID, if any, as ``message_id``; so does one raised while the
    rest of the package is read, once the root part is complete, and one for
    an envelope that is well-formed as far as its MessageID.
    """
    media_type, params = _media_type(content_type)
    if media_type == "text/xml":
        raise VersionMismatch("text/xml is SOAP 1.1; this node speaks SOAP 1.2")
    if media_type == "multipart/related":
        xop_type, _ = _media_type(params.get("type", ""))
        start_info, _ = _media_type(params.get("start-info", "application/soap+xml"))
        if xop_type != "application/xop+xml":
            raise UnsupportedMediaType(
                f"multipart/related of type {xop_type or 'none'}; only MTOM/XOP "
                "(application/xop+xml) is accepted"
            )
        if start_info == "text/xml":
            raise VersionMismatch("start-info text/xml is SOAP 1.1")
        if not params.get("boundary"):
            raise MalformedMessage("multipart/related without a boundary parameter")
    elif media_type != "application/soap+xml":
        raise UnsupportedMediaType(
            f"{media_type or 'no media type'} is neither application/soap+xml nor "
            "multipart/related MTOM/XOP"
        )

    # Named after this process, so that what a process killed while reading
    # left is swept as the spool is opened again (xdsi.store.blobs).
    directory = spool_path(Path(spool_dir), "msg")
    if media_type != "application/soap+xml":
        try:
            directory.mkdir(mode=0o700)
        except OSError as exc:
            raise SpoolError(exc) from exc
    if max_bytes is not None:
        stream = _Capped(stream, max_bytes)
    package = None
    envelope: bytes | None = None
    try:
        if media_type == "application/soap+xml":
            envelope = _read_capped(stream, chunk_size)
            root = _parse_envelope_bytes(envelope)
            attachments: Mapping[str, Attachment] = MappingProxyType({})
            part_action = None
        else:
            package = _Package(
                params["boundary"],
                _bare_content_id(params.get("start")),
                directory,
                digest,
                max_parts,
                max_part_bytes,
            )
            while chunk := stream.read(chunk_size):
                package.feed(chunk)
            package.finish()
            assert package.root is not None
            root = _parse_envelope_bytes(package.root)
            attachments = package.attachments
            part_action = package.root_params.get("action")
        message = parse_envelope(root, attachments, directory)
        _check_action(params.get("action"), message)
        _check_action(part_action, message)
    except BaseException as exc:
        if package is not None:
            package.abort()
            envelope = package.root
        shutil.rmtree(directory, ignore_errors=True)
        # WS-Addressing 1.0 SOAP Binding 6: the Fault relates to the request
        # whenever its MessageID can be read, from a root part that is
        # complete though a later part is broken or could not be spooled,
        # or from an envelope that is well-formed up to its MessageID.
        if (
            isinstance(exc, SoapFault | SpoolError)
            and exc.message_id is None
            and envelope
        ):
            exc.message_id = read_message_id(envelope)
        raise
    return message


def attachment_for(element: _Element, message: SoapMessage) -> Attachment:
    """Return the document an element such as xdsb:Document carries.

    An xop:Include child is resolved through its cid: URL (XOP 1.0 3.2,
    RFC 2392). Text content is base64 from a peer that does not use MTOM;
    it is decoded into a file in ``message.spool_dir``.

    Raises
    ------
    MissingAttachment
        The xop:Include names a Content-ID that no part carries.
    MalformedMessage
        The text content is not base64.
    """
    include = element.find(qname(XOP, "Include"))
    if include is not None:
        href = include.get("href", "")
        if href[:4].lower() != "cid:":
            raise MissingAttachment(href)
        content_id = unquote(href[4:])
        try:
            return message.attachments[content_id]
        except KeyError:
            raise MissingAttachment(content_id) from None

    if message.spool_dir is None:
        raise ValueError("the message has no spool_dir to decode inline base64 into")
    text = (element.text or "").encode("ascii", "replace").translate(None, _WHITESPACE)
    if len(text) % 4:
        raise MalformedMessage("inline base64 content ends in the middle of a quantum")
    try:
        message.spool_dir.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SpoolError(exc) from exc
    sink = _FileSink(message.spool_dir / f"inline-{uuid.uuid4().hex}")
    try:
        step = 4 * CHUNK_SIZE
        for offset in range(0, len(text), step):
            sink.write(_b64decode(text[offset : offset + step]))
    except BaseException:
        sink.close()
        sink.path.unlink()
        raise
    sink.close()
    return Attachment(
        content_id=new_content_id(),
        content_type=element.get(
            qname(XMIME, "contentType"), "application/octet-stream"
        ),
        path=sink.path,
        size=sink.size,
        sha1=sink.hexdigest(),
        head=sink.head,
    )


def _part_head(boundary: str, content_type: str, content_id: str, first: bool) -> bytes:
    """Return the delimiter and MIME headers that open a part."""
    lead = b"" if first else _CRLF
    return lead + (
        f"--{boundary}\r\n"
        f"Content-Type: {content_type}\r\n"
        "Content-Transfer-Encoding: binary\r\n"
        f"Content-ID: <{content_id}>\r\n\r\n"
    ).encode("ascii")


SendFile = Callable[[BinaryIO, int], int]
"""Send up to ``count`` bytes of a file from its position straight to the
peer, after whatever was yielded before, leaving the position after them;
return the bytes sent. A server that can (``socket.sendfile``) offers one,
so that the bytes of file parts never pass through Python."""


def _stream_file(
    source: StreamSource, name: str, sendfile: SendFile | None = None
) -> Iterator[bytes]:
    """Yield a stream in CHUNK_SIZE pieces, or hand a file on disk to
    ``sendfile``; check it has its announced size."""
    remaining = source.size
    with closing(source.open()) as file:
        if sendfile is not None and _is_disk_file(file):
            remaining -= sendfile(file, remaining)
        else:
            while remaining and (chunk := file.read(min(CHUNK_SIZE, remaining))):
                remaining -= len(chunk)
                yield chunk
        grown = bool(file.read(1))
    if remaining or grown:
        raise WireError(
            f"{name} changed size while being sent ({source.size} bytes announced)"
        )


def _is_disk_file(file: BinaryIO) -> bool:
    """True for a regular file with a descriptor, which sendfile can send."""
    try:
        return stat.S_ISREG(os.fstat(file.fileno()).st_mode)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


def write_message(
    envelope: _Element,
    action: str,
    parts: Sequence[OutgoingPart] = (),
    *,
    mtom: bool = True,
    sendfile: SendFile | None = None,
) -> tuple[str, int, Iterator[bytes]]:
    """Serialize a message for HTTP: Content-Type, length and body chunks.

    Without parts and with ``mtom`` false the body is the plain envelope
    (application/soap+xml). Otherwise it is an MTOM/XOP package (SOAP 1.2
    MTOM 4.3): the envelope as root part, then each part streamed from its
    file in CHUNK_SIZE pieces, all with Content-Transfer-Encoding binary.
    The length counts the files' sizes at call time and the streams'
    announced sizes; a body whose size differs when it is sent makes the
    iterator raise WireError. With ``sendfile`` the bodies of parts on disk
    go through it, in their place between the yielded pieces, instead of
    being yielded.
    """
    root = serialize(envelope)
    if not mtom and not parts:
        content_type = f"application/soap+xml; charset=UTF-8; action={_quoted(action)}"
        return content_type, len(root), iter((root,))

    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    root_id = new_content_id()
    content_type = (
        f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
        f'start="<{root_id}>"; start-info="application/soap+xml"; '
        f"action={_quoted(action)}"
    )
    root_type = 'application/xop+xml; charset=UTF-8; type="application/soap+xml"'
    pieces: list[bytes | tuple[StreamSource, str]] = [
        _part_head(boundary, root_type, root_id, first=True),
        root,
    ]
    for part in parts:
        pieces.append(_part_head(boundary, part.content_type, part.content_id, False))
        if part.path is not None:
            source = StreamSource(
                partial(part.path.open, "rb"), part.path.stat().st_size
            )
            pieces.append((source, str(part.path)))
        elif part.stream is not None:
            pieces.append((part.stream, f"part <{part.content_id}>"))
        else:
            assert part.data is not None
            pieces.append(part.data)
    pieces.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    length = sum(len(p) if isinstance(p, bytes) else p[0].size for p in pieces)
    return content_type, length, _chunks(pieces, sendfile)


def _chunks(
    pieces: list[bytes | tuple[StreamSource, str]], sendfile: SendFile | None
) -> Iterator[bytes]:
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
        else:
            yield from _stream_file(*piece, sendfile=sendfile)

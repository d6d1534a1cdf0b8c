"""STOW-RS Store Instances on the Imaging Document Source's HTTP port.

Implements DICOM PS3.18 10.5 (Store Transaction): a POST of a
multipart/related body of application/dicom parts to ``{stow_path}`` or
``{stow_path}/{StudyInstanceUID}``, each part streamed to a spool file as it
is parsed (RFC 2046 5.1.1: preamble, transport padding and epilogue
ignored), then checked and stored by the intake; a part whose File Meta
names another Transfer Syntax UID than its media type's transfer-syntax
parameter (DICOM PS3.18 8.7.3.5.2) fails. The answer is the Store Instances
Response Module of DICOM PS3.18 10.5.3 as DICOM JSON (PS3.18 F.2) or, when
the Accept header asks for it, as XML (the Native DICOM Model of DICOM
PS3.19 A.1), with the status codes of DICOM PS3.18 Table 10.5.3-1. Its
Retrieve URLs (DICOM PS3.18 Table 10.5.3-2) name this node's own WADO-RS
resources under the DICOMweb path: the study's, and each stored instance's.

The instances kept are audited as DICOM Instances Transferred (DICOM PS3.15
A.5.3.7), one record per patient, spooled before the answer; when that
fails, the instances the request brought are taken back out and it is
answered 500.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import IO

import pydicom
from flask import Flask, Response, request
from pydicom.uid import UID
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from xdsi import audit
from xdsi.actors.intake import Accepted, Intake, received_events
from xdsi.actors.soap_endpoint import RequestBody
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.dicom.check import Refused
from xdsi.dicom.media_types import (
    DICOM_JSON_TYPE,
    DICOM_XML_TYPE,
    JSON_TYPE,
    MediaType,
    preferred,
)
from xdsi.dicom.native_xml import native_dicom_model
from xdsi.logs import escaped, quoted
from xdsi.store.blobs import spool_prefix
from xdsi.wire import MalformedMessage, RequestTooLarge
from xdsi.wire.mtom import MAX_REQUEST_PARTS

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
# The media types of the answer, DICOM JSON first: of those an Accept header
# weighs alike, the first goes.
ANSWER_MEDIA_TYPES = (DICOM_JSON_TYPE, JSON_TYPE, DICOM_XML_TYPE)

# DICOM PS3.6 tags of the Store Instances Response Module (PS3.18 10.5.3).
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

# DICOM PS3.18 Table 10.5.3-1.
ALL_STORED, SOME_STORED, NONE_STORED = 200, 202, 409
BAD_REQUEST, CONTENT_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE = 400, 413, 415
# DICOM PS3.18 8.7.8.1: the Accept header takes no media type of the answer.
NOT_ACCEPTABLE = 406
INTERNAL_ERROR = 500

CHUNK = 1 << 20
# DICOM PS3.4 Table B.2-1: Processing failure, a Failure Reason of STOW-RS.
PROCESSING_FAILURE = 0x0110
# Warning header fields an answer carries at most, one per failed part.
MAX_WARNINGS = 20
# Longest reason text sent in one Warning header.
MAX_WARNING = 200


# The states of _Delimiters: in the preamble, right after a boundary
# delimiter, in a part's headers, in a part's data, in the epilogue.
_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _PART, _EPILOGUE = range(5)
# RFC 2046 5.1.1: transport padding, linear white space.
_PADDING = re.compile(rb"[ \t]*")
_LINE_BREAKS = re.compile(rb"[\r\n]*")
# What may follow a delimiter that ends a part, and what of it a chunk may
# leave; any other byte makes it part data to python-multipart.
_DELIMITER_ENDS = (b"", b"\r", b"\r\n", b"-", b"--")


class TooManyParts(Exception):
    """A request holds more parts than MAX_REQUEST_PARTS."""


class _Parts:
    """Spool each part of a multipart body to its own file as it streams."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.files: list[tuple[Path, str]] = []
        self._file: IO[bytes] | None = None
        self._field = b""
        self._value = b""
        self._headers: dict[str, str] = {}
        self.ended = False

    def callbacks(self) -> dict:  # type: ignore[type-arg]
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_begin": self._header_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_end": self._finish,
        }

    def _begin(self) -> None:
        if len(self.files) >= MAX_REQUEST_PARTS:
            raise TooManyParts(
                f"more than {MAX_REQUEST_PARTS} parts in one request; send the "
                "instances in several requests"
            )
        self._headers = {}
        self._field = b""
        # Named after this process, so that what a process killed on the
        # way left is swept (xdsi.store.blobs.sweep_spool).
        self._file = tempfile.NamedTemporaryFile(
            dir=self.spool, prefix=spool_prefix("stow"), suffix=".dcm", delete=False
        )

    # A header's name and value come in as many pieces as the chunks of the
    # body split them into; python-multipart bounds their size.
    def _header_begin(self) -> None:
        self._field = b""
        self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").lower()
        value = self._value.decode("latin-1")
        # RFC 2045 5: a part names its Content-Type once; one named twice
        # keeps both values, comma-joined, not the last alone.
        before = self._headers.get(name)
        self._headers[name] = value if before is None else f"{before}, {value}"

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            media_type = self._headers.get("content-type", DICOM_MEDIA_TYPE)
            self.files.append((Path(self._file.name), media_type))
            self._file = None

    def _finish(self) -> None:
        self.ended = True

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.files.append((Path(self._file.name), ""))
        for path, _ in self.files:
            path.unlink(missing_ok=True)


class _Delimiters:
    """Write a multipart body to a parser as python-multipart takes it.

    RFC 2046 5.1.1 lets a body open with a preamble, text before the first
    boundary delimiter that a receiver ignores, and lets transport padding
    (linear white space: spaces and tabs) follow each boundary delimiter,
    the close delimiter's "--" included, before the CRLF that ends its
    line. python-multipart takes a body only when it opens with the
    boundary (after line breaks, which it skips), and padding on some
    delimiter lines only. The preamble is dropped and the padding taken
    out as the body streams, and so is the epilogue after the close
    delimiter; only the bytes a delimiter split between two chunks may
    start with are held. A delimiter line with anything but padding after
    it, or padding not ended by CRLF, is the sender's fault
    (MalformedMessage).

    Each chunk is walked by offset. A part's headers go to the parser
    whole, since none of their lines is a delimiter; in its data, only a
    delimiter followed by padding, CRLF or "--" is acted on. One followed
    by anything else is part data to python-multipart and goes on with the
    bytes around it, so that a part full of such lines costs no more than
    its length.
    """

    def __init__(self, parser: MultipartParser, boundary: bytes) -> None:
        self.parser = parser
        self.opening = b"--" + boundary
        self.delimiter = b"\r\n" + self.opening
        self.held = b""
        self.state = _PREAMBLE
        # Whether all that came is line breaks and the start of the opening
        # boundary.
        self.at_start = True
        # Whether the delimiter just read was followed by padding.
        self.padded = False

    def write(self, chunk: bytes) -> None:
        data = self.held + chunk if self.held else chunk
        self.held = b""
        at = 0
        while at < len(data) and self.state != _EPILOGUE:
            if self.state == _PREAMBLE:
                at = self._preamble(data, at)
            elif self.state == _AFTER_DELIMITER:
                at = self._after_delimiter(data, at)
            elif self.state == _HEADERS:
                at = self._headers(data, at)
            else:
                at = self._part(data, at)

    def close(self) -> None:
        """Pass on what was held for the bytes that never came."""
        if self.state != _PREAMBLE and self.held:
            self.parser.write(self.held)
        self.held = b""

    def _hold(self, data: bytes, at: int) -> int:
        self.held = data[at:]
        return len(data)

    def _preamble(self, data: bytes, at: int) -> int:
        if self.at_start:
            # Line breaks before the opening boundary, as python-multipart
            # skips them.
            at = _LINE_BREAKS.match(data, at).end()  # type: ignore[union-attr]
            if at == len(data):
                return at
            if data.startswith(self.opening, at):
                return self._delimited(self.opening, at + len(self.opening))
            if self.opening.startswith(data[at:]):
                return self._hold(data, at)
            self.at_start = False
        found = data.find(self.delimiter, at)
        if found < 0:
            return self._hold(data, max(at, len(data) - len(self.delimiter) + 1))
        return self._delimited(self.opening, found + len(self.delimiter))

    def _part(self, data: bytes, at: int) -> int:
        search = at
        while True:
            found = data.find(self.delimiter, search)
            if found < 0:
                break
            end = found + len(self.delimiter)
            following = data[end : end + 2]
            if following[:1] in (b" ", b"\t") or following in _DELIMITER_ENDS:
                self.parser.write(data[at:end])
                return self._delimited(b"", end)
            search = end
        # A delimiter opens with CR, found nowhere else in it: the last CR
        # of the tail is the only place one split by the chunk can start.
        end = len(data)
        start = data.rfind(b"\r", max(search, end - len(self.delimiter) + 1))
        if start >= 0 and self.delimiter.startswith(data[start:]):
            self.held = data[start:]
            end = start
        self.parser.write(data[at:end])
        return len(data)

    def _delimited(self, through: bytes, at: int) -> int:
        if through:
            self.parser.write(through)
        self.state = _AFTER_DELIMITER
        self.padded = False
        return at

    def _after_delimiter(self, data: bytes, at: int) -> int:
        if not self.padded and data.startswith(b"-", at):
            # The close delimiter ends the body; its padding and the
            # epilogue after it are not passed on.
            if len(data) - at < 2:
                return self._hold(data, at)
            if data[at + 1 : at + 2] == b"-":
                self.parser.write(b"--")
                self.state = _EPILOGUE
                return len(data)
        end = _PADDING.match(data, at).end()  # type: ignore[union-attr]
        if end > at:
            self.padded = True
        if end == len(data):
            return end
        line_end = data[end : end + 2]
        if line_end == b"\r":
            return self._hold(data, end)
        if line_end == b"\r\n":
            # The part's headers follow, up to the blank line.
            self.state = _HEADERS
            return end
        if self.padded:
            # RFC 2046 5.1.1: the padding runs to the CRLF ending the line.
            raise MalformedMessage(
                "a boundary delimiter line holds more than linear white "
                "space after the boundary (RFC 2046 5.1.1)"
            )
        # No delimiter after all: python-multipart takes the line as data.
        self.state = _PART
        return end

    def _headers(self, data: bytes, at: int) -> int:
        # A line of the headers is never a delimiter, nor is the blank line
        # ending them (RFC 2046 5.1.1: a body part is headers, CRLF, then
        # its data): python-multipart reads them as such.
        found = data.find(b"\r\n\r\n", at)
        if found < 0:
            end = max(at, len(data) - 3)
            self.parser.write(data[at:end])
            return self._hold(data, end)
        self.parser.write(data[at : found + 4])
        self.state = _PART
        return found + 4


def add_stow_route(app: Flask, intake: Intake, path: str, spool: Path) -> None:
    """Serve STOW-RS Store Instances at ``path`` on ``app``.

    The Retrieve URLs of an answer are served by WADO-RS once the study is
    published (RAD TF-3 4.68), when it has been quiet for [imaging_source]
    publish_after seconds; until then they answer 404.
    """
    spool.mkdir(parents=True, exist_ok=True)

    def store(study_instance_uid: str | None = None) -> Response:
        # The actor's app answers SOAP Faults; a DICOMweb client gets a status.
        try:
            return _store(intake, spool, study_instance_uid)
        except Exception:
            logger.exception("STOW-RS request from %s failed", request.remote_addr)
            return _plain(INTERNAL_ERROR, "internal error of the origin server")

    app.add_url_rule(path, "stow_rs", store, methods=["POST"])
    app.add_url_rule(
        f"{path}/<study_instance_uid>", "stow_rs_study", store, methods=["POST"]
    )


def _store(intake: Intake, spool: Path, study_instance_uid: str | None) -> Response:
    """Answer one Store Instances request; DICOM PS3.18 10.5."""
    started = time.monotonic()
    if study_instance_uid is not None and not UID(study_instance_uid).is_valid:
        # No instance can be of a study so named; the path is the sender's
        # mistake, told before its body is read (DICOM PS3.18 10.5.1).
        logger.info(
            "STOW-RS request from %s refused: the study in its path is no UID",
            request.remote_addr,
        )
        return _plain(
            BAD_REQUEST,
            f"the study {escaped(study_instance_uid[:64])} in the path is not a "
            "UID: at most 64 digits and periods (DICOM PS3.5 9.1)",
        )
    media_type, options = parse_options_header(request.content_type or "")
    boundary = options.get(b"boundary")
    # RFC 2387 3.1: type names the parts' media type, whose type and subtype
    # are case-insensitive (RFC 2045 5.1), as the request's own are; it may
    # carry a transfer-syntax parameter of its own (DICOM PS3.18 8.7.3.5).
    part_type, part_options = parse_options_header(
        options.get(b"type", DICOM_MEDIA_TYPE.encode())
    )
    if media_type != b"multipart/related" or part_type != DICOM_MEDIA_TYPE.encode():
        # PS3.18 10.5.1.2: this node stores the application/dicom media type.
        return _plain(
            UNSUPPORTED_MEDIA_TYPE,
            'STOW-RS takes multipart/related; type="application/dicom"',
        )
    if not boundary:
        return _plain(BAD_REQUEST, "multipart/related without a boundary")
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity"):
        # RFC 9110 15.5.16, RFC 7694 3: a content coding this node does not
        # decode is refused before the body is read, naming what it takes.
        logger.info(
            "STOW-RS request from %s refused: Content-Encoding %s",
            request.remote_addr,
            quoted(coding),
        )
        response = _plain(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {quoted(coding)} is not taken; send the body "
            "without a content coding",
        )
        response.headers["Accept-Encoding"] = "identity"
        return response
    answer_type = _answer_media_type()
    if answer_type is None:
        # DICOM PS3.18 8.7.8.1: told before the body is read, so that
        # nothing is stored for an answer the sender would not take.
        return _plain(
            NOT_ACCEPTABLE,
            f"STOW-RS answers in {DICOM_JSON_TYPE} or {DICOM_XML_TYPE}; "
            "the Accept header takes neither",
        )
    # DICOM PS3.18 8.7.3.5.2: the transfer-syntax parameter of the multipart
    # media type, or of its type parameter, names the syntax of every part
    # whose own Content-Type names none.
    request_syntax = _declared_transfer_syntax(options) or _declared_transfer_syntax(
        part_options
    )

    # A body that is garbled or broke off is the sender's fault (400); a
    # spool that cannot be written is ours (500). Neither is a SOAP Fault.
    parts = _Parts(spool)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        body = _Delimiters(parser, boundary)
        with RequestBody() as stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                body.write(chunk)
        body.close()
        parser.finalize()
        if not parts.ended:
            raise MalformedMessage("no closing boundary (RFC 2046 5.1.1)")
    except RequestTooLarge as exc:
        parts.discard()
        logger.info("STOW-RS request from %s refused: %s", request.remote_addr, exc)
        return _plain(CONTENT_TOO_LARGE, exc.reason)
    except TooManyParts as exc:
        parts.discard()
        logger.info("STOW-RS request from %s refused: %s", request.remote_addr, exc)
        return _plain(CONTENT_TOO_LARGE, str(exc))
    except (FormParserError, MalformedMessage) as exc:
        parts.discard()
        logger.info("STOW-RS request from %s refused: %s", request.remote_addr, exc)
        return _plain(BAD_REQUEST, f"malformed multipart body: {exc}")
    except OSError:
        parts.discard()
        logger.exception("STOW-RS request from %s not spooled", request.remote_addr)
        return _plain(INTERNAL_ERROR, "the request could not be spooled")

    settings = intake.settings
    kept: list[Accepted] = []
    stored: list[dict] = []  # type: ignore[type-arg]
    failed: list[dict] = []  # type: ignore[type-arg]
    warnings: list[str] = []
    refusals: Counter[str] = Counter()
    # Each failed part, as its audit record names it.
    refused: list[Refused] = []
    try:
        for index, (path, part_media_type) in enumerate(parts.files, start=1):
            # Read first: intake consumes the file, even one it then refuses
            # (an instance naming another patient than its study's).
            sop_class_uid, sop_instance_uid = _uids_of(path)
            try:
                own_type, own_options = parse_options_header(part_media_type)
                if own_type != DICOM_MEDIA_TYPE.encode():
                    raise Refused(
                        "not_dicom", f"a part of type {escaped(part_media_type[:80])}"
                    )
                _check_transfer_syntax(
                    path, _declared_transfer_syntax(own_options) or request_syntax
                )
                accepted = intake.accept(
                    path, move=True, study_instance_uid=study_instance_uid
                )
                kept.append(accepted)
                stored.append(
                    _reference(
                        accepted.sop_class_uid,
                        accepted.sop_instance_uid,
                        # Its Referenced SOP Sequence item's Retrieve URL
                        # (DICOM PS3.18 Table 10.5.3-2).
                        retrieve_url=settings.dicomweb_resource(
                            accepted.study_instance_uid,
                            accepted.series_instance_uid,
                            accepted.sop_instance_uid,
                        ),
                    )
                )
            except Refused as exc:
                refusals[exc.reason] += 1
                refused.append(exc.detached())
                failed.append(
                    _reference(sop_class_uid, sop_instance_uid, exc.failure_reason)
                )
                warnings.append(
                    _warning(f"part {index}: {exc.failure_reason:04X} {exc.reason}")
                )
            except Exception:
                # An error of this node's own fails this part alone: a
                # Processing failure (DICOM PS3.4 Table B.2-1, 0110).
                logger.exception("STOW-RS part %d not stored", index)
                refused.append(Refused("storage", "not stored"))
                failed.append(
                    _reference(sop_class_uid, sop_instance_uid, PROCESSING_FAILURE)
                )
                warnings.append(
                    _warning(f"part {index}: {PROCESSING_FAILURE:04X} not stored")
                )
            finally:
                path.unlink(missing_ok=True)
    finally:
        # Whatever broke off the loop, no part stays in the spool.
        parts.discard()
        # Each reason once, with how many parts it turned away.
        for reason, count in refusals.items():
            logger.warning(
                "STOW-RS: %d %s refused: %s",
                count,
                "part" if count == 1 else "parts",
                reason,
            )

    if not parts.files:
        return _plain(BAD_REQUEST, "the request holds no part")

    # DICOM PS3.15 A.5.3.7: the records of what was kept are durable before
    # the answer says it was; without them nothing of the request stays.
    host = request.remote_addr or ""
    events = received_events(
        "STOW-RS",
        kept,
        refused,
        source=audit.Endpoint(host, host),
        destination=audit.Endpoint(
            dict(settings.imaging_endpoints())["stow-rs"], settings.node.advertised
        ),
    )
    if not intake.source.auditor.record_all(events):
        intake.take_back(kept)
        return _plain(
            INTERNAL_ERROR,
            "the audit record of this request could not be written; "
            "nothing of it is kept",
        )
    status = ALL_STORED if not failed else SOME_STORED if stored else NONE_STORED
    # Limitation: WADO-RS serves only published studies, so the Retrieve
    # URLs answer 404 until the study's manifest is registered, or for good
    # when auto-publishing is off or the study cannot be published.
    body: dict[str, dict] = {  # type: ignore[type-arg]
        RETRIEVE_URL: _study_url(settings, kept)
    }
    if stored:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    held = sum(1 for accepted in kept if accepted.duplicate)
    logger.info(
        "%s %s from %s: HTTP %d, %d stored, %d held already, %d failed, %.3f s",
        "STOW-RS",
        "Store Instances",
        request.remote_addr,
        status,
        len(stored) - held,
        held,
        len(failed),
        time.monotonic() - started,
    )
    if answer_type == DICOM_XML_TYPE:
        response = Response(
            native_dicom_model(body), status=status, mimetype=str(DICOM_XML_TYPE)
        )
    else:
        response = Response(json.dumps(body), status=status, mimetype=str(answer_type))
    # The body names every failed part; the headers tell of the first few
    # only, since HTTP clients and proxies take a bounded head.
    for warning in warnings[:MAX_WARNINGS]:
        response.headers.add("Warning", warning)
    if len(warnings) > MAX_WARNINGS:
        more = len(warnings) - MAX_WARNINGS
        response.headers.add("Warning", _warning(f"{more} more parts failed"))
    return response


def _answer_media_type() -> MediaType | None:
    """The media type of the Store Instances Response Module the request's
    Accept header takes, or None when it takes none this node sends.

    DICOM PS3.18 10.5.1 has the request name in Accept the media types it
    takes the answer in; the module is sent as DICOM JSON (DICOM PS3.18
    F.2) or as the Native DICOM Model of DICOM PS3.19 A.1 (XML), the one
    STOW-RS clients such as dcm4che's ask for. DICOM JSON goes when Accept
    is absent, names a wildcard, or weighs both alike; as application/json,
    of which DICOM JSON is a kind (RFC 6839 3.1), when Accept weighs that
    higher, as it does when it refuses application/dicom+json with q=0 but
    takes any other type. None of them taken is a 406 (DICOM PS3.18
    8.7.8.1); see xdsi.dicom.media_types.preferred.
    """
    return preferred(request.headers.get("Accept"), ANSWER_MEDIA_TYPES)


def _declared_transfer_syntax(options: dict[bytes, bytes]) -> str | None:
    """The Transfer Syntax UID a media type's transfer-syntax parameter
    names (DICOM PS3.18 8.7.3.5.2), or None when it names none.

    ``*`` is a value of an Accept header, where any syntax will do; in a
    Content-Type it names no syntax.
    """
    value = options.get(b"transfer-syntax", b"").decode("latin-1").strip()
    return value if value and value != "*" else None


def _check_transfer_syntax(path: Path, declared: str | None) -> None:
    """Refuse a part whose File Meta names another Transfer Syntax UID than
    its media type declares.

    DICOM PS3.18 8.7.3.5.2: the transfer-syntax parameter names the syntax
    the instance is in; an instance in another says the sender mixed up its
    parts or their types, and which of the two is right cannot be told.
    It fails with Error: Cannot understand (DICOM PS3.18 Table I.2-2,
    Cxxx), not Referenced Transfer Syntax not supported (C122): both
    syntaxes may well be ones this node stores. A part whose File Meta
    cannot be read is left to the intake, which refuses it.

    Raises
    ------
    Refused
        Naming both syntaxes.
    """
    if declared is None:
        return
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:
        return
    actual = str(meta.get("TransferSyntaxUID", "")).strip()
    if actual and actual != declared:
        raise Refused(
            "transfer_syntax_mismatch",
            f"the part's media type names transfer-syntax "
            f"{escaped(declared[:64])} but its File Meta names "
            f"{escaped(actual[:64])} (DICOM PS3.18 8.7.3.5.2)",
        )


def _uids_of(path: Path) -> tuple[str, str]:
    """The SOP Class and Instance UIDs a refused part names, where readable.

    DICOM PS3.18 10.5.3 wants them in each Failed SOP Sequence item; a part
    that is no DICOM data set, or whose UIDs are not valid (DICOM PS3.5
    9.1), leaves them empty, as does one too large to read (DICOM PS3.5 A.5).
    """
    if scan.inflated_size_problem(path) is not None:
        return "", ""
    try:
        ds = pydicom.dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
    except Exception:
        # Whatever broke the instance may break this read too.
        return "", ""
    sop_class_uid = UID(str(ds.get("SOPClassUID", "")))
    sop_instance_uid = UID(str(ds.get("SOPInstanceUID", "")))
    return (
        sop_class_uid if sop_class_uid.is_valid else "",
        sop_instance_uid if sop_instance_uid.is_valid else "",
    )


def _warning(text: str) -> str:
    """An HTTP Warning header value (RFC 7234 5.5) with warn-code 299.

    DICOM PS3.18 8.4 lets an origin server explain a status in the Warning
    header field; the Store Instances Response Module itself has no text
    attribute, only the Failure Reason code (DICOM PS3.18 10.5.3).
    """
    printable = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    escaped = printable[:MAX_WARNING].replace("\\", "\\\\").replace('"', '\\"')
    return f'299 {request.host}: "{escaped}"'


def _study_url(settings: Settings, kept: list[Accepted]) -> dict[str, object]:
    """The response's Retrieve URL: the WADO-RS study resource of the
    instances stored.

    DICOM PS3.18 Table 10.5.3-2 names one study; the attribute is Type 2, so
    it is sent empty when no instance was stored, and when those stored are
    of several studies (a request to ``{stow_path}`` names none).
    """
    element: dict[str, object] = {"vr": "UR"}
    studies = {accepted.study_instance_uid for accepted in kept}
    if len(studies) == 1:
        (study_instance_uid,) = studies
        element["Value"] = [settings.dicomweb_resource(study_instance_uid)]
    return element


def _reference(
    sop_class_uid: str,
    sop_instance_uid: str,
    failure_reason: int | None = None,
    *,
    retrieve_url: str | None = None,
) -> dict:  # type: ignore[type-arg]
    """One item of the Referenced or Failed SOP Sequence.

    A refused part whose UIDs could not be read has them empty; only a
    stored instance has a ``retrieve_url``.
    """
    item: dict[str, dict] = {  # type: ignore[type-arg]
        REFERENCED_SOP_CLASS_UID: {"vr": "UI"},
        REFERENCED_SOP_INSTANCE_UID: {"vr": "UI"},
    }
    if sop_class_uid:
        item[REFERENCED_SOP_CLASS_UID]["Value"] = [sop_class_uid]
    if sop_instance_uid:
        item[REFERENCED_SOP_INSTANCE_UID]["Value"] = [sop_instance_uid]
    if retrieve_url is not None:
        item[RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
    if failure_reason is not None:
        item[FAILURE_REASON] = {"vr": "US", "Value": [failure_reason]}
    return item


def _plain(status: int, message: str) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain")

"""WADO-URI, WADO-RS and QIDO-RS over the Imaging Document Source's studies.

Implements RAD TF-3 4.55 (WADO Retrieve: DICOM PS3.18 9 URI service,
``requestType=WADO``), RAD TF-3 4.107 (WADO-RS Retrieve: DICOM PS3.18 10.4
instances, metadata, frames, rendered and thumbnail resources) and RAD TF-3
4.129 (QIDO-RS Query: DICOM PS3.18 10.6) for the studies this source has
published with a manifest. Metadata and search results go as DICOM JSON
(DICOM PS3.18 F.2) or, when the Accept header weighs it higher, as
multipart/related of one Native DICOM Model document (DICOM PS3.19 A.1) per
instance or match (DICOM PS3.18 Table 10.4.4-1, 10.6.3.3).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import shutil
import string
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pydicom
from flask import Blueprint, Response, abort, request
from PIL import Image
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import RE_VALID_UID, UID, ExplicitVRLittleEndian
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    case,
    distinct,
    func,
    or_,
    select,
    tuple_,
)
from werkzeug.datastructures import MIMEAccept, MultiDict
from werkzeug.exceptions import HTTPException, NotAcceptable
from werkzeug.http import parse_accept_header

from xdsi import audit
from xdsi.actors.soap_endpoint import with_allow
from xdsi.dicom import frames, scan, transcode
from xdsi.dicom.media_types import (
    DICOM_JSON,
    DICOM_JSON_TYPE,
    DICOM_XML,
    JSON_TYPE,
    MULTIPART_XML_TYPE,
    MediaType,
    preferred,
)
from xdsi.dicom.native_xml import native_dicom_model
from xdsi.dicom.qido import (
    INSTANCE_ATTRIBUTES,
    MAX_INDEXED_LENGTH,
    SERIES_ATTRIBUTES,
    STUDY_ATTRIBUTES,
)
from xdsi.logs import escaped, warnings_muted
from xdsi.store.blobs import open_spool, spool_path
from xdsi.store.schema import QIDO_COLUMNS, imaging_instance, instance_published

if TYPE_CHECKING:
    from xdsi.actors.imaging_source import ImagingSource

logger = logging.getLogger(__name__)

DICOM = "application/dicom"
JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
# The Rendered Media Types of a single frame image this node renders in
# (DICOM PS3.18 Table 8.7.4-1: image/jpeg the default, image/png and
# image/gif required of a RESTful service), each with its Pillow format;
# the default first, as a tie of q values goes to the first.
RENDERED_FORMATS = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}
# The Rendered Media Types of DICOM PS3.18 Table 8.7.4-1, those this node
# does not make among them, and the DICOM Media Types of Instances and
# Metadata (8.7.3.1, 8.7.3.2): the two kinds DICOM PS3.18 8.7.5 forbids a
# request to accept at once (400). Bulk data types are of neither here, as
# some (image/jpeg) are Rendered Media Types too.
RENDERED_MEDIA_TYPES = frozenset(
    {
        *RENDERED_FORMATS,
        "image/jp2",
        "image/jph",
        "image/jxl",
        "video/mpeg",
        "video/mp4",
        "video/h265",
        "text/html",
        "text/plain",
        "text/xml",
        "text/rtf",
        "application/pdf",
    }
)
DICOM_MEDIA_TYPES = frozenset({DICOM, DICOM_JSON, DICOM_XML})
# The box a thumbnail fits in, aspect kept, when no viewport is asked for
# (DICOM PS3.18 10.4.1.1.4 leaves its size to the origin server).
THUMBNAIL_VIEWPORT = (128, 128)
CHUNK_SIZE = 1 << 20
# The length of base64 text above which a binary value at the top level of
# an instance is bulk data, left out of WADO-RS metadata: 4 KiB of text,
# 3 KiB of value.
BULK_DATA_THRESHOLD = 4096
# (7FE0,0010) Pixel Data, as DICOM JSON names it.
PIXEL_DATA = f"{scan.PIXEL_DATA:08X}"
# The value representations of bulk data (DICOM PS3.18 F.2.6).
BULK_DATA_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

LEVEL_ATTRIBUTES = {
    "study": STUDY_ATTRIBUTES,
    "series": STUDY_ATTRIBUTES + SERIES_ATTRIBUTES,
    "instance": STUDY_ATTRIBUTES + SERIES_ATTRIBUTES + INSTANCE_ATTRIBUTES,
}
# What a level answers with beyond its own attributes: the UIDs that place
# a series or instance found across studies (DICOM PS3.18 10.6.3.3).
ANSWER_ATTRIBUTES = {
    "study": STUDY_ATTRIBUTES,
    "series": SERIES_ATTRIBUTES + ("StudyInstanceUID",),
    "instance": INSTANCE_ATTRIBUTES + ("StudyInstanceUID", "SeriesInstanceUID"),
}
# Search parameters that ask for a kind of matching this service does not
# perform, each with the warning DICOM PS3.18 8.3.4.4 to 8.3.4.6 has an
# origin server give when it is "true": the search is made without it.
UNSUPPORTED_MATCHING = {
    "fuzzymatching": "The fuzzymatching parameter is not supported. Only literal "
    "matching has been performed.",
    "emptyvaluematching": "The emptyvaluematching parameter is not supported. "
    "Empty Value Matching has not been performed.",
    "multiplevaluematching": "The multiplevaluematching parameter is not "
    "supported. Multiple Value Matching has not been performed.",
}
QIDO_CONTROL = {"limit", "offset", "includefield", *UNSUPPORTED_MATCHING}
# Matches one QIDO-RS answer holds at most, whatever its limit: each is
# built in memory (some 10 KiB at the instance level) before the answer's
# first byte goes out.
MAX_ANSWERS = 5000
# Matching keys one query may give, each an SQL condition: a level has some
# thirty attributes, and a key repeated alike counts once.
MAX_FILTERS = 64
UID_VR = "UI"
# DICOM PS3.5 9.1: a UID has at most 64 characters.
MAX_UID = 64
DATE_VRS = ("DA", "DT", "TM")
# DICOM PS3.4 C.2.2.2.4: the VRs whose values match with "*" and "?".
WILDCARD_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT")
NUMBER_VRS = ("IS", "US", "UL", "SS", "SL")
# DICOM PS3.5 Table 6.2-1 values, alone or as a range (DICOM PS3.4
# C.2.2.2.5); DA as YYYYMMDD, TM as HH[MM[SS[.F{1,6}]]].
_DA = r"\d{4}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])"
_TM = r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?"
RANGE_SYNTAX = {
    "DA": re.compile(f"{_DA}|({_DA})?-({_DA})?"),
    "TM": re.compile(f"{_TM}|({_TM})?-({_TM})?"),
}


# A header read whole takes tens of kilobytes (a CT's some 75 KiB): the
# cache keeps the last few hundred (some 40 MB), for a viewer asking for a
# study's objects one by one, not a whole study's.
@lru_cache(maxsize=512)
def _header(path: Path) -> Dataset:
    """Read an instance's attributes without its pixel data (stored files
    never change, so the answer is kept); values over scan.DEFER_SIZE stay
    in the file (bulk data, see _bulk_element), so that a kept header is
    small whatever the instance holds."""
    with warnings_muted():
        return pydicom.dcmread(
            path, stop_before_pixels=True, defer_size=scan.DEFER_SIZE
        )


def _bulk_element(header: Dataset, tag: int) -> RawDataElement | None:
    """The element ``tag`` of ``header`` when its value is left in the file
    (longer than scan.DEFER_SIZE): where it starts and how long it is."""
    raw = header._dict.get(tag)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
        return raw
    return None


def dicomweb_blueprint(source: ImagingSource, spool_root: Path) -> Blueprint:
    """Build the WADO-URI, WADO-RS and QIDO-RS routes of ``source``."""
    cfg = source.settings.imaging_source
    base = cfg.dicomweb_path.rstrip("/")
    blueprint = Blueprint("dicomweb", __name__)
    open_spool(spool_root, "dicomweb")

    def published(
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[Row]:
        """The store rows of the published instances in scope; their
        headers are read one at a time by whoever needs them, so that a
        large study is never whole in memory."""
        _check_uids(study_uid, series_uid, sop_uid)
        query = select(imaging_instance).where(
            *_in_scope(study_uid, series_uid, sop_uid)
        )
        with source.engine.connect() as conn:
            return list(conn.execute(query).all())

    def header(row: Row) -> Dataset:
        return _header(source.blobs.path(row.blob))

    def audited(transaction: str, rows: list[Row], outcome: audit.Outcome) -> None:
        """Spool the audit records of a retrieval before anything is sent:
        DICOM Instances Transferred (DICOM PS3.15 A.5.3.7), one per patient
        whose instances go out, naming their studies (RAD TF-3 4.107.5,
        4.55.5), the Source the service they go out of. Without them
        nothing is sent: a 500."""
        host = request.remote_addr or ""
        settings = source.settings
        service = settings.dicomweb_url
        if transaction == "RAD-55":
            # The WADO-URI service, beside the DICOMweb root.
            root = settings.url("imaging_source").removesuffix(cfg.path)
            service = f"{root}{cfg.wado_path}"
        events = [
            audit.AuditEvent(
                transaction=transaction,
                actor="Imaging Document Source",
                outcome=outcome,
                source=audit.Endpoint(service, settings.node.advertised),
                destination=audit.Endpoint(host, host),
                patient_id=patient_id,
                study_instance_uids=studies,
            )
            for patient_id, studies in audit.studies_by_patient(rows).items()
        ]
        spooled_or_500(events)

    def spooled_or_500(events: list[audit.AuditEvent]) -> None:
        """Spool audit records before the answer they describe goes out;
        without them, nothing goes out (500)."""
        if not source.auditor.record_all(events):
            abort(
                500,
                "the audit record of this request could not be written; "
                "nothing is sent without it",
            )

    def retrieve_url(study_uid: str, series_uid: str | None = None) -> str:
        return source.settings.dicomweb_resource(study_uid, series_uid or None)

    # --- QIDO-RS ----------------------------------------------------------

    indexed = threading.Event()
    indexing = threading.Lock()

    def index_once() -> None:
        """Index the instances stored before their attributes were kept,
        once in this process, before the first query is answered."""
        if indexed.is_set():
            return
        with indexing:
            if not indexed.is_set():
                source.index_attributes()
                indexed.set()

    def qido(level: str, study_uid: str | None, series_uid: str | None) -> Response:
        """DICOM PS3.18 10.6: answer a search from the imaging_instance rows
        alone, each answer from the attributes kept of its first instance."""
        answer_type = _metadata_media_type("search results")
        _check_uids(study_uid, series_uid)
        filters = _filters(request.args.items(multi=True), level)
        _single_valued(request.args, ("limit", "offset", *UNSUPPORTED_MATCHING))
        offset = _whole(request.args.get("offset", "0"), "offset")
        limit = request.args.get("limit")
        asked = None if limit is None else _whole(limit, "limit")
        # DICOM PS3.18 8.3.4: without a limit, or with one above what this
        # origin server sends at once, the answer holds MAX_ANSWERS matches
        # and a Warning says there are more, which offset pages through.
        capped = asked is None or asked > MAX_ANSWERS
        most = MAX_ANSWERS if asked is None or asked > MAX_ANSWERS else asked
        index_once()

        # SQL narrows the rows to those that may match; each answer is then
        # matched as DICOM PS3.4 C.2.2.2 says, and paged once matched: the
        # matches before the offset are counted, not kept.
        answers: list[dict[str, object]] = []
        skipped = 0
        more = False
        scope = _in_scope(study_uid, series_uid)
        with source.engine.connect() as conn:
            answering = _answers(
                conn, level, scope, filters, retrieve_url, offset + most + 1
            )
            for answer in answering:
                if not _matches_all(answer, filters):
                    continue
                if skipped < offset:
                    skipped += 1
                elif len(answers) < most:
                    answers.append(answer)
                else:
                    more = True
                    break
        # RAD TF-3 4.129.5: a DICOM Query event (DICOM PS3.15 A.5.3.10), the
        # search of the Study Root model and its query string, spooled
        # before the answer goes out.
        host = request.remote_addr or ""
        event = audit.AuditEvent(
            transaction="RAD-129",
            actor="Imaging Document Source",
            outcome=audit.Outcome.SUCCESS,
            source=audit.Endpoint(host, host),
            destination=audit.Endpoint(
                source.settings.dicomweb_url, source.settings.node.advertised
            ),
            query_id=StudyRootQueryRetrieveInformationModelFind,
            query_request=request.query_string or b"",
        )
        spooled_or_500([event])
        logger.info(
            "%s %s from %s: %s level, %d matches",
            "RAD-129",
            "QIDO-RS Query",
            request.remote_addr,
            level,
            len(answers),
        )
        response = _documents_answer(iter(answers), answer_type)
        if more and capped:
            response.headers.add(
                "Warning",
                f"299 {source.settings.dicomweb_url}: There are additional "
                "results that can be requested",
            )
        for key, warning in UNSUPPORTED_MATCHING.items():
            if request.args.get(key) == "true":
                response.headers.add(
                    "Warning", f"299 {source.settings.dicomweb_url}: {warning}"
                )
        return response

    @blueprint.get(f"{base}/studies")
    def search_studies() -> Response:
        return qido("study", None, None)

    @blueprint.get(f"{base}/series")
    def search_all_series() -> Response:
        return qido("series", None, None)

    @blueprint.get(f"{base}/studies/<study_uid>/series")
    def search_series(study_uid: str) -> Response:
        return qido("series", study_uid, None)

    @blueprint.get(f"{base}/instances")
    def search_all_instances() -> Response:
        return qido("instance", None, None)

    @blueprint.get(f"{base}/studies/<study_uid>/instances")
    def search_study_instances(study_uid: str) -> Response:
        return qido("instance", study_uid, None)

    @blueprint.get(f"{base}/studies/<study_uid>/series/<series_uid>/instances")
    def search_instances(study_uid: str, series_uid: str) -> Response:
        return qido("instance", study_uid, series_uid)

    # --- WADO-RS ----------------------------------------------------------

    def wado_rs(
        study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> Response:
        held = published(study_uid, series_uid, sop_uid)
        if not held:
            abort(404, _not_published(study_uid, series_uid, sop_uid))
        syntaxes, multipart = _accepted_dicom(
            request.headers.get("Accept", ""), single_allowed=sop_uid is not None
        )
        spool = spool_path(spool_root, "wado-rs")
        spool.mkdir(mode=0o700)
        try:
            production = _produce_all(source, held, syntaxes, spool, "WADO-RS")
        except BaseException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        files = production.files
        # DICOM PS3.18 Table 10.4.3-1: 406 when no instance can be sent in
        # an Acceptable Media Type, 206 when some, not all, of them can.
        # Stored copies that cannot be read are this node's failure (500).
        if not files:
            shutil.rmtree(spool, ignore_errors=True)
            if production.unacceptable:
                held_in = sorted({row.transfer_syntax_uid for row in held})
                abort(
                    406,
                    "no instance asked for can be sent in a transfer syntax the "
                    f"request accepts; they are held in {', '.join(held_in[:3])}"
                    f"{', ...' if len(held_in) > 3 else ''}, which transfer-syntax=* "
                    "(or that syntax) in the Accept header takes as held"
                    + (
                        f"; the stored copies of {production.unreadable} "
                        "cannot be read here"
                        if production.unreadable
                        else ""
                    ),
                )
            abort(
                500,
                "the stored copies of the instances asked for cannot be read "
                "here; the node's operator is told in its log",
            )
        left_out = len(held) - len(files)
        status = 206 if left_out else 200
        try:
            audited(
                "RAD-107",
                production.rows,
                audit.Outcome.MINOR_FAILURE if left_out else audit.Outcome.SUCCESS,
            )
        except HTTPException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        logger.info(
            "%s %s from %s: %d, %d of %d instances",
            "RAD-107",
            "WADO-RS Retrieve",
            request.remote_addr,
            status,
            len(files),
            len(held),
        )
        headers: dict[str, str] = {}
        if left_out:
            # In the "299 <service>: text" form that DICOM PS3.18 gives its
            # warnings (e.g. 11.6.3.2); the user agent tells which instances
            # are missing by their SOP Instance UIDs.
            headers["Warning"] = (
                f"299 {source.settings.dicomweb_url}: {left_out} of {len(held)} "
                f"instances are left out: {production.left_out()}"
            )
        if not multipart:
            return _spooled(
                _file_chunks(_open_or_500(files[0][0])),
                spool,
                content_type=f"{DICOM}; transfer-syntax={files[0][1]}",
                status=status,
                headers=headers,
            )
        boundary = uuid.uuid4().hex
        return _spooled(
            _multipart(files, boundary),
            spool,
            content_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
            status=status,
            headers=headers,
        )

    @blueprint.get(f"{base}/studies/<study_uid>")
    def retrieve_study(study_uid: str) -> Response:
        return wado_rs(study_uid)

    @blueprint.get(f"{base}/studies/<study_uid>/series/<series_uid>")
    def retrieve_series(study_uid: str, series_uid: str) -> Response:
        return wado_rs(study_uid, series_uid)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>"
    )
    def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str) -> Response:
        return wado_rs(study_uid, series_uid, sop_uid)

    def metadata(
        study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> Response:
        held = published(study_uid, series_uid, sop_uid)
        if not held:
            abort(404, _not_published(study_uid, series_uid, sop_uid))
        answer_type = _metadata_media_type("metadata")

        def readable_documents() -> Iterator[dict[str, dict]]:
            for row in held:
                # A stored copy gone or cut short is left out, as WADO-RS
                # leaves it out, whatever header was read of it before.
                if not source.stored_copy_readable(row, "WADO-RS metadata"):
                    continue
                instance_url = (
                    f"{retrieve_url(row.study_instance_uid, row.series_instance_uid)}"
                    f"/instances/{row.sop_instance_uid}"
                )
                try:
                    yield _metadata_document(header(row), instance_url)
                except (OSError, InvalidDicomError) as exc:
                    logger.error(
                        "WADO-RS metadata: the stored copy of instance %s (%s) "
                        "cannot be read (%s); left out",
                        row.sop_instance_uid,
                        row.blob,
                        type(exc).__name__,
                    )

        # The first document is made before the answer's status is chosen:
        # when no stored copy can be read the answer is an error, not an
        # empty array. One that cannot be read later, once the status went
        # out, is left out, and the streamed array stays whole.
        audited("RAD-107", held, audit.Outcome.SUCCESS)
        found = readable_documents()
        first = next(found, None)
        if first is None:
            abort(
                500,
                "the stored copies of the instances asked for cannot be read "
                "here; the node's operator is told in its log",
            )

        return _documents_answer(itertools.chain([first], found), answer_type)

    @blueprint.get(f"{base}/studies/<study_uid>/metadata")
    def study_metadata(study_uid: str) -> Response:
        return metadata(study_uid)

    @blueprint.get(f"{base}/studies/<study_uid>/series/<series_uid>/metadata")
    def series_metadata(study_uid: str, series_uid: str) -> Response:
        return metadata(study_uid, series_uid)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/metadata"
    )
    def instance_metadata(study_uid: str, series_uid: str, sop_uid: str) -> Response:
        return metadata(study_uid, series_uid, sop_uid)

    # --- WADO-RS frames and rendered images ------------------------------

    def held_image(
        study_uid: str, series_uid: str, sop_uid: str, no_image: int = 404
    ) -> tuple[list[Row], Dataset]:
        """The store row and header of a published image; 404 when there is
        none, ``no_image`` when the instance is no image, 500 when its
        stored copy cannot be read."""
        held = published(study_uid, series_uid, sop_uid)
        if not held:
            abort(404, _not_published(study_uid, series_uid, sop_uid))
        if not source.stored_copy_readable(held[0], "WADO-RS"):
            abort(
                500,
                "the stored copy of the instance cannot be read here; the "
                "node's operator is told in its log",
            )
        try:
            image = header(held[0])
        except (OSError, InvalidDicomError):
            abort(500, "the stored copy of the instance cannot be read here")
        if "Rows" not in image:
            abort(
                no_image,
                f"instance {sop_uid} is no image; this node renders images "
                f"only ({', '.join(RENDERED_FORMATS)}), not text/html or "
                "text/plain (DICOM PS3.18 Table 8.7.4-1, 8.7.8.1)"
                if no_image == 406
                else f"instance {sop_uid} is no image: it has no frames",
            )
        return held, image

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>"
        "/frames/<frame_list>"
    )
    def retrieve_frames(
        study_uid: str, series_uid: str, sop_uid: str, frame_list: str
    ) -> Response:
        """DICOM PS3.18 10.4.1.1.4 (RAD TF-3 4.107): frames of an image, in
        the order listed, one part each, as held or decoded (8.7.3.5)."""
        return frames_answer(study_uid, series_uid, sop_uid, _frame_numbers(frame_list))

    def frames_answer(
        study_uid: str, series_uid: str, sop_uid: str, listed: list[int] | None
    ) -> Response:
        """The frames ``listed`` of an image (all of them for None), one
        part each, as the Accept header asks (see _frame_framing)."""
        held, image = held_image(study_uid, series_uid, sop_uid)
        count = frames.number_of_frames(image)
        # All frames are counted off, not listed: Number of Frames may run
        # to millions (a 1x1 frame a byte), which a list would hold at once.
        numbers: Sequence[int] = range(1, count + 1) if listed is None else listed
        _frames_within(listed, count, sop_uid)
        row = held[0]
        framing = _frame_framing(request.headers.get("Accept", ""), row)
        path = source.blobs.path(row.blob)

        def frame(number: int) -> bytes:
            return frames.read_frame(path, image, number - 1, framing)

        # The first frame is read before the status goes out: a frame that
        # cannot be decoded here is a 406 that says how to ask for it.
        try:
            first = frame(numbers[0])
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("WADO-RS frames of %s: %s", path.name, escaped(reason))
            if framing.native and row.transfer_syntax_uid in frames.MEDIA_TYPES:
                abort(
                    406,
                    "the frames cannot be decoded here; ask for them as held: "
                    f'multipart/related; type="'
                    f'{frames.MEDIA_TYPES[row.transfer_syntax_uid]}"; '
                    f"transfer-syntax={row.transfer_syntax_uid}",
                )
            abort(500, "the frames of the stored copy cannot be read here")
        audited("RAD-107", held, audit.Outcome.SUCCESS)
        logger.info(
            "%s %s from %s: %d frames, %s",
            "RAD-107",
            "WADO-RS Retrieve Frames",
            request.remote_addr,
            len(numbers),
            framing.content_type,
        )
        boundary = uuid.uuid4().hex
        location = f"{retrieve_url(study_uid, series_uid)}/instances/{sop_uid}/frames"

        def parts() -> Iterator[bytes]:
            for index, number in enumerate(numbers):
                if index == 0:
                    data = first
                else:
                    try:
                        data = frame(number)
                    except Exception as exc:
                        # Limitation: a frame that cannot be read once the
                        # answer's status went out ends the answer without
                        # its closing delimiter, which tells the user agent
                        # that it is cut short.
                        logger.error(
                            "WADO-RS frame %d of %s cannot be read (%s); the "
                            "answer is cut short",
                            number,
                            path.name,
                            type(exc).__name__,
                        )
                        return
                yield (
                    f"--{boundary}\r\nContent-Type: {framing.content_type}\r\n"
                    f"Content-Location: {location}/{number}\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode("ascii")
                yield data
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode("ascii")

        return Response(
            parts(),
            content_type=(
                f'multipart/related; type="{framing.media_type}"; '
                f"transfer-syntax={framing.transfer_syntax_uid}; boundary={boundary}"
            ),
        )

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>"
        "/bulkdata/<tag>"
    )
    def retrieve_bulkdata(
        study_uid: str, series_uid: str, sop_uid: str, tag: str
    ) -> Response:
        """DICOM PS3.18 10.4 and F.2.6: the bulk data a BulkDataURI of the
        instance's metadata names, multipart/related with one
        application/octet-stream part; for Pixel Data, a part a frame, as
        Retrieve Frames sends them."""
        tag = tag.upper()
        if not re.fullmatch(r"[0-9A-F]{8}", tag):
            abort(404, f"{escaped(tag[:20])!r} names no attribute")
        if tag == PIXEL_DATA:
            return frames_answer(study_uid, series_uid, sop_uid, None)
        held = published(study_uid, series_uid, sop_uid)
        if not held:
            abort(404, _not_published(study_uid, series_uid, sop_uid))
        if not source.stored_copy_readable(held[0], "WADO-RS bulk data"):
            abort(500, "the stored copy of the instance cannot be read here")
        try:
            held_header = header(held[0])
            deferred = _bulk_element(held_header, int(tag, 16))
            element = None if deferred else held_header.get(int(tag, 16))
        except (OSError, InvalidDicomError):
            abort(500, "the stored copy of the instance cannot be read here")
        if deferred is not None:
            if _vr_of(deferred) not in BULK_DATA_VRS:
                abort(404, f"instance {sop_uid} has no bulk data {tag}")
        elif element is None or element.VR not in BULK_DATA_VRS or not element.value:
            abort(404, f"instance {sop_uid} has no bulk data {tag}")
        if request.headers.get("Accept", "").strip():
            acceptable = [
                kind == "*/*"
                or kind == "multipart/*"
                or (
                    kind == "multipart/related"
                    and options.get("type", frames.OCTET_STREAM).lower()
                    in (frames.OCTET_STREAM, "application/*", "*/*")
                )
                for _, kind, options in _media_ranges(request.headers["Accept"])
            ]
            if not any(acceptable):
                abort(
                    406,
                    "bulk data is sent as multipart/related; "
                    f'type="{frames.OCTET_STREAM}" (DICOM PS3.18 8.7.3.5)',
                )
        # Limitation: the value goes as held; one of a big endian instance
        # (a retired syntax) is not swapped to little endian.
        if deferred is not None:
            # Streamed from the stored file, as long as it is there.
            stream = _open_or_500(source.blobs.path(held[0].blob))
            length = min(deferred.length, max(held[0].size - deferred.value_tell, 0))
            value: Iterator[bytes] = _file_range(stream, deferred.value_tell, length)
        else:
            data = bytes(element.value)
            length, value = len(data), iter((data,))
        audited("RAD-107", held, audit.Outcome.SUCCESS)
        logger.info(
            "%s %s from %s: %s, %d bytes",
            "RAD-107",
            "WADO-RS Retrieve Bulkdata",
            request.remote_addr,
            tag,
            length,
        )
        boundary = uuid.uuid4().hex

        def body() -> Iterator[bytes]:
            yield (
                f"--{boundary}\r\nContent-Type: {frames.OCTET_STREAM}\r\n"
                f"Content-Length: {length}\r\n\r\n"
            ).encode("ascii")
            yield from value
            yield f"\r\n--{boundary}--\r\n".encode("ascii")

        return Response(
            body(),
            content_type=(
                f'multipart/related; type="{frames.OCTET_STREAM}"; boundary={boundary}'
            ),
        )

    def rendered(
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
        frame_list: str | None,
    ) -> Response:
        """DICOM PS3.18 10.4.1.1.3 (RAD TF-3 4.107): an image rendered in
        the Acceptable Media Type of RENDERED_FORMATS (8.7.8.1), with the
        quality, window and viewport asked for (8.3.5.1); other parameters
        are ignored (8.3, see :func:`_rendered_options`).

        A Rendered Study or Series (Table 10.3-2, required of an origin
        server) is answered, as an instance is, in one Rendered Media Type,
        which holds one image: the first frame of the image its thumbnail
        shows (see :func:`representative`), at its own size. PS3.18 leaves
        which image stands for several to the origin server.

        A report or key object selection is of the Text Resource Category
        (DICOM PS3.18 8.7.2), whose Rendered Media Types (text/html, the
        default, and text/plain, Table 8.7.4-1) this node does not make:
        none of them is acceptable, a 406 (8.7.8.1 step 5); it has no
        frames to render (404).

        Limitation: a report or key object selection is not rendered as
        text/html or text/plain; a study or series is rendered as one of its
        images, not each of them.
        """
        _single_valued(request.args, ("accept",))
        media_type = _rendered_media_type(
            request.headers.get("Accept", ""),
            request.args.get("accept"),
            "a rendered image",
        )
        options = _rendered_options(request.args, media_type)
        listed = None
        if frame_list is not None:
            listed = _frame_numbers(frame_list)
            if len(listed) != 1:
                abort(400, "one frame is rendered at a time")
        held, _ = image_shown(
            study_uid, series_uid, sop_uid, listed, "a rendered study or series"
        )
        # Limitation: a multi-frame image rendered as an instance is its
        # first frame, not a multi-frame media type.
        number = 1 if listed is None else listed[0]
        return rendered_answer(held, number, options, "WADO-RS Retrieve Rendered")

    def image_shown(
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
        listed: list[int] | None,
        what: str,
    ) -> tuple[list[Row], int]:
        """The store row of the image a rendered or thumbnail resource
        shows, and how many frames it has: the instance named, or the one
        standing for the study or series (see :func:`representative`);
        404 when a frame ``listed`` is not in it.

        Frames a report does not have are not found, as Retrieve Frames has
        it (404); a report has no Rendered Media Type this node makes (406).
        """
        if series_uid is None or sop_uid is None:
            series_uid, sop_uid = representative(study_uid, series_uid, what)
        held, image = held_image(
            study_uid, series_uid, sop_uid, no_image=406 if listed is None else 404
        )
        count = frames.number_of_frames(image)
        _frames_within(listed, count, sop_uid)
        return held, count

    def rendered_answer(
        held: list[Row], number: int, rendering: Rendering, title: str
    ) -> Response:
        """Render frame ``number`` of the image ``held`` as ``rendering``
        asks, spool the audit record of its retrieval and answer with it:
        the one rendering path of the rendered and thumbnail resources,
        which decodes that frame alone (see :func:`_rendered`)."""
        row = held[0]
        try:
            image = _render(source.blobs.path(row.blob), number, rendering)
        except UndecodableImage as exc:
            # What WADO-RS sends without decoding: the instance as held
            # (DICOM PS3.18 10.4.1.1.1, 8.7.3.5.2).
            instance_url = (
                f"{retrieve_url(row.study_instance_uid, row.series_instance_uid)}"
                f"/instances/{row.sop_instance_uid}"
            )
            abort(
                406,
                f"{exc.description}; ask for the instance as held: GET "
                f"{instance_url} with Accept: {DICOM}; transfer-syntax=*",
            )
        audited("RAD-107", held, audit.Outcome.SUCCESS)
        logger.info(
            "%s %s from %s: %s",
            "RAD-107",
            title,
            request.remote_addr,
            rendering.media_type,
        )
        return Response(image, content_type=rendering.media_type)

    @blueprint.get(f"{base}/studies/<study_uid>/rendered")
    def rendered_study(study_uid: str) -> Response:
        return rendered(study_uid, None, None, None)

    @blueprint.get(f"{base}/studies/<study_uid>/series/<series_uid>/rendered")
    def rendered_series(study_uid: str, series_uid: str) -> Response:
        return rendered(study_uid, series_uid, None, None)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/rendered"
    )
    def rendered_instance(study_uid: str, series_uid: str, sop_uid: str) -> Response:
        return rendered(study_uid, series_uid, sop_uid, None)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>"
        "/frames/<frame_list>/rendered"
    )
    def rendered_frame(
        study_uid: str, series_uid: str, sop_uid: str, frame_list: str
    ) -> Response:
        return rendered(study_uid, series_uid, sop_uid, frame_list)

    # --- WADO-RS thumbnails -----------------------------------------------

    def thumbnail(
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        frame_list: str | None = None,
    ) -> Response:
        """DICOM PS3.18 10.4.1.1.4: one image that stands for a study,
        series, instance or frames, in the Acceptable Media Type of
        RENDERED_FORMATS (8.7.8.1), fit to the viewport asked for or else
        to THUMBNAIL_VIEWPORT (see :func:`_thumbnail_rendering`).

        The image shown, as DICOM PS3.18 10.4.5 has it described: of a
        study, that of its first series (by Series Number) holding an
        image; of a series, its middle image by Instance Number; of an
        instance, its middle frame; of frames, the middle one listed. No
        annotation is burnt in, so that the thumbnail adds no Patient
        Identifying Information; a study, series or instance without an
        image has no thumbnail this node can render (406).

        Limitation: text already burnt into the pixels of the image chosen
        (Burned In Annotation YES) shows in its thumbnail as in the image.
        """
        _single_valued(request.args, ("accept",))
        media_type = _rendered_media_type(
            request.headers.get("Accept", ""), request.args.get("accept"), "a thumbnail"
        )
        rendering = _thumbnail_rendering(request.args, media_type)
        listed = None if frame_list is None else _frame_numbers(frame_list)
        held, count = image_shown(study_uid, series_uid, sop_uid, listed, "a thumbnail")
        number = (count + 1) // 2 if listed is None else listed[(len(listed) - 1) // 2]
        return rendered_answer(held, number, rendering, "WADO-RS Retrieve Thumbnail")

    def representative(
        study_uid: str, series_uid: str | None, what: str
    ) -> tuple[str, str]:
        """The Series and SOP Instance UIDs of the image a study or series
        thumbnail (or rendering, ``what``) shows: the middle one, by
        Instance Number, of the images of the series, or of the study's
        first series (by Series Number) that holds one. 404 when nothing is
        published there; 406 when none of it is an image, a report or
        waveform having no Rendered Media Type among those this node makes
        (DICOM PS3.18 8.7.8.1).

        Whether an instance is an image, and its numbers, are read from
        the attributes kept for QIDO-RS, a batch of rows at a time; only
        the images of the first series so far are kept, so that memory
        follows the series shown, not the study.
        """
        _check_uids(study_uid, series_uid)
        index_once()
        column = imaging_instance.c
        query = (
            select(
                column.series_instance_uid, column.sop_instance_uid, column.attributes
            )
            .where(*_in_scope(study_uid, series_uid))
            .execution_options(yield_per=ANSWER_BATCH)
        )
        held = 0
        first: tuple[bool, int, str] | None = None
        images: list[tuple[tuple[bool, int, str], str]] = []
        with source.engine.connect() as conn:
            for row_series_uid, row_sop_uid, attributes in conn.execute(query):
                held += 1
                kept = json.loads(attributes or "{}")
                if not _integer(kept, "Rows"):
                    continue
                series = _numbered(_integer(kept, "SeriesNumber"), row_series_uid)
                if first is None or series < first:
                    first, images = series, []
                if series == first:
                    number = _integer(kept, "InstanceNumber")
                    images.append((_numbered(number, row_sop_uid), row_sop_uid))
        if not held:
            abort(404, _not_published(study_uid, series_uid))
        if first is None:
            named = f"series {series_uid}" if series_uid else f"study {study_uid}"
            abort(
                406,
                f"{named} holds no image; {what} is an image, rendered of "
                "one (DICOM PS3.18 8.7.8.1)",
            )
        images.sort()
        return first[2], images[(len(images) - 1) // 2][1]

    @blueprint.get(f"{base}/studies/<study_uid>/thumbnail")
    def study_thumbnail(study_uid: str) -> Response:
        return thumbnail(study_uid)

    @blueprint.get(f"{base}/studies/<study_uid>/series/<series_uid>/thumbnail")
    def series_thumbnail(study_uid: str, series_uid: str) -> Response:
        return thumbnail(study_uid, series_uid)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>/thumbnail"
    )
    def instance_thumbnail(study_uid: str, series_uid: str, sop_uid: str) -> Response:
        return thumbnail(study_uid, series_uid, sop_uid)

    @blueprint.get(
        f"{base}/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>"
        "/frames/<frame_list>/thumbnail"
    )
    def frames_thumbnail(
        study_uid: str, series_uid: str, sop_uid: str, frame_list: str
    ) -> Response:
        return thumbnail(study_uid, series_uid, sop_uid, frame_list)

    # --- WADO-URI ---------------------------------------------------------

    @blueprint.get(cfg.wado_path)
    def wado_uri() -> Response:
        """DICOM PS3.18 9.1: one object by its three UIDs, as it is held or
        in a transfer syntax, or rendered as a JPEG image.

        Limitation: the annotation parameter is not honoured; no patient or
        technique text is burnt into a rendered image.
        """
        args = request.args
        _single_valued(args, args.keys())
        if args.get("requestType") != "WADO":
            abort(400, "requestType must be WADO (DICOM PS3.18 9.1.2.1.1)")
        uids = [args.get(k, "").strip() for k in ("studyUID", "seriesUID", "objectUID")]
        if not all(uids):
            abort(400, "studyUID, seriesUID and objectUID are required")
        _check_uids(*uids, names=("studyUID", "seriesUID", "objectUID"))
        # DICOM PS3.18 WADO-URI, the anonymize parameter: this service does
        # not de-identify, so it refuses rather than send the object whole.
        if args.get("anonymize", "").strip().lower() == "yes":
            abort(400, "anonymize=yes is not supported: objects are sent as published")
        held = published(*uids)
        if not held:
            abort(404, _not_published(*uids))
        if not source.stored_copy_readable(held[0], "WADO-URI"):
            abort(
                500,
                "the stored copy of the object cannot be read here; the node's "
                "operator is told in its log",
            )
        wanted = [
            t.split(";")[0].strip() for t in args.get("contentType", "").split(",")
        ]
        content_type = next((t for t in wanted if t in (DICOM, JPEG)), None)
        # The header is read without Pixel Data; Rows marks an image.
        try:
            has_pixels = "Rows" in header(held[0])
        except (OSError, InvalidDicomError):
            abort(500, "the stored copy of the object cannot be read here")
        if content_type is None:
            # DICOM PS3.18 9.1.2.1.6: image/jpeg for an image, else the object.
            if args.get("contentType"):
                abort(
                    406,
                    f"contentType {args['contentType'][:80]!r}: this service "
                    f"sends {DICOM} or {JPEG} (DICOM PS3.18 9.1.2.1.6)",
                )
            content_type = JPEG if has_pixels else DICOM
        logger.info(
            "%s %s from %s: %s",
            "RAD-55",
            "WADO Retrieve",
            request.remote_addr,
            content_type,
        )
        if content_type == JPEG:
            frame = _whole(args.get("frameNumber", "1"), "frameNumber")
            try:
                rendered = _render(
                    source.blobs.path(held[0].blob), frame, _rendering(args)
                )
            except UndecodableImage as exc:
                # What WADO-URI sends without decoding: the object as held.
                abort(
                    406,
                    f"{exc.description}; ask for the object as held: "
                    f"contentType={DICOM}&transferSyntax="
                    f"{held[0].transfer_syntax_uid}",
                )
            audited("RAD-55", held[:1], audit.Outcome.SUCCESS)
            return Response(rendered, content_type=JPEG)
        presentation = sorted(set(args) & set(RENDERING_PARAMETERS))
        if presentation:
            abort(
                400,
                f"{', '.join(presentation)} apply to a rendered image only, not to "
                "application/dicom (DICOM PS3.18 WADO-URI)",
            )
        syntax = args.get("transferSyntax", ExplicitVRLittleEndian).strip()
        if len(syntax) > MAX_UID or not RE_VALID_UID.match(syntax):
            # DICOM PS3.18 9.4.2.4: a value that is no UID is a bad request;
            # a UID this node cannot produce, not acceptable (406).
            abort(400, f"transferSyntax {syntax[:MAX_UID]!r} is not a UID")
        spool = spool_path(spool_root, "wado-uri")
        spool.mkdir(mode=0o700)
        production = _produce_all(source, held, [syntax], spool, "WADO-URI")
        if not production.files:
            shutil.rmtree(spool, ignore_errors=True)
            if production.unreadable:
                abort(500, "the stored copy of the object cannot be read here")
            # Either way the object can be had as it is held; Explicit VR
            # Little Endian (no transferSyntax) is the other way only when it
            # was not what the request asked for already.
            as_held = f"transferSyntax={held[0].transfer_syntax_uid} as it is held"
            advice = (
                f"ask for {as_held}"
                if syntax == ExplicitVRLittleEndian
                else "leave transferSyntax out for Explicit VR Little Endian, "
                f"or ask for {as_held}"
            )
            abort(
                406,
                f"the object is held in transfer syntax "
                f"{held[0].transfer_syntax_uid} and cannot be sent in "
                f"{syntax}; {advice}",
            )
        try:
            audited("RAD-55", held[:1], audit.Outcome.SUCCESS)
        except HTTPException:
            shutil.rmtree(spool, ignore_errors=True)
            raise
        return _spooled(
            _file_chunks(_open_or_500(production.files[0][0])),
            spool,
            content_type=DICOM,
        )

    @blueprint.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # A DICOMweb user agent gets the HTTP status and why, never the
        # SOAP Fault that the actor's app answers with.
        return with_allow(
            Response(
                f"{exc.description}\n", status=exc.code or 500, mimetype="text/plain"
            ),
            exc,
        )

    return blueprint


# Digits a whole-number parameter may have, leading zeros aside: a paging
# offset or a frame number never needs more, and Python's int() refuses a
# string of more than 4300 digits with an error of its own.
MAX_DIGITS = 18


# The media types metadata and search results go in, DICOM JSON first: of
# those an Accept header weighs alike, the first goes (DICOM PS3.18 8.7.3.2,
# Table 10.4.4-1, 10.6.3.3).
METADATA_MEDIA_TYPES = (DICOM_JSON_TYPE, JSON_TYPE, MULTIPART_XML_TYPE)


def _metadata_media_type(what: str) -> MediaType:
    """The media type ``what`` goes in: DICOM JSON (DICOM PS3.18 F.2), as
    application/json when Accept weighs that higher (RFC 6839 3.1), or
    multipart/related of Native DICOM Model documents (DICOM PS3.19 A.1),
    the one Accept weighs highest (RFC 9110 12.5.1). An Accept that takes
    none of them is answered 406 before any work (DICOM PS3.18 8.7.8.1).

    A range whose q value is no qvalue (q=1.5) is left out, as
    xdsi.dicom.media_types.preferred says; application/dicom+xml alone
    names no multipart answer and takes none of them.
    """
    chosen = preferred(request.headers.get("Accept"), METADATA_MEDIA_TYPES)
    if chosen is None:
        abort(
            406,
            f"this service sends {what} as {DICOM_JSON} (or {JSON_TYPE}) or "
            f"as {MULTIPART_XML_TYPE}; the Accept header takes none of them",
        )
    return chosen


def _documents_answer(
    documents: Iterator[Mapping[str, object]], media_type: MediaType
) -> Response:
    """A 200 streaming DICOM JSON ``documents`` one at a time, as a JSON
    array or as a multipart/related body of one Native DICOM Model
    document per part (DICOM PS3.18 8.6.1.2, RFC 2387): no answer is whole
    in memory, however many instances it holds."""
    if media_type == MULTIPART_XML_TYPE:
        boundary = uuid.uuid4().hex
        return Response(
            _native_parts(documents, boundary),
            content_type=f"{media_type}; boundary={boundary}",
        )

    def array() -> Iterator[bytes]:
        separator = b"["
        for document in documents:
            yield separator + json.dumps(document).encode()
            separator = b","
        yield b"]" if separator == b"," else b"[]"

    return Response(array(), content_type=media_type.name)


def _native_parts(
    documents: Iterable[Mapping[str, object]], boundary: str
) -> Iterator[bytes]:
    """One application/dicom+xml part per DICOM JSON document (DICOM PS3.18
    8.6.1.2, PS3.19 A.1).

    Limitation: an answer of no document (a search matching nothing, DICOM
    PS3.18 10.6.3.3 status 200 with an empty list) is the close delimiter
    alone, where RFC 2046 5.1.1 wants one body part at least.
    """
    for document in documents:
        yield (
            f"--{boundary}\r\nContent-Type: {DICOM_XML}\r\n\r\n".encode("ascii")
            + native_dicom_model(document)
            + b"\r\n"
        )
    yield f"--{boundary}--\r\n".encode("ascii")


def _single_valued(args: MultiDict[str, str], names: Iterable[str]) -> None:
    """Refuse (400) a query parameter of ``names`` given twice with other
    values: DICOM PS3.18 gives each one value (9.1.2 for WADO-URI, 8.3.4 for
    limit, offset and the matching flags of QIDO-RS), and answering the
    first alone would answer another request than the one sent."""
    for name in names:
        values = set(args.getlist(name))
        if len(values) > 1:
            abort(
                400,
                f"{escaped(name)} is given {len(args.getlist(name))} times with "
                "different values; it takes one",
            )


def _check_uids(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    names: tuple[str, str, str] = ("study UID", "series UID", "SOP Instance UID"),
) -> None:
    """Refuse (400) a study, series or instance named by what is no UID
    (DICOM PS3.5 9.1), ``names`` saying how the request names each: every
    instance held here was taken in with valid UIDs, and a NUL among the
    characters cannot even be looked up in a PostgreSQL text column."""
    for name, uid in zip(names, (study_uid, series_uid, sop_uid), strict=True):
        if uid is not None and not UID(uid).is_valid:
            abort(
                400,
                f"{name} {uid[:MAX_UID]!r} is not a UID: at most {MAX_UID} "
                "digits and periods (DICOM PS3.5 9.1)",
            )


def _not_published(
    study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> str:
    """Why a DICOMweb resource is not found, so that a user agent can tell
    an unknown study from a mistyped path (RAD TF-3 4.107: only published
    studies are served)."""
    named = f"study {study_uid[:64]}"
    if series_uid:
        named += f", series {series_uid[:64]}"
    if sop_uid:
        named += f", instance {sop_uid[:64]}"
    return f"no published {named} is held here"


def _whole(value: str, name: str) -> int:
    # str.isdigit alone takes superscripts and other scripts' digits.
    if not (value.isascii() and value.isdigit()):
        abort(400, f"{name} must be a whole number")
    if len(value.lstrip("0")) > MAX_DIGITS:
        abort(400, f"{name} must be a whole number of at most {MAX_DIGITS} digits")
    return int(value)


def _keyword(key: str) -> str:
    """The keyword of an attribute named by keyword or by tag (8 hex digits)."""
    if len(key) == 8 and all(c in string.hexdigits for c in key):
        return keyword_for_tag(int(key, 16)) or key
    return key


def _filters(items: Iterable[tuple[str, str]], level: str) -> list[tuple[str, str]]:
    """The query's matching keys as keywords (DICOM PS3.18 8.3.4.1).

    A value that its VR does not allow, an includefield naming no attribute
    (DICOM PS3.18 8.3.4.3) or a fuzzymatching, emptyvaluematching or
    multiplevaluematching other than true or false (DICOM PS3.18 8.3.4.4
    to 8.3.4.6) is a 400.
    """
    filters = []
    for key, value in items:
        if key == "includefield":
            _check_includefield(value)
        elif key in UNSUPPORTED_MATCHING and value not in ("true", "false"):
            abort(
                400,
                f"{key}={escaped(value)}: DICOM PS3.18 8.3.4 wants true or false",
            )
        if key in QIDO_CONTROL:
            continue
        keyword = _keyword(key)
        if keyword not in LEVEL_ATTRIBUTES[level] or tag_for_keyword(keyword) is None:
            abort(400, f"{escaped(key)} is not a matching key of the {level} level")
        problem = _value_problem(dictionary_VR(keyword), value)
        if problem:
            abort(400, f"{key}={escaped(value)}: {problem}")
        if (keyword, value) not in filters:
            filters.append((keyword, value))
        if len(filters) > MAX_FILTERS:
            abort(400, f"more than {MAX_FILTERS} matching keys in one query")
    return filters


def _check_includefield(value: str) -> None:
    """Refuse an includefield that names no attribute; DICOM PS3.18 8.3.4.3."""
    # Limitation: named attributes are checked, but the answer holds the
    # level's attributes (DICOM PS3.18 Tables 10.6.3-3 to 10.6.3-5) only.
    for field in value.split(","):
        if field == "all":
            continue
        for step in field.split("."):
            # pydicom lists retired attributes of no keyword under "".
            if not step or tag_for_keyword(_keyword(step)) is None:
                abort(
                    400,
                    f"includefield={field}: {step or 'an empty name'} is no "
                    "attribute keyword or tag; DICOM PS3.18 8.3.4.3 wants all, "
                    "keywords or tags",
                )


# DICOM PS3.5 6.1.3: the control characters a character string may hold
# are TAB, LF, FF, CR and ESC; any other (NUL, the C1 codes) is in no VR.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


def _value_problem(vr: str, value: str) -> str | None:
    """Say why a matching value is not valid for its VR, or None.

    Dates and times take a single value or a range (DICOM PS3.4 C.2.2.2.5),
    UIDs a list (C.2.2.2.2), numbers a single value; an empty value is
    universal matching (C.2.2.2.3).
    """
    if value == "":
        return None
    if _CONTROL.search(value):
        return (
            "holds a control character other than TAB, LF, FF, CR and ESC; "
            "DICOM PS3.5 6.1.3"
        )
    if vr in RANGE_SYNTAX:
        if RANGE_SYNTAX[vr].fullmatch(value) and value != "-":
            return None
        return f"not a {vr} value or range; DICOM PS3.4 C.2.2.2.5"
    if vr == UID_VR:
        uids = [u.strip() for u in re.split(r"[,\\]", value)]
        if all(len(u) <= MAX_UID and RE_VALID_UID.match(u) for u in uids):
            return None
        return "not a list of UIDs; DICOM PS3.4 C.2.2.2.2"
    if vr in NUMBER_VRS and not re.fullmatch(r"[+-]?\d+", value):
        return f"not an integer ({vr}); DICOM PS3.5 6.2"
    return None


def wildcard_match(pattern: str, text: str) -> bool:
    """Match a DICOM wildcard: ``*`` any run, ``?`` one character, nothing
    else special (DICOM PS3.4 C.2.2.2.4).

    Greedy, going back only to the last ``*``: at most len(pattern) *
    len(text) steps. A regular expression of one ``.*`` per star backtracks
    exponentially in the stars on a value it does not match, and a query
    of ten stars held the node for minutes.
    """
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]) and pattern[p] != "*":
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif star >= 0:
            p, resume = star + 1, resume + 1
            t = resume
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _in_scope(
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> list[ColumnElement[bool]]:
    """The conditions on imaging_instance rows of the published instances,
    of the study, series and instance named."""
    conditions = [instance_published]
    for column, value in (
        (imaging_instance.c.study_instance_uid, study_uid),
        (imaging_instance.c.series_instance_uid, series_uid),
        (imaging_instance.c.sop_instance_uid, sop_uid),
    ):
        if value is not None:
            conditions.append(column == value)
    return conditions


# The imaging_instance column of each UID a query may match on.
UID_COLUMNS = {
    "StudyInstanceUID": imaging_instance.c.study_instance_uid,
    "SeriesInstanceUID": imaging_instance.c.series_instance_uid,
    "SOPInstanceUID": imaging_instance.c.sop_instance_uid,
    "SOPClassUID": imaging_instance.c.sop_class_uid,
}
# Studies or series whose answers are built from one query each.
ANSWER_BATCH = 500


def _answers(
    conn: Connection,
    level: str,
    scope: list[ColumnElement[bool]],
    filters: list[tuple[str, str]],
    retrieve_url: Callable[..., str],
    needed: int = ANSWER_BATCH,
) -> Iterator[dict[str, object]]:
    """The answers of a level whose instances may match ``filters``, each
    built from the row of its first instance (by SOP Instance UID) and the
    counts of its instances, in the order of their UIDs.

    ``needed`` is how many answers the caller may take: the studies or
    series are found in batches of that many, doubled each time up to
    ANSWER_BATCH, so that the first page of a large store builds few
    answers it will not send.

    An answer is left out only where an SQL condition proves it cannot
    match (:func:`_sql_condition`); the caller matches the rest.
    """
    conditions = [
        condition
        for keyword, value in filters
        if (condition := _sql_condition(keyword, value)) is not None
    ]
    column = imaging_instance.c
    order = (column.study_instance_uid, column.series_instance_uid)
    if level == "instance":
        query = select(imaging_instance).where(*scope, *conditions)
        # Fetched a batch at a time (a server-side cursor on PostgreSQL), so
        # that a search stopped at its limit never holds every row.
        query = query.order_by(*order, column.sop_instance_uid).execution_options(
            yield_per=ANSWER_BATCH
        )
        for row in conn.execute(query):
            yield _answer(row, level, retrieve_url)
        return

    # First a batch of the studies or series of which some instance may
    # match, found through the index of an attribute matched on, in the
    # order of their UIDs and after the last of the batch before (keyset
    # paging: a search of the whole store holds one batch of UIDs, not all
    # of them); then all instances of the batch, through the index of their
    # UIDs.
    keys = order[: 1 if level == "study" else 2]
    after: list[ColumnElement[bool]] = []
    size = max(1, min(needed, ANSWER_BATCH))
    while True:
        batch = conn.execute(
            select(*keys)
            .where(*scope, *conditions, *after)
            .distinct()
            .order_by(*keys)
            .limit(size)
        ).all()
        if not batch:
            return
        wanted = [
            key.in_(sorted({values[n] for values in batch}))
            for n, key in enumerate(keys)
        ]
        yield from _grouped(conn, level, [*scope, *wanted], retrieve_url)
        if len(batch) < size:
            return
        after = [tuple_(*keys) > tuple_(*batch[-1])]
        size = min(size * 2, ANSWER_BATCH)


def _grouped(
    conn: Connection,
    level: str,
    wanted: list[ColumnElement[bool]],
    retrieve_url: Callable[..., str],
) -> Iterator[dict[str, object]]:
    """The study or series answers of the instances ``wanted``."""
    column = imaging_instance.c
    keys = (column.study_instance_uid, column.series_instance_uid)[
        : 1 if level == "study" else 2
    ]
    # DICOM PS3.18 Tables 10.6.3-3 and 10.6.3-4: the counts are of every
    # instance of a study or series matched, not of those that matched.
    counts = (
        select(
            func.count().label("instances"),
            func.count(distinct(column.series_instance_uid)).label("series"),
            func.min(column.sop_instance_uid).label("first"),
        )
        .where(*wanted)
        .group_by(*keys)
        .subquery()
    )
    rows = conn.execute(
        select(imaging_instance, counts.c.instances, counts.c.series)
        .join(counts, column.sop_instance_uid == counts.c.first)
        .order_by(column.study_instance_uid, column.series_instance_uid)
    ).all()
    modalities = _modalities(conn, wanted) if level == "study" else {}
    for row in rows:
        yield _answer(row, level, retrieve_url, modalities.get(row.study_instance_uid))


def _modalities(
    conn: Connection, wanted: list[ColumnElement[bool]]
) -> dict[str, list[str]]:
    """The Modalities in Study of each study of the instances ``wanted``:
    the Modality values of its instances, sorted (DICOM PS3.18 Table
    10.6.3-3)."""
    modality = imaging_instance.c.modality
    query = (
        select(
            imaging_instance.c.study_instance_uid,
            modality,
            # A Modality no column keeps is read from the attributes.
            case((modality.is_(None), imaging_instance.c.attributes)),
        )
        .where(*wanted)
        .distinct()
    )
    found: dict[str, set[str]] = {}
    for study_uid, value, attributes in conn.execute(query):
        values = {value} if value is not None else set()
        if attributes is not None:
            element = json.loads(attributes).get(_tag("Modality"), {})
            values = {str(v) for v in element.get("Value", [])}
        found.setdefault(study_uid, set()).update(values - {""})
    return {study_uid: sorted(values) for study_uid, values in found.items()}


# Greater, by code point, than any suffix an indexed value may have.
AFTER_ANY_SUFFIX = chr(0x10FFFF) * (MAX_INDEXED_LENGTH + 1)


def _sql_condition(keyword: str, wanted: str) -> ColumnElement[bool] | None:
    """An SQL condition that every instance whose attribute matches
    ``wanted`` as :func:`_matches` does meets; None when no column holds
    the attribute.

    Where a column holds NULL (no single value short enough to index) the
    condition lets the row through; a wildcard is a LIKE, which SQLite
    takes without regard to case; both only widen what the caller then
    matches exactly.
    """
    if wanted == "" or set(wanted) == {"*"}:
        return None
    if keyword in UID_COLUMNS:
        listed = {u.strip() for u in wanted.replace("\\", ",").split(",")}
        return UID_COLUMNS[keyword].in_(sorted(listed))
    if keyword == "ModalitiesInStudy":
        modality = _sql_condition("Modality", wanted)
        assert modality is not None
        return imaging_instance.c.study_instance_uid.in_(
            select(imaging_instance.c.study_instance_uid).where(modality)
        )
    if keyword not in QIDO_COLUMNS:
        return None
    column = imaging_instance.c[QIDO_COLUMNS[keyword]]
    vr = dictionary_VR(keyword)
    if vr == "PN":
        # Kept case-folded, as _matches compares names.
        wanted = wanted.casefold()
    if vr in DATE_VRS and "-" in wanted:
        low, _, high = wanted.partition("-")
        bounds = []
        if low:
            # A TM compares as a time: 101500 is not before 101500.0 (DICOM
            # PS3.4 C.2.2.2.5); the hour alone bounds it in SQL.
            bounds.append(column >= (low[:2] if vr == "TM" else low))
        if high:
            # The first bound lets the column's index find the rows; the
            # second is the comparison _matches makes.
            bounds.append(column <= high + AFTER_ANY_SUFFIX)
            bounds.append(func.substr(column, 1, len(high)) <= high)
        condition = and_(*bounds)
    elif vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        condition = column.like(_like_pattern(wanted), escape="\\")
    else:
        condition = column == wanted
    return or_(condition, column.is_(None))


def _like_pattern(wanted: str) -> str:
    """A DICOM wildcard (DICOM PS3.4 C.2.2.2.4) as an SQL LIKE pattern
    escaped with a backslash."""
    escaped = "".join("\\" + c if c in "\\%_" else c for c in wanted)
    return escaped.replace("*", "%").replace("?", "_")


@cache
def _tag(keyword: str) -> str:
    """An attribute's tag as DICOM JSON names it (DICOM PS3.18 F.2.1.1)."""
    return f"{tag_for_keyword(keyword):08X}"


def _element(vr: str, values: list[object]) -> dict[str, object]:
    """A DICOM JSON element; an empty one has no Value (DICOM PS3.18 F.2.5)."""
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _answer(
    row: Row,
    level: str,
    retrieve_url: Callable[..., str],
    modalities: list[str] | None = None,
) -> dict[str, object]:
    """One QIDO-RS answer as DICOM JSON: the level's attributes kept of its
    first instance (``row``), with the counts of its instances."""
    kept = json.loads(row.attributes or "{}")
    answer = {
        tag: kept[tag] for tag in map(_tag, LEVEL_ATTRIBUTES[level]) if tag in kept
    }
    for keyword, column in UID_COLUMNS.items():
        if keyword in LEVEL_ATTRIBUTES[level] and _tag(keyword) not in answer:
            # An instance whose header could not be read keeps its UIDs.
            answer[_tag(keyword)] = _element(UID_VR, [getattr(row, column.name)])
    if level == "study":
        answer[_tag("ModalitiesInStudy")] = _element("CS", list(modalities or []))
        answer[_tag("NumberOfStudyRelatedSeries")] = _element("IS", [row.series])
        answer[_tag("NumberOfStudyRelatedInstances")] = _element("IS", [row.instances])
        url = retrieve_url(row.study_instance_uid)
    elif level == "series":
        answer[_tag("NumberOfSeriesRelatedInstances")] = _element("IS", [row.instances])
        url = retrieve_url(row.study_instance_uid, row.series_instance_uid)
    else:
        url = (
            retrieve_url(row.study_instance_uid, row.series_instance_uid)
            + f"/instances/{row.sop_instance_uid}"
        )
    answer[_tag("RetrieveURL")] = _element("UR", [url])
    return dict(sorted(answer.items()))


def _matches_all(answer: Mapping[str, object], filters: list[tuple[str, str]]) -> bool:
    """Whether an answer (DICOM JSON) matches every filter (:func:`_matches`)."""
    if not filters:
        return True
    tags = {_tag(keyword) for keyword, _ in filters}
    matched = Dataset.from_json({tag: answer[tag] for tag in tags if tag in answer})
    return all(_matches(matched, keyword, value) for keyword, value in filters)


def _matches(answer: Dataset, keyword: str, wanted: str) -> bool:
    """Match one attribute as DICOM PS3.4 C.2.2.2 does: UID lists, ranges,
    wildcards and single values; an empty value matches everything."""
    if wanted == "" or set(wanted) == {"*"}:
        # DICOM PS3.4 C.2.2.2.4: "*" alone is universal matching.
        return True
    value = answer.get(keyword)
    if value is None or value == "":
        return False
    values = (
        [str(v) for v in value]
        if isinstance(value, pydicom.multival.MultiValue)
        else [str(value)]
    )
    vr = dictionary_VR(keyword)
    if vr == UID_VR:
        listed = {u.strip() for u in wanted.replace("\\", ",").split(",")}
        return any(v in listed for v in values)
    if vr in DATE_VRS and "-" in wanted:
        low, _, high = wanted.partition("-")
        if vr == "TM":
            return any(
                (not low or _time_key(v, "0") >= _time_key(low, "0"))
                and (not high or _time_key(v, "0") <= _time_key(high, "9"))
                for v in values
            )
        return any(
            (not low or v >= low) and (not high or v[: len(high)] <= high)
            for v in values
        )
    if vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        fold = str.casefold if vr == "PN" else str
        return any(wildcard_match(fold(wanted), fold(v)) for v in values)
    if vr == "PN":
        return any(v.casefold() == wanted.casefold() for v in values)
    return wanted in values


def _time_key(value: str, fill: str) -> str:
    """A TM value (DICOM PS3.5 Table 6.2-1, HH[MM[SS[.F{1,6}]]]) as 12
    digits that compare as times: the components it leaves out are the
    earliest (``fill`` "0") or the latest ("9": minutes and seconds 59,
    fraction 999999) they can be."""
    whole, _, fraction = value.strip().partition(".")
    whole = "".join(c for c in whole if c.isdigit())
    latest = "235959"
    if fill == "0":
        whole = whole.ljust(6, "0")
    else:
        whole = whole + latest[len(whole) :]
    return whole[:6] + fraction[:6].ljust(6, fill)


def _media_ranges(accept: str) -> Iterator[tuple[float, str, dict[str, str]]]:
    """The media ranges of an Accept header (RFC 9110 12.5.1), in their
    order: each one's q value, media type (lower case) and parameters (names
    lower case, values unquoted); those of q 0, not acceptable, left out, and
    those whose q is no qvalue, no number from 0 to 1 (RFC 9110 12.4.2),
    malformed, left out too, as xdsi.dicom.media_types.preferred leaves
    them out."""
    for media_range in accept.split(","):
        kind, *params = [p.strip() for p in media_range.split(";")]
        options = {}
        for param in params:
            name, _, value = param.partition("=")
            options[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(options.get("q", "1"))
        except ValueError:
            continue
        if 0 < quality <= 1:
            yield quality, kind.lower(), options


def _accepted_dicom(accept: str, single_allowed: bool) -> tuple[list[str], bool]:
    """Return the transfer syntaxes acceptable, best first, and whether to
    answer multipart, from the Accept header.

    DICOM PS3.18 8.7.3 and RFC 9110 12.5.1: media ranges in order of their
    q value (0 is not acceptable), media types case-insensitive, ``*/*``,
    ``multipart/*`` and ``application/*`` as wildcards; each range names a
    transfer syntax, Explicit VR Little Endian when none is given (``*``:
    as stored). The framing (one part or multipart) is that of the best
    range; each instance is then sent in the first syntax of the ranges of
    that framing it can be produced in.
    """
    if not accept.strip():
        return [ExplicitVRLittleEndian], True
    ranges: list[tuple[float, bool, str]] = []
    for quality, kind, options in _media_ranges(accept):
        syntax = options.get("transfer-syntax", ExplicitVRLittleEndian)
        if kind in ("*/*", "multipart/*") or (
            kind == "multipart/related"
            and options.get("type", DICOM).lower() in (DICOM, "application/*")
        ):
            ranges.append((quality, True, syntax))
        elif kind in (DICOM, "application/*") and single_allowed:
            ranges.append((quality, False, syntax))
    if not ranges:
        abort(
            406,
            "the Accept header names no media type this resource is sent in: "
            + (
                f'{DICOM} or multipart/related; type="{DICOM}"'
                if single_allowed
                else f'multipart/related; type="{DICOM}"'
            )
            + " (DICOM PS3.18 8.7.3)",
        )
    ranges.sort(key=lambda r: -r[0])  # stable: equal q keep their order
    multipart = ranges[0][1]
    return [syntax for _, framing, syntax in ranges if framing == multipart], multipart


def _frame_numbers(frame_list: str) -> list[int]:
    """The frame numbers of a frame list (DICOM PS3.18 10.4.1.1.4): one or
    more, comma separated, each from 1, none twice; else a 400."""
    numbers: list[int] = []
    seen: set[int] = set()
    for item in frame_list.split(","):
        item = item.strip()
        if not item.isascii() or not item.isdigit() or len(item) > MAX_DIGITS:
            abort(400, f"frame list {escaped(frame_list[:80])!r}: not frame numbers")
        number = int(item)
        if number < 1:
            abort(400, "frame numbers start at 1")
        if number in seen:
            abort(400, f"frame {number} is listed twice")
        seen.add(number)
        numbers.append(number)
    return numbers


def _frame_framing(accept: str, row: Row) -> frames.Framing:
    """How the frames of the instance of ``row`` go out, from the Accept
    header (DICOM PS3.18 8.7.3.5): the first acceptable media range, by q
    value, that this node can answer.

    - none, ``*/*``, ``multipart/*`` or ``type="application/octet-stream"``
      (the default type): the frames decoded, in Explicit VR Little
      Endian's cells; with ``transfer-syntax=*`` they go as held instead,
      when held encapsulated;
    - ``type="*/*"`` or ``type="image/*"``: as held;
    - an image media type (``image/jls``, ``image/jp2``...): as held, when
      held in a syntax of that type (and of the transfer-syntax named).
    The answer is multipart/related. No acceptable range is a 406.
    """
    held = row.transfer_syntax_uid
    encapsulated = held in frames.MEDIA_TYPES
    if not accept.strip():
        return frames.decoded()
    ranges: list[tuple[float, str, str | None]] = []
    for quality, kind, options in _media_ranges(accept):
        syntax = options.get("transfer-syntax")
        if kind in ("*/*", "multipart/*"):
            # What HTTP libraries send when told nothing: the default.
            ranges.append((quality, frames.OCTET_STREAM, syntax))
        elif kind == "multipart/related":
            inner = options.get("type", frames.OCTET_STREAM).lower()
            ranges.append((quality, frames.ALIASES.get(inner, inner), syntax))
    ranges.sort(key=lambda r: -r[0])  # stable: equal q keep their order
    for _, media_type, syntax in ranges:
        if media_type == frames.OCTET_STREAM:
            if syntax in (None, ExplicitVRLittleEndian) or (
                syntax == "*" and not encapsulated
            ):
                return frames.decoded()
            if syntax in ("*", held) and encapsulated:
                return frames.Framing(False, frames.OCTET_STREAM, held)
        elif media_type in ("*/*", "image/*"):
            if syntax in (None, "*", held) and encapsulated:
                return frames.as_held(held)
            if media_type == "*/*" and (
                syntax == ExplicitVRLittleEndian or not encapsulated
            ):
                return frames.decoded()
        elif encapsulated and media_type == frames.MEDIA_TYPES[held]:
            if syntax in (None, "*", held):
                return frames.as_held(held)
    sendable = f'multipart/related; type="{frames.OCTET_STREAM}"'
    if encapsulated:
        sendable += (
            f' or multipart/related; type="{frames.MEDIA_TYPES[held]}"; '
            f"transfer-syntax={held}"
        )
    abort(
        406,
        "the Accept header names no media type the frames of this instance are "
        f"sent in: {sendable} (DICOM PS3.18 8.7.3.5)",
    )


# WADO-RS rendering parameters (DICOM PS3.18 8.3.5.1) and the WADO-URI ones
# they are read as.
def _rendered_options(args: MultiDict[str, str], media_type: str) -> Rendering:
    """The rendering a WADO-RS rendered resource is asked for, in
    ``media_type``: quality (of image/jpeg alone, the one lossy Rendered
    Media Type sent here; DICOM PS3.18 8.3.5.1.2), window (center,width
    [,function], the function one of VOI_LUT_FUNCTIONS, LINEAR when not
    given; 8.3.5.1.4) and viewport (vw,vh, the largest size, aspect kept);
    a malformed one is a 400 (8.3).

    Any other parameter is ignored, as DICOM PS3.18 8.3 has an origin
    server ignore those it does not support: the image is the one asked for
    without it.

    Limitation: annotation and iccprofile (DICOM PS3.18 8.3.5.1.1, 8.3.5.1.5)
    are among those ignored: no text is burnt in and no ICC profile is
    embedded.
    """
    _single_valued(args, ("quality", "window", "viewport"))
    wado: dict[str, str] = {}
    function = LINEAR
    if "quality" in args and media_type == JPEG:
        wado["imageQuality"] = args["quality"]
    if "window" in args:
        values = args["window"].split(",")
        if len(values) not in (2, 3):
            abort(400, "window must be center,width[,function]")
        if len(values) == 3 and values[2].strip():
            function = values[2].strip().upper()
        if function not in VOI_LUT_FUNCTIONS:
            abort(
                400,
                f"window function {escaped(values[2][:40])!r}: DICOM PS3.18 "
                f"8.3.5.1.4 wants one of {', '.join(VOI_LUT_FUNCTIONS)}",
            )
        wado["windowCenter"], wado["windowWidth"] = values[0], values[1]
    if "viewport" in args:
        values = args["viewport"].split(",")
        if len(values) != 2:
            abort(400, "viewport must be vw,vh (no source rectangle here)")
        wado["columns"], wado["rows"] = values[0], values[1]
    return dataclasses.replace(_rendering(wado, function), media_type=media_type)


def _rendered_media_type(accept: str, accept_parameter: str | None, what: str) -> str:
    """The Rendered Media Type ``what`` (a rendered image, a thumbnail) goes
    in (DICOM PS3.18 8.7.8.1): of RENDERED_FORMATS, the one of highest q
    value in the accept query parameter (8.3.3.1), else in the Accept header
    (RFC 9110 12.5.1, the most specific range giving each its q value), a
    tie going to the first of them, the default image/jpeg; a 406 when
    neither takes any. Acceptable Media Types that hold DICOM and Rendered
    Media Types both are a 400 (8.7.5, see :func:`_one_kind_accepted`).

    More lenient than DICOM PS3.18 8.7.5 in two ways: a request without an
    Accept header gets the default, as RFC 9110 12.5.1 has it, rather than
    a 406; and the accept query parameter is honoured whether or not the
    Accept header also takes what it names (8.3.3.1 wants it to). The
    default is of a request that names no Acceptable Media Types at all:
    an accept query parameter taking none of RENDERED_FORMATS (q=0 for
    each, say), with no Accept header, is a 406, not image/jpeg.
    """
    given = [g for g in (accept_parameter, accept) if g is not None and g.strip()]
    _one_kind_accepted(given)
    for acceptable in given:
        chosen = parse_accept_header(acceptable, MIMEAccept).best_match(
            list(RENDERED_FORMATS)
        )
        if chosen is not None:
            return chosen
    if not given:
        return JPEG
    abort(
        406,
        f"{what} is sent as {', '.join(RENDERED_FORMATS)}; the Accept header "
        f"{'and accept parameter take' if accept_parameter else 'takes'} none of "
        "them (DICOM PS3.18 8.7.8.1)",
    )


def _one_kind_accepted(given: Iterable[str]) -> None:
    """Refuse (400) Acceptable Media Types, of the accept query parameter
    and Accept header ``given``, that hold a DICOM Media Type and a Rendered
    Media Type both: DICOM PS3.18 8.7.5 wants one kind or the other (and
    8.3.3.1 the same of the accept query parameter). Wildcards, and the
    types of neither kind (bulk data), are of no account here."""
    dicom = rendered = None
    for acceptable in given:
        for _, kind, options in _media_ranges(acceptable):
            inner = options.get("type", "").lower()
            if kind == "multipart/related" and inner in DICOM_MEDIA_TYPES:
                dicom = dicom or inner
            elif kind in DICOM_MEDIA_TYPES:
                dicom = dicom or kind
            elif kind in RENDERED_MEDIA_TYPES:
                rendered = rendered or kind
    if dicom and rendered:
        abort(
            400,
            f"the request accepts a DICOM Media Type ({dicom}) and a Rendered "
            f"Media Type ({rendered}) both; DICOM PS3.18 8.7.5 wants one kind "
            "or the other",
        )


def _thumbnail_rendering(args: MultiDict[str, str], media_type: str) -> Rendering:
    """The rendering of a thumbnail: fit, aspect kept, to the viewport
    asked for or else to THUMBNAIL_VIEWPORT (DICOM PS3.18 8.3.5.1.3).

    A thumbnail's viewport is vw,vh alone, each a positive integer, here at
    most MAX_RENDERED_SIZE; anything else is a 400. The other rendering
    parameters are of rendered resources only (DICOM PS3.18 Table
    10.4.1-5) and, as any a resource does not support, ignored (8.3).
    """
    _single_valued(args, ("viewport",))
    columns, rows = THUMBNAIL_VIEWPORT
    if "viewport" in args:
        values = args["viewport"].split(",")
        if len(values) != 2:
            abort(
                400,
                "the viewport of a thumbnail is vw,vh, its width and height, "
                "with no source region (DICOM PS3.18 8.3.5.1.3)",
            )
        columns, rows = (_whole(value, "viewport") for value in values)
        if not (1 <= columns <= MAX_RENDERED_SIZE and 1 <= rows <= MAX_RENDERED_SIZE):
            abort(400, f"viewport sides must be from 1 to {MAX_RENDERED_SIZE}")
    return Rendering(rows=rows, columns=columns, media_type=media_type)


def _integer(kept: Mapping[str, dict], keyword: str) -> int | None:
    """The first value of an integer attribute in DICOM JSON (``kept``);
    None when it is absent, empty or no integer."""
    values = kept.get(_tag(keyword), {}).get("Value") or [None]
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return None


def _numbered(number: int | None, uid: str) -> tuple[bool, int, str]:
    """A key that orders series or instances by number, those without one
    last, then by UID."""
    return (number is None, number or 0, uid)


@dataclass
class _Production:
    """What of the instances asked for can be sent, and why the others not."""

    files: list[tuple[Path, str]]
    # The store rows of the instances in ``files``, in the same order.
    rows: list[Row] = dataclasses.field(default_factory=list)
    # Held, but the stored copy is missing or not of its recorded size.
    unreadable: int = 0
    # In no transfer syntax the request accepts.
    unacceptable: int = 0

    def left_out(self) -> str:
        """Why instances are left out, for a Warning or an error's text."""
        reasons = []
        if self.unacceptable:
            reasons.append(
                f"{self.unacceptable} cannot be sent in a transfer syntax the "
                "request accepts"
            )
        if self.unreadable:
            reasons.append(
                f"the stored copies of {self.unreadable} cannot be read here"
            )
        return "; ".join(reasons)


def _frames_within(listed: Sequence[int] | None, count: int, sop_uid: str) -> None:
    """Abort 404 when a frame ``listed`` is past the ``count`` frames of
    instance ``sop_uid`` (DICOM PS3.18 8.3.3.1: frame numbers start at 1)."""
    beyond = [n for n in listed or () if n > count]
    if beyond:
        abort(
            404,
            f"frame {beyond[0]} is not in instance {sop_uid}, which has "
            f"{count} frame{'s' if count > 1 else ''}",
        )


def _produce_all(
    source: ImagingSource,
    held: list[Row],
    syntaxes: list[str],
    spool: Path,
    service: str,
) -> _Production:
    """Each instance in the first of ``syntaxes`` it can be produced in
    (``*``: as stored); those that cannot be, or whose stored copy cannot be
    read, are left out."""
    production = _Production([])
    readable = []
    for row in held:
        if source.stored_copy_readable(row, service):
            readable.append(row)
        else:
            production.unreadable += 1
    jobs = [
        (
            source.blobs.path(row.blob),
            row.transfer_syntax_uid,
            [row.transfer_syntax_uid if s == "*" else s for s in syntaxes],
        )
        for row in readable
    ]
    with transcode.Production(jobs, spool) as made:
        for index, row in enumerate(readable):
            _take(production, row, made, index, service)
    return production


def _take(
    production: _Production,
    row: Row,
    made: transcode.Production,
    index: int,
    service: str,
) -> None:
    """Note in ``production`` what became of instance ``row``."""
    try:
        produced = made.result(index)
    except OSError as exc:
        # Removed, or unreadable, after the check.
        logger.error(
            "%s: the stored copy of instance %s (%s) cannot be read (%s); left out",
            service,
            row.sop_instance_uid,
            row.blob,
            type(exc).__name__,
        )
        production.unreadable += 1
        return
    if produced is None:
        production.unacceptable += 1
    else:
        production.files.append((produced.path, produced.transfer_syntax_uid))
        production.rows.append(row)


def _metadata_document(
    header: Dataset, instance_url: str | None = None
) -> dict[str, dict]:
    """An instance's header as WADO-RS metadata, in the DICOM JSON Model
    (DICOM PS3.18 10.4.3.3.2, Annex F).

    Binary values at the top level over BULK_DATA_THRESHOLD, and the Pixel
    Data of an image (which ``header``, read without it, lacks), are bulk
    data: each is named by a BulkDataURI (DICOM PS3.18 F.2.6) under
    ``instance_url``, the instance's WADO-RS resource, or left out without
    one. Binary values in a sequence item, such as the Waveform Data of each
    Waveform Sequence item, are sent inline whatever their length
    (InlineBinary, DICOM PS3.18 F.2.7), which DICOMweb user agents decode
    without a further request.
    """
    document: dict[str, dict] = {}
    for tag in list(header.keys()):
        key = f"{tag:08X}"
        deferred = _bulk_element(header, tag)
        if deferred is not None and _vr_of(deferred) in BULK_DATA_VRS:
            # Left in the file: bulk data by its length alone, never read.
            if instance_url is not None:
                document[key] = {
                    "vr": _vr_of(deferred),
                    "BulkDataURI": f"{instance_url}/bulkdata/{key}",
                }
            continue
        element = header[tag]
        try:
            if element.VR == "SQ":
                attribute = element.to_json_dict(
                    bulk_data_element_handler=None, bulk_data_threshold=0
                )
            else:
                attribute = element.to_json_dict(
                    bulk_data_element_handler=lambda _, key=key: (
                        f"{instance_url}/bulkdata/{key}"
                    ),
                    bulk_data_threshold=BULK_DATA_THRESHOLD,
                )
        except Exception as exc:
            # A value its VR does not allow (an IS of letters) has no DICOM
            # JSON form; the instance's other attributes are sent.
            logger.debug("%s left out of the metadata: %s", key, type(exc).__name__)
            continue
        if "BulkDataURI" in attribute and instance_url is None:
            continue
        if not _finite(attribute):
            # NaN and infinities have no JSON form (RFC 8259 6).
            logger.debug("%s left out of the metadata: not a finite number", key)
            continue
        document[key] = attribute
    if instance_url is not None and "Rows" in header and PIXEL_DATA not in document:
        # DICOM PS3.5 8.2: Pixel Data is OB when encapsulated or of at most
        # 8 bits allocated, else OW.
        meta = getattr(header, "file_meta", None) or {}
        syntax = UID(meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)
        bits = header.get("BitsAllocated", 8)
        vr = "OB" if syntax.is_encapsulated or (bits or 8) <= 8 else "OW"
        document[PIXEL_DATA] = {
            "vr": vr,
            "BulkDataURI": f"{instance_url}/bulkdata/{PIXEL_DATA}",
        }
    return document


def _finite(value: object) -> bool:
    """Whether every number in a DICOM JSON value is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _open_or_500(path: Path) -> BinaryIO:
    """Open a file to answer with, before the answer's status goes out; a
    stored copy gone since it was checked is a 500, not a broken stream."""
    try:
        return open(path, "rb")
    except OSError as exc:
        logger.error("%s cannot be opened to answer with (%s)", path, exc.strerror)
        abort(500, "the stored copy of the instance cannot be read here")


def _vr_of(raw: RawDataElement) -> str:
    """The VR of a raw element: its own (explicit VR) or the data
    dictionary's (implicit VR); UN for a tag the dictionary lacks."""
    if raw.VR:
        return raw.VR
    try:
        return dictionary_VR(raw.tag)
    except KeyError:
        return "UN"


def _file_range(stream: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of an open file from ``start``, a chunk at a time;
    the file is closed at the end."""
    with stream:
        stream.seek(start)
        while length > 0:
            chunk = stream.read(min(length, CHUNK_SIZE))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def _file_chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_SIZE):
            yield chunk


def _multipart(files: list[tuple[Path, str]], boundary: str) -> Iterator[bytes]:
    """One application/dicom part per file (RFC 2387, DICOM PS3.18 8.6.1.2).

    A file gone since it was checked (its instance removed meanwhile) is
    left out, and the multipart body stays whole: the status went out.
    """
    for path, syntax in files:
        try:
            file = open(path, "rb")
        except OSError as exc:
            logger.error("%s left out of a WADO-RS answer (%s)", path, exc.strerror)
            continue
        yield (
            f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={syntax}\r\n\r\n"
        ).encode("ascii")
        yield from _file_chunks(file)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _spooled(
    chunks: Iterator[bytes],
    spool: Path,
    *,
    content_type: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A response streaming ``chunks`` from files in ``spool``, which is
    removed when the server closes the response: after the last chunk, when
    the peer went away meanwhile, and for HEAD, whose body is never read
    (WSGI close, PEP 3333)."""
    response = Response(
        chunks, status=status, headers=headers, content_type=content_type
    )
    response.call_on_close(lambda: shutil.rmtree(spool, ignore_errors=True))
    return response


# WADO-URI parameters that shape a rendered image (DICOM PS3.18 WADO-URI:
# Region, Rows, Columns, Window Center, Window Width, Image Quality).
RENDERING_PARAMETERS = (
    "region",
    "rows",
    "columns",
    "windowCenter",
    "windowWidth",
    "imageQuality",
)
# The largest Rows or Columns a rendered image is scaled to.
MAX_RENDERED_SIZE = 4096
# The VOI LUT Functions a window is applied with (DICOM PS3.3 C.11.2.1.3),
# the function of a WADO-RS window (DICOM PS3.18 8.3.5.1.4); LINEAR the
# default, the one of WADO-URI.
LINEAR = "LINEAR"
VOI_LUT_FUNCTIONS = (LINEAR, "LINEAR_EXACT", "SIGMOID")


class UndecodableImage(NotAcceptable):
    """The pixel data of an image cannot be decoded here to be rendered, so
    that it has no Rendered Media Type this node makes (406). The service
    that answers says how to have the object as held instead."""

    description = "the image cannot be decoded for rendering"


@dataclass(frozen=True)
class Rendering:
    """How an image is rendered (WADO-URI, WADO-RS rendered and thumbnail
    resources); each None where not asked."""

    # xmin, ymin, xmax, ymax as fractions of the image, from its top left.
    region: tuple[float, float, float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    # Window Center and Width (DICOM PS3.3 C.11.2.1.2), both or neither,
    # and the VOI LUT Function they are applied with.
    window: tuple[float, float] | None = None
    voi_lut_function: str = LINEAR
    # For image/jpeg only: PNG and GIF are lossless (DICOM PS3.18 8.3.5.1.2).
    quality: int = 90
    # One of RENDERED_FORMATS.
    media_type: str = JPEG


def _rendering(args: Mapping[str, str], voi_lut_function: str = LINEAR) -> Rendering:
    """Read and check the rendering parameters of a WADO-URI request, the
    window to be applied with ``voi_lut_function``; a malformed one is a
    400."""
    region = None
    if "region" in args:
        try:
            values = tuple(_decimal(v) for v in args["region"].split(","))
        except ValueError:
            values = ()
        if (
            len(values) != 4
            or not all(0.0 <= v <= 1.0 for v in values)
            or not (values[0] < values[2] and values[1] < values[3])
        ):
            abort(
                400,
                "region must be xmin,ymin,xmax,ymax, each from 0.0 to 1.0, the "
                "minimum below the maximum",
            )
        region = (values[0], values[1], values[2], values[3])
    rows = _positive(args, "rows")
    columns = _positive(args, "columns")
    window = None
    if ("windowCenter" in args) != ("windowWidth" in args):
        abort(400, "windowCenter and windowWidth go together")
    if "windowCenter" in args:
        try:
            center = _decimal(args["windowCenter"])
            width = _decimal(args["windowWidth"])
        except ValueError:
            abort(400, "windowCenter and windowWidth must be decimal numbers")
        if not (math.isfinite(center) and math.isfinite(width)):
            # A decimal string of more digits than a double holds.
            abort(400, "windowCenter and windowWidth must be finite numbers")
        if width < 1 and voi_lut_function == LINEAR:
            abort(400, "windowWidth must be at least 1 (DICOM PS3.3 C.11.2.1.2)")
        if width <= 0:
            abort(
                400,
                f"windowWidth must be above 0 for {voi_lut_function} "
                "(DICOM PS3.3 C.11.2.1.3)",
            )
        window = (center, width)
    quality = 90
    if "imageQuality" in args:
        quality = _whole(args["imageQuality"], "imageQuality")
        if not 1 <= quality <= 100:
            abort(400, "imageQuality must be from 1 to 100")
    return Rendering(
        region=region,
        rows=rows,
        columns=columns,
        window=window,
        voi_lut_function=voi_lut_function,
        quality=quality,
    )


# A decimal string as DICOM's DS VR writes one (PS3.5 6.2): ASCII digits,
# an optional sign, point and exponent; no spaces, underscores or other
# scripts' digits, which Python's float() would take.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _decimal(value: str) -> float:
    if not _DECIMAL.fullmatch(value):
        raise ValueError(value)
    return float(value)


def _positive(args: Mapping[str, str], name: str) -> int | None:
    if name not in args:
        return None
    value = _whole(args[name], name)
    if not 1 <= value <= MAX_RENDERED_SIZE:
        abort(400, f"{name} must be from 1 to {MAX_RENDERED_SIZE}")
    return value


def _stored_values(
    pixels: np.ndarray,
    ds: Dataset,
    transform: Callable[[np.ndarray, Dataset], np.ndarray],
) -> np.ndarray:
    """Apply the image's Modality or VOI LUT transformation; an image whose
    LUT or window is unusable (a width below 1, LUT Data cut short) is
    rendered without it, over its full range (DICOM PS3.3 C.11.1, C.11.2)."""
    try:
        return transform(pixels, ds).astype(np.float64)
    except Exception as exc:
        logger.info(
            "rendering: %s of the image is unusable (%s); rendered without it",
            transform.__name__,
            type(exc).__name__,
        )
        return pixels.astype(np.float64)


def _windowed(
    pixels: np.ndarray, center: float, width: float, function: str = LINEAR
) -> np.ndarray:
    """A window applied with its VOI LUT Function onto 0..255: LINEAR (DICOM
    PS3.3 C.11.2.1.2.1), LINEAR_EXACT (C.11.2.1.3.2) or SIGMOID
    (C.11.2.1.3.1)."""
    if function == "SIGMOID":
        # exp overflows to infinity far below the center: black, as meant.
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (pixels - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((pixels - center) / width + 0.5) * 255.0, 0, 255)
    low = center - 0.5 - (width - 1) / 2
    return np.clip((pixels - low) * (255.0 / max(width - 1, 1.0)), 0, 255)


def _render(path: Path, frame: int, rendering: Rendering = Rendering()) -> bytes:
    """Render one frame as an 8-bit image of ``rendering.media_type``
    (DICOM PS3.18 8.7.4; see :func:`_rendered`) in a transcoding process
    (transcode.TRANSCODERS), within the allowance of a re-encoding.

    A codec that crashes on hostile pixel data takes that process down, and
    one that hangs is stopped there, not the node or the request's thread;
    the memory an image takes decoded (hundreds of MB for a mammogram as
    floating point) is that process's, each rendering one image at a time,
    so that a burst of WADO-URI requests waits rather than exhausting it.
    Such an image cannot be rendered (UndecodableImage).
    """
    try:
        outcome, value = transcode.isolated(
            _rendering_outcome,
            path,
            frame,
            rendering,
            allowance=transcode.allowance(path),
            what=f"rendering {path.name}",
        )
    except transcode.CodecFailure:
        raise UndecodableImage() from None
    if outcome == "image":
        return value
    if outcome == "refused":
        code, description = value
        abort(code, description)
    logger.warning("cannot render %s: %s", path.name, value)
    raise UndecodableImage()


def _rendering_outcome(
    path: Path, frame: int, rendering: Rendering
) -> tuple[str, object]:
    """:func:`_rendered`'s answer as a transcoding process gives it back:
    ("image", the bytes), ("refused", (HTTP status, reason)) for a request
    that asks what cannot be (the abort in it), or ("undecodable", why)."""
    try:
        return "image", _rendered(path, frame, rendering)
    except UndecodableImage as exc:
        cause = exc.__cause__
        if cause is None:
            return "undecodable", exc.description
        text = str(cause)
        return "undecodable", text.splitlines()[0] if text else type(cause).__name__
    except HTTPException as exc:
        return "refused", (exc.code, exc.description)


def _rendered(path: Path, frame: int, rendering: Rendering) -> bytes:
    """Render one frame as an 8-bit image of ``rendering.media_type``.

    Modality LUT, then the window asked for or else the image's own VOI LUT
    or window, scaled to the frame's range; then the region is cut out, and
    the result scaled to Rows and Columns. Both given, each is a maximum and
    the aspect ratio is kept; one given, the other follows from the ratio.
    """
    ds = _header(path)
    frames_held = frames.number_of_frames(ds)
    if not 1 <= frame <= frames_held:
        abort(400, f"frameNumber {frame} is outside 1..{frames_held}")
    with warnings_muted():
        try:
            # The frame asked for alone is read from the file and decoded,
            # not all of them: memory follows the frame, not the instance.
            with transcode.plugin_errors_muted():
                pixels = pixel_array(path, index=frame - 1 if frames_held > 1 else None)
        except Exception as exc:
            raise UndecodableImage() from exc
    # The VOI LUT transformation, the window with it, applies to grayscale
    # images only (DICOM PS3.3 C.11.2); a colour image is rendered as held.
    if ds.get("SamplesPerPixel", 1) == 1:
        pixels = _stored_values(pixels, ds, apply_modality_lut)
        if rendering.window is not None:
            pixels = _windowed(pixels, *rendering.window, rendering.voi_lut_function)
        else:
            pixels = _stored_values(pixels, ds, apply_voi_lut)
            low, high = float(pixels.min()), float(pixels.max())
            pixels = (pixels - low) * (255.0 / (high - low or 1.0))
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = 255.0 - pixels
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode)
    if rendering.region is not None:
        xmin, ymin, xmax, ymax = rendering.region
        width, height = image.size
        box = (
            int(xmin * width),
            int(ymin * height),
            max(int(xmin * width) + 1, round(xmax * width)),
            max(int(ymin * height) + 1, round(ymax * height)),
        )
        image = image.crop(box)
    size = _scaled(image.size, rendering.rows, rendering.columns)
    if rendering.rows is None and rendering.columns is None:
        if max(size) > MAX_RENDERED_SIZE:
            # Nothing asked of the size: a larger image comes scaled down.
            size = _scaled(size, MAX_RENDERED_SIZE, MAX_RENDERED_SIZE)
    if max(size) > MAX_RENDERED_SIZE:
        # One of Rows and Columns alone, or a thin region, can ask for the
        # other side far beyond what was named.
        abort(
            400,
            f"the rendered image would be {size[0]}x{size[1]}; neither side may "
            f"exceed {MAX_RENDERED_SIZE}",
        )
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = BytesIO()
    if rendering.media_type == JPEG:
        # DICOM PS3.18 8.7.4: baseline, 8-bit, Huffman coded; Pillow's
        # default unless told progressive.
        image.save(out, format="JPEG", quality=rendering.quality)
    else:
        image.save(out, format=RENDERED_FORMATS[rendering.media_type])
    return out.getvalue()


def _scaled(
    size: tuple[int, int], rows: int | None, columns: int | None
) -> tuple[int, int]:
    """The (width, height) to scale ``size`` to for Rows and Columns, the
    aspect ratio kept."""
    width, height = size
    if rows is None and columns is None:
        return size
    scale = min(
        columns / width if columns is not None else math.inf,
        rows / height if rows is not None else math.inf,
    )
    return max(1, round(width * scale)), max(1, round(height * scale))

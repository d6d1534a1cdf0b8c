"""Tests of xdsi.wire.mtom: MTOM/XOP packages written and read, streamed."""

import base64
import copy
import hashlib
import io
import multiprocessing
import os
import stat
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import pytest
from lxml import etree

from xdsi.ns import SOAP11, SOAP12, XDSB, XOP
from xdsi.store.blobs import spool_prefix
from xdsi.wire import (
    ActionMismatch,
    AnswerTooLarge,
    MalformedMessage,
    MessageAddressingHeaderRequired,
    MissingAttachment,
    OutgoingPart,
    SoapMessage,
    SpoolError,
    UnsupportedMediaType,
    VersionMismatch,
    WireError,
    attachment_for,
    build_envelope,
    new_content_id,
    read_message,
    serialize,
    write_message,
    xop_include,
)
from xdsi.wire.mtom import READ_SIZE

from .conftest import CASES, DICOM

pytestmark = pytest.mark.usefixtures("shared_data")

PNR = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
KOS = DICOM / "study-mr" / "manifest" / "kos.dcm"
CT_SLICE = DICOM / "study-ct" / "S2010" / "I0010.dcm"
NIST_DOCUMENT = CASES / "iti41-11966-single_doc" / "my_document.txt"
DOCUMENT = f"{{{XDSB}}}Document"
BOUNDARY = "xdsi-test-boundary"


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _pnr_request(pnr_envelope: etree._Element, content_id: str) -> etree._Element:
    """The NIST ITI-41 request, its xdsb:Document naming ``content_id``."""
    request = pnr_envelope.find(f"{{{SOAP12}}}Body")[0]
    document = request.find(DOCUMENT)
    document[:] = [xop_include(content_id)]
    return request


def _document(message: SoapMessage) -> etree._Element:
    """The first xdsb:Document of a message as read."""
    return next(message.body.iter(DOCUMENT))


def _package(
    parts: list[tuple[dict[str, str], bytes]], boundary: str = BOUNDARY
) -> bytes:
    """A multipart/related body from (headers, content) pairs, CRLF framed."""
    out = bytearray()
    for headers, content in parts:
        out += f"--{boundary}\r\n".encode()
        for name, value in headers.items():
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def _root_headers(content_id: str = "root@xdsi.test") -> dict[str, str]:
    return {
        "Content-Type": "application/xop+xml; charset=UTF-8; "
        'type="application/soap+xml"',
        "Content-Transfer-Encoding": "binary",
        "Content-ID": f"<{content_id}>",
    }


def _content_type(start: str | None = "<root@xdsi.test>", **extra: str) -> str:
    params = {"type": "application/xop+xml", "boundary": BOUNDARY, **extra}
    if start is not None:
        params["start"] = start
    return "multipart/related; " + "; ".join(f'{k}="{v}"' for k, v in params.items())


def _read(body: bytes, content_type: str, spool: Path) -> SoapMessage:
    return read_message(io.BytesIO(body), content_type, spool)


def _inline_documents(request: etree._Element, message: SoapMessage) -> etree._Element:
    """The XOP-resolved infoset: each xdsb:Document holds base64 bytes."""
    resolved = copy.deepcopy(request)
    for original, document in zip(
        request.iter(DOCUMENT), resolved.iter(DOCUMENT), strict=True
    ):
        attachment = attachment_for(original, message)
        document[:] = []
        document.text = base64.b64encode(attachment.read_bytes()).decode()
    return resolved


def test_round_trip_through_bytes_keeps_bytes_sha1_and_size(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """XOP 1.0 3: parts come back byte for byte, with SHA-1 and size."""
    kos_id, ct_id = new_content_id(), new_content_id()
    request = _pnr_request(pnr_envelope, kos_id)
    second = etree.SubElement(request, DOCUMENT, id="Document02")
    second.append(xop_include(ct_id))
    parts = [
        OutgoingPart(kos_id, "application/dicom", path=KOS),
        OutgoingPart(ct_id, "application/dicom", path=CT_SLICE),
    ]
    content_type, length, chunks = write_message(
        build_envelope(request, PNR), PNR, parts
    )
    body = b"".join(chunks)
    assert len(body) == length

    with _read(body, content_type, spool) as message:
        assert message.action == PNR
        documents = list(message.body.iter(DOCUMENT))
        for document, source in zip(documents, (KOS, CT_SLICE), strict=True):
            attachment = attachment_for(document, message)
            assert attachment.read_bytes() == source.read_bytes()
            assert attachment.size == source.stat().st_size
            assert attachment.sha1 == _sha1(source)
            assert attachment.content_type == "application/dicom"
            assert attachment.path.parent == message.spool_dir
    assert list(spool.iterdir()) == []


def test_a_message_is_spooled_under_a_name_of_this_process(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """The folder of a message read is named after this process (see
    xdsi.store.blobs.spool_prefix), so that a sweep of the spool removes it
    once this process is gone, as when killed while reading."""
    kos_id = new_content_id()
    parts = [OutgoingPart(kos_id, "application/dicom", path=KOS)]
    content_type, _, chunks = write_message(
        build_envelope(_pnr_request(pnr_envelope, kos_id), PNR), PNR, parts
    )

    with _read(b"".join(chunks), content_type, spool) as message:
        assert message.spool_dir.parent == spool
        assert message.spool_dir.name.startswith(spool_prefix("msg"))
        assert stat.S_IMODE(message.spool_dir.stat().st_mode) == 0o700


def test_write_message_without_parts_is_plain_soap_xml(
    pnr_envelope: etree._Element,
) -> None:
    """SOAP 1.2 Part 2 7.1.4 and RFC 3902: application/soap+xml with action."""
    action = "urn:ihe:iti:2007:RegistryStoredQuery"
    content_type, length, chunks = write_message(pnr_envelope, action, mtom=False)
    body = b"".join(chunks)
    assert content_type == f'application/soap+xml; charset=UTF-8; action="{action}"'
    assert len(body) == length and body == serialize(pnr_envelope)


def test_write_message_mtom_announces_root_part_and_action(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """SOAP 1.2 MTOM 4.3: multipart/related of xop+xml with start, action."""
    content_type, _, chunks = write_message(pnr_envelope, PNR)
    body = b"".join(chunks)
    for param in (
        'type="application/xop+xml"',
        'start-info="application/soap+xml"',
        f'action="{PNR}"',
    ):
        assert param in content_type
    assert (
        b'Content-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"'
        in body
    )
    assert b"Content-Transfer-Encoding: binary" in body
    with _read(body, content_type, spool) as message:
        assert message.attachments == {}


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 65536])
def test_nist_capture_yields_the_submitted_document(
    chunk_size: int, nist_mtom: tuple[bytes, str], spool: Path
) -> None:
    """XOP 1.0 3.2: the NIST ITI-41 capture resolves to its 36-byte document.

    The capture is framed with bare LF; the reader accepts that leniency,
    however the stream is cut into chunks.
    """
    body, content_type = nist_mtom
    stream = io.BytesIO(body)
    with read_message(stream, content_type, spool, chunk_size=chunk_size) as message:
        attachment = attachment_for(_document(message), message)
        assert attachment.read_bytes() == NIST_DOCUMENT.read_bytes()
        assert attachment.sha1 == "e543712c0e10501972de13a5bfcbe826c49feb75"
        assert attachment.content_type == "text/plain"


def test_part_read_without_digest_has_its_bytes_and_no_sha1(
    nist_mtom: tuple[bytes, str], spool: Path
) -> None:
    """XOP 1.0 3.2: declining the SHA-1 changes nothing but the SHA-1."""
    body, content_type = nist_mtom
    stream = io.BytesIO(body)
    with read_message(stream, content_type, spool, digest=False) as message:
        attachment = attachment_for(_document(message), message)
        assert attachment.read_bytes() == NIST_DOCUMENT.read_bytes()
        assert attachment.size == NIST_DOCUMENT.stat().st_size
        assert attachment.sha1 is None


def test_crlf_framed_nist_capture_reads_the_same(
    nist_mtom: tuple[bytes, str], spool: Path
) -> None:
    """RFC 2046 5.1.1: the package framed with CRLF gives the same part."""
    body, content_type = nist_mtom
    boundary = b"MIMEBoundary_95b57d7287e4fa4b528a8f050c41f8ad829c20332f23b48d"
    head, _, rest = body.partition(b"\n\n")
    root, _, tail = rest.partition(b"\n--" + boundary + b"\n")
    part_head, _, part_body = tail.partition(b"\n\n")
    document = part_body.partition(b"\n--" + boundary + b"--")[0]
    crlf = (
        head.replace(b"\n", b"\r\n")
        + b"\r\n\r\n"
        + root
        + b"\r\n--"
        + boundary
        + b"\r\n"
        + part_head.replace(b"\n", b"\r\n")
        + b"\r\n\r\n"
        + document
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    with _read(crlf, content_type, spool) as message:
        (attachment,) = message.attachments.values()
        assert attachment.read_bytes() == NIST_DOCUMENT.read_bytes()


class _Pieces:
    """A stream that returns the pieces given, one a read."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces = list(pieces)

    def read(self, size: int = -1) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


def test_a_bare_lf_package_with_crlf_before_its_delimiters_reads_alike_in_any_pieces(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2046 5.1.1: the CRLF before a delimiter belongs to it. In a
    package whose header lines end with LF alone, a part is read without
    that CR wherever the reads happen to split the delimiter."""
    document = KOS.read_bytes()[:300]
    root = serialize(build_envelope(_pnr_request(pnr_envelope, "kos@xdsi.test"), PNR))
    body = (
        f"--{BOUNDARY}\n".encode()
        + "".join(f"{k}: {v}\n" for k, v in _root_headers().items()).encode()
        + b"\n"
        + root
        + f"\r\n--{BOUNDARY}\nContent-ID: <kos@xdsi.test>\n\n".encode()
        + document
        + f"\r\n--{BOUNDARY}--\n".encode()
    )
    end = body.rindex(document) + len(document)
    # Each split from the document's last bytes to past the delimiter.
    for cut in range(end - 4, len(body)):
        with read_message(
            _Pieces(body[:cut], body[cut:]), _content_type(), spool
        ) as message:
            assert message.attachments["kos@xdsi.test"].read_bytes() == document, cut


def test_nist_capture_resolved_validates_against_repository_schema(
    nist_mtom: tuple[bytes, str], spool: Path, repository_schema: etree.XMLSchema
) -> None:
    """ITI TF-2 3.41.4.1.2: the XOP-resolved ITI-41 request is schema-valid."""
    body, content_type = nist_mtom
    with _read(body, content_type, spool) as message:
        repository_schema.assertValid(_inline_documents(message.body, message))


def test_written_pnr_resolved_validates_against_repository_schema(
    pnr_envelope: etree._Element, spool: Path, repository_schema: etree.XMLSchema
) -> None:
    """RAD TF-3 4.68.4.1.2: our root part, XOP-resolved, is schema-valid."""
    content_id = new_content_id()
    request = _pnr_request(pnr_envelope, content_id)
    parts = [OutgoingPart(content_id, "application/dicom", path=KOS)]
    content_type, _, chunks = write_message(build_envelope(request, PNR), PNR, parts)
    with _read(b"".join(chunks), content_type, spool) as message:
        resolved = _inline_documents(message.body, message)
        repository_schema.assertValid(resolved)
        assert base64.b64decode(resolved.find(DOCUMENT).text) == KOS.read_bytes()


def test_vendor_capture_inline_base64_document_is_spooled(
    vendor_inline: tuple[bytes, str], spool: Path
) -> None:
    """ITI TF-2x Appendix V: a non-MTOM peer's base64 document is decoded."""
    body, content_type = vendor_inline
    with _read(body, content_type, spool) as message:
        assert message.attachments == {}
        attachment = attachment_for(_document(message), message)
        data = attachment.read_bytes()
        assert data[128:132] == b"DICM"
        assert attachment.size == len(data) == 6090
        assert attachment.sha1 == hashlib.sha1(data).hexdigest()
        assert attachment.path.parent == message.spool_dir


def test_root_part_after_attachment_is_found_by_start(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2387 3.2: ``start`` names the root part wherever it is."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    body = _package(
        [
            (
                {"Content-Type": "application/dicom", "Content-ID": "<kos@xdsi.test>"},
                KOS.read_bytes(),
            ),
            (_root_headers(), serialize(build_envelope(request, PNR))),
        ]
    )
    stream = io.BytesIO(body)
    with read_message(stream, _content_type(), spool, chunk_size=3) as message:
        assert message.body.tag == f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest"
        assert attachment_for(_document(message), message).sha1 == _sha1(KOS)


def test_start_without_angle_brackets_is_accepted(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2387 3.2: a ``start`` without <> still names the root part."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    body = _package(
        [
            (
                {"Content-ID": "<kos@xdsi.test>", "Content-Type": "application/dicom"},
                KOS.read_bytes(),
            ),
            (_root_headers(), serialize(build_envelope(request, PNR))),
        ]
    )
    with _read(body, _content_type(start="root@xdsi.test"), spool) as message:
        assert attachment_for(_document(message), message).size == KOS.stat().st_size


def test_base64_transfer_encoded_part_is_decoded(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2045 6.8: a base64 part (76-character lines) is stored decoded."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    encoded = base64.encodebytes(KOS.read_bytes()).replace(b"\n", b"\r\n")
    body = _package(
        [
            (_root_headers(), serialize(build_envelope(request, PNR))),
            (
                {
                    "Content-Type": "application/dicom",
                    "Content-Transfer-Encoding": "base64",
                    "Content-ID": "<kos@xdsi.test>",
                },
                encoded,
            ),
        ]
    )
    with read_message(
        io.BytesIO(body), _content_type(), spool, chunk_size=1000
    ) as message:
        attachment = attachment_for(_document(message), message)
        assert attachment.read_bytes() == KOS.read_bytes()
        assert attachment.sha1 == _sha1(KOS)


def test_percent_encoded_cid_resolves_to_its_part(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2392 2: the cid: URL is the percent-encoded Content-ID."""
    content_id = "kos/1%+manifest@xdsi.test"
    include = xop_include(content_id)
    assert include.get("href") == "cid:" + quote(content_id, safe="@+")
    assert "%25" in include.get("href") and "%2F" in include.get("href")
    request = _pnr_request(pnr_envelope, content_id)
    parts = [OutgoingPart(content_id, "application/dicom", path=KOS)]
    content_type, _, chunks = write_message(build_envelope(request, PNR), PNR, parts)
    with _read(b"".join(chunks), content_type, spool) as message:
        assert set(message.attachments) == {content_id}
        assert attachment_for(_document(message), message).sha1 == _sha1(KOS)


def test_dangling_xop_include_is_missing_attachment(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """XOP 1.0 3.2: an xop:Include must name a part of the package."""
    request = _pnr_request(pnr_envelope, "absent@xdsi.test")
    content_type, _, chunks = write_message(build_envelope(request, PNR), PNR)
    with _read(b"".join(chunks), content_type, spool) as message:
        with pytest.raises(MissingAttachment) as raised:
            attachment_for(_document(message), message)
    assert raised.value.content_id == "absent@xdsi.test"


def _written(pnr_envelope: etree._Element) -> tuple[bytes, str]:
    content_id = new_content_id()
    request = _pnr_request(pnr_envelope, content_id)
    parts = [OutgoingPart(content_id, "application/dicom", path=KOS)]
    content_type, _, chunks = write_message(build_envelope(request, PNR), PNR, parts)
    return b"".join(chunks), content_type


@pytest.mark.parametrize(
    "cut",
    [-3, -40, -5000, 200],
    ids=[
        "inside closing boundary",
        "before closing boundary",
        "inside part",
        "in headers",
    ],
)
def test_truncated_package_is_malformed_and_leaves_nothing(
    cut: int, pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2046 5.1.1: a package ends with the close delimiter."""
    body, content_type = _written(pnr_envelope)
    with pytest.raises(MalformedMessage, match="truncated|no root part"):
        _read(body[:cut], content_type, spool)
    assert list(spool.iterdir()) == []


def _spool_writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "xdsi-spool-writer"]


def _many_parts(
    pnr_envelope: etree._Element, count: int
) -> tuple[bytes, str, list[str]]:
    """A package of the NIST request and ``count`` CT slices."""
    content_ids = [new_content_id() for _ in range(count)]
    request = _pnr_request(pnr_envelope, content_ids[0])
    parts = [
        OutgoingPart(content_id, "application/dicom", path=CT_SLICE)
        for content_id in content_ids
    ]
    content_type, _, chunks = write_message(build_envelope(request, PNR), PNR, parts)
    return b"".join(chunks), content_type, content_ids


def test_spooled_parts_are_whole_when_the_message_is_returned(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """The parts are written by a thread of their own as the package
    streams; the message comes back once each file is whole and closed,
    and the thread is gone."""
    body, content_type, content_ids = _many_parts(pnr_envelope, 12)
    expected = CT_SLICE.read_bytes()

    with read_message(
        io.BytesIO(body), content_type, spool, chunk_size=4096
    ) as message:
        assert not _spool_writers()
        for content_id in content_ids:
            attachment = message.attachments[content_id]
            assert attachment.read_bytes() == expected
            assert attachment.head == expected[: len(attachment.head)]
    assert list(spool.iterdir()) == []


class _ReusedBuffer:
    """A stream that returns one bytearray, overwritten at each full read,
    as a reader into a buffer of its own may."""

    def __init__(self, body: bytes, size: int) -> None:
        self._stream = io.BytesIO(body)
        self._buffer = bytearray(size)

    def read(self, size: int = -1) -> bytes | bytearray:
        data = self._stream.read(size)
        if len(data) != len(self._buffer):
            return data
        self._buffer[:] = data
        return self._buffer


def test_parts_read_from_a_reused_buffer_keep_their_bytes(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """Parts are written after the reader has moved on: bytes from a buffer
    the stream overwrites at its next read are kept as they were."""
    body, content_type, content_ids = _many_parts(pnr_envelope, 6)

    with read_message(
        _ReusedBuffer(body, 4096), content_type, spool, chunk_size=4096
    ) as message:
        for content_id in content_ids:
            assert message.attachments[content_id].sha1 == _sha1(CT_SLICE)
            assert _sha1(message.attachments[content_id].path) == _sha1(CT_SLICE)


@pytest.mark.parametrize("cut", [0.3, 0.7], ids=["early part", "late part"])
def test_a_package_broken_off_mid_part_leaves_no_file_or_writer(
    cut: float, pnr_envelope: etree._Element, spool: Path
) -> None:
    """A package that breaks off while parts are still being written: the
    writing stops, every file is closed and removed, no thread is left."""
    body, content_type, _ = _many_parts(pnr_envelope, 12)

    with pytest.raises(MalformedMessage, match="truncated"):
        read_message(
            io.BytesIO(body[: int(len(body) * cut)]),
            content_type,
            spool,
            chunk_size=4096,
        )

    assert not _spool_writers()
    assert list(spool.iterdir()) == []
    assert not [
        link
        for link in Path("/proc/self/fd").iterdir()
        if str(spool) in os.path.realpath(link)
    ]


def test_overlong_boundary_is_malformed_and_leaves_nothing(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2046 5.1.1: a boundary longer than the parser takes is the
    sender's fault (MalformedMessage, env:Sender), not an internal error."""
    body, content_type = _written(pnr_envelope)
    boundary = content_type.split('boundary="')[1].split('"')[0]
    longer = boundary + "x" * 300
    with pytest.raises(MalformedMessage, match="boundary"):
        _read(
            body.replace(boundary.encode(), longer.encode()),
            content_type.replace(boundary, longer),
            spool,
        )
    assert list(spool.iterdir()) == []


class _Watched:
    """A stream that notes, at each read, how many bytes ``spool`` holds."""

    def __init__(self, body: bytes, spool: Path) -> None:
        self._stream = io.BytesIO(body)
        self._spool = spool
        self.spooled: list[int] = []

    def read(self, size: int = -1) -> bytes:
        self.spooled.append(
            sum(p.stat().st_size for p in self._spool.rglob("*") if p.is_file())
        )
        return self._stream.read(size)


@pytest.mark.parametrize("mtom", [True, False], ids=["mtom", "plain"])
def test_a_message_past_max_bytes_is_refused_without_spooling_past_it(
    mtom: bool, pnr_envelope: etree._Element, spool: Path
) -> None:
    """A reader's bound on a whole message: the read that goes past it is
    not parsed, so no more than ``max_bytes`` is ever spooled, and what
    was is removed."""
    content_id = new_content_id()
    request = _pnr_request(pnr_envelope, content_id)
    parts = [OutgoingPart(content_id, "application/dicom", path=CT_SLICE)]
    content_type, length, chunks = write_message(
        build_envelope(request, PNR), PNR, parts if mtom else (), mtom=mtom
    )
    stream = _Watched(b"".join(chunks), spool)
    limit = length - 1

    with pytest.raises(AnswerTooLarge, match=f"larger than {limit} bytes") as refused:
        read_message(stream, content_type, spool, chunk_size=4096, max_bytes=limit)

    assert not refused.value.part
    assert max(stream.spooled) <= limit
    assert list(spool.iterdir()) == []


def test_a_message_of_max_bytes_is_read(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """The bound is inclusive: a message of exactly ``max_bytes`` is read."""
    body, content_type = _written(pnr_envelope)
    with read_message(
        io.BytesIO(body), content_type, spool, max_bytes=len(body)
    ) as message:
        assert attachment_for(_document(message), message).size == KOS.stat().st_size


def test_a_part_past_max_part_bytes_is_refused_as_it_streams(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """A reader's bound on each document: a part decoding to more than
    ``max_part_bytes`` is refused before its file holds more, and nothing
    is left; a part of exactly that size is read."""
    body, content_type = _written(pnr_envelope)
    size = KOS.stat().st_size
    stream = _Watched(body, spool)

    with pytest.raises(AnswerTooLarge, match="a MIME part") as refused:
        read_message(
            stream, content_type, spool, chunk_size=256, max_part_bytes=size - 1
        )

    assert refused.value.part and refused.value.limit == size - 1
    assert max(stream.spooled) < size
    assert list(spool.iterdir()) == []
    with read_message(
        io.BytesIO(body), content_type, spool, max_part_bytes=size
    ) as message:
        assert attachment_for(_document(message), message).size == size


@pytest.mark.parametrize(
    "change",
    [
        lambda body: body.replace(b"\r\n\r\n", b"\r\nbroken header line\r\n\r\n", 1),
        lambda body: b"no boundary anywhere " * 5000,
        lambda body: body.replace(b"Content-ID: <", b"Content-ID: ", 1),
    ],
    ids=["bad header", "no boundary", "root content-id unmatched"],
)
def test_garbled_package_is_malformed(
    change: object, pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2046 5.1.1, RFC 2387 3.2: a package must parse and hold its root."""
    body, content_type = _written(pnr_envelope)
    with pytest.raises(MalformedMessage):
        _read(change(body), content_type, spool)
    assert list(spool.iterdir()) == []


def test_duplicate_content_id_is_malformed(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """XOP 1.0 4.1: a Content-ID names one part."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    kos = ({"Content-ID": "<kos@xdsi.test>"}, KOS.read_bytes())
    body = _package(
        [(_root_headers(), serialize(build_envelope(request, PNR))), kos, kos]
    )
    with pytest.raises(MalformedMessage, match="two MIME parts"):
        _read(body, _content_type(), spool)
    assert list(spool.iterdir()) == []


MESSAGE_ID = "urn:uuid:5b0e3c4e-8f1a-4d2b-9c6e-2a7f1d3b4c5e"
KOS_PART = ({"Content-ID": "<kos@xdsi.test>"}, b"DICM")
# A complete, well-formed root part with a wsa:MessageID, then later parts
# broken in one way each.
BROKEN_LATER_PARTS = {
    "no closing boundary": lambda body: body.removesuffix(
        f"--{BOUNDARY}--\r\n".encode()
    ),
    "part without Content-ID": lambda body: body.replace(
        b"Content-ID: <kos@xdsi.test>", b"X-Note: none", 1
    ),
    "duplicate Content-IDs": lambda body: body.replace(
        f"--{BOUNDARY}--".encode(),
        f"--{BOUNDARY}\r\nContent-ID: <kos@xdsi.test>\r\n\r\nDICM\r\n"
        f"--{BOUNDARY}--".encode(),
    ),
    "bad base64": lambda body: body.replace(
        b"Content-ID: <kos@xdsi.test>\r\n\r\nDICM",
        b"Content-ID: <kos@xdsi.test>\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!",
    ),
    "too many part headers": lambda body: body.replace(
        b"Content-ID: <kos@xdsi.test>\r\n",
        b"Content-ID: <kos@xdsi.test>\r\n" + b"X-Note: n\r\n" * 40,
    ),
}


@pytest.mark.parametrize("change", BROKEN_LATER_PARTS.values(), ids=BROKEN_LATER_PARTS)
def test_a_broken_later_part_fault_carries_the_root_parts_message_id(
    change: Callable[[bytes], bytes], pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6: once the root part is complete, its
    wsa:MessageID is known for the Fault to relate to, whatever breaks in
    the parts after it."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    root = serialize(build_envelope(request, PNR, message_id=MESSAGE_ID))
    body = _package([(_root_headers(), root), KOS_PART])

    with pytest.raises(MalformedMessage) as raised:
        _read(change(body), _content_type(), spool)

    assert raised.value.message_id == MESSAGE_ID
    assert list(spool.iterdir()) == []


class _SpoolGone:
    """A stream that moves the message's spool folder away (as a disk that
    fails) once the write-behind thread has opened a part file in it."""

    def __init__(self, body: bytes, spool: Path, away: Path) -> None:
        self._stream = io.BytesIO(body)
        self._spool = spool
        self._away = away

    def read(self, size: int = -1) -> bytes:
        if not self._away.exists():
            for folder in self._spool.iterdir():
                if any(folder.glob("part-*")):
                    folder.rename(self._away)
        return self._stream.read(size)


def test_a_spool_failing_after_the_root_part_carries_its_message_id(
    pnr_envelope: etree._Element, spool: Path, tmp_path: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6: a part that cannot be spooled once
    the root part is complete is this node's SpoolError, which carries the
    wsa:MessageID for the Receiver Fault to relate to."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    root = serialize(build_envelope(request, PNR, message_id=MESSAGE_ID))
    parts = [
        (
            {"Content-Type": "application/dicom", "Content-ID": f"<ct{n}@xdsi.test>"},
            CT_SLICE.read_bytes(),
        )
        for n in range(4)
    ]
    body = _package([(_root_headers(), root), *parts])

    with pytest.raises(SpoolError) as raised:
        read_message(
            _SpoolGone(body, spool, tmp_path / "away"),
            _content_type(),
            spool,
            chunk_size=4096,
        )

    assert raised.value.message_id == MESSAGE_ID
    assert list(spool.iterdir()) == []
    assert not _spool_writers()


def test_a_fault_in_the_root_part_itself_carries_no_message_id_it_cannot_read(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6: a root part cut before its
    wsa:MessageID relates the Fault to nothing."""
    request = _pnr_request(pnr_envelope, "kos@xdsi.test")
    root = serialize(build_envelope(request, PNR, message_id=MESSAGE_ID))
    cut = root[: root.index(b"MessageID")]
    body = _package([(_root_headers(), cut), KOS_PART])

    with pytest.raises(MalformedMessage) as raised:
        _read(body, _content_type(), spool)

    assert raised.value.message_id is None


@pytest.mark.parametrize(
    "change",
    [
        lambda envelope: envelope + b"<trailing/>",
        lambda envelope: envelope.replace(b"</env:Envelope>", b"") + b"garbage",
    ],
    ids=["trailing element", "trailing garbage, no end tag"],
)
def test_a_plain_envelope_broken_after_its_header_carries_its_message_id(
    change: Callable[[bytes], bytes], pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6: an envelope not well-formed as a
    whole still gives the wsa:MessageID read before the error."""
    request = pnr_envelope.find(f"{{{SOAP12}}}Body")[0]
    envelope = serialize(build_envelope(request, PNR, message_id=MESSAGE_ID))

    with pytest.raises(MalformedMessage, match="well-formed") as raised:
        _read(change(envelope), "application/soap+xml", spool)

    assert raised.value.message_id == MESSAGE_ID


def test_preamble_before_first_boundary_is_skipped(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 2046 5.1.1: text before the first delimiter is a preamble."""
    body, content_type = _written(pnr_envelope)
    with _read(
        b"This is a multi-part message in MIME format.\r\n" + body, content_type, spool
    ) as message:
        assert len(message.attachments) == 1


def test_media_type_action_differing_from_wsa_action_is_action_mismatch(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 4.1: the action parameter must agree."""
    body, content_type = _written(pnr_envelope)
    wrong = content_type.replace(PNR, "urn:ihe:iti:2007:RegisterDocumentSet-b")
    with pytest.raises(ActionMismatch) as raised:
        _read(body, wrong, spool)
    assert raised.value.detail == PNR
    assert list(spool.iterdir()) == []


def test_plain_envelope_action_mismatch_is_action_mismatch(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """RFC 3902 and WS-Addressing 1.0 SOAP Binding 4.1, plain SOAP 1.2."""
    content_type, _, chunks = write_message(pnr_envelope, "urn:other", mtom=False)
    with pytest.raises(ActionMismatch):
        _read(b"".join(chunks), content_type, spool)


def test_action_mismatch_carries_the_message_id(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 4.1 and 6: the wsa:MessageID of a
    message whose media type action differs is known, for the Fault to
    relate to."""
    content_type, _, chunks = write_message(pnr_envelope, "urn:other", mtom=False)

    with pytest.raises(ActionMismatch) as raised:
        _read(b"".join(chunks), content_type, spool)

    assert raised.value.message_id == "urn:uuid:A51311F0AFB3EBCF891467743286288"


def test_mtom_without_wsa_action_is_addressing_header_required(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """WS-Addressing 1.0 SOAP Binding 6.4.3, inside an MTOM package."""
    action = pnr_envelope.find(
        f"{{{SOAP12}}}Header/{{http://www.w3.org/2005/08/addressing}}Action"
    )
    action.getparent().remove(action)
    body = _package([(_root_headers(), serialize(pnr_envelope))])
    with pytest.raises(MessageAddressingHeaderRequired):
        _read(body, _content_type(), spool)
    assert list(spool.iterdir()) == []


def test_doctype_in_root_part_is_malformed(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """SOAP 1.2 Part 1 5: no DTD, in an MTOM root part either."""
    envelope = serialize(pnr_envelope).replace(
        b"?>", b'?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/hostname">]>', 1
    )
    with pytest.raises(MalformedMessage, match="document type declaration"):
        _read(_package([(_root_headers(), envelope)]), _content_type(), spool)
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize(
    "content_type",
    ["text/xml; charset=utf-8", _content_type(**{"start-info": "text/xml"})],
    ids=["text/xml", "start-info text/xml"],
)
def test_soap_11_media_type_is_version_mismatch(content_type: str, spool: Path) -> None:
    """SOAP 1.2 Part 1 5.4.7 and Appendix A: text/xml is SOAP 1.1."""
    with pytest.raises(VersionMismatch):
        _read(b"", content_type, spool)


def test_soap_11_envelope_as_soap_xml_is_version_mismatch(
    pnr_envelope: etree._Element, spool: Path
) -> None:
    """SOAP 1.2 Part 1 5.4.7: the envelope namespace decides the version."""
    body = serialize(pnr_envelope).replace(SOAP12.encode(), SOAP11.encode())
    with pytest.raises(VersionMismatch):
        _read(body, "application/soap+xml", spool)
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "multipart/form-data; boundary=x",
        'multipart/related; type="text/plain"; boundary=x',
        "",
    ],
    ids=["json", "form-data", "related text", "none"],
)
def test_other_media_types_are_unsupported(content_type: str, spool: Path) -> None:
    """SOAP 1.2 Part 2 7.1.4: the binding carries application/soap+xml."""
    with pytest.raises(UnsupportedMediaType):
        _read(b"{}", content_type, spool)
    assert list(spool.iterdir()) == []


def test_in_memory_part_round_trips(pnr_envelope: etree._Element, spool: Path) -> None:
    """XOP 1.0 3: a part given as bytes travels like one given as a file."""
    data = NIST_DOCUMENT.read_bytes()
    request = _pnr_request(pnr_envelope, "doc@xdsi.test")
    parts = [OutgoingPart("doc@xdsi.test", "text/plain", data=data)]
    content_type, length, chunks = write_message(
        build_envelope(request, PNR), PNR, parts
    )
    body = b"".join(chunks)
    assert len(body) == length
    with _read(body, content_type, spool) as message:
        assert attachment_for(_document(message), message).read_bytes() == data


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"path": KOS, "data": b"x"},
        {"path": KOS, "content_id": "<kos@xdsi.test>"},
        {"path": KOS, "content_type": "application/dicom\r\nX-Injected: 1"},
    ],
    ids=["neither", "both", "angle brackets", "header injection"],
)
def test_outgoing_part_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    """RFC 2045, RFC 2392: one source, a bare Content-ID, one-line headers."""
    arguments = {"content_id": "kos@xdsi.test", "content_type": "application/dicom"}
    with pytest.raises(ValueError):
        OutgoingPart(**{**arguments, **kwargs})


def test_file_changing_size_before_sending_raises(
    pnr_envelope: etree._Element, tmp_path: Path
) -> None:
    """RFC 9110 8.6: the Content-Length announced must be what is sent."""
    source = tmp_path / "kos.dcm"
    source.write_bytes(KOS.read_bytes())
    parts = [OutgoingPart("kos@xdsi.test", "application/dicom", path=source)]
    _, _, chunks = write_message(pnr_envelope, PNR, parts)
    with source.open("ab") as file:
        file.write(b"more")
    with pytest.raises(WireError, match="changed size"):
        b"".join(chunks)


def test_fifty_megabyte_part_is_written_and_read_with_flat_memory(
    pnr_envelope: etree._Element, tmp_path: Path, spool: Path
) -> None:
    """DESIGN principle 5: memory stays flat whatever the document size."""
    size = 50 * 1024 * 1024
    source = tmp_path / "large.bin"
    with source.open("wb") as file:
        for _ in range(size // (1 << 20)):
            file.write(os.urandom(1 << 20))
    request = _pnr_request(pnr_envelope, "large@xdsi.test")
    parts = [OutgoingPart("large@xdsi.test", "application/octet-stream", path=source)]
    limit = 4 * 1024 * 1024

    wire = tmp_path / "message.mime"
    # Measured in a forked child: it has one thread, so tracemalloc counts
    # only the codec, not a server thread another test left running.
    results: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()

    def measure() -> None:
        tracemalloc.start()
        content_type, length, chunks = write_message(
            build_envelope(request, PNR), PNR, parts
        )
        with wire.open("wb") as file:
            for chunk in chunks:
                file.write(chunk)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with wire.open("rb") as stream:
            message = read_message(stream, content_type, spool)
        _, read_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        with message:
            attachment = attachment_for(_document(message), message)
            results.put(
                (write_peak, read_peak, length, attachment.size, attachment.sha1)
            )

    child = multiprocessing.get_context("fork").Process(target=measure)
    child.start()
    write_peak, read_peak, length, attachment_size, attachment_sha1 = results.get(
        timeout=120
    )
    child.join(timeout=30)

    assert wire.stat().st_size == length
    assert attachment_size == size
    assert attachment_sha1 == _sha1(source)
    assert write_peak < limit, f"writing peaked at {write_peak} bytes"
    # The reader takes READ_SIZE (1 MiB) pieces; a few are in flight at once.
    assert read_peak < 8 * READ_SIZE, f"reading peaked at {read_peak} bytes"


def test_include_in_element_resolves_by_its_own_xop_namespace() -> None:
    """XOP 1.0 3.1: xop:Include is recognised by namespace, not prefix."""
    include = xop_include("a@b")
    assert include.tag == f"{{{XOP}}}Include"
    assert etree.fromstring(etree.tostring(include)).get("href") == "cid:a@b"


def _sending_into(sink: bytearray) -> Callable[[BinaryIO, int], int]:
    """A SendFile that appends what it sends to ``sink``, as a socket would."""

    def sendfile(file: BinaryIO, count: int) -> int:
        data = file.read(count)
        sink.extend(data)
        return len(data)

    return sendfile


def test_sendfile_sends_file_parts_in_their_place(
    pnr_envelope: etree._Element, tmp_path: Path
) -> None:
    """With a server's SendFile the body of a part on disk goes through it,
    between the yielded pieces, and the message reads back whole."""
    source = tmp_path / "part.bin"
    source.write_bytes(os.urandom(3 * (1 << 18) + 17))
    parts = [
        OutgoingPart("a@xdsi.test", "application/dicom", path=source),
        OutgoingPart("b@xdsi.test", "text/plain", data=b"inline"),
    ]
    sent = bytearray()
    content_type, length, chunks = write_message(
        pnr_envelope, PNR, parts, sendfile=_sending_into(sent)
    )
    for chunk in chunks:
        assert source.read_bytes() not in chunk
        sent.extend(chunk)

    assert len(sent) == length
    spool = tmp_path / "spool"
    spool.mkdir()
    with read_message(io.BytesIO(bytes(sent)), content_type, spool) as message:
        assert message.attachments["a@xdsi.test"].read_bytes() == source.read_bytes()
        assert message.attachments["b@xdsi.test"].read_bytes() == b"inline"


def test_sendfile_of_a_file_that_shrank_raises(
    pnr_envelope: etree._Element, tmp_path: Path
) -> None:
    source = tmp_path / "part.bin"
    source.write_bytes(b"x" * 1000)
    parts = [OutgoingPart("a@xdsi.test", "application/dicom", path=source)]
    _, _, chunks = write_message(
        pnr_envelope, PNR, parts, sendfile=_sending_into(bytearray())
    )
    first = next(chunks)
    assert first.startswith(b"--MIMEBoundary_")
    source.write_bytes(b"x" * 10)
    with pytest.raises(WireError, match="changed size"):
        list(chunks)

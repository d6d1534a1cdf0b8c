"""The framing of a STOW-RS body (RFC 2046 5.1.1) as it streams in chunks
of any size to python-multipart."""

from __future__ import annotations

from pathlib import Path

import pytest
from python_multipart.multipart import MultipartParser

from tests.conftest import dicom_path
from xdsi.actors.stow import _Delimiters, _Parts
from xdsi.wire import MalformedMessage

BOUNDARY = b"xdsi-test"


def _parsed(body: bytes, chunk: int) -> list[bytes]:
    """The parts of ``body`` written ``chunk`` bytes at a time; a last
    ``b"END"`` when the parser saw the close delimiter."""
    parts: list[bytes] = []
    data: list[bytes] = []
    callbacks = {
        "on_part_begin": data.clear,
        "on_part_data": lambda b, start, end: data.append(b[start:end]),
        "on_part_end": lambda: parts.append(b"".join(data)),
        "on_end": lambda: parts.append(b"END"),
    }
    parser = MultipartParser(BOUNDARY, callbacks)
    delimiters = _Delimiters(parser, BOUNDARY)
    for start in range(0, len(body), chunk):
        delimiters.write(body[start : start + chunk])
    delimiters.close()
    parser.finalize()
    return parts


def _body(parts: list[bytes], padding: bytes, preamble: bytes = b"") -> bytes:
    return (
        preamble
        + b"".join(
            b"--"
            + BOUNDARY
            + padding
            + b"\r\nContent-Type: application/dicom\r\n\r\n"
            # A part's last bytes may look like the start of a delimiter.
            + part
            + b"\r\n"
            for part in parts
        )
        + b"--"
        + BOUNDARY
        + b"--"
        + padding
        + b"\r\nepilogue\r\n--"
        + BOUNDARY
        + b" is not a delimiter here"
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 4096, 1 << 20])
@pytest.mark.parametrize("padding", [b"", b" ", b" \t  "], ids=["none", "space", "lws"])
@pytest.mark.parametrize(
    "preamble", [b"", b"A preamble.\r\n"], ids=["bare", "preamble"]
)
def test_each_part_arrives_whole_whatever_the_chunks(
    chunk: int, padding: bytes, preamble: bytes
) -> None:
    """RFC 2046 5.1.1: preamble, transport padding after each delimiter and
    epilogue are left out, wherever the chunks of the stream split them; a
    part's bytes, even those that begin like a delimiter, arrive whole."""
    parts = [
        dicom_path("singles", "ts-explicit-le__CT_small.dcm").read_bytes() + b"\r\n--",
        b"\r\n--" + BOUNDARY[:-1],
        dicom_path("singles", "ts-rle__MR_small_RLE.dcm").read_bytes() + b"\r",
    ]
    if chunk == 1:
        # Byte by byte, the small parts alone keep the test short.
        parts = parts[1:2] + [b"\r\r\n-", b""]

    assert _parsed(_body(parts, padding, preamble), chunk) == [*parts, b"END"]


@pytest.mark.parametrize("chunk", [1, 4096])
@pytest.mark.parametrize(
    "line",
    [b" x", b"\tx", b" --"],
    ids=["after-space", "after-tab", "close-after-padding"],
)
def test_a_delimiter_line_with_more_than_padding_is_malformed(
    chunk: int, line: bytes
) -> None:
    """RFC 2046 5.1.1: after the boundary a delimiter line holds linear
    white space and CRLF only (a close delimiter's "--" comes right after
    the boundary, before any padding)."""
    body = (
        b"--" + BOUNDARY + b"\r\n\r\nfirst\r\n--" + BOUNDARY + line + b"\r\n\r\nsecond"
    )

    with pytest.raises(MalformedMessage, match="RFC 2046 5.1.1"):
        _parsed(body + b"\r\n--" + BOUNDARY + b"--\r\n", chunk)


def test_a_header_split_by_the_chunks_is_read_whole(tmp_path: Path) -> None:
    """A part's header name and value reach the spool whole wherever the
    chunks of the body split them: a part of another media type or a
    declared transfer syntax is not taken for a bare application/dicom."""
    header = b"Content-Type: text/plain; transfer-syntax=1.2.840.10008.1.2.1"
    body = (
        b"--" + BOUNDARY + b"\r\n" + header + b"\r\n\r\ndata\r\n--" + BOUNDARY + b"--"
    )
    start = body.index(header)

    for split in range(start, start + len(header) + 1):
        spool = tmp_path / str(split)
        spool.mkdir()
        parts = _Parts(spool)
        delimiters = _Delimiters(MultipartParser(BOUNDARY, parts.callbacks()), BOUNDARY)
        delimiters.write(body[:split])
        delimiters.write(body[split:])
        delimiters.close()

        assert parts.ended
        assert [media_type for _, media_type in parts.files] == [
            header.decode().removeprefix("Content-Type: ")
        ], split
        parts.discard()

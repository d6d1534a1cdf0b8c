"""The framing of a STOW-RS body (RFC 2046 5.1.1) as it streams in chunks
of any size to python-multipart."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

from tests.conftest import dicom_path
from xdsi.actors.stow import _Delimiters, _Parts
from xdsi.wire import MalformedMessage

BOUNDARY = b"xdsi-test"


def _collecting(parts: list[bytes]) -> dict[str, object]:
    """python-multipart callbacks that append each part's bytes to
    ``parts``, and a last ``b"END"`` at the close delimiter."""
    data: list[bytes] = []
    return {
        "on_part_begin": data.clear,
        "on_part_data": lambda b, start, end: data.append(b[start:end]),
        "on_part_end": lambda: parts.append(b"".join(data)),
        "on_end": lambda: parts.append(b"END"),
    }


def _parsed(body: bytes, chunk: int) -> list[bytes]:
    """The parts of ``body`` written ``chunk`` bytes at a time; a last
    ``b"END"`` when the parser saw the close delimiter."""
    pieces = [body[start : start + chunk] for start in range(0, len(body), chunk)]
    return _parsed_pieces(pieces, finalize=True)


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
    [b" x", b"\tx", b" --", b" \rx"],
    ids=["after-space", "after-tab", "close-after-padding", "cr-after-padding"],
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


@pytest.mark.parametrize("chunk", [1, 4096])
def test_padding_ended_by_other_than_crlf_is_malformed(chunk: int) -> None:
    """RFC 2046 5.1.1: the padding after a boundary runs to the CRLF ending
    its line; a CR followed by anything else is a garbled delimiter line,
    not part data with the padding taken out."""
    body = b"--" + BOUNDARY + b"\r\n\r\nfirst\r\n--" + BOUNDARY + b"  \rx\r\n"

    with pytest.raises(MalformedMessage, match="RFC 2046 5.1.1"):
        _parsed(body + b"\r\n--" + BOUNDARY + b"--\r\n", chunk)


@pytest.mark.parametrize("breaks", [b"\n", b"\r", b"\r\r\n\n"])
def test_line_breaks_before_the_opening_delimiter_lose_no_part(breaks: bytes) -> None:
    """python-multipart skips line breaks before the opening boundary, the
    bare CR or LF included; the first part after them is stored, not taken
    for a preamble (RFC 2046 5.1.1)."""
    body = breaks + _body([b"first", b"second"], b"")

    assert _parsed(body, 1 << 20) == [b"first", b"second", b"END"]


def test_a_part_without_headers_may_begin_like_the_close_delimiter() -> None:
    """RFC 2046 5.1.1: a body part is its headers, a blank line and its
    data; the blank line of a part without headers does not start a
    delimiter, as python-multipart reads it."""
    body = b"--" + BOUNDARY + b"\r\n\r\n--" + BOUNDARY + b"--x\r\n--" + BOUNDARY + b"--"

    assert _parsed(body, 1 << 20) == [b"--" + BOUNDARY + b"--x", b"END"]


class _Writes:
    """A parser that counts the writes it is given."""

    def __init__(self, parser: MultipartParser) -> None:
        self.parser = parser
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += 1
        return self.parser.write(data)


def test_a_part_full_of_lines_like_delimiters_is_passed_on_at_once() -> None:
    """A line that begins with the boundary but goes on with other bytes is
    part data to python-multipart; a chunk full of them goes to the parser
    in one write, not one a line with the rest of the chunk copied each
    time (which made a hostile body cost seconds a megabyte)."""
    line = b"\r\n--" + BOUNDARY + b"x"
    parts: list[bytes] = []
    callbacks = {"on_part_data": lambda b, start, end: parts.append(b[start:end])}
    writes = _Writes(MultipartParser(BOUNDARY, callbacks))
    delimiters = _Delimiters(writes, BOUNDARY)  # type: ignore[arg-type]
    delimiters.write(b"--" + BOUNDARY + b"\r\n\r\n")
    start = writes.count

    delimiters.write(line * 10_000)

    assert writes.count - start == 1
    assert b"".join(parts) == line * 10_000


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


def _random_body(rng: random.Random, files: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A multipart body of a few of ``files``, some cut short or with bytes
    that begin like a delimiter at their ends, with or without a preamble,
    padding and epilogue; and the parts it holds."""
    parts = []
    for _ in range(rng.randint(0, 3)):
        data = rng.choice(files)
        data = data[: rng.randint(0, len(data))] + rng.choice(
            [
                b"",
                b"\r",
                b"\r\n-",
                b"\r\n--" + BOUNDARY[:3],
                b"\r\n--" + BOUNDARY + b"x",
            ]
        )
        parts.append(data)

    def padding() -> bytes:
        return rng.choice([b"", b"", b" ", b"\t ", b"  \t"])

    body = rng.choice([b"", b"", b"\r\n", b"A preamble.\r\n--\r\n", b"\r\n\n"])
    for data in parts:
        headers = rng.choice([b"", b"Content-Type: application/dicom\r\n"])
        body += b"--" + BOUNDARY + padding() + b"\r\n" + headers + b"\r\n" + data
        body += b"\r\n"
    body += b"--" + BOUNDARY + b"--" + padding()
    body += rng.choice([b"", b"\r\n", b"\r\nAn epilogue.\r\n--" + BOUNDARY + b"\r\n"])
    return body, parts


def _alone(body: bytes) -> list[bytes] | None:
    """The parts python-multipart alone takes from ``body``, None when it
    takes none."""
    parts: list[bytes] = []
    callbacks = _collecting(parts)
    try:
        MultipartParser(BOUNDARY, callbacks).write(body)
    except FormParserError:
        return None
    return parts if parts[-1:] == [b"END"] else None


def test_random_bodies_of_real_files_arrive_whole_at_any_split() -> None:
    """Bodies of real instances, with and without preamble, padding and
    epilogue, give their parts whole however the stream splits them; and
    what python-multipart alone takes of a body it takes is what it takes
    through _Delimiters."""
    files = [
        dicom_path("singles", name).read_bytes()
        for name in (
            "kos-manifest-1ref__ids-1001-kos.dcm",
            "ts-deflate__image_dfl.dcm",
            "ts-rle__MR_small_RLE.dcm",
        )
    ]
    rng = random.Random(2046)
    for _ in range(60):
        body, parts = _random_body(rng, files)
        splits = [rng.randint(1, len(body)) for _ in range(20)]
        for split in [*splits, *range(1, min(len(body), 40))]:
            chunk = rng.choice([split, 1 << 20])
            pieces = [
                body[:split],
                *[
                    body[start : start + chunk]
                    for start in range(split, len(body), chunk)
                ],
            ]
            assert _parsed_pieces(pieces) == [*parts, b"END"], (body[:200], split)
        alone = _alone(body)
        if alone is not None:
            assert alone == _parsed(body, 1 << 20)


def test_random_framing_splits_alike_and_agrees_with_python_multipart() -> None:
    """Bodies of delimiters, line breaks, padding and hyphens in any order:
    each gives the same parts, or the same error, at every split point, and
    the same parts python-multipart alone takes of those it takes (but for
    those opening with a line break and junk, which python-multipart skips
    up to the first hyphen)."""
    pieces = [
        b"\r", b"\n", b"\r\n", b"-", b"--", b" ", b"\t", b"x", BOUNDARY,
        b"--" + BOUNDARY, b"\r\n--" + BOUNDARY, b"\r\n\r\n",
        b"\r\n--" + BOUNDARY + b"--", b"Content-Type: a/b\r\n",
        b"--" + BOUNDARY + b"\r\n\r\n",
    ]  # fmt: skip
    rng = random.Random(5111)
    for _ in range(300):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        whole = _outcome([body])
        for split in range(1, len(body)):
            assert _outcome([body[:split], body[split:]]) == whole, (body, split)
        alone = _alone(body)
        if alone is not None and not re.match(rb"[\r\n]+(?!--" + BOUNDARY + b")", body):
            assert whole == alone, body


def _parsed_pieces(pieces: list[bytes], *, finalize: bool = False) -> list[bytes]:
    """The parts of a body written in ``pieces``, as _parsed gives them;
    with ``finalize`` the parser is told the body ended."""
    parts: list[bytes] = []
    callbacks = _collecting(parts)
    parser = MultipartParser(BOUNDARY, callbacks)
    delimiters = _Delimiters(parser, BOUNDARY)
    for piece in pieces:
        delimiters.write(piece)
    delimiters.close()
    if finalize:
        parser.finalize()
    return parts


def _outcome(pieces: list[bytes]) -> list[bytes] | str:
    try:
        return _parsed_pieces(pieces)
    except (FormParserError, MalformedMessage):
        return "malformed"

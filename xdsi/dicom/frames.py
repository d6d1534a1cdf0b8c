"""The frames of a stored image, for WADO-RS Retrieve Frames (DICOM PS3.18
10.4.1.1.4 and 8.7.3.5).

A frame goes out either as held, its encoded bitstream for an encapsulated
transfer syntax (DICOM PS3.5 A.4), in the image media type of that syntax,
or decoded to its native pixel cells, little endian, as
application/octet-stream (DICOM PS3.18 8.7.3.5.2; the cells of Explicit VR
Little Endian, DICOM PS3.5 8.1.1). Only the frame asked for is read from
the file: a frame of a large multi-frame image costs the frame.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pack_bits, pixel_array
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from xdsi.dicom import scan, transcode

OCTET_STREAM = "application/octet-stream"

# DICOM PS3.18 Table 8.7.3-5: the media type of a frame in each
# encapsulated transfer syntax this node sends frames in as held.
MEDIA_TYPES = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    JPEG2000MCLossless: "image/jpx",
    JPEG2000MC: "image/jpx",
    RLELossless: "image/dicom-rle",
}
# Names user agents also use for a media type (image/x-dicom-rle is the
# name of earlier editions of DICOM PS3.18).
ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

# Frames read at once in one process: a decoded mammogram frame holds tens
# of MB, so a burst of requests waits its turn rather than exhausting
# memory (as many as instances transcoded at once).
_READING = threading.BoundedSemaphore(transcode.TRANSCODING_SLOTS)


@dataclass(frozen=True)
class Framing:
    """How the frames of one instance go out: as held (``native`` false,
    an encapsulated syntax) or decoded, and the media type and transfer
    syntax each part is labelled with."""

    native: bool
    media_type: str
    transfer_syntax_uid: str

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax_uid}"


def number_of_frames(header: Dataset) -> int:
    """The frames an image holds: Number of Frames (DICOM PS3.3 C.7.6.6),
    one when it has none."""
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def as_held(held_syntax: str) -> Framing:
    """The framing of frames sent as they are held."""
    if held_syntax in MEDIA_TYPES:
        return Framing(False, MEDIA_TYPES[held_syntax], held_syntax)
    return decoded()


def decoded() -> Framing:
    """The framing of frames decoded to native pixel cells."""
    return Framing(True, OCTET_STREAM, ExplicitVRLittleEndian)


def read_frame(path: Path, header: Dataset, index: int, framing: Framing) -> bytes:
    """Frame ``index`` (from 0) of the image stored at ``path``, whose
    attributes are ``header``, as ``framing`` says.

    A compressed frame to decode is decoded by a transcoding process
    (transcode.isolated): a codec crashing or hanging on hostile pixel data
    costs that process, not the node or the request's thread.

    Raises
    ------
    Exception
        Whatever the file or a pixel data plugin raises when the frame
        cannot be read or decoded; transcode.CodecFailure when the process
        decoding it died or was stopped.
    """
    held = UID(header.file_meta.TransferSyntaxUID)
    if framing.native and held.is_compressed:
        return transcode.isolated(
            _decoded_frame,
            path,
            index,
            framing,
            allowance=transcode.allowance(path),
            what=f"decoding a frame of {path.name}",
        )
    with _READING:
        return _read_frame(path, header, index, framing)


def _decoded_frame(path: Path, index: int, framing: Framing) -> bytes:
    """:func:`_read_frame` in a transcoding process, the header read there."""
    with warnings.catch_warnings():
        # A process of its own, one task at a time: nothing else's warnings
        # are muted with these.
        warnings.simplefilter("ignore")
        header = pydicom.dcmread(path, stop_before_pixels=True)
    return _read_frame(path, header, index, framing)


def _read_frame(path: Path, header: Dataset, index: int, framing: Framing) -> bytes:
    if not framing.native:
        return _encoded_frame(path, header, index)
    frames = number_of_frames(header)
    held = UID(header.file_meta.TransferSyntaxUID)
    bits = int(header.get("BitsAllocated", 8))
    if bits == 1 and not held.is_compressed and held.is_little_endian:
        return _bit_frame(path, header, index)
    with transcode.plugin_errors_muted():
        # raw: the cells as held, not converted to RGB, for a native image;
        # a decoded one comes out as pydicom's decompress() leaves it.
        cells = pixel_array(
            path, index=index if frames > 1 else None, raw=not held.is_compressed
        )
    if bits == 1:
        return pack_bits(cells)
    if not held.is_compressed and cells.ndim == 3 and header.get("PlanarConfiguration"):
        # DICOM PS3.3 C.7.6.3.1.3: a native image held colour by plane goes
        # out so, as its metadata's Planar Configuration says; pydicom gives
        # the cells colour by pixel.
        cells = cells.transpose(2, 0, 1)
    return np.ascontiguousarray(cells, dtype=cells.dtype.newbyteorder("<")).tobytes()


def _bit_frame(path: Path, header: Dataset, index: int) -> bytes:
    """Frame ``index`` of a native image of one bit a cell, its bits read
    from the file and packed from the frame's first (DICOM PS3.5 8.1.1: the
    frames follow one another bit by bit, a frame need not start a byte).
    """
    offset = _pixel_data_offset(path, header)
    cells = (
        int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))
    )
    first = index * cells
    with open(path, "rb") as stream:
        stream.seek(offset + first // 8)
        held = stream.read((first % 8 + cells + 7) // 8)
    bits = np.unpackbits(np.frombuffer(held, np.uint8), bitorder="little")
    frame = bits[first % 8 : first % 8 + cells]
    if frame.size < cells:
        raise ValueError(f"Pixel Data ends inside frame {index + 1}")
    return np.packbits(frame, bitorder="little").tobytes()


def _encoded_frame(path: Path, header: Dataset, index: int) -> bytes:
    """The encoded bitstream of one frame of an encapsulated image, read
    through its Basic or Extended Offset Table (DICOM PS3.5 A.4)."""
    offset = _pixel_data_offset(path, header)
    with open(path, "rb") as stream:
        stream.seek(offset)
        return get_frame(
            stream,
            index,
            extended_offsets=scan.extended_offset_table(header),
            number_of_frames=number_of_frames(header),
        )


def _pixel_data_offset(path: Path, header: Dataset) -> int:
    """Where the value of the stored file's Pixel Data starts."""
    pixels = scan.pixel_element(path, header.file_meta.TransferSyntaxUID)
    if pixels is None or pixels.tag != scan.PIXEL_DATA:
        raise ValueError("no Pixel Data where the data set ends")
    return pixels.offset

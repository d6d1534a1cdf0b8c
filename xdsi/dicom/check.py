"""Intake checks: decide whether a received DICOM file may be stored.

Implements the DICOM PS3.10 7.1 file format check, the element lengths of
DICOM PS3.5 7.1, the Pixel Data length of DICOM PS3.5 8.1.1 and the
consistency of a JPEG 2000 codestream (DICOM PS3.5 8.2.4, ISO/IEC 15444-1
A.5.1) and of a JPEG or JPEG-LS frame header (ITU-T T.81 B.2.2, ISO/IEC
14495-1 C.2.2) with the Image Pixel module. Each refusal names a row of
``profiles/intake_refusals.toml``, which maps it to the C-STORE status of
DICOM PS3.4 B.2.3 and the STOW-RS Failure Reason of DICOM PS3.18 10.5.3.
"""

from __future__ import annotations

import logging
import struct
import zlib
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEG2000TransferSyntaxes

from xdsi.dicom import scan
from xdsi.dicom.kos import is_image_sop_class
from xdsi.dicom.scan import (
    InstanceHeader,
    InvalidInstance,
    NotDicom,
    read_header,
)
from xdsi.logs import quoted
from xdsi.profiles_loader import load_profile_table

logger = logging.getLogger(__name__)

# DICOM PS3.5 7.1.1: the length of an element whose value is delimited.
UNDEFINED_LENGTH = 0xFFFFFFFF

# Values longer than this are checked against the file's size, not read,
# when a data set is checked; Pixel Data is read a frame at a time. A large
# instance (a tomosynthesis of a gigabyte) is never whole in memory.
DEFER_SIZE = scan.DEFER_SIZE
# DICOM PS3.3 C.7.6.24: the bits of each value of Float Pixel Data
# (7FE0,0008) and Double Float Pixel Data (7FE0,0009), whatever Bits
# Allocated says.
FLOAT_BITS = {0x7FE00008: 32, 0x7FE00009: 64}

# ISO/IEC 15444-1 A.2 and A.5.1: a codestream opens with SOC then SIZ.
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


class Refused(Exception):
    """An instance the Imaging Document Source will not store.

    ``rule`` is a row of ``profiles/intake_refusals.toml``.
    ``patient_id`` (qualified, as the instance would be held under) and
    ``study_instance_uid`` name whose instance it was, where its header
    could be read, for the audit record of the refusal (DICOM PS3.15
    A.5.3.7); "" otherwise.
    """

    def __init__(self, rule: str, reason: str) -> None:
        if rule not in refusal_table():
            raise ValueError(f"no refusal rule {rule!r} in intake_refusals.toml")
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        self.patient_id = ""
        self.study_instance_uid = ""

    def identify(self, patient_id: str, study_instance_uid: str) -> None:
        """Name the patient and study of the refused instance, unless named
        already."""
        if not (self.patient_id or self.study_instance_uid):
            self.patient_id = patient_id
            self.study_instance_uid = study_instance_uid

    def detached(self) -> Refused:
        """This refusal without its traceback and the exceptions it was
        raised from, to be kept until its exchange ends: their frames hold
        the data set refused, pixel data included, which a peer sending
        refused instances one after another would pile up in memory."""
        self.__traceback__ = None
        self.__cause__ = None
        self.__context__ = None
        return self

    @property
    def dimse_status(self) -> int:
        """The C-STORE response Status; DICOM PS3.4 Table B.2-1."""
        return int(refusal_table()[self.rule]["dimse_status"])

    @property
    def failure_reason(self) -> int:
        """The STOW-RS Failure Reason (0008,1197); DICOM PS3.18 10.5.3.2."""
        return int(refusal_table()[self.rule]["failure_reason"])


@cache
def refusal_table() -> dict[str, Any]:
    """The refusal rules, keyed by name."""
    return load_profile_table("intake_refusals")


def check_file(
    path: Path,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> tuple[InstanceHeader, Dataset]:
    """Check a received DICOM PS3.10 file; return its header and data set.

    The whole data set is parsed: every element must be as long as its
    header says (DICOM PS3.5 7.1) and decode to its VR; native Pixel Data
    must hold Rows x Columns x Samples per Pixel x Bits Allocated x frames
    (DICOM PS3.5 8.1.1), Float and Double Float Pixel Data as many values
    of 32 and 64 bits (DICOM PS3.3 C.7.6.24); each JPEG 2000 frame's SIZ
    marker must agree with Rows, Columns and Samples per Pixel (DICOM PS3.5
    8.2.4). When the request named a SOP Class or Instance UID (the
    C-STORE command's Affected SOP Class and Instance UIDs, DICOM PS3.7
    9.1.1.1), the data set must carry the same. A data set of more sequence
    items (DICOM PS3.5 7.5) than scan.MAX_SEQUENCE_ITEMS, or nesting them
    deeper than scan.MAX_SEQUENCE_DEPTH, is refused before it is read.

    Limitation: other compressed codestreams are checked for their framing
    only, not decoded; a corrupt JPEG or RLE frame is stored as received.

    Raises
    ------
    Refused
        With the rule broken and a reason naming the element.
    """
    try:
        header, _ = read_header(path)
    except NotDicom as exc:
        raise Refused("not_dicom", exc.reason) from exc
    except InvalidInstance as exc:
        rule = "unreadable" if exc.reason.startswith("unreadable") else "identification"
        raise Refused(rule, exc.reason) from exc

    # pydicom reads a data set in the other VR encoding than its transfer
    # syntax's as it finds it; the file kept would say one and hold the
    # other, which no other reader takes.
    _check_vr_encoding(path, header.transfer_syntax_uid)

    # The header alone may parse where the whole file does not. Values
    # over DEFER_SIZE are checked against the file's size, not read, and
    # Pixel Data is read a frame at a time (_check_pixel_data): a large
    # instance is never whole in memory. A deflated data set (DICOM PS3.5
    # A.5, its inflated size bounded by scan.MAX_INFLATED) cannot be read
    # in place and is read whole.
    deflated = header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    try:
        size = path.stat().st_size
        if deflated:
            ds = pydicom.dcmread(path)
            pixels = None
        else:
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
            pixels = scan.pixel_element(path, header.transfer_syntax_uid)
        _check_elements(ds, size)
    except Refused:
        raise
    except Exception as exc:
        raise Refused("unreadable", f"{type(exc).__name__}: {exc}") from exc
    if ds.get("SOPInstanceUID") != header.sop_instance_uid:
        # The header read, SOP Instance UID included, but the whole data set
        # did not: pydicom gives an empty one for a file that ends inside an
        # element of undefined length (an encapsulated Pixel Data or a
        # sequence, before its delimiter, DICOM PS3.5 7.5 and A.4).
        raise Refused(
            "unreadable",
            "the data set ends inside an element of undefined length, before "
            "its delimiter: the file is cut short",
        )
    if pixels is None and not deflated:
        _check_whole_end(path, header.transfer_syntax_uid, size)
    _check_patient_id(ds)

    if sop_class_uid is not None and sop_class_uid != header.sop_class_uid:
        raise Refused(
            "command_mismatch",
            f"SOP Class UID {header.sop_class_uid} in the data set, "
            f"{sop_class_uid} in the request",
        )
    if sop_instance_uid is not None and sop_instance_uid != header.sop_instance_uid:
        raise Refused(
            "command_mismatch",
            f"SOP Instance UID {header.sop_instance_uid} in the data set, "
            f"{sop_instance_uid} in the request",
        )
    if deflated and "PixelData" in ds:
        _check_pixel_value(ds, ds.PixelData, header.transfer_syntax_uid)
    elif pixels is not None:
        _check_pixel_data(path, ds, header.transfer_syntax_uid, pixels, size)
    elif not any(tag in ds for tag in _OTHER_PIXEL_DATA):
        # The Image Pixel module's Pixel Data is Type 1 (DICOM PS3.3
        # C.7.6.3): an image without it is one cut short before it. A file
        # cut inside an element's header ends the data set there for the
        # parser (fewer than the 8 bytes of a tag, VR and length), so what
        # is left is the SOP Class the instance claims.
        if all(tag in ds for tag in _IMAGE_PIXEL):
            raise Refused(
                "pixel_data", "the image has Rows and Columns but no Pixel Data"
            )
        if is_image_sop_class(header.sop_class_uid):
            raise Refused(
                "pixel_data",
                f"an instance of an image Storage SOP Class "
                f"({header.sop_class_uid}) without Pixel Data: the file is cut "
                "short before it",
            )
    _check_file_meta(ds, header)
    return header, ds


# Attributes of the Image Pixel module (DICOM PS3.3 C.7.6.3), and the other
# pixel data elements that may stand for Pixel Data (C.7.6.3.1.4).
_IMAGE_PIXEL = {0x00280010, 0x00280011, 0x00280100}  # Rows, Columns, Bits Allocated
_OTHER_PIXEL_DATA = {0x7FE00008, 0x7FE00009}  # Float, Double Float Pixel Data


def _check_elements(ds: Dataset, size: int) -> None:
    """Check every element's length and value, sequences included; a value
    left unread (over DEFER_SIZE) for its length against the file's
    ``size`` alone, unless it is a sequence, whose items are read and
    checked."""
    for tag in list(ds.keys()):
        raw = ds._dict[tag]
        if (
            isinstance(raw, RawDataElement)
            and raw.length == UNDEFINED_LENGTH
            and tag != scan.PIXEL_DATA
        ):
            # DICOM PS3.5 7.1.1: only a sequence (SQ, or UN holding one) and
            # encapsulated Pixel Data (A.4) have an undefined length; any
            # other value runs to a Sequence Delimitation Item, or, when
            # none comes, swallows the rest of the data set.
            raise Refused(
                "unreadable",
                f"element {tag} ({raw.VR or 'implicit VR'}) has an undefined "
                "length; DICOM PS3.5 7.1.1 allows it for sequences and "
                "encapsulated Pixel Data only",
            )
        if isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH:
            if isinstance(raw.value, bytes):
                held = len(raw.value)
            elif raw.value is None and raw.length:
                # Deferred: its bytes are those the file holds after its
                # header.
                held = min(raw.length, max(size - raw.value_tell, 0))
            else:
                held = raw.length
            if held < raw.length:
                raise Refused(
                    "unreadable",
                    f"element {tag} is {held} bytes long, its header says "
                    f"{raw.length}: the file is cut short; DICOM PS3.5 7.1",
                )
            if (
                raw.value is None
                and raw.length
                and raw.VR != "SQ"
                and _dictionary_vr(tag) != "SQ"
            ):
                # Bulk data, checked for its length only.
                continue
        element = ds[tag]
        if element.VR != "SQ" and _dictionary_vr(tag) == "SQ":
            # DICOM PS3.5 7.1.2: an element's VR is the data dictionary's;
            # a sequence sent as text is no sequence to read.
            raise Refused(
                "unreadable",
                f"element {tag} is a sequence (SQ) in the data dictionary, sent "
                f"as {element.VR}; DICOM PS3.5 7.1.2",
            )
        if element.VR == "SQ":
            for item in element.value:
                _check_elements(item, size)


# The bytes of a data element's tag and explicit VR (DICOM PS3.5 7.1.2).
TAG_AND_VR = 6


def _check_vr_encoding(path: Path, transfer_syntax_uid: str) -> None:
    """Refuse a data set whose first element is not in the VR encoding of
    its transfer syntax.

    DICOM PS3.5 10.1: the transfer syntax (the File Meta's, DICOM PS3.10
    7.1; in a C-STORE the presentation context's, DICOM PS3.8 9.3.5) says
    whether the data set is in Explicit VR (DICOM PS3.5 7.1.2) or Implicit
    VR (7.1.3). An element's VR is two upper-case letters, as pydicom tells
    them; pydicom reads a data set in the other encoding as it finds it,
    while every other reader of the file kept takes the transfer syntax at
    its word.
    """
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax:
        raise Refused(
            "unreadable",
            f"File Meta Transfer Syntax UID {quoted(transfer_syntax_uid)} "
            "names no transfer syntax of DICOM PS3.5 10; the data set cannot "
            "be read",
        )
    head = _data_set_head(path, transfer_syntax_uid, TAG_AND_VR)
    if len(head) < TAG_AND_VR:
        return
    explicit = all(0x41 <= octet <= 0x5A for octet in head[4:6])
    if explicit == syntax.is_implicit_VR:
        found, wanted = (
            ("Explicit", "Implicit") if explicit else ("Implicit", "Explicit")
        )
        raise Refused(
            "unreadable",
            f"the data set is in {found} VR, its transfer syntax "
            f"{syntax.name} is {wanted} VR; DICOM PS3.5 10.1",
        )


def _data_set_head(path: Path, transfer_syntax_uid: str, size: int) -> bytes:
    """The first ``size`` bytes of a file's data set, after its File Meta
    (DICOM PS3.10 7.1), inflated when deflated (DICOM PS3.5 A.5)."""
    with open(path, "rb") as stream:
        for _ in scan.file_meta_elements(stream):
            pass
        if transfer_syntax_uid != DeflatedExplicitVRLittleEndian:
            return stream.read(size)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            return inflater.decompress(stream.read(scan.INFLATE_CHUNK), size)
        except zlib.error:
            return b""  # the full read says why


def _check_whole_end(path: Path, transfer_syntax_uid: str, size: int) -> None:
    """Refuse a data set that ends inside an element's header.

    DICOM PS3.5 7.1: an element is its tag, VR and length, then its value.
    pydicom ends a data set where fewer bytes are left than a header takes,
    as if there were none: a file cut short there would pass for whole. The
    top-level elements are walked again (values over DEFER_SIZE skipped,
    not read) to find where the last ends.

    Limitation: a file cut exactly between two elements, or one of Pixel
    Data (whose elements after it are not read), or a deflated one, cannot
    be told from a whole one here; an image cut before its Pixel Data is
    refused by check_file, other instances are kept as they came.
    """
    syntax = UID(transfer_syntax_uid)
    with open(path, "rb") as stream:
        for _ in scan.file_meta_elements(stream):
            pass
        end = stream.tell()
        for _ in data_element_generator(
            stream,
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            defer_size=DEFER_SIZE,
        ):
            end = stream.tell()
    if end < size:
        raise Refused(
            "unreadable",
            f"the data set ends with {size - end} bytes that are no whole "
            "element header: the file is cut short; DICOM PS3.5 7.1",
        )


def _check_file_meta(ds: Dataset, header: InstanceHeader) -> None:
    """Refuse a file whose File Meta names another instance than its data set.

    DICOM PS3.10 7.1: Media Storage SOP Class and Instance UID (0002,0002),
    (0002,0003) are those of the data set the file holds. A RAD-69 answer
    is the stored file as it is, and an Imaging Document Consumer knows each
    returned file by its Media Storage SOP Instance UID (RAD TF-3 4.69.4.2.3):
    a file that names another would be kept, published and never retrieved.
    """
    meta = ds.file_meta
    for keyword, uid in (
        ("MediaStorageSOPClassUID", header.sop_class_uid),
        ("MediaStorageSOPInstanceUID", header.sop_instance_uid),
    ):
        named = str(meta.get(keyword) or "").strip()
        if named != uid:
            raise Refused(
                "identification",
                f"File Meta {keyword} is {quoted(named) or 'absent'}, the data "
                f"set's is {uid}; DICOM PS3.10 7.1 wants them the same",
            )


def _check_patient_id(ds: Dataset) -> None:
    """Refuse a Patient ID or issuer holding a control character.

    DICOM PS3.5 6.2: an LO value holds no control character but ESC, which
    a Specific Character Set decodes away; none can stand in the XDS
    patientId (ITI TF-3 4.2.3.2.16) or the XML the study is published in,
    so such an instance could be kept but never shared.
    """
    named = {
        "Patient ID": str(ds.get("PatientID") or ""),
        "Issuer of Patient ID": scan.patient_id_issuers(ds)[0],
        "the issuer of its Qualifiers Sequence": scan.patient_id_issuers(ds)[1],
    }
    for name, value in named.items():
        bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
        if bad is not None:
            raise Refused(
                "patient_id",
                f"{name} holds the control character U+{ord(bad):04X}; DICOM "
                "PS3.5 6.2 allows none in an LO value",
            )


def _dictionary_vr(tag: BaseTag) -> str | None:
    """The VR the data dictionary gives a standard tag; None for a private
    or unknown one."""
    if tag.is_private:
        return None
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError) as exc:
        # Its value is not quoted: a garbled element may hold anything.
        raise Refused("pixel_data", "Number of Frames is no number") from exc


def _image_pixel(ds: Dataset) -> tuple[int, int, int, int]:
    """Rows, Columns, Samples per Pixel and Bits Allocated."""
    try:
        return (
            int(ds.Rows),
            int(ds.Columns),
            int(ds.get("SamplesPerPixel") or 1),
            int(ds.BitsAllocated),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refused(
            "pixel_data", f"Pixel Data without a usable Image Pixel module: {exc}"
        ) from exc


def _check_pixel_data(
    path: Path,
    ds: Dataset,
    transfer_syntax_uid: str,
    pixels: scan.PixelElement,
    size: int,
) -> None:
    """Check the pixel data element of a file (Pixel Data, Float or Double
    Float Pixel Data) against the Image Pixel module (DICOM PS3.5 8),
    reading it a frame at a time."""
    rows, columns, samples, bits = _image_pixel(ds)
    bits = FLOAT_BITS.get(pixels.tag, bits)
    frames = _frames(ds)
    if pixels.length != UNDEFINED_LENGTH:
        held = min(pixels.length, max(size - pixels.offset, 0))
        if held < pixels.length:
            raise Refused(
                "unreadable",
                f"element {BaseTag(pixels.tag)} is {held} bytes long, its header "
                f"says {pixels.length}: the file is cut short; DICOM PS3.5 7.1",
            )
        if pydicom.uid.UID(transfer_syntax_uid).is_encapsulated:
            raise Refused(
                "pixel_data",
                "Pixel Data of an encapsulated transfer syntax has a defined "
                "length; DICOM PS3.5 A.4",
            )
        _check_native_length(held, rows, columns, samples, frames, bits)
        return
    if not pydicom.uid.UID(transfer_syntax_uid).is_encapsulated:
        raise Refused(
            "pixel_data", "native Pixel Data of undefined length; DICOM PS3.5 A.4"
        )
    with open(path, "rb") as stream:
        stream.seek(pixels.offset)
        _check_items(stream, size, frames, scan.extended_offset_table(ds))
        stream.seek(pixels.offset)
        _check_encapsulated(stream, transfer_syntax_uid, rows, columns, samples, frames)


# DICOM PS3.5 A.4: the Item and Sequence Delimitation Item tags of
# encapsulated Pixel Data.
ITEM = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"


def _check_items(
    stream: BinaryIO,
    size: int,
    frames: int,
    extended: tuple[bytes, bytes] | None,
) -> None:
    """Check the items of encapsulated Pixel Data, its value read from
    ``stream`` in a file of ``size`` bytes, without reading their values:
    each is whole, and a Sequence Delimitation Item ends them (DICOM PS3.5
    A.4), which pydicom's frame reader does not check in a file.

    The offsets of the Extended Offset Table, where ``extended`` holds it
    (its offsets and lengths), or else of a Basic Offset Table that is not
    empty, must each name the Item a frame starts with, one per frame, the
    first 0, in ascending order (DICOM PS3.5 A.4, PS3.3 C.7.6.3.1.8): frames
    are read through them, and an offset into a fragment would serve other
    bytes than the frame's.
    """
    table: _OffsetTable | None = None
    first = -1
    while True:
        head = stream.read(8)
        if len(head) < 8:
            raise Refused(
                "unreadable",
                "encapsulated Pixel Data ends before its Sequence Delimitation "
                "Item: the file is cut short; DICOM PS3.5 A.4",
            )
        if head[:4] == SEQUENCE_DELIMITER:
            break
        if head[:4] != ITEM:
            group, number = struct.unpack("<HH", head[:4])
            raise Refused(
                "pixel_data",
                f"encapsulated Pixel Data holds {BaseTag(group << 16 | number)} "
                "where an Item is due; DICOM PS3.5 A.4",
            )
        (length,) = struct.unpack("<L", head[4:])
        if stream.tell() + length > size:
            raise Refused(
                "unreadable",
                f"a fragment of encapsulated Pixel Data is {length} bytes long "
                f"in its Item, the file holds {max(size - stream.tell(), 0)}: "
                "the file is cut short; DICOM PS3.5 A.4",
            )
        if first < 0:
            # The first Item holds the Basic Offset Table; offsets count
            # from the Item after it.
            first = stream.tell() + length
            table = _OffsetTable.read(stream.read(length), extended, frames)
            continue
        if table is not None:
            table.meet(stream.tell() - 8 - first, length)
        stream.seek(length, 1)
    if table is not None:
        table.met_all()


class _OffsetTable:
    """The offsets of a Basic or Extended Offset Table, met one by one by
    the Items of the fragments as they are walked."""

    def __init__(self, name: str, offsets: Any, lengths: Any | None) -> None:
        self.name = name
        self.offsets = offsets
        self.lengths = lengths
        self.due = 0

    @classmethod
    def read(
        cls, basic: bytes, extended: tuple[bytes, bytes] | None, frames: int
    ) -> _OffsetTable | None:
        """The table frames are read through, or None when there is none;
        one that is malformed, or holds other than one offset a frame, is
        refused."""
        if extended is not None:
            name = "Extended Offset Table"
            offsets, lengths = extended
            if len(offsets) % 8 or len(lengths) != len(offsets):
                raise Refused(
                    "pixel_data",
                    f"the {name} holds {len(offsets)} bytes, its Lengths "
                    f"{len(lengths)}; DICOM PS3.3 C.7.6.3.1.8 wants 8 a frame "
                    "in each",
                )
            count = len(offsets) // 8
            table = cls(
                name,
                struct.unpack(f"<{count}Q", offsets),
                struct.unpack(f"<{count}Q", lengths),
            )
        elif not basic:
            return None
        else:
            name = "Basic Offset Table"
            if len(basic) % 4:
                raise Refused(
                    "pixel_data",
                    f"the {name} holds {len(basic)} bytes, no whole number of "
                    "32-bit offsets; DICOM PS3.5 A.4",
                )
            table = cls(name, struct.unpack(f"<{len(basic) // 4}L", basic), None)
        if len(table.offsets) != frames or table.offsets[0] != 0:
            raise Refused(
                "pixel_data",
                f"the {name} holds {len(table.offsets)} offsets, the first "
                f"{table.offsets[0] if table.offsets else 'none'}; DICOM PS3.5 "
                f"A.4 wants one a frame ({frames}), the first 0",
            )
        return table

    def meet(self, offset: int, length: int) -> None:
        """Meet the Item at ``offset``, its value ``length`` bytes long."""
        if self.due >= len(self.offsets):
            return
        wanted = self.offsets[self.due]
        if wanted < offset:
            self._not_an_item(wanted)
        if wanted == offset:
            if self.lengths is not None and not (
                length - 1 <= self.lengths[self.due] <= length
            ):
                raise Refused(
                    "pixel_data",
                    f"the {self.name} gives frame {self.due + 1} "
                    f"{self.lengths[self.due]} bytes, its fragment holds "
                    f"{length}; DICOM PS3.3 C.7.6.3.1.8",
                )
            self.due += 1

    def met_all(self) -> None:
        """Refuse a table whose offsets lie past the last Item."""
        if self.due < len(self.offsets):
            self._not_an_item(self.offsets[self.due])

    def _not_an_item(self, offset: int) -> None:
        raise Refused(
            "pixel_data",
            f"the {self.name} names offset {offset} for frame {self.due + 1}, "
            "where no Item starts, or out of ascending order; DICOM PS3.5 A.4",
        )


def _check_native_length(
    held: int, rows: int, columns: int, samples: int, frames: int, bits: int
) -> None:
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if held < expected:
        raise Refused(
            "pixel_data",
            f"Pixel Data holds {held} bytes; {rows}x{columns}x{samples} "
            f"at {bits} bits x {frames} frames needs {expected}; "
            "DICOM PS3.5 8.1.1",
        )


def _check_encapsulated(
    source: Any,
    transfer_syntax_uid: str,
    rows: int,
    columns: int,
    samples: int,
    frames: int,
) -> None:
    """Check encapsulated Pixel Data (DICOM PS3.5 A.4), from bytes or a
    file positioned at its value, a frame at a time: as many frames as
    Number of Frames, each JPEG 2000 one's SIZ and each JPEG or JPEG-LS
    one's frame header as the Image Pixel module."""
    found = 0
    try:
        for number, fragments in enumerate(
            generate_fragmented_frames(source, number_of_frames=frames), start=1
        ):
            found = number
            head = b"".join(fragments[:1])
            if transfer_syntax_uid in JPEG2000TransferSyntaxes:
                _check_siz(head, number, rows, columns, samples)
            elif transfer_syntax_uid in JPEG_FRAME_SYNTAXES:
                _check_sof(head, number, rows, columns, samples)
    except Refused:
        raise
    except Exception as exc:
        raise Refused(
            "pixel_data", f"encapsulated Pixel Data is malformed: {exc}"
        ) from exc
    if found < frames:
        raise Refused(
            "pixel_data",
            f"encapsulated Pixel Data holds {found} of {frames} frames; "
            "DICOM PS3.5 A.4",
        )


def _check_pixel_value(ds: Dataset, value: bytes, transfer_syntax_uid: str) -> None:
    """Check Pixel Data read whole (a deflated data set's) against the Image
    Pixel module; DICOM PS3.5 8."""
    rows, columns, samples, bits = _image_pixel(ds)
    frames = _frames(ds)
    if not pydicom.uid.UID(transfer_syntax_uid).is_encapsulated:
        _check_native_length(len(value), rows, columns, samples, frames, bits)
        return
    _check_encapsulated(value, transfer_syntax_uid, rows, columns, samples, frames)


# The JPEG (ITU-T T.81) and JPEG-LS (ISO/IEC 14495-1) transfer syntaxes of
# DICOM PS3.5 A.4.1 and A.4.3, whose frames state their size in a frame
# header (SOFn).
JPEG_FRAME_SYNTAXES = frozenset(
    (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
    )
)
# ITU-T T.81 Table B.1: the SOFn markers (C0-CF but DHT C4, JPG C8, DAC
# CC), and JPEG-LS's SOF55 (ISO/IEC 14495-1 Table C.1).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# Markers that stand alone, without a length (T.81 B.1.1.3): TEM, RSTm.
_LONE_MARKERS = frozenset((0x01, *range(0xD0, 0xD8)))


def _check_sof(head: bytes, frame: int, rows: int, columns: int, samples: int) -> None:
    """Compare a JPEG or JPEG-LS frame header with the Image Pixel module.

    ITU-T T.81 B.2.2, ISO/IEC 14495-1 C.2.2: after SOFn and its length come
    P, Y (the lines), X (samples a line) and Nf (components). The frame is
    refused only when its header is found and contradicts the data set
    (a decoder allocates what the header says); Y of 0 (the lines given
    later, by a DNL marker) is not compared.
    """
    if not head.startswith(b"\xff\xd8"):
        raise Refused("pixel_data", f"frame {frame} is no JPEG stream (SOI)")
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return  # not a marker where one was due: left to the decoder
        marker = head[at + 1]
        if marker == 0xFF:
            at += 1  # fill byte (T.81 B.1.1.2)
            continue
        if marker in _LONE_MARKERS:
            at += 2
            continue
        (length,) = struct.unpack(">H", head[at + 2 : at + 4])
        if marker in _SOF_MARKERS:
            if at + 10 > len(head):
                return
            height, width = struct.unpack(">2H", head[at + 5 : at + 9])
            components = head[at + 9]
            if (width, components) != (columns, samples) or height not in (0, rows):
                raise Refused(
                    "pixel_data",
                    f"frame {frame} is {width}x{height} with {components} "
                    f"components in its JPEG frame header; the data set says "
                    f"{columns}x{rows} with {samples}; DICOM PS3.5 8.2.1",
                )
            return
        if marker == 0xDA:
            return  # a scan before any frame header: left to the decoder
        at += 2 + length


def _check_siz(head: bytes, frame: int, rows: int, columns: int, samples: int) -> None:
    """Compare a JPEG 2000 SIZ marker with the Image Pixel module.

    ISO/IEC 15444-1 A.5.1: after SOC and SIZ come Lsiz, Rsiz, Xsiz, Ysiz,
    XOsiz, YOsiz, four tile sizes, then Csiz.
    """
    if not head.startswith(J2K_SOC_SIZ) or len(head) < 42:
        raise Refused(
            "pixel_data", f"frame {frame} is no JPEG 2000 codestream (SOC, SIZ)"
        )
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", head[8:24])
    (csiz,) = struct.unpack(">H", head[40:42])
    width, height = xsiz - xosiz, ysiz - yosiz
    if (width, height, csiz) != (columns, rows, samples):
        raise Refused(
            "pixel_data",
            f"frame {frame} codestream is {width}x{height} with {csiz} components; "
            f"the data set says {columns}x{rows} with {samples}; DICOM PS3.5 8.2.4",
        )

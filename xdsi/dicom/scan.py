"""Study scanning: read DICOM headers from files and group them by study.

Implements the DICOM PS3.10 7.1 file format check, the identification of a
composite instance by the SOP Common, General Study and General Series
modules (DICOM PS3.3 C.12.1, C.7.2.1, C.7.3.1), the UID syntax of
DICOM PS3.5 9.1 and bounds on the sequence items of DICOM PS3.5 7.5.
"""

import filecmp
import logging
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import DicomDictionary, dictionary_VR, private_dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import ENCODED_VR, data_element_generator, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import converters

from xdsi import worker
from xdsi.dicom import qido
from xdsi.metadata.codes import Code

logger = logging.getLogger(__name__)

# The most a Deflated Explicit VR Little Endian data set (DICOM PS3.5 A.5)
# may inflate to, in bytes, and the piece it is inflated by to count them.
MAX_INFLATED = 256 << 20
INFLATE_CHUNK = 1 << 20
DEFLATED_UID = DeflatedExplicitVRLittleEndian.encode("ascii")
# (0002,0010) Transfer Syntax UID.
TRANSFER_SYNTAX_UID = 0x00020010
# The pixel data elements of DICOM PS3.3 C.7.6.3.1.4: Float, Double Float
# and Pixel Data.
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})
# Values longer than this are skipped, not read, where a file is read for
# what lies past them.
DEFER_SIZE = 1 << 20

# Modalities of objects that describe other instances; DICOM PS3.3 C.7.3.1.1.1.
DERIVED_MODALITIES = frozenset({"KO", "PR", "SR"})


class DicomInputError(Exception):
    """A file that cannot serve as a DICOM composite instance."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Raised in the worker process, it is pickled back to the caller.
        return (type(self), (self.path, self.reason))


class NotDicom(DicomInputError):
    """The file is not a DICOM PS3.10 file (no preamble, ``DICM`` or meta)."""


# The reason a file that is not DICOM at all is rejected for.
NOT_DICOM = "not DICOM: no PS3.10 preamble or File Meta"


class InvalidInstance(DicomInputError):
    """A DICOM file that lacks what identifies a composite instance."""


@dataclass(frozen=True)
class InstanceHeader:
    """What identifies one stored instance, read from its header alone."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    series_number: int | None
    instance_number: int | None
    # The latest of Acquisition DateTime and Acquisition Date + Time, a DT
    # without fraction or offset; "" when the instance records none.
    acquisition_datetime: str = ""
    # Its QIDO-RS attributes as DICOM JSON (xdsi.dicom.qido), for the
    # Imaging Document Source's index; None when not read.
    attributes: str | None = None


@dataclass(frozen=True)
class Patient:
    """Patient module attributes (DICOM PS3.3 C.7.1.1); "" when absent.

    ``issuer_of_patient_id`` is Issuer of Patient ID (0010,0021), or else the
    Universal Entity ID of an ISO item of the Issuer of Patient ID Qualifiers
    Sequence (0010,0024).
    """

    patient_id: str
    issuer_of_patient_id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Series:
    """One series of a study and its instances.

    ``instances`` are sorted by Instance Number, then SOP Instance UID.
    ``series_date`` and ``series_time`` come from the first instance read;
    ``last_acquisition_datetime`` is the latest acquisition of any instance as
    a DT without fraction or offset ("" when no instance records one).
    """

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instances: tuple[InstanceHeader, ...]
    series_date: str = ""
    series_time: str = ""
    last_acquisition_datetime: str = ""


@dataclass(frozen=True)
class Study:
    """One study: General Study module attributes, patient and series.

    ``issuer_of_accession_number`` is the Universal Entity ID of the Issuer
    of Accession Number Sequence (0008,0051) when its type is ISO, else its
    Local Namespace Entity ID, else "".
    """

    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    institution_name: str
    patient: Patient
    series: tuple[Series, ...]
    procedure_codes: tuple[Code, ...]
    issuer_of_accession_number: str = ""
    # Timezone Offset From UTC (0008,0201), "+HHMM" or "-HHMM": the offset
    # of the study's local dates and times; "" when not given.
    timezone_offset: str = ""

    @property
    def instances(self) -> tuple[InstanceHeader, ...]:
        """Every instance of the study, series by series."""
        return tuple(instance for s in self.series for instance in s.instances)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Sorted modalities of the study's instances (Modalities in Study,
        DICOM PS3.18 Table 10.6.3-3); KO, PR and SR only if alone. Each
        instance counts, not only each series' first: a series mixing an SR
        into CT images is a CT series still."""
        found = {i.modality for i in self.instances if i.modality}
        found |= {s.modality for s in self.series if s.modality}
        acquired = found - DERIVED_MODALITIES
        return tuple(sorted(acquired or found))


@dataclass(frozen=True)
class ScanResult:
    """Studies found under a directory and the files turned away, with why."""

    studies: tuple[Study, ...]
    rejected: tuple[tuple[Path, str], ...]


def read_header(path: Path) -> tuple[InstanceHeader, pydicom.Dataset]:
    """Read the header of one DICOM PS3.10 file, never its pixel data.

    Only a PS3.10 file with its File Meta Information is accepted (DICOM
    PS3.10 7.1); a bare data set is not DICOM here. The instance must carry a
    valid SOP Class, SOP Instance, Study Instance and Series Instance UID
    (DICOM PS3.5 9.1), so that a manifest can reference it. A data set of
    more sequence items than MAX_SEQUENCE_ITEMS, or nesting them deeper
    than MAX_SEQUENCE_DEPTH, is unreadable here (sequence_problem).

    Raises
    ------
    NotDicom
        The file has no DICOM preamble and File Meta Information.
    InvalidInstance
        The file is unreadable or lacks one of the identifying UIDs.
    """
    inflated = inflated_size_problem(path)
    if inflated is not None:
        raise InvalidInstance(path, f"unreadable: {inflated}")
    # Sequence items too many to build are counted before pydicom builds
    # one.
    sequences = sequence_problem(path)
    if sequences is not None:
        raise InvalidInstance(path, f"unreadable: {sequences}")
    # Untrusted input: any failure of the parser means the file is unreadable.
    # Values over DEFER_SIZE (an ICC profile, a private blob) are left in the
    # file until asked for: the header of a large instance is never whole in
    # memory.
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
        size = os.stat(path).st_size
    except InvalidDicomError as exc:
        raise NotDicom(path, NOT_DICOM) from exc
    except Exception as exc:
        raise InvalidInstance(path, f"unreadable: {type(exc).__name__}: {exc}") from exc

    try:
        header = _instance_header(path, size, ds)
    except InvalidInstance:
        raise
    except Exception as exc:
        raise InvalidInstance(path, f"unreadable: {type(exc).__name__}: {exc}") from exc
    return header, ds


def file_meta_elements(stream: BinaryIO) -> Iterator[RawDataElement]:
    """The File Meta Information elements of a DICOM file read from its
    start, as read (raw); past the last, ``stream`` is where the data set
    begins. The group is Explicit VR Little Endian whatever the file's
    transfer syntax (DICOM PS3.10 7.1).

    Raises
    ------
    InvalidDicomError
        No preamble and DICM prefix.
    """
    read_preamble(stream, False)
    yield from data_element_generator(  # type: ignore[misc]
        stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2
    )


def inflated_size_problem(path: Path) -> str | None:
    """Why a Deflated Explicit VR Little Endian data set is too large to
    read, or None (for any other file too).

    DICOM PS3.5 A.5: the data set after the File Meta is deflated whole, and
    pydicom inflates it whole in memory to read even its header. It is first
    inflated here a piece at a time and counted, so that a small file that
    inflates to gigabytes (a run of zeros) is refused before it fills the
    memory.
    """
    # Limitation: a data set inflating past MAX_INFLATED is refused, however
    # well-formed; this node reads no larger one in that transfer syntax.
    try:
        with open(path, "rb") as fp:
            syntax = None
            # The deflated data set follows the File Meta Information.
            for element in file_meta_elements(fp):
                if element.tag == TRANSFER_SYNTAX_UID:
                    syntax = bytes(element.value or b"").rstrip(b"\0 ")
            if syntax != DEFLATED_UID:
                return None
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            inflated = 0
            while chunk := fp.read(INFLATE_CHUNK):
                while chunk:
                    inflated += len(inflater.decompress(chunk, INFLATE_CHUNK))
                    if inflated > MAX_INFLATED:
                        return (
                            f"its deflated data set inflates past {MAX_INFLATED} "
                            "bytes, more than this node reads (DICOM PS3.5 A.5)"
                        )
                    chunk = inflater.unconsumed_tail
    except Exception:
        # What breaks here breaks the full read too, which says why.
        return None
    return None


# Sequence items (DICOM PS3.5 7.5) a data set may hold in all, at any depth,
# and how deep its sequences may nest. pydicom builds a Dataset of each item
# it reads, some 700 bytes of memory for an empty item of 8 bytes in the
# file: a 3.2 MB file of 200,000 empty items took 130 MiB and 12 s to check,
# and a peer may send many such files at once. Of the shared test objects
# the most hold 439 items (a KOS of 144 references) and nest 5 deep (an SR);
# an RT Structure Set of a hundred structures contoured on a few hundred
# slices holds tens of thousands (an item a contour, DICOM PS3.3 C.8.8.6),
# an Enhanced multi-frame image some ten a frame (its Per-frame Functional
# Groups Sequence, DICOM PS3.3 C.7.6.16), an SR content tree a level a
# nested content item (DICOM PS3.3 C.17.3), rarely past ten.
# Limitation: an object of more items all the same (an Enhanced MR of some
# ten thousand frames as one instance) is refused as unreadable, and one
# just within them still takes some 70 MB to read and check.
MAX_SEQUENCE_ITEMS = 100_000
MAX_SEQUENCE_DEPTH = 64
# DICOM PS3.5 7.5: Item, Item Delimitation Item and Sequence Delimitation
# Item tags, and the length of a value that a delimiter ends.
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# The bytes read at a time where a value of undefined length is searched for
# its Sequence Delimitation Item.
SCAN_CHUNK = 1 << 16


class _TooComplex(Exception):
    """A data set holding more sequence items, or nesting them deeper, than
    this node reads."""


def sequence_problem(path: Path) -> str | None:
    """Why a file's data set holds too many sequence items, or nests its
    sequences too deep, to be read (MAX_SEQUENCE_ITEMS, MAX_SEQUENCE_DEPTH);
    None for any other file.

    DICOM PS3.5 7.5: a sequence holds items, each a data set of its own.
    The file is walked before pydicom reads it, element headers only, the
    values of other elements skipped: its memory stays that of the deepest
    nesting, however many items there are. The walk tells a sequence and an
    item as pydicom does, leniencies included (an item in the other VR
    encoding, any tag taken for an Item, an undefined length UN as a
    sequence, a private element by the private dictionary), so that it
    counts at least the items pydicom would build; what it cannot walk, it
    leaves to the full read to refuse.
    """
    walk = _SequenceWalk()
    try:
        with open(path, "rb") as fp:
            if fp.read(132)[128:] != b"DICM":
                return None
            stream = _Stream(fp)
            # The File Meta (DICOM PS3.10 7.1) and any Command Set elements
            # (DICOM PS3.7 6.3), which pydicom reads before the data set.
            walk.data_set(stream, False, True, stop=lambda tag: tag >> 16 != 2)
            walk.data_set(stream, True, True, stop=lambda tag: tag >> 16 != 0)
            implicit, little, deflated = _encoding(walk.transfer_syntax, stream)
            if not deflated:
                walk.data_set(stream, implicit, little)
                return None
            with tempfile.TemporaryFile() as inflated:
                if not _inflate(fp, inflated):
                    return None
                inflated.seek(0)
                walk.data_set(_Stream(inflated), implicit, little)
    except _TooComplex as exc:
        return str(exc)
    except Exception:
        # What breaks here breaks the full read too, which says why.
        return None
    return None


def _encoding(syntax: bytes | None, stream: "_Stream") -> tuple[bool, bool, bool]:
    """Whether a data set is read as Implicit VR, as Little Endian and
    inflated first, as pydicom reads it: by its Transfer Syntax UID, or else
    by the look of its first element."""
    if syntax is None:
        start = stream.tell()
        head = stream.read(6)
        stream.seek(start)
        if len(head) < 6 or head[4:6].decode("latin-1") not in converters:
            return True, True, False
        (group,) = struct.unpack("<H", head[:2])
        return False, group < 1024, False
    uid = UID(syntax.rstrip(b"\0 ").decode("latin-1"))
    if uid == ImplicitVRLittleEndian:
        return True, True, False
    if uid == ExplicitVRBigEndian:
        return False, False, False
    if uid == DeflatedExplicitVRLittleEndian:
        return False, True, True
    if uid in PrivateTransferSyntaxes:
        return uid.is_implicit_VR, uid.is_little_endian, False
    return False, True, False


def _inflate(source: BinaryIO, target: BinaryIO) -> bool:
    """Inflate the rest of ``source`` into ``target``; False when it
    inflates past MAX_INFLATED, which inflated_size_problem refuses."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    while chunk := source.read(INFLATE_CHUNK):
        while chunk:
            piece = inflater.decompress(chunk, INFLATE_CHUNK)
            inflated += len(piece)
            if inflated > MAX_INFLATED:
                return False
            target.write(piece)
            chunk = inflater.unconsumed_tail
    return True


class _Stream:
    """A seekable file read within an end: a value pydicom reads apart, as
    it does a sequence of defined length, ends where the value does."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.tell = fp.tell
        self.seek = fp.seek

    def read(self, size: int, end: int | None = None) -> bytes:
        if end is not None:
            size = min(size, end - self._fp.tell())
            if size <= 0:
                return b""
        return self._fp.read(size)


class _SequenceWalk:
    """A walk over the element headers of a data set, counting its sequence
    items and their depth as pydicom would read them."""

    def __init__(self) -> None:
        self.items = 0
        self.transfer_syntax: bytes | None = None

    def data_set(
        self,
        stream: _Stream,
        implicit: bool,
        little: bool,
        *,
        until: int | None = None,
        end: int | None = None,
        depth: int = 0,
        in_sequence: bool = False,
        stop: Callable[[int], bool] | None = None,
    ) -> None:
        """Walk the elements of one data set: those before ``until`` (all,
        when None, to an Item Delimitation Item), none past ``end``; the
        first for which ``stop`` is true is left unread."""
        implicit = self._implicit(stream, implicit, end, in_sequence)
        order = "<" if little else ">"
        creators: dict[tuple[int, int], bytes] = {}
        while until is None or stream.tell() < until:
            start = stream.tell()
            head = stream.read(8, end)
            if len(head) < 8:
                return
            vr = None
            if implicit:
                group, element, length = struct.unpack(order + "HHL", head)
            else:
                group, element, raw_vr, length = struct.unpack(order + "HH2sH", head)
                if raw_vr in ENCODED_VR:
                    vr = raw_vr.decode("ascii")
                    if vr in EXPLICIT_VR_LENGTH_32:
                        extended = stream.read(4, end)
                        if len(extended) < 4:
                            return
                        (length,) = struct.unpack(order + "L", extended)
                elif not b"AA" <= raw_vr <= b"ZZ":
                    # pydicom reads this one element as Implicit VR.
                    group, element, length = struct.unpack(order + "HHL", head)
                else:
                    vr = raw_vr.decode("latin-1")
            tag = group << 16 | element
            if tag == ITEM_DELIMITER:
                return
            if stop is not None and stop(tag):
                stream.seek(start)
                return
            if length == UNDEFINED_LENGTH:
                if self._undefined_is_sequence(stream, tag, vr, little, end):
                    self.sequence(stream, implicit, little, None, end, depth + 1)
                else:
                    _skip_undefined(stream, little, end)
                continue
            value = stream.tell()
            if group & 1 and 0x10 <= element <= 0xFF:
                creators[(group, element)] = stream.read(min(length, 1024), end)
            elif tag == TRANSFER_SYNTAX_UID and depth == 0:
                self.transfer_syntax = stream.read(length, end)
            elif _defined_is_sequence(tag, vr, creators):
                inner = value + length if end is None else min(value + length, end)
                self.sequence(stream, implicit, little, inner, inner, depth + 1)
            stream.seek(value + length)

    def sequence(
        self,
        stream: _Stream,
        implicit: bool,
        little: bool,
        until: int | None,
        end: int | None,
        depth: int,
    ) -> None:
        """Walk the items of a sequence, counting them: those before
        ``until`` (all, when None, to a Sequence Delimitation Item). pydicom
        takes any tag but that delimiter's for an Item."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise _TooComplex(
                f"the data set nests sequences more than {MAX_SEQUENCE_DEPTH} deep "
                "(DICOM PS3.5 7.5), deeper than this node reads"
            )
        order = "<" if little else ">"
        while until is None or stream.tell() < until:
            head = stream.read(8, end)
            if len(head) < 8:
                return
            group, element, length = struct.unpack(order + "HHL", head)
            if group << 16 | element == SEQUENCE_DELIMITER:
                return
            self.items += 1
            if self.items > MAX_SEQUENCE_ITEMS:
                raise _TooComplex(
                    f"the data set holds more than {MAX_SEQUENCE_ITEMS} sequence items "
                    "(DICOM PS3.5 7.5), more than this node reads"
                )
            item_end = None if length == UNDEFINED_LENGTH else stream.tell() + length
            self.data_set(
                stream,
                implicit,
                little,
                until=item_end,
                end=end,
                depth=depth,
                in_sequence=True,
            )

    @staticmethod
    def _implicit(
        stream: _Stream, assumed: bool, end: int | None, in_sequence: bool
    ) -> bool:
        """Whether pydicom reads a data set as Implicit VR: an item of an
        Implicit VR one always, else as its first element looks (DICOM PS3.5
        6.2.2 lets an item of an undefined length UN be Implicit VR)."""
        if in_sequence and assumed:
            return True
        start = stream.tell()
        head = stream.read(6, end)
        stream.seek(start)
        if len(head) < 6:
            return assumed
        return not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)

    @staticmethod
    def _undefined_is_sequence(
        stream: _Stream, tag: int, vr: str | None, little: bool, end: int | None
    ) -> bool:
        """Whether pydicom reads a value of undefined length as a sequence:
        SQ, UN (DICOM PS3.5 6.2.2), or in Implicit VR, SQ in the data
        dictionary or, for a tag it does not know, a value starting with an
        Item."""
        if vr is not None:
            return vr in ("SQ", "UN")
        try:
            return bool(DicomDictionary[tag][0] == "SQ")
        except KeyError:
            start = stream.tell()
            head = stream.read(4, end)
            stream.seek(start)
            return len(head) == 4 and _tag(head, little) == ITEM


def _tag(head: bytes, little: bool) -> int:
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    return group << 16 | element


def _defined_is_sequence(
    tag: int, vr: str | None, creators: dict[tuple[int, int], bytes]
) -> bool:
    """Whether pydicom reads a value of defined length as a sequence, once
    asked for it: SQ, or, in Implicit VR or as UN, SQ in the data dictionary
    or, for a private element, in the private dictionary under the private
    creator the data set names (DICOM PS3.5 7.8.1)."""
    if vr == "SQ":
        return True
    if vr not in (None, "UN"):
        return False
    group, element = tag >> 16, tag & 0xFFFF
    if not group & 1:
        try:
            return bool(dictionary_VR(tag) == "SQ")
        except KeyError:
            return False
    creator = creators.get((group, element >> 8))
    if creator is None:
        return False
    text = creator.decode("latin-1")
    for name in {text.rstrip("\0 "), text.strip("\0 ")}:
        try:
            if private_dictionary_VR(tag, name) == "SQ":
                return True
        except KeyError:
            continue
    return False


def _skip_undefined(stream: _Stream, little: bool, end: int | None) -> None:
    """Skip a value of undefined length that is no sequence, to past its
    Sequence Delimitation Item, as pydicom does: by its Items when it is
    encapsulated (DICOM PS3.5 A.4), else by searching for the delimiter."""
    start = stream.tell()
    while True:
        head = stream.read(8, end)
        if len(head) < 8:
            break
        tag = _tag(head, little)
        if tag == SEQUENCE_DELIMITER:
            return
        if tag != ITEM:
            break
        (length,) = struct.unpack("<L" if little else ">L", head[4:])
        stream.seek(stream.tell() + length)
    stream.seek(start)
    delimiter = struct.pack("<HH" if little else ">HH", 0xFFFE, 0xE0DD)
    while chunk := stream.read(SCAN_CHUNK, end):
        found = chunk.find(delimiter)
        if found >= 0:
            stream.seek(stream.tell() - len(chunk) + found + 8)
            return
        if len(chunk) < SCAN_CHUNK:
            return
        stream.seek(stream.tell() - 3)


@dataclass(frozen=True)
class PixelElement:
    """Where a file's pixel data element is: its tag, the offset of its
    value and its length (0xFFFFFFFF, undefined, when encapsulated)."""

    tag: int
    offset: int
    length: int


def pixel_element(path: Path, transfer_syntax_uid: str) -> PixelElement | None:
    """Find the top-level pixel data element of a file (not deflated), or
    None when the data set has none; the values before it are skipped,
    not read."""
    syntax = UID(transfer_syntax_uid)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    order = "<" if little else ">"
    with open(path, "rb") as stream:
        # The File Meta Information, then the data set up to the pixel data
        # element, whose header the reader leaves unread.
        for _ in file_meta_elements(stream):
            pass
        for _ in data_element_generator(
            stream,
            implicit,
            little,
            stop_when=lambda tag, vr, length: tag in PIXEL_TAGS,
            defer_size=DEFER_SIZE,
        ):
            pass
        head = stream.read(8)
        if len(head) < 8:
            return None
        group, number = struct.unpack(f"{order}HH", head[:4])
        tag = group << 16 | number
        if tag not in PIXEL_TAGS:
            return None
        if implicit:
            (length,) = struct.unpack(f"{order}L", head[4:])
        else:
            # OB, OW, OF, OD: a 4-byte length after the VR and two reserved
            # bytes (DICOM PS3.5 7.1.2).
            extended = stream.read(4)
            if len(extended) < 4:
                return PixelElement(tag, stream.tell(), 0)
            (length,) = struct.unpack(f"{order}L", extended)
        return PixelElement(tag, stream.tell(), length)


def extended_offset_table(ds: pydicom.Dataset) -> tuple[bytes, bytes] | None:
    """Extended Offset Table and its Lengths (DICOM PS3.3 C.7.6.3), when the
    data set holds both: the frames of its encapsulated Pixel Data are read
    through them."""
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        return (
            bytes(ds.ExtendedOffsetTable or b""),
            bytes(ds.ExtendedOffsetTableLengths or b""),
        )
    return None


def scan_directory(path: Path) -> ScanResult:
    """Scan every regular file under ``path`` and group instances by study.

    Headers only. A file that cannot be read, or repeats a SOP Instance UID
    already read, is rejected with its reason; how many were is logged at
    WARNING, each path with its reason at DEBUG. Study and patient
    attributes are those of the first instance read of each study.
    """
    result = scan_files(_regular_files(path))
    logger.debug(
        "Scanned %s: %d studies, %d files rejected",
        path,
        len(result.studies),
        len(result.rejected),
    )
    return result


def scan_files(paths: Iterable[Path]) -> ScanResult:
    """Read the headers of ``paths`` and group the instances by study.

    Rejects files as :func:`scan_directory` does. Of many files, the first
    half is read in the worker process (:mod:`xdsi.worker`) while this one
    reads the second.
    """
    files = list(paths)
    if len(files) < worker.MIN_INSTANCES:
        result = _scan(files)
    else:
        half = len(files) // 2
        first = worker.submit(_scan, files[:half])
        second = _scan(files[half:])
        earlier = worker.result(first, half, _scan, files[:half])
        result = _joined(earlier, second)
        # Rejections in the order the files were named, as one scan gives.
        order = {file: n for n, file in enumerate(files)}
        rejected = sorted(result.rejected, key=lambda item: order[item[0]])
        result = replace(result, rejected=tuple(rejected))
    result = _without_conflicts(result)
    # A folder may be named after its patient: paths are logged at DEBUG
    # only; the caller has them in the result.
    for file, reason in result.rejected:
        logger.debug("Rejected %s: %s", file, reason)
    if result.rejected:
        logger.warning(
            "Rejected %d of %d files (each with its reason at DEBUG)",
            len(result.rejected),
            len(files),
        )
    return result


def _scan(files: list[Path]) -> ScanResult:
    """Read and group ``files`` in this process, logging nothing."""
    studies: dict[str, _StudyBuilder] = {}
    rejected: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}

    for file in files:
        try:
            header, ds = read_header(file)
        except DicomInputError as exc:
            rejected.append((file, exc.reason))
            continue
        first = seen.get(header.sop_instance_uid)
        if first is not None:
            rejected.append((file, _duplicate(first)))
            continue
        seen[header.sop_instance_uid] = file
        builder = studies.get(header.study_instance_uid)
        if builder is None:
            builder = studies[header.study_instance_uid] = _StudyBuilder()
        builder.add(header, ds)

    return ScanResult(
        studies=tuple(studies[uid].build() for uid in sorted(studies)),
        rejected=tuple(rejected),
    )


def _without_conflicts(result: ScanResult) -> ScanResult:
    """Reject both files of a SOP Instance UID read twice with other bytes.

    A repeat with the same bytes (a second copy on the same CD) is rejected
    alone. With other bytes, one of the two is not the instance (a copy cut
    short, say), and a header does not tell which: neither is kept (DICOM
    PS3.3 C.12.1.1.1, one SOP Instance UID names one instance).
    """
    kept = {_duplicate(i.path): i for study in result.studies for i in study.instances}
    conflicts: dict[str, tuple[Path, str]] = {}
    rejected: list[tuple[Path, str]] = []
    for path, reason in result.rejected:
        first = kept.get(reason)
        if first is None or _same_bytes(first.path, path):
            rejected.append((path, reason))
            continue
        other = (
            f"SOP Instance UID {first.sop_instance_uid} is also in {{}} with other "
            "content; neither file is taken"
        )
        rejected.append((path, other.format(first.path)))
        conflicts.setdefault(first.sop_instance_uid, (first.path, other.format(path)))
    if not conflicts:
        return result
    rejected.extend(conflicts.values())
    studies = []
    for study in result.studies:
        series = []
        for one in study.series:
            left = [i for i in one.instances if i.sop_instance_uid not in conflicts]
            if len(left) == len(one.instances):
                series.append(one)
            elif left:
                series.append(_holding(one, left))
        if series:
            studies.append(replace(study, series=tuple(series)))
    return ScanResult(studies=tuple(studies), rejected=tuple(rejected))


def _same_bytes(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes; unreadable counts as not."""
    try:
        return filecmp.cmp(first, second, shallow=False)
    except OSError:
        return False


def _duplicate(first: Path) -> str:
    return f"duplicate SOP Instance UID, already read from {first}"


def _joined(first: ScanResult, second: ScanResult) -> ScanResult:
    """One scan of the files of ``first`` followed by those of ``second``.

    Study, patient and series attributes come from the study's or series'
    first instance (see :class:`_StudyBuilder`), whichever files hold it,
    and an instance of the second files already read among the first is
    rejected.
    """
    # Limitation: when the first file of a study or series among the second
    # files repeats a SOP Instance UID of the first files, the attributes of
    # that study or series are still read from it, where one scan would
    # take the next file's.
    seen = {i.sop_instance_uid: i.path for s in first.studies for i in s.instances}
    rejected = list(first.rejected)
    renamed: dict[str, str] = {}
    studies = {study.study_instance_uid: study for study in first.studies}
    for study in second.studies:
        series = []
        for one in study.series:
            fresh = []
            for instance in one.instances:
                if instance.sop_instance_uid in seen:
                    path = seen[instance.sop_instance_uid]
                    rejected.append((instance.path, _duplicate(path)))
                    # Its own repeats among the second files name the file
                    # read first.
                    renamed[_duplicate(instance.path)] = _duplicate(path)
                else:
                    fresh.append(instance)
            if fresh:
                series.append(_holding(one, fresh))
        if not series:
            continue
        study = replace(study, series=tuple(series))
        earlier = studies.get(study.study_instance_uid)
        if earlier is None:
            studies[study.study_instance_uid] = study
            continue
        by_uid = {s.series_instance_uid: s for s in earlier.series}
        for one in series:
            held = by_uid.get(one.series_instance_uid)
            if held is None:
                by_uid[one.series_instance_uid] = one
                continue
            instances = sorted(held.instances + one.instances, key=_instance_order)
            first = min(held, one, key=lambda s: _instance_order(s.instances[0]))
            by_uid[one.series_instance_uid] = _holding(first, instances)
        first_study = min(earlier, study, key=_first_instance_order)
        studies[study.study_instance_uid] = replace(
            first_study, series=tuple(sorted(by_uid.values(), key=_series_order))
        )
    rejected.extend((path, renamed.get(why, why)) for path, why in second.rejected)
    return ScanResult(
        studies=tuple(studies[uid] for uid in sorted(studies)),
        rejected=tuple(rejected),
    )


def _holding(series: Series, instances: list[InstanceHeader]) -> Series:
    """``series`` with these instances, its last acquisition theirs."""
    return replace(
        series,
        instances=tuple(instances),
        last_acquisition_datetime=_last_acquisition(instances),
    )


def _last_acquisition(instances: Iterable[InstanceHeader]) -> str:
    return max((i.acquisition_datetime for i in instances), default="")


def _instance_order(instance: InstanceHeader) -> tuple[bool, int, str]:
    """Instances by Instance Number, then SOP Instance UID."""
    number = instance.instance_number
    return (number is None, number or 0, instance.sop_instance_uid)


def _first_instance_order(study: Study) -> tuple[bool, int, str, bool, int, str]:
    """Where a study's first instance stands among those of its series."""
    series = study.series[0]
    return (*_series_order(series), *_instance_order(series.instances[0]))


def _series_order(series: Series) -> tuple[bool, int, str]:
    """Series by Series Number, then Series Instance UID."""
    number = series.series_number
    return (number is None, number or 0, series.series_instance_uid)


def _regular_files(path: Path) -> list[Path]:
    """Every regular file under ``path``, recursively, in sorted order."""
    return list(regular_files(path))


def regular_files(path: Path) -> Iterator[Path]:
    """Every regular file under ``path`` as found, each folder's files in
    sorted order before its subfolders, symbolic links left out.

    The walk keeps its own stack, so that a folder tree of any depth (a CD
    made thousands of folders deep) is walked rather than overflowing
    Python's recursion limit; a folder that cannot be listed is passed
    over, as os.walk passes it.
    """
    folders = [path]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                yield Path(entry.path)
        folders.extend(
            Path(entry.path)
            for entry in reversed(entries)
            if entry.is_dir(follow_symlinks=False)
        )


def _instance_header(path: Path, size: int, ds: pydicom.Dataset) -> InstanceHeader:
    """Check the identifying UIDs and build the header; DICOM PS3.3 C.12.1."""
    uids = {}
    for keyword, tag in (
        ("SOPInstanceUID", "(0008,0018)"),
        ("SOPClassUID", "(0008,0016)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
    ):
        value = _text(ds, keyword)
        if not value:
            raise InvalidInstance(path, f"no {keyword} {tag}")
        if not UID(value).is_valid:
            raise InvalidInstance(
                path, f"{keyword} {value!r} is not a valid UID; DICOM PS3.5 9.1"
            )
        uids[keyword] = value

    transfer_syntax_uid = _text(ds.file_meta, "TransferSyntaxUID")
    if not transfer_syntax_uid:
        raise InvalidInstance(path, "File Meta has no TransferSyntaxUID (0002,0010)")

    return InstanceHeader(
        path=path,
        size=size,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        modality=_text(ds, "Modality"),
        series_number=_integer(ds, "SeriesNumber"),
        instance_number=_integer(ds, "InstanceNumber"),
        acquisition_datetime=_acquisition_datetime(ds),
        attributes=qido.header_attributes(ds),
    )


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """The first value of an attribute as text, "" when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        value = value[0] if value else ""
    return str(value).strip()


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    """An IS attribute as an integer; None when absent or not a number."""
    try:
        return int(_text(ds, keyword))
    except ValueError:
        return None


def patient_id_issuers(ds: pydicom.Dataset) -> tuple[str, str]:
    """Issuer of Patient ID (0010,0021) and the issuer its Qualifiers
    Sequence (0010,0024) names (DICOM PS3.3 C.7.1.1), each "" when absent."""
    return (
        _text(ds, "IssuerOfPatientID"),
        _issuer(ds, "IssuerOfPatientIDQualifiersSequence"),
    )


def _items(ds: pydicom.Dataset, keyword: str) -> list[pydicom.Dataset]:
    """The items of a sequence attribute; none when it is absent, or
    encoded as another VR (which intake refuses, check.check_file)."""
    value = ds.get(keyword)
    return list(value) if isinstance(value, Sequence) else []


def _issuer(ds: pydicom.Dataset, sequence_keyword: str) -> str:
    """The ISO Universal Entity ID of an HL7v2 Hierarchic Designator item.

    Falls back to the Local Namespace Entity ID (DICOM PS3.3 10.14).
    """
    items = _items(ds, sequence_keyword)
    for item in items:
        if _text(item, "UniversalEntityIDType") == "ISO" and _text(
            item, "UniversalEntityID"
        ):
            return _text(item, "UniversalEntityID")
    for item in items:
        if _text(item, "LocalNamespaceEntityID"):
            return _text(item, "LocalNamespaceEntityID")
    return ""


def _acquisition_datetime(ds: pydicom.Dataset) -> str:
    """The latest of Acquisition DateTime and Acquisition Date + Time, bare.

    Fraction and UTC offset are dropped; the more precise value wins when
    both name the same day.
    """
    date = _text(ds, "AcquisitionDate")
    candidates = (
        _text(ds, "AcquisitionDateTime"),
        date + _text(ds, "AcquisitionTime") if date else "",
    )
    bare = (re.split(r"[.+-]", value)[0] for value in candidates)
    return max((value for value in bare if value.isdigit()), default="")


class _SeriesBuilder:
    """Instances of one series as they are read; the series' attributes are
    those of its first instance (by Instance Number, then SOP Instance UID),
    whatever order the files are read in."""

    def __init__(self) -> None:
        self.instances: list[InstanceHeader] = []
        self._first: tuple[bool, int, str] | None = None

    def add(self, header: InstanceHeader, ds: pydicom.Dataset) -> None:
        self.instances.append(header)
        order = _instance_order(header)
        if self._first is None or order < self._first:
            self._first = order
            self.modality = _text(ds, "Modality")
            self.series_number = _integer(ds, "SeriesNumber")
            self.series_description = _text(ds, "SeriesDescription")
            self.series_date = _text(ds, "SeriesDate")
            self.series_time = _text(ds, "SeriesTime")

    def build(self, series_instance_uid: str) -> Series:
        instances = sorted(self.instances, key=_instance_order)
        return Series(
            series_instance_uid=series_instance_uid,
            modality=self.modality,
            series_number=self.series_number,
            series_description=self.series_description,
            instances=tuple(instances),
            series_date=self.series_date,
            series_time=self.series_time,
            last_acquisition_datetime=_last_acquisition(instances),
        )


class _StudyBuilder:
    """A study's series, and its attributes as its first instance gives them
    (by Series Number, Series Instance UID, Instance Number, SOP Instance
    UID): instances that disagree (a StudyTime of its own, say) give the
    same study whatever order the files are read in."""

    def __init__(self) -> None:
        self.series: dict[str, _SeriesBuilder] = {}
        self._first: tuple[bool, int, str, bool, int, str] | None = None

    def add(self, header: InstanceHeader, ds: pydicom.Dataset) -> None:
        series = self.series.get(header.series_instance_uid)
        if series is None:
            series = self.series[header.series_instance_uid] = _SeriesBuilder()
        series.add(header, ds)
        number = _integer(ds, "SeriesNumber")
        order = (
            number is None,
            number or 0,
            header.series_instance_uid,
            *_instance_order(header),
        )
        if self._first is None or order < self._first:
            self._first = order
            self._read(ds)

    def _read(self, ds: pydicom.Dataset) -> None:
        self.ds_fields = {
            keyword: _text(ds, keyword)
            for keyword in (
                "StudyInstanceUID",
                "AccessionNumber",
                "StudyID",
                "StudyDate",
                "StudyTime",
                "StudyDescription",
                "ReferringPhysicianName",
                "InstitutionName",
                "TimezoneOffsetFromUTC",
            )
        }
        self.issuer_of_accession_number = _issuer(ds, "IssuerOfAccessionNumberSequence")
        self.patient = Patient(
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=next(
                (issuer for issuer in patient_id_issuers(ds) if issuer), ""
            ),
            name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex"),
        )
        self.procedure_codes = tuple(
            Code(
                _text(item, "CodeValue"),
                _text(item, "CodingSchemeDesignator"),
                _text(item, "CodeMeaning"),
            )
            for item in _items(ds, "ProcedureCodeSequence")
            if _text(item, "CodeValue")
        )

    def build(self) -> Study:
        series = sorted(
            (builder.build(uid) for uid, builder in self.series.items()),
            key=_series_order,
        )
        fields = self.ds_fields
        return Study(
            study_instance_uid=fields["StudyInstanceUID"],
            accession_number=fields["AccessionNumber"],
            study_id=fields["StudyID"],
            study_date=fields["StudyDate"],
            study_time=fields["StudyTime"],
            study_description=fields["StudyDescription"],
            referring_physician_name=fields["ReferringPhysicianName"],
            institution_name=fields["InstitutionName"],
            patient=self.patient,
            series=tuple(series),
            procedure_codes=self.procedure_codes,
            issuer_of_accession_number=self.issuer_of_accession_number,
            timezone_offset=fields["TimezoneOffsetFromUTC"],
        )

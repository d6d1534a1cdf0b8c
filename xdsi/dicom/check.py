"""Intake checks: decide whether a received DICOM file may be stored.

Implements the DICOM PS3.10 7.1 file format check, the element lengths of
DICOM PS3.5 7.1, the Pixel Data length of DICOM PS3.5 8.1.1 and the
consistency of a JPEG 2000 codestream with the Image Pixel module (DICOM
PS3.5 8.2.4, ISO/IEC 15444-1 A.5.1). Each refusal names a row of
``profiles/intake_refusals.toml``, which maps it to the C-STORE status of
DICOM PS3.4 B.2.3 and the STOW-RS Failure Reason of DICOM PS3.18 10.5.3.
"""

from __future__ import annotations

import logging
import struct
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.tag import BaseTag
from pydicom.uid import JPEG2000TransferSyntaxes

from xdsi.dicom import scan
from xdsi.dicom.kos import is_image_sop_class
from xdsi.dicom.scan import (
    InstanceHeader,
    InvalidInstance,
    NotDicom,
    read_header,
)
from xdsi.profiles_loader import load_profile_table

logger = logging.getLogger(__name__)

# DICOM PS3.5 7.1.1: the length of an element whose value is delimited.
UNDEFINED_LENGTH = 0xFFFFFFFF

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
    (DICOM PS3.5 8.1.1); each JPEG 2000 frame's SIZ marker must agree with
    Rows, Columns and Samples per Pixel (DICOM PS3.5 8.2.4). When the
    request named a SOP Class or Instance UID (the C-STORE command's
    Affected SOP Class and Instance UIDs, DICOM PS3.7 9.1.1.1), the data
    set must carry the same.

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

    # The header alone may parse where the whole file does not.
    try:
        ds = pydicom.dcmread(path)
        _check_elements(ds)
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
    if "PixelData" in ds:
        _check_pixel_data(ds, header.transfer_syntax_uid)
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
    return header, ds


# Attributes of the Image Pixel module (DICOM PS3.3 C.7.6.3), and the other
# pixel data elements that may stand for Pixel Data (C.7.6.3.1.4).
_IMAGE_PIXEL = {0x00280010, 0x00280011, 0x00280100}  # Rows, Columns, Bits Allocated
_OTHER_PIXEL_DATA = {0x7FE00008, 0x7FE00009}  # Float, Double Float Pixel Data


def _check_elements(ds: Dataset) -> None:
    """Check every element's length and value, sequences included."""
    for tag in list(ds.keys()):
        raw = ds._dict[tag]
        if (
            isinstance(raw, RawDataElement)
            and isinstance(raw.value, bytes)
            and raw.length != UNDEFINED_LENGTH
            and len(raw.value) < raw.length
        ):
            raise Refused(
                "unreadable",
                f"element {tag} is {len(raw.value)} bytes long, its header "
                f"says {raw.length}; DICOM PS3.5 7.1",
            )
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
                _check_elements(item)


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


def _check_pixel_data(ds: Dataset, transfer_syntax_uid: str) -> None:
    """Check Pixel Data against the Image Pixel module; DICOM PS3.5 8."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refused(
            "pixel_data", f"Pixel Data without a usable Image Pixel module: {exc}"
        ) from exc
    frames = _frames(ds)
    value = ds.PixelData
    if not pydicom.uid.UID(transfer_syntax_uid).is_encapsulated:
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if len(value) < expected:
            raise Refused(
                "pixel_data",
                f"Pixel Data holds {len(value)} bytes; {rows}x{columns}x{samples} "
                f"at {bits} bits x {frames} frames needs {expected}; "
                "DICOM PS3.5 8.1.1",
            )
        return
    try:
        encoded = list(generate_fragmented_frames(value, number_of_frames=frames))
    except Exception as exc:
        raise Refused(
            "pixel_data", f"encapsulated Pixel Data is malformed: {exc}"
        ) from exc
    if len(encoded) < frames:
        raise Refused(
            "pixel_data",
            f"encapsulated Pixel Data holds {len(encoded)} of {frames} frames; "
            "DICOM PS3.5 A.4",
        )
    if transfer_syntax_uid in JPEG2000TransferSyntaxes:
        for number, fragments in enumerate(encoded, start=1):
            _check_siz(b"".join(fragments[:1]), number, rows, columns, samples)


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

"""Intake checks over the shared single objects and malformed files."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.conftest import SHARED, dicom_path
from xdsi.dicom import scan
from xdsi.dicom.check import Refused, check_file, refusal_table
from xdsi.dicom.store_scu import Destination

# The rule each malformed file breaks (shared dicom/README.md, "bad/").
BAD = {
    "bad-sequence-un__bad_sequence.dcm": "identification",
    "bad-vr__badVR.dcm": "pixel_data",
    "corrupt-j2k-codestream__JPEG2000-embedded-sequence-delimiter.dcm": "pixel_data",
    "gzip-not-dicom__zipMR.gz": "not_dicom",
    "meta-missing-transfer-syntax__meta_missing_tsyntax.dcm": "identification",
    "no-preamble-no-meta-explicit__ExplVR_LitEndNoMeta.dcm": "not_dicom",
    "no-preamble-no-meta__no_meta.dcm": "not_dicom",
    "no-sop-class-uid": "identification",
    "no-study-series-uid": "identification",
    "pixeldata-too-short__emri_small_jpeg_2k_lossless_too_short.dcm": "unreadable",
    "truncated-dataset__rtplan_truncated.dcm": "unreadable",
    "truncated-pixeldata__MR_truncated.dcm": "unreadable",
    "wrong-byte-order-undefined-length": "unreadable",
}


def _bad(name: str) -> Path:
    """A file of bad/ by its whole name, or by the kind of defect its name
    starts with (``<kind>__<the public data set's own name>``)."""
    folder = dicom_path("bad")
    if (folder / name).exists():
        return folder / name
    (path,) = folder.glob(f"{name}__*")
    return path


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_malformed_file_is_refused_by_its_rule(name: str) -> None:
    """DICOM PS3.4 Table B.2-1: each malformed file is refused, and the rule
    maps to an A9xx or Cxxx status."""
    with pytest.raises(Refused) as refused:
        check_file(_bad(name))
    assert refused.value.rule == BAD[name]
    assert refused.value.dimse_status >> 8 in {0xA9, 0xC0}


def test_the_table_names_every_malformed_file_of_the_shared_set() -> None:
    """DICOM PS3.10 7.1: every shared malformed file has its expected rule."""
    assert {_bad(name).name for name in BAD} == {
        p.name for p in dicom_path("bad").iterdir()
    }


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (SHARED / "dicom" / "singles").glob("*.dcm"))
)
def test_each_single_object_passes(name: str) -> None:
    """DICOM PS3.5 7.1, 8.1.1, 8.2.4: every well-formed single object passes,
    compressed ones included."""
    header, _ = check_file(dicom_path("singles", name))
    assert header.sop_instance_uid


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("ts-jpeg-baseline-rgb__SC_rgb_jpeg_dcmtk.dcm", "Rows"),
        ("ts-jpeg-lossless-sv1__CT1_JPLL.dcm", "Columns"),
        ("ts-jpegls-lossless__CT1_JLSL.dcm", "Rows"),
        ("ts-jpegls-near-lossless__CT1_JLSN.dcm", "SamplesPerPixel"),
        ("ts-jpeg-extended-decodable__JPGExtended.dcm", "Columns"),
    ],
)
def test_a_jpeg_frame_whose_header_contradicts_the_image_is_refused(
    tmp_path: Path, name: str, change: str
) -> None:
    """ITU-T T.81 B.2.2, ISO/IEC 14495-1 C.2.2: a JPEG or JPEG-LS frame
    header stating another size or number of components than the Image
    Pixel module is refused at intake (a decoder allocates what the header
    says, a render of the smaller one shows a wrong image)."""
    ds = pydicom.dcmread(dicom_path("singles", name))
    if change == "SamplesPerPixel":
        ds.SamplesPerPixel = 3 if ds.SamplesPerPixel == 1 else 1
    else:
        ds[change].value = ds[change].value * 2
    lying = tmp_path / name
    ds.save_as(lying, enforce_file_format=True)

    with pytest.raises(Refused) as refused:
        check_file(lying)

    assert refused.value.rule == "pixel_data"
    assert "JPEG frame header" in str(refused.value)


def test_a_jpeg_frame_that_is_no_jpeg_stream_is_refused(tmp_path: Path) -> None:
    """ITU-T T.81 B.2.1: a JPEG frame opens with SOI."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-jpeg-lossless-sv1__CT1_JPLL.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([b"\x00\x00" + frame[2:]])
    lying = tmp_path / "no-soi.dcm"
    ds.save_as(lying, enforce_file_format=True)

    with pytest.raises(Refused) as refused:
        check_file(lying)

    assert refused.value.rule == "pixel_data"
    assert "no JPEG stream" in str(refused.value)


def test_a_request_naming_another_sop_instance_is_refused() -> None:
    """DICOM PS3.7 9.1.1.1: the data set must be the instance the C-STORE
    request names."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    with pytest.raises(Refused, match="in the request") as refused:
        check_file(path, sop_instance_uid="1.2.3.4")
    assert refused.value.dimse_status == 0xA900


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("MediaStorageSOPInstanceUID", "1.2.3.4"),
        ("MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.7"),
        ("MediaStorageSOPInstanceUID", None),
    ],
    ids=["other-instance", "other-class", "no-instance"],
)
def test_a_file_meta_naming_another_instance_is_refused(
    tmp_path: Path, keyword: str, value: str | None
) -> None:
    """DICOM PS3.10 7.1: the File Meta's Media Storage SOP Class and Instance
    UIDs are the data set's; a Consumer knows a retrieved file by them."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    if value is None:
        del ds.file_meta[keyword]
    else:
        setattr(ds.file_meta, keyword, value)
    ds.save_as(tmp_path / "named-other.dcm")

    with pytest.raises(Refused, match=f"File Meta {keyword}") as refused:
        check_file(tmp_path / "named-other.dcm")
    assert refused.value.rule == "identification"


def test_an_image_cut_short_just_before_its_pixel_data_is_refused(
    tmp_path: Path,
) -> None:
    """DICOM PS3.3 C.7.6.3: Pixel Data is Type 1 in the Image Pixel module; a
    copy that ends just before it parses whole, and is still no image."""
    data = dicom_path("singles", "ts-explicit-le__CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00")])
    with pytest.raises(Refused) as refused:
        check_file(cut)
    assert refused.value.rule == "pixel_data"
    assert "no Pixel Data" in refused.value.reason


def _cut_at(data: bytes, group: bytes) -> int:
    """Where the first element of a group starts (its tag, little endian)."""
    return data.index(group)


@pytest.mark.parametrize(
    ("source", "cut"),
    [
        # Before the Image Pixel module: no Rows, Columns or Pixel Data.
        (("study-ct", "S1000", "I0010.dcm"), lambda data: _cut_at(data, b"\x28\x00")),
        # Inside the header of the first element of that group: the parser
        # ends the data set at the tag it cannot read whole.
        (
            ("study-ct", "S1000", "I0010.dcm"),
            lambda data: _cut_at(data, b"\x28\x00") + 5,
        ),
        (("study-mr", "images", "000001.dcm"), lambda data: 3000),
    ],
    ids=["ct-before-image-pixel", "ct-inside-an-element-header", "mr-at-3000"],
)
def test_an_image_cut_short_before_its_image_pixel_module_is_refused(
    tmp_path: Path, source: tuple[str, ...], cut
) -> None:
    """DICOM PS3.3 C.7.6.3: an image Storage SOP Class instance holds Pixel
    Data; a copy cut short before it (an interrupted CD copy) is no image,
    wherever the cut falls."""
    data = dicom_path(*source).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: cut(data)])

    with pytest.raises(Refused) as refused:
        check_file(path)

    assert refused.value.rule in {"pixel_data", "unreadable"}
    assert refused.value.dimse_status in {0xC001, 0xC002}


def _float_image(tmp_path: Path, keyword: str, dtype: str) -> Path:
    """The bundled CT with its Pixel Data as Float or Double Float Pixel
    Data (DICOM PS3.3 C.7.6.24), a value a pixel."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated = ds.BitsStored = np.dtype(dtype).itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    setattr(ds, keyword, np.zeros(ds.Rows * ds.Columns, dtype=dtype).tobytes())
    path = tmp_path / "float.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("keyword", "dtype"),
    [("FloatPixelData", "<f4"), ("DoubleFloatPixelData", "<f8")],
    ids=["float", "double-float"],
)
def test_float_pixel_data_cut_short_or_too_short_is_refused(
    tmp_path: Path, keyword: str, dtype: str
) -> None:
    """DICOM PS3.5 7.1 and 8.1.1: Float and Double Float Pixel Data are held
    to their length and to Rows x Columns values, as Pixel Data is."""
    whole = _float_image(tmp_path, keyword, dtype)
    check_file(whole)

    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1000])
    with pytest.raises(Refused, match="cut short") as refused:
        check_file(cut)
    assert refused.value.rule == "unreadable"

    ds = pydicom.dcmread(whole)
    ds[keyword].value = ds[keyword].value[:800]
    ds.save_as(whole, enforce_file_format=True)
    with pytest.raises(Refused, match="Pixel Data holds 800 bytes") as refused:
        check_file(whole)
    assert refused.value.rule == "pixel_data"


def test_a_large_value_before_the_pixel_data_is_checked_unread(
    tmp_path: Path,
) -> None:
    """DICOM PS3.5 7.1: a value over scan.DEFER_SIZE (here a private one of
    32 MiB) is checked against the file's size, not read: neither the
    header nor the check holds it in memory."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    ds.private_block(0x0009, "XDSI TEST", create=True).add_new(
        0x10, "OB", bytes(32 << 20)
    )
    path = tmp_path / "large-value.dcm"
    ds.save_as(path, enforce_file_format=True)

    tracemalloc.start()
    try:
        scan.read_header(path)
        check_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 8 << 20


def _two_rle_frames(tmp_path: Path, extended: bool) -> tuple[Path, bytearray]:
    """The bundled RLE MR as two frames (its one frame twice), framed with
    a Basic Offset Table or an Extended Offset Table; its path and
    encapsulated Pixel Data, to be spoilt and saved again."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-rle__MR_small_RLE.dcm"))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.NumberOfFrames = 2
    if extended:
        data, offsets, lengths = encapsulate_extended([frame, frame])
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
    else:
        data = encapsulate([frame, frame], has_bot=True)
    ds.PixelData = data
    path = tmp_path / "two-frames.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, bytearray(data)


def _spoilt(path: Path, **values: bytes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_frames_framed_by_a_basic_or_extended_offset_table_pass(
    tmp_path: Path,
) -> None:
    check_file(_two_rle_frames(tmp_path, extended=False)[0])
    check_file(_two_rle_frames(tmp_path, extended=True)[0])


def test_a_basic_offset_table_naming_no_item_is_refused(tmp_path: Path) -> None:
    """DICOM PS3.5 A.4: each offset of the Basic Offset Table names the Item
    its frame starts with; one into a fragment would serve other bytes."""
    path, data = _two_rle_frames(tmp_path, extended=False)
    struct.pack_into("<L", data, 12, 3)  # frame 2, three bytes into frame 1

    with pytest.raises(Refused, match="names offset 3 for frame 2") as refused:
        check_file(_spoilt(path, PixelData=bytes(data)))
    assert refused.value.rule == "pixel_data"


@pytest.mark.parametrize(
    ("offsets", "lengths", "reason"),
    [
        ((0, 0), None, "names offset 0 for frame 2"),
        (None, (None, 1 << 40), "gives frame 2 1099511627776 bytes"),
        ((0,), None, "holds 8 bytes, its Lengths 16"),
    ],
    ids=["offset-repeated", "length-beyond-fragment", "fewer-offsets"],
)
def test_an_extended_offset_table_that_lies_is_refused(
    tmp_path: Path,
    offsets: tuple[int, ...] | None,
    lengths: tuple[int | None, ...] | None,
    reason: str,
) -> None:
    """DICOM PS3.3 C.7.6.3.1.8: the Extended Offset Table gives the offset
    of each frame's one fragment and its Lengths that fragment's length;
    frames are read through it."""
    path, _ = _two_rle_frames(tmp_path, extended=True)
    ds = pydicom.dcmread(path)
    held_offsets = struct.unpack("<2Q", ds.ExtendedOffsetTable)
    held_lengths = struct.unpack("<2Q", ds.ExtendedOffsetTableLengths)
    offsets = offsets or held_offsets
    lengths = tuple(
        held if wanted is None else wanted
        for held, wanted in zip(held_lengths, lengths or (None, None), strict=True)
    )

    spoilt = _spoilt(
        path,
        ExtendedOffsetTable=struct.pack(f"<{len(offsets)}Q", *offsets),
        ExtendedOffsetTableLengths=struct.pack("<2Q", *lengths),
    )
    with pytest.raises(Refused, match=reason) as refused:
        check_file(spoilt)
    assert refused.value.rule == "pixel_data"


def test_an_instance_of_no_image_sop_class_needs_no_pixel_data() -> None:
    """A Key Object Selection Document holds no pixels (DICOM PS3.3 A.35.4)."""
    header, _ = check_file(dicom_path("study-mr", "manifest", "kos.dcm"))
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientID", "CTRL\x01ID"),
        ("PatientID", "TAB\tID"),
        ("IssuerOfPatientID", "HOSP\x7f"),
    ],
    ids=["soh", "tab", "issuer-del"],
)
def test_a_patient_id_with_a_control_character_is_refused(
    tmp_path: Path, keyword: str, value: str
) -> None:
    """DICOM PS3.5 6.2: an LO value holds no control character; a Patient
    ID with one could be stored but never published (no XDS patientId or
    XML holds it), so intake refuses it with A900."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    setattr(ds, keyword, value)
    path = tmp_path / "ctrl.dcm"
    ds.save_as(path, enforce_file_format=True)

    with pytest.raises(Refused) as refused:
        check_file(path)

    assert refused.value.rule == "patient_id"
    assert refused.value.dimse_status == 0xA900
    assert refused.value.failure_reason == 0xA900


def _written(
    path: Path, ds: pydicom.Dataset, transfer_syntax_uid: str, *, implicit: bool
) -> bytes:
    """Write ``ds`` to ``path`` under a File Meta naming ``transfer_syntax_uid``,
    its data set in Implicit or Explicit VR Little Endian whatever that says
    (as a C-STORE SCP writes what came on a presentation context); return
    the bytes of the data set."""
    meta = DicomBytesIO()
    ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    write_dataset(body, ds)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue())
    return body.getvalue()


@pytest.mark.parametrize(
    ("transfer_syntax_uid", "implicit", "found"),
    [
        (ExplicitVRLittleEndian, True, "Implicit"),
        (ImplicitVRLittleEndian, False, "Explicit"),
    ],
    ids=["implicit-as-explicit", "explicit-as-implicit"],
)
def test_a_data_set_in_the_other_vr_encoding_than_its_transfer_syntax_is_refused(
    tmp_path: Path, transfer_syntax_uid: str, implicit: bool, found: str
) -> None:
    """DICOM PS3.5 10.1: the transfer syntax says the VR encoding. pydicom
    reads a data set in the other one as it finds it, but the file kept
    would name one and hold the other, which dcmtk, say, cannot read."""
    ds = pydicom.dcmread(dicom_path("singles", "sr-basic-text__reportsi.dcm"))
    path = tmp_path / "other-encoding.dcm"
    _written(path, ds, transfer_syntax_uid, implicit=implicit)

    with pytest.raises(Refused, match=f"data set is in {found} VR") as refused:
        check_file(path)
    assert refused.value.rule == "unreadable"


def test_a_file_meta_naming_no_transfer_syntax_is_refused(tmp_path: Path) -> None:
    """DICOM PS3.10 7.1, PS3.5 10: a data set whose File Meta names no
    transfer syntax cannot be read; it is refused, not taken for an error of
    this node's."""
    ds = pydicom.dcmread(dicom_path("singles", "sr-basic-text__reportsi.dcm"))
    path = tmp_path / "no-syntax.dcm"
    _written(path, ds, "1.2.3.4", implicit=False)

    with pytest.raises(Refused, match="names no transfer syntax") as refused:
        check_file(path)
    assert refused.value.rule == "unreadable"


@pytest.mark.parametrize("extra", range(1, 8))
def test_a_data_set_that_ends_inside_an_element_header_is_refused(
    tmp_path: Path, extra: int
) -> None:
    """DICOM PS3.5 7.1: a data set ends with a whole element. One cut within
    an element's 8-byte header is cut short, though pydicom reads the
    elements before as the whole; an instance with no Pixel Data (here a
    Key Object Selection Document) has no other sign of it."""
    ds = pydicom.dcmread(dicom_path("singles", "kos-manifest-1ref__ids-1001-kos.dcm"))
    path = tmp_path / "kos.dcm"
    body = _written(path, ds, ExplicitVRLittleEndian, implicit=False)
    whole = path.read_bytes()
    # Cut after the Series Instance UID, within the header of what follows.
    series = body.index(b"\x20\x00\x0e\x00")
    length = struct.unpack("<H", body[series + 6 : series + 8])[0]
    cut = len(whole) - len(body) + series + 8 + length + extra
    path.write_bytes(whole[:cut])

    with pytest.raises(Refused, match="no whole element header") as refused:
        check_file(path)
    assert refused.value.rule == "unreadable"


def test_a_value_of_undefined_length_that_is_no_sequence_is_refused(
    tmp_path: Path,
) -> None:
    """DICOM PS3.5 7.1.1: only a sequence and encapsulated Pixel Data have
    an undefined length. An OB of undefined length with no Sequence
    Delimitation Item after it swallows every element after it (a Key
    Object Selection Document's content here), which pydicom takes as its
    value."""
    ds = pydicom.dcmread(dicom_path("singles", "kos-manifest-1ref__ids-1001-kos.dcm"))
    path = tmp_path / "kos.dcm"
    body = _written(path, ds, ExplicitVRLittleEndian, implicit=False)
    whole = path.read_bytes()
    at = len(whole) - len(body) + body.index(b"\x40\x00\x40\xa0")  # Value Type
    private = (
        (struct.pack("<HH", 0x0039, 0x0010) + b"LO" + struct.pack("<H", 6) + b"XDSI  ")
        + struct.pack("<HH", 0x0039, 0x1000)
        + b"OB\0\0"
        + b"\xff" * 4
    )
    path.write_bytes(whole[:at] + private + whole[at:])

    with pytest.raises(Refused, match="undefined length") as refused:
        check_file(path)
    assert refused.value.rule == "unreadable"


def test_every_refusal_rule_has_both_statuses() -> None:
    """DICOM PS3.4 Table B.2-1, PS3.18 10.5.3.2: each rule maps to a failure
    status and a Failure Reason of the standard's ranges."""
    for row in refusal_table().values():
        assert row["dimse_status"] >> 8 in {0xA7, 0xA9, 0xC0}
        assert row["failure_reason"] in {0xA700, 0xA900, 0xC000}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
        (" PACS@localhost:104 ", Destination("PACS", "localhost", 104)),
    ],
)
def test_a_storage_scp_is_written_ae_at_host_colon_port(
    text: str, expected: Destination
) -> None:
    """DICOM PS3.5 6.2: AE@host:port names a storage SCP."""
    assert Destination.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["ORTHANC", "A_TITLE_LONGER_THAN_16@h:1", "AE@host:0", "AE@host:99999"]
)
def test_a_malformed_storage_scp_is_refused(text: str) -> None:
    """DICOM PS3.5 6.2: an AE title is at most 16 characters."""
    with pytest.raises(ValueError, match="AE@host:port"):
        Destination.parse(text)


def test_a_deflated_data_set_inflating_past_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.5 A.5: a small Deflated Explicit VR Little Endian file that
    inflates past scan.MAX_INFLATED (a run of zeros) is refused as
    unreadable before it is inflated whole; one within it passes."""
    monkeypatch.setattr(scan, "MAX_INFLATED", 4 << 20, raising=False)
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    ds.Rows, ds.Columns, ds.BitsAllocated = 2048, 2048, 8
    ds.BitsStored, ds.HighBit = 8, 7
    ds.PixelData = bytes(2048 * 2048)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "inflating.dcm", enforce_file_format=True)

    with pytest.raises(Refused, match="inflates past 4194304 bytes") as refused:
        check_file(tmp_path / "inflating.dcm")
    assert refused.value.rule == "unreadable"
    assert (tmp_path / "inflating.dcm").stat().st_size < 1 << 20
    check_file(dicom_path("singles", "ts-deflate__image_dfl.dcm"))


# An empty Referenced Image Sequence (0008,1140) as pydicom writes it in
# Explicit VR Little Endian, which with_sequence replaces.
EMPTY_SEQUENCE = b"\x08\x00\x40\x11SQ\x00\x00\x00\x00\x00\x00"
# DICOM PS3.5 7.5: Item, Item Delimitation and Sequence Delimitation Item
# headers, of undefined length and of none.
ITEM_OPEN = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_CLOSE = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_CLOSE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# What pydicom took 130 MiB and 12 s to read and check.
MANY = 200_000


def with_sequence(tmp_path: Path, element: bytes) -> Path:
    """An Explicit VR Little Endian CT image holding ``element`` where its
    Referenced Image Sequence is."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    ds.ReferencedImageSequence = []
    path = tmp_path / "sequences.dcm"
    ds.save_as(path, enforce_file_format=True)
    whole = path.read_bytes()
    assert whole.count(EMPTY_SEQUENCE) == 1
    path.write_bytes(whole.replace(EMPTY_SEQUENCE, element))
    return path


def empty_items(count: int) -> bytes:
    """A Referenced Image Sequence of ``count`` empty items, all of
    undefined length."""
    return (
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
        + (ITEM_OPEN + ITEM_CLOSE) * count
        + SEQUENCE_CLOSE
    )


def _nested(depth: int) -> bytes:
    """Referenced Image Sequences nested ``depth`` deep, each of one item."""
    opened = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + ITEM_OPEN
    return opened * depth + (ITEM_CLOSE + SEQUENCE_CLOSE) * depth


@pytest.mark.parametrize(
    ("element", "reason"),
    [
        pytest.param(
            empty_items(MANY), "more than 100000 sequence items", id="empty-items"
        ),
        pytest.param(
            # pydicom takes any 8 bytes in a sequence for an item.
            b"\x08\x00\x40\x11SQ\x00\x00"
            + struct.pack("<L", 8 * MANY)
            + bytes(8 * MANY),
            "more than 100000 sequence items",
            id="zeros-as-items",
        ),
        pytest.param(
            # DICOM PS3.5 6.2.2: a UN of undefined length is a sequence in
            # Implicit VR, its items read as such.
            b"\x09\x00\x10\x10UN\x00\x00\xff\xff\xff\xff"
            + (ITEM_OPEN + ITEM_CLOSE) * MANY
            + SEQUENCE_CLOSE,
            "more than 100000 sequence items",
            id="un-of-undefined-length",
        ),
        pytest.param(_nested(100), "nests sequences more than 64 deep", id="nested"),
    ],
)
def test_a_data_set_of_too_many_or_too_deep_sequence_items_is_refused_unbuilt(
    tmp_path: Path, element: bytes, reason: str
) -> None:
    """DICOM PS3.5 7.5: a data set holding more sequence items than
    scan.MAX_SEQUENCE_ITEMS, or nesting them deeper than
    scan.MAX_SEQUENCE_DEPTH, is refused as unreadable before pydicom builds
    a Dataset of each; the shared objects, 439 items and 5 deep at most,
    pass (test_each_single_object_passes)."""
    path = with_sequence(tmp_path, element)

    with pytest.raises(Refused, match=reason) as refused:
        check_file(path)
    assert refused.value.rule == "unreadable"
    with pytest.raises(scan.InvalidInstance, match=reason):
        scan.read_header(path)


def test_sequence_items_up_to_the_limits_pass(tmp_path: Path) -> None:
    """DICOM PS3.5 7.5: sequences nested as deep as scan.MAX_SEQUENCE_DEPTH
    are read and checked."""
    check_file(with_sequence(tmp_path, _nested(scan.MAX_SEQUENCE_DEPTH)))

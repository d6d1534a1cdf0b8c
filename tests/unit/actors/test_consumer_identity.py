"""The identity of an instance a RAD-69 answer returns: its File Meta
Information's Media Storage SOP Instance UID (DICOM PS3.10 7.1), read from
the first bytes the MTOM reader kept or, where they fall short, the file."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid

from tests.conftest import dicom_path
from xdsi import wire
from xdsi.actors.consumer import _media_storage_uid, _unlike
from xdsi.wire.mtom import HEAD_SIZE

SOURCE = dicom_path("study-ct", "S1000", "I0010.dcm")


def _attachment(path: Path, head: bytes | None = None) -> wire.Attachment:
    data = path.read_bytes()
    return wire.Attachment(
        content_id="x@peer",
        content_type="application/dicom",
        path=path,
        size=len(data),
        sha1=None,
        head=data[:HEAD_SIZE] if head is None else head,
    )


def _copy(tmp_path: Path, **meta: object) -> tuple[Path, str]:
    ds = pydicom.dcmread(SOURCE)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    path = tmp_path / "copy.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, uid


@pytest.mark.parametrize(
    "name",
    [
        "ts-explicit-le__CT_small.dcm",
        "ts-implicit-le__MR_small_implicit.dcm",
        "ts-explicit-be__MR_small_bigendian.dcm",
        "ts-deflate__image_dfl.dcm",
        "us-mf-jpeg-baseline__examples_ybr_color.dcm",
    ],
)
def test_the_uid_read_from_the_head_is_pydicoms(name: str) -> None:
    path = dicom_path("singles", name)
    expected = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)

    assert _media_storage_uid(_attachment(path)) == expected


@pytest.mark.parametrize("cut", [0, 100, 140, 200, -3])
def test_a_head_short_of_the_element_is_made_good_from_the_file(
    tmp_path: Path, cut: int
) -> None:
    """A head that ends before or inside (0002,0003) (the reader keeps
    HEAD_SIZE bytes; a peer's meta may be longer) is no answer: the file
    is read."""
    path, uid = _copy(tmp_path)
    data = path.read_bytes()
    end = data.index(uid.encode()) + len(uid)
    head = data[: end + cut] if cut < 0 else data[:cut]

    assert _media_storage_uid(_attachment(path, head)) == uid


def test_a_uid_past_the_head_is_read_from_the_file(tmp_path: Path) -> None:
    """An element before (0002,0003) longer than the head (a peer's odd
    File Meta Information Version) leaves the UID to the file."""
    path, uid = _copy(tmp_path, FileMetaInformationVersion=b"\x00\x01" * HEAD_SIZE)
    assert path.read_bytes().index(uid.encode()) > HEAD_SIZE

    assert _media_storage_uid(_attachment(path)) == uid
    assert _unlike(_attachment(path), uid) is None


def test_a_file_of_another_uid_or_no_dicom_file_is_unlike(tmp_path: Path) -> None:
    path, uid = _copy(tmp_path)
    text = tmp_path / "text"
    text.write_bytes(b"DICM, but no DICOM file")

    assert _unlike(_attachment(path), "1.2.3") == (
        f"asked for 1.2.3, got SOP Instance UID {uid}"
    )
    assert _unlike(_attachment(text), "1.2.3") == (
        "asked for 1.2.3, got a file that is no DICOM file"
    )

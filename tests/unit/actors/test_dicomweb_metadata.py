"""WADO-RS metadata of headers with values their VR does not allow (DICOM
PS3.18 10.4.3.3.2, Annex F)."""

from __future__ import annotations

import json

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from xdsi.actors.dicomweb import _metadata_document


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put ``value`` in ``ds`` as read from a file, converted when asked for."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_values_with_no_json_form_are_left_out_and_the_rest_sent() -> None:
    """RFC 8259 6: NaN and infinities are no JSON numbers, and an IS of
    letters is no number at all: each such attribute is left out, every
    other one sent, and the document is valid JSON."""
    ds = Dataset()
    ds.PatientID = "P1"
    _raw(ds, 0x00180050, "DS", b"NaN ")  # Slice Thickness
    _raw(ds, 0x00180088, "DS", b"1e999 ")  # Spacing Between Slices
    _raw(ds, 0x00200013, "IS", b"y8")  # Instance Number
    _raw(ds, 0x00200011, "IS", b"7 ")  # Series Number

    document = _metadata_document(ds)

    assert set(document) == {"00100020", "00200011"}
    assert json.loads(json.dumps(document, allow_nan=False)) == document


def test_bulk_data_is_named_under_the_instance_or_left_out() -> None:
    """DICOM PS3.18 F.2.6: a binary value over the threshold, and an
    image's Pixel Data, are BulkDataURIs under the instance's resource;
    with no resource to name, they are left out. A short one is inline."""
    ds = Dataset()
    ds.PatientID = "P1"
    ds.Rows = 2
    ds.BitsAllocated = 16
    ds.RedPaletteColorLookupTableData = b"\x01" * 8192
    ds.GreenPaletteColorLookupTableData = b"\x02" * 16
    url = "http://127.0.0.1:9083/dicomweb/studies/1/series/2/instances/3"

    named = _metadata_document(ds, url)
    bare = _metadata_document(ds)

    assert named["00281201"] == {"vr": "OW", "BulkDataURI": f"{url}/bulkdata/00281201"}
    assert named["7FE00010"] == {"vr": "OW", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    assert named["00281202"]["InlineBinary"]
    assert set(bare) == {"00100020", "00280010", "00280100", "00281202"}

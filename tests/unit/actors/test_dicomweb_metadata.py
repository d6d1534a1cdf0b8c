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

"""QIDO-RS attributes of an instance, read from its header for the index.

The attributes of DICOM PS3.18 Tables 10.6.3-3, 10.6.3-4 and 10.6.3-5 that
an instance's header gives are kept as DICOM JSON (DICOM PS3.18 F.2) when
the instance is taken in, so that a QIDO-RS query (DICOM PS3.18 10.6) is
answered from the store's rows without reading any file again.

How they are stored (imaging_instance, xdsi.store.schema):

- all of them as one DICOM JSON text per instance: an answer is that text
  cut to its level's attributes, byte for byte what pydicom wrote of the
  header, whatever the VR (PN groups, IS numbers, empty values), with no
  table per attribute to keep in step with the lists below;
- Patient ID, Patient Name, Accession Number, Study Date, Study Time and
  Modality once more, each in an indexed column (QIDO_COLUMNS): the keys a
  consumer narrows a search of a large store with. A column holds a single
  value of at most MAX_INDEXED_LENGTH characters and compares by code
  point, so that SQL equality, ranges and LIKE select a superset of what
  DICOM PS3.4 C.2.2.2 matches; every answer is then matched exactly on
  its DICOM JSON. Patient Name is kept as the text of all its component
  groups, case-folded, since this node matches names without regard to
  case. The other attributes are matched on the DICOM JSON alone: a search
  on them alone reads the first instance's row of every study in scope,
  but no file.

An extra table of (tag, value) rows would index every attribute, at the
cost of a join per key and a row per attribute and instance; the five
columns answer the searches RAD TF-3 4.129 consumers make (by patient, by
accession, by date, by modality) from one index each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from xdsi.logs import warnings_muted

logger = logging.getLogger(__name__)

# Attributes of each QIDO-RS level's answer, DICOM PS3.18 Tables 10.6.3-3,
# 10.6.3-4 and 10.6.3-5; they are also the attributes a query may match on.
STUDY_ATTRIBUTES = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_ATTRIBUTES = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "PerformedProcedureStepStartDate",
)
INSTANCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# What one instance's header gives: Modalities in Study is gathered over
# the study's instances when it is answered (DICOM PS3.18 10.6.3.3.1).
HEADER_ATTRIBUTES = tuple(
    keyword
    for keyword in STUDY_ATTRIBUTES + SERIES_ATTRIBUTES + INSTANCE_ATTRIBUTES
    if keyword != "ModalitiesInStudy"
)
_HEADER_TAGS = tuple(
    (keyword, tag_for_keyword(keyword), dictionary_VR(keyword))
    for keyword in HEADER_ATTRIBUTES
)
# The longest value an index column keeps; a longer one (no valid value is
# so long: DICOM PS3.5 Table 6.2-1) is matched on the DICOM JSON alone.
MAX_INDEXED_LENGTH = 256


def header_attributes(ds: Dataset) -> str:
    """The QIDO-RS attributes of a header as DICOM JSON (DICOM PS3.18 F.2).

    Each attribute present is kept under its dictionary VR, as a QIDO-RS
    answer carries it, empty ones included; one whose value cannot be
    written as DICOM JSON (a value its VR does not allow) is left out, and
    the instance is taken in all the same.
    """
    kept: dict[str, Any] = {}
    with warnings_muted():
        for keyword, tag, vr in _HEADER_TAGS:
            if tag not in ds:
                continue
            try:
                element = ds[tag]
                if element.VR == vr:
                    kept[f"{tag:08X}"] = element.to_json_dict(None, 0)
                else:
                    one = Dataset()
                    setattr(one, keyword, element.value)
                    kept.update(one.to_json_dict())
            except Exception as exc:
                logger.debug(
                    "%s left out of the QIDO-RS attributes: %s",
                    keyword,
                    type(exc).__name__,
                )
    return json.dumps(kept, sort_keys=True)


def indexed_value(attributes: Mapping[str, Any], tag: str) -> str | None:
    """The value an index column keeps of one attribute of ``attributes``
    (DICOM JSON, keyed by tag): "" when absent or empty, its single value
    as text, or None when it has several values or a long one, since a
    column cannot match those exactly as DICOM PS3.4 C.2.2.2 does, or one
    holding a NUL, which no VR allows (DICOM PS3.5 6.1.3) and a PostgreSQL
    text column cannot hold: such an instance is matched on its DICOM JSON
    alone, as on SQLite."""
    element = attributes.get(tag)
    if element is None:
        return ""
    values = element.get("Value", [])
    if not values:
        return ""
    if len(values) > 1:
        return None
    value = values[0]
    if element.get("vr") == "PN":
        value = _folded_name(tag, element)
    if not isinstance(value, str) or len(value) > MAX_INDEXED_LENGTH:
        return None
    if "\x00" in value:
        return None
    return value


def _folded_name(tag: str, element: Mapping[str, Any]) -> str | None:
    """A PN element's value as text, its component groups joined by "="
    as pydicom writes a name (DICOM PS3.5 6.2), case-folded; None when
    it cannot be read."""
    try:
        with warnings_muted():
            name = Dataset.from_json({tag: dict(element)})[int(tag, 16)].value
    except Exception:
        return None
    return str(name).casefold()

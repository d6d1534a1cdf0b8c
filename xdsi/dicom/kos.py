"""The XDS-I.b manifest: build and parse the Key Object Selection Document.

Implements RAD TF-3 4.68.4.1.2 (the manifest an Imaging Document Source
publishes), the Key Object Selection Document IOD (DICOM PS3.3 A.35.4) with
its Key Object Document module (DICOM PS3.3 C.17.6.2) and the content of
DICOM PS3.16 TID 2010, written as a DICOM PS3.10 file.
"""

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    ParametricMapStorage,
    RTDoseStorage,
    SegmentationStorage,
    generate_uid,
)
from pydicom.valuerep import DA, TM

from xdsi.dicom.scan import InstanceHeader, Study

logger = logging.getLogger(__name__)

# RAD TF-3 4.68.4.1.2: the Document Title of a manifest, DICOM PS3.16 CID 7010.
MANIFEST_TITLE = CodedConcept("113030", "DCM", "Manifest")

# Series Number of the manifest series, as the IHE reference manifests use.
MANIFEST_SERIES_NUMBER = 999

# Storage SOP Classes of objects with pixel data whose name does not say
# "Image Storage"; their references are IMAGE content items (DICOM PS3.3
# C.18.4), all others COMPOSITE (DICOM PS3.3 C.18.3).
IMAGE_SOP_CLASSES_BY_CONTENT = frozenset(
    {SegmentationStorage, ParametricMapStorage, RTDoseStorage}
)

# DICOM PS3.3 C.7.1.1: the enumerated values of Patient's Sex.
PATIENT_SEX = frozenset({"M", "F", "O"})

# DICOM PS3.5 Table 6.2-1: the forms of DA and TM; the ACR-NEMA forms
# (1997.04.24, 14:04:38) are not allowed.
DA_FORM = re.compile(r"\d{8}")
TM_FORM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")

# DICOM PS3.5 6.2: an AE title is at most 16 characters.
AE_TITLE_MAX_LENGTH = 16

# DICOM PS3.5 9.1: a UID is numbers joined by dots, at most 64 characters.
# Leading zeros, which 9.1 forbids, are let through: older systems write
# them. A Consumer names folders and files after these UIDs, so nothing
# else (a slash, "..") may pass.
UID_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UID_MAX_LENGTH = 64


class NotAManifest(Exception):
    """A DICOM object that is not an XDS-I.b manifest; RAD TF-3 4.68.4.1.2."""

    def __init__(self, sop_instance_uid: str, reason: str) -> None:
        super().__init__(
            f"{sop_instance_uid or 'object'} is not an XDS-I.b manifest: {reason}"
        )
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a worker process, it is pickled back to the caller.
        return (type(self), (self.sop_instance_uid, self.reason))


@dataclass(frozen=True)
class ManifestReference:
    """One instance a manifest references, with where to retrieve it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_ae_title: str | None
    retrieve_location_uid: str | None


@dataclass(frozen=True)
class Manifest:
    """What a manifest references, read from its evidence sequence."""

    sop_instance_uid: str
    study_instance_uids: tuple[str, ...]
    references: tuple[ManifestReference, ...]


def build_manifest(
    study: Study,
    *,
    retrieve_ae_title: str,
    retrieve_location_uid: str,
    retrieve_url: str | None = None,
    institution_name: str = "",
    manufacturer: str = "xdsi",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    content_datetime: datetime | None = None,
) -> pydicom.Dataset:
    """Build the XDS-I.b manifest of every instance of ``study``.

    The Key Object Selection Document (DICOM PS3.3 A.35.4) carries the
    Document Title (113030, DCM, "Manifest"), the patient and study of the
    images, one IMAGE or COMPOSITE content item per instance (DICOM PS3.16
    TID 2010) and the Current Requested Procedure Evidence Sequence, whose
    every Referenced Series item holds Retrieve AE Title (0008,0054) and
    Retrieve Location UID (0040,E011), the Imaging Document Source's
    repositoryUniqueId (RAD TF-3 4.68.4.1.2). A Referenced Request Sequence
    item is added when the study has an Accession Number.

    Parameters
    ----------
    retrieve_ae_title
        AE title a Consumer retrieves the instances from (RAD-69 or C-MOVE).
    retrieve_location_uid
        The repositoryUniqueId of the Imaging Document Source.
    retrieve_url
        Base URL of a DICOMweb WADO-RS service holding the study; each
        Referenced Series item then carries its series' URL as Retrieve
        URL (0008,1190), DICOM PS3.3 C.17.2.1 (Hierarchical SOP Instance
        Reference Macro) and PS3.18 10.4.
    content_datetime
        Content Date and Time of the manifest; now when not given.

    Raises
    ------
    ValueError
        The study has no instance, or an argument is not a valid AE title or
        UID.
    """
    if not study.instances:
        raise ValueError(f"study {study.study_instance_uid} has no instance")
    if not 0 < len(retrieve_ae_title.strip()) <= AE_TITLE_MAX_LENGTH:
        raise ValueError(
            f"retrieve_ae_title {retrieve_ae_title!r} must have 1 to "
            f"{AE_TITLE_MAX_LENGTH} characters; DICOM PS3.5 6.2"
        )
    if not UID(retrieve_location_uid).is_valid:
        raise ValueError(
            f"retrieve_location_uid {retrieve_location_uid!r} is not a valid UID"
        )
    when = content_datetime or datetime.now()

    content = _content(study.instances)
    document = KeyObjectSelectionDocument(
        evidence=_evidence(study),
        content=content,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=_series_number(study),
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name or None,
        requested_procedures=_requested_procedures(study),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_date=when.date(),
        content_time=when.time(),
        specific_character_set=_character_set(study),
    )
    document.PatientName = study.patient.name
    _add_issuers(document, study)

    # RAD TF-3 4.68.4.1.2: where each referenced series can be retrieved.
    for study_item in document.CurrentRequestedProcedureEvidenceSequence:
        for series_item in study_item.ReferencedSeriesSequence:
            series_item.RetrieveAETitle = retrieve_ae_title.strip()
            series_item.RetrieveLocationUID = retrieve_location_uid
            if retrieve_url:
                # Limitation: dicom3tools of 2022 does not list Retrieve URL in
                # this macro and warns (no error) that the KOS is a Standard
                # Extended SOP Class.
                series_item.RetrieveURL = (
                    f"{retrieve_url.rstrip('/')}/studies/{study_item.StudyInstanceUID}"
                    f"/series/{series_item.SeriesInstanceUID}"
                )

    logger.debug(
        "Built manifest %s of study %s: %d instances",
        document.SOPInstanceUID,
        study.study_instance_uid,
        len(study.instances),
    )
    return document


def write_manifest(ds: pydicom.Dataset, path: Path) -> None:
    """Write a manifest as a DICOM PS3.10 file in Explicit VR Little Endian."""
    path.write_bytes(manifest_bytes(ds))


def manifest_bytes(ds: pydicom.Dataset) -> bytes:
    """Encode a manifest as a DICOM PS3.10 file in Explicit VR Little Endian.

    The File Meta Information names the manifest's SOP Class and Instance
    (DICOM PS3.10 7.1); a File Meta the data set lacks is created.
    """
    meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta

    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def parse_manifest(source: Path | bytes | pydicom.Dataset) -> Manifest:
    """Read the references of an XDS-I.b manifest from its evidence.

    Every instance listed in the Current Requested Procedure Evidence
    Sequence (DICOM PS3.3 C.17.6.2) is returned with the Retrieve AE Title
    (first value) and Retrieve Location UID of its series (RAD TF-3
    4.68.4.1.2), or None for what the series item lacks. An instance listed
    more than once in the same series is returned once.

    Raises
    ------
    NotAManifest
        The source is not DICOM, not a Key Object Selection Document, has
        another Document Title than (113030, DCM), or lists no evidence.
    """
    ds = _dataset(source)
    sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    # Untrusted input: a value the parser cannot decode means no manifest.
    try:
        return _parse_manifest(ds, sop_instance_uid)
    except NotAManifest:
        raise
    except Exception as exc:
        raise NotAManifest(
            sop_instance_uid, f"unreadable: {type(exc).__name__}: {exc}"
        ) from exc


def _parse_manifest(ds: pydicom.Dataset, sop_instance_uid: str) -> Manifest:

    if ds.get("SOPClassUID") != KeyObjectSelectionDocumentStorage:
        raise NotAManifest(
            sop_instance_uid,
            f"SOP Class UID {ds.get('SOPClassUID')} is not Key Object Selection "
            f"Document Storage ({KeyObjectSelectionDocumentStorage})",
        )
    title = _document_title(ds)
    if title != (MANIFEST_TITLE.value, MANIFEST_TITLE.scheme_designator):
        raise NotAManifest(
            sop_instance_uid, f"Document Title is {title}, not (113030, DCM)"
        )
    if not ds.get("CurrentRequestedProcedureEvidenceSequence"):
        raise NotAManifest(
            sop_instance_uid, "no Current Requested Procedure Evidence Sequence"
        )

    references: dict[tuple[str, str], ManifestReference] = {}
    study_uids: list[str] = []
    for study_item in ds.CurrentRequestedProcedureEvidenceSequence:
        study_uid = _uid(sop_instance_uid, study_item, "StudyInstanceUID")
        if study_uid not in study_uids:
            study_uids.append(study_uid)
        for series_item in study_item.get("ReferencedSeriesSequence") or []:
            ae_title = series_item.get("RetrieveAETitle")
            if isinstance(ae_title, MultiValue):
                ae_title = ae_title[0] if ae_title else None
            location = series_item.get("RetrieveLocationUID")
            for sop_item in series_item.get("ReferencedSOPSequence") or []:
                key = _reference_key(sop_instance_uid, series_item, sop_item)
                references.setdefault(
                    key,
                    ManifestReference(
                        study_instance_uid=study_uid,
                        series_instance_uid=key[0],
                        sop_class_uid=str(sop_item.get("ReferencedSOPClassUID", "")),
                        sop_instance_uid=key[1],
                        retrieve_ae_title=str(ae_title) if ae_title else None,
                        retrieve_location_uid=str(location) if location else None,
                    ),
                )
    return Manifest(
        sop_instance_uid=sop_instance_uid,
        study_instance_uids=tuple(study_uids),
        references=tuple(references.values()),
    )


def is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether a Storage SOP Class holds images (DICOM PS3.4 B.5)."""
    return (
        "Image Storage" in UID(sop_class_uid).name
        or sop_class_uid in IMAGE_SOP_CLASSES_BY_CONTENT
    )


def _content(instances: tuple[InstanceHeader, ...]) -> KeyObjectSelection:
    """The TID 2010 content tree: title and one item per instance, each
    named (260753009, SCT, "Source"), as DICOM PS3.3 C.17.3 allows where
    the template names no purpose of reference.

    highdicom's KeyObjectSelection makes an IMAGE item of an object that has
    Rows and Columns, a COMPOSITE item of any other. Which an instance gets
    is decided here, by its SOP Class (Value Type IMAGE references an image,
    DICOM PS3.3 C.17.3.2.1): the objects handed over carry Rows and Columns,
    of no use else, for an image class alone. Built this way, the tree is not
    copied item by item once more (KeyObjectSelection.from_sequence), a
    quarter of the manifest's cost.
    """
    selected = []
    for instance in instances:
        item = Dataset()
        item.SOPClassUID = instance.sop_class_uid
        item.SOPInstanceUID = instance.sop_instance_uid
        if is_image_sop_class(instance.sop_class_uid):
            item.Rows = item.Columns = 0
        selected.append(item)
    # A title of its own: the document holds what it is given, and
    # MANIFEST_TITLE must stay what it is whatever is done to a document.
    title = CodedConcept(
        MANIFEST_TITLE.value, MANIFEST_TITLE.scheme_designator, MANIFEST_TITLE.meaning
    )
    content = KeyObjectSelection(document_title=title, referenced_objects=selected)
    # The references are separate items, not one narrative (DICOM PS3.3
    # C.18.8.1.1), as the IHE reference manifests have it.
    content[0].ContinuityOfContent = "SEPARATE"
    return content


def _evidence(study: Study) -> list[Dataset]:
    """Evidence data sets: the first carries patient and study attributes."""
    evidence = []
    for instance in study.instances:
        item = Dataset()
        item.SOPClassUID = instance.sop_class_uid
        item.SOPInstanceUID = instance.sop_instance_uid
        item.StudyInstanceUID = instance.study_instance_uid
        item.SeriesInstanceUID = instance.series_instance_uid
        evidence.append(item)

    first = evidence[0]
    first.PatientID = study.patient.patient_id
    # The name is set after construction: highdicom logs a doubtful name.
    first.PatientName = None
    # Limitation: a date or time the images carry in a non-conformant form
    # (Study Date 1997.04.24 or 00000000) is left empty (Type 2) here.
    first.PatientBirthDate = _conformant(DA, study.patient.birth_date)
    first.PatientSex = study.patient.sex if study.patient.sex in PATIENT_SEX else ""
    first.AccessionNumber = study.accession_number
    first.StudyID = study.study_id
    first.StudyDate = _conformant(DA, study.study_date)
    first.StudyTime = _conformant(TM, study.study_time)
    first.ReferringPhysicianName = study.referring_physician_name
    return evidence


def _conformant(vr: type[DA] | type[TM], value: str) -> str:
    """``value`` when it is a valid DA or TM (DICOM PS3.5 6.2), else ""."""
    form = DA_FORM if vr is DA else TM_FORM
    if not form.fullmatch(value):
        return ""
    try:
        vr(value)
    except ValueError:
        return ""
    return value


def _series_number(study: Study) -> int:
    """999 as the reference manifests use, unless the study already has it."""
    taken = [s.series_number for s in study.series if s.series_number is not None]
    if MANIFEST_SERIES_NUMBER not in taken:
        return MANIFEST_SERIES_NUMBER
    return max(taken) + 1


def _requested_procedures(study: Study) -> list[Dataset] | None:
    """The Referenced Request Sequence item; DICOM PS3.3 C.17.6.2.1."""
    if not study.accession_number:
        return None
    item = Dataset()
    item.StudyInstanceUID = study.study_instance_uid
    item.AccessionNumber = study.accession_number
    if study.issuer_of_accession_number:
        item.IssuerOfAccessionNumberSequence = [_accession_issuer_item(study)]
    item.ReferencedStudySequence = []
    # Limitation: the Request Attributes Sequence of the images is not read,
    # so Requested Procedure ID, description and code and the order numbers
    # are sent empty (Type 2).
    item.RequestedProcedureDescription = ""
    item.RequestedProcedureCodeSequence = []
    item.RequestedProcedureID = ""
    item.PlacerOrderNumberImagingServiceRequest = ""
    item.FillerOrderNumberImagingServiceRequest = ""
    return [item]


def _add_issuers(document: Dataset, study: Study) -> None:
    """Copy the issuers of Patient ID and Accession Number from the images."""
    if study.patient.issuer_of_patient_id:
        document.IssuerOfPatientID = study.patient.issuer_of_patient_id
    if study.issuer_of_accession_number:
        document.IssuerOfAccessionNumberSequence = [_accession_issuer_item(study)]


def _accession_issuer_item(study: Study) -> Dataset:
    """An HL7v2 Hierarchic Designator item (DICOM PS3.3 10.14)."""
    item = Dataset()
    issuer = study.issuer_of_accession_number
    if UID(issuer).is_valid:
        item.UniversalEntityID = issuer
        item.UniversalEntityIDType = "ISO"
    else:
        item.LocalNamespaceEntityID = issuer
    return item


def _character_set(study: Study) -> str | None:
    """ISO_IR 192 (UTF-8) when any text is outside the default repertoire."""
    texts = (
        study.patient.name,
        study.patient.patient_id,
        study.referring_physician_name,
        study.accession_number,
        study.study_id,
    )
    return None if all(text.isascii() for text in texts) else "ISO_IR 192"


def _dataset(source: Path | bytes | pydicom.Dataset) -> pydicom.Dataset:
    """Open the source as a data set; NotAManifest when it is not DICOM."""
    if isinstance(source, pydicom.Dataset):
        return source
    try:
        if isinstance(source, bytes):
            return pydicom.dcmread(BytesIO(source))
        return pydicom.dcmread(source)
    except Exception as exc:
        # Untrusted input: any failure of the parser means it is not DICOM.
        raise NotAManifest("", f"not readable as DICOM: {exc}") from exc


def _reference_key(
    sop_instance_uid: str, series_item: Dataset, sop_item: Dataset
) -> tuple[str, str]:
    """The Series and SOP Instance UID of an item; DICOM PS3.3 C.17.2.1."""
    return (
        _uid(sop_instance_uid, series_item, "SeriesInstanceUID"),
        _uid(sop_instance_uid, sop_item, "ReferencedSOPInstanceUID"),
    )


def _uid(sop_instance_uid: str, item: Dataset, keyword: str) -> str:
    """An evidence item's UID; NotAManifest when it lacks one, or holds
    something other than a UID (DICOM PS3.5 9.1)."""
    value = str(item.get(keyword) or "").strip()
    if not value:
        raise NotAManifest(sop_instance_uid, f"an evidence item lacks {keyword}")
    if len(value) > UID_MAX_LENGTH or not UID_TEXT.fullmatch(value):
        raise NotAManifest(
            sop_instance_uid,
            f"an evidence item's {keyword} {value[:80]!r} is not a UID "
            "(DICOM PS3.5 9.1)",
        )
    return value


def _document_title(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """The (Code Value, Coding Scheme Designator) of the Concept Name."""
    items = ds.get("ConceptNameCodeSequence") or []
    if not items:
        return None
    return (
        str(items[0].get("CodeValue", "")),
        str(items[0].get("CodingSchemeDesignator", "")),
    )

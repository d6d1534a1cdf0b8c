"""DICOM facts of an XDS-I.b manifest's DocumentEntry, taken from the study.

Implements RAD TF-3 4.68.4.1.2.3 (DocumentEntry metadata of a manifest) with
the value formats of ITI TF-3 4.2.3.2: sourcePatientId (4.2.3.2.23),
sourcePatientInfo (4.2.3.2.24), referenceIdList (4.2.3.2.28), service and
creation times as DTM (4.2.3.1.7) and eventCodeList from DICOM PS3.16 CID 29.
"""

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pydicom
from pydicom.sr.codedict import Collection
from pydicom.uid import KeyObjectSelectionDocumentStorage

from xdsi.dicom.kos import NotAManifest
from xdsi.dicom.scan import Study
from xdsi.metadata.codes import Code

logger = logging.getLogger(__name__)

# RAD TF-3 4.68.4.1.2.3: mimeType and formatCode of a manifest; the scheme is
# the DICOM UID registry (DICOM PS3.16 8.1).
MANIFEST_MIME_TYPE = "application/dicom"
DICOM_UID_REGISTRY_SCHEME = "1.2.840.10008.2.6.1"
MANIFEST_FORMAT_CODE = Code(
    KeyObjectSelectionDocumentStorage,
    DICOM_UID_REGISTRY_SCHEME,
    "Key Object Selection Document",
)

# RAD TF-3 4.68.4.1.2.3: eventCodeList holds the acquisition modalities of
# DICOM PS3.16 CID 29 in the DCM coding scheme (DICOM PS3.16 8.1).
DCM_SCHEME = "1.2.840.10008.2.16.4"
ACQUISITION_MODALITY = {
    code.value: code.meaning for code in Collection("CID29").concepts.values()
}

# ITI TF-3 4.2.3.2.28: identifier types of referenceIdList values.
STUDY_INSTANCE_UID_ID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
ACCESSION_ID_TYPE = "urn:ihe:iti:xds:2013:accession"

# Title of a manifest whose study has no Study Description.
DEFAULT_TITLE = "Imaging study"

# ISO OID syntax (ITU-T X.660): arcs without leading zeros.
OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")

# HL7 v2.5 2.7: characters to escape in a component, and their escapes.
HL7_ESCAPES = {
    "\\": "\\E\\",
    "|": "\\F\\",
    "^": "\\S\\",
    "&": "\\T\\",
    "~": "\\R\\",
}


@dataclass(frozen=True)
class ManifestFacts:
    """DocumentEntry values a manifest's DICOM content fixes.

    Times are ITI TF-3 DTM strings; ``source_patient_info`` holds the
    ``PID-3|…``, ``PID-5|…``, ``PID-7|…`` and ``PID-8|…`` values that are
    known.
    """

    unique_id: str
    mime_type: str
    format_code: Code
    event_codes: tuple[Code, ...]
    reference_ids: tuple[str, ...]
    service_start_time: str | None
    service_stop_time: str | None
    creation_time: str
    source_patient_id: str
    source_patient_info: tuple[str, ...]
    title: str
    study_instance_uid: str


def manifest_facts(
    study: Study, manifest: pydicom.Dataset, *, accession_assigning_authority: str
) -> ManifestFacts:
    """Derive the DocumentEntry facts of ``manifest``, built for ``study``.

    The accession number's assigning authority is the ISO OID of the Issuer
    of Accession Number Sequence (of the manifest, else of the study) and
    ``accession_assigning_authority`` when there is none.

    DICOM dates and times are local (DICOM PS3.5 6.2); the times are
    written in the UTC that ITI TF-3 4.2.3.1.7 asks for, by the Timezone
    Offset From UTC (0008,0201) of the study or the manifest, else by the
    node's own time zone (its TZ), where the modality is taken to be.

    Limitation: anatomic region codes (DICOM PS3.16 CID 4) are not added to
    eventCodeList, and modalities outside CID 29 (OT, KO, PR, SR…) give no
    event code.

    Raises
    ------
    ValueError
        The manifest belongs to another study than ``study``.
    NotAManifest
        The manifest has no Content Date.
    """
    if manifest.get("StudyInstanceUID") != study.study_instance_uid:
        raise ValueError(
            f"manifest {manifest.get('SOPInstanceUID')} is of study "
            f"{manifest.get('StudyInstanceUID')}, not {study.study_instance_uid}"
        )
    creation_time = _dtm(
        str(manifest.get("ContentDate", "")),
        str(manifest.get("ContentTime", "")),
        str(manifest.get("TimezoneOffsetFromUTC", "")),
    )
    if creation_time is None:
        raise NotAManifest(
            str(manifest.SOPInstanceUID), "no valid Content Date (0008,0023)"
        )

    source_patient_id = _cx(
        study.patient.patient_id, study.patient.issuer_of_patient_id
    )
    return ManifestFacts(
        unique_id=str(manifest.SOPInstanceUID),
        mime_type=MANIFEST_MIME_TYPE,
        format_code=MANIFEST_FORMAT_CODE,
        event_codes=event_codes(study),
        reference_ids=_reference_ids(study, manifest, accession_assigning_authority),
        service_start_time=_dtm(
            study.study_date, study.study_time, study.timezone_offset
        ),
        service_stop_time=_service_stop_time(study),
        creation_time=creation_time,
        source_patient_id=source_patient_id,
        source_patient_info=_source_patient_info(study, source_patient_id),
        title=study.study_description or DEFAULT_TITLE,
        study_instance_uid=study.study_instance_uid,
    )


def event_codes(study: Study) -> tuple[Code, ...]:
    """A DCM code per modality of the study listed in DICOM PS3.16 CID 29."""
    codes = []
    for modality in study.modalities:
        meaning = ACQUISITION_MODALITY.get(modality)
        if meaning is None:
            logger.debug("Modality %s is not in CID 29; no event code", modality)
            continue
        codes.append(Code(modality, DCM_SCHEME, meaning))
    return tuple(codes)


def is_oid(value: str) -> bool:
    """Whether ``value`` is an ISO OID in dotted decimal form."""
    return OID.fullmatch(value) is not None


def _reference_ids(
    study: Study, manifest: pydicom.Dataset, default_authority: str
) -> tuple[str, ...]:
    """The CXi values of referenceIdList; ITI TF-3 4.2.3.2.28."""
    ids = [f"{study.study_instance_uid}^^^^{STUDY_INSTANCE_UID_ID_TYPE}"]
    if study.accession_number:
        study_issuer = study.issuer_of_accession_number
        authority = (
            _accession_issuer(manifest)
            or (study_issuer if is_oid(study_issuer) else "")
            or default_authority
        )
        accession = _escape(study.accession_number)
        ids.append(f"{accession}^^^&{authority}&ISO^{ACCESSION_ID_TYPE}")
    return tuple(ids)


def _accession_issuer(manifest: pydicom.Dataset) -> str:
    """The ISO Universal Entity ID of the manifest's accession issuer."""
    for item in manifest.get("IssuerOfAccessionNumberSequence") or []:
        entity = str(item.get("UniversalEntityID", ""))
        if item.get("UniversalEntityIDType") == "ISO" and is_oid(entity):
            return entity
    return ""


def _service_stop_time(study: Study) -> str | None:
    """The latest acquisition, else series start, of any series, as DTM."""
    times = []
    for series in study.series:
        acquired = series.last_acquisition_datetime
        if acquired:
            times.append(_dtm(acquired[:8], acquired[8:], study.timezone_offset))
        else:
            times.append(
                _dtm(series.series_date, series.series_time, study.timezone_offset)
            )
    known = [time for time in times if time is not None]
    return max(known) if known else None


def _dtm(date: str, time: str, offset: str = "") -> str | None:
    """ITI TF-3 4.2.3.1.7 DTM, in UTC, from a DICOM DA and TM, to the second.

    ``offset`` is the Timezone Offset From UTC (0008,0201) they are local
    to; without a valid one, the node's own time zone. None when the date
    is not YYYYMMDD; a time that is not hh, hhmm or hhmmss (fraction
    dropped) is left out, and a date alone is written as it is (a day has
    no offset to take).
    """
    date = date.strip()
    if not (len(date) == 8 and date.isdigit()):
        return None
    time = time.strip().split(".")[0]
    if not (len(time) in (2, 4, 6) and time.isdigit()):
        return date
    try:
        local = datetime.strptime(date + time.ljust(6, "0"), "%Y%m%d%H%M%S").replace(
            tzinfo=_zone(offset)
        )
        utc = local.astimezone(UTC)
    except (ValueError, OverflowError):
        # Not a date and time (hour 24, say), or beyond year 1 to 9999 in
        # UTC: written as given.
        return date + time
    # As precise as given, and as the offset needs (+0530 moves minutes).
    digits = max(len(time), 4 if utc.minute else 2)
    return utc.strftime("%Y%m%d%H%M%S")[: 8 + digits]


_OFFSET = re.compile(r"([+-])(\d\d)(\d\d)")


def _zone(offset: str) -> tzinfo | None:
    """The fixed zone of a Timezone Offset From UTC (SOP Common Module,
    DICOM PS3.3 Table C.12-1; "&ZZXX", -1200 to +1400, as in a DT, DICOM
    PS3.5 Table 6.2-1); None, the node's own zone, when there is no valid
    one."""
    match = _OFFSET.fullmatch(offset.strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) > 59:
        return None
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-delta if sign == "-" else delta)


def _cx(patient_id: str, issuer: str) -> str:
    """A CX value: ``ID^^^&OID&ISO``, or ``ID^^^issuer`` when not an OID."""
    if not issuer:
        return _escape(patient_id)
    if is_oid(issuer):
        return f"{_escape(patient_id)}^^^&{issuer}&ISO"
    return f"{_escape(patient_id)}^^^{_escape(issuer)}"


def _source_patient_info(study: Study, source_patient_id: str) -> tuple[str, ...]:
    """PID-3, PID-5, PID-7 and PID-8 as ITI TF-3 4.2.3.2.24 writes them."""
    patient = study.patient
    lines = []
    if patient.patient_id:
        lines.append(f"PID-3|{source_patient_id}")
    if patient.name:
        lines.append(f"PID-5|{_xpn(patient.name)}")
    if patient.birth_date:
        lines.append(f"PID-7|{_escape(patient.birth_date)}")
    if patient.sex:
        lines.append(f"PID-8|{_escape(patient.sex)}")
    return tuple(lines)


def _xpn(person_name: str) -> str:
    """An HL7 XPN from a DICOM PN (DICOM PS3.5 6.2.1.1).

    Only the alphabetic group is kept. PN orders family, given, middle,
    prefix, suffix; XPN orders family, given, middle, suffix, prefix.
    """
    alphabetic = person_name.split("=")[0]
    parts = [_escape(part) for part in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _escape(value: str) -> str:
    """Escape HL7 v2 delimiters in a component value (HL7 v2.5 2.7)."""
    return "".join(HL7_ESCAPES.get(char, char) for char in value)

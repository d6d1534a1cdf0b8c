"""Tests of the DocumentEntry facts derived from a study and its manifest."""

import dataclasses
import re
import time
from datetime import datetime

import pydicom
import pytest

from tests.conftest import dicom_path
from xdsi.dicom.kos import build_manifest
from xdsi.dicom.mapping import manifest_facts
from xdsi.dicom.scan import scan_directory
from xdsi.metadata.codes import Code

AFFINITY_DOMAIN = "1.3.6.1.4.1.21367.2005.3.7"
DCM = "1.2.840.10008.2.16.4"
# ITI TF-3 4.2.3.1.7: DTM is YYYY[MM[DD[hh[mm[ss]]]]].
DTM = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2})?)?)?)?)?")


def _facts(folder: str, **changes: object):
    (study,) = scan_directory(dicom_path(folder)).studies
    if changes:
        patient = dataclasses.replace(study.patient, **changes)
        study = dataclasses.replace(study, patient=patient)
    kos = build_manifest(
        study,
        retrieve_ae_title="XDSI",
        retrieve_location_uid="1.3.6.1.4.1.21367.13.80.110",
        content_datetime=datetime(2024, 5, 6, 7, 8, 9),
    )
    return (
        study,
        kos,
        manifest_facts(study, kos, accession_assigning_authority=AFFINITY_DOMAIN),
    )


@pytest.fixture(scope="module")
def ct():
    return _facts("study-ct")


@pytest.fixture(scope="module")
def mr():
    return _facts("study-mr/images")


def test_event_codes_are_the_study_modalities_from_cid_29(ct):
    """RAD TF-3 4.68.4.1.2.3: eventCodeList holds the CID 29 modalities."""
    study, _, facts = ct
    assert facts.event_codes == (Code("CT", DCM, "Computed Tomography"),)
    assert tuple(code.code for code in facts.event_codes) == study.modalities


def test_reference_ids_carry_the_study_instance_uid(ct):
    """ITI TF-3 4.2.3.2.28: the Study Instance UID as a CXi value."""
    study, _, facts = ct
    assert facts.reference_ids == (
        f"{study.study_instance_uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
    )


def test_accession_reference_id_takes_the_default_assigning_authority(mr):
    """ITI TF-3 4.2.3.2.28: Accession Number with an ISO issuer."""
    _, _, facts = mr
    assert (
        f"IDC002-a^^^&{AFFINITY_DOMAIN}&ISO^urn:ihe:iti:xds:2013:accession"
        in facts.reference_ids
    )


def test_accession_reference_id_prefers_the_manifest_issuer(mr):
    """ITI TF-3 4.2.3.2.28: Issuer of Accession Number Sequence, when ISO."""
    study, kos, _ = mr
    issuer = pydicom.Dataset()
    issuer.UniversalEntityID = "1.2.826.0.1.3680043.8.498.7"
    issuer.UniversalEntityIDType = "ISO"
    kos = pydicom.Dataset(kos)
    kos.IssuerOfAccessionNumberSequence = [issuer]
    facts = manifest_facts(study, kos, accession_assigning_authority=AFFINITY_DOMAIN)
    assert facts.reference_ids[1] == (
        "IDC002-a^^^&1.2.826.0.1.3680043.8.498.7&ISO^urn:ihe:iti:xds:2013:accession"
    )


def test_times_are_dtm_and_service_start_precedes_stop(ct):
    """ITI TF-3 4.2.3.1.7: serviceStartTime, serviceStopTime, creationTime."""
    _, _, facts = ct
    for value in (facts.service_start_time, facts.service_stop_time):
        assert value is not None
        assert DTM.fullmatch(value)
    assert facts.service_start_time.startswith("20150206")
    assert facts.service_stop_time == "20150206093550"
    assert facts.service_start_time <= facts.service_stop_time
    assert facts.creation_time == "20240506070809"


def test_mr_service_times_drop_the_fraction_of_seconds(mr):
    """ITI TF-3 4.2.3.1.7: DTM stops at seconds; 154122.413000 → 154122."""
    _, _, facts = mr
    assert facts.service_start_time == "20150202154122"
    assert facts.service_stop_time == "20150202161945"


@pytest.mark.parametrize(
    ("offset", "start", "stop"),
    [
        ("+0100", "20150202144122", "20150202151945"),
        ("-0500", "20150202204122", "20150202211945"),
        # A half-hour offset moves the minutes.
        ("+0530", "20150202101122", "20150202104945"),
        # Not an offset (DICOM PS3.5 Table 6.2-1): the node's own zone, UTC.
        ("+2500", "20150202154122", "20150202161945"),
        ("0100", "20150202154122", "20150202161945"),
    ],
)
def test_service_times_are_written_in_utc_by_the_study_offset(
    mr, offset: str, start: str, stop: str
):
    """ITI TF-3 4.2.3.1.7: times in UTC; the study's times are local to its
    Timezone Offset From UTC (0008,0201)."""
    study, kos, _ = mr
    study = dataclasses.replace(study, timezone_offset=offset)

    facts = manifest_facts(study, kos, accession_assigning_authority=AFFINITY_DOMAIN)

    assert (facts.service_start_time, facts.service_stop_time) == (start, stop)


def test_times_without_an_offset_are_local_to_the_node(
    mr, monkeypatch: pytest.MonkeyPatch
):
    """With no Timezone Offset From UTC, the study's and the manifest's
    times are local to the node's own zone (TZ), summer time included."""
    study, kos, _ = mr
    kos = pydicom.Dataset(kos)
    kos.ContentDate, kos.ContentTime = "20240706", "003000"
    # Central European Time as a POSIX rule, which needs no zone files.
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    time.tzset()
    try:
        facts = manifest_facts(
            study, kos, accession_assigning_authority=AFFINITY_DOMAIN
        )
    finally:
        monkeypatch.undo()
        time.tzset()

    # February: UTC+1; July: UTC+2, the day before in UTC.
    assert facts.service_start_time == "20150202144122"
    assert facts.creation_time == "20240705223000"


def test_a_manifest_with_an_offset_gives_its_creation_time_in_utc(mr):
    study, kos, _ = mr
    kos = pydicom.Dataset(kos)
    kos.ContentDate, kos.ContentTime = "20240101", "2330"
    kos.TimezoneOffsetFromUTC = "-0100"

    facts = manifest_facts(study, kos, accession_assigning_authority=AFFINITY_DOMAIN)

    assert facts.creation_time == "202401020030"


def test_the_study_offset_is_read_from_its_instances(tmp_path):
    """Timezone Offset From UTC (0008,0201), of the SOP Common Module."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    assert ds.TimezoneOffsetFromUTC == "-0500"
    ds.save_as(tmp_path / "one.dcm")

    (study,) = scan_directory(tmp_path).studies

    assert study.timezone_offset == "-0500"


def test_manifest_identity_format_and_title(mr):
    """RAD TF-3 4.68.4.1.2.3: uniqueId, mimeType, formatCode and title."""
    study, kos, facts = mr
    assert facts.unique_id == kos.SOPInstanceUID
    assert facts.mime_type == "application/dicom"
    assert facts.format_code == Code(
        "1.2.840.10008.5.1.4.1.1.88.59",
        "1.2.840.10008.2.6.1",
        "Key Object Selection Document",
    )
    assert facts.title == "JHN BRAIN MR OP"
    assert facts.study_instance_uid == study.study_instance_uid


def test_source_patient_info_lists_pid_3_5_7_8(mr):
    """ITI TF-3 4.2.3.2.24: sourcePatientInfo as PID-n|value lines."""
    _, _, facts = mr
    assert facts.source_patient_id == "IDS-DEPT002-a"
    assert facts.source_patient_info == (
        "PID-3|IDS-DEPT002-a",
        "PID-5|Multi^Mr^a",
        "PID-7|19780202",
        "PID-8|M",
    )


def test_absent_birth_date_gives_no_pid_7(ct):
    """ITI TF-3 4.2.3.2.24: only known PID fields are listed."""
    _, _, facts = ct
    assert [line.split("|")[0] for line in facts.source_patient_info] == [
        "PID-3",
        "PID-5",
        "PID-8",
    ]


@pytest.mark.parametrize(
    ("issuer", "expected"),
    [
        ("1.3.6.1.4.1.21367.2005.3.7", "PLASTIC^^^&1.3.6.1.4.1.21367.2005.3.7&ISO"),
        ("QMC", "PLASTIC^^^QMC"),
    ],
    ids=["oid", "local"],
)
def test_source_patient_id_writes_an_oid_issuer_as_iso(issuer, expected):
    """ITI TF-3 4.2.3.2.23: sourcePatientId is a CX with its authority."""
    _, _, facts = _facts("study-ct", issuer_of_patient_id=issuer)
    assert facts.source_patient_id == expected
    assert facts.source_patient_info[0] == f"PID-3|{expected}"


def test_person_name_prefix_and_suffix_swap_places_in_xpn():
    """ITI TF-3 4.2.3.2.24: PID-5 is an XPN; DICOM PN orders prefix first."""
    _, _, facts = _facts("study-ct", name="Head^Plastic^P^Dr^Jr")
    assert "PID-5|Head^Plastic^P^Jr^Dr" in facts.source_patient_info


def test_manifest_of_another_study_is_refused(ct, mr):
    """RAD TF-3 4.68.4.1.2.3: the facts describe the manifest's own study."""
    study, _, _ = ct
    _, other_kos, _ = mr
    with pytest.raises(ValueError, match="is of study"):
        manifest_facts(study, other_kos, accession_assigning_authority=AFFINITY_DOMAIN)

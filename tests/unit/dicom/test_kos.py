"""Tests of the XDS-I.b manifest built and parsed by xdsi.dicom.kos."""

import os
import shutil
import subprocess
import warnings
from collections import defaultdict
from datetime import datetime

import pydicom
import pytest

from tests.conftest import dicom_path
from xdsi.dicom.kos import (
    NotAManifest,
    build_manifest,
    manifest_bytes,
    parse_manifest,
    write_manifest,
)
from xdsi.dicom.scan import scan_directory

REPOSITORY_UNIQUE_ID = "1.3.6.1.4.1.21367.13.80.110"
AE_TITLE = "XDSI_IDS"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _study(folder: str):
    (study,) = scan_directory(dicom_path(folder)).studies
    return study


@pytest.fixture(scope="module")
def study_ct():
    return _study("study-ct")


@pytest.fixture(scope="module")
def study_mr():
    return _study("study-mr/images")


WADO_RS = "http://127.0.0.1:9083/dicomweb"


@pytest.fixture(scope="module")
def kos_ct(study_ct):
    return build_manifest(
        study_ct, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )


@pytest.fixture(scope="module")
def kos_mr(study_mr):
    return build_manifest(
        study_mr, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )


def _by_series(manifest) -> dict[str, set[str]]:
    found = defaultdict(set)
    for reference in manifest.references:
        found[reference.series_instance_uid].add(reference.sop_instance_uid)
    return dict(found)


def test_mr_manifest_references_same_instances_per_series_as_ihe_reference(kos_mr):
    """RAD TF-3 4.68.4.1.2: the manifest lists every instance, by series."""
    ours = parse_manifest(kos_mr)
    reference = parse_manifest(dicom_path("study-mr", "manifest", "kos.dcm"))
    assert _by_series(ours) == _by_series(reference)
    assert ours.study_instance_uids == reference.study_instance_uids
    assert len(ours.references) == 36


@pytest.mark.parametrize(("folder", "count"), [("study-mr", 36), ("study-ct-ihe", 20)])
def test_manifest_of_each_ihe_set_references_the_reference_kos_instances(folder, count):
    """RAD TF-3 4.68.4.1.2: our manifest of each IHE test study references the
    same instances, series by series, as the study's reference KOS."""
    ours = parse_manifest(
        build_manifest(
            _study(f"{folder}/images"),
            retrieve_ae_title=AE_TITLE,
            retrieve_location_uid=REPOSITORY_UNIQUE_ID,
        )
    )
    reference = parse_manifest(dicom_path(folder, "manifest", "kos.dcm"))
    assert _by_series(ours) == _by_series(reference)
    assert ours.study_instance_uids == reference.study_instance_uids
    assert len(ours.references) == count


def test_every_referenced_series_carries_retrieve_ae_title_and_location(kos_ct):
    """RAD TF-3 4.68.4.1.2: Retrieve Location UID is the repositoryUniqueId."""
    (study_item,) = kos_ct.CurrentRequestedProcedureEvidenceSequence
    assert len(study_item.ReferencedSeriesSequence) == 3
    for series_item in study_item.ReferencedSeriesSequence:
        assert series_item.RetrieveAETitle == AE_TITLE
        assert series_item.RetrieveLocationUID == REPOSITORY_UNIQUE_ID
    for reference in parse_manifest(kos_ct).references:
        assert reference.retrieve_ae_title == AE_TITLE
        assert reference.retrieve_location_uid == REPOSITORY_UNIQUE_ID


def test_manifest_has_manifest_title_and_key_object_selection_sop_class(kos_ct):
    """RAD TF-3 4.68.4.1.2: Document Title is (113030, DCM, "Manifest")."""
    assert kos_ct.SOPClassUID == KOS
    assert kos_ct.Modality == "KO"
    (title,) = kos_ct.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113030",
        "DCM",
        "Manifest",
    )
    assert kos_ct.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert kos_ct.ContinuityOfContent == "SEPARATE"


def test_manifest_has_patient_and_study_of_the_images(kos_mr, study_mr):
    """DICOM PS3.3 A.35.4: the KOS has the patient and study it lists."""
    assert kos_mr.StudyInstanceUID == study_mr.study_instance_uid
    assert kos_mr.PatientID == "IDS-DEPT002-a"
    assert str(kos_mr.PatientName) == "Multi^Mr^a"
    assert str(kos_mr.PatientBirthDate) == "19780202"
    assert kos_mr.AccessionNumber == "IDC002-a"
    assert str(kos_mr.StudyDate) == "20150202"
    (request,) = kos_mr.ReferencedRequestSequence
    assert request.AccessionNumber == "IDC002-a"
    assert request.StudyInstanceUID == study_mr.study_instance_uid


def test_manifest_has_one_image_item_per_instance(kos_ct, study_ct):
    """DICOM PS3.16 TID 2010: one IMAGE item per referenced image."""
    items = kos_ct.ContentSequence
    assert len(items) == 60
    assert {item.ValueType for item in items} == {"IMAGE"}
    assert {item.RelationshipType for item in items} == {"CONTAINS"}
    referenced = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in items
    ]
    assert referenced == [i.sop_instance_uid for i in study_ct.instances]


def test_non_image_instance_is_a_composite_item(tmp_path):
    """DICOM PS3.16 TID 2010: an SR document is referenced as COMPOSITE."""
    shutil.copy(dicom_path("singles", "sr-basic-text__reportsi.dcm"), tmp_path)
    (study,) = scan_directory(tmp_path).studies
    kos = build_manifest(
        study, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    (item,) = kos.ContentSequence
    assert item.ValueType == "COMPOSITE"
    assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == (
        "1.2.840.10008.5.1.4.1.1.88.11"
    )


def test_given_uids_and_content_datetime_are_used(study_ct):
    """DICOM PS3.3 C.17.6.2: Content Date and Time of the document."""
    kos = build_manifest(
        study_ct,
        retrieve_ae_title=AE_TITLE,
        retrieve_location_uid=REPOSITORY_UNIQUE_ID,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
        content_datetime=datetime(2024, 5, 6, 7, 8, 9),
        institution_name="QMC",
    )
    assert kos.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert kos.SOPInstanceUID == "1.2.826.0.1.3680043.8.498.2"
    assert (str(kos.ContentDate), str(kos.ContentTime)) == ("20240506", "070809")
    assert kos.InstitutionName == "QMC"
    assert kos.Manufacturer == "xdsi"
    assert kos.SeriesNumber == 999


def test_ae_title_longer_than_16_characters_is_refused(study_ct):
    """DICOM PS3.5 6.2: an AE title has at most 16 characters."""
    with pytest.raises(ValueError, match="retrieve_ae_title"):
        build_manifest(
            study_ct,
            retrieve_ae_title="A" * 17,
            retrieve_location_uid=REPOSITORY_UNIQUE_ID,
        )


def test_written_manifest_is_part_10_explicit_vr_little_endian(kos_ct, tmp_path):
    """DICOM PS3.10 7.1: preamble, DICM and a File Meta naming the object."""
    path = tmp_path / "kos.dcm"
    write_manifest(kos_ct, path)
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert raw == manifest_bytes(kos_ct)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == kos_ct.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == KOS
    assert _by_series(parse_manifest(raw)) == _by_series(parse_manifest(kos_ct))


def _dciodvfy() -> str:
    program = shutil.which("dciodvfy")
    if program is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy (dicom3tools) is required under CI")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return program


@pytest.mark.peer("dciodvfy")
@pytest.mark.parametrize(
    "folder", ["study-ct", "study-mr/images", "study-ct-ihe/images"]
)
def test_dciodvfy_reports_no_error_on_built_manifest(folder, tmp_path):
    """DICOM PS3.3 A.35.4: the manifest is a valid Key Object Selection IOD."""
    program = _dciodvfy()
    path = tmp_path / "kos.dcm"
    write_manifest(
        build_manifest(
            _study(folder),
            retrieve_ae_title=AE_TITLE,
            retrieve_location_uid=REPOSITORY_UNIQUE_ID,
            retrieve_url=WADO_RS,
        ),
        path,
    )
    run = subprocess.run(
        [program, str(path)], capture_output=True, text=True, timeout=60
    )
    output = run.stdout + run.stderr
    assert "KeyObjectSelectionDocument" in output
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("study-mr/manifest/kos.dcm", 36),
        ("study-ct-ihe/manifest/kos.dcm", 20),
        # This manifest lists each of its 36 instances four times.
        ("singles/kos-manifest-144refs__ids-1002-kos.dcm", 36),
        ("singles/kos-manifest-1ref__ids-1001-kos.dcm", 1),
    ],
)
def test_parse_reads_every_instance_of_ihe_manifests_once(name, count):
    """RAD TF-3 4.68.4.1.2: references come from the evidence sequence."""
    manifest = parse_manifest(dicom_path(name))
    assert len(manifest.references) == count
    assert len({r.sop_instance_uid for r in manifest.references}) == count
    assert len(manifest.study_instance_uids) == 1


def test_parse_rejects_an_image(study_ct):
    """RAD TF-3 4.68.4.1.2: a manifest is a Key Object Selection Document."""
    with pytest.raises(NotAManifest, match="not Key Object Selection"):
        parse_manifest(study_ct.instances[0].path)


def test_parse_rejects_a_kos_with_another_title(study_mr):
    """RAD TF-3 4.68.4.1.2: Document Title must be (113030, DCM)."""
    kos = build_manifest(
        study_mr, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    # (113000, DCM, "Of Interest") is another DICOM PS3.16 CID 7010 title.
    kos.ConceptNameCodeSequence[0].CodeValue = "113000"
    kos.ConceptNameCodeSequence[0].CodeMeaning = "Of Interest"
    with pytest.raises(NotAManifest, match="Document Title"):
        parse_manifest(kos)
    # What is done to one document leaves the next one's title as it is.
    again = build_manifest(
        study_mr, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    assert again.ConceptNameCodeSequence[0].CodeValue == "113030"
    assert parse_manifest(again).sop_instance_uid == again.SOPInstanceUID


def test_parse_rejects_bytes_that_are_not_dicom():
    """DICOM PS3.10 7.1: a manifest travels as a Part 10 file."""
    xml = (dicom_path("study-mr", "manifest", "metadata.xml")).read_bytes()
    with pytest.raises(NotAManifest, match="not readable as DICOM"):
        parse_manifest(xml)


@pytest.mark.parametrize(
    ("level", "keyword", "value"),
    [
        ("study", "StudyInstanceUID", "../../escaped"),
        ("series", "SeriesInstanceUID", "/etc/cron.d"),
        ("instance", "ReferencedSOPInstanceUID", ".."),
        ("instance", "ReferencedSOPInstanceUID", "1.2." + "3" * 70),
    ],
)
def test_parse_rejects_evidence_whose_uids_are_not_uids(
    study_mr, level, keyword, value
):
    """DICOM PS3.5 9.1: a UID is digits and dots; a Consumer names folders
    and files after them, so a path in their place is no manifest."""
    kos = build_manifest(
        study_mr, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    study_item = kos.CurrentRequestedProcedureEvidenceSequence[0]
    series_item = study_item.ReferencedSeriesSequence[0]
    item = {
        "study": study_item,
        "series": series_item,
        "instance": series_item.ReferencedSOPSequence[0],
    }[level]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's, of the invalid UI
        setattr(item, keyword, value)
        with pytest.raises(NotAManifest, match=f"{keyword} .* is not a UID"):
            parse_manifest(kos)


def test_parse_takes_uids_with_leading_zeros(study_mr):
    """Leading zeros break DICOM PS3.5 9.1 but name no path; older systems
    write them, so their manifests are read."""
    kos = build_manifest(
        study_mr, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    study_item = kos.CurrentRequestedProcedureEvidenceSequence[0]
    study_item.StudyInstanceUID = "1.2.840.0099.01"
    assert parse_manifest(kos).study_instance_uids == ("1.2.840.0099.01",)


def test_non_conformant_study_date_and_time_of_the_images_are_left_empty(tmp_path):
    """DICOM PS3.5 6.2: ACR-NEMA forms of DA and TM are not valid DICOM."""
    shutil.copy(dicom_path("singles", "us-rgb-bigendian__ExplVR_BigEnd.dcm"), tmp_path)
    (study,) = scan_directory(tmp_path).studies
    assert (study.study_date, study.study_time) == ("1997.04.24", "14:04:38")
    kos = build_manifest(
        study, retrieve_ae_title=AE_TITLE, retrieve_location_uid=REPOSITORY_UNIQUE_ID
    )
    assert "StudyDate" in kos and "StudyTime" in kos
    assert not kos.StudyDate and not kos.StudyTime
    assert len(parse_manifest(manifest_bytes(kos)).references) == 1


def test_each_referenced_series_carries_its_wado_rs_retrieve_url(study_ct):
    """DICOM PS3.3 C.17.2.1: Retrieve URL (0008,1190) of each series, PS3.18 10.4."""
    kos = build_manifest(
        study_ct,
        retrieve_ae_title=AE_TITLE,
        retrieve_location_uid=REPOSITORY_UNIQUE_ID,
        retrieve_url=WADO_RS + "/",
    )

    (study_item,) = kos.CurrentRequestedProcedureEvidenceSequence
    urls = {
        item.SeriesInstanceUID: item.RetrieveURL
        for item in study_item.ReferencedSeriesSequence
    }
    assert urls == {
        series: f"{WADO_RS}/studies/{study_ct.study_instance_uid}/series/{series}"
        for series in {i.series_instance_uid for i in study_ct.instances}
    }


def test_no_retrieve_url_without_a_wado_rs_service(kos_ct):
    """DICOM PS3.3 C.17.2.1: Retrieve URL is optional; none when not offered."""
    (study_item,) = kos_ct.CurrentRequestedProcedureEvidenceSequence
    assert all("RetrieveURL" not in i for i in study_item.ReferencedSeriesSequence)

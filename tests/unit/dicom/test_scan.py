"""Tests of study scanning over the shared real DICOM data."""

import logging
import shutil
from pathlib import Path

import pydicom
import pytest

from tests.conftest import BUNDLED, dicom_path
from xdsi import worker
from xdsi.dicom.scan import (
    InvalidInstance,
    NotDicom,
    read_header,
    scan_directory,
    scan_files,
)

STUDY_CT = BUNDLED / "study-ct"
STUDY_CT_UID = "1.3.46.670589.33.1.15053592413351079234.27718218421047494460"


@pytest.fixture(scope="module")
def study_ct_scan():
    return scan_directory(STUDY_CT)


def test_study_ct_scans_to_one_study_of_three_series_and_60_instances(study_ct_scan):
    """DICOM PS3.3 C.7.2.1: instances group by Study Instance UID."""
    assert study_ct_scan.rejected == ()
    (study,) = study_ct_scan.studies
    assert study.study_instance_uid == STUDY_CT_UID
    assert [s.series_number for s in study.series] == [100, 201, 401]
    assert [len(s.instances) for s in study.series] == [1, 54, 5]
    assert len(study.instances) == 60
    assert study.modalities == ("CT",)
    assert study.patient.patient_id == "PLASTIC"
    assert study.study_description == "1A TRAUMA/PLAIN HEAD DM"


def test_series_instances_are_sorted_by_instance_number(study_ct_scan):
    """DICOM PS3.3 C.7.6.1: Instance Number orders the images of a series."""
    for series in study_ct_scan.studies[0].series:
        numbers = [i.instance_number for i in series.instances]
        assert numbers == sorted(numbers)
        assert all(number is not None for number in numbers)


def test_instance_header_carries_identifiers_and_size(study_ct_scan):
    """DICOM PS3.3 C.12.1: SOP Class and Instance UID identify an object."""
    headers = study_ct_scan.studies[0].instances
    secondary_capture = [h for h in headers if h.series_number == 401]
    assert {h.sop_class_uid for h in secondary_capture} == {"1.2.840.10008.5.1.4.1.1.7"}
    for header in headers:
        assert header.size == header.path.stat().st_size
        assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        assert header.study_instance_uid == STUDY_CT_UID


def test_read_header_stops_before_pixel_data():
    """DICOM PS3.10 7.1: the header is read without the Pixel Data element."""
    header, ds = read_header(STUDY_CT / "S2010" / "I0010.dcm")
    assert "PixelData" not in ds
    assert header.series_number == 201
    assert header.modality == "CT"


def test_read_header_never_touches_pixel_bytes(tmp_path):
    """DICOM PS3.10 7.1: a file cut inside Pixel Data still has a header."""
    source = STUDY_CT / "S2010" / "I0020.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 4])
    header, _ = read_header(cut)
    assert header.sop_instance_uid == read_header(source)[0].sop_instance_uid


def _bad(name: str) -> Path:
    """A file of bad/ by its whole name, or by the kind of defect its name
    starts with (``<kind>__<the public data set's own name>``)."""
    bad = dicom_path("bad")
    if (bad / name).exists():
        return bad / name
    (path,) = bad.glob(f"{name}__*")
    return path


@pytest.mark.parametrize(
    ("name", "error", "reason"),
    [
        ("gzip-not-dicom__zipMR.gz", NotDicom, "not DICOM"),
        ("no-preamble-no-meta__no_meta.dcm", NotDicom, "not DICOM"),
        (
            "no-preamble-no-meta-explicit__ExplVR_LitEndNoMeta.dcm",
            NotDicom,
            "not DICOM",
        ),
        (
            "meta-missing-transfer-syntax__meta_missing_tsyntax.dcm",
            InvalidInstance,
            "no SOPInstanceUID",
        ),
        ("no-study-series-uid", InvalidInstance, "no StudyInstanceUID"),
        ("no-sop-class-uid", InvalidInstance, "no SOPClassUID"),
        (
            "bad-sequence-un__bad_sequence.dcm",
            InvalidInstance,
            "is not a valid UID",
        ),
        (
            "wrong-byte-order-undefined-length__"
            "GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm",
            InvalidInstance,
            "unreadable",
        ),
    ],
)
def test_read_header_rejects_bad_file_with_reason(name, error, reason):
    """DICOM PS3.10 7.1, DICOM PS3.5 9.1: a bad file is refused, with why."""
    path = _bad(name)
    with pytest.raises(error, match=reason) as caught:
        read_header(path)
    assert caught.value.path == path


def test_scan_of_bad_files_rejects_or_reads_each_and_never_crashes():
    """DICOM PS3.10 7.1: every file under bad/ is either read or rejected."""
    result = scan_directory(dicom_path("bad"))
    rejected = {path.name for path, _ in result.rejected}
    read = {i.path.name for s in result.studies for i in s.instances}
    files = {path.name for path in dicom_path("bad").iterdir()}
    assert rejected | read == files
    assert not rejected & read
    assert len(rejected) == 8
    assert all(reason for _, reason in result.rejected)


def test_rejected_file_is_logged_with_path_and_reason_and_no_patient_data(caplog):
    """ITI TF-2 3.20: patient data belongs in the audit trail, not in a log.
    Each file is logged with its path and reason at DEBUG only."""
    with caplog.at_level(logging.DEBUG, logger="xdsi.dicom.scan"):
        scan_directory(dicom_path("bad"))
    ours = [r for r in caplog.records if r.name == "xdsi.dicom.scan"]
    files = [r for r in ours if r.getMessage().startswith("Rejected /")]
    assert len(files) == 8 and {r.levelno for r in files} == {logging.DEBUG}
    text = "\n".join(r.getMessage() for r in ours)
    assert f"{_bad('no-sop-class-uid').name}: no SOPClassUID" in text
    # The file without SOP Class UID carries Patient's Name HELLO^A; the log
    # names the file (its name is the public data set's) but not the patient.
    assert "HELLO" not in text
    (warning,) = [r for r in ours if r.levelno >= logging.INFO]
    assert str(dicom_path("bad")) not in warning.getMessage()


def test_non_dicom_file_beside_a_study_is_rejected():
    """DICOM PS3.10 7.1: the XML beside the IHE study is not DICOM."""
    result = scan_directory(dicom_path("study-mr"))
    assert [(p.name, why) for p, why in result.rejected] == [
        ("metadata.xml", "not DICOM: no PS3.10 preamble or File Meta")
    ]
    (study,) = result.studies
    assert len(study.instances) == 37
    assert study.modalities == ("MR",)


def test_repeated_sop_instance_uid_is_rejected(tmp_path):
    """DICOM PS3.3 C.12.1.1.1: a SOP Instance UID names one instance only."""
    source = STUDY_CT / "S1000" / "I0010.dcm"
    shutil.copy(source, tmp_path / "a.dcm")
    shutil.copy(source, tmp_path / "b.dcm")
    result = scan_directory(tmp_path)
    assert len(result.studies[0].instances) == 1
    ((path, reason),) = result.rejected
    assert path.name == "b.dcm"
    assert reason.startswith("duplicate SOP Instance UID")


@pytest.mark.parametrize("split", [False, True], ids=["one-scan", "worker-split"])
def test_sop_instance_uid_in_files_of_other_content_is_taken_from_neither(
    tmp_path, own_worker, monkeypatch, split
):
    """DICOM PS3.3 C.12.1.1.1: of two files carrying one SOP Instance UID
    with other bytes (a copy cut in half beside the whole one), a header
    does not tell which is the instance; neither is kept, both are named."""
    folder = tmp_path / "cd"
    shutil.copytree(STUDY_CT, folder / "study")
    whole = folder / "study" / "S1000" / "I0010.dcm"
    half = folder / "HALF0001"
    data = whole.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    monkeypatch.setattr(worker, "MIN_INSTANCES", 2 if split else len(files) + 1)

    result = scan_files(files)

    uid = pydicom.dcmread(whole, stop_before_pixels=True).SOPInstanceUID
    (study,) = result.studies
    assert uid not in {i.sop_instance_uid for i in study.instances}
    assert len(study.instances) == 59
    reasons = dict(result.rejected)
    assert set(reasons) == {half, whole}
    assert reasons[half] == (
        f"SOP Instance UID {uid} is also in {whole} with other content; "
        "neither file is taken"
    )
    assert f"is also in {half} with other content" in reasons[whole]


def _mixed_folder(tmp_path: Path) -> list[Path]:
    """Two studies interleaved, a file read twice in each half, junk: in
    the order a scan reads them."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    ct = sorted(p for p in STUDY_CT.rglob("*") if p.is_file())
    mr = sorted(p for p in (dicom_path("study-mr", "images")).rglob("*") if p.is_file())
    sources = [f for pair in zip(ct, mr, strict=False) for f in pair] + ct[len(mr) :]
    sources += [ct[3], mr[5], ct[40], ct[3]]  # again, in the second half
    sources.insert(10, ct[2])  # again, in the first half
    files = []
    for n, source in enumerate(sources):
        target = folder / f"{n:04d}.dcm"
        shutil.copy(source, target)
        files.append(target)
    # A repeat with other content (acquired later than the rest) counts for
    # nothing, and takes its first copy with it.
    late = pydicom.dcmread(files[-2])
    late.AcquisitionDateTime = "20991231235959"
    late.save_as(files[-2])
    junk = folder / f"{len(files) // 4:04d}-junk.dcm"
    junk.write_bytes(b"not DICOM")
    files.insert(len(files) // 4 + 1, junk)
    return sorted(files)


def test_scan_split_with_the_worker_reads_as_one_scan(
    tmp_path, own_worker, monkeypatch
):
    """A scan whose first half is read by the worker process gives the
    studies of a scan in one process, first-instance attributes and rejected
    repeats included."""
    files = _mixed_folder(tmp_path)
    monkeypatch.setattr(worker, "MIN_INSTANCES", len(files) + 1)
    alone = scan_files(files)
    assert worker.DEFAULT.executor is None

    monkeypatch.setattr(worker, "MIN_INSTANCES", 2)
    split = scan_files(files)

    assert worker.DEFAULT.executor is not None
    assert split.studies == alone.studies
    assert split.rejected == alone.rejected
    # Five repeats, the junk file, and the first copy of the repeat with
    # other content.
    assert len(alone.studies) == 2 and len(alone.rejected) == 7
    assert all(
        not s.last_acquisition_datetime.startswith("2099")
        for study in split.studies
        for s in study.series
    )


def test_scan_split_logs_what_the_worker_rejected(
    tmp_path, own_worker, monkeypatch, caplog
):
    """Each rejected file is logged with its path at DEBUG; at WARNING only
    their number, since a folder may be named after its patient."""
    files = _mixed_folder(tmp_path)
    monkeypatch.setattr(worker, "MIN_INSTANCES", 2)
    with caplog.at_level(logging.DEBUG, logger="xdsi.dicom.scan"):
        result = scan_files(files)

    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    for path, reason in result.rejected:
        assert f"Rejected {path}: {reason}" in debug
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert warnings == [
        f"Rejected {len(result.rejected)} of {len(files)} files "
        "(each with its reason at DEBUG)"
    ]
    assert str(tmp_path) not in " ".join(warnings)


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "worker"])
def test_study_and_series_attributes_do_not_depend_on_the_order_files_are_read(
    own_worker, monkeypatch, split
):
    """The bundled CT's instances disagree on Study Time (one says
    09:34:29.864, the others 09:34:25.394): the study's attributes are its
    first instance's (first series by Series Number, first instance by
    Instance Number), read first or last, in one process or two, so that
    one study always gets one serviceStartTime."""
    files = sorted(p for p in STUDY_CT.rglob("*") if p.is_file())
    times = {pydicom.dcmread(p, stop_before_pixels=True).StudyTime for p in files}
    assert len(times) == 2
    monkeypatch.setattr(worker, "MIN_INSTANCES", 2 if split else len(files) + 1)

    studies = [scan_files(order).studies for order in (files, files[::-1])]

    (forward,), (backward,) = studies
    assert forward == backward
    first = forward.series[0].instances[0]
    ds = pydicom.dcmread(first.path, stop_before_pixels=True)
    assert forward.study_time == ds.StudyTime
    assert forward.series[0].series_description == ds.SeriesDescription


def test_modalities_are_those_of_every_instance_not_only_each_series_first():
    """Modalities in Study (DICOM PS3.18 Table 10.6.3-3) holds the Modality
    of each instance; a series of CT images whose first instance is an SR
    (the shared singles CT_small and its TID 1500 report share a series)
    is a CT study still, for its eventCodeList (RAD TF-3 4.68.4.1.2.3) as
    for QIDO-RS."""
    result = scan_files(
        [
            dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
            dicom_path("singles", "sr-comprehensive3d-tid1500__sr_document.dcm"),
        ]
    )
    (study,) = result.studies
    assert len(study.series) == 1

    assert study.modalities == ("CT",)

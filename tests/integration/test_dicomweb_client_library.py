"""The DICOMweb services of the Imaging Document Source (WADO-RS, RAD TF-3
4.107; QIDO-RS, RAD TF-3 4.129; STOW-RS, DICOM PS3.18 10.5) driven through
every applicable method of dicomweb-client, a user agent that follows DICOM
PS3.18, against a node on real loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.integration.test_dicomweb_wado_qido import _published_copy
from xdsi.dicom import scan

MR_MULTI_FRAME = "enhanced-mr-mf__emri_small.dcm"
US_JPEG = "us-mf-jpeg-baseline__examples_ybr_color.dcm"
REPORT = "sr-basic-text__reportsi.dcm"


@pytest.fixture(scope="module")
def studies(
    shared_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """The MR study published, and two multi-frame images and a report each
    published as a study of its own."""
    shared_node.feed()
    (mr,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    shared_node.services.imaging_source.publish(mr, PATIENT)
    folder = tmp_path_factory.mktemp("copies")
    yield {
        "mr": mr,
        "enhanced": _published_copy(
            shared_node, dicom_path("singles", MR_MULTI_FRAME), folder / "enhanced"
        ),
        "us": _published_copy(
            shared_node, dicom_path("singles", US_JPEG), folder / "us"
        ),
        "report": _published_copy(
            shared_node, dicom_path("singles", REPORT), folder / "report"
        ),
    }


@pytest.fixture
def client(shared_node: RunningNode) -> DICOMwebClient:
    return DICOMwebClient(url=shared_node.settings.dicomweb_url)


def _uids(answers: list[dict], keyword: str) -> list[str]:
    """The value of ``keyword`` in each DICOM JSON answer (PS3.18 F.2)."""
    tag = f"{pydicom.datadict.tag_for_keyword(keyword):08X}"
    return [a[tag]["Value"][0] for a in answers]


def _frame_of(path: Path, number: int) -> bytes:
    """Frame ``number`` (from 1) of a native image, as the bytes held."""
    ds = pydicom.dcmread(path)
    size = len(ds.PixelData) // int(ds.get("NumberOfFrames", 1) or 1)
    return ds.PixelData[(number - 1) * size : number * size]


# --- QIDO-RS (DICOM PS3.18 10.6; RAD TF-3 4.129) ---------------------------


def test_search_for_studies_with_filters_fields_and_paging(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.3.4: matching, includefield and limit/offset, the
    parameters search_for_studies sends."""
    mr = studies["mr"]
    everything = _uids(client.search_for_studies(), "StudyInstanceUID")
    pages = [
        _uids(client.search_for_studies(limit=1, offset=n), "StudyInstanceUID")
        for n in range(len(everything) + 1)
    ]
    remaining = client.search_for_studies(limit=1, get_remaining=True)
    (found,) = client.search_for_studies(
        search_filters={"ModalitiesInStudy": "MR", "PatientName": "multi*"},
        fields=["StudyDescription", "00100030"],
    )

    assert len(everything) == 4
    assert [uid for page in pages for uid in page] == everything
    assert pages[-1] == []
    assert _uids(remaining, "StudyInstanceUID") == everything
    answer = pydicom.Dataset.from_json(found)
    assert answer.StudyInstanceUID == mr.study_instance_uid
    held = pydicom.dcmread(mr.instances[0].path, stop_before_pixels=True)
    assert answer.StudyDescription == held.StudyDescription
    assert "PatientBirthDate" in answer


def test_search_with_fuzzymatching_is_answered_by_literal_matching(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.3.4.2: fuzzy matching is optional; a node without it
    matches literally (and says so in a Warning)."""
    literal = client.search_for_studies(search_filters={"PatientName": "multi*"})
    fuzzy = client.search_for_studies(
        fuzzymatching=True, search_filters={"PatientName": "multi*"}
    )

    assert _uids(fuzzy, "StudyInstanceUID") == _uids(literal, "StudyInstanceUID")
    assert _uids(literal, "StudyInstanceUID") == [studies["mr"].study_instance_uid]


def test_search_for_series_of_all_studies_and_of_one(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 10.6.1: All Series and Study's Series resources."""
    mr = studies["mr"]
    every = client.search_for_series()
    of_study = client.search_for_series(
        mr.study_instance_uid,
        search_filters={"Modality": "MR"},
        fields=["SeriesDescription"],
    )
    first = client.search_for_series(mr.study_instance_uid, limit=1)

    assert len(every) == len(mr.series) + 3
    assert set(_uids(of_study, "SeriesInstanceUID")) == {
        s.series_instance_uid for s in mr.series
    }
    assert all("SeriesDescription" in pydicom.Dataset.from_json(s) for s in of_study)
    assert len(first) == 1


def test_search_for_instances_at_each_level(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 10.6.1: All Instances, Study's and Series' Instances."""
    mr = studies["mr"]
    series = mr.series[0]
    every = client.search_for_instances()
    of_study = client.search_for_instances(
        mr.study_instance_uid, limit=5, get_remaining=True
    )
    of_series = client.search_for_instances(
        mr.study_instance_uid,
        series.series_instance_uid,
        search_filters={"SOPInstanceUID": series.instances[0].sop_instance_uid},
        fields=["Rows"],
    )

    assert len(every) == len(mr.instances) + 3
    assert set(_uids(of_study, "SOPInstanceUID")) == {
        i.sop_instance_uid for i in mr.instances
    }
    (only,) = of_series
    assert pydicom.Dataset.from_json(only).Rows == 256


# --- WADO-RS instances (DICOM PS3.18 10.4.1.1.1; RAD TF-3 4.107) -----------


def test_retrieve_and_iterate_study_and_series(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 10.4.1.1.1: a study and a series, whole or as they come."""
    mr = studies["mr"]
    series = mr.series[0]
    all_uids = {i.sop_instance_uid for i in mr.instances}
    series_uids = {i.sop_instance_uid for i in series.instances}

    study = client.retrieve_study(mr.study_instance_uid)
    iterated = list(client.iter_study(mr.study_instance_uid))
    sent = client.retrieve_series(mr.study_instance_uid, series.series_instance_uid)
    iterated_series = list(
        client.iter_series(mr.study_instance_uid, series.series_instance_uid)
    )

    assert {ds.SOPInstanceUID for ds in study} == all_uids
    assert {ds.SOPInstanceUID for ds in iterated} == all_uids
    assert {ds.SOPInstanceUID for ds in sent} == series_uids
    assert {ds.SOPInstanceUID for ds in iterated_series} == series_uids
    for ds in study:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_retrieve_instance_in_the_syntax_asked_for(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.7.3.5.2: the transfer-syntax parameter of the Accept
    the library builds; for an instance it asks ``*`` (as held) unless told
    otherwise, and Explicit VR Little Endian is the decoded image."""
    us = studies["us"]

    uids = (us.study_instance_uid, us.series_instance_uid, us.sop_instance_uid)

    native = client.retrieve_instance(
        *uids, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    by_default = client.retrieve_instance(*uids)
    as_held = client.retrieve_instance(
        *uids, media_types=(("application/dicom", JPEGBaseline8Bit),)
    )

    assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert native.NumberOfFrames == 30
    frame_size = native.Rows * native.Columns * native.SamplesPerPixel
    assert len(native.PixelData) == frame_size * 30
    for sent in (by_default, as_held):
        assert sent.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert sent.PixelData == pydicom.dcmread(us.path).PixelData


# --- WADO-RS metadata and bulk data (DICOM PS3.18 10.4.1.1.2, 8.7.3.3.3) ---


def test_retrieve_metadata_at_each_level(client: DICOMwebClient, studies: dict) -> None:
    """DICOM PS3.18 10.4.1.1.2: study, series and instance metadata."""
    mr = studies["mr"]
    series = mr.series[0]
    instance = series.instances[0]

    study = client.retrieve_study_metadata(mr.study_instance_uid)
    of_series = client.retrieve_series_metadata(
        mr.study_instance_uid, series.series_instance_uid
    )
    one = client.retrieve_instance_metadata(
        mr.study_instance_uid, series.series_instance_uid, instance.sop_instance_uid
    )

    assert set(_uids(study, "SOPInstanceUID")) == {
        i.sop_instance_uid for i in mr.instances
    }
    assert set(_uids(of_series, "SOPInstanceUID")) == {
        i.sop_instance_uid for i in series.instances
    }
    held = pydicom.dcmread(instance.path, stop_before_pixels=True)
    assert one["00100020"]["Value"] == [held.PatientID]


def test_retrieve_bulkdata_by_the_uri_metadata_gives(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.7.3.3.3 and 10.4.1.1.2: the BulkDataURI of Pixel Data
    names the value, sent as application/octet-stream."""
    instance = studies["mr"].instances[0]
    metadata = client.retrieve_instance_metadata(
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
    )
    uri = metadata["7FE00010"]["BulkDataURI"]

    (value,) = client.retrieve_bulkdata(uri)
    (octets,) = client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))
    iterated = list(client.iter_bulkdata(uri))

    pixels = pydicom.dcmread(instance.path).PixelData
    assert value == octets == pixels
    assert iterated == [pixels]


# --- WADO-RS frames (DICOM PS3.18 10.4.1.1.1, 8.7.3.3.2) -------------------


def test_retrieve_frames_uncompressed(client: DICOMwebClient, studies: dict) -> None:
    """DICOM PS3.18 8.7.3.3.2: frames by default as application/octet-stream,
    native and little endian; several at once, in the order listed."""
    mr = studies["mr"].instances[0]
    enhanced = studies["enhanced"]
    uids = (
        enhanced.study_instance_uid,
        enhanced.series_instance_uid,
        enhanced.sop_instance_uid,
    )

    (single,) = client.retrieve_instance_frames(
        mr.study_instance_uid, mr.series_instance_uid, mr.sop_instance_uid, [1]
    )
    several = client.retrieve_instance_frames(*uids, [3, 1])
    iterated = list(client.iter_instance_frames(*uids, [2]))
    explicit = client.retrieve_instance_frames(
        *uids, [2], media_types=(("application/octet-stream", ExplicitVRLittleEndian),)
    )

    assert single == pydicom.dcmread(mr.path).PixelData
    assert several == [_frame_of(enhanced.path, 3), _frame_of(enhanced.path, 1)]
    assert iterated == explicit == [_frame_of(enhanced.path, 2)]


def test_retrieve_frames_compressed_as_held_or_decoded(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.7.3.3.2 and Table 8.7.3-2: frames of a JPEG Baseline
    image as image/jpeg (its own bit stream), or decoded when
    application/octet-stream is asked for."""
    us = studies["us"]
    uids = (us.study_instance_uid, us.series_instance_uid, us.sop_instance_uid)
    held = pydicom.dcmread(us.path)
    encapsulated = list(
        pydicom.encaps.generate_frames(held.PixelData, number_of_frames=30)
    )

    as_jpeg = client.retrieve_instance_frames(
        *uids, [1, 2], media_types=("image/jpeg",)
    )
    with_syntax = client.retrieve_instance_frames(
        *uids, [2], media_types=(("image/jpeg", JPEGBaseline8Bit),)
    )
    decoded = client.retrieve_instance_frames(
        *uids, [1], media_types=("application/octet-stream",)
    )

    assert as_jpeg == encapsulated[:2]
    assert with_syntax == encapsulated[1:2]
    (raw,) = decoded
    assert len(raw) == held.Rows * held.Columns * held.SamplesPerPixel
    assert Image.open(BytesIO(as_jpeg[0])).size == (held.Columns, held.Rows)


# --- WADO-RS rendered (DICOM PS3.18 10.4.1.1.3, 8.3.5.1) -------------------


@pytest.mark.parametrize(
    ("media_type", "pillow_format"), [("image/jpeg", "JPEG"), ("image/png", "PNG")]
)
def test_retrieve_instance_rendered(
    client: DICOMwebClient, studies: dict, media_type: str, pillow_format: str
) -> None:
    """DICOM PS3.18 10.4.1.1.3: an instance rendered, with the quality,
    viewport and window parameters (8.3.5.1.x) the library passes on."""
    mr = studies["mr"].instances[0]
    uids = (mr.study_instance_uid, mr.series_instance_uid, mr.sop_instance_uid)

    plain = client.retrieve_instance_rendered(*uids, media_types=(media_type,))
    shaped = client.retrieve_instance_rendered(
        *uids,
        media_types=(media_type,),
        params={"viewport": "64,64", "window": "100,200,linear", "quality": 80},
    )
    default = client.retrieve_instance_rendered(*uids)

    assert Image.open(BytesIO(plain)).format == pillow_format
    assert Image.open(BytesIO(plain)).size == (256, 256)
    assert Image.open(BytesIO(shaped)).size == (64, 64)
    assert Image.open(BytesIO(default)).format == "JPEG"


@pytest.mark.parametrize(
    ("media_type", "pillow_format"), [("image/jpeg", "JPEG"), ("image/png", "PNG")]
)
def test_retrieve_instance_frames_rendered(
    client: DICOMwebClient, studies: dict, media_type: str, pillow_format: str
) -> None:
    """DICOM PS3.18 10.4.1.1.3: one frame of a multi-frame image rendered."""
    enhanced = studies["enhanced"]
    uids = (
        enhanced.study_instance_uid,
        enhanced.series_instance_uid,
        enhanced.sop_instance_uid,
    )

    second = client.retrieve_instance_frames_rendered(
        *uids, [2], media_types=(media_type,)
    )
    default = client.retrieve_instance_frames_rendered(*uids, [2])

    image = Image.open(BytesIO(second))
    assert image.format == pillow_format
    held = pydicom.dcmread(enhanced.path, stop_before_pixels=True)
    assert image.size == (held.Columns, held.Rows)
    assert Image.open(BytesIO(default)).format == "JPEG"
    first = client.retrieve_instance_frames_rendered(
        *uids, [1], media_types=("image/png",)
    )
    if media_type == "image/png":
        assert not np.array_equal(
            np.asarray(Image.open(BytesIO(first))), np.asarray(image)
        )


# --- STOW-RS (DICOM PS3.18 10.5) -------------------------------------------


def _new_study(source: Path, patient_of: Path) -> pydicom.Dataset:
    """A copy of ``source`` as a study of its own, of the patient of
    ``patient_of``."""
    ds = pydicom.dcmread(source)
    held = pydicom.dcmread(patient_of, stop_before_pixels=True)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName"):
        if keyword in held:
            setattr(ds, keyword, getattr(held, keyword))
    return ds


def test_store_instances_of_a_new_study(running_node: RunningNode) -> None:
    """DICOM PS3.18 10.5: STOW-RS to the Studies resource and to a Study,
    answered with the Store Instances Response Module (10.5.3); on a node
    of its own, since what it stores is published in time."""
    running_node.feed()
    client = DICOMwebClient(url=running_node.settings.dicomweb_url)
    patient = sorted(dicom_path("study-mr", "images").iterdir())[0]
    first = _new_study(dicom_path("singles", "ts-explicit-le__CT_small.dcm"), patient)
    second = _new_study(dicom_path("singles", "ts-rle__MR_small_RLE.dcm"), patient)
    second.StudyInstanceUID = first.StudyInstanceUID

    answer = client.store_instances([first])
    to_study = client.store_instances(
        [second], study_instance_uid=first.StudyInstanceUID
    )

    for sent, response in ((first, answer), (second, to_study)):
        (stored,) = response.ReferencedSOPSequence
        assert stored.ReferencedSOPInstanceUID == sent.SOPInstanceUID
        assert stored.ReferencedSOPClassUID == sent.SOPClassUID
        assert stored.RetrieveURL.endswith(f"/instances/{sent.SOPInstanceUID}")
        assert response.RetrieveURL == (
            f"{client.base_url}/studies/{first.StudyInstanceUID}"
        )
        assert "FailedSOPSequence" not in response


def _middle_image(series: scan.Series) -> scan.InstanceHeader:
    """The middle instance of ``series`` by Instance Number."""
    numbered = sorted(
        (pydicom.dcmread(i.path, stop_before_pixels=True).InstanceNumber, i)
        for i in series.instances
    )
    return numbered[(len(numbered) - 1) // 2][1]


@pytest.mark.parametrize(
    ("media_type", "pillow_format"), [("image/jpeg", "JPEG"), ("image/png", "PNG")]
)
def test_retrieve_series_rendered(
    client: DICOMwebClient, studies: dict, media_type: str, pillow_format: str
) -> None:
    """DICOM PS3.18 10.4.1.1.3 and Table 10.3-2: a Rendered Series, one
    image in a Rendered Media Type, as the library reads it; the image its
    thumbnail shows, rendered at its own size."""
    mr = studies["mr"]
    series = mr.series[0]
    shown = _middle_image(series)

    image = client.retrieve_series_rendered(
        mr.study_instance_uid, series.series_instance_uid, media_types=(media_type,)
    )
    default = client.retrieve_series_rendered(
        mr.study_instance_uid, series.series_instance_uid
    )
    shaped = client.retrieve_series_rendered(
        mr.study_instance_uid,
        series.series_instance_uid,
        media_types=(media_type,),
        params={"viewport": "32,32"},
    )

    assert Image.open(BytesIO(image)).format == pillow_format
    assert Image.open(BytesIO(default)).format == "JPEG"
    assert Image.open(BytesIO(shaped)).size == (32, 32)
    if media_type == "image/png":
        assert image == client.retrieve_instance_rendered(
            mr.study_instance_uid,
            series.series_instance_uid,
            shown.sop_instance_uid,
            media_types=(media_type,),
        )


def test_rendered_study_is_the_image_of_its_first_series(
    shared_node: RunningNode, client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 10.4.1.1.3 and Table 10.3-2: a Rendered Study (which the
    library has no method for), one image in a Rendered Media Type."""
    mr = studies["mr"]
    first = min(
        mr.series,
        key=lambda s: (
            pydicom.dcmread(s.instances[0].path, stop_before_pixels=True).SeriesNumber
        ),
    )
    shown = _middle_image(first)

    answer = requests.get(
        f"{client.base_url}/studies/{mr.study_instance_uid}/rendered",
        headers={"Accept": "image/png"},
        timeout=30,
    )

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "image/png"
    assert answer.content == client.retrieve_instance_rendered(
        mr.study_instance_uid,
        first.series_instance_uid,
        shown.sop_instance_uid,
        media_types=("image/png",),
    )


def test_rendered_series_of_no_image_is_not_acceptable(
    client: DICOMwebClient, studies: dict
) -> None:
    """DICOM PS3.18 8.7.8.1: a series of a report has no Rendered Media Type
    this node makes (406); a series not published is not found (404)."""
    report = studies["report"]

    with pytest.raises(requests.HTTPError) as refused:
        client.retrieve_series_rendered(
            report.study_instance_uid,
            report.series_instance_uid,
            media_types=("image/jpeg",),
        )
    with pytest.raises(requests.HTTPError) as missing:
        client.retrieve_series_rendered(
            report.study_instance_uid, "1.2.3", media_types=("image/jpeg",)
        )

    assert refused.value.response.status_code == 406
    assert missing.value.response.status_code == 404

"""WADO-URI (RAD TF-3 4.55), WADO-RS (RAD TF-3 4.107) and QIDO-RS (RAD TF-3
4.129) at the Imaging Document Source, with dicomweb-client as the client."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from lxml import etree
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from werkzeug.exceptions import default_exceptions

from tests.conftest import dicom_path, shared_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi.dicom import scan
from xdsi.store.schema import imaging_instance, imaging_manifest

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


@pytest.fixture(scope="module")
def published(shared_node: RunningNode) -> Iterator[scan.Study]:
    """The MR study published once; the CT study kept but not published."""
    shared_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    source = shared_node.services.imaging_source
    source.publish(study, PATIENT)
    (kept,) = scan.scan_directory(dicom_path("study-ct-ihe", "images")).studies
    source.keep_instances(kept, PATIENT)
    yield study


@pytest.fixture
def client(shared_node: RunningNode) -> DICOMwebClient:
    return DICOMwebClient(url=shared_node.settings.dicomweb_url)


def test_qido_finds_the_published_study_by_patient_id(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 10.6.3.3.1 (RAD TF-3 4.129): study level answer."""
    held = pydicom.dcmread(published.instances[0].path, stop_before_pixels=True)

    (found,) = client.search_for_studies(search_filters={"PatientID": held.PatientID})

    answer = pydicom.Dataset.from_json(found)
    assert answer.StudyInstanceUID == published.study_instance_uid
    assert answer.ModalitiesInStudy == "MR"
    assert answer.NumberOfStudyRelatedSeries == 2
    assert answer.NumberOfStudyRelatedInstances == len(published.instances)
    assert answer.RetrieveURL == (
        f"{client.base_url}/studies/{published.study_instance_uid}"
    )


def test_qido_answers_published_studies_only(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """RAD TF-3 4.129: a study held but never published is not found."""
    studies = client.search_for_studies()

    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in studies] == [
        published.study_instance_uid
    ]
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}) == []


@pytest.mark.parametrize(
    ("filters", "count"),
    [
        ({"ModalitiesInStudy": "MR"}, 1),
        ({"PatientName": "multi*"}, 1),
        ({"StudyDate": "19000101-"}, 1),
        ({"StudyDate": "-19000101"}, 0),
        ({"0020000D": "1.2.3,1.3.6.1.4.1.21367.201599.1.201604020954059"}, 1),
        ({"StudyInstanceUID": "1.2.3"}, 0),
    ],
    ids=["modality", "name-wildcard", "date-from", "date-until", "uid-list", "no-uid"],
)
def test_qido_study_matching(
    client: DICOMwebClient, published: scan.Study, filters: dict, count: int
) -> None:
    """DICOM PS3.4 C.2.2.2: single value, wildcard, range and UID list matching."""
    assert len(client.search_for_studies(search_filters=filters)) == count


def test_qido_series_and_instances_of_the_study(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 10.6.3.3.2 and 10.6.3.3.3: series and instance answers."""
    series = client.search_for_series(published.study_instance_uid)
    first = published.series[0]
    instances = client.search_for_instances(
        published.study_instance_uid, first.series_instance_uid
    )

    assert {pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series} == {
        s.series_instance_uid for s in published.series
    }
    assert {pydicom.Dataset.from_json(i).SOPInstanceUID for i in instances} == {
        i.sop_instance_uid for i in first.instances
    }


def test_qido_refuses_an_unknown_matching_key(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 8.3.4: a key the level does not support is a 400."""
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies",
        params={"NoSuchKeyword": "1"},
        timeout=30,
    )
    assert answer.status_code == 400


def test_wado_rs_instance_as_stored_is_byte_identical(
    shared_node: RunningNode, client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 10.4.1 (RAD TF-3 4.107): transfer-syntax=* keeps the file."""
    instance = published.instances[0]
    url = (
        f"{shared_node.settings.dicomweb_url}/studies/{instance.study_instance_uid}"
        f"/series/{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
    )

    raw = requests.get(
        url,
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
        },
        timeout=30,
    )
    sent = client.retrieve_instance(
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
        media_types=(("application/dicom", "*"),),
    )

    assert raw.status_code == 200
    assert instance.path.read_bytes() in raw.content
    assert sent == pydicom.dcmread(instance.path)


def test_wado_rs_series_transcoded_to_the_accepted_syntax(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 8.7.3.5.2: the transfer-syntax of the Accept header."""
    series = published.series[1]

    sent = client.retrieve_series(
        published.study_instance_uid,
        series.series_instance_uid,
        media_types=(("application/dicom", RLELossless),),
    )

    held = {i.sop_instance_uid: i.path for i in series.instances}
    assert {s.SOPInstanceUID for s in sent} == set(held)
    for instance in sent:
        assert instance.file_meta.TransferSyntaxUID == RLELossless
        original = pydicom.dcmread(held[instance.SOPInstanceUID]).pixel_array
        assert np.array_equal(instance.pixel_array, original)


def test_head_requests_leave_no_transcoded_copy_behind(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """RFC 9110 9.3.2: HEAD answers with the headers of a GET, whose body is
    never sent; the copies transcoded to answer it are removed all the same,
    as for a GET (WADO-RS, DICOM PS3.18 10.4; WADO-URI, 9.1)."""
    spool = shared_node.settings.storage / "spool" / "imaging_source-dicomweb"
    series = published.series[1]
    instance = series.instances[0]
    accept = (
        f'multipart/related; type="application/dicom"; transfer-syntax={RLELossless}'
    )

    study = requests.head(
        f"{shared_node.settings.dicomweb_url}/studies/"
        f"{published.study_instance_uid}/series/{series.series_instance_uid}",
        headers={"Accept": accept},
        timeout=30,
    )
    wado = requests.head(
        shared_node.settings.dicomweb_url.rsplit("/", 1)[0] + "/wado",
        params={
            "requestType": "WADO",
            "studyUID": instance.study_instance_uid,
            "seriesUID": instance.series_instance_uid,
            "objectUID": instance.sop_instance_uid,
            "contentType": "application/dicom",
            "transferSyntax": RLELossless,
        },
        timeout=30,
    )

    assert (study.status_code, wado.status_code) == (200, 200)
    deadline = time.monotonic() + 10
    while any(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(spool.iterdir()) == []


def test_wado_rs_study_defaults_to_explicit_little_endian(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 8.7.3.5.2: no transfer-syntax means Explicit VR Little Endian."""
    sent = client.retrieve_study(published.study_instance_uid)

    assert len(sent) == len(published.instances)
    assert {s.file_meta.TransferSyntaxUID for s in sent} == {ExplicitVRLittleEndian}


def test_wado_rs_metadata_names_pixel_data_by_a_bulkdata_uri(
    client: DICOMwebClient, published: scan.Study
) -> None:
    """DICOM PS3.18 10.4.1.1.2 and F.2.6: metadata without bulk data, Pixel
    Data named by a BulkDataURI, which gives the frames' pixel cells."""
    series = published.series[0]

    metadata = client.retrieve_series_metadata(
        published.study_instance_uid, series.series_instance_uid
    )

    assert len(metadata) == len(series.instances)
    assert all(set(m["7FE00010"]) == {"vr", "BulkDataURI"} for m in metadata)
    assert {pydicom.Dataset.from_json(m).SOPInstanceUID for m in metadata} == {
        i.sop_instance_uid for i in series.instances
    }
    first = next(
        m
        for m in metadata
        if m["00080018"]["Value"][0] == series.instances[0].sop_instance_uid
    )
    (cells,) = client.retrieve_bulkdata(
        first["7FE00010"]["BulkDataURI"],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
    )
    held = pydicom.dcmread(series.instances[0].path).pixel_array
    assert cells == held.astype(held.dtype.newbyteorder("<")).tobytes()


def test_wado_rs_study_metadata_streams_one_instance_at_a_time(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 10.4.1.1.2: a study's metadata is one JSON array, sent
    as it is made (chunked, no length known ahead), so that a study of any
    size is never whole in the node's memory."""
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies/"
        f"{published.study_instance_uid}/metadata",
        timeout=30,
    )

    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/dicom+json")
    assert "Content-Length" not in answer.headers
    assert answer.headers.get("Transfer-Encoding") == "chunked"
    documents = answer.json()
    assert sorted(pydicom.Dataset.from_json(d).SOPInstanceUID for d in documents) == (
        sorted(i.sop_instance_uid for i in published.instances)
    )


def test_wado_rs_metadata_to_an_http_10_client_is_ended_by_closing(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """RFC 9112 6.1 and 6.3: an HTTP/1.0 client knows no chunked transfer
    coding, so an answer of no known length comes unchunked, ended by the
    closing of the connection."""
    url = urlsplit(shared_node.settings.dicomweb_url)
    request = (
        f"GET {url.path}/studies/{published.study_instance_uid}/metadata "
        f"HTTP/1.0\r\nHost: {url.netloc}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as peer:
        peer.sendall(request.encode())
        answer = b""
        while chunk := peer.recv(65536):
            answer += chunk

    head, _, body = answer.partition(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    assert status.startswith("HTTP/1.0 200")
    assert "transfer-encoding" not in headers
    assert "content-length" not in headers
    documents = json.loads(body)
    assert sorted(pydicom.Dataset.from_json(d).SOPInstanceUID for d in documents) == (
        sorted(i.sop_instance_uid for i in published.instances)
    )


def test_wado_rs_unpublished_study_is_not_found(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """RAD TF-3 4.107: only published studies are served."""
    (kept,) = scan.scan_directory(dicom_path("study-ct-ihe", "images")).studies
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies/{kept.study_instance_uid}",
        timeout=30,
    )
    assert answer.status_code == 404
    # Said apart from a mistyped path.
    assert f"no published study {kept.study_instance_uid}" in answer.text


def _wado_uri(node: RunningNode, instance: scan.InstanceHeader, **extra: str):
    params = {
        "requestType": "WADO",
        "studyUID": instance.study_instance_uid,
        "seriesUID": instance.series_instance_uid,
        "objectUID": instance.sop_instance_uid,
        **extra,
    }
    url = node.settings.dicomweb_url.rsplit("/", 1)[0] + "/wado"
    return requests.get(url, params=params, timeout=30)


def test_wado_uri_application_dicom_in_the_asked_syntax(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 9.1.2.1.6 and 9.1.2.1.7 (RAD TF-3 4.55): object in a syntax."""
    instance = published.instances[3]

    answer = _wado_uri(
        shared_node,
        instance,
        contentType="application/dicom",
        transferSyntax=RLELossless,
    )

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/dicom"
    sent = pydicom.dcmread(BytesIO(answer.content))
    assert sent.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(sent.pixel_array, pydicom.dcmread(instance.path).pixel_array)


def test_wado_uri_renders_a_jpeg_by_default(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 9.1.2.1.6: image/jpeg is the default for an image."""
    instance = published.instances[0]
    held = pydicom.dcmread(instance.path, stop_before_pixels=True)

    answer = _wado_uri(shared_node, instance)

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "image/jpeg"
    image = Image.open(BytesIO(answer.content))
    assert (image.format, image.size) == ("JPEG", (held.Columns, held.Rows))


@pytest.mark.parametrize(
    ("asked", "size"),
    [
        ({"rows": "64"}, lambda w, h: (round(w * 64 / h), 64)),
        ({"columns": "100", "rows": "50"}, lambda w, h: (50 * w // h, 50)),
        ({"region": "0,0,0.5,0.25"}, lambda w, h: (w // 2, h // 4)),
        (
            {"region": "0.5,0.5,1,1", "columns": "32"},
            lambda w, h: (32, round(32 * h / w)),
        ),
    ],
    ids=["rows", "both-are-maxima", "region", "region-then-columns"],
)
def test_wado_uri_region_rows_and_columns_shape_the_image(
    shared_node: RunningNode, published: scan.Study, asked: dict, size
) -> None:
    """DICOM PS3.18 WADO-URI Region, Rows and Columns: the region is cut out
    first, then scaled; Rows and Columns are maxima and the aspect ratio is
    kept."""
    instance = published.instances[0]
    held = pydicom.dcmread(instance.path, stop_before_pixels=True)

    answer = _wado_uri(shared_node, instance, **asked)

    assert answer.status_code == 200, answer.text
    image = Image.open(BytesIO(answer.content))
    assert image.size == size(held.Columns, held.Rows)


def test_wado_uri_window_and_quality_are_applied(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 WADO-URI Window Center/Width (the linear function of
    PS3.3 C.11.2.1.2.1) and Image Quality."""
    instance = published.instances[0]

    def pixels(**asked: str) -> np.ndarray:
        answer = _wado_uri(shared_node, instance, **asked)
        assert answer.status_code == 200, answer.text
        return np.asarray(Image.open(BytesIO(answer.content)).convert("L"))

    above_all = pixels(windowCenter="100000", windowWidth="10")
    below_all = pixels(windowCenter="-100000", windowWidth="10")
    assert above_all.max() < 8 and below_all.min() > 247
    default = pixels()
    narrow = pixels(windowCenter="40", windowWidth="80")
    assert not np.array_equal(default, narrow)

    small = _wado_uri(shared_node, instance, imageQuality="5").content
    large = _wado_uri(shared_node, instance, imageQuality="100").content
    assert len(small) < len(large)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"requestType": "WADOX"}, 400),
        ({"objectUID": "1.2.3.4"}, 404),
        ({"contentType": "application/pdf"}, 406),
        ({"contentType": "application/dicom", "transferSyntax": "1.2.3"}, 406),
        ({"contentType": "application/dicom", "transferSyntax": "bogus"}, 400),
        ({"contentType": "application/dicom", "transferSyntax": ""}, 400),
        ({"frameNumber": "2"}, 400),
        ({"frameNumber": "\u00b2"}, 400),
        ({"frameNumber": "9" * 5000}, 400),
        ({"contentType": "application/dicom", "anonymize": "yes"}, 400),
        ({"region": "0.5,0,0.2,1"}, 400),
        ({"region": "0,0,1"}, 400),
        ({"region": "0,0,1,nan"}, 400),
        ({"rows": "0"}, 400),
        ({"columns": "99999"}, 400),
        ({"windowCenter": "\uff14\uff10", "windowWidth": "10"}, 400),
        ({"region": "0,0,1,0.002", "rows": "4096"}, 400),
        ({"region": "0_0.1,0,1,1"}, 400),
        ({"windowCenter": "40"}, 400),
        ({"windowCenter": "40", "windowWidth": "0"}, 400),
        ({"windowCenter": "inf", "windowWidth": "10"}, 400),
        ({"imageQuality": "101"}, 400),
        ({"contentType": "application/dicom", "rows": "10"}, 400),
        ({"requestType": ["WADO", "WADOX"]}, 400),
        ({"objectUID": ["1.2.3.4", "1.2.3.5"]}, 400),
        ({"contentType": ["application/dicom", "image/jpeg"]}, 400),
    ],
    ids=[
        "request-type",
        "unknown-object",
        "content-type",
        "syntax",
        "syntax-no-uid",
        "syntax-empty",
        "frame",
        "frame-superscript",
        "frame-5000-digits",
        "anonymize",
        "region-reversed",
        "region-short",
        "region-nan",
        "rows-zero",
        "columns-huge",
        "window-fullwidth-digits",
        "thin-region-scaled-past-the-limit",
        "region-underscore",
        "window-alone",
        "window-width-zero",
        "window-infinite",
        "quality",
        "rows-on-dicom",
        "request-type-twice",
        "object-uid-twice",
        "content-type-twice",
    ],
)
def test_wado_uri_bad_requests_are_answered_with_their_status(
    shared_node: RunningNode, published: scan.Study, change: dict, status: int
) -> None:
    """DICOM PS3.18 9.1.2: a request that cannot be served gets an HTTP error,
    in plain text that says why (not the HTTP library's stock sentence); an
    object asked for de-identified is never sent whole."""
    answer = _wado_uri(shared_node, published.instances[0], **change)
    assert answer.status_code == status
    assert answer.headers["Content-Type"].startswith("text/plain")
    if status != 404:
        stock = default_exceptions[status].description
        assert answer.text.strip() and stock not in answer.text


@pytest.mark.parametrize(
    ("center", "width"), [("1e999", "10"), ("40", "1e999")], ids=["center", "width"]
)
def test_wado_uri_window_past_a_double_is_said_as_such(
    shared_node: RunningNode, published: scan.Study, center: str, width: str
) -> None:
    """A decimal string of more magnitude than a double holds is no window
    (DICOM PS3.18 9.1.2); the answer says so, not that the width is small."""
    answer = _wado_uri(
        shared_node, published.instances[0], windowCenter=center, windowWidth=width
    )
    assert answer.status_code == 400
    assert "must be finite numbers" in answer.text


@pytest.mark.parametrize(
    "path",
    ["/studies/1.2.3/pixels", "/studies/1.2.3/series/4.5/frames/1", "/nothing"],
)
def test_dicomweb_path_that_names_no_service_is_a_plain_404(
    shared_node: RunningNode, path: str
) -> None:
    """DICOM PS3.18 8.5: a DICOMweb user agent gets the HTTP status in plain
    text, never the SOAP Fault of the actor's RAD-69 endpoint."""
    answer = requests.get(f"{shared_node.settings.dicomweb_url}{path}", timeout=30)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"].startswith("text/plain")


def test_published_manifest_names_the_wado_rs_series_url(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.3 C.17.2.1: the KOS Retrieve URL answers WADO-RS."""
    source = shared_node.services.imaging_source
    with source.engine.connect() as conn:
        (blob,) = conn.execute(
            select(imaging_manifest.c.blob).where(
                imaging_manifest.c.study_instance_uid == published.study_instance_uid
            )
        ).one()
    ds = pydicom.dcmread(source.blobs.path(blob))
    (study_item,) = ds.CurrentRequestedProcedureEvidenceSequence
    url = study_item.ReferencedSeriesSequence[0].RetrieveURL

    answer = requests.get(
        url,
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=60,
    )

    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("multipart/related")
    assert url.startswith(f"{shared_node.settings.dicomweb_url}/studies/")


@pytest.mark.parametrize(
    ("filters", "count"),
    [
        ({"PatientID": "IDS-DEPT*"}, 1),
        ({"PatientID": "IDS-DEPT002-?"}, 1),
        ({"PatientID": "*"}, 1),
        ({"PatientID": "IDS-DEPT9*"}, 0),
        ({"PatientID": "ids-dept*"}, 0),
        ({"PatientID": "IDS-DEPT00[2]*"}, 0),
    ],
    ids=["star", "question-mark", "universal", "no-match", "case", "bracket-literal"],
)
def test_qido_wildcards_match_the_attributes_that_allow_them(
    client: DICOMwebClient, published: scan.Study, filters: dict, count: int
) -> None:
    """DICOM PS3.4 C.2.2.2.4: "*" and "?" match in LO and its like; nothing
    else in the value is special."""
    assert len(client.search_for_studies(search_filters=filters)) == count


@pytest.mark.parametrize(
    "params",
    [
        {"StudyDate": "garbage"},
        {"StudyDate": "2016040"},
        {"StudyDate": "20160402-2016"},
        {"StudyTime": "2561"},
        {"StudyInstanceUID": "not-a-uid"},
        {"includefield": "ZZZZZZZZ"},
        {"includefield": "StudyDescription,NoSuchKeyword"},
        {"includefield": ""},
        {"includefield": "StudyDescription,,StudyDate"},
        {"includefield": "."},
        {"fuzzymatching": "maybe"},
    ],
    ids=[
        "date",
        "short-date",
        "range",
        "time",
        "uid",
        "includefield",
        "includefield-list",
        "includefield-empty",
        "includefield-empty-in-list",
        "includefield-empty-steps",
        "fuzzymatching",
    ],
)
def test_qido_refuses_a_malformed_query_with_400(
    shared_node: RunningNode, published: scan.Study, params: dict
) -> None:
    """DICOM PS3.18 8.3.4 and 10.6.1: a value its VR does not allow, or an
    includefield naming no attribute, is a 400 saying which, in plain text."""
    (key, value), *_ = params.items()
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies", params=params, timeout=30
    )

    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert f"{key}=" in answer.text


@pytest.mark.parametrize(
    "params",
    [
        {"includefield": "all"},
        {"includefield": "StudyDescription,00080020"},
        {"StudyTime": "0000-2359"},
        {"fuzzymatching": "false"},
    ],
    ids=["all", "keyword-and-tag", "time-range", "fuzzymatching"],
)
def test_qido_takes_well_formed_query_parameters(
    shared_node: RunningNode, published: scan.Study, params: dict
) -> None:
    """DICOM PS3.18 8.3.4: well-formed values keep being answered."""
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies", params=params, timeout=30
    )

    assert answer.status_code == 200
    assert len(answer.json()) == 1


@pytest.mark.parametrize(
    "params",
    [{"offset": "\u00b2"}, {"limit": "\u0663"}, {"offset": "9" * 5000}],
    ids=["superscript", "arabic-indic", "5000-digits"],
)
def test_qido_paging_takes_ascii_digits_only(
    shared_node: RunningNode, published: scan.Study, params: dict
) -> None:
    """DICOM PS3.18 8.3.4: offset and limit are whole numbers; another
    script's digits, or more digits than any paging needs, are a 400, not an
    internal error."""
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies", params=params, timeout=30
    )
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/plain")


def _published_study(
    node: RunningNode, sources: list[Path], folder: Path, **values: object
) -> scan.Study:
    """Publish copies of ``sources`` as one series of a study of its own,
    with ``values``."""
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    folder.mkdir()
    for number, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f"copy-{number}.dcm", enforce_file_format=True)
    (study,) = scan.scan_directory(folder).studies
    node.services.imaging_source.publish(study, PATIENT)
    return study


def _published_copy(
    node: RunningNode, source: Path, folder: Path, **values: object
) -> scan.InstanceHeader:
    """Publish a copy of ``source`` as a study of its own, with ``values``."""
    (instance,) = _published_study(node, [source], folder, **values).instances
    return instance


@pytest.mark.parametrize(
    "window",
    [{"WindowCenter": 40, "WindowWidth": 0}, {"WindowCenter": 40, "WindowWidth": -5}],
    ids=["width-0", "width-negative"],
)
def test_wado_uri_renders_an_image_whose_own_window_is_unusable(
    shared_node: RunningNode,
    published: scan.Study,
    tmp_path: Path,
    window: dict[str, int],
) -> None:
    """DICOM PS3.3 C.11.2.1.2: a Window Width below 1 is no window; the
    image is rendered over its full range, not answered with an error."""
    instance = _published_copy(
        shared_node,
        dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
        tmp_path / "ct",
        **window,
    )

    answer = _wado_uri(shared_node, instance)

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize(
    "name",
    [
        "us-mf-jpeg-baseline__examples_ybr_color.dcm",
        "enhanced-ct-mf__eCT_Supplemental.dcm",
        "enhanced-mr-mf__emri_small.dcm",
    ],
)
def test_wado_uri_renders_the_frame_asked_for_of_a_multi_frame_image(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path, name: str
) -> None:
    """DICOM PS3.18 WADO-URI Frame Number: the frame named, read from the
    stored file alone, is the one rendered; each rendering is most like its
    own frame of the image."""
    source = dicom_path("singles", name)
    instance = _published_copy(shared_node, source, tmp_path / "mf")
    held = pydicom.dcmread(source).pixel_array.astype(np.float64)
    if held.ndim == 4:
        held = held.mean(axis=3)
    frames = len(held)
    # The first, a middle one and the last frame.
    asked = sorted({1, (frames + 1) // 2, frames})

    rendered = []
    for number in asked:
        answer = _wado_uri(shared_node, instance, frameNumber=str(number))
        assert answer.status_code == 200, answer.text
        rendered.append(
            np.asarray(Image.open(BytesIO(answer.content)).convert("L"), np.float64)
        )

    def likeness(image: np.ndarray, frame: np.ndarray) -> float:
        if frame.std() == 0 or image.std() == 0:
            return float(np.array_equal(image, frame))
        return float(np.corrcoef(image.ravel(), frame.ravel())[0, 1])

    for number, image in zip(asked, rendered, strict=True):
        assert image.shape == held[number - 1].shape
        best = max(range(frames), key=lambda n: likeness(image, held[n]))
        assert likeness(image, held[best]) == pytest.approx(
            likeness(image, held[number - 1])
        )
    out_of_range = _wado_uri(shared_node, instance, frameNumber=str(frames + 1))
    assert out_of_range.status_code == 400
    assert f"outside 1..{frames}" in out_of_range.text


def test_wado_uri_object_that_cannot_be_decoded_names_the_syntax_it_is_held_in(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 9.1.2.1.7: without transferSyntax an object goes as
    Explicit VR Little Endian; one that cannot be decoded (12-bit JPEG
    Extended) is answered 406, naming the transferSyntax it can be had in,
    not telling to leave out the parameter the request left out."""
    instance = _published_copy(
        shared_node,
        dicom_path("singles", "ts-jpeg-extended-12bit__MR1_JPLY.dcm"),
        tmp_path / "jply",
    )

    answer = _wado_uri(shared_node, instance, contentType="application/dicom")

    assert answer.status_code == 406
    assert "leave transferSyntax out" not in answer.text
    assert f"transferSyntax={instance.transfer_syntax_uid}" in answer.text
    held = _wado_uri(
        shared_node,
        instance,
        contentType="application/dicom",
        transferSyntax=instance.transfer_syntax_uid,
    )
    assert held.status_code == 200
    assert held.content == instance.path.read_bytes()


def test_wado_uri_image_that_cannot_be_rendered_says_how_to_have_it_as_held(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 9.1.2.1.6: an image goes as image/jpeg unless asked
    otherwise; one that cannot be decoded (12-bit JPEG Extended) is 406,
    pointing to the contentType and transferSyntax that send it as held,
    and following that gets the stored object."""
    instance = _published_copy(
        shared_node,
        dicom_path("singles", "ts-jpeg-extended-12bit__MR1_JPLY.dcm"),
        tmp_path / "jply",
    )

    answer = _wado_uri(shared_node, instance)

    assert answer.status_code == 406
    assert "cannot be decoded for rendering" in answer.text
    advice = (
        f"contentType=application/dicom&transferSyntax={instance.transfer_syntax_uid}"
    )
    assert advice in answer.text
    held = _wado_uri(
        shared_node,
        instance,
        contentType="application/dicom",
        transferSyntax=instance.transfer_syntax_uid,
    )
    assert held.status_code == 200
    assert held.content == instance.path.read_bytes()


def test_wado_uri_scales_down_an_image_larger_than_it_renders(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 9.1.2.1.6: a request that names no Rows or Columns asks
    for nothing wrong; an image over the rendering limit comes scaled down,
    its aspect ratio kept."""
    source = dicom_path("singles", "mg-wg04-sc-jpeg2000-lossy__MG1_J2KI.dcm")
    held = pydicom.dcmread(source, stop_before_pixels=True)
    instance = _published_copy(shared_node, source, tmp_path / "mg")

    answer = _wado_uri(shared_node, instance)

    assert answer.status_code == 200
    width, height = Image.open(BytesIO(answer.content)).size
    assert max(width, height) == 4096
    assert abs(width / height - held.Columns / held.Rows) < 0.01


def test_wado_rs_takes_the_first_alternative_it_can_produce(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """RFC 9110 12.5.1, DICOM PS3.18 8.7.3: of two acceptable media types,
    a syntax no instance can be produced in (JPEG Baseline, no encoder
    here) gives way to the next one listed, not to 406."""
    instance = published.instances[0]
    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies/{instance.study_instance_uid}"
        f"/series/{instance.series_instance_uid}/instances/"
        f"{instance.sop_instance_uid}",
        headers={
            "Accept": "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50, "
            "application/dicom"
        },
        timeout=30,
    )

    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == (
        f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    )
    sent = pydicom.dcmread(BytesIO(answer.content))
    assert sent.SOPInstanceUID == instance.sop_instance_uid


def _series_url(node: RunningNode, study: scan.Study) -> str:
    return (
        f"{node.settings.dicomweb_url}/studies/{study.study_instance_uid}"
        f"/series/{study.series[0].series_instance_uid}"
    )


def test_wado_rs_series_sent_in_part_is_206_with_a_warning(
    shared_node: RunningNode,
    client: DICOMwebClient,
    published: scan.Study,
    tmp_path: Path,
) -> None:
    """DICOM PS3.18 Table 10.4.3-1: a payload holding some, not all, of the
    Target Resources is 206 (Partial Content). Of a series asked for in
    JPEG Baseline, the image held so is sent; the one that no encoder here
    can turn into it is left out, and a Warning says how many were."""
    study = _published_study(
        shared_node,
        [
            shared_path(
                "dicom", "singles", "ts-jpeg-baseline-rgb__SC_rgb_jpeg_dcmtk.dcm"
            ),
            dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
        ],
        tmp_path / "mixed",
    )
    (jpeg,) = [i for i in study.instances if i.transfer_syntax_uid == JPEGBaseline8Bit]

    answer = requests.get(
        _series_url(shared_node, study),
        headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax={JPEGBaseline8Bit}"},
        timeout=30,
    )
    sent = client.retrieve_series(
        study.study_instance_uid,
        study.series[0].series_instance_uid,
        media_types=(("application/dicom", JPEGBaseline8Bit),),
    )

    assert answer.status_code == 206
    assert answer.headers["Content-Type"].startswith("multipart/related")
    assert answer.headers["Warning"] == (
        f"299 {shared_node.settings.dicomweb_url}: 1 of 2 instances are left "
        "out: 1 cannot be sent in a transfer syntax the request accepts"
    )
    assert [s.SOPInstanceUID for s in sent] == [jpeg.sop_instance_uid]
    assert sent[0].file_meta.TransferSyntaxUID == JPEGBaseline8Bit


def test_wado_rs_series_none_of_which_can_be_produced_is_406(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 Table 10.4.3-1: 406 (Not Acceptable) when no instance
    can be sent in an Acceptable Media Type; the plain-text payload says
    why (10.4.3.3)."""
    study = _published_study(
        shared_node,
        [dicom_path("singles", "ts-explicit-le__CT_small.dcm")],
        tmp_path / "native",
    )

    answer = requests.get(
        _series_url(shared_node, study),
        headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax={JPEGBaseline8Bit}"},
        timeout=30,
    )

    assert answer.status_code == 406
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "in a transfer syntax the request accepts" in answer.text
    # What would be sent: the syntax held, with transfer-syntax=*.
    assert "held in 1.2.840.10008.1.2.1, which transfer-syntax=*" in answer.text


def _bulk_data_uris(document: dict) -> list[str]:
    """Every BulkDataURI of a DICOM JSON document, in sequence items too."""
    uris = []
    for attribute in document.values():
        if "BulkDataURI" in attribute:
            uris.append(attribute["BulkDataURI"])
        if attribute["vr"] == "SQ":
            for item in attribute.get("Value", []):
                uris += _bulk_data_uris(item)
    return uris


def test_wado_rs_metadata_sends_bulk_data_in_a_sequence_inline(
    shared_node: RunningNode,
    client: DICOMwebClient,
    published: scan.Study,
    tmp_path: Path,
) -> None:
    """DICOM PS3.18 10.4.3.3.2 and F.2.7: a metadata answer holds every
    attribute of the instance; Waveform Data, in the items of the Waveform
    Sequence, comes as InlineBinary, never as an empty BulkDataURI, which a
    user agent resolves to the series itself."""
    source = dicom_path("singles", "ecg-waveform__waveform_ecg.dcm")
    instance = _published_copy(shared_node, source, tmp_path / "ecg")

    document = client.retrieve_instance_metadata(
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
    )

    assert _bulk_data_uris(document) == []
    sent = pydicom.Dataset.from_json(document)
    held = pydicom.dcmread(source)
    assert [w.WaveformData for w in sent.WaveformSequence] == [
        w.WaveformData for w in held.WaveformSequence
    ]
    assert "InlineBinary" in document["54000100"]["Value"][0]["54001010"]


def _dicom_parts(answer: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related answer's parts (RFC 2387)."""
    _, params = parse_options_header(answer.headers["Content-Type"])
    parts: list[bytes] = []
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": lambda: parts.append(b""),
            "on_part_data": lambda data, start, end: parts.append(
                parts.pop() + data[start:end]
            ),
        },
    )
    parser.write(answer.content)
    parser.finalize()
    return parts


def _published_pair(node: RunningNode, folder: Path) -> scan.Study:
    """A CT and an MR image published as one series of a study of their own."""
    return _published_study(
        node,
        [
            dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
            dicom_path("singles", "ts-implicit-le__MR_small_implicit.dcm"),
        ],
        folder,
    )


def _lose_stored_copy(node: RunningNode, instance: scan.InstanceHeader) -> None:
    """Remove the stored copy of a published instance, as a failing disk or
    a careless operator would."""
    with node.services.engine.connect() as conn:
        blob = conn.execute(
            select(imaging_instance.c.blob).where(
                imaging_instance.c.sop_instance_uid == instance.sop_instance_uid
            )
        ).scalar_one()
    node.services.imaging_source.blobs.path(blob).unlink()


def test_wado_rs_leaves_out_an_instance_whose_stored_copy_is_gone(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 Table 10.4.3-1: a series of which one stored copy is
    gone is sent in part, 206 with a Warning saying why, as a whole
    multipart body; the instance alone is a 500 that says so, never a
    stream broken off after its status."""
    study = _published_pair(shared_node, tmp_path / "pair")
    lost, kept = study.instances
    _lose_stored_copy(shared_node, lost)

    series = requests.get(
        _series_url(shared_node, study),
        headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"},
        timeout=30,
    )
    alone = requests.get(
        f"{_series_url(shared_node, study)}/instances/{lost.sop_instance_uid}",
        headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"},
        timeout=30,
    )
    metadata = requests.get(f"{_series_url(shared_node, study)}/metadata", timeout=30)

    assert series.status_code == 206
    assert series.headers["Warning"] == (
        f"299 {shared_node.settings.dicomweb_url}: 1 of 2 instances are left "
        "out: the stored copies of 1 cannot be read here"
    )
    (part,) = _dicom_parts(series)
    assert pydicom.dcmread(BytesIO(part)).SOPInstanceUID == kept.sop_instance_uid
    assert part == kept.path.read_bytes()
    assert alone.status_code == 500
    assert alone.headers["Content-Type"].startswith("text/plain")
    assert "cannot be read" in alone.text
    assert metadata.status_code == 200
    assert [pydicom.Dataset.from_json(d).SOPInstanceUID for d in metadata.json()] == [
        kept.sop_instance_uid
    ]


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/dicom"])
def test_wado_uri_object_whose_stored_copy_is_gone_is_a_500_that_says_so(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path, content_type: str
) -> None:
    """DICOM PS3.18 9.1 and 8.7.1: an object held whose stored copy cannot
    be read is the origin server's failure, answered in plain text."""
    instance = _published_copy(
        shared_node,
        dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
        tmp_path / "one",
    )
    _lose_stored_copy(shared_node, instance)

    answer = _wado_uri(shared_node, instance, contentType=content_type)

    assert answer.status_code == 500
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "stored copy of the object cannot be read" in answer.text


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("text/html", 406),
        ("application/dicom+xml", 406),
        ("application/dicom+json", 200),
        ("application/json", 200),
        ("*/*", 200),
        ("text/html, application/*;q=0.5", 200),
    ],
)
def test_wado_rs_metadata_and_qido_answer_only_what_accept_takes(
    shared_node: RunningNode, published: scan.Study, accept: str, status: int
) -> None:
    """DICOM PS3.18 8.7.3: metadata and search results are sent as DICOM
    JSON, or as multipart/related of DICOM XML (application/dicom+xml alone
    names no multipart answer); an Accept header that takes none of them is
    answered 406 with why."""
    base = shared_node.settings.dicomweb_url
    for url in (
        f"{base}/studies/{published.study_instance_uid}/metadata",
        f"{base}/studies?StudyInstanceUID={published.study_instance_uid}",
    ):
        answer = requests.get(url, headers={"Accept": accept}, timeout=30)

        assert answer.status_code == status, url
        if status == 406:
            assert "application/dicom+json" in answer.text


def test_wado_rs_metadata_leaves_out_a_copy_cut_short_after_its_header_was_read(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """A stored copy cut short is left out of metadata as WADO-RS leaves it
    out of the instances, though its header was read (and kept) before."""
    study = _published_pair(shared_node, tmp_path / "pair")
    cut, kept = study.instances
    url = f"{_series_url(shared_node, study)}/metadata"
    assert len(requests.get(url, timeout=30).json()) == 2
    with shared_node.services.engine.connect() as conn:
        blob = conn.execute(
            select(imaging_instance.c.blob).where(
                imaging_instance.c.sop_instance_uid == cut.sop_instance_uid
            )
        ).scalar_one()
    stored = shared_node.services.imaging_source.blobs.path(blob)
    stored.write_bytes(stored.read_bytes()[:1000])

    again = requests.get(url, timeout=30)

    assert again.status_code == 200
    assert [pydicom.Dataset.from_json(d).SOPInstanceUID for d in again.json()] == [
        kept.sop_instance_uid
    ]


@pytest.mark.parametrize(
    ("parameter", "said"),
    [
        ("fuzzymatching", "Only literal matching has been performed."),
        ("emptyvaluematching", "Empty Value Matching has not been performed."),
        ("multiplevaluematching", "Multiple Value Matching has not been performed."),
    ],
)
def test_qido_says_which_matching_it_did_not_perform(
    shared_node: RunningNode, published: scan.Study, parameter: str, said: str
) -> None:
    """DICOM PS3.18 8.3.4.4 to 8.3.4.6: asked for a kind of matching it does
    not perform, the origin server searches without it and says so in a
    Warning; "false" asks for nothing and gets no Warning."""
    url = f"{shared_node.settings.dicomweb_url}/studies"

    asked = requests.get(url, params={parameter: "true"}, timeout=30)
    not_asked = requests.get(url, params={parameter: "false"}, timeout=30)

    assert asked.status_code == not_asked.status_code == 200
    assert asked.json() == not_asked.json() != []
    assert asked.headers["Warning"] == (
        f"299 {shared_node.settings.dicomweb_url}: The {parameter} parameter is "
        f"not supported. {said}"
    )
    assert "Warning" not in not_asked.headers


def _new_records(node: RunningNode, before: int, transaction: str) -> list:
    records = list(node.services.audit_spool.records())[before:]
    return [r for r in records if r.event_type == transaction]


@pytest.mark.parametrize(
    ("transaction", "path"),
    [
        ("RAD-107", "/series/{series}"),
        ("RAD-107", "/series/{series}/metadata"),
        ("RAD-107", "/thumbnail"),
        ("RAD-55", None),
    ],
    ids=["wado-rs", "wado-rs-metadata", "wado-rs-thumbnail", "wado-uri"],
)
def test_dicomweb_retrievals_are_audited_before_anything_is_sent(
    shared_node: RunningNode,
    published: scan.Study,
    tmp_path: Path,
    transaction: str,
    path: str | None,
) -> None:
    """RAD TF-3 4.107.5 and 4.55.5: a WADO-RS or WADO-URI retrieval is a
    DICOM Instances Transferred event (DICOM PS3.15 A.5.3.7) naming the
    patient and the study, valid against the DICOM audit schema; when its
    record cannot be spooled nothing is sent (500)."""
    study = _published_pair(shared_node, tmp_path / "pair")
    instance = study.instances[0]
    spool = shared_node.services.audit_spool

    def retrieve() -> requests.Response:
        if path is None:
            return _wado_uri(shared_node, instance, contentType="application/dicom")
        return requests.get(
            f"{shared_node.settings.dicomweb_url}/studies/{study.study_instance_uid}"
            + path.format(series=instance.series_instance_uid),
            timeout=30,
        )

    before = len(list(spool.records()))
    answer = retrieve()

    assert answer.status_code == 200
    (record,) = _new_records(shared_node, before, transaction)
    assert record.valid
    assert record.event_id is not None and record.event_id.code == "110104"
    assert record.outcome == 0
    assert record.patient_ids == (PATIENT,)
    assert study.study_instance_uid in record.object_ids
    # The Source is the service the instances went out of.
    dicomweb = shared_node.settings.dicomweb_url
    service = dicomweb.rsplit("/", 1)[0] + "/wado" if path is None else dicomweb
    assert record.actor_user_ids[0] == service

    def full_disk(messages: list[bytes]) -> list[Path]:
        raise OSError(28, "No space left on device")

    original = spool.write_all
    spool.write_all = full_disk  # type: ignore[method-assign]
    try:
        refused = retrieve()
    finally:
        spool.write_all = original  # type: ignore[method-assign]

    assert refused.status_code == 500
    assert "audit record" in refused.text
    assert instance.path.read_bytes()[128:132] not in refused.content


def test_a_qido_search_is_audited_as_a_dicom_query(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """RAD TF-3 4.129.5, DICOM PS3.15 A.5.3.10: a QIDO-RS search writes a
    DICOM Query event, valid against the DICOM audit schema, naming the
    Study Root model searched and carrying the query string; when it
    cannot be spooled no answer is sent (500)."""
    spool = shared_node.services.audit_spool
    url = f"{shared_node.settings.dicomweb_url}/studies"
    query = {"ModalitiesInStudy": "MR", "limit": "5"}
    before = len(list(spool.records()))

    answer = requests.get(url, params=query, timeout=30)

    assert answer.status_code == 200
    (record,) = _new_records(shared_node, before, "RAD-129")
    assert record.valid
    assert record.event_id is not None and record.event_id.code == "110112"
    assert record.event_action == "E"
    assert "1.2.840.10008.5.1.4.1.2.2.1" in record.object_ids
    root = etree.fromstring(record.xml)
    (sent,) = root.iter("ParticipantObjectQuery")
    assert base64.b64decode(sent.text) == b"ModalitiesInStudy=MR&limit=5"

    def full_disk(messages: list[bytes]) -> list[Path]:
        raise OSError(28, "No space left on device")

    original = spool.write_all
    spool.write_all = full_disk  # type: ignore[method-assign]
    try:
        refused = requests.get(url, params=query, timeout=30)
    finally:
        spool.write_all = original  # type: ignore[method-assign]

    assert refused.status_code == 500
    assert "audit record" in refused.text


@pytest.mark.parametrize(
    "path",
    [
        "/studies/{study}%00",
        "/studies/{study}%00/metadata",
        "/studies/{study}/series/{series}%00/instances",
        "/studies/1.2%203/series",
        "/studies?PatientName=%00",
        "/studies?PatientName=a%00*",
        "/series?Modality=M%00R",
        "/instances?SOPClassUID=1.2.840.10008.5.1.4.1.1.4%0B",
    ],
    ids=[
        "study-nul",
        "metadata-nul",
        "series-nul",
        "study-space",
        "name-nul",
        "name-wildcard-nul",
        "modality-nul",
        "uid-list-vt",
    ],
)
def test_a_control_character_in_a_uid_or_matching_value_is_a_400(
    shared_node: RunningNode, published: scan.Study, path: str
) -> None:
    """DICOM PS3.5 9.1 and 6.1.3: a UID of other characters than digits and
    periods, or a value holding a control character no VR allows (NUL among
    them, which PostgreSQL cannot take in a text value), is a bad request
    that says which, not an internal error; the node answers the next."""
    url = shared_node.settings.dicomweb_url + path.format(
        study=published.study_instance_uid,
        series=published.series[0].series_instance_uid,
    )

    answer = requests.get(url, timeout=30)

    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "\x00" not in answer.text
    assert requests.get(url.split("%")[0], timeout=30).status_code < 500


def test_wado_uri_with_a_uid_that_is_no_uid_is_a_400(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 9.1.2.1.2 to 9.1.2.1.4, DICOM PS3.5 9.1: studyUID,
    seriesUID and objectUID are UIDs; one holding a NUL is a 400 saying so,
    not an internal error."""
    answer = _wado_uri(shared_node, published.instances[0], studyUID="1.2\x003")

    assert answer.status_code == 400
    assert "studyUID" in answer.text and "\x00" not in answer.text


@pytest.mark.parametrize(
    "params",
    [
        {"limit": ["1", "2"]},
        {"offset": ["0", "1"]},
        {"fuzzymatching": ["true", "false"]},
    ],
    ids=["limit", "offset", "fuzzymatching"],
)
def test_qido_refuses_a_paging_or_matching_parameter_given_twice_otherwise(
    shared_node: RunningNode, published: scan.Study, params: dict
) -> None:
    """DICOM PS3.18 8.3.4: limit, offset and the matching flags take one
    value; given twice with different values the request is a 400 naming
    the parameter, not answered after the first; repeated alike, it is
    answered."""
    (key,) = params
    url = f"{shared_node.settings.dicomweb_url}/studies"

    answer = requests.get(url, params=params, timeout=30)
    alike = requests.get(url, params={key: [params[key][0]] * 2}, timeout=30)

    assert answer.status_code == 400
    assert answer.text.startswith(f"{key} is given 2 times")
    assert alike.status_code == 200

"""WADO-RS Retrieve of the thumbnail resources (DICOM PS3.18 10.4.1.1.4) of
published studies, series, instances and frames, against the node on real
ports: the image chosen, the media type negotiated, the viewport and the
errors."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.integration.test_dicomweb_wado_qido import (  # noqa: F401 (fixture)
    _published_study,
    published,
)
from xdsi.actors import dicomweb
from xdsi.dicom import scan

MR_MULTI_FRAME = "enhanced-mr-mf__emri_small.dcm"  # 64 x 64, 10 frames
US_MULTI_FRAME = "us-mf-jpeg-baseline__examples_ybr_color.dcm"  # 320 x 240, 30
DX = "dx__dx_image.dcm"  # 211 x 169
SR = "sr-basic-text__reportsi.dcm"
KOS = "kos-manifest-1ref__ids-1001-kos.dcm"
# The format Pillow names each media type a thumbnail is sent in.
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}


@pytest.fixture(scope="module")
def mr_study(published: scan.Study) -> scan.Study:  # noqa: F811 (fixture)
    """The MR study of two series published, the patient fed; the CT study
    of study-ct-ihe kept but not published."""
    return published


def _url(node: RunningNode, study_uid: str, tail: str = "") -> str:
    return f"{node.settings.dicomweb_url}/studies/{study_uid}{tail}"


def _instance_tail(instance: scan.InstanceHeader) -> str:
    return (
        f"/series/{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
    )


def _get(url: str, accept: str | None = None, /, **params: str) -> requests.Response:
    """GET ``url`` with ``accept`` as Accept header; None sends none (not
    the ``*/*`` requests sends unless told)."""
    return requests.get(url, params=params, headers={"Accept": accept}, timeout=30)


def _image(answer: requests.Response) -> Image.Image:
    assert answer.status_code == 200, answer.text
    image = Image.open(BytesIO(answer.content))
    assert FORMATS[answer.headers["Content-Type"]] == image.format
    return image


def _middle_of_first_series(study: scan.Study) -> scan.InstanceHeader:
    """The image a study's thumbnail shows: the middle one, by Instance
    Number, of its first series."""
    numbered = [
        (pydicom.dcmread(i.path, stop_before_pixels=True), i) for i in study.instances
    ]
    first = min(int(ds.SeriesNumber) for ds, _ in numbered)
    series = sorted(
        (int(ds.InstanceNumber), i) for ds, i in numbered if ds.SeriesNumber == first
    )
    return series[(len(series) - 1) // 2][1]


@pytest.mark.parametrize("level", ["study", "series", "instance", "frame"])
def test_each_level_shows_the_middle_image_of_the_first_series_in_128_pixels(
    shared_node: RunningNode, mr_study: scan.Study, level: str
) -> None:
    """DICOM PS3.18 10.4.1.1.4: a Study, Series, Instance and Frame
    Thumbnail; the study's and series' one is the middle image by Instance
    Number of the first series (by Series Number), rendered as that image's
    rendered resource is, fit to 128 x 128 when no viewport is asked for."""
    chosen = _middle_of_first_series(mr_study)
    tail = {
        "study": "",
        "series": f"/series/{chosen.series_instance_uid}",
        "instance": _instance_tail(chosen),
        "frame": _instance_tail(chosen) + "/frames/1",
    }[level]

    answer = _get(_url(shared_node, mr_study.study_instance_uid, f"{tail}/thumbnail"))
    rendered = _get(
        _url(shared_node, mr_study.study_instance_uid, _instance_tail(chosen))
        + "/rendered",
        viewport="128,128",
    )

    assert answer.headers["Content-Type"] == "image/jpeg"
    assert _image(answer).size == (128, 128)  # the MR images are 256 x 256
    assert answer.content == rendered.content


@pytest.mark.parametrize(
    ("accept", "parameter", "media_type"),
    [
        (None, None, "image/jpeg"),
        ("image/jpeg", None, "image/jpeg"),
        ("image/png", None, "image/png"),
        ("image/gif", None, "image/gif"),
        ("image/*", None, "image/jpeg"),
        ("*/*", None, "image/jpeg"),
        ("image/jpeg; q=0.5, image/png", None, "image/png"),
        ("image/*; q=0.5, image/gif", None, "image/gif"),
        ("image/jpeg; q=0, image/*", None, "image/png"),
        ("text/html, image/webp, image/*; q=0.8, */*; q=0.5", None, "image/jpeg"),
        ('multipart/related; type="image/jpeg"', "image/png", "image/png"),
        ("image/png", "image/gif", "image/gif"),
        ("image/png", "text/html", "image/png"),
    ],
    ids=[
        "no-accept",
        "jpeg",
        "png",
        "gif",
        "image-wildcard",
        "any",
        "q-values",
        "specific-over-wildcard",
        "q-zero-excludes",
        "browser",
        "parameter-first",
        "parameter-over-header",
        "parameter-unsupported",
    ],
)
def test_the_media_type_is_the_acceptable_one_of_highest_q_value(
    shared_node: RunningNode,
    mr_study: scan.Study,
    accept: str | None,
    parameter: str | None,
    media_type: str,
) -> None:
    """DICOM PS3.18 8.7.8.1 and Table 8.7.4-1: image/jpeg (the default),
    image/png or image/gif, the accept query parameter before the Accept
    header, the most specific media range giving each its q value."""
    params = {} if parameter is None else {"accept": parameter}

    answer = _get(
        _url(shared_node, mr_study.study_instance_uid, "/thumbnail"), accept, **params
    )

    assert answer.headers["Content-Type"] == media_type
    assert _image(answer).size == (128, 128)


@pytest.mark.parametrize(
    "accept",
    [
        "application/dicom",
        'multipart/related; type="image/jpeg"',
        "image/webp",
        "text/html",
        "image/jpeg; q=0",
    ],
)
def test_an_accept_header_that_takes_no_image_type_sent_is_406(
    shared_node: RunningNode, mr_study: scan.Study, accept: str
) -> None:
    """DICOM PS3.18 8.7.8.1 step 5 and Table 10.4.3-1: no Acceptable Media
    Type this node sends a thumbnail in."""
    answer = _get(_url(shared_node, mr_study.study_instance_uid, "/thumbnail"), accept)

    assert answer.status_code == 406
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "image/jpeg, image/png, image/gif" in answer.text


@pytest.mark.parametrize(
    "parameter",
    ["image/jpeg; q=0, image/png; q=0, image/gif; q=0", "image/*; q=0", "text/html"],
    ids=["each-q-zero", "wildcard-q-zero", "text"],
)
@pytest.mark.parametrize("resource", ["/thumbnail", "/rendered"])
def test_an_accept_parameter_alone_that_takes_no_image_type_is_406(
    shared_node: RunningNode, mr_study: scan.Study, parameter: str, resource: str
) -> None:
    """DICOM PS3.18 8.3.3.1 and 8.7.8.1 step 5: the accept query parameter,
    with no Accept header, names the Acceptable Media Types; one that takes
    none of those this node sends is a 406, not the default image/jpeg."""
    answer = _get(
        _url(shared_node, mr_study.study_instance_uid, resource),
        None,
        accept=parameter,
    )

    assert answer.status_code == 406
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "image/jpeg, image/png, image/gif" in answer.text


@pytest.mark.parametrize(
    ("viewport", "size"),
    [
        (None, (128, round(169 * 128 / 211))),
        ("64,64", (64, round(169 * 64 / 211))),
        ("300,100", (round(211 * 100 / 169), 100)),
        ("422,400", (422, 338)),
    ],
    ids=["default", "square", "wide", "larger-than-held"],
)
def test_the_thumbnail_fits_the_viewport_its_aspect_kept(
    shared_node: RunningNode,
    mr_study: scan.Study,
    tmp_path: Path,
    viewport: str | None,
    size: tuple[int, int],
) -> None:
    """DICOM PS3.18 8.3.5.1.3: scaled until its width or height is that of
    the viewport, whichever avoids truncation; a 211 x 169 image."""
    study = _published_study(shared_node, [dicom_path("singles", DX)], tmp_path / "dx")
    params = {} if viewport is None else {"viewport": viewport}

    for accept in FORMATS:
        answer = _get(
            _url(shared_node, study.study_instance_uid, "/thumbnail"), accept, **params
        )

        assert _image(answer).size == size


@pytest.mark.parametrize(
    "params",
    [
        {"quality": "50"},
        {"window": "40,400,linear"},
        {"annotation": "patient"},
        {"charset": "UTF-8"},
        {"no_such_parameter": "1"},
    ],
    ids=["quality", "window", "annotation", "charset", "unknown"],
)
def test_a_parameter_thumbnails_do_not_take_is_ignored(
    shared_node: RunningNode, mr_study: scan.Study, params: dict[str, str]
) -> None:
    """DICOM PS3.18 Table 10.4.1-5 gives a thumbnail accept and viewport
    alone; 8.3: an unsupported parameter is ignored, so that the thumbnail
    is the one asked for without it."""
    url = _url(shared_node, mr_study.study_instance_uid, "/thumbnail")

    answer = _get(url, **params)

    assert answer.status_code == 200, answer.text
    assert answer.content == _get(url).content


@pytest.mark.parametrize(
    "query",
    [
        "viewport=64",
        "viewport=64,64,0,0,10,10",
        "viewport=64,64,,,10,10",
        "viewport=0,64",
        "viewport=64,-1",
        "viewport=a,b",
        "viewport=64,",
        "viewport=4097,64",
        "viewport=64,64&viewport=32,32",
        "accept=image/png&accept=image/gif",
    ],
)
def test_a_viewport_other_than_two_sides_is_a_400(
    shared_node: RunningNode, mr_study: scan.Study, query: str
) -> None:
    """DICOM PS3.18 8.3.5.1.3: a thumbnail's viewport is vw,vh, positive
    integers; anything else, or a parameter given twice otherwise, is a
    400."""
    answer = requests.get(
        _url(shared_node, mr_study.study_instance_uid, "/thumbnail") + "?" + query,
        timeout=30,
    )

    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")


def _publish_series(
    node: RunningNode, folder: Path, series: list[tuple[int, list[Path]]]
) -> scan.Study:
    """Publish copies of the files of each (Series Number, files) as one
    series of a study of their own, numbered from 1 in the order given."""
    study_uid = pydicom.uid.generate_uid()
    folder.mkdir()
    for number, sources in series:
        series_uid = pydicom.uid.generate_uid()
        for position, source in enumerate(sources, start=1):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber, ds.InstanceNumber = number, position
            ds.save_as(folder / f"{number}-{position}.dcm", enforce_file_format=True)
    (study,) = scan.scan_directory(folder).studies
    node.services.imaging_source.publish(study, PATIENT)
    return study


def test_a_study_shows_its_first_series_that_holds_an_image(
    shared_node: RunningNode, mr_study: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 10.4.3.3.4: the origin server chooses a meaningful
    representation; a report in the study's first series is passed over for
    the images of the next one."""
    study = _publish_series(
        shared_node,
        tmp_path / "mixed",
        [(1, [dicom_path("singles", SR)]), (2, [dicom_path("singles", DX)])],
    )

    answer = _get(_url(shared_node, study.study_instance_uid, "/thumbnail"))

    assert _image(answer).size == (128, round(169 * 128 / 211))


def test_a_study_thumbnail_reads_the_file_of_the_image_shown_alone(
    shared_node: RunningNode,
    mr_study: scan.Study,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DICOM PS3.18 10.4.1.1.4: the image a study stands for is chosen from
    the attributes the node keeps of each instance, so that a thumbnail
    reads one stored file, whatever the size of the study."""
    ct = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    study = _publish_series(
        shared_node, tmp_path / "many", [(2, [ct] * 6), (1, [ct] * 5)]
    )
    read: list[Path] = []
    header = dicomweb._header

    def recorded(path: Path) -> pydicom.Dataset:
        read.append(path)
        return header(path)

    monkeypatch.setattr(dicomweb, "_header", recorded)

    answer = _get(_url(shared_node, study.study_instance_uid, "/thumbnail"))

    assert _image(answer).size == (128, 128)
    (shown,) = set(read)
    assert pydicom.dcmread(shown).InstanceNumber == 3
    assert pydicom.dcmread(shown).SeriesNumber == 1


@pytest.mark.parametrize("name", [SR, KOS])
def test_an_object_that_is_no_image_has_no_thumbnail_406(
    shared_node: RunningNode, mr_study: scan.Study, tmp_path: Path, name: str
) -> None:
    """DICOM PS3.18 8.7.8.1 step 5 and Table 10.4.3-1: a report or key
    object selection has no Rendered Media Type among the image types a
    thumbnail is sent in (406), at each level; it has no frames (404)."""
    study = _publish_series(
        shared_node, tmp_path / "objects", [(1, [dicom_path("singles", name)])]
    )
    (instance,) = study.instances
    url = _url(shared_node, study.study_instance_uid)

    for tail in (
        "",
        f"/series/{instance.series_instance_uid}",
        _instance_tail(instance),
    ):
        answer = _get(f"{url}{tail}/thumbnail", "image/jpeg")

        assert answer.status_code == 406, (tail, answer.text)
        assert "no image" in answer.text
    frame = _get(f"{url}{_instance_tail(instance)}/frames/1/thumbnail", "image/jpeg")
    assert frame.status_code == 404


def _likeness(image: Image.Image, frame: np.ndarray) -> float:
    shown = np.asarray(image.convert("L").resize(frame.shape[::-1]), np.float64)
    return float(np.corrcoef(shown.ravel(), frame.astype(np.float64).ravel())[0, 1])


def test_a_frame_thumbnail_shows_that_frame_of_a_multi_frame_image(
    shared_node: RunningNode, mr_study: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 10.4.1.1.4 Frame Thumbnail: each frame's thumbnail is
    most like that frame; an instance's is its middle frame, a list's the
    middle one listed."""
    source = dicom_path("singles", MR_MULTI_FRAME)
    held = pydicom.dcmread(source).pixel_array
    study = _published_study(shared_node, [source], tmp_path / "mf")
    url = _url(
        shared_node, study.study_instance_uid, _instance_tail(study.instances[0])
    )

    shown = {n: _get(f"{url}/frames/{n}/thumbnail", "image/png") for n in range(1, 11)}

    for number, answer in shown.items():
        image = _image(answer)
        assert image.size == (128, 128)  # 64 x 64 frames, scaled up
        likeness = [_likeness(image, frame) for frame in held]
        assert likeness.index(max(likeness)) == number - 1
    assert _get(f"{url}/thumbnail", "image/png").content == shown[5].content
    assert _get(f"{url}/frames/2,4,9/thumbnail", "image/png").content == (
        shown[4].content
    )


def test_the_thumbnail_of_a_colour_cine_is_its_middle_frame(
    shared_node: RunningNode, mr_study: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 10.4.3.3.4: a single image, here the 15th of 30 frames
    of a JPEG Baseline ultrasound cine, 320 x 240 fit to 128 x 96."""
    study = _published_study(
        shared_node, [dicom_path("singles", US_MULTI_FRAME)], tmp_path / "us"
    )
    url = _url(shared_node, study.study_instance_uid, "/thumbnail")

    answer = _get(url, "image/gif", viewport="128,128")
    middle = _get(
        _url(
            shared_node,
            study.study_instance_uid,
            _instance_tail(study.instances[0]) + "/frames/15/thumbnail",
        ),
        "image/gif",
    )

    image = _image(answer)
    assert image.size == (128, 96)
    assert getattr(image, "n_frames", 1) == 1
    assert answer.content == middle.content


@pytest.mark.parametrize(
    ("tail", "status"),
    [
        ("{unpublished}/thumbnail", 404),
        ("1.2.3/thumbnail", 404),
        ("{study}/series/1.2.3/thumbnail", 404),
        ("{study}/series/{series}/instances/1.2.3/thumbnail", 404),
        ("{study}/series/{series}/instances/{instance}/frames/2/thumbnail", 404),
        ("{study}/series/{series}/instances/{instance}/frames/0/thumbnail", 400),
        ("{study}/series/{series}/instances/{instance}/frames/1,1/thumbnail", 400),
        ("1.2.x/thumbnail", 400),
    ],
    ids=[
        "unpublished-study",
        "unknown-study",
        "unknown-series",
        "unknown-instance",
        "frame-not-held",
        "frame-zero",
        "frame-twice",
        "no-uid",
    ],
)
def test_a_thumbnail_of_nothing_published_is_404_of_a_malformed_path_400(
    shared_node: RunningNode, mr_study: scan.Study, tail: str, status: int
) -> None:
    """DICOM PS3.18 Table 10.4.3-1 and RAD TF-3 4.107: only the studies
    published are served; frame numbers start at 1, each listed once."""
    (unpublished,) = scan.scan_directory(dicom_path("study-ct-ihe", "images")).studies
    instance = mr_study.instances[0]
    path = tail.format(
        unpublished=unpublished.study_instance_uid,
        study=mr_study.study_instance_uid,
        series=instance.series_instance_uid,
        instance=instance.sop_instance_uid,
    )

    answer = _get(f"{shared_node.settings.dicomweb_url}/studies/{path}", "image/*")

    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")

"""WADO-RS Retrieve Frames and Retrieve Rendered (DICOM PS3.18 10.4.1.1.3,
10.4.1.1.4; RAD TF-3 4.107) of published images, against the node on real
ports, with dicomweb-client as the user agent where it fits."""

from __future__ import annotations

import tracemalloc
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.tag import Tag
from python_multipart.multipart import MultipartParser, parse_options_header

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi.actors import dicomweb
from xdsi.dicom import scan
from xdsi.dicom.check import check_file

JLS = "ts-jpegls-lossless__CT1_JLSL.dcm"
US_MULTI_FRAME = "us-mf-jpeg-baseline__examples_ybr_color.dcm"
MR_MULTI_FRAME = "enhanced-mr-mf__emri_small.dcm"
BIG_ENDIAN = "ts-explicit-be__MR_small_bigendian.dcm"
RLE = "ts-rle__MR_small_RLE.dcm"
SR = "sr-basic-text__reportsi.dcm"
RGB_BY_PLANE = "us-rgb-bigendian__ExplVR_BigEnd.dcm"
KOS = "kos-manifest-1ref__ids-1001-kos.dcm"
# 12-bit JPEG Extended, which pydicom's plugins cannot decode.
JPEG_12_BIT = "ts-jpeg-extended-12bit__MR1_JPLY.dcm"
# The format Pillow names each Rendered Media Type sent.
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}


@pytest.fixture(scope="module")
def images(
    shared_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, scan.InstanceHeader]:
    """Copies of single images, each published as a study of its own."""
    shared_node.feed()
    published = {}
    for name in (
        JLS,
        US_MULTI_FRAME,
        MR_MULTI_FRAME,
        BIG_ENDIAN,
        RLE,
        SR,
        RGB_BY_PLANE,
    ):
        published[name] = _publish(
            shared_node,
            tmp_path_factory.mktemp("frames"),
            pydicom.dcmread(dicom_path("singles", name)),
        )
    return published


def _url(node: RunningNode, instance: scan.InstanceHeader, tail: str) -> str:
    return (
        f"{node.settings.dicomweb_url}/studies/{instance.study_instance_uid}"
        f"/series/{instance.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}/{tail}"
    )


def _parts(answer: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: headers and body."""
    _, params = parse_options_header(answer.headers["Content-Type"])
    parts: list[tuple[dict[str, str], bytes]] = []
    field: list[bytes] = []

    def begin() -> None:
        parts.append(({}, b""))

    def header_field(data: bytes, start: int, end: int) -> None:
        field[:] = [data[start:end]]

    def header_value(data: bytes, start: int, end: int) -> None:
        parts[-1][0][field[0].decode().lower()] = data[start:end].decode()

    def body(data: bytes, start: int, end: int) -> None:
        headers, sofar = parts[-1]
        parts[-1] = (headers, sofar + data[start:end])

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_part_data": body,
        },
    )
    parser.write(answer.content)
    parser.finalize()
    return parts


def _cells(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def test_a_frame_comes_decoded_by_default(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    """DICOM PS3.18 8.7.3.5.2: asked for as anything (requests sends
    ``*/*``), a frame is sent as
    application/octet-stream, the pixel cells of Explicit VR Little
    Endian, whatever the syntax held (here JPEG-LS)."""
    instance = images[JLS]

    answer = requests.get(_url(shared_node, instance, "frames/1"), timeout=30)

    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    ((headers, data),) = _parts(answer)
    assert headers["content-type"] == (
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    )
    assert headers["content-location"].endswith(
        f"/instances/{instance.sop_instance_uid}/frames/1"
    )
    assert data == _cells(pydicom.dcmread(dicom_path("singles", JLS)).pixel_array)


def test_frames_of_a_multi_frame_image_come_in_the_order_listed(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    """DICOM PS3.18 10.4.1.1.4: one part a frame, in the frame list's
    order; dicomweb-client reads them."""
    instance = images[MR_MULTI_FRAME]
    held = pydicom.dcmread(dicom_path("singles", MR_MULTI_FRAME)).pixel_array
    client = DICOMwebClient(url=shared_node.settings.dicomweb_url)

    got = client.retrieve_instance_frames(
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
        frame_numbers=[10, 3, 1],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),),
    )

    assert got == [_cells(held[9]), _cells(held[2]), _cells(held[0])]


def test_a_big_endian_image_comes_little_endian(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    answer = requests.get(
        _url(shared_node, images[BIG_ENDIAN], "frames/1"),
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
        timeout=30,
    )

    ((_, data),) = _parts(answer)
    held = pydicom.dcmread(dicom_path("singles", BIG_ENDIAN)).pixel_array
    assert data == _cells(held)
    assert data != held.tobytes()


def test_a_frame_of_an_image_held_colour_by_plane_comes_so(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    """DICOM PS3.3 C.7.6.3.1.3: the cells of an image of Planar
    Configuration 1 go out colour by plane, as its metadata says, not
    colour by pixel as pydicom decodes them."""
    answer = requests.get(
        _url(shared_node, images[RGB_BY_PLANE], "frames/1"), timeout=30
    )

    ((_, data),) = _parts(answer)
    held = pydicom.dcmread(dicom_path("singles", RGB_BY_PLANE))
    assert held.PlanarConfiguration == 1
    assert data == _cells(held.pixel_array.transpose(2, 0, 1))


def _publish(
    node: RunningNode, folder: Path, ds: pydicom.Dataset, *, checked: bool = True
) -> scan.InstanceHeader:
    """Publish ``ds`` as a study of its own, under new UIDs; ``checked``:
    after the intake check has passed it, as intake would."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, pydicom.uid.generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "copy.dcm", enforce_file_format=True)
    if checked:
        check_file(folder / "copy.dcm")
    (study,) = scan.scan_directory(folder).studies
    node.services.imaging_source.publish(study, PATIENT)
    return study.instances[0]


def _one_bit_image(frames: int, rows: int, columns: int) -> pydicom.Dataset:
    """The bundled CT made an image of one bit a cell, its frames of
    ``rows`` x ``columns`` cells following one another bit by bit."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        ds.pop(keyword, None)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = ds.PixelRepresentation = 0
    return ds


def test_each_frame_of_a_one_bit_image_comes_packed_from_its_first_bit(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.5 8.1.1 and PS3.18 8.7.3.5.2: frames of 1 bit a cell follow
    one another bit by bit, a frame of 5 x 3 cells starting inside a byte;
    each goes out as its own bits, packed from its first."""
    shared_node.feed()
    ds = _one_bit_image(3, 5, 3)
    cells = np.random.default_rng(7).integers(0, 2, 45, dtype=np.uint8)
    ds.PixelData = np.packbits(cells, bitorder="little").tobytes()
    instance = _publish(shared_node, tmp_path, ds)

    answer = requests.get(_url(shared_node, instance, "frames/3,1,2"), timeout=30)

    assert answer.status_code == 200, answer.text
    assert [data for _, data in _parts(answer)] == [
        np.packbits(cells[n * 15 : (n + 1) * 15], bitorder="little").tobytes()
        for n in (2, 0, 1)
    ]


def test_the_pixel_data_of_millions_of_frames_is_not_listed_in_memory(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.18 F.2.6: the Pixel Data BulkDataURI answers every frame;
    an image of 4 million 1 x 1 frames (512 KiB held) starts its answer
    without a list of them all in memory."""
    shared_node.feed()
    ds = _one_bit_image(4_000_000, 1, 1)
    ds.PixelData = bytes(500_000)
    instance = _publish(shared_node, tmp_path, ds)

    tracemalloc.start()
    try:
        with requests.get(
            _url(shared_node, instance, "bulkdata/7FE00010"), stream=True, timeout=30
        ) as answer:
            first = next(answer.iter_content(256))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert answer.status_code == 200
    assert first.startswith(b"--")
    assert peak < 32 << 20


@pytest.mark.parametrize(
    ("name", "accept", "media_type"),
    [
        (JLS, 'multipart/related; type="image/jls"', "image/jls"),
        (
            JLS,
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            "application/octet-stream",
        ),
        (US_MULTI_FRAME, 'multipart/related; type="*/*"', "image/jpeg"),
        (RLE, 'multipart/related; type="image/x-dicom-rle"', "image/dicom-rle"),
    ],
    ids=["jls", "octet-stream-as-held", "any", "rle-alias"],
)
def test_a_frame_asked_for_as_held_is_its_encoded_bitstream(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    name: str,
    accept: str,
    media_type: str,
) -> None:
    """DICOM PS3.18 8.7.3.5: a frame of an encapsulated syntax (DICOM
    PS3.5 A.4) goes as its fragments hold it, labelled with the syntax."""
    held = pydicom.dcmread(dicom_path("singles", name))
    count = int(held.get("NumberOfFrames", 1))
    syntax = held.file_meta.TransferSyntaxUID

    answer = requests.get(
        _url(shared_node, images[name], f"frames/{count}"),
        headers={"Accept": accept},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    ((headers, data),) = _parts(answer)
    assert headers["content-type"] == f"{media_type}; transfer-syntax={syntax}"
    assert data == get_frame(held.PixelData, count - 1, number_of_frames=count)


def test_a_frame_asked_for_decoded_is_decoded(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    """The last frame of a JPEG Baseline multi-frame image, decoded as
    pydicom decodes it (YBR to RGB)."""
    path = dicom_path("singles", US_MULTI_FRAME)

    answer = requests.get(
        _url(shared_node, images[US_MULTI_FRAME], "frames/30"),
        headers={
            "Accept": 'multipart/related; type="application/octet-stream"; '
            "transfer-syntax=1.2.840.10008.1.2.1"
        },
        timeout=30,
    )

    ((_, data),) = _parts(answer)
    assert data == _cells(pixel_array(path, index=29))


@pytest.mark.parametrize(
    ("name", "frame_list", "status", "said"),
    [
        (MR_MULTI_FRAME, "0", 400, "start at 1"),
        (MR_MULTI_FRAME, "1,1", 400, "listed twice"),
        (MR_MULTI_FRAME, "1,x", 400, "not frame numbers"),
        (MR_MULTI_FRAME, "11", 404, "has 10 frames"),
        (SR, "1", 404, "no image"),
    ],
)
def test_a_frame_list_or_instance_without_those_frames_is_refused(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    name: str,
    frame_list: str,
    status: int,
    said: str,
) -> None:
    answer = requests.get(
        _url(shared_node, images[name], f"frames/{frame_list}"), timeout=30
    )

    assert answer.status_code == status
    assert said in answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")


def test_frames_in_a_media_type_they_are_not_held_in_are_not_acceptable(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    """DICOM PS3.18 8.7.3.5: this node does not re-encode frames; a 406
    names what it sends them in."""
    answer = requests.get(
        _url(shared_node, images[JLS], "frames/1"),
        headers={"Accept": 'multipart/related; type="image/jp2"'},
        timeout=30,
    )

    assert answer.status_code == 406
    assert 'type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80' in answer.text


def test_frames_of_an_instance_not_published_are_not_found(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    instance = images[JLS]
    url = _url(shared_node, instance, "frames/1").replace(
        instance.sop_instance_uid, pydicom.uid.generate_uid()
    )

    assert requests.get(url, timeout=30).status_code == 404


@pytest.mark.parametrize(
    ("tail", "params", "size"),
    [
        ("rendered", {}, (512, 512)),
        ("rendered", {"viewport": "64,32"}, (32, 32)),
        ("rendered", {"window": "40,400,LINEAR", "quality": "50"}, (512, 512)),
    ],
    ids=["as-is", "viewport", "window-quality"],
)
def test_an_image_is_rendered_as_jpeg(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    tail: str,
    params: dict[str, str],
    size: tuple[int, int],
) -> None:
    """DICOM PS3.18 10.4.1.1.3 and 8.3.5.1: quality, window and viewport
    (the largest size, aspect kept)."""
    answer = requests.get(
        _url(shared_node, images[JLS], tail),
        params=params,
        headers={"Accept": "image/jpeg"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "image/jpeg"
    image = Image.open(BytesIO(answer.content))
    assert (image.format, image.size) == ("JPEG", size)


def test_a_frame_is_rendered_as_that_frame(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    held = pydicom.dcmread(dicom_path("singles", MR_MULTI_FRAME)).pixel_array
    got = [
        np.asarray(
            Image.open(
                BytesIO(
                    requests.get(
                        _url(
                            shared_node, images[MR_MULTI_FRAME], f"frames/{n}/rendered"
                        ),
                        timeout=30,
                    ).content
                )
            ).convert("L"),
            np.float64,
        )
        for n in (1, 10)
    ]

    def likeness(image: np.ndarray, frame: np.ndarray) -> float:
        return float(np.corrcoef(image.ravel(), frame.astype(np.float64).ravel())[0, 1])

    assert likeness(got[0], held[0]) > likeness(got[0], held[9])
    assert likeness(got[1], held[9]) > likeness(got[1], held[0])


@pytest.mark.parametrize(
    ("accept", "parameter", "media_type"),
    [
        ("image/png", None, "image/png"),
        ("image/gif", None, "image/gif"),
        ("image/*", None, "image/jpeg"),
        ("image/jpeg; q=0.5, image/png", None, "image/png"),
        ("image/jpeg; q=0, image/*", None, "image/png"),
        ("*/*", "image/gif", "image/gif"),
        (None, "image/png", "image/png"),
    ],
    ids=[
        "png",
        "gif",
        "image-wildcard",
        "q-values",
        "q-zero-excludes",
        "parameter",
        "parameter-alone",
    ],
)
def test_an_image_is_rendered_in_the_acceptable_media_type_of_highest_q_value(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    accept: str | None,
    parameter: str | None,
    media_type: str,
) -> None:
    """DICOM PS3.18 Table 8.7.4-1 and 8.7.8.1: a rendered image goes as
    image/jpeg (the default), image/png or image/gif (required of a RESTful
    service), the accept query parameter before the Accept header."""
    answer = requests.get(
        _url(shared_node, images[JLS], "rendered"),
        params={} if parameter is None else {"accept": parameter},
        headers={"Accept": accept},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == media_type
    image = Image.open(BytesIO(answer.content))
    assert (image.format, image.size) == (FORMATS[media_type], (512, 512))


@pytest.mark.parametrize(
    ("function", "grey"),
    [("LINEAR", 191), ("linear_exact", 191), ("SIGMOID", 186)],
)
def test_a_window_is_applied_with_the_voi_lut_function_asked_for(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    function: str,
    grey: int,
) -> None:
    """DICOM PS3.18 8.3.5.1.4: window=center,width,function, the function a
    VOI LUT Function of DICOM PS3.3 C.11.2.1.3. A cell a quarter width
    above the center is 0.75 of white linearly (C.11.2.1.2.1, C.11.2.1.3.2)
    and 1 / (1 + e^-1) of it by the sigmoid (C.11.2.1.3.1); lossless PNG
    keeps the grey."""
    ds = pydicom.dcmread(dicom_path("singles", JLS))
    value = float(apply_modality_lut(ds.pixel_array, ds)[0, 0])
    width = 400

    answer = requests.get(
        _url(shared_node, images[JLS], "rendered"),
        params={"window": f"{value - width / 4},{width},{function}"},
        headers={"Accept": "image/png"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert Image.open(BytesIO(answer.content)).getpixel((0, 0)) == grey


@pytest.mark.parametrize(
    ("accept", "params"),
    [
        ("image/jpeg", {"annotation": "patient,technique"}),
        ("image/jpeg", {"iccprofile": "srgb"}),
        ("image/jpeg", {"charset": "UTF-8"}),
        ("image/jpeg", {"no_such_parameter": "1"}),
        ("image/png", {"quality": "5"}),
        ("image/gif", {"quality": "not a number"}),
    ],
    ids=[
        "annotation",
        "iccprofile",
        "charset",
        "unknown",
        "png-quality",
        "gif-quality",
    ],
)
def test_a_parameter_this_node_does_not_apply_is_ignored(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    accept: str,
    params: dict[str, str],
) -> None:
    """DICOM PS3.18 8.3: a Query Parameter the origin server does not
    support is ignored, the image being the one asked for without it;
    quality is of a lossy Rendered Media Type alone (8.3.5.1.2), here
    image/jpeg."""
    url = _url(shared_node, images[JLS], "rendered")
    headers = {"Accept": accept}

    answer = requests.get(url, params=params, headers=headers, timeout=30)

    assert answer.status_code == 200, answer.text
    assert answer.content == requests.get(url, headers=headers, timeout=30).content


@pytest.mark.parametrize(
    ("accept", "parameter"),
    [
        ("application/dicom, image/jpeg", None),
        ('multipart/related; type="application/dicom", image/gif; q=0.5', None),
        ("application/dicom+json", "image/png"),
        ("image/*", "application/dicom,image/jpeg"),
    ],
    ids=["header", "multipart-header", "header-and-parameter", "parameter"],
)
def test_dicom_and_rendered_media_types_accepted_at_once_are_a_400(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    accept: str,
    parameter: str | None,
) -> None:
    """DICOM PS3.18 8.7.5: the Acceptable Media Types, of the Accept header
    and accept query parameter, are DICOM Media Types or Rendered Media
    Types, not both; both are a 400, for a rendered and a thumbnail
    resource alike."""
    params = {} if parameter is None else {"accept": parameter}

    for tail in ("rendered", "thumbnail", "frames/1/rendered"):
        answer = requests.get(
            _url(shared_node, images[JLS], tail),
            params=params,
            headers={"Accept": accept},
            timeout=30,
        )

        assert answer.status_code == 400, (tail, answer.text)
        assert "8.7.5" in answer.text


@pytest.mark.parametrize(
    ("tail", "params", "headers", "status"),
    [
        ("rendered", {}, {"Accept": "image/webp"}, 406),
        ("rendered", {"accept": "image/webp"}, {"Accept": "text/html"}, 406),
        ("rendered", {"window": "40,400,GAMMA"}, {}, 400),
        ("rendered", {"window": "40,0.5"}, {}, 400),
        ("rendered", {"window": "40,0,SIGMOID"}, {}, 400),
        ("rendered", {"window": "40"}, {}, 400),
        ("rendered", {"viewport": "1,2,3,4,5,6"}, {}, 400),
        ("rendered", {"quality": "0"}, {}, 400),
        ("rendered", {"quality": "high"}, {"Accept": "image/jpeg"}, 400),
        ("rendered", {"accept": ["image/png", "image/gif"]}, {}, 400),
        ("frames/1,2/rendered", {}, {}, 400),
        ("frames/99/rendered", {}, {}, 404),
    ],
)
def test_a_rendering_this_node_does_not_make_is_refused(
    shared_node: RunningNode,
    images: dict[str, scan.InstanceHeader],
    tail: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
) -> None:
    answer = requests.get(
        _url(shared_node, images[MR_MULTI_FRAME], tail),
        params=params,
        headers=headers,
        timeout=30,
    )

    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("name", [SR, KOS])
def test_an_object_that_is_no_image_has_no_rendered_resource_406(
    shared_node: RunningNode, tmp_path: Path, name: str
) -> None:
    """DICOM PS3.18 8.7.8.1 step 5 and Table 8.7.4-1: a report or key
    object selection is of the Text Resource Category, whose Rendered Media
    Types (text/html, text/plain) this node does not make: not acceptable
    (406), whatever the Accept header; it has no frames (404)."""
    shared_node.feed()
    instance = _publish(
        shared_node, tmp_path, pydicom.dcmread(dicom_path("singles", name))
    )

    answers = {
        accept: requests.get(
            _url(shared_node, instance, "rendered"),
            headers={"Accept": accept},
            timeout=30,
        )
        for accept in ("image/jpeg", "*/*", "text/html")
    }

    assert [a.status_code for a in answers.values()] == [406] * 3
    assert "is no image" in answers["image/jpeg"].text
    assert "is no image" in answers["*/*"].text
    frame = requests.get(_url(shared_node, instance, "frames/1/rendered"), timeout=30)
    assert frame.status_code == 404


def test_an_image_that_cannot_be_decoded_is_406_saying_how_to_have_it_as_held(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.18 8.7.8.1: no Rendered Media Type can be made of an image
    pydicom cannot decode (406); the answer points to what WADO-RS sends
    undecoded, the instance resource as held (10.4.1.1.1, 8.7.3.5.2), not
    to a WADO-URI parameter, and following it gets the stored object."""
    shared_node.feed()
    ds = pydicom.dcmread(dicom_path("singles", JPEG_12_BIT))
    instance = _publish(shared_node, tmp_path, ds)

    answer = requests.get(_url(shared_node, instance, "rendered"), timeout=30)

    assert answer.status_code == 406, answer.text
    assert "contentType" not in answer.text
    advice = "with Accept: application/dicom; transfer-syntax=*"
    assert advice in answer.text
    url = answer.text.split("GET ", 1)[1].split(" ", 1)[0]
    held = requests.get(
        url, headers={"Accept": "application/dicom; transfer-syntax=*"}, timeout=30
    )
    assert held.status_code == 200, held.text
    assert held.content == (tmp_path / "copy.dcm").read_bytes()


@pytest.fixture(scope="module")
def with_bulk_data(
    shared_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> scan.InstanceHeader:
    """An image with a binary value above the bulk data threshold at its top
    level: a Red Palette Color Lookup Table Data of 8 KiB."""
    shared_node.feed()
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    ds.RedPaletteColorLookupTableData = bytes(range(256)) * 32
    return _publish(shared_node, tmp_path_factory.mktemp("bulk"), ds)


def test_a_large_binary_value_is_named_by_a_bulkdata_uri_that_gives_it(
    shared_node: RunningNode, with_bulk_data: scan.InstanceHeader
) -> None:
    """DICOM PS3.18 F.2.6: a binary value over the threshold is a
    BulkDataURI in the metadata; the URI answers the value, one
    application/octet-stream part (read by dicomweb-client)."""
    client = DICOMwebClient(url=shared_node.settings.dicomweb_url)
    metadata = client.retrieve_instance_metadata(
        with_bulk_data.study_instance_uid,
        with_bulk_data.series_instance_uid,
        with_bulk_data.sop_instance_uid,
    )

    lut = metadata["00281201"]
    assert set(lut) == {"vr", "BulkDataURI"} and lut["vr"] == "OW"
    (value,) = client.retrieve_bulkdata(lut["BulkDataURI"])
    assert value == bytes(range(256)) * 32


@pytest.mark.parametrize(
    ("tag", "headers", "status"),
    [
        ("00100010", {}, 404),
        ("7FE0", {}, 404),
        ("00281201", {"Accept": "image/jpeg"}, 406),
    ],
    ids=["not-binary", "no-tag", "not-acceptable"],
)
def test_bulk_data_that_is_none_or_not_acceptable_is_refused(
    shared_node: RunningNode,
    with_bulk_data: scan.InstanceHeader,
    tag: str,
    headers: dict[str, str],
    status: int,
) -> None:
    answer = requests.get(
        _url(shared_node, with_bulk_data, f"bulkdata/{tag}"),
        headers=headers,
        timeout=30,
    )

    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")


def test_the_metadata_of_an_instance_without_pixels_names_no_pixel_data(
    shared_node: RunningNode, images: dict[str, scan.InstanceHeader]
) -> None:
    answer = requests.get(
        _url(shared_node, images[SR], "metadata"),
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )

    (document,) = answer.json()
    assert "7FE00010" not in document
    assert document["00080060"]["Value"] == ["SR"]


def test_an_image_whose_number_of_frames_is_no_number_is_no_internal_error(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """A Number of Frames that is no number (an IS of letters, published
    from a folder without the intake check) counts as one frame, as for
    Retrieve Frames; pydicom cannot decode such an image, which is said
    (406), not an internal error."""
    shared_node.feed()
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    # Number of Frames, as a file would hold it.
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    instance = _publish(shared_node, tmp_path, ds, checked=False)

    answer = requests.get(_url(shared_node, instance, "rendered"), timeout=30)

    assert answer.status_code == 406, answer.text
    assert "cannot be decoded for rendering" in answer.text
    assert "Accept: application/dicom" in answer.text


def test_a_value_over_a_mebibyte_is_streamed_from_the_file_not_kept(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.18 F.2.6: a top-level value longer than scan.DEFER_SIZE is
    named by a BulkDataURI without being read, and sent from the stored
    file: the header the node keeps for WADO-RS does not hold it."""
    shared_node.feed()
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    blob = bytes(range(256)) * (3 * 4096)  # 3 MiB
    block = ds.private_block(0x0011, "XDSI TEST", create=True)
    block.add_new(0x10, "OB", blob)
    key = f"{block.get_tag(0x10):08X}"
    instance = _publish(shared_node, tmp_path, ds)
    client = DICOMwebClient(url=shared_node.settings.dicomweb_url)

    metadata = client.retrieve_instance_metadata(
        instance.study_instance_uid,
        instance.series_instance_uid,
        instance.sop_instance_uid,
    )
    (value,) = client.retrieve_bulkdata(metadata[key]["BulkDataURI"])

    assert metadata[key]["vr"] == "OB"
    assert value == blob
    (row,) = shared_node.services.imaging_source.held_instances(
        [instance.sop_instance_uid]
    ).values()
    kept = dicomweb._header(shared_node.services.imaging_source.blobs.path(row.blob))
    assert kept._dict[int(key, 16)].value is None

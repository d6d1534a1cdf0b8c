"""WADO-RS metadata (RAD TF-3 4.107) and QIDO-RS results (RAD TF-3 4.129)
as multipart/related of Native DICOM Model documents (DICOM PS3.18 Table
10.4.4-1, 10.6.3.3; DICOM PS3.19 A.1), each validated against the schema of
DICOM PS3.19 A.1.6 and compared with the DICOM JSON answer to the same
request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from lxml import etree
from python_multipart.multipart import MultipartParser, parse_options_header

from tests.conftest import assert_native_dicom_model, dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.integration.test_dicomweb_wado_qido import (
    _lose_stored_copy,
    _new_records,
    _published_study,
)
from xdsi.dicom import scan
from xdsi.dicom.native_xml import NATIVE_DICOM_MODEL

NS = {"n": NATIVE_DICOM_MODEL}
XML = 'multipart/related; type="application/dicom+xml"'
NAME_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
# An instance with Person Names of three component groups, sequences,
# private attributes and binary values that go as bulk data.
RICH = "mg-screening-jpegll__GH133.dcm"
RICH_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.fixture(scope="module")
def published(shared_node: RunningNode) -> Iterator[scan.Study]:
    """The MR study, published once."""
    shared_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    shared_node.services.imaging_source.publish(study, PATIENT)
    yield study


@pytest.fixture(scope="module")
def rich(
    shared_node: RunningNode,
    published: scan.Study,
    tmp_path_factory: pytest.TempPathFactory,
) -> scan.InstanceHeader:
    """A copy of RICH published as a study of its own, its patient named in
    alphabetic, ideographic and phonetic groups (UTF-8, DICOM PS3.5 6.1)."""
    (instance,) = _published_study(
        shared_node,
        [dicom_path("singles", RICH)],
        tmp_path_factory.mktemp("rich") / "copy",
        SpecificCharacterSet="ISO_IR 192",
        PatientName=RICH_NAME,
        ReferringPhysicianName="",
    ).instances
    return instance


def _instance_url(node: RunningNode, instance: scan.InstanceHeader) -> str:
    return (
        f"{node.settings.dicomweb_url}/studies/{instance.study_instance_uid}"
        f"/series/{instance.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def _xml_parts(answer: requests.Response) -> list[etree._Element]:
    """The Native DICOM Model documents of a multipart/related answer, each
    part application/dicom+xml and valid against DICOM PS3.19 A.1.6."""
    media_type, params = parse_options_header(answer.headers["Content-Type"])
    assert media_type == b"multipart/related"
    assert params[b"type"] == b"application/dicom+xml"
    parts: list[tuple[bytes, bytes]] = []
    header: list[bytes] = [b""]

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[0] += b":" + data[start:end]

    def part_begin() -> None:
        header[0] = b""
        parts.append((b"", b""))

    def part_data(data: bytes, start: int, end: int) -> None:
        head, body = parts.pop()
        parts.append((head or header[0], body + data[start:end]))

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_part_data": part_data,
        },
    )
    parser.write(answer.content)
    parser.finalize()
    assert all(
        head.lower() == b"content-type:application/dicom+xml" for head, _ in parts
    )
    return [assert_native_dicom_model(body) for _, body in parts]


def _from_xml(parent: etree._Element) -> dict[str, dict]:
    """The DICOM JSON (DICOM PS3.18 F.2) a Native DICOM Model data set says,
    private tags given back their block (DICOM PS3.19 Table A.1.5-2), in
    the form _normalized gives."""
    attributes = parent.findall("n:DicomAttribute", NS)
    blocks = {}
    for attribute in attributes:
        tag = attribute.get("tag")
        group, element = int(tag[:4], 16), int(tag[4:], 16)
        if group & 1 and 0x10 <= element <= 0xFF:
            if attribute.get("privateCreator") is None:
                value = attribute.findtext("n:Value", namespaces=NS)
                blocks[(tag[:4], value)] = f"{element:02X}"
    document: dict[str, dict] = {}
    for attribute in attributes:
        tag = attribute.get("tag")
        creator = attribute.get("privateCreator")
        if creator is not None:
            tag = f"{tag[:4]}{blocks[(tag[:4], creator)]}{tag[6:]}"
        element: dict[str, object] = {"vr": attribute.get("vr")}
        bulk = attribute.find("n:BulkData", NS)
        inline = attribute.find("n:InlineBinary", NS)
        if bulk is not None:
            element["BulkDataURI"] = bulk.get("uri")
        elif inline is not None:
            element["InlineBinary"] = inline.text
        elif len(attribute):
            element["Value"] = [_child_value(child) for child in attribute]
        document[tag] = element
    return document


def _child_value(child: etree._Element) -> object:
    name = etree.QName(child).localname
    if name == "Item":
        return _from_xml(child)
    if name == "PersonName":
        return {
            etree.QName(group).localname: "^".join(
                group.findtext(f"n:{component}", "", NS)
                for component in NAME_COMPONENTS
            ).rstrip("^")
            for group in child
        }
    return child.text or ""


def _normalized(document: dict[str, dict]) -> dict[str, dict]:
    """A DICOM JSON document with each value as the Native DICOM Model
    spells it: numbers as text, an empty value as "", a name's empty
    trailing components dropped; no Group Length (DICOM PS3.19 A.1.1)."""
    normalized: dict[str, dict] = {}
    for tag, attribute in document.items():
        if tag.endswith("0000"):
            continue
        element = dict(attribute)
        vr = element["vr"]
        if element.get("Value") == []:
            # An empty sequence, which pydicom writes with an empty Value.
            del element["Value"]
        if vr == "SQ" and "Value" in element:
            element["Value"] = [_normalized(item) for item in element["Value"]]
        elif vr == "PN" and "Value" in element:
            element["Value"] = [
                {group: text.rstrip("^") for group, text in (name or {}).items()}
                for name in element["Value"]
            ]
        elif "Value" in element:
            element["Value"] = ["" if v is None else str(v) for v in element["Value"]]
        normalized[tag] = element
    return normalized


def test_instance_metadata_as_xml_says_what_the_json_answer_says(
    shared_node: RunningNode, rich: scan.InstanceHeader
) -> None:
    """DICOM PS3.18 Table 10.4.4-1, PS3.19 A.1.5: the Native DICOM Model
    answer holds every attribute of the DICOM JSON answer, attribute by
    attribute: Person Names in their three groups, sequences as Items,
    private attributes under their Private Creator, bulk data by the same
    BulkData URIs. It is audited as the JSON answer is (RAD TF-3 4.107.5)."""
    url = f"{_instance_url(shared_node, rich)}/metadata"
    before = len(list(shared_node.services.audit_spool.records()))

    as_json = requests.get(url, timeout=30)
    as_xml = requests.get(url, headers={"Accept": XML}, timeout=30)

    assert as_json.status_code == as_xml.status_code == 200
    assert len(_new_records(shared_node, before, "RAD-107")) == 2
    (document,) = as_json.json()
    (root,) = _xml_parts(as_xml)
    assert _from_xml(root) == _normalized(document)
    name = root.find("n:DicomAttribute[@keyword='PatientName']/n:PersonName", NS)
    assert name.findtext("n:Ideographic/n:FamilyName", namespaces=NS) == "山田"
    assert name.findtext("n:Phonetic/n:GivenName", namespaces=NS) == "たろう"
    assert root.xpath("n:DicomAttribute[@vr='SQ']/n:Item", namespaces=NS)
    assert root.xpath("n:DicomAttribute[@privateCreator]", namespaces=NS)
    (pixels,) = root.xpath(
        "n:DicomAttribute[@tag='7FE00010']/n:BulkData", namespaces=NS
    )
    assert pixels.get("uri") == f"{_instance_url(shared_node, rich)}/bulkdata/7FE00010"
    # Two private OB values of the instance: one of 1 KiB inline, one of
    # 4 KiB as bulk data (DICOM PS3.18 F.2.6, F.2.7).
    (inline,) = root.xpath(
        "n:DicomAttribute[@tag='00450026']/n:InlineBinary", namespaces=NS
    )
    assert inline.text == document["00451026"]["InlineBinary"]
    (bulk,) = root.xpath("n:DicomAttribute[@tag='00450071']/n:BulkData", namespaces=NS)
    assert bulk.get("uri") == document["00451071"]["BulkDataURI"]


def test_study_metadata_as_xml_is_one_part_per_instance_streamed(
    shared_node: RunningNode, published: scan.Study
) -> None:
    """DICOM PS3.18 Table 10.4.4-1, 8.6.1.2: a study's metadata goes as one
    application/dicom+xml part per instance, in the order of the JSON
    array, sent as it is made (chunked, no length known ahead)."""
    url = (
        f"{shared_node.settings.dicomweb_url}/studies/"
        f"{published.study_instance_uid}/metadata"
    )

    as_json = requests.get(url, timeout=30)
    as_xml = requests.get(url, headers={"Accept": XML}, timeout=30)

    assert as_xml.status_code == 200
    assert "Content-Length" not in as_xml.headers
    assert as_xml.headers.get("Transfer-Encoding") == "chunked"
    roots = _xml_parts(as_xml)
    assert [_from_xml(root) for root in roots] == [
        _normalized(document) for document in as_json.json()
    ]
    assert len(roots) == len(published.instances)


@pytest.mark.parametrize(
    "query",
    [
        "/studies",
        "/studies?PatientName=yamada*",
        "/series?Modality=MR",
        "/instances?limit=2&offset=1",
        "/studies?fuzzymatching=true&limit=1",
        "/studies/{study}/series",
    ],
    ids=["studies", "name", "series", "paged", "warned", "in-study"],
)
def test_qido_results_as_xml_say_what_the_json_results_say(
    shared_node: RunningNode,
    published: scan.Study,
    rich: scan.InstanceHeader,
    query: str,
) -> None:
    """DICOM PS3.18 10.6.3.3: search results go as one Native DICOM Model
    part per match, the matches, paging and Warning headers of the DICOM
    JSON answer to the same search."""
    url = shared_node.settings.dicomweb_url + query.format(
        study=published.study_instance_uid
    )

    as_json = requests.get(url, timeout=30)
    as_xml = requests.get(url, headers={"Accept": XML}, timeout=30)

    assert as_json.status_code == as_xml.status_code == 200
    assert as_json.json()
    assert [_from_xml(root) for root in _xml_parts(as_xml)] == [
        _normalized(answer) for answer in as_json.json()
    ]
    assert as_xml.headers.get("Warning") == as_json.headers.get("Warning")
    if "fuzzymatching" in query:
        assert "fuzzymatching" in as_xml.headers["Warning"]


@pytest.mark.parametrize(
    "query",
    [
        "/studies?StudyInstanceUID=1.2.3",
        "/instances?offset=999999999999999999",
        "/series?offset=999999999999999999&limit=999999999999999999",
    ],
    ids=["no-match", "huge-offset", "huge-limit"],
)
def test_qido_xml_search_matching_nothing_is_200_with_no_part(
    shared_node: RunningNode, published: scan.Study, query: str
) -> None:
    """DICOM PS3.18 10.6.3.3 (and 11.9.3.1): a search that matches nothing,
    or pages past the last match, succeeds (200) with an empty list, as the
    DICOM JSON answer's [] does."""
    url = shared_node.settings.dicomweb_url + query

    as_json = requests.get(url, timeout=30)
    as_xml = requests.get(url, headers={"Accept": XML}, timeout=30)

    assert as_json.status_code == as_xml.status_code == 200
    assert as_json.json() == []
    assert _xml_parts(as_xml) == []


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (XML, "multipart/related"),
        ('Multipart/Related; Type="Application/DICOM+XML"', "multipart/related"),
        ("multipart/related", "multipart/related"),
        (f"{XML}, application/dicom+json;q=0.5", "multipart/related"),
        (f"{XML};q=0.5, application/dicom+json", "application/dicom+json"),
        ("application/json", "application/json"),
        (f"{XML}; q=1.5", None),
        (f"{XML}; q=1.5, application/json;q=0.1", "application/json"),
        (f"{XML}; q=abc", None),
        ("application/dicom+xml", None),
        ('multipart/related; type="application/dicom"', None),
        (f"{XML}; q=0, text/html", None),
    ],
    ids=[
        "xml",
        "xml-case",
        "multipart-alone",
        "xml-weighed-higher",
        "json-weighed-higher",
        "json",
        "q-above-1",
        "q-above-1-and-json",
        "q-no-number",
        "bare-dicom-xml",
        "dicom-instances",
        "xml-refused",
    ],
)
def test_metadata_and_search_results_go_in_the_type_accept_weighs_highest(
    shared_node: RunningNode,
    published: scan.Study,
    accept: str,
    media_type: str | None,
) -> None:
    """RFC 9110 12.5.1, DICOM PS3.18 8.7.8.1: the media type of the most
    specific matching range weighs; a range whose q is no qvalue (RFC 9110
    12.4.2) is malformed and left out; none taken is a 406 that names what
    is sent, and a refused search is not audited: no work is done."""
    base = shared_node.settings.dicomweb_url
    headers = {"Accept": accept}
    for url in (
        f"{base}/studies/{published.study_instance_uid}/metadata",
        f"{base}/studies?StudyInstanceUID={published.study_instance_uid}",
    ):
        before = len(list(shared_node.services.audit_spool.records()))

        answer = requests.get(url, headers=headers, timeout=30)

        if media_type is None:
            assert answer.status_code == 406, url
            assert "application/dicom+json" in answer.text
            assert XML in answer.text
            assert _new_records(shared_node, before, "RAD-129") == []
        else:
            assert answer.status_code == 200, url
            assert answer.headers["Content-Type"].split(";")[0] == media_type
            if media_type == "multipart/related":
                assert _xml_parts(answer)
            else:
                assert answer.json()


def test_a_control_character_in_a_stored_value_is_sent_as_a_replacement(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """XML 1.0 2.2: a stored value holding a character no XML document may
    hold (a C0 control; a form feed, which DICOM PS3.5 6.2 allows in an LT
    value) is sent in the Native DICOM Model as U+FFFD, in metadata and
    search results alike, not failed; the DICOM JSON answer carries it."""
    study = _published_study(
        shared_node,
        [dicom_path("singles", "ts-explicit-le__CT_small.dcm")],
        tmp_path / "control",
        StudyDescription="head\x01neck",
        ImageComments="page\x0cbreak",
    )
    (instance,) = study.instances
    url = f"{_instance_url(shared_node, instance)}/metadata"
    search = (
        f"{shared_node.settings.dicomweb_url}/studies"
        f"?StudyInstanceUID={instance.study_instance_uid}"
    )

    metadata = requests.get(url, headers={"Accept": XML}, timeout=30)
    found = requests.get(search, headers={"Accept": XML}, timeout=30)
    as_json = requests.get(url, timeout=30)

    assert metadata.status_code == found.status_code == 200
    (root,) = _xml_parts(metadata)
    (answer,) = _xml_parts(found)
    for document in (root, answer):
        assert document.findtext(
            "n:DicomAttribute[@keyword='StudyDescription']/n:Value", namespaces=NS
        ) == ("head\ufffdneck")
    assert root.findtext(
        "n:DicomAttribute[@keyword='ImageComments']/n:Value", namespaces=NS
    ) == ("page\ufffdbreak")
    held = pydicom.Dataset.from_json(as_json.json()[0])
    assert held.StudyDescription == "head\x01neck"


def test_xml_metadata_keeps_the_404_and_500_of_the_json_answer(
    shared_node: RunningNode, published: scan.Study, tmp_path: Path
) -> None:
    """DICOM PS3.18 10.4.3: a study not published is a 404, one whose
    stored copies cannot be read a 500, in plain text, whatever Accept
    asks for."""
    (instance,) = _published_study(
        shared_node,
        [dicom_path("singles", "ts-explicit-le__CT_small.dcm")],
        tmp_path / "lost",
    ).instances
    _lose_stored_copy(shared_node, instance)
    base = shared_node.settings.dicomweb_url

    unknown = requests.get(
        f"{base}/studies/1.2.3/metadata", headers={"Accept": XML}, timeout=30
    )
    lost = requests.get(
        f"{_instance_url(shared_node, instance)}/metadata",
        headers={"Accept": XML},
        timeout=30,
    )

    assert unknown.status_code == 404
    assert lost.status_code == 500
    assert lost.headers["Content-Type"].startswith("text/plain")
    assert "cannot be read" in lost.text

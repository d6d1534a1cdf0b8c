"""RAD-69 Retrieve Imaging Document Set at the Imaging Document Source
(RAD TF-3 4.69.4.2)."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.conftest import shared_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi import ns, wire
from xdsi.dicom import scan
from xdsi.metadata.responses import read_errors, read_status

RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def published(running_node: RunningNode) -> scan.Study:
    running_node.feed()
    (study,) = scan.scan_directory(shared_path("dicom", "study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)
    return study


def rad69(
    study_uid: str,
    series_uid: str,
    sop_uids: list[str],
    repository: str,
    syntaxes: tuple[str, ...] = (EXPLICIT_LE,),
) -> etree._Element:
    request = etree.Element(
        f"{{{ns.XDSIB}}}RetrieveImagingDocumentSetRequest",
        nsmap={"xdsi": ns.XDSIB, "xdsb": ns.XDSB},
    )
    study = etree.SubElement(
        request, f"{{{ns.XDSIB}}}StudyRequest", studyInstanceUID=study_uid
    )
    series = etree.SubElement(
        study, f"{{{ns.XDSIB}}}SeriesRequest", seriesInstanceUID=series_uid
    )
    for sop_uid in sop_uids:
        item = etree.SubElement(series, f"{{{ns.XDSB}}}DocumentRequest")
        etree.SubElement(item, f"{{{ns.XDSB}}}RepositoryUniqueId").text = repository
        etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = sop_uid
    syntax_list = etree.SubElement(request, f"{{{ns.XDSIB}}}TransferSyntaxUIDList")
    for uid in syntaxes:
        etree.SubElement(syntax_list, f"{{{ns.XDSIB}}}TransferSyntaxUID").text = uid
    return request


def _call(node: RunningNode, request: etree._Element) -> tuple[str, list[str], int]:
    with wire.SoapClient(node.settings.url("imaging_source")).call(
        RAD69, request
    ) as reply:
        return (
            read_status(reply.body).rsplit(":", 1)[-1],
            [e.code for e in read_errors(reply.body)],
            len(reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse")),
        )


def test_instance_asked_twice_comes_once(
    running_node: RunningNode, published: scan.Study
):
    """A DocumentRequest repeated in one request is answered once."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid] * 5,
        running_node.settings.imaging_source.repository_unique_id,
    )
    assert _call(running_node, request) == ("Success", [], 1)


def test_instance_under_another_series_is_not_returned(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.4.2: only instances of the named study and series."""
    first, other = published.series[0], published.series[1]
    request = rad69(
        published.study_instance_uid,
        other.series_instance_uid,
        [first.instances[0].sop_instance_uid],
        running_node.settings.imaging_source.repository_unique_id,
    )
    assert _call(running_node, request) == ("Failure", ["XDSDocumentUniqueIdError"], 0)


def test_one_known_one_unknown_is_partial_success(
    running_node: RunningNode, published: scan.Study
):
    """ITI TF-2 3.43.4.2.3 as RAD-69 applies it: PartialSuccess with errors."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid, "1.2.3.4.5.6.7.8.9"],
        running_node.settings.imaging_source.repository_unique_id,
    )
    assert _call(running_node, request) == (
        "PartialSuccess",
        ["XDSDocumentUniqueIdError"],
        1,
    )


def test_unlisted_transfer_syntax_is_refused(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.4.2: no listed syntax can be produced: an error."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        running_node.settings.imaging_source.repository_unique_id,
        syntaxes=("1.2.840.10008.1.2.4.50",),
    )
    assert _call(running_node, request) == ("Failure", ["XDSRepositoryError"], 0)


def test_unknown_repository_id(running_node: RunningNode, published: scan.Study):
    """ITI TF-3 Table 4.2.4.1-2: XDSUnknownRepositoryId."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        "1.2.3.999",
    )
    assert _call(running_node, request) == ("Failure", ["XDSUnknownRepositoryId"], 0)


def test_request_without_document_request_is_a_sender_fault(running_node: RunningNode):
    """A request the XDS-I.b schema refuses is a SOAP Sender fault."""
    request = rad69("1.2.3", "1.2.3.4", [], "1.2.3.999")
    with pytest.raises(wire.PeerFault) as fault:
        _call(running_node, request)
    assert fault.value.code.endswith("Sender")

"""RAD-69 Retrieve Imaging Document Set at the Imaging Document Source
(RAD TF-3 4.69.4.2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from lxml import etree
from pydicom.uid import RLELossless
from sqlalchemy import update

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi import audit, ns, wire
from xdsi.dicom import scan, transcode
from xdsi.metadata.responses import read_errors, read_status
from xdsi.store.schema import MANIFEST_PENDING, imaging_manifest

RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
OTHER_PATIENT = PATIENT.replace("XDSI-TEST-1", "XDSI-TEST-2")
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def published(running_node: RunningNode) -> scan.Study:
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
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


@pytest.mark.parametrize(
    "right_first", [True, False], ids=["right-first", "wrong-first"]
)
def test_an_instance_asked_again_under_another_study_is_an_error_either_way(
    running_node: RunningNode, published: scan.Study, right_first: bool
):
    """RAD TF-3 4.69.4.2: an instance asked for under its study and again
    under another is sent once, and the wrong request is answered with
    XDSDocumentUniqueIdError, whichever comes first."""
    instance = published.instances[0]
    repository = running_node.settings.imaging_source.repository_unique_id
    right = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        repository,
    )
    wrong = rad69("1.2.3.4.5", instance.series_instance_uid, [], repository)
    wrong_study = wrong.find(f"{{{ns.XDSIB}}}StudyRequest")
    wrong_study.find(f"{{{ns.XDSIB}}}SeriesRequest").append(
        etree.fromstring(etree.tostring(right.find(f".//{{{ns.XDSB}}}DocumentRequest")))
    )
    right_study = right.find(f"{{{ns.XDSIB}}}StudyRequest")
    if right_first:
        right_study.addnext(wrong_study)
    else:
        right_study.addprevious(wrong_study)

    assert _call(running_node, right) == (
        "PartialSuccess",
        ["XDSDocumentUniqueIdError"],
        1,
    )


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


def test_a_long_list_of_unlisted_syntaxes_is_not_repeated_in_each_error(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.4.2.3: each instance no listed syntax can be produced
    in is an error, which names the list's first syntaxes and how many more
    there are: a request listing thousands would otherwise be answered with
    the whole list once per instance, an answer hundreds of times its size."""
    series = published.series[0]
    syntaxes = tuple(f"1.2.840.99999.{n}" for n in range(5000))
    request = rad69(
        published.study_instance_uid,
        series.series_instance_uid,
        [i.sop_instance_uid for i in series.instances],
        running_node.settings.imaging_source.repository_unique_id,
        syntaxes=syntaxes + syntaxes,
    )

    with wire.SoapClient(running_node.settings.url("imaging_source")).call(
        RAD69, request
    ) as reply:
        errors = read_errors(reply.body)

    assert len(errors) == len(series.instances) > 1
    for error in errors:
        assert error.code == "XDSRepositoryError"
        assert "1.2.840.99999.0, " in error.message
        assert "4990 more" in error.message
        assert len(error.message) < 1000


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


def _retrieve(
    node: RunningNode, request: etree._Element, tmp_path: Path
) -> tuple[str, list[str], dict[str, pydicom.Dataset]]:
    """Send a RAD-69 and read back status, error codes and the instances."""
    with wire.SoapClient(node.settings.url("imaging_source")).call(
        RAD69, request
    ) as reply:
        instances = {}
        for item in reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse"):
            uid = item.findtext(f"{{{ns.XDSB}}}DocumentUniqueId") or ""
            attachment = wire.attachment_for(item.find(f"{{{ns.XDSB}}}Document"), reply)
            copy = tmp_path / f"{uid}.dcm"
            shutil.copyfile(attachment.path, copy)
            instances[uid] = pydicom.dcmread(copy)
        return (
            read_status(reply.body).rsplit(":", 1)[-1],
            [e.code for e in read_errors(reply.body)],
            instances,
        )


def test_several_series_with_padded_uids_come_transcoded_to_the_first_listed_syntax(
    running_node: RunningNode, published: scan.Study, tmp_path: Path
):
    """RAD TF-3 4.69.4.2.3: the first listed syntax that can be produced."""
    request = rad69(
        f" {published.study_instance_uid}\n",
        published.series[0].series_instance_uid,
        [f"\t{i.sop_instance_uid} " for i in published.series[0].instances[:2]],
        f" {running_node.settings.imaging_source.repository_unique_id} ",
        syntaxes=("1.2.840.10008.1.2.4.50", f" {RLELossless} ", EXPLICIT_LE),
    )
    study = request.find(f"{{{ns.XDSIB}}}StudyRequest")
    other = published.series[1]
    series = etree.SubElement(
        study,
        f"{{{ns.XDSIB}}}SeriesRequest",
        seriesInstanceUID=other.series_instance_uid,
    )
    repository = running_node.settings.imaging_source.repository_unique_id
    item = etree.SubElement(series, f"{{{ns.XDSB}}}DocumentRequest")
    etree.SubElement(item, f"{{{ns.XDSB}}}RepositoryUniqueId").text = repository
    sop_uid = other.instances[0].sop_instance_uid
    etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = sop_uid

    status, errors, instances = _retrieve(running_node, request, tmp_path)

    assert (status, errors) == ("Success", [])
    held = {i.sop_instance_uid: i.path for i in published.instances}
    assert len(instances) == 3
    for uid, sent in instances.items():
        assert sent.file_meta.TransferSyntaxUID == RLELossless
        assert np.array_equal(sent.pixel_array, pydicom.dcmread(held[uid]).pixel_array)
    spool = running_node.services.imaging_source.blobs.spool
    assert not list(spool.glob("rad69@*"))


def test_a_series_re_encoded_side_by_side_comes_whole_and_in_order(
    running_node: RunningNode, published: scan.Study, tmp_path: Path
):
    """RAD TF-3 4.69.4.2.3: a series re-encoded side by side by the
    transcoding processes; each instance comes in the syntax asked for with
    its own pixels, under its own DocumentUniqueId, and the spool is left
    empty."""
    series = max(published.series, key=lambda s: len(s.instances))
    assert len(series.instances) > transcode.TRANSCODING_SLOTS
    request = rad69(
        published.study_instance_uid,
        series.series_instance_uid,
        [i.sop_instance_uid for i in series.instances],
        running_node.settings.imaging_source.repository_unique_id,
        syntaxes=(RLELossless,),
    )

    status, errors, instances = _retrieve(running_node, request, tmp_path)

    assert (status, errors) == ("Success", [])
    assert sorted(instances) == sorted(i.sop_instance_uid for i in series.instances)
    for instance in series.instances:
        sent = instances[instance.sop_instance_uid]
        assert sent.SOPInstanceUID == instance.sop_instance_uid
        assert sent.file_meta.TransferSyntaxUID == RLELossless
        assert np.array_equal(
            sent.pixel_array, pydicom.dcmread(instance.path).pixel_array
        )
    spool = running_node.services.imaging_source.blobs.spool
    assert not list(spool.glob("rad69@*"))


def test_instance_asked_in_its_own_syntax_is_byte_identical(
    running_node: RunningNode, published: scan.Study, tmp_path: Path
):
    """RAD TF-3 4.69.4.2.3: held in the first listed syntax: sent as held."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        running_node.settings.imaging_source.repository_unique_id,
        syntaxes=(EXPLICIT_LE, RLELossless),
    )

    status, _, instances = _retrieve(running_node, request, tmp_path)

    assert (status, list(instances)) == ("Success", [instance.sop_instance_uid])
    assert (tmp_path / f"{instance.sop_instance_uid}.dcm").read_bytes() == (
        instance.path.read_bytes()
    )


def test_undecodable_instance_is_an_error_beside_a_transcoded_one(
    running_node: RunningNode, tmp_path: Path
):
    """RAD TF-3 4.69.4.2.3 with ITI TF-2 3.43.4.2.3: PartialSuccess, one error."""
    folder = tmp_path / "held"
    folder.mkdir()
    for name in (
        "ts-jpegls-lossless__CT1_JLSL.dcm",
        "ts-jpeg-extended-12bit__MR1_JPLY.dcm",
    ):
        shutil.copy(dicom_path("singles", name), folder / name)
    source = running_node.services.imaging_source
    studies = scan.scan_directory(folder).studies
    running_node.feed()
    for study in studies:
        source.publish(study, PATIENT)
    request = etree.Element(
        f"{{{ns.XDSIB}}}RetrieveImagingDocumentSetRequest", nsmap={"xdsi": ns.XDSIB}
    )
    for study in studies:
        request.append(
            rad69(
                study.study_instance_uid,
                study.instances[0].series_instance_uid,
                [study.instances[0].sop_instance_uid],
                source.repository_unique_id,
            ).find(f"{{{ns.XDSIB}}}StudyRequest")
        )
    syntax_list = etree.SubElement(request, f"{{{ns.XDSIB}}}TransferSyntaxUIDList")
    etree.SubElement(syntax_list, f"{{{ns.XDSIB}}}TransferSyntaxUID").text = EXPLICIT_LE

    status, errors, instances = _retrieve(running_node, request, tmp_path)

    assert (status, errors) == ("PartialSuccess", ["XDSRepositoryError"])
    (sent,) = instances.values()
    assert sent.file_meta.TransferSyntaxUID == EXPLICIT_LE
    original = pydicom.dcmread(folder / "ts-jpegls-lossless__CT1_JLSL.dcm")
    assert np.array_equal(sent.pixel_array, original.pixel_array)


def test_instance_whose_stored_copy_is_gone_is_an_error_beside_the_others(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.4.2.3: a held instance that cannot be read is answered
    with XDSRepositoryError and PartialSuccess, the others are sent, and no
    work file of the request is left behind."""
    gone, *kept = published.instances[:3]
    source = running_node.services.imaging_source
    (row,) = source.held_instances([gone.sop_instance_uid]).values()
    source.blobs.path(row.blob).unlink()
    request = rad69(
        gone.study_instance_uid,
        gone.series_instance_uid,
        [gone.sop_instance_uid, *(i.sop_instance_uid for i in kept)],
        running_node.settings.imaging_source.repository_unique_id,
    )

    assert _call(running_node, request) == (
        "PartialSuccess",
        ["XDSRepositoryError"],
        2,
    )
    assert not list(source.blobs.spool.glob("rad69@*"))


def test_a_failed_request_for_an_instance_does_not_hide_a_right_one(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.4.2: the instance asked under the right series is sent
    even when it was first asked under a wrong one."""
    first, other = published.series[0], published.series[1]
    instance = first.instances[0]
    repository = running_node.settings.imaging_source.repository_unique_id
    request = rad69(
        published.study_instance_uid,
        other.series_instance_uid,
        [instance.sop_instance_uid],
        repository,
    )
    right = rad69(
        published.study_instance_uid,
        first.series_instance_uid,
        [instance.sop_instance_uid],
        repository,
    )
    request.append(right.find(f"{{{ns.XDSIB}}}StudyRequest"))
    # TransferSyntaxUIDList stays last (RAD TF-3 4.69.4.1.2).
    request.append(request.find(f"{{{ns.XDSIB}}}TransferSyntaxUIDList"))

    assert _call(running_node, request) == (
        "PartialSuccess",
        ["XDSDocumentUniqueIdError"],
        1,
    )


@pytest.mark.parametrize("manifest", ["none", "pending"])
def test_instance_of_a_study_not_published_is_unknown(
    running_node: RunningNode, manifest: str
):
    """ITI TF-3 Table 4.2.4.1-2 as RAD TF-3 4.69.4.2.3 applies it: an instance
    taken in whose study has no manifest, or one whose registration is not
    yet known, is answered as one not held (XDSDocumentUniqueIdError), as
    WADO-RS answers 404 for it."""
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    source = running_node.services.imaging_source
    if manifest == "none":
        source.keep_instances(study, PATIENT)
    else:
        running_node.feed()
        source.publish(study, PATIENT)
        with source.engine.begin() as conn:
            conn.execute(update(imaging_manifest).values(status=MANIFEST_PENDING))
    instance = study.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        source.repository_unique_id,
    )

    assert _call(running_node, request) == ("Failure", ["XDSDocumentUniqueIdError"], 0)


def _source_audit_records(node: RunningNode) -> list[audit.AuditRecord]:
    """The RAD-69 records the Imaging Document Source wrote (action R)."""
    records = list(node.services.audit_spool.records())
    assert all(r.valid for r in records), [r.path.name for r in records]
    return [r for r in records if r.event_type == "RAD-69" and r.event_action == "R"]


def test_instances_of_two_patients_are_audited_once_per_patient(
    running_node: RunningNode, published: scan.Study, tmp_path: Path
):
    """RAD TF-3 4.69.5, DICOM PS3.15 A.5.3.7: one DICOM Instances Transferred
    per patient (the Patient object is 1..1), naming only the studies of
    that patient that were sent, each once."""
    source = running_node.services.imaging_source
    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(dicom_path("singles", "ts-explicit-le__CT_small.dcm"), folder)
    (other,) = scan.scan_directory(folder).studies
    running_node.feed(OTHER_PATIENT)
    source.publish(other, OTHER_PATIENT)

    # The MR study asked under two StudyRequests, the other patient's study,
    # and a study of which nothing is held.
    first, second = published.series[0], published.series[1]
    request = rad69(
        published.study_instance_uid,
        first.series_instance_uid,
        [first.instances[0].sop_instance_uid],
        source.repository_unique_id,
    )
    syntax_list = request.find(f"{{{ns.XDSIB}}}TransferSyntaxUIDList")
    for study_uid, series_uid, sop_uid in (
        (
            published.study_instance_uid,
            second.series_instance_uid,
            second.instances[0].sop_instance_uid,
        ),
        (
            other.study_instance_uid,
            other.instances[0].series_instance_uid,
            other.instances[0].sop_instance_uid,
        ),
        ("1.2.3.4.5", "1.2.3.4.5.6", "1.2.3.4.5.6.7"),
    ):
        syntax_list.addprevious(
            rad69(study_uid, series_uid, [sop_uid], source.repository_unique_id).find(
                f"{{{ns.XDSIB}}}StudyRequest"
            )
        )

    assert _call(running_node, request) == (
        "PartialSuccess",
        ["XDSDocumentUniqueIdError"],
        3,
    )
    records = _source_audit_records(running_node)
    assert sorted((r.patient_ids, r.object_ids, r.outcome) for r in records) == [
        ((PATIENT,), (published.study_instance_uid,), 4),
        ((OTHER_PATIENT,), (other.study_instance_uid,), 4),
    ]


def test_request_that_sends_nothing_is_audited_once_with_the_studies_asked(
    running_node: RunningNode, published: scan.Study
):
    """RAD TF-3 4.69.5: a RAD-69 that sends nothing is one DICOM Instances
    Transferred of serious failure, naming each study asked for once."""
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        ["1.2.3.4.5.6.7.8.9"],
        running_node.settings.imaging_source.repository_unique_id,
    )
    again = rad69(
        instance.study_instance_uid,
        published.series[1].series_instance_uid,
        ["1.2.3.4.5.6.7.8.10"],
        running_node.settings.imaging_source.repository_unique_id,
    )
    request.find(f"{{{ns.XDSIB}}}TransferSyntaxUIDList").addprevious(
        again.find(f"{{{ns.XDSIB}}}StudyRequest")
    )

    assert _call(running_node, request) == (
        "Failure",
        ["XDSDocumentUniqueIdError", "XDSDocumentUniqueIdError"],
        0,
    )
    (record,) = _source_audit_records(running_node)
    assert (record.patient_ids, record.object_ids, record.outcome) == (
        (),
        (instance.study_instance_uid,),
        8,
    )


def test_no_instance_is_sent_when_the_audit_record_cannot_be_spooled(
    running_node: RunningNode, published: scan.Study, monkeypatch: pytest.MonkeyPatch
):
    """DICOM PS3.15 A.5.3.7, RAD TF-3 4.69.5: the audit record is durable
    before the instances leave; without it the answer is a Receiver Fault and
    the request's work files are removed."""
    source = running_node.services.imaging_source

    def full_disk(messages: list[bytes]) -> list[Path]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(source.auditor.spool, "write_all", full_disk)
    instance = published.instances[0]
    request = rad69(
        instance.study_instance_uid,
        instance.series_instance_uid,
        [instance.sop_instance_uid],
        source.repository_unique_id,
        syntaxes=(RLELossless,),
    )

    with pytest.raises(wire.PeerFault) as fault:
        _call(running_node, request)

    assert fault.value.code == "env:Receiver"
    assert not list(source.blobs.spool.glob("rad69@*"))

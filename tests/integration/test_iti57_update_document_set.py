"""ITI-57 Update Document Set at the Document Registry over real sockets.

ITI TF-2 3.57.4.1.3.3.2: an availabilityStatus change of a published imaging
manifest, on SQLite and PostgreSQL, every message through the wiretap and
valid against the official schemas, with entryUUIDs of either letter case
(RFC 4122 3). Each rule test starts from the valid update and breaks one
thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import select

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode, validate_exchanges
from tests.nist_submissions import (
    entry_uuids,
    in_upper_case,
    nist_submission,
    register,
    upper_case_uuid,
)
from xdsi import wire
from xdsi.actors.imaging_source import PublishError
from xdsi.actors.soap_endpoint import transaction
from xdsi.dicom import scan
from xdsi.metadata import ebrim
from xdsi.metadata.build import SubmissionSetSpec, new_oid, status_update_submission
from xdsi.metadata.codes import Code
from xdsi.metadata.responses import read_errors, read_status
from xdsi.store.schema import registry_object

OTHER_PATIENT = PATIENT.replace("XDSI-TEST-1", "XDSI-TEST-2")
APPROVED = ebrim.STATUS_APPROVED
DEPRECATED = ebrim.STATUS_DEPRECATED
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"


def _publish(node: RunningNode) -> str:
    """Publish the MR study; return its manifest's entryUUID."""
    assert "MSA|AA" in node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    node.services.imaging_source.publish(study, PATIENT)
    manifest = node.services.imaging_source.current_manifest(study.study_instance_uid)
    assert manifest is not None
    return str(manifest.entry_uuid)


def _update(
    node: RunningNode,
    tmp_path: Path,
    target: str,
    *,
    original: str = APPROVED,
    new: str = DEPRECATED,
    patient_id: str = PATIENT,
) -> tuple[str, list[str], str]:
    """Send one ITI-57 through the registry's wiretap; return the status,
    the error codes and the SubmissionSet's uniqueId."""
    cfg = node.settings.imaging_source
    submission_set = SubmissionSetSpec(
        entry_id="SubmissionSet01",
        unique_id=new_oid(),
        source_id=cfg.source_id,
        patient_id=patient_id,
        content_type_code=Code(*cfg.content_type_code),
        author_institution=cfg.institution_name,
        submission_time="20260102030405",
    )
    request = status_update_submission(submission_set, target, original, new)
    client = wire.SoapClient(node.taps["registry"].url, spool_dir=tmp_path)
    with client.call(transaction("ITI-57")["request_action"], request) as reply:
        assert reply.action == transaction("ITI-57")["response_action"]
        status = read_status(reply.body)
        codes = [e.code for e in read_errors(reply.body)]
    return status, codes, submission_set.unique_id


def _status(node: RunningNode, entry_uuid: str) -> tuple[str, str]:
    """The status column and the stored XML's status attribute."""
    with node.services.engine.connect() as conn:
        row = conn.execute(
            select(registry_object.c.status, registry_object.c.xml).where(
                registry_object.c.entry_uuid == entry_uuid
            )
        ).one()
    return row.status, etree.fromstring(row.xml).get("status")


def _registered(node: RunningNode, unique_id: str) -> bool:
    with node.services.engine.connect() as conn:
        return (
            conn.execute(
                select(registry_object.c.entry_uuid).where(
                    registry_object.c.unique_id == unique_id
                )
            ).first()
            is not None
        )


def test_update_deprecates_the_manifest_and_find_documents_skips_it(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: Approved to Deprecated, registered whole."""
    entry_uuid = _publish(running_node)

    status, codes, ss_unique_id = _update(running_node, tmp_path, entry_uuid)

    assert (status, codes) == (SUCCESS, [])
    assert _status(running_node, entry_uuid) == (DEPRECATED, DEPRECATED)
    assert _registered(running_node, ss_unique_id)
    consumer = running_node.services.consumer
    assert consumer.find(PATIENT) == []
    deprecated = consumer.find(PATIENT, statuses=(DEPRECATED,))
    assert [e.entry_uuid for e in deprecated] == [entry_uuid]
    assert validate_exchanges(running_node.taps, tmp_path / "spool") > 0


def test_deprecated_manifest_can_be_approved_again(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: Deprecated to Approved restores the entry."""
    entry_uuid = _publish(running_node)
    assert _update(running_node, tmp_path, entry_uuid)[0] == SUCCESS

    status, codes, _ = _update(
        running_node, tmp_path, entry_uuid, original=DEPRECATED, new=APPROVED
    )

    assert (status, codes) == (SUCCESS, [])
    assert _status(running_node, entry_uuid) == (APPROVED, APPROVED)
    found = running_node.services.consumer.find(PATIENT)
    assert [e.entry_uuid for e in found] == [entry_uuid]


@pytest.mark.parametrize(
    "registered_in_upper_case",
    [True, False],
    ids=["upper-then-lower", "lower-then-upper"],
)
def test_update_names_the_document_entry_in_either_case(
    running_node: RunningNode, tmp_path: Path, registered_in_upper_case: bool
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2, RFC 4122 3: the targetObject finds the
    DocumentEntry whatever the letter case of its entryUUID in the ITI-42
    and in the ITI-57."""
    assert "MSA|AA" in running_node.feed()
    request = nist_submission("iti42-12346-single_doc", {"$patientid$": PATIENT})
    entry_uuid = entry_uuids(request)["Document01"]
    if registered_in_upper_case:
        in_upper_case(request)
    url = running_node.settings.url("registry")
    assert read_status(register(url, request)) == SUCCESS
    target = entry_uuid if registered_in_upper_case else upper_case_uuid(entry_uuid)

    status, codes, _ = _update(running_node, tmp_path, target)

    assert (status, codes) == (SUCCESS, [])
    assert _status(running_node, entry_uuid) == (DEPRECATED, DEPRECATED)
    assert validate_exchanges(running_node.taps, tmp_path / "spool") > 0


def _submission_set_entry_uuid(node: RunningNode) -> str:
    with node.services.engine.connect() as conn:
        return str(
            conn.execute(
                select(registry_object.c.entry_uuid).where(
                    registry_object.c.kind == ebrim.SUBMISSION_SET
                )
            ).scalar_one()
        )


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("wrong-original-status", "XDSMetadataUpdateError"),
        ("unknown-target", "XDSMetadataUpdateError"),
        ("other-patient", "XDSPatientIdDoesNotMatch"),
        ("not-a-document-entry", "XDSMetadataUpdateError"),
    ],
)
def test_refused_update_changes_nothing(
    running_node: RunningNode, tmp_path: Path, case: str, code: str
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2, ITI TF-3 Table 4.2.4.1-2: the error, and the
    Document Registry as it was."""
    entry_uuid = _publish(running_node)
    target, original, patient_id = entry_uuid, APPROVED, PATIENT
    if case == "wrong-original-status":
        original = DEPRECATED
    elif case == "unknown-target":
        target = ebrim.new_uuid()
    elif case == "other-patient":
        assert "MSA|AA" in running_node.feed(OTHER_PATIENT)
        patient_id = OTHER_PATIENT
    else:
        target = _submission_set_entry_uuid(running_node)

    status, codes, ss_unique_id = _update(
        running_node,
        tmp_path,
        target,
        original=original,
        new=APPROVED if original == DEPRECATED else DEPRECATED,
        patient_id=patient_id,
    )

    assert (status, codes) == (FAILURE, [code])
    assert _status(running_node, entry_uuid) == (APPROVED, APPROVED)
    assert not _registered(running_node, ss_unique_id)
    assert validate_exchanges(running_node.taps, tmp_path / "spool") > 0


def test_update_is_audited_by_the_registry(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.57.5.1: the Document Registry records an Import."""
    entry_uuid = _publish(running_node)
    _update(running_node, tmp_path, entry_uuid)

    records = list(running_node.services.audit_spool.records())

    assert all(r.valid for r in records)
    assert ("ITI-57", "Import") in [(r.event_type, r.event_id.display) for r in records]


def test_manifest_stays_current_while_the_registry_refuses_its_deprecation(
    running_node: RunningNode,
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: an ITI-57 the registry refuses while the
    entry is still Approved (here XDSPatientIdDoesNotMatch) leaves the
    manifest current, so that the withdrawal is retried."""
    entry_uuid = _publish(running_node)
    assert "MSA|AA" in running_node.feed(OTHER_PATIENT)
    source = running_node.services.imaging_source
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    manifest = source.current_manifest(study.study_instance_uid)

    with pytest.raises(PublishError, match="XDSPatientIdDoesNotMatch"):
        source.withdraw(manifest, OTHER_PATIENT)
    assert source.current_manifest(study.study_instance_uid) is not None
    assert _status(running_node, entry_uuid) == (APPROVED, APPROVED)


def test_manifest_is_withdrawn_once_the_registry_holds_it_deprecated(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.57.4.1.3.3.2: the Imaging Document Source withdraws its
    manifest when its ITI-57 deprecates the entry, and also when that ITI-57
    is refused because the entry is Deprecated already (another Document
    Administrator's update, or its own whose answer was lost): asked
    (ITI-18 GetDocuments), the registry says so."""
    entry_uuid = _publish(running_node)
    source = running_node.services.imaging_source
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    manifest = source.current_manifest(study.study_instance_uid)
    assert _update(running_node, tmp_path, entry_uuid)[0] == SUCCESS

    source.withdraw(manifest, PATIENT)
    assert source.current_manifest(study.study_instance_uid) is None
    assert _status(running_node, entry_uuid) == (DEPRECATED, DEPRECATED)
    records = list(running_node.services.audit_spool.records())
    exports = [
        r for r in records if (r.event_type, r.event_id.display) == ("ITI-57", "Export")
    ]
    # The refused ITI-57 is audited as such.
    assert exports and exports[-1].outcome != 0
    assert validate_exchanges(running_node.taps, tmp_path / "spool") > 0


def test_a_study_whose_manifest_another_deprecated_is_published_anew(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-3 4.2.2.2.3: a manifest another Document Administrator
    deprecated cannot be replaced (XDSRegistryDeprecatedDocumentError); the
    study's next publication is a new manifest, not a replacement retried
    for ever."""
    entry_uuid = _publish(running_node)
    source = running_node.services.imaging_source
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    assert _update(running_node, tmp_path, entry_uuid)[0] == SUCCESS

    published = source.republish(study.study_instance_uid, PATIENT)

    assert published is not None and published.replaced is None
    current = source.current_manifest(study.study_instance_uid)
    assert current is not None and current.entry_uuid != entry_uuid
    assert _status(running_node, current.entry_uuid) == (APPROVED, APPROVED)
    assert _status(running_node, entry_uuid) == (DEPRECATED, DEPRECATED)

"""The Imaging Document Consumer names folders and files after what its
peers send (uniqueIds from ITI-18, UIDs in a manifest from ITI-43): nothing
a peer sends may put a file or folder outside the fetch's output folder,
and a DICOM document that is not a manifest is skipped with its reason."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from werkzeug.wrappers import Response

from tests.conftest import dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.integration.registry_relay import ITI_18, Relay
from xdsi.actors.consumer import Consumer, ConsumerError, FetchResult
from xdsi.actors.document_source import DocumentSource
from xdsi.dicom import kos, scan


class RewritingRelay(Relay):
    """A registry (through a relay) whose ITI-18 answers have ``old``
    replaced by ``new``."""

    def __init__(self, old: bytes, new: bytes) -> None:
        self.old, self.new = old, new
        super().__init__()

    def answer(self, body: bytes, content_type: str) -> Response:
        answer = self.forward(body, content_type)
        if ITI_18 in content_type:
            answer.set_data(answer.get_data().replace(self.old, self.new))
        return answer


def _publish_mr(node: RunningNode) -> scan.Study:
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    node.services.imaging_source.publish(study, PATIENT)
    return study


def _rogue_manifest(node: RunningNode, study: scan.Study, path: Path) -> Path:
    """A manifest of ``study`` whose evidence names its study as a path."""
    manifest = kos.build_manifest(
        study,
        retrieve_ae_title="ROGUE",
        retrieve_location_uid=node.settings.imaging_source.repository_unique_id,
    )
    evidence = manifest.CurrentRequestedProcedureEvidenceSequence[0]
    with warnings.catch_warnings():
        # pydicom warns of the invalid UI value; it is the point.
        warnings.simplefilter("ignore")
        evidence.StudyInstanceUID = "../../escaped"
    kos.write_manifest(manifest, path)
    return path


def test_a_manifest_naming_a_path_is_skipped_and_writes_nothing_outside(
    running_node: RunningNode, tmp_path: Path
):
    """RAD TF-3 4.68.4.1.2 and DICOM PS3.5 9.1: the evidence's UIDs are
    digits and dots; one that is "../../escaped" would have had the
    Consumer make folders two levels above its output."""
    assert "MSA|AA" in running_node.feed()
    study = _publish_mr(running_node)
    rogue = _rogue_manifest(running_node, study, tmp_path / "rogue.dcm")
    DocumentSource(running_node.settings, tmp_path / "source-spool").submit(
        [rogue], PATIENT, mime_type="application/dicom"
    )
    # The node keeps its own files under tmp_path; the fetch's are all here.
    fetched = tmp_path / "fetched"
    out = fetched / "a" / "b" / "out"

    result = running_node.services.consumer.fetch(PATIENT, out)

    assert len(result.manifests) == 1
    assert len(result.instances) == len(study.instances)
    ((_, reason),) = result.skipped
    assert "StudyInstanceUID '../../escaped' is not a UID" in reason
    made = set(fetched.rglob("*"))
    assert all(out in path.parents for path in made - set(out.parents) - {out})
    assert not any("escaped" in str(path) for path in made)
    assert [p.name for p in (out / "manifests").iterdir()] == [result.manifests[0].name]


def test_a_dicom_document_that_is_no_manifest_is_skipped_with_its_reason(
    running_node: RunningNode, tmp_path: Path
):
    """A patient's images shared as plain documents (application/dicom) are
    not manifests (RAD TF-3 4.68.4.1.2); the fetch goes on without them."""
    assert "MSA|AA" in running_node.feed()
    study = _publish_mr(running_node)
    DocumentSource(running_node.settings, tmp_path / "source-spool").submit(
        [study.instances[0].path], PATIENT, mime_type="application/dicom"
    )

    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert len(result.manifests) == 1
    assert len(result.instances) == len(study.instances)
    ((_, reason),) = result.skipped
    assert "is not Key Object Selection Document Storage" in reason
    assert len(list((tmp_path / "out" / "manifests").iterdir())) == 1


def test_a_unique_id_naming_a_path_is_not_used_as_a_file_name(
    running_node: RunningNode, tmp_path: Path
):
    """A registry answer (ITI-18) whose uniqueId is a path: the manifest's
    file would be named after it, so the entry is not retrieved, a failure
    of that manifest (it may be one), not a document skipped as no
    manifest."""
    assert "MSA|AA" in running_node.feed()
    _publish_mr(running_node)
    (entry,) = running_node.services.consumer.find(PATIENT)
    relay = RewritingRelay(entry.unique_id.encode(), b"../../../escaped")
    try:
        relay.target = running_node.settings.consumer_registry_url
        settings = running_node.settings
        consumer = Consumer(
            replace(
                settings, consumer=replace(settings.consumer, registry_url=relay.url)
            ),
            running_node.services.consumer.auditor,
        )
        fetched = tmp_path / "fetched"

        result = consumer.fetch(PATIENT, fetched / "a" / "b" / "out")
    finally:
        relay.close()

    assert not result.manifests and not result.instances
    assert not result.skipped
    assert result.failed == [
        (
            "manifest ../../../escaped",
            "not retrieved: its uniqueId cannot name a file",
        )
    ]
    assert not any("escaped" in str(path) for path in fetched.rglob("*"))


def test_a_failed_retrieve_quotes_a_few_errors_and_counts_the_rest(
    running_node: RunningNode, tmp_path: Path
):
    """A RAD-69 refused for every one of 36 instances: the message a user
    reads names the first errors and counts the others, not all 36."""
    assert "MSA|AA" in running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    # Referenced at this Imaging Document Source, never published there.
    manifest = kos.parse_manifest(
        kos.build_manifest(
            study,
            retrieve_ae_title="XDSI",
            retrieve_location_uid=(
                running_node.settings.imaging_source.repository_unique_id
            ),
        )
    )

    with pytest.raises(ConsumerError) as failed:
        running_node.services.consumer.retrieve_images(
            manifest, tmp_path / "out", FetchResult(), PATIENT
        )

    assert len(failed.value.errors) == len(study.instances) == 36
    message = str(failed.value)
    assert message.startswith("RAD-69 for 1 study failed: ")
    assert message.count("XDSDocumentUniqueIdError") == 3
    assert message.endswith("; and 33 more errors")

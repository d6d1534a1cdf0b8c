"""The XDS-I.b chain over real sockets: ITI-8, RAD-68, ITI-42, ITI-18, ITI-43,
RAD-69, with every message validated against the official schemas."""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections import defaultdict

from sqlalchemy import func, select

from tests.conftest import dicom_path, require_program
from tests.integration.conftest import PATIENT, RunningNode, validate_exchanges
from xdsi.actors import consumer as consumer_module
from xdsi.dicom import kos, scan
from xdsi.store.schema import registry_object, repository_document


def _sha256(path) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mr_study_comes_back_byte_identical(running_node: RunningNode, tmp_path):
    """RAD TF-3 4.68, 4.69: what was published is what a consumer retrieves."""
    assert "MSA|AA" in running_node.feed()
    images = dicom_path("study-mr", "images")
    (study,) = scan.scan_directory(images).studies

    published = running_node.services.imaging_source.publish(study, PATIENT)
    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert published.instances == 36
    assert len(result.manifests) == 1
    assert not result.missing
    got = {p.stem: _sha256(p) for p in result.instances}
    assert got == {h.sop_instance_uid: _sha256(h.path) for h in study.instances}
    for path in result.instances:
        assert path.parent.parent.name == study.study_instance_uid
    # Answers are spooled inside the output directory and renamed into
    # place; nothing of the spool is left.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["manifests", study.study_instance_uid]
    )


def test_a_study_of_more_instances_than_a_batch_comes_in_several_rad69(
    running_node: RunningNode, tmp_path, monkeypatch
):
    """The Consumer asks for RAD69_BATCH instances at most a RAD-69, so that
    a source re-encoding a large study answers each request in bounded
    time; the 36 instances of the MR's two series, ten a request, come back
    whole, a series split across requests."""
    monkeypatch.setattr(consumer_module, "RAD69_BATCH", 10)
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)

    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert not result.missing and not result.failed
    got = {p.stem: _sha256(p) for p in result.instances}
    assert got == {h.sop_instance_uid: _sha256(h.path) for h in study.instances}
    assert len(running_node.taps["imaging_source"].exchanges) == 4
    assert validate_exchanges(running_node.taps, tmp_path / "spool") == 16


def test_every_message_of_the_chain_is_schema_valid(
    running_node: RunningNode, tmp_path
):
    """ITI TF-2 3.18, 3.41, 3.42, 3.43, RAD TF-3 4.69: bodies valid against
    the official XSDs, envelopes against SOAP 1.2 and WS-Addressing."""
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)
    running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    transactions = {name: len(tap.exchanges) for name, tap in running_node.taps.items()}
    # ITI-42 and ITI-18 at the registry, RAD-68 and ITI-43 at the repository,
    # one RAD-69 naming both series at the imaging source.
    assert transactions == {"registry": 2, "repository": 2, "imaging_source": 1}
    assert validate_exchanges(running_node.taps, tmp_path / "spool") == 10


def test_manifest_references_the_reference_kos_instances(
    running_node: RunningNode, tmp_path
):
    """RAD TF-3 4.68.4.1.2: the KOS lists the same instances per series as the
    IHE reference manifest of the study, and dciodvfy finds no error."""
    dciodvfy = require_program("dciodvfy")
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)
    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")
    ours = kos.parse_manifest(result.manifests[0])
    reference = kos.parse_manifest(dicom_path("study-mr", "manifest", "kos.dcm"))

    def per_series(manifest: kos.Manifest) -> dict[str, set[str]]:
        series: dict[str, set[str]] = defaultdict(set)
        for ref in manifest.references:
            series[ref.series_instance_uid].add(ref.sop_instance_uid)
        return dict(series)

    assert per_series(ours) == per_series(reference)
    settings = running_node.settings
    assert {r.retrieve_location_uid for r in ours.references} == {
        settings.imaging_source.repository_unique_id
    }
    report = subprocess.run(
        [dciodvfy, str(result.manifests[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [
        line
        for line in (report.stdout + report.stderr).splitlines()
        if line.startswith("Error")
    ]
    assert errors == []


def test_submission_for_unknown_patient_leaves_no_trace(running_node: RunningNode):
    """ITI TF-3 Table 4.2.4.1-2 XDSUnknownPatientId; ITI TF-2 3.41.4.1.3: the
    repository keeps nothing of a submission the registry refused."""
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    from xdsi.actors.imaging_source import PublishError

    try:
        running_node.services.imaging_source.publish(study, PATIENT)
    except PublishError as exc:
        assert [e.code for e in exc.errors] == ["XDSUnknownPatientId"]
    else:
        raise AssertionError("a submission for an unfed patient was accepted")

    with running_node.services.engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(registry_object)).scalar()
            == 0
        )
        assert (
            conn.execute(select(func.count()).select_from(repository_document)).scalar()
            == 0
        )
    blobs = running_node.services.repository.blobs.root
    assert [p for p in blobs.rglob("*") if p.is_file()] == []


def test_audit_trail_has_every_transaction(running_node: RunningNode, tmp_path):
    """ITI TF-2 3.20: each actor audits each transaction it plays."""
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)
    running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    records = list(running_node.services.audit_spool.records())
    assert all(r.valid for r in records)
    # RAD-68 is audited by the source (Export) and the repository (Import);
    # ITI-42 by the repository (Export) and the registry (Import).
    events = [(r.event_type, r.event_id.display) for r in records]
    for expected in (
        ("RAD-68", "Export"),
        ("RAD-68", "Import"),
        ("ITI-42", "Export"),
        ("ITI-42", "Import"),
        ("ITI-18", "Query"),
        ("ITI-43", "Export"),
        ("ITI-43", "Import"),
        ("RAD-69", "DICOM Instances Transferred"),
    ):
        assert expected in events, expected


def test_no_patient_data_in_logs_at_info(running_node: RunningNode, tmp_path, caplog):
    """No patient id or name at INFO or above; that belongs in the audit trail."""
    caplog.set_level(logging.INFO)
    running_node.feed()
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    running_node.services.imaging_source.publish(study, PATIENT)
    running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    text = "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
    )
    assert "RAD-68" in text and "ITI-42" in text
    for secret in (
        "XDSI-TEST-1",
        study.patient.patient_id,
        study.patient.name,
        study.accession_number,
    ):
        if secret:
            assert secret not in text

"""The node's storage holds patient data (images, documents, the database):
a storage folder the node makes is its user's alone, every kept instance is
readable by that user alone whichever way it came in, and a node serving
from a folder other users can read says so."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from tests.conftest import dicom_path
from xdsi.app import Node, build_services
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message


def _settings(storage: Path) -> Settings:
    return (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _kept(storage: Path) -> list[Path]:
    root = storage / "imaging-source"
    return [p for p in root.rglob("*") if p.is_file() and ".spool" not in p.parts]


def test_a_storage_folder_the_node_makes_is_its_users_alone(tmp_path: Path):
    storage = tmp_path / "new" / "storage"
    services = build_services(_settings(storage))
    services.engine.dispose()

    assert _mode(storage) == 0o700


def test_instances_kept_by_import_or_publish_are_the_users_alone(tmp_path: Path):
    """Import copies each file privately, and publishing keeps a study's
    instances by copying: neither follows the umask (022 leaves 0644, which
    any user of the host can read)."""
    storage = tmp_path / "storage"
    services = build_services(_settings(storage))
    images = dicom_path("study-mr", "images")
    imported = services.intake.import_folder(images)
    assert imported.accepted
    (ct,) = scan.scan_directory(dicom_path("study-ct")).studies
    services.imaging_source.keep_instances(ct, "PAT-1^^^&1.2.3&ISO")
    services.engine.dispose()

    kept = _kept(storage)
    assert len(kept) == len(imported.accepted) + len(ct.instances)
    assert {oct(_mode(p)) for p in kept} == {oct(0o600)}


def test_a_node_serving_from_a_folder_others_can_read_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755)
    storage.chmod(0o755)

    with caplog.at_level(logging.WARNING, logger="xdsi.app"), Node(_settings(storage)):
        pass

    (warning,) = [r for r in caplog.records if "storage_dir" in r.getMessage()]
    assert "can be read by other users of this host (mode 755)" in (
        warning.getMessage()
    )
    assert "chmod 700" in warning.getMessage()


def test_a_storage_folder_a_serving_node_makes_is_its_users_alone(tmp_path: Path):
    storage = tmp_path / "new" / "storage"

    with Node(_settings(storage)):
        pass

    assert _mode(storage) == 0o700


def test_documents_the_repository_keeps_are_the_users_alone(tmp_path: Path):
    """A manifest comes into the Document Repository as an MTOM part spooled
    by the HTTP server (0644 under umask 022); the kept document names the
    patient, so it is the user's alone like every kept instance."""
    storage = tmp_path / "storage"
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    patient = "XDSI-TEST-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"

    node = Node(_settings(storage))
    effective = node.start()
    try:
        assert node.services is not None
        ack = send_message(
            effective.node.host, effective.registry.feed_port, build_feed(patient)
        )
        assert "MSA|AA" in ack
        node.services.imaging_source.publish(study, patient)
    finally:
        node.stop()

    root = storage / "repository"
    kept = [p for p in root.rglob("*") if p.is_file() and ".spool" not in p.parts]
    assert kept
    assert {oct(_mode(p)) for p in kept} == {oct(0o600)}


def test_a_new_sqlite_database_and_its_journal_are_the_users_alone(tmp_path: Path):
    """The database names every patient: made by the node, it and the
    write-ahead log beside it are readable by the node's user alone."""
    storage = tmp_path / "storage"
    services = build_services(_settings(storage))
    with services.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE probe (x)")

    database = storage / "xdsi.sqlite"
    assert _mode(database) == 0o600
    assert _mode(storage / "xdsi.sqlite-wal") == 0o600
    services.engine.dispose()

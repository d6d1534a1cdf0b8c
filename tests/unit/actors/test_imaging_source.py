"""Keeping a study's instances in the Imaging Document Source's store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from xdsi.actors.imaging_source import PublishError
from xdsi.app import build_services
from xdsi.cli import bundled_study
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.store.schema import imaging_instance


def test_a_file_gone_since_the_scan_keeps_nothing(tmp_path: Path) -> None:
    """A study whose file vanished between scan and publish is refused
    whole: no stored copy and no instance row is left (RAD TF-3 4.68)."""
    copy = tmp_path / "study"
    shutil.copytree(bundled_study(), copy)
    (study,) = scan.scan_directory(copy).studies
    gone = study.instances[30].path
    gone.unlink()
    services = build_services(Settings().with_storage(tmp_path / "node"))

    with pytest.raises(PublishError, match=f"cannot keep {gone}"):
        services.imaging_source.publish(study, "PAT-1^^^&1.2.3&ISO")

    stored = services.imaging_source.blobs.root
    assert [p for p in stored.rglob("*") if p.is_file()] == []
    with services.engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(imaging_instance)).scalar()
            == 0
        )
    services.engine.dispose()


def test_a_file_cut_short_since_the_scan_keeps_nothing(tmp_path: Path) -> None:
    """A file truncated after its header was read (a copy still being
    written, say) is not the instance the manifest would describe: the
    study is refused whole."""
    copy = tmp_path / "study"
    shutil.copytree(bundled_study(), copy)
    (study,) = scan.scan_directory(copy).studies
    cut = study.instances[7].path
    cut.write_bytes(cut.read_bytes()[:200_000])
    services = build_services(Settings().with_storage(tmp_path / "node"))

    with pytest.raises(PublishError, match=f"cannot keep {cut}: it changed"):
        services.imaging_source.publish(study, "PAT-1^^^&1.2.3&ISO")

    stored = services.imaging_source.blobs.root
    assert [p for p in stored.rglob("*") if p.is_file()] == []
    services.engine.dispose()

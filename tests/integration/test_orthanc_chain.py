"""Orthanc to xdsi to Orthanc: a PACS sends a study by C-STORE, the Imaging
Document Source publishes it when quiet, and a consumer's ``xdsi fetch
--to-pacs`` stores every instance into a second PACS, unchanged.

Runs only in a private network namespace with only lo (tests/integration/
orthanc_peer.py); ``dev.py test`` and ``.ci/run`` run pytest in one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from tests.conftest import dicom_path, require
from tests.integration.orthanc_peer import Orthanc, orthanc, require_private_netns
from xdsi.app import Node
from xdsi.cli import main
from xdsi.config import Settings, to_toml
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import imaging_manifest

ASSIGNING_AUTHORITY = Settings().node.assigning_authority
PATIENT = f"IDS-DEPT002-a^^^&{ASSIGNING_AUTHORITY}&ISO"
# Fixed ports are safe: the namespace is private to this test run.
SENDER = ("ORTHANCA", 14242, 18042)
RECEIVER = ("ORTHANCB", 14243, 18043)
XDSI_DICOM_PORT = 11112


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    require_private_netns()
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        imaging_source=replace(
            settings.imaging_source,
            store_scp=True,
            dicom_port=XDSI_DICOM_PORT,
            publish_after=2.0,
        ),
    )
    running = Node(settings)
    effective = running.start()
    send_message(effective.node.host, effective.registry.feed_port, build_feed(PATIENT))
    yield running
    running.stop()


def _data_set_bytes(data: bytes) -> bytes:
    """The bytes after the File Meta Information (DICOM PS3.10 7.1)."""
    length = int.from_bytes(data[140:144], "little")
    return data[144 + length :]


def _published(node: Node) -> bool:
    assert node.services is not None
    with node.services.engine.connect() as conn:
        # A pending manifest is on its way to the registry, not yet shared.
        return (
            conn.execute(
                imaging_manifest.select().where(imaging_manifest.c.status == "current")
            ).first()
            is not None
        )


def test_orthanc_study_reaches_a_second_orthanc_byte_identical(
    node: Node, tmp_path: Path
) -> None:
    """RAD TF-3 4.68, 4.69, DICOM PS3.4 B: every instance the first Orthanc
    holds arrives in the second Orthanc with the same data set bytes.

    Orthanc's C-STORE writes sequences and items with explicit lengths, so a
    file with undefined lengths leaves it re-encoded. The study is given to
    the first Orthanc in that encoding (dcmtk's dcmconv +e, which keeps every
    value), so that what it holds and what it sends are the same bytes.
    """
    require("program dcmconv (dcmtk)", shutil.which("dcmconv") is not None)
    shared = sorted(dicom_path("study-mr", "images").iterdir())
    (tmp_path / "explicit").mkdir()
    images = [tmp_path / "explicit" / p.name for p in shared]
    for source, target in zip(shared, images, strict=True):
        subprocess.run(["dcmconv", "+e", str(source), str(target)], check=True)
    settings = node.settings
    xdsi_ae = ("XDSI", "127.0.0.1", XDSI_DICOM_PORT)
    with (
        orthanc(tmp_path / "a", *SENDER, {"xdsi": xdsi_ae}) as sender,
        orthanc(tmp_path / "b", *RECEIVER, {}) as receiver,
    ):
        ids = [sender.post("/instances", p.read_bytes()).json()["ID"] for p in images]
        sender.post("/modalities/xdsi/store", ids)

        deadline = time.monotonic() + 60
        while not _published(node):
            assert time.monotonic() < deadline, "the study was not published"
            time.sleep(0.5)

        config = tmp_path / "consumer.toml"
        config.write_text(to_toml(settings))
        outcome = CliRunner().invoke(
            main,
            [
                "--config",
                str(config),
                "fetch",
                "--patient-id",
                PATIENT,
                "--out",
                str(tmp_path / "out"),
                "--to-pacs",
                f"{RECEIVER[0]}@127.0.0.1:{RECEIVER[1]}",
            ],
        )
        assert outcome.exit_code == 0, outcome.output
        received = _instances(receiver)
    # DICOM PS3.15 A.5.3.7: the Consumer audits what it sent the PACS.
    (sent_record,) = [
        record
        for record in node.services.audit_spool.records()
        if record.event_id is not None
        and record.event_id.code == "110104"
        and RECEIVER[0] in record.actor_user_ids
    ]
    assert sent_record.valid and sent_record.outcome == 0
    assert PATIENT in sent_record.patient_ids

    fetched = {
        p.stem: p.read_bytes()
        for p in (tmp_path / "out").rglob("*.dcm")
        if p.parent.name != "manifests"
    }
    sent = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in images
    }
    originals = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in shared
    }
    assert set(received) == set(sent) == set(fetched)
    for uid, data in received.items():
        held = _data_set_bytes(sent[uid].read_bytes())
        assert _data_set_bytes(data) == held, uid
        assert _data_set_bytes(fetched[uid]) == held, uid
        got = pydicom.dcmread(BytesIO(data))
        assert got.PixelData == pydicom.dcmread(originals[uid]).PixelData, uid


def _instances(peer: Orthanc) -> dict[str, bytes]:
    """Every instance the Orthanc holds, by SOP Instance UID, as stored."""
    got = {}
    for instance_id in peer.get("/instances").json():
        uid = peer.get(f"/instances/{instance_id}/simplified-tags").json()[
            "SOPInstanceUID"
        ]
        got[uid] = peer.get(f"/instances/{instance_id}/file").content
    return got

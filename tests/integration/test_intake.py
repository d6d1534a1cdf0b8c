"""Imaging Document Source intake over real sockets: C-STORE, STOW-RS and
import into the store, auto-publishing, and the manifest's lifecycle."""

from __future__ import annotations

import gzip
import http.client
import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from click.testing import CliRunner, Result
from lxml import etree
from pydicom.fileset import FileSet
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification
from sqlalchemy import Row, func, select, update

from tests.conftest import SHARED, assert_native_dicom_model, dicom_path, shared_path
from tests.integration.conftest import RunningNode
from tests.spooling import left_by_killed_process, spooling
from tests.unit.dicom.test_check import MANY, empty_items, with_sequence
from xdsi.actors import imaging_source as imaging_source_module
from xdsi.actors import intake as intake_module
from xdsi.actors import store_scp as store_scp_module
from xdsi.actors import stow
from xdsi.actors.imaging_source import (
    MANIFEST_CURRENT,
    MANIFEST_PENDING,
    MANIFEST_REPLACED,
)
from xdsi.actors.provide import SubmitError
from xdsi.app import Node
from xdsi.cli import EXIT_DAMAGED, bundled_study, main
from xdsi.config import ConfigError, Settings, to_toml
from xdsi.dicom import check, kos, scan
from xdsi.dicom.check import refusal_table
from xdsi.dicom.store_scu import (
    SUCCESS,
    Destination,
    SendResult,
    StoreScuError,
    send_files,
)
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.metadata.ebrim import STATUS_APPROVED, STATUS_DEPRECATED
from xdsi.metadata.responses import RegistryError
from xdsi.store import blobs
from xdsi.store.schema import (
    imaging_instance,
    imaging_manifest,
    imaging_study,
    registry_object,
)

ASSIGNING_AUTHORITY = Settings().node.assigning_authority
MR_PATIENT = f"IDS-DEPT002-a^^^&{ASSIGNING_AUTHORITY}&ISO"
DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"


def _started(
    tmp_path: Path, node: dict[str, Any] | None = None, **imaging_source: object
) -> Iterator[RunningNode]:
    """A node with the MR study's patient fed, ``imaging_source`` set and
    ``node`` settings, if given."""
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        node=replace(settings.node, **(node or {})),
        imaging_source=replace(settings.imaging_source, **imaging_source),
    )
    node = Node(settings)
    effective = node.start()
    assert node.services is not None
    send_message(
        effective.node.host, effective.registry.feed_port, build_feed(MR_PATIENT)
    )
    yield RunningNode(node, effective, node.services, {})
    node.stop()


@pytest.fixture
def intake_node(tmp_path: Path) -> Iterator[RunningNode]:
    """A node with its C-STORE SCP on and a one-second quiet time."""
    yield from _started(tmp_path, store_scp=True, dicom_port=0, publish_after=1.0)


def _scp(node: RunningNode) -> Destination:
    cfg = node.settings.imaging_source
    return Destination(cfg.ae_title, node.settings.node.host, cfg.dicom_port)


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _manifests(node: RunningNode, *, pending: bool = False) -> list[Row]:
    """The study manifests noted, oldest first; those whose registration is
    still under way (pending) only when asked for."""
    query = select(imaging_manifest).order_by(imaging_manifest.c.created_at)
    if not pending:
        query = query.where(imaging_manifest.c.status != MANIFEST_PENDING)
    with node.services.engine.connect() as conn:
        return conn.execute(query).all()


def _held(node: RunningNode) -> dict[str, Path]:
    with node.services.engine.connect() as conn:
        rows = conn.execute(select(imaging_instance)).all()
    return {
        r.sop_instance_uid: node.services.imaging_source.blobs.path(r.blob)
        for r in rows
    }


def _data_set_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information (DICOM PS3.10 7.1)."""
    data = path.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(path)
    group_length = int(meta.FileMetaInformationGroupLength)
    return data[132 + 12 + group_length :]


def _registry_status(node: RunningNode, unique_id: str) -> str:
    with node.services.engine.connect() as conn:
        return conn.execute(
            select(registry_object.c.status).where(
                registry_object.c.unique_id == unique_id
            )
        ).scalar_one()


def test_cstore_study_is_published_once_quiet(intake_node: RunningNode) -> None:
    """RAD TF-3 4.68: a study sent by C-STORE is published when quiet, and its
    manifest references every instance received."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    sent = send_files(images, _scp(intake_node), calling_ae_title="TESTSCU")

    assert set(sent.statuses.values()) == {SUCCESS}
    _wait(lambda: len(_manifests(intake_node)) == 1)
    (row,) = _manifests(intake_node)
    manifest = kos.parse_manifest(
        intake_node.services.imaging_source.blobs.path(row.blob)
    )
    held = _held(intake_node)
    assert {r.sop_instance_uid for r in manifest.references} == set(held)
    assert len(held) == 36
    assert _registry_status(intake_node, row.sop_instance_uid) == APPROVED


def test_more_instances_replace_the_manifest_with_rplc(
    intake_node: RunningNode,
) -> None:
    """RAD TF-3 4.68.4.1.2.3, ITI TF-3 4.2.2.2: instances arriving after
    publication bring a replacement manifest; the registry deprecates the
    old one."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    send_files(images[:20], _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_manifests(intake_node)) == 1)

    send_files(images[20:], _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_manifests(intake_node)) == 2)

    first, second = _manifests(intake_node)
    assert (first.status, second.status) == (MANIFEST_REPLACED, MANIFEST_CURRENT)
    assert _registry_status(intake_node, first.sop_instance_uid) == DEPRECATED
    assert _registry_status(intake_node, second.sop_instance_uid) == APPROVED
    found = intake_node.services.consumer.find(MR_PATIENT)
    assert [e.unique_id for e in found] == [second.sop_instance_uid]
    manifest = kos.parse_manifest(
        intake_node.services.imaging_source.blobs.path(second.blob)
    )
    assert len(manifest.references) == 36


def test_removed_instances_replace_and_then_withdraw_the_manifest(
    intake_node: RunningNode,
) -> None:
    """RAD TF-3 4.68.4.1.2.3: removing instances replaces the manifest; with
    none left the manifest is withdrawn, deprecated in the Document Registry by
    ITI-57 (ITI TF-2 3.57.4.1.3.3.2) so that ITI-18 no longer finds it."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    send_files(images, _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_manifests(intake_node)) == 1)
    study_uid = pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID
    series_uid = pydicom.dcmread(images[0], stop_before_pixels=True).SeriesInstanceUID
    intake = intake_node.services.intake

    assert intake.remove(study_uid, series_instance_uid=series_uid) == 20
    _wait(lambda: len(_manifests(intake_node)) == 2)
    replacement = _manifests(intake_node)[1]
    manifest = kos.parse_manifest(
        intake_node.services.imaging_source.blobs.path(replacement.blob)
    )
    assert len(manifest.references) == 16

    assert intake.remove(study_uid) == 16
    _wait(lambda: _manifests(intake_node)[1].status == "withdrawn")
    assert _held(intake_node) == {}
    assert _registry_status(intake_node, replacement.sop_instance_uid) == DEPRECATED
    consumer = intake_node.services.consumer
    assert consumer.find(MR_PATIENT) == []
    deprecated = consumer.find(MR_PATIENT, statuses=(DEPRECATED,))
    assert {e.unique_id for e in deprecated} == {
        m.sop_instance_uid for m in _manifests(intake_node)
    }


def test_every_single_round_trips_over_cstore(intake_node: RunningNode) -> None:
    """DICOM PS3.4 B.2.3: every storage SOP Class and transfer syntax of the
    single objects is accepted, and the data set is stored as sent."""
    singles = sorted(dicom_path("singles").iterdir())
    sent = send_files(singles, _scp(intake_node), calling_ae_title="TESTSCU")

    assert sent.unsendable == {}
    assert sent.failed == {}
    # Some singles are one instance in several encodings (same SOP Instance
    # UID); the first received is kept.
    encodings: dict[str, set[bytes]] = {}
    for path in singles:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        encodings.setdefault(uid, set()).add(_data_set_bytes(path))
    held = _held(intake_node)
    assert set(held) == set(encodings)
    for uid, path in held.items():
        assert _data_set_bytes(path) in encodings[uid], uid


def test_an_instance_sent_twice_is_stored_once(intake_node: RunningNode) -> None:
    """DICOM PS3.4 B.2.3: a SOP Instance already held is answered Success and
    kept once."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    first = send_files([path], _scp(intake_node), calling_ae_title="TESTSCU")
    again = send_files([path], _scp(intake_node), calling_ae_title="TESTSCU")

    assert list(first.statuses.values()) == list(again.statuses.values()) == [SUCCESS]
    assert len(_held(intake_node)) == 1


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (SHARED / "dicom" / "bad").glob("*")) or ["none"]
)
def test_bad_files_are_refused_and_nothing_is_stored(
    intake_node: RunningNode, name: str
) -> None:
    """DICOM PS3.4 Table B.2-1, PS3.18 10.5.3: a malformed object is refused
    with an A9xx or Cxxx status over C-STORE and 409 over STOW-RS.

    A file without File Meta cannot be offered by C-STORE at all, and one
    naming no storage SOP Class finds no presentation context (DICOM PS3.8
    9.3.3.2); both are refused over STOW-RS alike."""
    path = dicom_path("bad", name)
    statuses = {int(row["dimse_status"]) for row in refusal_table().values()}
    try:
        sent = send_files([path], _scp(intake_node), calling_ae_title="TESTSCU")
    except StoreScuError:
        sent = SendResult()
    if sent.statuses:
        assert sent.statuses[path] in statuses - {0xA700}

    response = _stow(intake_node, [path.read_bytes()])
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"][0] in {0xA900, 0xC000}
    assert _held(intake_node) == {}


def _stow(node: RunningNode, parts: list[bytes], study: str = "") -> requests.Response:
    boundary = "xdsi-test-boundary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part
            + b"\r\n"
            for part in parts
        )
        + f"--{boundary}--\r\n".encode()
    )
    settings = node.settings
    url = (
        f"http://{settings.node.host}:{settings.imaging_source.port}"
        f"{settings.imaging_source.stow_path}" + (f"/{study}" if study else "")
    )
    return requests.post(
        url,
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; '
            f"boundary={boundary}"
        },
        timeout=60,
    )


def test_stow_rs_stores_instances_and_reports_failures(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.3: 200 when all are stored, 202 when some fail, with
    the Referenced and Failed SOP Sequences."""
    good = dicom_path("singles", "ts-j2k-lossless__CT1_J2KR.dcm")
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")

    first = _stow(intake_node, [good.read_bytes()])
    mixed = _stow(
        intake_node,
        [
            dicom_path("singles", "ts-rle__MR_small_RLE.dcm").read_bytes(),
            bad.read_bytes(),
        ],
    )

    assert first.status_code == 200
    stored = first.json()["00081199"]["Value"][0]
    uid = pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID
    assert stored["00081155"]["Value"] == [uid]
    assert mixed.status_code == 202
    assert mixed.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    held = _held(intake_node)
    assert len(held) == 2
    assert _data_set_bytes(held[uid]) == _data_set_bytes(good)


def test_stow_rs_of_an_instance_held_already_is_logged_as_such(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance sent again is answered as stored (DICOM PS3.18 10.5.3),
    and the request's log line counts it as held already, as the C-STORE
    SCP's does and the audit record's action (R) says, not as stored."""
    good = dicom_path("singles", "ts-rle__MR_small_RLE.dcm").read_bytes()
    _stow(intake_node, [good])

    with caplog.at_level(logging.INFO, logger="xdsi.actors.stow"):
        again = _stow(intake_node, [good])

    assert again.status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "Store Instances" in r.message]
    assert "0 stored, 1 held already, 0 failed" in line


def test_stow_rs_answer_gives_the_wado_rs_urls_of_what_it_stored(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 Table 10.5.3-2: Retrieve URL of the study and of each
    stored instance, a WADO-RS resource (10.4.1) of this node that, once the
    study is published, sends the instance as stored; a failed part has
    none."""
    # Of the MR study, whose patient the node was fed.
    good = sorted(dicom_path("study-mr", "images").iterdir())[0]
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    held = pydicom.dcmread(good, stop_before_pixels=True)

    response = _stow(intake_node, [good.read_bytes(), bad.read_bytes()])

    assert response.status_code == 202
    body = response.json()
    base = intake_node.settings.dicomweb_url
    study_url = f"{base}/studies/{held.StudyInstanceUID}"
    assert body["00081190"] == {"vr": "UR", "Value": [study_url]}
    (stored,) = body["00081199"]["Value"]
    instance_url = (
        f"{study_url}/series/{held.SeriesInstanceUID}/instances/{held.SOPInstanceUID}"
    )
    assert stored["00081190"] == {"vr": "UR", "Value": [instance_url]}
    (failed,) = body["00081198"]["Value"]
    assert "00081190" not in failed

    _wait(lambda: len(_manifests(intake_node)) == 1)
    answer = requests.get(
        instance_url,
        headers={"Accept": "application/dicom; transfer-syntax=*"},
        timeout=60,
    )
    assert answer.status_code == 200
    assert answer.content == good.read_bytes()
    whole = requests.get(
        study_url,
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
        },
        timeout=60,
    )
    assert whole.status_code == 200
    assert good.read_bytes() in whole.content


def test_stow_rs_answer_without_a_stored_instance_has_an_empty_retrieve_url(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 Table 10.5.3-2: Retrieve URL is Type 2; with nothing
    stored there is no study to name."""
    response = _stow(intake_node, [b"not dicom"])

    assert response.status_code == 409
    assert response.json()["00081190"] == {"vr": "UR"}


def test_stow_rs_refuses_an_instance_of_another_study(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.1: an instance not of the study in the URL fails."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    response = _stow(intake_node, [path.read_bytes()], study="1.2.3.4")

    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


@pytest.mark.parametrize(
    "study", ["1.2%0A3", "%00", "abc"], ids=["lf", "nul", "letters"]
)
def test_stow_rs_to_a_study_path_that_is_no_uid_is_a_400_logged_on_one_line(
    intake_node: RunningNode, study: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.18 10.5.1, DICOM PS3.5 9.1: a study path that is no UID
    names no study an instance could belong to; the request is a 400, nothing
    of it is kept, and the path's characters reach no log line raw."""
    path = shared_path("dicom", "singles", "ts-explicit-le__CT_small.dcm")

    with caplog.at_level(logging.INFO):
        response = _stow(intake_node, [path.read_bytes()], study=study)

    assert response.status_code == 400
    assert "not a UID" in response.text
    assert _held(intake_node) == {}
    for record in caplog.records:
        if record.name.startswith("xdsi"):
            assert record.getMessage().isprintable()


def test_stow_rs_escapes_a_part_media_type_in_its_log(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.18 10.5.1.2: a part of another media type fails; the type,
    as the sender wrote it, is logged with its control characters escaped."""
    boundary = "b"
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\x1b[2J\x00\r\n\r\nx\r\n"
        f"--{boundary}--\r\n"
    ).encode("latin-1")

    with caplog.at_level(logging.INFO):
        response = requests.post(
            _stow_url(intake_node),
            data=body,
            headers={
                "Content-Type": 'multipart/related; type="application/dicom"; '
                f"boundary={boundary}"
            },
            timeout=30,
        )

    assert response.status_code == 409
    (refusal,) = [r for r in caplog.records if "part refused" in r.getMessage()]
    assert "text/plain\\x1b[2J\\x00" in refusal.getMessage()


def test_stow_rs_refuses_other_media_types(intake_node: RunningNode) -> None:
    """DICOM PS3.18 10.5.1.2: a body not multipart/related DICOM gets 415."""
    settings = intake_node.settings
    url = (
        f"http://{settings.node.host}:{settings.imaging_source.port}"
        f"{settings.imaging_source.stow_path}"
    )
    response = requests.post(
        url, data=b"{}", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 415


def test_stow_rs_refuses_a_content_coding_with_415_and_keeps_nothing(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 Table 10.5.3-1, RFC 9110 15.5.16: a body in a content
    coding the origin server does not decode (gzip) is answered 415 with
    the codings it takes (RFC 7694 3), not parsed as a garbled body."""
    part = dicom_path("singles", "ts-rle__MR_small_RLE.dcm").read_bytes()
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n--b--\r\n"

    response = requests.post(
        _stow_url(intake_node),
        data=gzip.compress(body),
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            "Content-Encoding": "gzip",
        },
        timeout=30,
    )

    assert response.status_code == 415
    assert response.headers["Accept-Encoding"] == "identity"
    assert "Content-Encoding gzip" in response.text
    assert _held(intake_node) == {}


def test_stow_rs_part_inflating_past_the_limit_is_refused_unread(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.5 A.5, PS3.18 10.5.3: a deflated part inflating past
    scan.MAX_INFLATED fails unread; pydicom would inflate it whole even to
    name its UIDs, so its Failed SOP Sequence item names none."""
    monkeypatch.setattr(scan, "MAX_INFLATED", 4 << 20)
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    ds.Rows, ds.Columns, ds.BitsAllocated = 2048, 2048, 8
    ds.BitsStored, ds.HighBit = 8, 7
    ds.PixelData = bytes(2048 * 2048)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "inflating.dcm", enforce_file_format=True)

    response = _stow(intake_node, [(tmp_path / "inflating.dcm").read_bytes()])

    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "Value" not in failed["00081155"]
    assert "inflates past" in response.headers["Warning"]
    assert _held(intake_node) == {}


def test_a_cd_is_imported_by_its_dicomdir(intake_node: RunningNode, tmp_path) -> None:
    """DICOM PS3.10 8.6: the files a DICOMDIR references are imported, and
    only those; the study is then published at once."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    fileset = FileSet()
    for path in images[:5]:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "cd")
    # A file the DICOMDIR does not reference is not part of the file-set.
    shutil.copy(images[5], tmp_path / "cd" / "stray.dcm")

    result = intake_node.services.intake.import_folder(tmp_path / "cd")
    (study_uid,) = result.studies
    published = intake_node.services.intake.publish_now(study_uid)

    assert len(result.accepted) == 5
    assert result.refused == ()
    assert published is not None and published.instances == 5


def test_a_file_the_dicomdir_lists_but_the_cd_lost_is_refused(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.10 8.6: a file a DICOMDIR record references (Referenced
    File ID) that is missing from the CD is refused as unreadable, so that
    an incomplete CD does not pass for whole; the others are taken."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    fileset = FileSet()
    for path in images[:3]:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "cd")
    (lost,) = [
        Path(instance.path)
        for instance in fileset
        if instance.SOPInstanceUID == pydicom.dcmread(images[1]).SOPInstanceUID
    ]
    lost.unlink()

    result = intake_node.services.intake.import_folder(tmp_path / "cd")

    assert len(result.accepted) == 2
    ((path, refusal),) = result.refused
    assert path == lost
    assert refusal.rule == "unreadable"
    assert "No such file" in refusal.reason


def test_a_held_instance_sent_again_in_another_file_is_held_already(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.12.1.1.1: one SOP Instance UID names one instance. Sent
    again, by C-STORE after an import (the SCP writes its own File Meta) or
    with a data set written anew, it is answered as held already, and the
    instance held stays as it was."""
    whole = dicom_path("study-mr", "images", "000001.dcm")
    folder = tmp_path / "cd"
    folder.mkdir()
    shutil.copy(whole, folder / "1-WHOLE")
    result = intake_node.services.intake.import_folder(folder)
    assert [a.duplicate for a in result.accepted] == [False]
    (kept,) = _held(intake_node).values()
    data = kept.read_bytes()

    rewritten = pydicom.dcmread(whole)
    rewritten.file_meta.ImplementationVersionName = "ANOTHER_TOOLKIT_1"
    rewritten.save_as(tmp_path / "rewritten.dcm")
    assert (tmp_path / "rewritten.dcm").stat().st_size != whole.stat().st_size
    sent = send_files(
        [whole, tmp_path / "rewritten.dcm"], _scp(intake_node), calling_ae_title="X"
    )

    assert set(sent.statuses.values()) == {0x0000}
    (again,) = _held(intake_node).values()
    assert again == kept and again.read_bytes() == data


def test_two_intakes_of_one_instance_at_once_keep_the_first_whole(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two intakes of one SOP Instance UID that both found it not held yet
    (two associations at once): the first stored is held, its file stays as
    stored, and the second's copy goes."""
    whole = dicom_path("study-mr", "images", "000001.dcm")
    other = pydicom.dcmread(whole)
    other.ImageComments = "another copy, written anew"
    other.save_as(tmp_path / "other.dcm")
    intake = intake_node.services.intake
    intake.accept(whole)
    (kept,) = _held(intake_node).values()
    data = kept.read_bytes()
    # The second found it not held at first: as if both checked before
    # either stored.
    held = type(intake)._held
    asked: list[object] = []

    def not_at_first(self, header):  # type: ignore[no-untyped-def]
        asked.append(header)
        return False if len(asked) == 1 else held(self, header)

    monkeypatch.setattr(type(intake), "_held", not_at_first)

    second = intake.accept(tmp_path / "other.dcm")

    assert second.duplicate
    assert _held(intake_node) == {second.sop_instance_uid: kept}
    assert kept.read_bytes() == data
    store = intake_node.services.imaging_source.blobs.root
    assert [p for p in store.rglob("*") if p.is_file() and ".spool" not in p.parts] == [
        kept
    ]


def test_an_instance_of_another_patient_is_not_taken_into_a_study(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.2.1: a study is of one patient. An instance of the
    study that names another patient, in the same folder or sent later by
    C-STORE, is refused, so that it never reaches this patient's manifest;
    the reason names neither patient."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:3]
    folder = tmp_path / "cd"
    folder.mkdir()
    for n, path in enumerate(images):
        shutil.copy(path, folder / f"{n}.dcm")
    stranger = pydicom.dcmread(images[0])
    original_patient = str(stranger.PatientID)
    stranger.PatientID = "SOMEONE-ELSE"
    stranger.SOPInstanceUID = stranger.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    stranger.save_as(folder / "9-stranger.dcm")

    result = intake_node.services.intake.import_folder(folder)

    ((path, refusal),) = result.refused
    assert path == folder / "9-stranger.dcm" and refusal.rule == "other_patient"
    assert "SOMEONE-ELSE" not in refusal.reason
    assert original_patient not in refusal.reason
    assert len(result.accepted) == 3

    stranger.SOPInstanceUID = stranger.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    stranger.save_as(tmp_path / "sent.dcm")
    sent = send_files([tmp_path / "sent.dcm"], _scp(intake_node), calling_ae_title="X")
    assert sent.statuses[tmp_path / "sent.dcm"] == 0xC004
    assert len(_held(intake_node)) == 3

    # Emptied but not withdrawn (remove, not published yet): its current
    # manifest still names the patient, and the stranger is refused still.
    intake = intake_node.services.intake
    (study_uid,) = result.studies
    assert intake.publish_now(study_uid) is not None
    intake.remove(study_uid)
    assert _held(intake_node) == {}
    with pytest.raises(check.Refused) as refused:
        intake.accept(tmp_path / "sent.dcm")
    assert refused.value.rule == "other_patient"


def _qualified(path: Path, target: Path, issuer: str) -> Path:
    """A copy of ``path`` under a fresh SOP Instance UID whose Patient ID is
    qualified by an ISO issuer in the Issuer of Patient ID Qualifiers
    Sequence alone (DICOM PS3.3 C.7.1.1)."""
    ds = pydicom.dcmread(path)
    if "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    item = pydicom.Dataset()
    item.UniversalEntityID = issuer
    item.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [item]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    ds.save_as(target)
    return target


def test_an_instance_of_the_same_patient_id_from_another_issuer_is_refused(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.1.1: a Patient ID is unique within its issuer, which
    the Issuer of Patient ID Qualifiers Sequence may name alone; the same
    Patient ID from another issuer is another patient, refused from the
    study, held or only published."""
    first, second = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    intake = intake_node.services.intake
    held = intake.accept(_qualified(first, tmp_path / "held.dcm", "1.2.3.4.5"))
    stranger = _qualified(second, tmp_path / "stranger.dcm", "1.2.3.4.6")

    with pytest.raises(check.Refused) as refused:
        intake.accept(stranger)
    assert refused.value.rule == "other_patient"
    sent = send_files([stranger], _scp(intake_node), calling_ae_title="X")
    assert sent.statuses[stranger] == 0xC004
    same = intake.accept(_qualified(second, tmp_path / "same.dcm", "1.2.3.4.5"))
    assert same.study_instance_uid == held.study_instance_uid

    # Emptied but its manifest still current: the manifest names the
    # issuer as Issuer of Patient ID, and the stranger is refused still.
    assert intake.publish_now(held.study_instance_uid) is not None
    intake.remove(held.study_instance_uid)
    assert _held(intake_node) == {}
    with pytest.raises(check.Refused) as refused:
        intake.accept(stranger)
    assert refused.value.rule == "other_patient"
    intake.accept(_qualified(second, tmp_path / "again.dcm", "1.2.3.4.5"))


def test_an_issuer_named_by_the_qualifiers_sequence_qualifies_the_patient_id(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITI TF-3 4.2.3.2.16: the images' Patient ID is published under its
    issuer when that is one of the affinity domain's assigning authorities,
    named by Issuer of Patient ID or by its Qualifiers Sequence alone."""
    (first,) = sorted(dicom_path("study-mr", "images").iterdir())[:1]
    intake = intake_node.services.intake
    settings = intake.settings
    node = replace(settings.node, other_assigning_authorities=("1.2.3.4.7",))
    monkeypatch.setattr(intake, "settings", replace(settings, node=node))
    ds = pydicom.dcmread(_qualified(first, tmp_path / "a.dcm", "1.2.3.4.7"))
    ds.IssuerOfPatientID = "LOCAL-MRN"

    assert intake.patient_id(ds) == f"{ds.PatientID}^^^&1.2.3.4.7&ISO"
    ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID = "1.2.3.4.9"
    assert intake.patient_id(ds) == (
        f"{ds.PatientID}^^^&{node.assigning_authority}&ISO"
    )


def _stow_url(node: RunningNode) -> str:
    settings = node.settings
    return (
        f"http://{settings.node.host}:{settings.imaging_source.port}"
        f"{settings.imaging_source.stow_path}"
    )


def _post_stow(
    node: RunningNode, body: bytes, boundary: str, media_type: str = "application/dicom"
) -> requests.Response:
    """POST a STOW-RS body as multipart/related of ``media_type``."""
    return requests.post(
        _stow_url(node),
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="{media_type}"; '
            f"boundary={boundary}"
        },
        timeout=60,
    )


def _one_part(path: Path, boundary: str) -> bytes:
    """A multipart body of the file at ``path`` alone."""
    return (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_stow_rs_names_a_refused_instance_and_says_why(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.3: a Failed SOP Sequence item names the SOP Class
    and Instance of a part that was read, with its Failure Reason; the
    reason's text travels in a Warning header field (DICOM PS3.18 8.4)."""
    path = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    held = pydicom.dcmread(path, stop_before_pixels=True)

    response = _stow(intake_node, [path.read_bytes()])

    assert response.status_code == 409
    (item,) = response.json()["00081198"]["Value"]
    assert item["00081150"]["Value"] == [held.SOPClassUID]
    assert item["00081155"]["Value"] == [held.SOPInstanceUID]
    assert item["00081197"]["Value"] == [0xC000]
    assert response.headers["Warning"].startswith("299 ")
    assert "part 1: C000 " in response.headers["Warning"]


def test_stow_rs_ignores_the_preamble_of_its_body(intake_node: RunningNode) -> None:
    """RFC 2046 5.1.1, DICOM PS3.18 10.5.1: text before the first boundary
    delimiter of a multipart body is a preamble, which the receiver ignores;
    the instance after it is stored."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    body = b"This is a multi-part message in MIME format.\r\n" + _one_part(
        path, "xdsi-test"
    )

    response = _post_stow(intake_node, body, "xdsi-test")

    assert response.status_code == 200, response.text
    assert list(_held(intake_node)) == [
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    ]


def test_stow_rs_takes_transport_padding_after_each_boundary_delimiter(
    intake_node: RunningNode,
) -> None:
    """RFC 2046 5.1.1, DICOM PS3.18 10.5.1: linear white space may follow a
    boundary delimiter, the close delimiter's "--" included, before its
    CRLF; the instances of a body so padded are stored."""
    paths = [
        dicom_path("singles", "ts-explicit-le__CT_small.dcm"),
        dicom_path("singles", "ts-rle__MR_small_RLE.dcm"),
    ]
    body = (
        b"--xdsi-test   \r\nContent-Type: application/dicom\r\n\r\n"
        + paths[0].read_bytes()
        + b"\r\n--xdsi-test \t\r\nContent-Type: application/dicom\r\n\r\n"
        + paths[1].read_bytes()
        + b"\r\n--xdsi-test--  \t\r\n"
    )

    response = _post_stow(intake_node, body, "xdsi-test")

    assert response.status_code == 200, response.text
    held = _held(intake_node)
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert _data_set_bytes(held[uid]) == _data_set_bytes(path)


def test_stow_rs_answers_a_delimiter_line_with_more_than_padding_with_400(
    intake_node: RunningNode,
) -> None:
    """RFC 2046 5.1.1: a boundary delimiter line holds the boundary, linear
    white space and CRLF; anything else on it is a garbled body (DICOM
    PS3.18 Table 10.5.3-1: 400), and nothing of it is kept."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    body = _one_part(path, "xdsi-test").replace(
        b"--xdsi-test\r\n", b"--xdsi-test  x\r\n", 1
    )

    response = _post_stow(intake_node, body, "xdsi-test")

    assert response.status_code == 400
    assert "RFC 2046 5.1.1" in response.text
    assert _held(intake_node) == {}


@pytest.mark.parametrize("declared_in", ["part", "request", "type"])
def test_stow_rs_refuses_a_part_in_another_transfer_syntax_than_declared(
    intake_node: RunningNode, declared_in: str
) -> None:
    """DICOM PS3.18 8.7.3.5.2: the transfer-syntax parameter of a part's
    media type, or of the request's multipart/related type (itself or its
    type parameter), names the syntax the instance is in; a part whose File
    Meta names another fails with Error: Cannot understand (DICOM PS3.18
    Table I.2-2, Cxxx) while the others are stored, a 202 (Table
    10.5.3-1)."""
    explicit = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    # An RLE Lossless instance, said to be in Explicit VR Little Endian.
    mislabelled = dicom_path("singles", "ts-rle__MR_small_RLE.dcm")
    syntax = pydicom.uid.ExplicitVRLittleEndian
    own = f"; transfer-syntax={syntax}" if declared_in == "part" else ""
    body = b"".join(
        f"--b\r\nContent-Type: application/dicom{own}\r\n\r\n".encode()
        + path.read_bytes()
        + b"\r\n"
        for path in (explicit, mislabelled)
    )
    content_type = {
        "part": 'multipart/related; type="application/dicom"; boundary=b',
        "request": 'multipart/related; type="application/dicom"; '
        f"transfer-syntax={syntax}; boundary=b",
        "type": f'multipart/related; type="application/dicom; transfer-syntax={syntax}"'
        "; boundary=b",
    }[declared_in]

    response = requests.post(
        _stow_url(intake_node),
        data=body + b"--b--\r\n",
        headers={"Content-Type": content_type},
        timeout=60,
    )

    assert response.status_code == 202, response.text
    (failed,) = response.json()["00081198"]["Value"]
    refused = pydicom.dcmread(mislabelled, stop_before_pixels=True)
    assert failed["00081155"]["Value"] == [refused.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "part 2: C000 " in response.headers["Warning"]
    assert "transfer-syntax" in response.headers["Warning"]
    assert list(_held(intake_node)) == [
        pydicom.dcmread(explicit, stop_before_pixels=True).SOPInstanceUID
    ]


def test_stow_rs_stores_a_part_in_the_transfer_syntax_it_declares(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 8.7.3.5.2: a part whose transfer-syntax parameter names
    the syntax of its File Meta, quoted or not and in a parameter name of
    any case (RFC 2045 5.1), is stored."""
    path = dicom_path("singles", "ts-rle__MR_small_RLE.dcm")
    body = (
        b"--b\r\nContent-Type: application/dicom; Transfer-Syntax="
        + f'"{pydicom.uid.RLELossless}"'.encode()
        + b"\r\n\r\n"
        + path.read_bytes()
        + b"\r\n--b--\r\n"
    )

    response = _post_stow(intake_node, body, "b")

    assert response.status_code == 200, response.text
    assert len(_held(intake_node)) == 1


def test_stow_rs_answers_in_xml_when_accept_asks_for_it(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.1, 10.5.3: the Store Instances Response Module goes
    in the media type Accept names; application/dicom+xml gets the Native
    DICOM Model (DICOM PS3.19 A.1), valid against its schema (A.1.6), with
    the Referenced and Failed SOP Sequences, Failure Reason and Retrieve
    URLs the JSON answer holds."""
    good = sorted(dicom_path("study-mr", "images").iterdir())[0]
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    held = pydicom.dcmread(good, stop_before_pixels=True)
    refused = pydicom.dcmread(bad, stop_before_pixels=True)
    boundary = "xdsi-test"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + path.read_bytes()
            + b"\r\n"
            for path in (good, bad)
        )
        + f"--{boundary}--\r\n".encode()
    )

    response = requests.post(
        _stow_url(intake_node),
        data=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; '
            f"boundary={boundary}",
            "Accept": "application/dicom+xml",
        },
        timeout=60,
    )

    assert response.status_code == 202
    assert response.headers["Content-Type"].startswith("application/dicom+xml")
    ns = {"n": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    root = assert_native_dicom_model(response.content)
    assert (
        root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
    )
    assert root.get("{http://www.w3.org/XML/1998/namespace}space") == "preserve"

    def values(node: etree._Element, tag: str) -> list[str]:
        return node.xpath(
            f"n:DicomAttribute[@tag='{tag}']/n:Value/text()", namespaces=ns
        )

    study_url = f"{intake_node.settings.dicomweb_url}/studies/{held.StudyInstanceUID}"
    assert values(root, "00081190") == [study_url]
    (stored,) = root.xpath("n:DicomAttribute[@tag='00081199']/n:Item", namespaces=ns)
    assert stored.get("number") == "1"
    assert values(stored, "00081150") == [held.SOPClassUID]
    assert values(stored, "00081155") == [held.SOPInstanceUID]
    assert values(stored, "00081190") == [
        f"{study_url}/series/{held.SeriesInstanceUID}/instances/{held.SOPInstanceUID}"
    ]
    (failed,) = root.xpath(
        "n:DicomAttribute[@tag='00081198' and @vr='SQ'"
        " and @keyword='FailedSOPSequence']/n:Item",
        namespaces=ns,
    )
    assert values(failed, "00081155") == [refused.SOPInstanceUID]
    assert values(failed, "00081197") == [str(0xC000)]
    assert [a.get("tag") for a in root] == ["00081190", "00081198", "00081199"]


def _stow_one_accepting(
    node: RunningNode, path: Path, accept: str
) -> requests.Response:
    """STOW-RS of one file, its answer asked for in ``accept``."""
    return requests.post(
        _stow_url(node),
        data=_one_part(path, "xdsi-test"),
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; '
            "boundary=xdsi-test",
            "Accept": accept,
        },
        timeout=60,
    )


def test_stow_rs_refuses_an_accept_it_cannot_answer_with_406_and_keeps_nothing(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 8.7.8.1: an Accept header that takes neither DICOM JSON
    nor XML is answered 406 before the body is read; nothing is stored for
    an answer the sender would refuse."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")

    response = _stow_one_accepting(intake_node, path, "text/html")

    assert response.status_code == 406
    assert "application/dicom+xml" in response.text
    assert _held(intake_node) == {}


def test_stow_rs_answers_in_the_media_type_accept_weighs_highest(
    intake_node: RunningNode,
) -> None:
    """RFC 9110 12.5.1, DICOM PS3.18 8.7.8.1: the answer goes in the media
    type the most specific media range matching it weighs highest; one a
    range refuses with q=0 is not sent, and DICOM JSON goes as
    application/json when only that is taken (RFC 6839 3.1). A range naming
    the UTF-8 charset of the answer takes it (DICOM PS3.18 8.8.4)."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")
    expected = {
        "application/dicom+json;q=0, */*": "application/json",
        "application/dicom+json;q=0, application/json": "application/json",
        "application/dicom+xml; charset=UTF-8": "application/dicom+xml",
        "application/dicom+xml;q=0.9, application/*;q=0.5": "application/dicom+xml",
        "application/*;q=0.5, application/dicom+xml;q=0.4": "application/dicom+json",
        "application/dicom+xml, application/dicom+json": "application/dicom+json",
        "application/dicom+xml;q=0, */*;q=0.1": "application/dicom+json",
        "application/dicom+xml;level=1": None,
        "application/dicom+xml;q=2": None,
    }

    for accept, media_type in expected.items():
        response = _stow_one_accepting(intake_node, path, accept)

        if media_type is None:
            assert response.status_code == 406, accept
        else:
            assert response.status_code == 200, (accept, response.text)
            content_type = response.headers["Content-Type"]
            assert content_type.split(";")[0] == media_type, accept
            if media_type == "application/dicom+xml":
                assert_native_dicom_model(response.content)
            else:
                assert "00081199" in response.json()


def test_stow_rs_takes_the_type_parameter_in_any_case(intake_node: RunningNode) -> None:
    """RFC 2387 3.1, RFC 2045 5.1: the type parameter of multipart/related
    is a media type, whose type and subtype are case-insensitive; a request
    naming Application/DICOM is stored, not answered 415."""
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")

    response = _post_stow(
        intake_node, _one_part(path, "xdsi-test"), "xdsi-test", "Application/DICOM"
    )

    assert response.status_code == 200, response.text
    assert len(_held(intake_node)) == 1


def test_stow_rs_answers_an_overlong_boundary_with_400(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.18 Table 10.5.3-1, RFC 2046 5.1.1: a boundary the parser
    cannot take is a 400 in plain text, never a SOAP Fault or a 500."""
    caplog.set_level(logging.INFO, logger="xdsi")
    boundary = "b" * 300
    path = dicom_path("singles", "ts-explicit-le__CT_small.dcm")

    response = _post_stow(intake_node, _one_part(path, boundary), boundary)

    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "boundary" in response.text.lower()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert _held(intake_node) == {}


def test_stow_rs_answers_garbled_chunked_framing_with_400(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.18 Table 10.5.3-1, RFC 9112 7.1: a body whose chunk size is
    no hex number is the sender's fault: 400 in plain text."""
    caplog.set_level(logging.INFO, logger="xdsi")
    url = urlsplit(_stow_url(intake_node))
    connection = http.client.HTTPConnection(url.netloc, timeout=30)
    connection.putrequest("POST", url.path)
    connection.putheader(
        "Content-Type", 'multipart/related; type="application/dicom"; boundary=b'
    )
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders(b"ZZZ\r\n--b\r\n\r\n0\r\n\r\n")

    response = connection.getresponse()
    text = response.read().decode()
    connection.close()

    assert response.status == 400
    assert response.getheader("Content-Type", "").startswith("text/plain")
    assert "chunked" in text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


QUIET = 1.0


def test_an_unpublishable_study_is_retried_with_backoff(
    running_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """RAD TF-3 4.68, ITI TF-3 Table 4.2.4.1-2: a study refused with
    XDSUnknownPatientId is retried after the quiet time, then after twice
    that; one WARNING, later failures at DEBUG; a change retries it at once,
    and success after failures is logged at INFO."""
    caplog.set_level(logging.DEBUG, logger="xdsi.actors.intake")
    intake = running_node.services.intake
    tap = running_node.taps["repository"]
    images = sorted(dicom_path("study-mr", "images").iterdir())

    def rounds_after(pause: float) -> int:
        time.sleep(pause)
        intake.publish_due(QUIET)
        return len(tap.exchanges)

    intake.accept(images[0])
    assert rounds_after(QUIET + 0.1) == 1
    assert rounds_after(0) == 1
    assert rounds_after(QUIET + 0.1) == 2
    # The third try waits 2 * QUIET after the second failure.
    assert rounds_after(QUIET + 0.1) == 2
    intake.accept(images[1])
    assert rounds_after(QUIET + 0.1) == 3
    running_node.feed(MR_PATIENT)
    intake.accept(images[2])
    assert rounds_after(QUIET + 0.1) == 4

    records = [r for r in caplog.records if r.name == "xdsi.actors.intake"]
    (warning,) = [r for r in records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    assert "XDSUnknownPatientId" in warning.getMessage()
    assert "IDS-DEPT002" not in warning.getMessage()
    # The registry's codeContext may name the patient: DEBUG only.
    assert "not known to this Document Registry" not in warning.getMessage()
    assert any(
        r.levelno == logging.DEBUG
        and "XDSUnknownPatientId: the SubmissionSet's patientId is not known"
        in r.getMessage()
        for r in records
    )
    assert len([r for r in records if r.levelno == logging.DEBUG]) >= 2
    assert any(
        r.levelno == logging.INFO and "after 3 failed attempts" in r.getMessage()
        for r in records
    )
    assert len(_manifests(running_node)) == 1


def test_a_study_under_a_patient_id_no_registry_takes_waits_for_a_change(
    running_node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-3 4.2.3.2.16: a study whose Patient ID holds an HL7 delimiter
    is not sent to the repository, where it could only be refused, nor
    tried again until it changes; the reason names no patient."""
    caplog.set_level(logging.DEBUG, logger="xdsi.actors.intake")
    intake = running_node.services.intake
    tap = running_node.taps["repository"]
    images = sorted(dicom_path("study-mr", "images").iterdir())
    copies = []
    for index, image in enumerate(images[:2]):
        ds = pydicom.dcmread(image)
        ds.PatientID = "PAT|1"
        copies.append(tmp_path / f"{index}.dcm")
        ds.save_as(copies[-1])

    intake.accept(copies[0])
    for _ in range(3):
        time.sleep(QUIET + 0.1)
        intake.publish_due(QUIET)
    assert tap.exchanges == []
    study_uid = pydicom.dcmread(copies[0]).StudyInstanceUID
    assert "its ID holds an HL7 delimiter" in (intake.last_failure(study_uid) or "")
    records = [r for r in caplog.records if r.name == "xdsi.actors.intake"]
    assert len([r for r in records if r.levelno >= logging.WARNING]) == 1
    assert len([r for r in records if "failure 2 in a row" in r.getMessage()]) == 0

    # A change tries it again, once.
    intake.accept(copies[1])
    time.sleep(QUIET + 0.1)
    intake.publish_due(QUIET)
    assert "failure 2 in a row" in caplog.text
    assert "PAT|1" not in caplog.text


@pytest.fixture
def patient_node(tmp_path: Path) -> Iterator[RunningNode]:
    """A node that publishes only when told (an hour's quiet time)."""
    yield from _started(tmp_path, publish_after=3600.0)


def _xdsi(node: RunningNode, tmp_path: Path, *args: str) -> Result:
    config = tmp_path / "xdsi.toml"
    config.write_text(to_toml(node.settings))
    return CliRunner().invoke(main, ["--config", str(config), *args])


def _copies(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file intake copies, copying it still."""
    copied: list[Path] = []
    copyfile = shutil.copyfile

    def recorded(source: Path, target: Path) -> Path:
        copied.append(Path(source))
        return copyfile(source, target)

    monkeypatch.setattr("xdsi.actors.intake.shutil.copyfile", recorded)
    return copied


def test_import_publishes_a_study_an_earlier_import_only_kept(
    patient_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAD TF-3 4.68: ``import`` publishes what it took in at once, a study
    kept by an earlier ``import --no-publish`` included, and says so when
    the study is published already. Files held already are not copied
    again."""
    folder = dicom_path("study-mr", "images")

    kept = _xdsi(patient_node, tmp_path, "import", str(folder), "--no-publish")
    assert kept.exit_code == 0, kept.output
    assert _manifests(patient_node) == []

    again = _xdsi(patient_node, tmp_path, "import", str(folder))
    assert again.exit_code == 0, again.output
    assert "0 instances taken in" in again.output
    assert "published study" in again.output
    (manifest,) = _manifests(patient_node)

    copied = _copies(monkeypatch)
    third = _xdsi(patient_node, tmp_path, "import", str(folder))
    assert third.exit_code == 0, third.output
    assert copied == []
    assert f"published already: manifest {manifest.sop_instance_uid}" in third.output
    assert len(_manifests(patient_node)) == 1


def test_import_of_a_folder_without_dicom_fails(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """An import that takes in no instance exits non-zero, saying so."""
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")

    outcome = _xdsi(patient_node, tmp_path, "import", str(folder))

    assert outcome.exit_code == 1
    assert "no DICOM instance taken in" in outcome.output


def test_a_failed_intake_names_why_its_dicom_files_were_refused(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """When nothing is taken in, the closing error gives the reason a DICOM
    file was refused, not that of a file beside it that is no DICOM at all
    (which changes no exit status)."""
    authority = _feed_first_and_second(patient_node)
    folder = tmp_path / "study"
    shutil.copytree(dicom_path("study-mr", "images"), folder)
    # Read first: files are taken in by name, and "0-" sorts before "000000".
    (folder / "0-notes.txt").write_text("not DICOM")
    first = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "FIRST-1"
    )
    assert first.exit_code == 0, first.output

    again = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "SECOND-2"
    )

    assert again.exit_code == 1
    (closing,) = [
        line for line in again.output.splitlines() if "no DICOM instance" in line
    ]
    assert "held under another patient than the one given" in closing
    assert "not DICOM" not in closing
    assert authority not in again.output


def test_import_of_a_study_whose_patient_is_unknown_fails(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.42.4.1.3: the registry refuses an unknown patient, so the
    study is kept but not published, and the import exits non-zero."""
    folder = dicom_path("study-ct-ihe", "images")

    outcome = _xdsi(patient_node, tmp_path, "import", str(folder))

    assert outcome.exit_code == 1, outcome.output
    # ITI TF-3 4.2.4.1: the code with the registry's codeContext.
    assert (
        "not published: XDSUnknownPatientId: the SubmissionSet's patientId is "
        "not known to this Document Registry (no Patient Identity Feed received "
        "for it); feed the patient first"
    ) in " ".join(outcome.output.split())
    # The command names the id to feed: the images' own Patient ID.
    (study,) = scan.scan_directory(folder).studies
    config = tmp_path / "xdsi.toml"
    assert f"(xdsi --config {config} feed {study.patient.patient_id})" in (
        outcome.output
    )
    assert _manifests(patient_node) == []


def test_import_says_why_a_file_is_refused_once(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """pydicom's own complaint about a file (logged, and raised again as a
    Python warning; other complaints quote values, which may be PHI) stays
    out of the output at the default verbosity: the refusal is reported
    once, in the node's words."""
    bad = shared_path(
        "dicom", "bad", "pixeldata-too-short__emri_small_jpeg_2k_lossless_too_short.dcm"
    )
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(bad, folder)
    config = tmp_path / "xdsi.toml"
    config.write_text(to_toml(patient_node.settings))

    outcome = subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), "import", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    said = outcome.stdout + outcome.stderr
    assert outcome.returncode == 1, said
    assert said.count(bad.name) == 1, said
    # The file is cut in its Pixel Data, long after its SOP Instance UID.
    assert "ends before its Sequence Delimitation Item" in said
    # Told beside the file and in the closing error, not logged as well.
    assert " WARNING " not in said, said
    assert "before its SOP Instance UID" not in said
    assert "pydicom" not in said and "UserWarning" not in said


def test_import_shows_refused_file_names_with_their_control_characters_escaped(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.10 8: a CD's file names are its maker's. Those of refused
    files are listed with their control characters escaped, so that a name
    holding a terminal escape (ESC, OSC) cannot steer the user's terminal;
    a name alone and names sharing a reason alike."""
    bad = dicom_path(
        "bad", "pixeldata-too-short__emri_small_jpeg_2k_lossless_too_short.dcm"
    )
    cut = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    folder = tmp_path / "cd"
    folder.mkdir()
    shutil.copy(bad, folder / "alone\x1b]0;owned\x07.dcm")
    shutil.copy(cut, folder / "first\x1b[2J.dcm")
    shutil.copy(cut, folder / "second\x1b[2J.dcm")

    result = _xdsi(patient_node, tmp_path, "import", str(folder))

    said = result.output
    assert result.exit_code == 1, said
    assert "\x1b" not in said and "\x07" not in said
    assert "alone\\x1b]0;owned\\x07.dcm" in said
    assert "first\\x1b[2J.dcm" in said and "second\\x1b[2J.dcm" in said


def test_remove_of_what_is_not_held_fails(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """``remove`` naming a study the node does not hold removes nothing and
    says so with a non-zero exit, so that a mistyped UID is not taken for
    success."""
    outcome = _xdsi(patient_node, tmp_path, "remove", "1.2.3.4.999")

    assert outcome.exit_code == 1
    assert "0 instances removed" in outcome.output
    assert "nothing held matches study 1.2.3.4.999" in outcome.output


def test_publishing_broken_off_leaves_the_study_to_publish(
    patient_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish broken off midway (here by Ctrl-C, as a KeyboardInterrupt
    arriving in RAD-68) leaves the study changed, so that the next round
    publishes it."""
    folder = dicom_path("study-mr", "images")
    kept = _xdsi(patient_node, tmp_path, "import", str(folder), "--no-publish")
    assert kept.exit_code == 0, kept.output
    services = patient_node.services
    with services.engine.connect() as conn:
        (study_uid,) = set(
            conn.execute(select(imaging_instance.c.study_instance_uid)).scalars()
        )
    real = services.imaging_source.republish

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(services.imaging_source, "republish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        services.intake.publish_now(study_uid)
    assert services.intake.changed(study_uid)

    monkeypatch.setattr(services.imaging_source, "republish", real)
    assert services.intake.publish_now(study_uid) is not None
    assert len(_manifests(patient_node)) == 1


def test_a_claim_left_by_a_killed_publisher_lapses(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """A publisher killed after claiming a study (SIGKILL, power loss) never
    releases its claim; once the claim is older than the lease the study is
    published all the same, and until then by no one else."""
    folder = dicom_path("study-mr", "images")
    kept = _xdsi(patient_node, tmp_path, "import", str(folder), "--no-publish")
    assert kept.exit_code == 0, kept.output
    intake = patient_node.services.intake
    engine = patient_node.services.engine
    with engine.connect() as conn:
        (study_uid,) = set(
            conn.execute(select(imaging_instance.c.study_instance_uid)).scalars()
        )

    # What a publisher killed right after its claim leaves behind.
    assert intake._claim(study_uid, None) is not None
    assert not intake.changed(study_uid)
    assert intake.publish_due(0.0) == []
    assert intake.publish_now(study_uid) is None

    with engine.begin() as conn:
        conn.execute(
            update(imaging_study).values(
                claimed_at=time.time() - intake_module.CLAIM_LEASE - 1
            )
        )
    assert intake.changed(study_uid)
    # The node's own auto-publisher may be the one that takes it up.
    published = intake.publish_due(3600.0)
    assert [p.study_instance_uid for p in published] in ([study_uid], [])
    _wait(lambda: len(_manifests(patient_node)) == 1)
    assert not intake.changed(study_uid)
    with engine.connect() as conn:
        assert conn.execute(select(imaging_study.c.claimed_at)).scalar() is None
    assert intake.publish_due(0.0) == []


def _kept_study(node: RunningNode, tmp_path: Path) -> str:
    folder = dicom_path("study-mr", "images")
    kept = _xdsi(node, tmp_path, "import", str(folder), "--no-publish")
    assert kept.exit_code == 0, kept.output
    with node.services.engine.connect() as conn:
        (study_uid,) = set(
            conn.execute(select(imaging_instance.c.study_instance_uid)).scalars()
        )
    return study_uid


def _claim_as(node: RunningNode, claimed_by: str) -> None:
    with node.services.engine.begin() as conn:
        conn.execute(
            update(imaging_study).values(
                dirty=False, claimed_at=time.time(), claimed_by=claimed_by
            )
        )


def test_a_claim_of_a_process_gone_from_this_host_is_taken_back_at_once(
    patient_node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A publisher killed outright on this host leaves a claim whose process
    no longer runs: the study is published at once, not after the lease."""
    study_uid = _kept_study(patient_node, tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    _claim_as(patient_node, f"{socket.gethostname()} {gone.stdout.strip()} 1")

    with caplog.at_level(logging.WARNING, logger="xdsi.actors.intake"):
        assert patient_node.services.intake.changed(study_uid)
    assert "is gone" in caplog.text
    published = _xdsi(
        patient_node,
        tmp_path,
        "import",
        str(dicom_path("study-mr", "images")),
    )
    assert published.exit_code == 0, published.output
    _wait(lambda: len(_manifests(patient_node)) == 1)


def test_a_live_claim_is_named_and_the_study_not_published_twice(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """While another process of this host (here the test itself) holds the
    claim, the study is not published beside it and the user is told who
    holds it."""
    study_uid = _kept_study(patient_node, tmp_path)
    _claim_as(patient_node, intake_module.claimant())

    again = _xdsi(
        patient_node,
        tmp_path,
        "import",
        str(dicom_path("study-mr", "images")),
    )

    assert again.exit_code == 1
    assert f"study {study_uid} is being published by process {os.getpid()}" in (
        again.output
    )
    assert _manifests(patient_node) == []


def test_a_claim_from_another_host_waits_for_the_lease(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    study_uid = _kept_study(patient_node, tmp_path)
    _claim_as(patient_node, "another-host 1 1")
    assert not patient_node.services.intake.changed(study_uid)
    assert patient_node.services.intake.publish_now(study_uid) is None


def test_a_manifest_no_connection_took_is_not_waited_for(
    patient_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAD-68 to a repository that refuses the connection: nothing went
    out, so the next publication does not wait SETTLE_AFTER for a
    registration that cannot be on its way."""
    study_uid = _kept_study(patient_node, tmp_path)
    source = patient_node.services.imaging_source
    settings = source.settings
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/xds/repository"
    monkeypatch.setattr(
        source,
        "settings",
        replace(
            settings,
            imaging_source=replace(settings.imaging_source, repository_url=nowhere),
        ),
    )
    intake = patient_node.services.intake
    assert intake.publish_now(study_uid) is None
    assert "cannot connect" in (intake.last_failure(study_uid) or "")
    assert _manifests(patient_node, pending=True) == []

    monkeypatch.setattr(source, "settings", settings)
    published = intake.publish_now(study_uid)

    assert published is not None
    assert _registry_status(patient_node, published.manifest_uid) == STATUS_APPROVED


@pytest.mark.parametrize(
    ("registered", "answer"),
    [(True, None), (False, None), (True, "XDSRegistryNotAvailable")],
    ids=["taken", "lost", "taken-unheard-by-the-repository"],
)
def test_a_manifest_sent_without_an_answer_is_settled_with_the_registry(
    patient_node: RunningNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registered: bool,
    answer: str | None,
) -> None:
    """RAD-68 sent and no answer heard (the answer lost, or the publisher
    killed): the next publication asks the registry (ITI-18 GetDocuments)
    before sending another, so the study never has two Approved manifests."""
    study_uid = _kept_study(patient_node, tmp_path)
    source = patient_node.services.imaging_source
    real = imaging_source_module.provide_and_register

    def unanswered(*args: object, **kwargs: object) -> None:
        if registered:
            real(*args, **kwargs)
        if answer is None:
            raise SubmitError("RAD-68 to the repository failed: read timed out")
        # The repository's own ITI-42 went out and its answer was lost.
        raise SubmitError(
            "RAD-68 failed", [RegistryError(answer, "the registry did not answer")]
        )

    monkeypatch.setattr(imaging_source_module, "provide_and_register", unanswered)
    assert patient_node.services.intake.publish_now(study_uid) is None
    (pending,) = _manifests(patient_node, pending=True)
    assert pending.status == imaging_source_module.MANIFEST_PENDING
    assert patient_node.services.intake.changed(study_uid)

    monkeypatch.setattr(imaging_source_module, "provide_and_register", real)
    intake = patient_node.services.intake
    if not registered:
        # Not registered yet may still mean on its way (a slow registry):
        # nothing is sent until no request carrying it can be under way.
        assert intake.publish_now(study_uid) is None
        assert "may still be on its way" in (intake.last_failure(study_uid) or "")
        assert len(_manifests(patient_node, pending=True)) == 1
        with patient_node.services.engine.begin() as conn:
            conn.execute(
                update(imaging_manifest).values(
                    created_at=datetime.now(UTC)
                    - timedelta(seconds=imaging_source_module.SETTLE_AFTER + 1)
                )
            )
    published = intake.publish_now(study_uid)
    assert published is not None

    rows = {
        row.sop_instance_uid: row.status
        for row in _manifests(patient_node, pending=True)
    }
    assert rows[published.manifest_uid] == MANIFEST_CURRENT
    if registered:
        assert rows[pending.sop_instance_uid] == MANIFEST_REPLACED
        assert published.replaced == pending.sop_instance_uid
        assert _registry_status(patient_node, pending.sop_instance_uid) == (
            STATUS_DEPRECATED
        )
    else:
        assert set(rows) == {published.manifest_uid}
        assert not source.blobs.path(pending.blob).exists()
    assert _registry_status(patient_node, published.manifest_uid) == STATUS_APPROVED


def test_an_association_for_another_called_ae_title_is_rejected(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.8 9.3.4, Table 9-21: a sender that names another AE title
    is rejected (reason 7), and nothing is stored."""
    from pynetdicom import AE as Sender
    from pynetdicom.sop_class import CTImageStorage

    scp = _scp(intake_node)
    sender = Sender(ae_title="TESTSCU")
    sender.add_requested_context(CTImageStorage)
    association = sender.associate(scp.host, scp.port, ae_title="NOT-XDSI")
    try:
        assert association.is_rejected
    finally:
        association.release()
    assert _held(intake_node) == {}


def _association_lines(
    caplog: pytest.LogCaptureFixture, count: int
) -> list[logging.LogRecord]:
    """The first ``count`` lines of the C-STORE SCP about associations'
    ends, waited for: an association ends as its connection closes, after
    the sender has its last answer."""

    def lines() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "xdsi.actors.store_scp"
            and r.getMessage().startswith("C-STORE association from ")
        ]

    _wait(lambda: len(lines()) >= count, timeout=10)
    return lines()[:count]


def test_each_association_is_logged_as_it_ends_with_its_counts(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.8 7.2 (A-RELEASE): one INFO line per released association
    names the sending AE title and address and counts the instances stored,
    held already and refused; no patient data at INFO or above."""
    caplog.set_level(logging.INFO, logger="xdsi")
    images = sorted(dicom_path("study-mr", "images").iterdir())
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")

    send_files(images[:3], _scp(intake_node), calling_ae_title="TESTSCU")
    first = _association_lines(caplog, 1)
    send_files([*images[:2], bad], _scp(intake_node), calling_ae_title="TESTSCU")
    first, second = _association_lines(caplog, 2)

    for line in (first, second):
        assert line.levelno == logging.INFO
        assert line.getMessage().startswith(
            "C-STORE association from TESTSCU at 127.0.0.1:"
        )
    assert "released, 3 stored, 0 held already, 0 refused, " in first.getMessage()
    assert "released, 0 stored, 2 held already, 1 refused, " in second.getMessage()
    patient = MR_PATIENT.split("^")[0]
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and patient in r.getMessage()
    ]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_rejected_association_is_logged_with_why(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.8 9.3.4, Table 9-21: an association rejected for naming
    another called AE title gives a WARNING naming both AE titles."""
    from pynetdicom import AE as Sender
    from pynetdicom.sop_class import CTImageStorage

    caplog.set_level(logging.INFO, logger="xdsi")
    scp = _scp(intake_node)
    sender = Sender(ae_title="TESTSCU")
    sender.add_requested_context(CTImageStorage)
    association = sender.associate(scp.host, scp.port, ae_title="WRONGAE")
    assert association.is_rejected

    (line,) = _association_lines(caplog, 1)
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(
        "C-STORE association from TESTSCU at 127.0.0.1:"
    )
    assert (
        f"rejected (called AE title 'WRONGAE' is not this SCP's '{scp.ae_title}')"
        in line.getMessage()
    )


def test_an_association_without_an_accepted_context_is_logged_with_why(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.8 9.3.3.2, Table 9-18: an association whose presentation
    contexts were all rejected ends in a WARNING naming each abstract syntax
    and why it was rejected."""
    from pydicom.uid import JPEGLossless
    from pynetdicom import AE as Sender
    from pynetdicom.sop_class import CTImageStorage

    caplog.set_level(logging.INFO, logger="xdsi")
    scp = _scp(intake_node)
    sender = Sender(ae_title="TESTSCU")
    sender.add_requested_context(CTImageStorage, [JPEGLossless])
    association = sender.associate(scp.host, scp.port, ae_title=scp.ae_title)
    assert not association.is_established

    (line,) = _association_lines(caplog, 1)
    assert line.levelno == logging.WARNING
    assert (
        "aborted (no presentation context accepted: CT Image Storage "
        "transfer-syntaxes-not-supported (provider rejection): JPEG Lossless"
    ) in line.getMessage()


def test_an_aborted_association_is_logged_with_what_it_brought(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.8 7.3 (A-ABORT): an association the peer aborts gives a
    WARNING saying so, with the instances it brought before."""
    from pynetdicom import AE as Sender

    caplog.set_level(logging.INFO, logger="xdsi")
    image = sorted(dicom_path("study-mr", "images").iterdir())[0]
    ds = pydicom.dcmread(image)
    scp = _scp(intake_node)
    sender = Sender(ae_title="TESTSCU")
    sender.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    association = sender.associate(scp.host, scp.port, ae_title=scp.ae_title)
    assert association.is_established
    assert association.send_c_store(ds).Status == SUCCESS
    association.abort()

    (line,) = _association_lines(caplog, 1)
    assert line.levelno == logging.WARNING
    assert (
        "aborted (A-ABORT by the peer), 1 stored, 0 held already, 0 refused, "
        in line.getMessage()
    )


def test_a_dicom_port_in_use_fails_the_start_and_frees_every_other_port(
    tmp_path: Path,
) -> None:
    """A C-STORE SCP that cannot listen fails the node's
    start with an error naming ``[imaging_source] dicom_port``; the HTTP and
    MLLP listeners bound before it are closed again."""
    ports = {}
    for name in ("registry", "repository", "imaging_source", "feed"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        settings = Settings().with_storage(tmp_path / "node").with_ports(**ports)
        settings = replace(
            settings,
            imaging_source=replace(
                settings.imaging_source, store_scp=True, dicom_port=taken
            ),
        )
        node = Node(settings)

        with pytest.raises(ConfigError, match=r"\[imaging_source\] dicom_port: "):
            node.start()

    for port in ports.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert node.services is None


def test_publish_shares_the_copy_it_checked_under_the_given_patient(
    patient_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``xdsi publish`` checks a private copy of each file and publishes
    that copy under ``--patient-id``: a source file changed after it was
    copied (an export still running) changes nothing that is shared."""
    folder = tmp_path / "export"
    shutil.copytree(dicom_path("study-mr", "images"), folder)
    originals = {p.name: p.read_bytes() for p in folder.iterdir()}
    send_message(
        patient_node.settings.node.host,
        patient_node.settings.registry.feed_port,
        build_feed(f"OTHER-1^^^&{patient_node.settings.node.assigning_authority}&ISO"),
    )
    real_copy = shutil.copyfile

    def copy_then_spoil(source: Path, target: Path) -> object:
        copied = real_copy(source, target)
        Path(source).write_bytes(b"\0" * 200)
        return copied

    monkeypatch.setattr(intake_module.shutil, "copyfile", copy_then_spoil)
    outcome = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "OTHER-1"
    )
    assert outcome.exit_code == 0, outcome.output
    assert "36 instances" in outcome.output

    held = {path.read_bytes() for path in _held(patient_node).values()}
    assert held == set(originals.values())
    with patient_node.services.engine.connect() as conn:
        assert conn.execute(select(imaging_study.c.patient_id)).scalar_one() == (
            f"OTHER-1^^^&{patient_node.settings.node.assigning_authority}&ISO"
        )
    assert len(_manifests(patient_node)) == 1


def _feed_first_and_second(node: RunningNode) -> str:
    """Feed patients FIRST-1 and SECOND-2; return their assigning authority."""
    authority = node.settings.node.assigning_authority
    for patient in ("FIRST-1", "SECOND-2"):
        send_message(
            node.settings.node.host,
            node.settings.registry.feed_port,
            build_feed(f"{patient}^^^&{authority}&ISO"),
        )
    return authority


def test_publish_under_another_patient_than_the_study_is_held_under_is_refused(
    patient_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITI TF-3 4.2.2.2.3: a replacement manifest keeps its patient, so a
    study held under one patient is not taken in under another; the user is
    told to remove it first, and the log names no patient."""
    authority = _feed_first_and_second(patient_node)
    folder = dicom_path("study-mr", "images")
    first = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "FIRST-1"
    )
    assert first.exit_code == 0, first.output

    copied = _copies(monkeypatch)
    again = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "SECOND-2"
    )

    assert again.exit_code == 1
    assert "held under another patient than the one given" in again.output
    assert f"xdsi --config {tmp_path / 'xdsi.toml'} remove" in again.output
    assert "FIRST-1" not in again.output
    assert len(_manifests(patient_node)) == 1
    assert copied == []

    # Removed (its manifest withdrawn), the study starts anew: published
    # under the other patient now, as the user was told.
    (study_uid,) = {m.study_instance_uid for m in _manifests(patient_node)}
    removed = _xdsi(patient_node, tmp_path, "remove", study_uid)
    assert removed.exit_code == 0, removed.output
    assert _manifests(patient_node)[0].status == "withdrawn"
    anew = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "SECOND-2"
    )
    assert anew.exit_code == 0, anew.output
    assert "published study" in anew.output
    with patient_node.services.engine.connect() as conn:
        patients = set(conn.execute(select(imaging_instance.c.patient_id)).scalars())
    assert patients == {f"SECOND-2^^^&{authority}&ISO"}
    found = patient_node.services.consumer.find(f"SECOND-2^^^&{authority}&ISO")
    assert len(found) == 1


def test_a_study_emptied_without_publishing_is_withdrawn_by_a_second_remove(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """RAD TF-3 4.68.4.1.2.3: a study emptied by ``remove --no-publish``
    keeps its manifest current, under its patient. Published under another
    patient, it is refused with what to do: withdraw the manifest. A second
    ``remove`` does so (it publishes the earlier removal) and succeeds, though
    nothing more is held; then the study starts anew."""
    authority = _feed_first_and_second(patient_node)
    folder = dicom_path("study-mr", "images")
    first = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "FIRST-1"
    )
    assert first.exit_code == 0, first.output
    (study_uid,) = {m.study_instance_uid for m in _manifests(patient_node)}
    emptied = _xdsi(patient_node, tmp_path, "remove", study_uid, "--no-publish")
    assert emptied.exit_code == 0, emptied.output

    refused = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "SECOND-2"
    )
    assert refused.exit_code == 1
    assert "holds no instance, but its manifest is still published" in (refused.output)
    assert f"--config {tmp_path / 'xdsi.toml'} remove {study_uid}" in refused.output
    assert "FIRST-1" not in refused.output

    withdrawn = _xdsi(patient_node, tmp_path, "remove", study_uid)
    assert withdrawn.exit_code == 0, withdrawn.output
    assert "withdrawn" in withdrawn.output
    assert [m.status for m in _manifests(patient_node)] == ["withdrawn"]

    # Nothing held and nothing left to publish: that is a failure again.
    nothing = _xdsi(patient_node, tmp_path, "remove", study_uid)
    assert nothing.exit_code == 1
    assert "nothing held matches" in nothing.output

    anew = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "SECOND-2"
    )
    assert anew.exit_code == 0, anew.output
    found = patient_node.services.consumer.find(f"SECOND-2^^^&{authority}&ISO")
    assert len(found) == 1


def test_import_of_a_study_held_under_another_patient_is_refused(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-3 4.2.2.2.3: a study published under a patient given with
    ``--patient-id`` is not taken in again under its images' own Patient ID
    by ``import`` (it would never be published under it); the user is told
    to remove it first, and nothing changes."""
    _feed_first_and_second(patient_node)
    patient_node.feed(MR_PATIENT)
    folder = dicom_path("study-mr", "images")
    first = _xdsi(
        patient_node, tmp_path, "publish", str(folder), "--patient-id", "FIRST-1"
    )
    assert first.exit_code == 0, first.output

    imported = _xdsi(patient_node, tmp_path, "import", str(folder))

    assert imported.exit_code != 0
    assert "held under another patient than its images' Patient ID" in (imported.output)
    assert "published already" not in imported.output
    assert len(_manifests(patient_node)) == 1
    assert patient_node.services.consumer.find(MR_PATIENT) == []


def test_removing_a_study_never_published_is_no_failure(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """RAD TF-3 4.68: a study taken in but never published, removed whole,
    has no manifest to withdraw; ``remove`` says so and succeeds."""
    patient_node.feed(MR_PATIENT)
    folder = dicom_path("study-mr", "images")
    kept = _xdsi(patient_node, tmp_path, "import", str(folder), "--no-publish")
    assert kept.exit_code == 0, kept.output
    (study_uid,) = {
        h.study_instance_uid for h in scan.scan_directory(folder).studies[0].instances
    }

    removed = _xdsi(patient_node, tmp_path, "remove", study_uid)

    assert removed.exit_code == 0, removed.output
    assert "nothing to withdraw" in removed.output
    assert "see the log" not in removed.output
    assert _manifests(patient_node) == []


@pytest.mark.parametrize(
    ("removed", "event_id"), [(1, "110103"), (2, "110105")], ids=["some", "all"]
)
def test_removing_instances_is_audited_as_instances_or_study_deleted(
    patient_node: RunningNode, removed: int, event_id: str
) -> None:
    """DICOM PS3.15 A.5.3.6: the Imaging Document Source that deletes
    instances writes DICOM Instances Accessed with action D, naming the
    patient and the study; when it deletes every instance of the study held,
    DICOM Study Deleted (A.5.3.8) instead. Each valid against the DICOM
    audit schema."""
    patient_node.feed(MR_PATIENT)
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    for path in images:
        patient_node.services.intake.accept(path)
    first = pydicom.dcmread(images[0], stop_before_pixels=True)
    study_uid = first.StudyInstanceUID
    before = len(list(patient_node.services.audit_spool.records()))

    sop_uids = [first.SOPInstanceUID] if removed == 1 else []
    assert (
        patient_node.services.intake.remove(study_uid, sop_instance_uids=sop_uids)
        == removed
    )

    (record,) = list(patient_node.services.audit_spool.records())[before:]
    assert record.valid
    assert record.event_id is not None and record.event_id.code == event_id
    root = etree.fromstring(record.xml)
    assert root.find("EventIdentification").get("EventActionCode") == "D"
    assert record.patient_ids == (MR_PATIENT,)
    objects = [
        o.get("ParticipantObjectID")
        for o in root.findall("ParticipantObjectIdentification")
    ]
    assert study_uid in objects


def test_headers_only_publication_holds_the_study_under_its_patient(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-3 4.2.2.2.3: a study published with ``--headers-only`` is held
    under the patient given, as intake holds it, so that neither path takes
    it in under another patient afterwards."""
    _feed_first_and_second(patient_node)
    folder = dicom_path("study-mr", "images")
    first = _xdsi(
        patient_node,
        tmp_path,
        "publish",
        str(folder),
        "--patient-id",
        "FIRST-1",
        "--headers-only",
    )
    assert first.exit_code == 0, first.output

    for extra in ((), ("--headers-only",)):
        again = _xdsi(
            patient_node,
            tmp_path,
            "publish",
            str(folder),
            "--patient-id",
            "SECOND-2",
            *extra,
        )
        assert again.exit_code == 1, again.output
        assert "held under another patient than the one given" in again.output
    assert len(_manifests(patient_node)) == 1


def test_a_damaged_dicomdir_falls_back_to_the_files_of_the_folder(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.10 8.6: a DICOMDIR that cannot be read is no reason to read
    nothing: every file under the folder is read instead, and nothing of
    the failure reaches the caller as a traceback."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    folder = tmp_path / "cd"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    (folder / "DICOMDIR").write_bytes(b"DICM" * 40)

    result = intake_node.services.intake.import_folder(folder)

    assert len(result.accepted) == 2
    assert result.refused == ()


def test_a_dicomdir_naming_a_file_outside_is_no_refused_instance(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 F.3.2.2: a DICOMDIR whose record names a file outside its
    folder is not followed; the folder's files are read instead, and the
    DICOMDIR, which is no instance, is not refused as a broken one (which
    would make the import exit 3 for a CD whose every image came in)."""
    first, second = _cd_of_two(tmp_path / "cd")
    dicomdir = tmp_path / "cd" / "DICOMDIR"
    directory = pydicom.dcmread(dicomdir)
    directory.DirectoryRecordSequence[-1].ReferencedFileID = ["..", "..", "etc"]
    directory.save_as(dicomdir)

    result = intake_node.services.intake.import_folder(tmp_path / "cd")

    assert sorted(a.sop_instance_uid for a in result.accepted) == sorted(
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        for path in (first, second)
    )
    assert result.refused == ()


def test_a_dicomdir_linked_from_elsewhere_reads_nothing_outside_the_folder(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.10 8.6: a file-set is the folder its DICOMDIR is in. A
    DICOMDIR that is a symbolic link to another file-set's (a CD made to
    read the host's files) is not followed: the folder's own files are
    read instead, symbolic links left out as ever."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    elsewhere = FileSet()
    elsewhere.add(pydicom.dcmread(images[0]))
    elsewhere.write(tmp_path / "elsewhere")
    folder = tmp_path / "cd"
    folder.mkdir()
    shutil.copy(images[1], folder / images[1].name)
    (folder / "DICOMDIR").symlink_to(tmp_path / "elsewhere" / "DICOMDIR")

    result = intake_node.services.intake.import_folder(folder)

    assert [a.sop_instance_uid for a in result.accepted] == [
        pydicom.dcmread(images[1], stop_before_pixels=True).SOPInstanceUID
    ]
    assert result.refused == ()


def _cd_of_two(folder: Path) -> tuple[Path, Path]:
    """A file-set of two MR images written to ``folder``; their paths."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    fileset = FileSet()
    for path in images:
        fileset.add(pydicom.dcmread(path))
    fileset.write(folder)
    first, second = sorted(Path(instance.path) for instance in fileset)
    return first, second


def test_a_dicomdir_whose_records_loop_is_read_to_its_end(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 F.3.2.1: a DICOMDIR's records are linked by offsets, which
    a CD made to stall its reader points back at a record already read. The
    records are read as the Directory Record Sequence holds them, so the
    import ends, with every file they reference."""
    first, second = _cd_of_two(tmp_path / "cd")
    dicomdir = tmp_path / "cd" / "DICOMDIR"
    directory = pydicom.dcmread(dicomdir)
    record = directory.DirectoryRecordSequence[0]
    record.OffsetOfTheNextDirectoryRecord = record.seq_item_tell
    directory.save_as(dicomdir)
    results: list[intake_module.ImportResult] = []
    importing = threading.Thread(
        target=lambda: results.append(
            intake_node.services.intake.import_folder(tmp_path / "cd")
        ),
        daemon=True,
    )

    importing.start()
    importing.join(timeout=120)

    assert not importing.is_alive(), "the import follows the loop"
    (result,) = results
    assert sorted(a.sop_instance_uid for a in result.accepted) == sorted(
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        for path in (first, second)
    )
    assert result.refused == ()


def test_a_fifo_the_dicomdir_lists_is_refused_unread(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 F.3.2.2: a Referenced File ID naming a FIFO is refused
    without being opened, whose reading would wait for a writer for ever;
    the other files are taken."""
    fifo, image = _cd_of_two(tmp_path / "cd")
    fifo.unlink()
    os.mkfifo(fifo)
    # Should the import open it, a writer lets it read an empty file.
    done = threading.Event()

    def writer() -> None:
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                done.wait(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        result = intake_node.services.intake.import_folder(tmp_path / "cd")
    finally:
        done.set()
        thread.join()

    assert [a.sop_instance_uid for a in result.accepted] == [
        pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID
    ]
    ((path, refusal),) = result.refused
    assert path == fifo
    assert refusal.rule == "unreadable"
    assert "no regular file" in refusal.reason


def test_a_folder_tree_deeper_than_the_recursion_limit_is_imported(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.10 8: every regular file under the folder is read, however
    deep it lies; a tree deeper than Python's recursion limit is walked,
    not turned into a RecursionError."""
    image = sorted(dicom_path("study-mr", "images").iterdir())[0]
    folder = deep = tmp_path / "cd"
    folder.mkdir()
    for _ in range(sys.getrecursionlimit() + 100):
        deep = deep / "d"
        deep.mkdir()
    shutil.copy(image, deep / "IM1")

    try:
        result = intake_node.services.intake.import_folder(folder)
    finally:
        # Removed from the bottom up: shutil.rmtree recurses too.
        (deep / "IM1").unlink()
        while deep != folder:
            deep.rmdir()
            deep = deep.parent

    assert [a.sop_instance_uid for a in result.accepted] == [
        pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID
    ]


def test_an_instance_held_in_another_study_is_refused(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.12.1.1.1: a file whose SOP Instance UID is held in
    another study is not that instance; it is refused, not counted as held."""
    whole = dicom_path("study-mr", "images", "000001.dcm")
    intake_node.services.intake.accept(whole)
    moved = pydicom.dcmread(whole)
    moved.StudyInstanceUID = pydicom.uid.generate_uid()
    moved.save_as(tmp_path / "moved.dcm")

    with pytest.raises(check.Refused, match="held already in study"):
        intake_node.services.intake.accept(tmp_path / "moved.dcm")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"SeriesInstanceUID": None}, "held already in series"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "as an instance of SOP Class"),
    ],
    ids=["series", "sop-class"],
)
def test_an_instance_held_as_another_is_refused_by_import_and_stow_rs(
    intake_node: RunningNode, tmp_path: Path, change: dict, said: str
) -> None:
    """DICOM PS3.3 C.12.1.1.1, PS3.4 6.5: a file whose SOP Instance UID is
    held in another series, or as an instance of another SOP Class, is not
    that instance: refused with A900 by import and STOW-RS alike (C-STORE
    takes the same path), never answered as held while the other is kept."""
    whole = dicom_path("study-mr", "images", "000001.dcm")
    intake_node.services.intake.accept(whole)
    other = pydicom.dcmread(whole)
    for keyword, value in change.items():
        value = value or pydicom.uid.generate_uid()
        setattr(other, keyword, value)
        if keyword == "SOPClassUID":
            other.file_meta.MediaStorageSOPClassUID = value
    other.save_as(tmp_path / "other.dcm")

    with pytest.raises(check.Refused, match=said) as refused:
        intake_node.services.intake.accept(tmp_path / "other.dcm")
    stowed = _stow(intake_node, [(tmp_path / "other.dcm").read_bytes()])

    assert refused.value.dimse_status == 0xA900
    assert stowed.status_code == 409
    (failed,) = stowed.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    held = _held(intake_node)
    assert list(held.values()) and all(
        p.read_bytes() == whole.read_bytes() for p in held.values()
    )


def test_one_study_taken_in_at_once_under_two_given_patients_keeps_the_first(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITI TF-3 4.2.2.2.3: two imports of one study at once under two
    patients given (``--patient-id``) both find it held under no one; the
    one that stores second is refused in the transaction that would store
    it, and the study stays the first patient's."""
    first, second = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    intake = intake_node.services.intake
    taken = intake.accept(first, patient_id="FIRST^^^&1.2.3.4.5&ISO")
    # As if the second had checked before the first stored.
    monkeypatch.setattr(type(intake), "other_patient", lambda *_, **__: None)

    with pytest.raises(check.Refused) as refused:
        intake.accept(second, patient_id="SECOND^^^&1.2.3.4.5&ISO")

    assert refused.value.rule == "command_mismatch"
    assert "FIRST" not in refused.value.reason
    assert "SECOND" not in refused.value.reason
    assert list(_held(intake_node)) == [taken.sop_instance_uid]
    assert intake.study_patient(taken.study_instance_uid) == ("FIRST^^^&1.2.3.4.5&ISO")


def test_an_instance_of_another_patient_is_refused_as_such_whichever_check_sees_it(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.3 C.7.2.1: an instance whose own Patient ID is not its
    study's is refused as other_patient, also when the check of the
    instances held found none yet (another intake of the study was
    committing) and the study's row tells it instead."""
    first, second = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    intake = intake_node.services.intake
    taken = intake.accept(first)
    other = pydicom.dcmread(second)
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(tmp_path / "other.dcm")
    # As if the first instance's row were not committed when it looked.
    monkeypatch.setattr(type(intake), "_refuse_mixed_patients", lambda *_: None)

    with pytest.raises(check.Refused) as refused:
        intake.accept(tmp_path / "other.dcm")

    assert refused.value.rule == "other_patient"
    assert (
        refused.value.dimse_status == refusal_table()["other_patient"]["dimse_status"]
    )
    assert "SOMEONE-ELSE" not in refused.value.reason
    assert list(_held(intake_node)) == [taken.sop_instance_uid]


def test_two_patients_sending_one_new_study_at_once_do_not_mix(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.2.1: two associations at once send the first
    instances of one new study under two patients; the study's row is taken
    before the patient is checked, so one patient's instances are taken in
    and the other's refused, never both."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:16]
    batches: dict[str, list[Path]] = {"A-PATIENT": [], "B-PATIENT": []}
    for n, path in enumerate(images):
        patient = "A-PATIENT" if n % 2 else "B-PATIENT"
        ds = pydicom.dcmread(path)
        ds.PatientID = patient
        target = tmp_path / f"{n:02d}.dcm"
        ds.save_as(target)
        batches[patient].append(target)
    intake = intake_node.services.intake
    start = threading.Barrier(2)

    def send(paths: list[Path]) -> int:
        start.wait()
        taken = 0
        for path in paths:
            try:
                intake.accept(path)
                taken += 1
            except check.Refused as exc:
                assert exc.rule == "other_patient"
        return taken

    with ThreadPoolExecutor(2) as pool:
        taken = list(pool.map(send, batches.values()))

    assert sorted(taken) == [0, 8]
    patients = {
        str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
        for p in _held(intake_node).values()
    }
    assert len(patients) == 1


def _sequence_as_text(source: Path, target: Path, tag: int) -> Path:
    """A copy of ``source`` under a fresh SOP Instance UID in which the
    sequence ``tag`` is sent as LO text, as a broken writer may."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    ds.add(pydicom.DataElement(tag, "LO", "abc"))
    ds.save_as(target)
    return target


@pytest.mark.parametrize(
    "tag",
    [0x00100024, 0x00081032],
    ids=["issuer-qualifiers-sequence", "procedure-code-sequence"],
)
def test_a_sequence_sent_as_text_is_refused_and_the_others_go_on(
    intake_node: RunningNode, tmp_path: Path, tag: int
) -> None:
    """DICOM PS3.5 7.1.2: a sequence element sent under another VR is no
    sequence to read; the instance is refused as unreadable by every intake
    (C-STORE, import), nothing of it kept, and the files beside it are
    taken in."""
    first, second = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    folder = tmp_path / "cd"
    folder.mkdir()
    broken = _sequence_as_text(first, folder / "1-broken.dcm", tag)
    shutil.copy(second, folder / "2-good.dcm")

    result = intake_node.services.intake.import_folder(folder)

    ((path, refusal),) = result.refused
    assert path == broken and refusal.rule == "unreadable"
    assert "DICOM PS3.5 7.1.2" in refusal.reason
    assert len(result.accepted) == 1
    again = _sequence_as_text(first, tmp_path / "sent.dcm", tag)
    sent = send_files([again], _scp(intake_node), calling_ae_title="X")
    assert sent.statuses[again] == 0xC001
    assert len(_held(intake_node)) == 1


def test_a_study_that_cannot_be_published_does_not_hold_up_the_others(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study whose publication fails with an error of the node's own is
    backed off as a refused submission is, and the studies after it in the
    same round are published."""
    intake = intake_node.services.intake
    source = intake_node.services.imaging_source
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    studies = []
    for n, path in enumerate(images):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
            pydicom.uid.generate_uid()
        )
        ds.save_as(tmp_path / f"{n}.dcm")
        studies.append(intake.accept(tmp_path / f"{n}.dcm").study_instance_uid)
    broken = min(studies)
    republish = source.republish

    def failing(study_instance_uid, *args, **kwargs):  # type: ignore[no-untyped-def]
        if study_instance_uid == broken:
            raise AttributeError("'str' object has no attribute 'get'")
        return republish(study_instance_uid, *args, **kwargs)

    monkeypatch.setattr(source, "republish", failing)

    published = intake.publish_due(quiet=0.0)

    assert [p.study_instance_uid for p in published] == [max(studies)]
    assert "AttributeError" in (intake.last_failure(broken) or "")
    assert intake.changed(broken)
    # Backed off: not tried again in the next round.
    assert intake.publish_due(quiet=0.0) == []


def test_stow_rs_part_failing_in_the_node_fails_alone_and_leaves_no_spool(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.18 10.5.3: a part the node fails on (an error of its own,
    not a refusal) is a Failed SOP Sequence item with Processing failure
    (0110, DICOM PS3.4 Table B.2-1); the other parts are stored and no part
    stays in the spool."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:3]
    intake = intake_node.services.intake
    accept = type(intake).accept
    broken = str(pydicom.dcmread(images[0], stop_before_pixels=True).SOPInstanceUID)

    def failing(self, path, **kwargs):  # type: ignore[no-untyped-def]
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        if uid == broken:
            raise AttributeError("'str' object has no attribute 'get'")
        return accept(self, path, **kwargs)

    monkeypatch.setattr(type(intake), "accept", failing)

    response = _stow(intake_node, [p.read_bytes() for p in images])

    assert response.status_code == 202
    (item,) = response.json()["00081198"]["Value"]
    assert item["00081155"]["Value"] == [broken]
    assert item["00081197"]["Value"] == [0x0110]
    assert len(response.json()["00081199"]["Value"]) == 2
    spool = intake_node.settings.storage / "imaging-source" / ".spool"
    assert [p for p in spool.rglob("*") if p.is_file()] == []


def test_stow_rs_answer_names_a_few_failed_parts_in_its_head(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.3: every failed part is in the body; the Warning
    header fields tell of the first 20 and how many more, so that the head
    stays within what HTTP clients take."""
    response = _stow(intake_node, [b"not dicom %d" % n for n in range(50)])

    assert response.status_code == 409
    assert len(response.json()["00081198"]["Value"]) == 50
    warnings = response.raw.headers.getlist("Warning")
    assert len(warnings) == 21
    assert "30 more parts failed" in warnings[-1]


def test_stow_rs_refusals_are_logged_once_a_reason(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Parts refused for one reason are logged once, with their number, not
    once a part: a request of many bad parts cannot flood the log."""
    with caplog.at_level(logging.WARNING, logger="xdsi.actors.stow"):
        response = _stow(intake_node, [b"not dicom"] * 40)

    assert response.status_code == 409
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].startswith("STOW-RS: 40 parts refused: ")


def test_stow_rs_request_of_too_many_parts_is_413_and_leaves_nothing(
    intake_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.18 Table 10.5.3-1: a request of more parts than the node
    takes (MAX_REQUEST_PARTS) is refused as it streams, 413 with why, and
    nothing of it is stored or stays in the spool."""
    monkeypatch.setattr(stow, "MAX_REQUEST_PARTS", 5)
    images = sorted(dicom_path("study-mr", "images").iterdir())[:6]

    response = _stow(intake_node, [p.read_bytes() for p in images])

    assert response.status_code == 413
    assert "more than 5 parts in one request" in response.text
    with intake_node.services.engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(imaging_instance)).scalar()
            == 0
        )
    spool = intake_node.settings.storage / "imaging-source" / ".spool"
    assert [p for p in spool.rglob("*") if p.is_file()] == []


def test_a_c_store_aborted_mid_way_leaves_no_partial_data_set(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.8 9.3.5, 9.3.8: a data set whose association is aborted
    before its last fragment is not kept, and nothing of it (patient data
    included) stays in the temporary directory the SCP receives into."""
    received = tmp_path / "received"
    received.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(received))
    ds = pydicom.dcmread(bundled_study() / "S1000" / "I0010.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        pydicom.uid.generate_uid()
    )
    # Large enough (32 MiB) to be caught mid-way.
    ds.Rows = ds.Columns = 4096
    ds.PixelData = bytes(4096 * 4096 * 2)
    assoc = _associate(intake_node, ds, "ABORTING")
    # A slow sender: the data set in 4 KiB P-DATA-TF PDUs (fewer bytes than
    # the SCP takes in one), each after a little wait, so that the abort
    # comes while the data set is on its way.
    monkeypatch.setattr(type(assoc.dimse), "maximum_pdu_size", property(lambda _: 4096))
    send_pdu = assoc.dul.send_pdu

    def slowly(primitive: object) -> None:
        time.sleep(0.005)
        send_pdu(primitive)

    assoc.dul.send_pdu = slowly  # type: ignore[method-assign]
    sending = threading.Thread(target=assoc.send_c_store, args=(ds,), daemon=True)
    sending.start()
    _wait(lambda: any(received.iterdir()), timeout=30)
    assoc.abort()
    sending.join(timeout=30)

    _wait(lambda: not any(received.iterdir()), timeout=10)
    assert _held(intake_node) == {}


def _associate(node: RunningNode, ds: pydicom.Dataset, ae_title: str) -> Any:
    """An association from ``ae_title`` to the node's C-STORE SCP, with one
    presentation context: ``ds``'s SOP Class in its transfer syntax."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    cfg = node.settings.imaging_source
    assoc = ae.associate(node.settings.node.host, cfg.dicom_port, ae_title=cfg.ae_title)
    assert assoc.is_established
    return assoc


def test_the_scp_offers_a_maximum_pdu_length(intake_node: RunningNode) -> None:
    """DICOM PS3.8 D.1.1, 9.3.5: the SCP offers a Maximum Length Received,
    so that a peer sends a large data set in P-DATA-TF PDUs no longer than
    that, each written out as it comes. Offered none (0), a peer such as
    pynetdicom sends a data set in one PDU, which the SCP's pynetdicom holds
    whole in memory: a 128 MiB one took 500 MiB."""
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    assoc = _associate(intake_node, ds, "LARGE")
    try:
        offered = assoc.acceptor.maximum_length
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()

    assert 0 < offered == store_scp_module.MAX_PDU_SIZE
    assert status.Status == SUCCESS


def test_a_data_set_of_too_many_sequence_items_is_refused_by_c_store_and_stow_rs(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.5 7.5, PS3.4 Table B.2-1, PS3.18 10.5.3: a data set of more
    sequence items than scan.MAX_SEQUENCE_ITEMS (here 200,000 empty ones in
    3.2 MB) is refused unread, C001 over C-STORE and 409 with Failure Reason
    C000 over STOW-RS, and nothing is stored."""
    path = with_sequence(tmp_path, empty_items(MANY))
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    # pynetdicom sends the data set as the file holds it, unread.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = _associate(intake_node, ds, "SEQUENCES")
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    response = _stow(intake_node, [path.read_bytes()])

    assert status.Status == refusal_table()["unreadable"]["dimse_status"]
    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert _held(intake_node) == {}


def _associate_rq(called: str, calling: str, sop_class_uid: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU (DICOM PS3.8 9.3.2) of one presentation context,
    ``sop_class_uid`` in Explicit VR Little Endian, offering a Maximum
    Length Received of 16 KiB."""

    def item(item_type: int, value: bytes) -> bytes:
        return struct.pack(">BBH", item_type, 0, len(value)) + value

    context = b"\x01\x00\x00\x00" + item(0x30, sop_class_uid.encode())
    context += item(0x40, pydicom.uid.ExplicitVRLittleEndian.encode())
    user = item(0x51, struct.pack(">L", 16384))
    user += item(0x52, pydicom.uid.PYDICOM_IMPLEMENTATION_UID.encode())
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(0x20, context)
        + item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _pdu(peer: socket.socket) -> tuple[int, bytes]:
    """The next PDU from ``peer``: its type and body (DICOM PS3.8 9.3.1)."""
    stream = peer.makefile("rb")
    pdu_type, _, length = struct.unpack(">BBL", stream.read(6))
    return pdu_type, stream.read(length)


def test_a_pdu_longer_than_the_maximum_offered_aborts_before_it_is_read(
    intake_node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.8 D.1.1, 9.3.5, Table 9-10 (Evt19): a peer sending a
    P-DATA-TF PDU longer than the Maximum Length Received the SCP offered
    is aborted (A-ABORT) as its header comes, before the SCP reads its body
    (pynetdicom alone waits for all 64 MiB, in memory); nothing is stored,
    and the SCP takes the next association."""
    caplog.set_level(logging.INFO, logger="xdsi")
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    scp = _scp(intake_node)
    with socket.create_connection((scp.host, scp.port), timeout=30) as peer:
        peer.sendall(_associate_rq(scp.ae_title, "LONGPDU", ds.SOPClassUID))
        assert _pdu(peer)[0] == 0x02  # A-ASSOCIATE-AC
        # A P-DATA-TF of 64 MiB announced, its first PDV begun.
        peer.sendall(struct.pack(">BBL", 0x04, 0, 64 << 20) + bytes(1024))

        pdu_type, body = _pdu(peer)

    assert (pdu_type, body[2]) == (0x07, 2)  # A-ABORT by the service provider
    assert any(
        "P-DATA-TF PDU of 67108864 bytes" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
    assoc = _associate(intake_node, ds, "NEXT")
    try:
        assert assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
    assert list(_held(intake_node)) == [ds.SOPInstanceUID]


def test_a_c_store_data_set_in_the_other_vr_encoding_than_its_context_is_refused(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.8 9.3.5, PS3.5 10.1: a data set comes in the transfer syntax
    of its presentation context, which the SCP writes in the File Meta of the
    file it keeps. One sent in Implicit VR on an Explicit VR Little Endian
    context is refused with C001 (pydicom alone would read it, no other
    reader of the file kept would), and nothing is stored."""
    ds = pydicom.dcmread(dicom_path("singles", "sr-basic-text__reportsi.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(
        pydicom.filebase.DicomFileLike(meta), ds.file_meta, enforce_standard=True
    )
    path = tmp_path / "implicit-as-explicit.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + encode(ds, True, True))
    # pynetdicom sends the data set as the file holds it, unconverted.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="IMPLICIT")
    ae.add_requested_context(ds.SOPClassUID, pydicom.uid.ExplicitVRLittleEndian)
    cfg = intake_node.settings.imaging_source
    assoc = ae.associate(
        intake_node.settings.node.host, cfg.dicom_port, ae_title=cfg.ae_title
    )
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()

    assert status.Status == refusal_table()["unreadable"]["dimse_status"]
    assert _held(intake_node) == {}


def test_data_sets_cut_off_by_the_next_c_store_command_leave_nothing(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.8 9.3.5, PS3.7 9.3.1.1: a peer that sends the next C-STORE
    command before the last fragment of a data set cuts that data set off.
    Nothing of it is kept, nor left (patient data included) in the temporary
    directory the SCP receives into once the association ends; the data set
    sent whole is stored."""
    received = tmp_path / "received"
    received.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(received))
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    assoc = _associate(intake_node, ds, "CUTTING")
    (context,) = assoc.accepted_contexts

    def fragments(sop_instance_uid: str) -> list[P_DATA]:
        """The P-DATA of one C-STORE request, 1 KiB at most each."""
        ds.SOPInstanceUID = sop_instance_uid
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = ds.SOPClassUID
        request.AffectedSOPInstanceUID = sop_instance_uid
        request.Priority = 2
        request.DataSet = io.BytesIO(encode(ds, False, True))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        return list(message.encode_msg(context.context_id, 1024))

    cut_off = [pydicom.uid.generate_uid() for _ in range(3)]
    for sop_instance_uid in cut_off:
        # The command, and the first fragment of its data set only.
        for primitive in fragments(sop_instance_uid)[:2]:
            assoc.dul.send_pdu(primitive)
    whole = pydicom.uid.generate_uid()
    for primitive in fragments(whole):
        assoc.dul.send_pdu(primitive)
    _wait(lambda: whole in _held(intake_node))
    assoc.release()

    _wait(lambda: not any(received.iterdir()))
    assert list(_held(intake_node)) == [whole]


def test_an_instance_held_already_sent_for_another_patient_is_refused(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.2.1: a copy of an instance held already that names
    another patient is refused as naming another patient by every intake,
    not answered as held (C-STORE Success would tell the sender it was
    stored)."""
    whole = dicom_path("study-mr", "images", "000001.dcm")
    intake = intake_node.services.intake
    intake.accept(whole)
    other = pydicom.dcmread(whole)
    other.PatientID = "SOMEONE-ELSE"
    other.save_as(tmp_path / "other.dcm")

    sent = send_files([tmp_path / "other.dcm"], _scp(intake_node), calling_ae_title="X")

    assert sent.statuses[tmp_path / "other.dcm"] == 0xC004
    with pytest.raises(check.Refused) as refused:
        intake.accept(tmp_path / "other.dcm", move=False)
    assert refused.value.rule == "other_patient"


def test_one_issuer_given_in_either_attribute_is_one_patient(
    intake_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.1.1: Issuer of Patient ID 1.2.3.4.5 and an Issuer of
    Patient ID Qualifiers Sequence naming 1.2.3.4.5, alone or beside it,
    name one issuer: the instances are of one patient."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:3]
    intake = intake_node.services.intake
    first = pydicom.dcmread(images[0])
    first.IssuerOfPatientID = "1.2.3.4.5"
    first.save_as(tmp_path / "first.dcm")
    held = intake.accept(tmp_path / "first.dcm")
    alone = _qualified(images[1], tmp_path / "alone.dcm", "1.2.3.4.5")
    beside = pydicom.dcmread(_qualified(images[2], tmp_path / "b.dcm", "1.2.3.4.5"))
    beside.IssuerOfPatientID = "1.2.3.4.5"
    beside.save_as(tmp_path / "beside.dcm")

    for path in (alone, tmp_path / "beside.dcm"):
        taken = intake.accept(path)
        assert taken.study_instance_uid == held.study_instance_uid
    assert len(_held(intake_node)) == 3


def test_stow_rs_names_an_instance_refused_for_another_patient(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.18 10.5.3: the Failed SOP Sequence item of an instance
    refused once stored (its study is held under another patient, given to
    publish it) names its SOP Class and Instance UIDs."""
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    intake_node.services.intake.accept(images[0], patient_id="GIVEN^^^&1.2.3.4&ISO")
    later = pydicom.dcmread(images[1], stop_before_pixels=True)

    response = _stow(intake_node, [images[1].read_bytes()])

    assert response.status_code == 409
    (item,) = response.json()["00081198"]["Value"]
    assert item["00081150"]["Value"] == [later.SOPClassUID]
    assert item["00081155"]["Value"] == [later.SOPInstanceUID]


def test_free_text_with_control_characters_is_published_with_them_replaced(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """XML 1.0 2.2 carries no C0 control character but TAB, LF and CR: a
    study whose descriptions or names hold one (a modality's stray byte) is
    published all the same, each such character written as U+FFFD in the
    metadata, rather than failing every publishing round."""
    patient_node.feed(MR_PATIENT)
    folder = tmp_path / "ctrl"
    folder.mkdir()
    images = sorted(dicom_path("study-mr", "images").iterdir())[:2]
    for number, source in enumerate(images):
        ds = pydicom.dcmread(source)
        ds.StudyDescription = "HEAD\x01MR"
        ds.PatientName = "DOE\x03^JOHN"
        ds.save_as(folder / f"{number}.dcm")
    (study,) = scan.scan_directory(folder).studies

    patient_node.services.imaging_source.publish(study, MR_PATIENT)

    (manifest,) = _manifests(patient_node)
    with patient_node.services.engine.connect() as conn:
        xml = conn.execute(
            select(registry_object.c.xml).where(
                registry_object.c.entry_uuid == manifest.entry_uuid
            )
        ).scalar_one()
    entry = etree.fromstring(xml)
    said = [v for e in entry.iter() for v in [e.text or "", *e.attrib.values()]]
    assert "PID-5|DOE\ufffd^JOHN" in said
    assert "HEAD\ufffdMR" in said
    assert not any(ord(c) < 0x20 and c not in "\t\n\r" for v in said for c in v)


def test_verify_finds_a_copy_damaged_in_place_and_one_gone(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """``xdsi verify`` reads every stored document and instance back: all as
    stored, it exits 0; an instance overwritten in place with its size kept
    (which serving does not see) and one whose file is gone are named by
    SOP Instance UID and study (what ``remove`` takes to repair them), and
    it exits 3, which a scrub run from cron tells from a verify that could
    not run (1)."""
    patient_node.feed(MR_PATIENT)
    images = sorted(dicom_path("study-mr", "images").iterdir())[:3]
    (study,) = scan.scan_files(images).studies
    patient_node.services.imaging_source.publish(study, MR_PATIENT)

    clean = _xdsi(patient_node, tmp_path, "verify")
    assert clean.exit_code == 0, clean.output
    # Three instances and the manifest the repository keeps.
    assert "4 stored copies verified, all as stored" in clean.output

    held = _held(patient_node)
    damaged, gone, _ = sorted(held)
    data = bytearray(held[damaged].read_bytes())
    data[200:210] = b"\x00" * 10 if data[200:210] != b"\x00" * 10 else b"\x01" * 10
    held[damaged].write_bytes(bytes(data))
    held[gone].unlink()

    found = _xdsi(patient_node, tmp_path, "verify")

    assert found.exit_code == EXIT_DAMAGED
    of_study = f"of study {study.study_instance_uid}"
    assert f"instance {damaged} {of_study}: SHA256 differs" in found.output
    assert f"instance {gone} {of_study}: missing" in found.output
    assert "2 stored copies of 4 missing or damaged" in found.output
    assert "IDS-DEPT002" not in found.output


# --- audit of intake (DICOM PS3.15 A.5.3.5, A.5.3.7) --------------------------


def _records_since(node: RunningNode, before: int, event_id: str) -> list:
    """The audit records of EventID ``event_id`` spooled after the first
    ``before`` (publishing writes others meanwhile)."""
    return [
        r
        for r in list(node.services.audit_spool.records())[before:]
        if r.event_id is not None and r.event_id.code == event_id
    ]


def _full_disk(messages: list[bytes]) -> list[Path]:
    raise OSError(28, "No space left on device")


def _participants(record: Any) -> list[tuple[str, str, str | None, str]]:
    """UserID, UserIsRequestor, NetworkAccessPointID and RoleIDCode of each
    ActiveParticipant."""
    root = etree.fromstring(record.xml)
    return [
        (
            p.get("UserID"),
            p.get("UserIsRequestor"),
            p.get("NetworkAccessPointID"),
            p.find("RoleIDCode").get("csd-code"),
        )
        for p in root.findall("ActiveParticipant")
    ]


def _action(record) -> str:  # type: ignore[no-untyped-def]
    return (
        etree.fromstring(record.xml).find("EventIdentification").get("EventActionCode")
    )


def test_a_cstore_association_is_audited_as_instances_transferred(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.15 A.5.3.7: each association's instances are recorded at the
    receiving node as DICOM Instances Transferred, one record per patient
    naming its study: action C when new, R when held already; the sending
    AE (Source, the requestor) and this SCP (Destination). Valid against
    the DICOM audit schema."""
    images = sorted(dicom_path("study-mr", "images").iterdir())
    study_uid = pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID
    cfg = intake_node.settings.imaging_source
    before = len(list(intake_node.services.audit_spool.records()))

    send_files(images[:3], _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_records_since(intake_node, before, "110104")) == 1)
    send_files(images[:2], _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_records_since(intake_node, before, "110104")) == 2)

    created, read = _records_since(intake_node, before, "110104")
    for record in (created, read):
        assert record.valid
        assert record.outcome == 0
        assert record.event_type is None
        assert record.patient_ids == (MR_PATIENT,)
        assert study_uid in record.object_ids
        assert _participants(record) == [
            ("TESTSCU", "true", "127.0.0.1", "110153"),
            (cfg.ae_title, "false", "127.0.0.1", "110152"),
        ]
    assert (_action(created), _action(read)) == ("C", "R")


def test_an_undecodable_command_aborts_and_audits_what_was_stored(
    intake_node: RunningNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DICOM PS3.8 Table 9-10 (Evt19), PS3.15 A.5.3.7: a C-STORE command the
    SCP cannot decode (here without its Affected SOP Class UID, DICOM PS3.7
    Table 9.3-1) aborts the association, which then ends as any other: what
    it stored before is audited, and nothing is left of the data set file
    opened for the command."""
    caplog.set_level(logging.INFO, logger="xdsi")
    received = tmp_path / "received"
    received.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(received))
    before = len(list(intake_node.services.audit_spool.records()))
    ds = pydicom.dcmread(dicom_path("singles", "ts-explicit-le__CT_small.dcm"))
    assoc = _associate(intake_node, ds, "UNDECODABLE")
    assert assoc.send_c_store(ds).Status == SUCCESS
    command = pydicom.Dataset()
    command.CommandGroupLength = 0
    command.CommandField = 0x0001  # C-STORE-RQ
    command.MessageID = 2
    command.Priority = 2
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = pydicom.uid.generate_uid()
    (context,) = assoc.accepted_contexts
    primitive = P_DATA()
    primitive.presentation_data_value_list.append(
        (context.context_id, b"\x03" + encode(command, True, True))
    )

    assoc.dul.send_pdu(primitive)

    _wait(lambda: len(_records_since(intake_node, before, "110104")) == 1)
    (record,) = _records_since(intake_node, before, "110104")
    assert ds.StudyInstanceUID in record.object_ids
    assert list(received.iterdir()) == []
    ended = [
        r.getMessage() for r in caplog.records if "association from" in r.getMessage()
    ]
    assert len(ended) == 1
    assert "aborted (A-P-ABORT" in ended[0]
    assert ", 1 stored," in ended[0]


def test_a_cstore_association_with_refusals_records_a_failure(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.15 A.5.1, A.5.3.7: instances refused in an association give
    a record whose EventOutcomeIndicator is a failure (4 when others were
    kept), naming the patient and study of the refused instance, whose
    header could be read."""
    good = dicom_path("study-mr", "images")
    image = sorted(good.iterdir())[0]
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    header = pydicom.dcmread(bad, stop_before_pixels=True)
    before = len(list(intake_node.services.audit_spool.records()))

    send_files([image, bad], _scp(intake_node), calling_ae_title="TESTSCU")
    _wait(lambda: len(_records_since(intake_node, before, "110104")) == 2)

    records = _records_since(intake_node, before, "110104")
    assert all(r.valid for r in records)
    assert sorted(r.outcome for r in records) == [0, 4]
    (failure,) = [r for r in records if r.outcome == 4]
    assert failure.patient_ids == (intake_node.services.intake.patient_id(header),)
    assert header.StudyInstanceUID in failure.object_ids
    assert b"1 of 2 instances refused" in failure.xml


def test_stow_rs_refusals_are_audited_by_patient_and_study(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.15 A.5.3.7: a STOW-RS request whose instances were all
    refused gives a record of outcome 8 naming the patient and study of
    each refused instance whose header could be read, and one naming no
    object for a part that is no readable data set."""
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    header = pydicom.dcmread(bad, stop_before_pixels=True)
    not_dicom = dicom_path("bad", "gzip-not-dicom__zipMR.gz")
    before = len(list(intake_node.services.audit_spool.records()))

    answer = _stow(intake_node, [bad.read_bytes(), not_dicom.read_bytes()])

    assert answer.status_code == 409
    records = _records_since(intake_node, before, "110104")
    assert all(r.valid for r in records)
    assert [r.outcome for r in records] == [8, 8]
    named, unnamed = records
    assert named.patient_ids == (intake_node.services.intake.patient_id(header),)
    assert header.StudyInstanceUID in named.object_ids
    assert b"1 of 2 instances refused" in named.xml
    assert (unnamed.patient_ids, unnamed.object_ids) == ((), ())
    assert b"1 of 2 instances refused" in unnamed.xml


def test_a_stow_rs_request_is_audited_before_its_answer(
    intake_node: RunningNode,
) -> None:
    """DICOM PS3.15 A.5.3.7: a STOW-RS request's instances are recorded as
    DICOM Instances Transferred, action C, before the answer: the user
    agent (Source, the requestor) and the STOW-RS service (Destination)."""
    image = sorted(dicom_path("study-mr", "images").iterdir())[0]
    study_uid = pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID
    before = len(list(intake_node.services.audit_spool.records()))

    answer = _stow(intake_node, [image.read_bytes()])

    assert answer.status_code == 200
    (record,) = _records_since(intake_node, before, "110104")
    assert record.valid
    assert (_action(record), record.outcome) == ("C", 0)
    assert record.patient_ids == (MR_PATIENT,)
    assert study_uid in record.object_ids
    stow_url = dict(intake_node.settings.imaging_endpoints())["stow-rs"]
    assert _participants(record) == [
        ("127.0.0.1", "true", "127.0.0.1", "110153"),
        (stow_url, "false", "127.0.0.1", "110152"),
    ]


def test_stow_rs_without_its_audit_record_keeps_nothing_and_answers_500(
    intake_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.15 A.5: no instance is kept unrecorded; when the record
    cannot be spooled (a full disk) the instances the request brought are
    taken back out and it is answered 500."""
    image = sorted(dicom_path("study-mr", "images").iterdir())[0]
    auditor = intake_node.services.imaging_source.auditor
    monkeypatch.setattr(auditor.spool, "write_all", _full_disk)

    answer = _stow(intake_node, [image.read_bytes()])

    assert answer.status_code == 500
    assert "audit record" in answer.text
    assert _held(intake_node) == {}
    monkeypatch.undo()
    assert _stow(intake_node, [image.read_bytes()]).status_code == 200
    assert len(_held(intake_node)) == 1


def test_an_import_is_audited_as_data_import_from_its_folder(
    patient_node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM PS3.15 A.5.3.5: a folder taken in is recorded as Import (110107,
    action C), the importing process the requestor and the folder the
    Source Media, by its URI (MediaType 110037, DICOM PS3.16 CID 405); one
    record per patient naming its study. No patient id is logged at INFO."""
    folder = dicom_path("study-mr", "images")
    images = sorted(folder.iterdir())
    study_uid = pydicom.dcmread(images[0], stop_before_pixels=True).StudyInstanceUID
    before = len(list(patient_node.services.audit_spool.records()))

    with caplog.at_level(logging.INFO):
        result = _xdsi(patient_node, tmp_path, "import", str(folder), "--no-publish")

    assert result.exit_code == 0, result.output
    (record,) = _records_since(patient_node, before, "110107")
    assert record.valid
    assert (_action(record), record.outcome) == ("C", 0)
    assert record.patient_ids == (MR_PATIENT,)
    assert study_uid in record.object_ids
    root = etree.fromstring(record.xml)
    importer, medium = root.findall("ActiveParticipant")
    assert importer.get("UserIsRequestor") == "true"
    assert importer.find("RoleIDCode").get("csd-code") == "110152"
    assert medium.get("UserID") == folder.resolve().as_uri()
    assert medium.get("UserIsRequestor") == "false"
    assert medium.find("RoleIDCode").get("csd-code") == "110155"
    assert medium.find("MediaIdentifier/MediaType").get("csd-code") == "110037"
    patient = MR_PATIENT.split("^")[0]
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and patient in r.getMessage()
    ]


def test_an_import_without_its_audit_record_keeps_nothing(
    patient_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.15 A.5: when the Import record cannot be spooled the
    instances the import took in are taken back out and it fails."""
    folder = dicom_path("study-mr", "images")
    auditor = patient_node.services.imaging_source.auditor
    monkeypatch.setattr(auditor.spool, "write_all", _full_disk)

    with pytest.raises(intake_module.NotAudited, match="taken back out"):
        patient_node.services.intake.import_folder(folder)

    assert _held(patient_node) == {}


def test_a_refusal_kept_until_its_exchange_ends_holds_no_data_set(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refused instance is kept until its association, request or
    import ends, for its audit record (DICOM PS3.15 A.5.3.7, A.5.3.5); what
    is kept of it is its refusal alone, not the traceback whose frames
    hold the refused data set (its pixel data included), which a peer
    sending refused instances one after another would pile up in memory."""
    bad = dicom_path("bad", "truncated-pixeldata__MR_truncated.dcm")
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(bad, folder)
    refusals: list[check.Refused] = []
    real = intake_module.received_events

    def noted(transaction: str, accepted: Any, refused: Any, **endpoints: Any) -> Any:
        refusals.extend(refused)
        return real(transaction, accepted, refused, **endpoints)

    for module in (intake_module, stow, store_scp_module):
        monkeypatch.setattr(module, "received_events", noted)

    send_files([bad], _scp(intake_node), calling_ae_title="TESTSCU")
    assert _stow(intake_node, [bad.read_bytes()]).status_code == 409
    imported = intake_node.services.intake.import_folder(folder)
    assert imported.accepted == ()
    _wait(lambda: len(refusals) == 3)

    for refusal in refusals:
        assert refusal.rule == "unreadable"
        assert refusal.__traceback__ is None
        assert refusal.__cause__ is None
        assert refusal.__context__ is None


def test_a_second_ctrl_c_stops_the_import_at_once_and_records_what_it_took_in(
    patient_node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.15 A.5: a second Ctrl-C (SIGINT) stops an import at once,
    in the midst of an instance; the instances taken in before it stay and
    are recorded as imported (A.5.3.5), none kept unrecorded."""
    import signal

    folder = dicom_path("study-mr", "images")
    intake = patient_node.services.intake
    accept = intake.accept
    files: list[Path] = []

    def interrupted_at_the_third(path: Path, **kwargs: object) -> Any:
        if not kwargs.get("move"):
            files.append(path)
        if len(files) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        return accept(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "accept", interrupted_at_the_third)
    before = len(list(patient_node.services.audit_spool.records()))

    with pytest.raises(intake_module.ImportInterrupted) as stopped:
        intake.import_folder(folder)

    assert stopped.value.kept == 2
    assert len(_held(patient_node)) == 2
    (record,) = _records_since(patient_node, before, "110107")
    assert record.valid
    assert record.outcome == 0


def test_connections_that_send_nothing_give_their_place_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DICOM PS3.8 9.1.5 (ARTIM): a connection that never sends its
    A-ASSOCIATE-RQ, even one its peer closed at once, holds one of the
    SCP's places only until the ACSE timeout; a sender coming after such
    connections filled every place is taken in once they lapse."""
    monkeypatch.setattr(store_scp_module, "MAX_ASSOCIATIONS", 2)
    monkeypatch.setattr(store_scp_module, "ACSE_TIMEOUT", 0.5)
    running = _started(tmp_path, store_scp=True, dicom_port=0, publish_after=60.0)
    node = next(running)
    try:
        scp = _scp(node)
        for _ in range(2):
            socket.create_connection((scp.host, scp.port), timeout=5).close()
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + 20
        while True:
            assoc = ae.associate(scp.host, scp.port, ae_title=scp.ae_title)
            if assoc.is_established:
                assoc.release()
                break
            assert time.monotonic() < deadline, "the places were never given back"
            time.sleep(0.2)
    finally:
        next(running, None)


def test_a_kept_file_that_cannot_be_read_back_is_refused_and_removed(
    intake_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file stored but unreadable when hashed (a failing disk) is refused
    as a storage failure, and its stored copy removed: no file stays in the
    store that no row names."""
    store = intake_node.services.intake.source.blobs.root
    before = {p for p in store.rglob("*") if p.is_file()}

    def failing(path: Path) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(intake_module, "sha256_file", failing)
    folder = tmp_path / "cd"
    folder.mkdir()
    shutil.copy(dicom_path("study-mr", "images", "000001.dcm"), folder / "1")

    result = intake_node.services.intake.import_folder(folder)

    assert not result.accepted
    ((_, refused),) = result.refused
    assert refused.rule == "storage"
    assert {p for p in store.rglob("*") if p.is_file()} - before == set()


@pytest.mark.parametrize(
    "arguments",
    [
        ("not-a-uid",),
        ("1.2.3", "--series", "1.2.3/../x"),
        ("1.2.3", "--instance", "1.2.3.4", "--instance", "1..2"),
    ],
    ids=["study", "series", "instance"],
)
def test_remove_of_what_is_no_uid_is_a_wrong_argument(
    patient_node: RunningNode, tmp_path: Path, arguments: tuple[str, ...]
) -> None:
    """DICOM PS3.5 9.1: a value that is no UID names nothing the node can
    hold; it is a usage error (exit 2), not "nothing held matches"."""
    outcome = _xdsi(patient_node, tmp_path, "remove", *arguments)

    assert outcome.exit_code == 2, outcome.output
    assert "is no UID" in outcome.output
    assert "removed" not in outcome.output


def test_a_node_starting_removes_what_killed_intakes_left_in_its_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Partial copies of instances (patient data) left in the spool by an
    import, STOW-RS or publication killed on the way are removed as the node
    starts serving; those of an import at work beside it stay. The log says
    how many, naming no file."""
    spool = tmp_path / "node" / "imaging-source" / ".spool"
    spool.mkdir(parents=True)
    left = [
        left_by_killed_process(spool, "accept"),
        left_by_killed_process(spool, "stow"),
    ]
    kept_long_ago = spool / "keep-3f1d5b0e2c7a4e8f9b6d1a2c3e4f5a6b"
    kept_long_ago.write_bytes(b"a partial copy")
    a_day_ago = time.time() - blobs.STALE_AFTER - 60
    os.utime(kept_long_ago, (a_day_ago, a_day_ago))

    with spooling(spool, "accept") as live, caplog.at_level(logging.INFO):
        running = _started(tmp_path, publish_after=3600.0)
        next(running)
        try:
            assert live.is_file()
        finally:
            next(running, None)

    assert [p for p in [*left, kept_long_ago] if p.exists()] == []
    (swept,) = [r for r in caplog.records if r.name == "xdsi.store.blobs"]
    assert swept.levelno == logging.INFO
    assert swept.getMessage() == (
        "spool of imaging-source: 3 entries left by processes gone removed"
    )


def test_an_import_removes_what_a_killed_import_left_in_the_spool(
    patient_node: RunningNode, tmp_path: Path
) -> None:
    """An ``import`` starting removes the partial copies an import killed
    on the way left, not those of a serving node or import at work."""
    spool = patient_node.settings.storage / "imaging-source" / ".spool"
    left = left_by_killed_process(spool, "accept")

    with spooling(spool, "accept") as live:
        outcome = _xdsi(
            patient_node,
            tmp_path,
            "import",
            str(dicom_path("study-mr", "images")),
            "--no-publish",
        )

        assert outcome.exit_code == 0, outcome.output
        assert live.is_file()
    assert not left.exists()


def test_a_c_store_data_set_larger_than_max_request_size_is_refused_unkept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A data set of no end cannot fill the disk: one past [node]
    max_request_size, as a STOW-RS body would be, aborts its association
    (DICOM PS3.8 7.3) as it grows past it; nothing of it is kept, its file
    is removed, and the SCP takes the next association."""
    from pynetdicom import AE as Sender

    big = dicom_path("singles", "mg-screening-jpegll__GH133.dcm")
    small = sorted(dicom_path("study-mr", "images").iterdir())[0]
    caplog.set_level(logging.INFO, logger="xdsi")
    received: list[Path] = []
    made = store_scp_module._NAMED_TEMPORARY_FILE

    def noted(*args: object, **kwargs: object) -> object:
        file = made(*args, **kwargs)
        received.append(Path(file.name))
        return file

    store_scp_module._NAMED_TEMPORARY_FILE = noted
    running = _started(
        tmp_path,
        node={"max_request_size": 1 << 20},
        store_scp=True,
        dicom_port=0,
        publish_after=0,
    )
    try:
        node = next(running)
        effective = node.settings
        cfg = effective.imaging_source
        sender = Sender(ae_title="TESTSCU")
        for path in (big, small):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sender.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)

        first = sender.associate(
            effective.node.host, cfg.dicom_port, ae_title=cfg.ae_title
        )
        assert first.is_established
        status = first.send_c_store(pydicom.dcmread(big))
        assert not status or status.Status != SUCCESS
        _wait(lambda: not first.is_alive())

        second = sender.associate(
            effective.node.host, cfg.dicom_port, ae_title=cfg.ae_title
        )
        assert second.send_c_store(pydicom.dcmread(small)).Status == SUCCESS
        second.release()
        with node.services.engine.connect() as conn:
            held = conn.execute(select(imaging_instance.c.sop_instance_uid)).scalars()
            assert list(held) == [pydicom.dcmread(small).SOPInstanceUID]
    finally:
        next(running, None)
        store_scp_module._NAMED_TEMPORARY_FILE = made

    assert received and not [path for path in received if path.exists()]
    assert any(
        "larger than [node] max_request_size" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )

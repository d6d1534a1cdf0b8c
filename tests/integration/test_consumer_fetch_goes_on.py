"""A fetch of a patient's priors from several sources: one source that
cannot be reached, or one manifest that cannot be retrieved, leaves the
others fetched, and is said as the failure it is (exit status 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import update

from tests.conftest import ROOT, dicom_path
from tests.integration.conftest import PATIENT, RunningNode
from tests.integration.test_command_line import _xdsi, served  # noqa: F401 (fixture)
from xdsi.actors.document_source import DocumentSource
from xdsi.cli import EXIT_NOT_FOUND, bundled_study
from xdsi.dicom import kos, scan
from xdsi.store.schema import repository_document

# A Retrieve Location UID no Consumer here has an endpoint for.
ELSEWHERE = "1.3.6.1.4.1.21367.13.80.999"


def _manifest_elsewhere(path: Path) -> tuple[Path, scan.Study]:
    """A manifest of the bundled CT held at a source that is not configured."""
    (study,) = scan.scan_directory(bundled_study()).studies
    manifest = kos.build_manifest(
        study, retrieve_ae_title="ELSEWHERE", retrieve_location_uid=ELSEWHERE
    )
    kos.write_manifest(manifest, path)
    return path, study


def _lost_manifest(running_node: RunningNode, tmp_path: Path) -> str:
    """Register a manifest for PATIENT (fed) that the repository then no
    longer holds as retrievable; its uniqueId."""
    assert "MSA|AA" in running_node.feed()
    elsewhere, _ = _manifest_elsewhere(tmp_path / "elsewhere.dcm")
    (lost,) = (
        DocumentSource(running_node.settings, tmp_path / "spool")
        .submit([elsewhere], PATIENT, mime_type="application/dicom")
        .document_unique_ids
    )
    with running_node.services.engine.begin() as conn:
        conn.execute(
            update(repository_document)
            .where(repository_document.c.unique_id == lost)
            .values(state="lost-in-test")
        )
    return lost


def _mr() -> scan.Study:
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
    return study


def test_a_source_that_cannot_be_asked_leaves_the_others_fetched(
    running_node: RunningNode, tmp_path: Path
):
    """RAD TF-3 4.69: each Retrieve Location is asked on its own; one with no
    endpoint fails alone, its instances counted as not returned."""
    assert "MSA|AA" in running_node.feed()
    elsewhere, ct = _manifest_elsewhere(tmp_path / "elsewhere.dcm")
    DocumentSource(running_node.settings, tmp_path / "spool").submit(
        [elsewhere], PATIENT, mime_type="application/dicom"
    )
    mr = _mr()
    running_node.services.imaging_source.publish(mr, PATIENT)

    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert len(result.manifests) == 2
    assert {p.stem for p in result.instances} == {
        h.sop_instance_uid for h in mr.instances
    }
    ((what, reason),) = result.failed
    assert ELSEWHERE in what
    assert f"no endpoint is configured for repositoryUniqueId {ELSEWHERE}" in reason
    assert sorted(result.missing) == sorted(h.sop_instance_uid for h in ct.instances)


def test_a_manifest_the_repository_lost_leaves_the_others_fetched(
    running_node: RunningNode, tmp_path: Path
):
    """ITI TF-2 3.43: a manifest the repository answers with an error for
    fails alone; the patient's other manifests and images are fetched."""
    lost = _lost_manifest(running_node, tmp_path)
    mr = _mr()
    running_node.services.imaging_source.publish(mr, PATIENT)

    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert len(result.manifests) == 1
    assert len(result.instances) == len(mr.instances)
    ((what, reason),) = result.failed
    assert what == f"manifest {lost}"
    assert "XDSDocumentUniqueIdError" in reason
    assert not (tmp_path / "out" / "manifests" / f"{lost}.dcm").exists()


def test_a_fetch_whose_every_manifest_failed_leaves_no_empty_folder(
    running_node: RunningNode, tmp_path: Path
):
    """ITI TF-2 3.43: the patient's one manifest cannot be retrieved; the
    fetch fails and leaves no empty manifests folder behind."""
    _lost_manifest(running_node, tmp_path)

    result = running_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert result.manifests == [] and len(result.failed) == 1
    assert not (tmp_path / "out" / "manifests").exists()


def test_fetch_says_what_failed_after_what_it_fetched(
    served: Path,  # noqa: F811 (fixture)
    tmp_path: Path,
):
    """The command line: the instances that came are written and counted,
    the failure is named on stderr, and the exit status is 1."""
    assert "ACK AA" in _xdsi(served, "feed", "GOES-ON-1").stdout
    elsewhere, ct = _manifest_elsewhere(tmp_path / "elsewhere.dcm")
    _xdsi(
        served,
        "submit",
        str(elsewhere),
        "--patient-id",
        "GOES-ON-1",
        "--mime-type",
        "application/dicom",
    )
    images = dicom_path("study-mr", "images")
    _xdsi(served, "publish", str(images), "--patient-id", "GOES-ON-1")

    fetched = _xdsi(
        served,
        "fetch",
        "--patient-id",
        "GOES-ON-1",
        "--out",
        str(tmp_path / "out"),
        check=False,
    )

    assert fetched.returncode == 1
    assert "2 manifests, 36 instances" in fetched.stdout
    assert "  failed: images of manifest " in fetched.stderr
    assert f"at {ELSEWHERE}: no endpoint is configured" in fetched.stderr
    assert "1 retrieve failed, as said above" in fetched.stderr
    assert f"{len(ct.instances)} referenced instances not returned" in fetched.stderr
    assert "Traceback" not in fetched.stderr


def test_fetch_to_a_folder_it_cannot_make_is_refused_before_any_query(
    tmp_path: Path,
):
    """A usage error (exit 2), said before ITI-18 goes out: no node serves
    here, and the answer is not "cannot connect"."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    fetched = _xdsi(
        config,
        "fetch",
        "--patient-id",
        "ANYONE",
        "--out",
        str(a_file / "out"),
        check=False,
    )

    assert fetched.returncode == 2
    assert f"{a_file} is not a folder" in fetched.stderr
    assert "Traceback" not in fetched.stderr


def test_fetch_to_a_folder_access_allows_but_mkdir_refuses_is_a_usage_error(
    tmp_path: Path,
):
    """/proc answers access(2) as writable to root, yet no folder can be made
    in it: still a usage error naming the folder, no traceback."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    out = Path("/proc/xdsi-fetch-out")

    fetched = _xdsi(
        config, "fetch", "--patient-id", "ANYONE", "--out", str(out), check=False
    )

    assert fetched.returncode == 2
    assert f"{out}" in fetched.stderr
    assert "Traceback" not in fetched.stderr


def _file_size_limit() -> None:
    """In the child: files capped at 64 KiB, as a disk that fills up."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_fetch_this_side_cannot_write_says_so_and_blames_no_peer(
    served: Path,  # noqa: F811 (fixture)
    tmp_path: Path,
):
    """A RAD-69 answer the disk here cannot hold (EFBIG here, ENOSPC on a
    full disk) is this side's failure, said as such, not the answer
    breaking off nor the source's doing."""
    assert "ACK AA" in _xdsi(served, "feed", "GOES-ON-2").stdout
    images = dicom_path("study-mr", "images")
    _xdsi(served, "publish", str(images), "--patient-id", "GOES-ON-2")

    fetched = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdsi",
            "--config",
            str(served),
            "fetch",
            "--patient-id",
            "GOES-ON-2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=_file_size_limit,
    )

    assert fetched.returncode == 1
    assert f"could not be kept here: cannot write {tmp_path / 'out'}" in (
        fetched.stderr
    )
    # Those of the failed retrieve are counted, not listed one by one.
    assert "not returned: " not in fetched.stderr
    assert "(File too large)" in fetched.stderr
    assert "broke off" not in fetched.stderr
    assert "Imaging Document Source's log" not in fetched.stderr
    assert "Traceback" not in fetched.stderr


def test_a_fetch_that_skips_every_document_leaves_no_folder(
    served: Path,  # noqa: F811 (fixture)
    tmp_path: Path,
):
    """A patient whose only DICOM document is no manifest: it is named as
    skipped, nothing is written, and no (empty) folder is left."""
    assert "ACK AA" in _xdsi(served, "feed", "GOES-ON-3").stdout
    image = sorted(dicom_path("study-mr", "images").iterdir())[0]
    _xdsi(
        served,
        "submit",
        str(image),
        "--patient-id",
        "GOES-ON-3",
        "--mime-type",
        "application/dicom",
    )
    out = tmp_path / "out"

    fetched = _xdsi(
        served, "fetch", "--patient-id", "GOES-ON-3", "--out", str(out), check=False
    )

    assert fetched.returncode == EXIT_NOT_FOUND
    assert "skipped document" in fetched.stderr
    assert "is not Key Object Selection Document Storage" in fetched.stderr
    assert "nothing written" in fetched.stderr
    assert not out.exists()

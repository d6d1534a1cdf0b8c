"""The command line against a served node, each command its own process:
``xdsi serve``, ``feed``, ``publish``, ``find``, ``fetch``, ``audit list``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import ROOT, dicom_path, shared_path, terminal_signals
from xdsi import cli, ns
from xdsi.audit.repository import AuditRecordStore, AuditRepository
from xdsi.cli import EXIT_NOT_FOUND, LISTED_REFUSALS
from xdsi.dicom import scan
from xdsi.store.schema import imaging_instance, make_engine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _xdsi(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _node_config(tmp_path: Path) -> Path:
    """A configuration of free loopback ports and storage under ``tmp_path``."""
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f"[registry]\nport = {_free_port()}\nfeed_port = {_free_port()}\n"
        f"[repository]\nport = {_free_port()}\n"
        f"[imaging_source]\nport = {_free_port()}\n"
    )
    return config


def _serve(config: Path) -> subprocess.Popen[str]:
    """Start ``xdsi serve`` with ``config``; return once it has said where
    it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "xdsi", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("storage"):
            break
        if process.poll() is not None:
            raise AssertionError("xdsi serve exited:\n" + "".join(lines))
    return process


@pytest.fixture
def served(tmp_path) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A node started with ``xdsi serve`` on free loopback ports."""
    config = _node_config(tmp_path)
    process = _serve(config)
    yield config
    process.terminate()
    process.wait(timeout=30)


def test_feed_sends_updates_and_merges(served: Path) -> None:
    """ITI TF-2 3.8.4.1.1, 3.8.4.2: ``xdsi feed`` sends A08 and A40."""
    for patient in ("CLI-SURVIVOR", "CLI-SUBSUMED"):
        assert "ADT^A01: ACK AA" in _xdsi(served, "feed", patient).stdout
    updated = _xdsi(
        served, "feed", "CLI-SURVIVOR", "--trigger", "A08", "--sex", "F"
    ).stdout
    assert "ADT^A08: ACK AA" in updated
    merged = _xdsi(served, "feed", "CLI-SURVIVOR", "--merge", "CLI-SUBSUMED")
    assert "ADT^A40: ACK AA" in merged.stdout

    refused = _xdsi(served, "feed", "CLI-SUBSUMED", "--trigger", "A08", check=False)
    assert refused.returncode != 0 and "ACK AE" in refused.stderr
    # Another domain than the registry's: the ACK names the domains it
    # takes, and where they are set.
    foreign = _xdsi(served, "feed", "CLI-1^^^&1.2.3&ISO", check=False)
    assert foreign.returncode == 1
    assert "no PID-3 identifier has assigning authority" in foreign.stderr
    assert "other_assigning_authorities" in foreign.stderr
    unpaired = _xdsi(served, "feed", "CLI-SURVIVOR", "--trigger", "A40", check=False)
    assert unpaired.returncode != 0 and "--merge" in unpaired.stderr


def test_feed_publish_fetch_gives_back_every_instance(served: Path, tmp_path):
    """RAD TF-3 4.68, 4.69 through the command line: byte-identical images."""
    images = dicom_path("study-mr", "images")
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout
    published = _xdsi(served, "publish", str(images), "--patient-id", "IDS-DEPT002-a")
    assert "36 instances" in published.stdout

    found = json.loads(
        _xdsi(served, "find", "--patient-id", "IDS-DEPT002-a", "--json").stdout
    )
    assert len(found) == 1 and found[0]["modalities"] == ["MR"]
    # One registry, no XCA: the entry names no home community.
    assert found[0]["home_community_id"] is None
    # The table, piped, keeps each row on one line and its UIDs whole.
    table = _xdsi(served, "find", "--patient-id", "IDS-DEPT002-a").stdout
    (row,) = [line for line in table.splitlines() if found[0]["unique_id"] in line]
    assert (study := found[0]["study_instance_uids"][0]) in row
    assert found[0]["repository_unique_id"] in row and study
    # ITI TF-3 4.2.3.1.7: the DTM the registry holds, which is UTC, says so.
    assert found[0]["service_start_time"] in row
    assert "service start (UTC)" in table

    out = tmp_path / "fetched"
    fetch = _xdsi(served, "fetch", "--patient-id", "IDS-DEPT002-a", "--out", str(out))
    # Piped, no progress bar, nor the blank line it would leave on stderr.
    assert fetch.stderr == ""
    # Patient images: the folder fetch made is the user's alone.
    assert out.stat().st_mode & 0o777 == 0o700
    (study,) = scan.scan_directory(images).studies
    for header in study.instances:
        fetched = (
            out
            / header.study_instance_uid
            / header.series_instance_uid
            / f"{header.sop_instance_uid}.dcm"
        )
        assert (
            hashlib.sha256(fetched.read_bytes()).digest()
            == hashlib.sha256(header.path.read_bytes()).digest()
        )

    trail = json.loads(_xdsi(served, "audit", "list", "--json").stdout)
    assert {"ITI-8", "RAD-68", "ITI-42", "ITI-18", "ITI-43", "RAD-69"} <= {
        r["transaction"] for r in trail
    }
    # Piped, the table keeps each row on one line: every participant, a
    # URL say, whole, as grep wants it.
    table = _xdsi(served, "audit", "list").stdout
    participants = {
        p
        for r in trail
        for p in r["participants"]
        # The WS-Addressing anonymous address is shown as "(requestor)".
        if "://" in p and p != ns.WSA_ANONYMOUS
    }
    assert participants
    for participant in participants:
        assert participant in table


def test_fetch_of_a_small_study_says_its_size_in_kilobytes(served: Path, tmp_path):
    """One radiograph of 47 kB fetched is said as such, not as "0.0 MB",
    which reads as nothing retrieved."""
    import shutil

    folder = tmp_path / "cr"
    folder.mkdir()
    image = dicom_path("singles", "cr__ids-1301.dcm")
    shutil.copy(image, folder / image.name)
    assert "ACK AA" in _xdsi(served, "feed", "CLI-CR-1").stdout
    _xdsi(served, "publish", str(folder), "--patient-id", "CLI-CR-1")

    out = tmp_path / "fetched"
    fetched = _xdsi(served, "fetch", "--patient-id", "CLI-CR-1", "--out", str(out))

    kilobytes = round(image.stat().st_size / 1000)
    assert f"1 manifest, 1 instance, {kilobytes} kB in {out}" in fetched.stdout


def test_publish_skips_files_that_fail_the_intake_checks(served: Path, tmp_path):
    """Files whose header reads but whose data set is broken (bad/) are not
    published; ``--headers-only`` is the only way round the checks."""
    import shutil

    folder = tmp_path / "media"
    shutil.copytree(dicom_path("study-mr", "images"), folder / "mr")
    bad = sorted(dicom_path("bad").iterdir())
    for path in bad:
        shutil.copy(path, folder / path.name)
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout
    published = _xdsi(
        served, "publish", str(folder), "--patient-id", "IDS-DEPT002-a", check=False
    )
    assert published.stdout.count("published study") == 1
    assert "36 instances" in published.stdout
    assert f"{len(bad)} files skipped" in published.stderr
    # The files that are DICOM but broken make the exit status say so; the
    # ones that are not DICOM at all do not.
    not_dicom = [p for p in bad if p.name.startswith(("gzip-", "no-preamble-"))]
    assert published.returncode == 3, published.stderr
    refused = len(bad) - len(not_dicom)
    # Each file is refused for a reason of its own: the summary names none
    # of them as the reason of all.
    assert (
        f"error: {refused} DICOM files refused for {refused} reasons, listed above;"
        in published.stderr
    )
    # Each broken DICOM file is listed by path for the user; the ones that
    # are not DICOM are only counted.
    assert sorted(_listed_paths(published.stderr)) == sorted(
        str(folder / p.name) for p in bad if p not in not_dicom
    )
    assert f"({len(not_dicom)} not DICOM)" in published.stderr

    # Not DICOM at all, as a CD's README: skipped, exit 0.
    clean = tmp_path / "clean"
    shutil.copytree(dicom_path("study-mr", "images"), clean / "mr")
    (clean / "README.TXT").write_text("viewer on this CD\n")
    again = _xdsi(served, "publish", str(clean), "--patient-id", "IDS-DEPT002-a")
    assert "1 file skipped (not DICOM)" in again.stderr


def _listed_paths(stderr: str) -> list[str]:
    """The paths a command lists as skipped: ``  path: reason`` for a reason
    of one file, ``    path`` under ``  N files: reason``."""
    paths = []
    for line in stderr.splitlines():
        if line.startswith("    "):
            paths.append(line.strip())
        elif line.startswith("  ") and ": " in line:
            head = line.split(": ", 1)[0]
            if not head.endswith(" files"):
                paths.append(head.strip())
    return paths


def test_a_reason_many_files_share_is_said_once_over_their_paths(
    served: Path, tmp_path
):
    """A folder refused whole for one reason (its study held under another
    patient) says that reason once, with the files it applies to under it,
    not once a file."""
    import shutil

    folder = tmp_path / "mr"
    shutil.copytree(dicom_path("study-mr", "images"), folder)
    for patient in ("IDS-DEPT002-a", "IDS-DEPT002-b"):
        assert "ACK AA" in _xdsi(served, "feed", patient).stdout
    _xdsi(served, "publish", str(folder), "--patient-id", "IDS-DEPT002-a")

    again = _xdsi(
        served, "publish", str(folder), "--patient-id", "IDS-DEPT002-b", check=False
    )

    assert again.returncode == 1, again.stderr
    files = sorted(str(p) for p in folder.iterdir())
    (reason_line,) = [
        line for line in again.stderr.splitlines() if line.startswith("  36 files: ")
    ]
    assert "held under another patient" in reason_line
    assert _listed_paths(again.stderr) == files[:LISTED_REFUSALS]
    assert f"  and {len(files) - LISTED_REFUSALS} more" in again.stderr
    listed = [line for line in again.stderr.splitlines() if line.startswith("  ")]
    assert sum("held under another patient" in line for line in listed) == 1


def test_skipped_files_are_listed_but_their_paths_are_not_logged(
    served: Path, tmp_path
):
    """A CD's folder may carry its patient's name: the command lists the
    files it skipped to its user, but no log record at WARNING names a path,
    checked or ``--headers-only`` alike, and both exit 3."""
    import shutil

    folder = tmp_path / "DOE^JANE 1970-01-01"
    shutil.copytree(dicom_path("study-mr", "images"), folder / "mr")
    broken = shared_path(
        "dicom", "bad", "pixeldata-too-short__emri_small_jpeg_2k_lossless_too_short.dcm"
    )
    shutil.copy(broken, folder / "broken.dcm")
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(broken.read_bytes()[:200])
    (folder / "README.TXT").write_text("viewer on this CD\n")
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout

    for extra in ((), ("--headers-only",)):
        published, logged = _publish_cd(served, folder, extra)
        assert published.returncode == 3, published.stderr
        assert not [line for line in logged if "DOE^JANE" in line], logged
        listed = [line for line in published.stderr.splitlines() if line[:2] == "  "]
        assert str(truncated) in "\n".join(listed)
        # Each reason is told beside its file, not logged again.
        for line in listed:
            reason = line.split(": ", 1)[1]
            assert not [entry for entry in logged if reason in entry], logged
        assert "README.TXT" not in published.stderr
        if not extra:
            # The header of broken.dcm reads; only the checked path sees
            # that its Pixel Data is cut short.
            assert str(folder / "broken.dcm") in "\n".join(listed)
            assert "3 files skipped (1 not DICOM)" in published.stderr
        else:
            assert "2 files skipped (1 not DICOM)" in published.stderr


def _publish_cd(
    served: Path, folder: Path, extra: tuple[str, ...]
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``xdsi publish FOLDER`` for patient IDS-DEPT002-a, with ``extra``
    options; its outcome, and its log lines at WARNING or ERROR."""
    published = _xdsi(
        served,
        "publish",
        str(folder),
        "--patient-id",
        "IDS-DEPT002-a",
        *extra,
        check=False,
    )
    logged = [
        line
        for line in published.stderr.splitlines()
        if re.search(r" (WARNING|ERROR) ", line)
    ]
    return published, logged


@pytest.mark.parametrize("headers_only", [False, True], ids=["checked", "headers"])
def test_publish_says_what_it_took_in_and_logs_no_skipped_file_again(
    served: Path, tmp_path: Path, headers_only: bool
) -> None:
    """``publish`` says how many instances it took in, and how many were
    held already, checked or ``--headers-only`` alike; the files it skipped
    are listed once, with no log record at WARNING telling of them again."""
    import shutil

    folder = tmp_path / "cd"
    shutil.copytree(dicom_path("study-mr", "images"), folder / "mr")
    (folder / "truncated.dcm").write_bytes(
        next((folder / "mr").iterdir()).read_bytes()[:200]
    )
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout
    extra = ("--headers-only",) if headers_only else ()

    for said in (
        "36 instances taken in (0 held already), 1 study",
        "0 instances taken in (36 held already), 1 study",
    ):
        published, logged = _publish_cd(served, folder, extra)

        assert published.returncode == 3, published.stderr
        assert published.stdout.splitlines()[0] == said
        assert "1 file skipped" in published.stderr
        assert logged == []


def test_publish_headers_only_of_a_published_study_sends_nothing(served: Path):
    """RAD TF-3 4.68.4.1.2.3: a replacement manifest is for a changed study;
    publishing an unchanged one again, checked or ``--headers-only``, says it
    is published already and sends no second manifest."""
    images = dicom_path("study-mr", "images")
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout
    first = _xdsi(served, "publish", str(images), "--patient-id", "IDS-DEPT002-a")
    (manifest,) = re.findall(r"manifest ([0-9.]+)", first.stdout)

    for extra in (("--headers-only",), ()):
        again = _xdsi(
            served, "publish", str(images), "--patient-id", "IDS-DEPT002-a", *extra
        )
        assert f"published already: manifest {manifest}" in again.stdout
        assert "published study" not in again.stdout
    found = json.loads(
        _xdsi(served, "find", "--patient-id", "IDS-DEPT002-a", "--json").stdout
    )
    assert [entry["unique_id"] for entry in found] == [manifest]


def test_publish_for_unknown_patient_fails_with_the_registry_code(served: Path):
    """ITI TF-3 Table 4.2.4.1-2: XDSUnknownPatientId reaches the user."""
    images = dicom_path("study-mr", "images")
    result = _xdsi(
        served, "publish", str(images), "--patient-id", "NEVER-FED", check=False
    )
    assert result.returncode == 1
    assert "XDSUnknownPatientId" in result.stderr


# Each command that takes a patient id, {id} where it goes.
PATIENT_ID_COMMANDS = {
    "feed": ("feed", "{id}"),
    "feed --merge": ("feed", "PAT-1", "--merge", "{id}"),
    "publish": ("publish", "{folder}", "--patient-id", "{id}"),
    "publish --headers-only": (
        "publish",
        "{folder}",
        "--headers-only",
        "--patient-id",
        "{id}",
    ),
    "submit": ("submit", "{file}", "--patient-id", "{id}"),
    "find": ("find", "--patient-id", "{id}"),
    "fetch": ("fetch", "--patient-id", "{id}", "--out", "{folder}"),
}
# ITI TF-3 4.2.3.2.16: ids no Document Registry takes, and why.
UNUSABLE_PATIENT_IDS = {
    "empty": ("", "a patient id cannot be empty"),
    "blank": ("  ", "a patient id cannot be empty"),
    "delimiter": ("PAT|1", "its ID holds an HL7 delimiter"),
    "authority": ("PAT-1^^^&not an oid&ISO", "assigning authority is not an ISO OID"),
}


# Every command with one unusable id, and every unusable id with two
# commands: one a client of the registry (find), one that takes files in.
UNUSABLE_PATIENT_ID_CASES = [
    pytest.param(PATIENT_ID_COMMANDS[c], *UNUSABLE_PATIENT_IDS[i], id=f"{c}-{i}")
    for c, i in dict.fromkeys(
        [(c, "delimiter") for c in PATIENT_ID_COMMANDS]
        + [(c, i) for c in ("find", "publish") for i in UNUSABLE_PATIENT_IDS]
    )
]


@pytest.mark.parametrize(("command", "patient_id", "reason"), UNUSABLE_PATIENT_ID_CASES)
def test_a_patient_id_no_registry_takes_is_a_wrong_argument(
    tmp_path: Path, command: tuple[str, ...], patient_id: str, reason: str
) -> None:
    """ITI TF-3 4.2.3.2.16: a patientId is ID^^^&OID&ISO; every command
    refuses another as a wrong argument (exit 2), saying why, before it
    touches the storage or any peer."""
    config = _node_config(tmp_path)
    ports = [int(port) for port in re.findall(r"port = (\d+)", config.read_text())]
    listeners = []
    for port in ports:
        listener = socket.create_server(("127.0.0.1", port))
        listener.setblocking(False)
        listeners.append(listener)
    folder = tmp_path / "folder"
    folder.mkdir()
    document = tmp_path / "report.txt"
    document.write_text("report")
    fill = {"id": patient_id, "folder": str(folder), "file": str(document)}

    try:
        result = _xdsi(config, *(a.format(**fill) for a in command), check=False)
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()

    assert result.returncode == 2, result.stderr
    assert reason in result.stderr
    assert not (tmp_path / "node").exists()


def test_the_feed_hint_quotes_an_id_with_blanks(served: Path, tmp_path: Path) -> None:
    """ITI TF-3 Table 4.2.4.1-2: after XDSUnknownPatientId the hint names a
    command that can be pasted as it is, the id quoted for the shell and
    the configuration the command was given named, so that it feeds the
    node the command talked to from any folder."""
    images = dicom_path("study-mr", "images")

    result = _xdsi(
        served, "publish", str(images), "--patient-id", "NEVER FED", check=False
    )

    assert result.returncode == 1
    hint = re.search(r"feed the patient first \((xdsi [^)]*)\)", result.stderr)
    assert hint is not None, result.stderr
    assert hint[1] == f"xdsi --config {served} feed 'NEVER FED'"
    # Pasted in another folder, with no configuration in the environment.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    program, *command = shlex.split(hint[1])
    assert program == "xdsi"
    fed = _xdsi_here(elsewhere, tuple(command))
    assert fed.returncode == 0, fed.stderr
    assert "ACK AA" in fed.stdout
    again = _xdsi(served, "publish", str(images), "--patient-id", "NEVER FED")
    assert "published study" in again.stdout


@pytest.mark.parametrize("headers_only", [False, True], ids=["checked", "headers"])
def test_the_remove_hint_names_the_configuration_the_command_was_given(
    tmp_path: Path, headers_only: bool
) -> None:
    """ITI TF-3 4.2.2.2.3: a study held under another patient is not taken
    in under this one; the hint to remove it first names the configuration
    the command was given, so that pasted in another folder it removes the
    study from this node's storage, not from one of that folder."""
    config = _node_config(tmp_path)
    images = dicom_path("study-mr", "images")
    (study,) = scan.scan_directory(images).studies
    kept = _xdsi(config, "import", str(images), "--no-publish")
    assert "36 instances taken in" in kept.stdout
    extra = ("--headers-only",) if headers_only else ()

    refused = _xdsi(
        config, "publish", str(images), "--patient-id", "OTHER-1", *extra, check=False
    )

    assert refused.returncode == 1, refused.stderr
    hints = set(re.findall(r"remove it first \((xdsi [^)]*)\)", refused.stderr))
    remove = f"xdsi --config {config} remove {study.study_instance_uid}"
    assert hints == {remove}, refused.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, *command = shlex.split(remove)
    removed = _xdsi_here(elsewhere, (*command, "--no-publish"))
    assert "36 instances removed" in removed.stdout, removed.stderr
    assert list(elsewhere.iterdir()) == []


def test_the_remove_hint_names_no_configuration_when_none_was_given(
    tmp_path: Path,
) -> None:
    """With no configuration named, the node is the one of the folder the
    command runs in, and the hint to remove a study names none either."""
    images = dicom_path("study-mr", "images")
    (study,) = scan.scan_directory(images).studies
    kept = _xdsi_here(tmp_path, ("import", str(images), "--no-publish"))
    assert "36 instances taken in" in kept.stdout, kept.stderr

    refused = _xdsi_here(tmp_path, ("publish", str(images), "--patient-id", "OTHER-1"))

    assert refused.returncode == 1, refused.stderr
    assert f"(xdsi remove {study.study_instance_uid})" in refused.stderr


def test_a_submission_for_a_patient_not_fed_says_to_feed_it_first(
    served: Path, tmp_path: Path
) -> None:
    """ITI TF-3 Table 4.2.4.1-2: a ``submit`` refused with XDSUnknownPatientId
    names the feed to send, as ``publish`` and ``import`` do."""
    document = tmp_path / "report.txt"
    document.write_text("report")

    result = _xdsi(
        served, "submit", str(document), "--patient-id", "NOT FED", check=False
    )

    assert result.returncode == 1
    assert "XDSUnknownPatientId" in result.stderr
    assert f"feed the patient first (xdsi --config {served} feed 'NOT FED')" in (
        result.stderr
    )


def test_config_show_refuses_an_assigning_authority_that_is_no_oid(
    tmp_path: Path,
) -> None:
    """ITI TF-3 4.2.3.1.5: the node's assigning authority is an ISO OID; a
    configuration naming another is refused (exit 1), naming the setting,
    by every command, config show included."""
    config = tmp_path / "xdsi.toml"
    config.write_text('[node]\nassigning_authority = "not an oid"\n')

    for command in (("config", "show"), ("feed", "PAT-X")):
        result = _xdsi(config, *command, check=False)

        assert result.returncode == 1
        assert "[node] assigning_authority 'not an oid' is not an ISO OID" in (
            result.stderr
        )


def test_config_show_prints_effective_settings(tmp_path):
    """The effective configuration is printed as TOML that loads back."""
    import tomllib

    config = tmp_path / "xdsi.toml"
    config.write_text('[repository]\nrepository_unique_id = "1.2.3.4"\n')
    shown = tomllib.loads(_xdsi(config, "config", "show").stdout)
    assert shown["repository"]["repository_unique_id"] == "1.2.3.4"
    assert shown["node"]["assigning_authority"]


def test_serve_on_a_port_in_use_says_which_setting_to_change(
    served: Path, tmp_path: Path
) -> None:
    """A second node on the ports of a running one fails (exit 1), naming
    the setting to change, without werkzeug's advice of a command line
    option that does not exist."""
    second = tmp_path / "second.toml"
    second.write_text(
        served.read_text().replace(
            f'storage_dir = "{tmp_path / "node"}"',
            f'storage_dir = "{tmp_path / "second"}"',
        )
    )

    result = _xdsi(second, "serve", check=False)

    assert result.returncode == 1
    assert "[registry] port: cannot listen on 127.0.0.1:" in result.stderr
    assert "set another in the configuration" in result.stderr
    assert "different port" not in result.stderr + result.stdout


def test_serve_with_its_dicom_port_in_use_says_which_setting_to_change(
    tmp_path: Path,
) -> None:
    """A C-STORE SCP that cannot listen on its port fails
    the start (exit 1), naming ``[imaging_source] dicom_port`` and what to
    do, and leaves none of the node's other ports held."""
    ports = {name: _free_port() for name in ("registry", "feed", "repo", "ids")}
    config = tmp_path / "xdsi.toml"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config.write_text(
            f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
            f"[registry]\nport = {ports['registry']}\n"
            f"feed_port = {ports['feed']}\n"
            f"[repository]\nport = {ports['repo']}\n"
            f"[imaging_source]\nport = {ports['ids']}\nstore_scp = true\n"
            f"dicom_port = {taken}\n"
        )

        result = _xdsi(config, "serve", check=False)

    assert result.returncode == 1
    assert (
        f"[imaging_source] dicom_port: cannot listen on 127.0.0.1:{taken}"
        in result.stderr
    )
    assert "set another in the configuration" in result.stderr
    assert "Errno" not in result.stderr
    for port in ports.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_serve_with_its_storage_dir_a_file_says_which_setting_to_change(
    tmp_path: Path,
) -> None:
    """A storage directory that is a file fails the start (exit 1), naming
    ``[node] storage_dir`` and what to do, before any port is bound."""
    config = _node_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            f'storage_dir = "{tmp_path / "node"}"', f'storage_dir = "{config}"'
        )
    )

    result = _xdsi(config, "serve", check=False)

    assert result.returncode == 1
    assert f"[node] storage_dir: cannot keep the node's data in {config}" in (
        result.stderr
    )
    assert "set it to a directory" in result.stderr
    assert "Errno" not in result.stderr
    assert "listening" not in result.stderr


def test_audit_list_with_a_time_that_is_no_time_is_a_wrong_argument(
    tmp_path: Path,
) -> None:
    """A command given wrong arguments exits 2, ``--since`` included."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')

    result = _xdsi(config, "audit", "list", "--since", "yesterday", check=False)

    assert result.returncode == 2
    assert "is not an ISO 8601 date or date-time" in result.stderr


@pytest.mark.parametrize("source", [(), ("--arr",)], ids=["spool", "arr"])
def test_audit_list_until_not_after_since_is_a_wrong_argument(
    tmp_path: Path, source: tuple[str, ...]
) -> None:
    """No event is at or after --since and before an --until not after it:
    a wrong argument (exit 2), not an empty list."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    (tmp_path / "node").mkdir()

    result = _xdsi(
        config,
        "audit",
        "list",
        *source,
        "--since",
        "2026-12-06T10:00:00Z",
        "--until",
        "2026-12-06T09:00:00+00:00",
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "is not after --since" in result.stderr


@pytest.mark.parametrize("source", [(), ("--arr",)], ids=["spool", "arr"])
@pytest.mark.parametrize(
    ("patient", "problem"),
    [
        ("PAT-1^^^1.2.3", "is not a CX"),
        ("PAT-1^^^&not-an-oid&ISO", "not an ISO OID"),
        ("", "cannot be empty"),
    ],
    ids=["no-authority", "authority-not-an-oid", "empty"],
)
def test_audit_list_for_a_patient_id_not_a_cx_is_a_wrong_argument(
    tmp_path: Path, source: tuple[str, ...], patient: str, problem: str
) -> None:
    """ITI TF-3 4.2.3.2.16: ``--patient`` is checked as ``--patient-id`` is
    elsewhere; an id no audit event can name exits 2, rather than listing
    nothing as if the patient had no events."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')

    result = _xdsi(config, "audit", "list", *source, "--patient", patient, check=False)

    assert result.returncode == 2, result.stderr
    assert problem in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [("feed", ""), ("feed", " "), ("audit", "list", "--json", "--xml")],
    ids=["feed-empty", "feed-blank", "audit-json-and-xml"],
)
def test_wrong_arguments_exit_2_before_anything_is_sent(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A command given wrong arguments exits 2 and sends nothing: an empty
    patient id is not fed, and --json and --xml are alternatives."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')

    result = _xdsi(config, *args, check=False)

    assert result.returncode == 2, result.stderr
    assert "ITI-8" not in result.stdout


def test_fetch_for_a_patient_the_registry_does_not_know_exits_4(
    served: Path, tmp_path: Path
) -> None:
    """ITI-18 finds no imaging manifest for a patient never fed: ``fetch``
    exits EXIT_NOT_FOUND and says nothing was written, rather than naming a
    folder it never made."""
    out = tmp_path / "out"

    result = _xdsi(
        served, "fetch", "--patient-id", "NOBODY-FETCH", "--out", str(out), check=False
    )

    assert result.returncode == EXIT_NOT_FOUND == 4
    assert "no imaging manifest found for this patient" in result.stderr
    assert result.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_find_for_a_patient_the_registry_does_not_know_exits_4(
    served: Path, as_json: bool
) -> None:
    """ITI TF-2 3.18.4.1.3: FindDocuments for a patient never fed finds no
    DocumentEntry; ``find`` says so on stderr and exits EXIT_NOT_FOUND, the
    JSON form still printing its (empty) list."""
    result = _xdsi(
        served,
        "find",
        "--patient-id",
        "NOBODY-FIND",
        *(["--json"] if as_json else []),
        check=False,
    )

    assert result.returncode == EXIT_NOT_FOUND
    assert "no DocumentEntries found for this patient" in result.stderr
    # A study removed leaves its manifest Deprecated, which find leaves out.
    assert "Deprecated" in result.stderr
    assert result.stdout.strip() == ("[]" if as_json else "")
    assert "Traceback" not in result.stderr


def test_fetch_for_a_patient_with_documents_but_no_imaging_exits_4(
    served: Path, tmp_path: Path
) -> None:
    """A patient whose only document is no imaging manifest: ``find`` lists
    it (exit 0), ``fetch`` exits EXIT_NOT_FOUND and writes nothing."""
    assert "ACK AA" in _xdsi(served, "feed", "TEXT-ONLY").stdout
    document = tmp_path / "note.txt"
    document.write_text("a report, no images\n")
    _xdsi(served, "submit", str(document), "--patient-id", "TEXT-ONLY")
    out = tmp_path / "out"

    found = _xdsi(served, "find", "--patient-id", "TEXT-ONLY", "--json")
    fetched = _xdsi(
        served, "fetch", "--patient-id", "TEXT-ONLY", "--out", str(out), check=False
    )

    assert len(json.loads(found.stdout)) == 1
    assert fetched.returncode == EXIT_NOT_FOUND
    assert "no imaging manifest found for this patient" in fetched.stderr
    assert not out.exists()


def test_a_client_command_sends_its_audit_events_to_the_arr(
    served: Path, tmp_path: Path
) -> None:
    """ITI TF-2 3.20: a command line client with its own storage (a
    consumer-only site) sends the audit events it wrote to its [audit]
    targets as it ends, not only once a node serves its storage; what cannot
    go waits in its spool, and the user is told."""
    engine = make_engine(f"sqlite:///{tmp_path / 'arr.sqlite'}")
    store = AuditRecordStore(engine)
    client = tmp_path / "client.toml"
    node_storage = f'storage_dir = "{tmp_path / "node"}"'
    base = served.read_text().replace(
        node_storage, f'storage_dir = "{tmp_path / "client"}"'
    )
    try:
        with AuditRepository(store, udp_port=0) as arr:
            client.write_text(
                base + f'[audit]\ntargets = ["udp://127.0.0.1:{arr.udp_port}"]\n'
            )
            assert _xdsi(client, "feed", "AUDITED-CLIENT-1").returncode == 0
            deadline = time.monotonic() + 30
            while not store.query() and time.monotonic() < deadline:
                time.sleep(0.1)
            (record,) = store.query()
        assert record.event_type == "ITI-8"

        # An ARR that is not there: the event waits, and the command says
        # so, its own outcome unchanged.
        closed = _free_port()
        client.write_text(base + f'[audit]\ntargets = ["tls://127.0.0.1:{closed}"]\n')
        fed = _xdsi(client, "feed", "AUDITED-CLIENT-2")
        assert fed.returncode == 0
        assert "wait in" in fed.stderr and f"tls://127.0.0.1:{closed}" in fed.stderr
    finally:
        engine.dispose()


def test_one_audit_event_left_waiting_is_told_in_the_singular(
    served: Path, tmp_path: Path
) -> None:
    """ITI TF-2 3.20: the one event of a client command whose ARR is not
    there waits in its spool, and the warning counts it as one."""
    closed = _free_port()
    client = tmp_path / "client.toml"
    client.write_text(
        served.read_text().replace(
            f'storage_dir = "{tmp_path / "node"}"',
            f'storage_dir = "{tmp_path / "client"}"',
        )
        + f'[audit]\ntargets = ["tls://127.0.0.1:{closed}"]\n'
    )

    fed = _xdsi(client, "feed", "AUDITED-ONCE")

    assert fed.returncode == 0, fed.stderr
    assert "warning: 1 audit event waits in" in fed.stderr
    assert f"tls://127.0.0.1:{closed}; it goes with the next command" in fed.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("feed", "PAT-1"),
        ("find", "--patient-id", "PAT-1"),
        ("submit", "README.md", "--patient-id", "PAT-1"),
    ],
    ids=["feed", "find", "submit"],
)
def test_a_client_command_with_no_node_serving_says_what_to_look_at(
    tmp_path, command: tuple[str, ...]
):
    """A client command whose node is not there exits 1 and asks whether
    the node serves, naming the command that starts it with the
    configuration given; it does not ask for a configuration it was given."""
    config = _node_config(tmp_path)

    ran = _xdsi(config, *command, check=False)

    assert ran.returncode == 1, ran.stderr
    assert "Is the node serving?" in ran.stderr
    assert f"(xdsi --config {config} serve)" in ran.stderr
    assert "need the served node's configuration" not in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize(
    "command",
    [("verify",), ("find", "--patient-id", "PAT-1"), ("audit", "list")],
    ids=["verify", "find", "audit-list"],
)
def test_a_storage_that_cannot_be_used_ends_a_command_with_why(
    tmp_path, command: tuple[str, ...]
):
    """A storage directory under a regular file (a typo in the configuration)
    ends any command with exit 1 and the reason, never a traceback."""
    (tmp_path / "a-file").write_text("")
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "a-file" / "store"}"\n')

    ran = _xdsi(config, *command, check=False)

    assert ran.returncode == 1, ran.stderr
    assert "cannot use the storage" in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("feed", "PAT-1", "--trigger", "A40"),
        ("submit", "README.md", "--patient-id", "PAT-1", "--mime-type", "bogus"),
        ("feed", "PAT-1", "--birth-date", "1999-12-31"),
        ("feed", "PAT-1", "--birth-date", "19990231"),
        ("feed", "PAT-1", "--sex", "Q"),
    ],
    ids=["a40-without-merge", "mime-type", "birth-date", "no-such-day", "sex"],
)
def test_wrong_arguments_are_a_usage_error(tmp_path, command: tuple[str, ...]):
    """Wrong arguments exit 2 with the usage line, before anything is sent:
    an A40 needs --merge, a mimeType is type/subtype (RFC 6838 4.2), a
    birth date an HL7 date YYYYMMDD and a sex a code of HL7 Table 0001."""
    ran = _xdsi(_node_config(tmp_path), *command, check=False)

    assert ran.returncode == 2, ran.stderr
    assert "Usage:" in ran.stderr


def test_fetch_to_a_pacs_over_tls_only_without_pacs_tls_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """DICOM PS3.15 B.1: a PACS that takes DICOM over TLS only drops a
    clear-text association request; ``fetch --to-pacs`` without
    ``--pacs-tls`` says in one line that the association failed and that
    the PACS may need ``--pacs-tls``, with no ERROR records of pynetdicom.
    A port where nothing listens gets no such hint."""
    config = _node_config(tmp_path)
    _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"))
    made = _xdsi(
        config, "tls", "make-cert", str(tmp_path / "pki"), "--ca", str(tmp_path / "ca")
    )
    dicom_port = _free_port()
    config.write_text(
        config.read_text().replace(
            "[imaging_source]\n",
            f"[imaging_source]\nstore_scp = true\ndicom_port = {dicom_port}\n",
        )
        + made.stdout
    )
    images = dicom_path("study-mr", "images")
    process = _serve(config)
    try:
        assert "ACK AA" in _xdsi(config, "feed", "TLS-PACS-1").stdout
        _xdsi(config, "publish", str(images), "--patient-id", "TLS-PACS-1")
        fetched = {
            port: _xdsi(
                config,
                "fetch",
                "--patient-id",
                "TLS-PACS-1",
                "--out",
                str(tmp_path / f"out-{port}"),
                "--to-pacs",
                f"PACS@127.0.0.1:{port}",
                check=False,
            )
            for port in (dicom_port, _free_port())
        }
    finally:
        process.terminate()
        process.wait(timeout=30)

    for port, result in fetched.items():
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: no association with PACS@127.0.0.1:{port}: ")
    assert "may need --pacs-tls" in fetched[dicom_port].stderr
    (unserved,) = set(fetched) - {dicom_port}
    assert "--pacs-tls" not in fetched[unserved].stderr


def test_fetch_names_the_instances_it_did_not_get(served: Path, tmp_path):
    """A fetch that misses instances (a stored copy lost at the source)
    exits 1 naming each by SOP Instance UID, which names no patient, and
    points at the source's log for why."""
    assert "ACK AA" in _xdsi(served, "feed", "IDS-DEPT002-a").stdout
    folder = dicom_path("study-mr", "images")
    _xdsi(served, "publish", str(folder), "--patient-id", "IDS-DEPT002-a")
    engine = make_engine(f"sqlite:///{tmp_path / 'node' / 'xdsi.sqlite'}")
    try:
        with engine.connect() as conn:
            lost, blob = conn.execute(
                select(imaging_instance.c.sop_instance_uid, imaging_instance.c.blob)
            ).first()
    finally:
        engine.dispose()
    (tmp_path / "node" / "imaging-source" / blob).unlink()

    fetched = _xdsi(
        served,
        "fetch",
        "--patient-id",
        "IDS-DEPT002-a",
        "--out",
        str(tmp_path / "out"),
        check=False,
    )

    assert fetched.returncode == 1
    assert f"  not returned: {lost}" in fetched.stderr
    assert "1 referenced instance not returned" in fetched.stderr


def test_an_import_stopped_half_way_keeps_and_records_what_it_took_in(tmp_path):
    """Ctrl-C (SIGINT) during ``import``: the instances taken in so far stay,
    are recorded as imported (DICOM PS3.15 A.5.3.5), and the command says
    so and exits 130, as a shell does for SIGINT."""
    import shutil
    import signal

    folder = tmp_path / "cd"
    for name in ("study-ct", "study-mr/images", "study-ct-ihe"):
        shutil.copytree(dicom_path(*name.split("/")), folder / name)
    config = _node_config(tmp_path)
    kept = tmp_path / "node" / "imaging-source"
    with terminal_signals():
        process = subprocess.Popen(
            [sys.executable, "-m", "xdsi", "--config", str(config), "import"]
            + ["--no-publish", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    deadline = time.monotonic() + 60
    while not any(p.is_file() and ".spool" not in p.parts for p in kept.rglob("*")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    said = re.search(r"stopped: the (\d+) instances? taken in so far stay", stderr)
    assert said, stderr
    assert 0 < int(said.group(1)) < 116
    assert "Traceback" not in stderr
    trail = json.loads(_xdsi(config, "audit", "list", "--json").stdout)
    (imported,) = [r for r in trail if r["event"] == "Import"]
    assert imported["outcome"] == 0
    assert imported["participants"][-1] == folder.as_uri()


def test_a_malformed_association_request_is_logged_escaped_without_traceback(
    tmp_path: Path,
) -> None:
    """A hand-made A-ASSOCIATE-RQ (DICOM PS3.8 9.3.2) whose Calling AE Title
    holds an escape sequence and bytes no AE title may hold: pynetdicom
    refuses it and logs so; the node's log shows that as escaped lines, no
    traceback of pynetdicom's."""
    import struct

    dicom_port = _free_port()
    config = _node_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            "[imaging_source]\n",
            f"[imaging_source]\nstore_scp = true\ndicom_port = {dicom_port}\n",
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "xdsi", "--config", str(config), "-v", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        while not process.stdout.readline().startswith("storage"):
            assert process.poll() is None
        context = b"1.2.840.10008.3.1.1.1"
        body = (
            struct.pack(">HH", 1, 0)
            + b"XDSI".ljust(16)
            + b"\x1b[31mEV\xe9IL\x7f".ljust(16)
            + bytes(32)
            + struct.pack(">BBH", 0x10, 0, len(context))
            + context
        )
        with socket.create_connection(("127.0.0.1", dicom_port), timeout=10) as peer:
            peer.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
            # The A-ABORT, then the close.
            while peer.recv(64):
                pass
    finally:
        process.terminate()
        log, _ = process.communicate(timeout=30)

    assert "ERROR pynetdicom.dul: Unable to decode" in log
    assert "Traceback" not in log
    assert "\x1b" not in log


def test_feed_goes_to_the_registry_feed_address_names(served: Path, tmp_path):
    """A site whose affinity domain registry is another node's: ``feed``
    sends ITI-8 to ``[source] feed_address``, not to a registry of its own
    that nothing queries."""
    port = re.search(r"feed_port = (\d+)", served.read_text()).group(1)
    site = tmp_path / "site-b"
    site.mkdir()
    config = _node_config(site)
    config.write_text(
        config.read_text() + f'[source]\nfeed_address = "127.0.0.1:{port}"\n'
    )

    fed = _xdsi(config, "feed", "SITE-B-1")

    assert "ACK AA" in fed.stdout
    # The other node's registry knows the patient now: a study of theirs
    # is registered (else XDSUnknownPatientId).
    images = dicom_path("study-mr", "images")
    published = _xdsi(served, "publish", str(images), "--patient-id", "SITE-B-1")
    assert "36 instances" in published.stdout


def test_publish_headers_only_records_the_import(served: Path) -> None:
    """``publish --headers-only`` keeps the study's files as ``import``
    does, so it writes the same Data Import record (DICOM PS3.15 A.5.3.5),
    the folder as Source Media, before the study's RAD-68."""
    assert "ACK AA" in _xdsi(served, "feed", "HEADERS-ONLY-1").stdout
    images = dicom_path("study-mr", "images")

    published = _xdsi(
        served,
        "publish",
        str(images),
        "--patient-id",
        "HEADERS-ONLY-1",
        "--headers-only",
    )

    assert "36 instances" in published.stdout
    trail = json.loads(_xdsi(served, "audit", "list", "--json").stdout)
    # ITI-42 and RAD-68 are Import events too; the Data Import has none.
    (imported,) = [
        r for r in trail if r["event"] == "Import" and r["transaction"] is None
    ]
    assert imported["outcome"] == 0
    assert imported["participants"][-1] == images.resolve().as_uri()
    assert imported["patients"] == [
        "HEADERS-ONLY-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
    ]


def test_verify_run_from_cron_writes_nothing_to_stderr(tmp_path: Path) -> None:
    """A scrub run from cron (stderr no terminal) that finds every copy
    whole says so on stdout and leaves stderr empty: no progress bar, nor
    the blank line a transient one leaves."""
    config = _node_config(tmp_path)
    kept = _xdsi(
        config, "import", str(dicom_path("study-mr", "images")), "--no-publish"
    )
    assert "36 instances taken in" in kept.stdout

    done = _xdsi(config, "verify")

    assert done.stdout == "36 stored copies verified, all as stored\n"
    assert done.stderr == ""


@pytest.mark.parametrize("command", [("remove", "1.2.3"), ("verify",)])
def test_a_damaged_database_file_ends_a_command_with_one_line(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A node's SQLite file that is no database (a disk fault, a file copied
    over it) is named with the driver's reason, not a traceback."""
    storage = tmp_path / "node"
    storage.mkdir()
    (storage / "xdsi.sqlite").write_bytes(b"not a database, only some bytes " * 64)
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{storage}"\n')

    done = _xdsi(config, *command, check=False)

    assert done.returncode == 1
    assert "cannot be used: file is not a database" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_server_not_running_is_named_without_its_password(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f'database_url = "postgresql+psycopg://xdsi:s3cret@127.0.0.1:{port}/xdsi"\n'
    )

    done = _xdsi(config, "verify", check=False)

    assert done.returncode == 1
    assert f"the database at postgresql+psycopg://xdsi:***@127.0.0.1:{port}/xdsi" in (
        done.stderr
    )
    assert "cannot be used" in done.stderr
    assert "is the database server up" in done.stderr
    assert "s3cret" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "reason",
    [
        # libpq's first lines, as psycopg gives them, for a password the
        # server refused and for none given where one is asked.
        'connection failed: connection to server at "127.0.0.1", port 5432 '
        'failed: FATAL:  password authentication failed for user "xdsi"',
        'connection failed: connection to server at "127.0.0.1", port 5432 '
        "failed: fe_sendauth: no password supplied",
    ],
    ids=["refused", "missing"],
)
def test_a_database_password_refused_or_missing_names_where_it_goes(
    reason: str,
) -> None:
    assert cli._database_hint(reason) == (
        "; give the user's password in [node] database_url or in $PGPASSWORD (libpq)"
    )


def test_a_fetch_stopped_half_way_says_what_is_left_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT) during ``fetch``, here while a registry is slow to
    answer ITI-18: the command says that what came stays incomplete and how
    to get the rest, and exits 130, as a shell does for SIGINT."""
    import signal

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def hold() -> None:
        # Takes the request and never answers.
        connection, _ = listener.accept()
        accepted.append(connection)

    threading.Thread(target=hold, daemon=True).start()
    port = listener.getsockname()[1]
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f'[consumer]\nregistry_url = "http://127.0.0.1:{port}/xds/registry"\n'
    )
    out = tmp_path / "out"
    with terminal_signals():
        process = subprocess.Popen(
            [sys.executable, "-m", "xdsi", "--config", str(config), "fetch"]
            + ["--patient-id", "SLOW-1", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        deadline = time.monotonic() + 60
        while not accepted:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        listener.close()
        for connection in accepted:
            connection.close()

    assert process.returncode == 130, stderr
    assert f"stopped: what was retrieved so far stays in {out}" in stderr
    assert "run the same fetch again" in stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert not out.exists()


def test_a_find_whose_other_sites_registry_is_down_names_that_site_not_this_node(
    tmp_path: Path,
):
    """A site without a registry of its own queries another site's (ITI-18):
    when that one cannot be reached, the hint is about it, not about
    whether this node serves."""
    down = _free_port()
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        "[registry]\nenabled = false\n"
        f'[consumer]\nregistry_url = "http://127.0.0.1:{down}/xds/registry"\n'
    )

    ran = _xdsi(config, "find", "--patient-id", "PAT-1", check=False)

    assert ran.returncode == 1, ran.stderr
    assert f"127.0.0.1:{down}" in ran.stderr
    assert "This node does not serve that address" in ran.stderr
    assert "Is the node serving?" not in ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_publish_whose_registry_is_down_blames_the_registry_not_the_node(
    tmp_path: Path,
):
    """XDSRegistryNotAvailable (ITI TF-3 Table 4.2.4.1-2): the repository
    answered, and the registry behind it could not be reached; the node the
    command asked is serving, so it is not asked whether it is."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        "[registry]\nenabled = false\n"
        f"[repository]\nport = {_free_port()}\n"
        f'registry_url = "http://127.0.0.1:{down}/xds/registry"\n'
        f"[imaging_source]\nport = {_free_port()}\n"
        f'registry_url = "http://127.0.0.1:{down}/xds/registry"\n'
    )
    process = _serve(config)
    try:
        ran = _xdsi(
            config,
            "publish",
            str(dicom_path("study-mr", "images")),
            "--patient-id",
            "DOWN-1",
            check=False,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)

    assert ran.returncode == 1, ran.stderr
    assert "XDSRegistryNotAvailable" in ran.stderr
    assert "the Document Registry it registers with" in ran.stderr
    assert "Is the node serving?" not in ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_configuration_given_after_the_command_is_said_to_go_before_it(
    tmp_path: Path,
) -> None:
    """``--config`` is an option of ``xdsi``, not of its commands: given
    after the command it is said to go before it, not that none was named."""
    env = {k: v for k, v in os.environ.items() if k != "XDSI_CONFIG"}
    config = _node_config(tmp_path)
    ran = subprocess.run(
        [sys.executable, "-m", "xdsi", "find", "--config", str(config)]
        + ["--patient-id", "PAT-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )

    assert ran.returncode == 2, ran.stderr
    assert "no configuration named" not in ran.stderr
    assert "--config goes before the command" in ran.stderr


def _xdsi_here(folder: Path, command: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run ``xdsi COMMAND`` in ``folder`` with no configuration named."""
    env = {k: v for k, v in os.environ.items() if k != "XDSI_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "xdsi", *command],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("find", "--patient-id", "PAT-1"),
        ("fetch", "--patient-id", "PAT-1", "--out", "out"),
        ("feed", "PAT-1"),
    ],
    ids=["find", "fetch", "feed"],
)
def test_a_client_command_with_no_configuration_and_no_storage_here_writes_nothing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """With no configuration named, a client command uses the storage of a
    node served with the defaults from the same folder; with none there it
    is a usage error, and no storage (with an audit record naming the
    patient) is started in the folder it runs in."""
    ran = _xdsi_here(tmp_path, command)

    assert ran.returncode == 2, ran.stderr
    assert "no configuration named and no node storage here" in ran.stderr
    assert "xdsi --config FILE" in ran.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "server"),
    [
        (("verify",), "xdsi serve"),
        (("remove", "1.2.3"), "xdsi serve"),
        (("audit", "list"), "xdsi serve"),
        (("audit", "list", "--arr"), "xdsi arr"),
    ],
    ids=["verify", "remove", "audit-list", "audit-list-arr"],
)
def test_a_storage_command_with_no_configuration_and_no_storage_here_reads_none(
    tmp_path: Path, command: tuple[str, ...], server: str
) -> None:
    """A command that reads or changes what a node keeps, run with no
    configuration where no node serves, is a usage error: it neither starts
    an empty storage in that folder nor reports on it (a scrub run by cron
    from another folder would find every copy well)."""
    ran = _xdsi_here(tmp_path, command)

    assert ran.returncode == 2, ran.stderr
    assert "no configuration named and no node storage here" in ran.stderr
    assert f"in the folder {server} runs in" in ran.stderr
    assert "verified" not in ran.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [("find", "--help"), ("verify", "--help"), ("audit", "list", "--help")],
    ids=["find", "verify", "audit-list"],
)
def test_a_command_help_is_shown_where_no_node_serves(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """``--help`` reads no storage, so it is shown in any folder, not
    refused for want of a configuration."""
    ran = _xdsi_here(tmp_path, command)

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("Usage: ")
    assert "--help" in ran.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("headers_only", [False, True], ids=["checked", "headers"])
def test_a_study_not_published_for_the_node_being_down_is_published_by_it_later(
    tmp_path, headers_only: bool
):
    """A publish whose node is not serving keeps the study and says why
    once (no log record saying it again); the node, once served, publishes
    the study by itself after its quiet time, whichever way it was read."""
    config = _node_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            "[imaging_source]\n", "[imaging_source]\npublish_after = 1\n"
        )
    )
    images = dicom_path("study-mr", "images")
    (study,) = scan.scan_directory(images).studies
    extra = ("--headers-only",) if headers_only else ()

    down = _xdsi(
        config, "publish", str(images), "--patient-id", "PAT-LATER", *extra, check=False
    )

    assert down.returncode == 1, down.stderr
    assert "not published" in down.stderr
    assert down.stderr.count("Connection refused") == 1, down.stderr

    process = _serve(config)
    try:
        assert "ACK AA" in _xdsi(config, "feed", "PAT-LATER").stdout
        deadline = time.monotonic() + 120
        found = None
        while time.monotonic() < deadline:
            found = _xdsi(config, "find", "--patient-id", "PAT-LATER", check=False)
            if found.returncode == 0:
                break
            time.sleep(1)
        assert found is not None and found.returncode == 0, found.stderr
        assert (
            study.study_instance_uid
            in _xdsi(config, "find", "--patient-id", "PAT-LATER", "--json").stdout
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_client_commands_do_not_open_the_node_database(served: Path, tmp_path):
    """find, fetch and submit speak ITI-18, ITI-43, RAD-69 and ITI-41 to the
    node and read nothing of its database: a workstation whose configuration
    names a database it cannot reach (or none it may use) runs them all the
    same."""
    client = tmp_path / "client.toml"
    client.write_text(
        served.read_text().replace(
            "[node]\n",
            '[node]\ndatabase_url = "postgresql+psycopg://xdsi:secret@127.0.0.1:1/x"\n',
        )
    )
    assert "ACK AA" in _xdsi(served, "feed", "PAT-CLIENT").stdout
    document = tmp_path / "note.txt"
    document.write_text("a note\n")

    submitted = _xdsi(client, "submit", "--patient-id", "PAT-CLIENT", str(document))
    found = _xdsi(client, "find", "--patient-id", "PAT-CLIENT", "--json")
    fetched = _xdsi(
        client,
        "fetch",
        "--patient-id",
        "PAT-NOBODY",
        "--out",
        str(tmp_path / "out"),
        check=False,
    )

    assert "database" not in submitted.stderr
    assert len(json.loads(found.stdout)) == 1
    assert fetched.returncode == EXIT_NOT_FOUND, fetched.stderr


def test_serve_with_its_database_unreachable_listens_on_no_feed_port(tmp_path):
    """The ITI-8 listener serves once the registry is there: a node whose
    database cannot be reached stops before MLLP listens, and says why."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _node_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            "[node]\n",
            "[node]\ndatabase_url = "
            f'"postgresql+psycopg://xdsi:s3cret@127.0.0.1:{port}/xdsi"\n',
        )
    )

    served = subprocess.run(
        [sys.executable, "-m", "xdsi", "-v", "--config", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )

    assert served.returncode == 1, served.stderr
    assert "cannot be used" in served.stderr
    assert "MLLP listening" not in served.stderr

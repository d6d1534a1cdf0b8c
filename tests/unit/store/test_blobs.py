"""The blob store's spool: files named after their maker, and the sweep of
what processes gone left there."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from tests.spooling import left_by_killed_process, spooling
from xdsi.store.blobs import (
    STALE_AFTER,
    BlobStore,
    spool_path,
    spool_prefix,
    sweep_spool,
)


def _aged(path: Path, seconds: float) -> None:
    """Make ``path``, and all under it, last changed ``seconds`` ago."""
    then = os.stat(path).st_mtime - seconds
    for folder, _, files in os.walk(path) if path.is_dir() else []:
        for name in files:
            os.utime(Path(folder, name), (then, then))
        os.utime(folder, (then, then))
    os.utime(path, (then, then))


def test_a_file_of_a_killed_process_goes_and_one_of_a_live_process_stays(
    tmp_path: Path,
) -> None:
    """A partial copy left by an intake killed on the way goes at once; one
    of an intake still at work beside the sweep stays."""
    left = left_by_killed_process(tmp_path, "accept")
    with spooling(tmp_path, "accept") as live:
        assert sweep_spool(tmp_path) == 1

        assert not left.exists()
        assert live.is_file()


def test_a_file_of_this_process_stays(tmp_path: Path) -> None:
    mine = spool_path(tmp_path, "accept")
    mine.write_bytes(b"")

    assert sweep_spool(tmp_path) == 0
    assert mine.is_file()


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("keep-3f1d5b0e2c7a4e8f9b6d1a2c3e4f5a6b", False),
        ("rad69-k2j4h5g6", True),
        ("tmpa1b2c3d4.dcm", False),
        (f"accept@1@1@other-host.example@{'0' * 32}", False),
    ],
    ids=["keep", "rad69", "unnamed", "another-host"],
)
def test_an_entry_of_an_unknown_maker_goes_only_once_stale(
    tmp_path: Path, name: str, folder: bool
) -> None:
    """An entry whose maker cannot be asked (named without it, or of
    another host sharing the storage) stays while it may be in use, and
    goes once nothing in it changed for STALE_AFTER."""
    entry = tmp_path / name
    if folder:
        entry.mkdir()
        (entry / "part-1").write_bytes(b"an instance")
    else:
        entry.write_bytes(b"an instance")
    assert sweep_spool(tmp_path) == 0
    assert entry.exists()

    _aged(entry, STALE_AFTER - 60)
    assert sweep_spool(tmp_path) == 0
    _aged(entry, 120)

    assert sweep_spool(tmp_path) == 1
    assert not entry.exists()


def test_a_folder_still_written_to_stays(tmp_path: Path) -> None:
    """A spooled folder old itself, whose files change still, is in use."""
    folder = tmp_path / "rad69-k2j4h5g6"
    folder.mkdir()
    (folder / "old").write_bytes(b"")
    _aged(folder, STALE_AFTER + 60)
    (folder / "new").write_bytes(b"")

    assert sweep_spool(tmp_path) == 0
    assert folder.is_dir()


def test_a_spool_name_names_its_maker() -> None:
    pid = os.getpid()
    kind, named_pid, started, host, rest = (spool_prefix("stow") + "x").split("@")

    assert (kind, named_pid, host, rest) == (
        "stow",
        str(pid),
        socket.gethostname(),
        "x",
    )
    assert started.isdigit()


def test_a_blob_store_opened_sweeps_its_spool_and_says_how_much(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a killed process left goes as the store is opened (a node
    starting, a command); the log says how many, and no name."""
    spool = tmp_path / "imaging-source" / ".spool"
    spool.mkdir(parents=True)
    left = [left_by_killed_process(spool, "accept") for _ in range(2)]
    with spooling(spool, "accept") as live:
        with caplog.at_level(logging.INFO, logger="xdsi.store.blobs"):
            BlobStore(tmp_path / "imaging-source")

        assert live.is_file()
    assert not any(path.exists() for path in left)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "spool of imaging-source: 2 entries left by processes gone removed"
    )


@pytest.mark.parametrize(
    "pid",
    [
        "99999999999999999999",
        "4194305",
        "\N{SUPERSCRIPT TWO}",
        "\N{ARABIC-INDIC DIGIT ONE}",
    ],
    ids=["past-a-c-long", "past-pid-max", "superscript", "other-script"],
)
def test_a_name_of_this_host_with_no_process_id_goes_only_once_stale(
    tmp_path: Path, pid: str
) -> None:
    """A spool entry's name is chosen by whatever writes the spool folder:
    one naming this host and what is no process id (proc(5)) is of an
    unknown maker, and no error, so that a blob store still opens."""
    entry = tmp_path / f"accept@{pid}@1@{socket.gethostname()}@{'0' * 32}"
    entry.write_bytes(b"an instance")

    BlobStore(tmp_path / "store")
    assert sweep_spool(tmp_path) == 0
    assert entry.exists()
    _aged(entry, STALE_AFTER + 60)

    assert sweep_spool(tmp_path) == 1


@pytest.mark.parametrize("to_folder", [False, True], ids=["file", "folder"])
def test_a_symbolic_link_goes_but_never_what_it_points_to(
    tmp_path: Path, to_folder: bool
) -> None:
    """A link in the spool, to a file or a folder outside it, is removed as
    a link once its maker is gone; what it points to stays untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_bytes(b"patient data")
    spool = tmp_path / "spool"
    spool.mkdir()
    left = left_by_killed_process(spool, "accept")
    left.unlink()
    left.symlink_to(outside if to_folder else outside / "kept")
    stale = spool / "rad69-k2j4h5g6"
    stale.symlink_to(outside)
    os.utime(stale, (0, 0), follow_symlinks=False)
    inside = left_by_killed_process(spool, "rad69")
    inside.unlink()
    inside.mkdir()
    (inside / "link").symlink_to(outside)

    assert sweep_spool(spool) == 3

    assert sorted(os.listdir(spool)) == []
    assert (outside / "kept").read_bytes() == b"patient data"

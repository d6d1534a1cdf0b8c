"""Blob store: documents and image instances kept under opaque keys.

:class:`Blobs` is what the Document Repository needs of a store;
:class:`BlobStore` keeps blobs as files in a local directory (the default)
and :class:`xdsi.store.s3.S3BlobStore` as objects in an S3-compatible
bucket. In a local directory, files are placed by renaming a spooled file
into the store (no second copy), fsynced, under a name derived from a key's
SHA-256, two directory levels deep so that no directory grows unbounded;
each readable by the node's user alone.

A spool file is named after the process that made it (:func:`spool_prefix`),
so that :func:`sweep_spool` can remove what a process killed on the way
(SIGKILL, power loss) left, patient data included, without touching the
files of a process still at work beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from xdsi import processes

logger = logging.getLogger(__name__)

# A spool entry whose maker is not known to be gone (one of another host, or
# one named without its maker) is removed once nothing in it changed for
# this many seconds. A spooled file lives for one intake or one exchange;
# the longest, a RAD-69 answer streamed to a slow consumer, takes hours.
STALE_AFTER = 24 * 3600.0

# What parts a spool entry's name of spool_prefix: kind, process id, its
# start time, host name, and a random part; "@" is in no host name.
SPOOL_NAME_PARTS = 5


def relative_path(key: str) -> str:
    """Return the name a blob has in a store for ``key``."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}"


class Blobs(Protocol):
    """A store of blobs, each put once from a spooled file and read as a
    stream.

    ``spool`` is a local directory for files on their way into the store.
    """

    spool: Path

    def put_file(self, key: str, source: Path, *, move: bool = True) -> str:
        """Store ``source`` under ``key``; return the blob's name.

        With ``move`` the source file is consumed. A reader never sees a
        partial blob.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> str:
        """Store a small blob held in memory; return its name."""
        ...

    def open(self, relative: str) -> BinaryIO:
        """Open a blob for a streaming read."""
        ...

    def size(self, relative: str) -> int | None:
        """The size of a blob in bytes; None when it is not in the store."""
        ...

    def delete(self, relative: str) -> None:
        """Remove a blob; one already gone is no error."""
        ...


def spool_prefix(kind: str) -> str:
    """The start of the name of a spool file or folder of this process:
    ``kind``, the process id, its start time and the host name, each
    followed by "@"; a random part comes after."""
    host, pid, started = processes.this_process()
    return f"{kind}@{pid}@{started}@{host}@"


def spool_path(spool: Path, kind: str) -> Path:
    """A fresh path in ``spool`` for a file of this process (spool_prefix)."""
    return spool / f"{spool_prefix(kind)}{uuid.uuid4().hex}"


def sweep_spool(spool: Path) -> int:
    """Remove what processes gone left in ``spool``; return how many entries
    went.

    An entry named by :func:`spool_prefix` for a process of this host that
    no longer runs goes at once. Any other (a process's of another host
    sharing the storage, or one named without its maker) goes only once
    nothing in it changed for STALE_AFTER seconds.
    """
    # Two hosts of one host name sharing the storage: see processes.gone.
    now = time.time()
    try:
        entries = list(os.scandir(spool))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        gone = _maker_gone(entry.name)
        try:
            if gone is None:
                gone = now - _last_change(entry) > STALE_AFTER
            if not gone:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:
            # Its maker, or another sweep, removed it meanwhile.
            continue
        except OSError as exc:
            logger.warning(
                "spool %s: an entry left by a process gone cannot be removed: %s",
                spool,
                exc.strerror or exc,
            )
            continue
        removed += 1
    return removed


def open_spool(spool: Path, name: str) -> Path:
    """Make a spool folder if need be and sweep it (:func:`sweep_spool`),
    saying how much went; ``name`` says whose it is in that line."""
    spool.mkdir(parents=True, exist_ok=True)
    removed = sweep_spool(spool)
    if removed:
        logger.info(
            "spool of %s: %d entries left by processes gone removed", name, removed
        )
    return spool


def _maker_gone(name: str) -> bool | None:
    """Whether the process a spool entry's name says made it is gone: True
    or False for a process of this host, None where the name says no maker
    of this host."""
    parts = name.split("@")
    if len(parts) != SPOOL_NAME_PARTS:
        return None
    _, pid, started, host, _ = parts
    return processes.gone(host, pid, started)


def _last_change(entry: os.DirEntry[str]) -> float:
    """When a spool entry, or anything in a spooled folder, last changed."""
    latest = entry.stat(follow_symlinks=False).st_mtime
    if entry.is_dir(follow_symlinks=False):
        for folder, _, files in os.walk(entry.path):
            for name in [".", *files]:
                try:
                    latest = max(latest, os.lstat(Path(folder, name)).st_mtime)
                except FileNotFoundError:
                    pass
    return latest


class BlobStore:
    """Files in a local directory, keyed by an opaque string (a uniqueId or
    SOP Instance UID).

    Its spool is swept of what processes gone left (:func:`sweep_spool`) as
    it is opened, when a node starts serving or a command starts.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool = open_spool(root / ".spool", root.name)

    def relative_path(self, key: str) -> str:
        return relative_path(key)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def put_file(self, key: str, source: Path, *, move: bool = True) -> str:
        """Store ``source`` under ``key`` and return its relative path.

        With ``move`` the file is renamed into place when it lives on the
        same file system (the usual case for files spooled under the store),
        else copied through a temporary file so that a reader never sees a
        partial blob. The blob is readable by this user alone (0600),
        whatever mode the spooled file was made with: a document names its
        patient.
        """
        relative = self.relative_path(key)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.chmod(source, 0o600)
                os.replace(source, target)
                _fsync(target)
                return relative
            except OSError:
                pass
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, tmp, 1 << 20)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, target)
        if move:
            source.unlink(missing_ok=True)
        return relative

    def put_bytes(self, key: str, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(
            dir=self.spool, prefix=spool_prefix("bytes"), delete=False
        ) as tmp:
            tmp.write(data)
        return self.put_file(key, Path(tmp.name))

    def open(self, relative: str) -> BinaryIO:
        return (self.root / relative).open("rb")

    def size(self, relative: str) -> int | None:
        try:
            return (self.root / relative).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, relative: str) -> None:
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

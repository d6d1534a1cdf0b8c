"""Blob store: documents and image instances kept under opaque keys.

:class:`Blobs` is what the Document Repository needs of a store;
:class:`BlobStore` keeps blobs as files in a local directory (the default)
and :class:`xdsi.store.s3.S3BlobStore` as objects in an S3-compatible
bucket. In a local directory, files are placed by renaming a spooled file
into the store (no second copy), fsynced, under a name derived from a key's
SHA-256, two directory levels deep so that no directory grows unbounded;
each readable by the node's user alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol


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


class BlobStore:
    """Files in a local directory, keyed by an opaque string (a uniqueId or
    SOP Instance UID)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool = root / ".spool"
        self.spool.mkdir(exist_ok=True)

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
        with tempfile.NamedTemporaryFile(dir=self.spool, delete=False) as tmp:
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

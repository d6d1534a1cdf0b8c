"""Blob store: documents and image instances as files in a local directory.

Files are placed by renaming a spooled file into the store (no second copy),
fsynced, under a name derived from a key's SHA-256, two directory levels
deep so that no directory grows unbounded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class BlobStore:
    """Files keyed by an opaque string (a uniqueId or SOP Instance UID)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool = root / ".spool"
        self.spool.mkdir(exist_ok=True)

    def relative_path(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return f"{digest[:2]}/{digest[2:4]}/{digest}"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def put_file(self, key: str, source: Path, *, move: bool = True) -> str:
        """Store ``source`` under ``key`` and return its relative path.

        With ``move`` the file is renamed into place when it lives on the
        same file system (the usual case for files spooled under the store),
        else copied through a temporary file so that a reader never sees a
        partial blob.
        """
        relative = self.relative_path(key)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
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
        return relative

    def put_bytes(self, key: str, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(dir=self.spool, delete=False) as tmp:
            tmp.write(data)
        return self.put_file(key, Path(tmp.name))

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

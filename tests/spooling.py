"""Processes that leave a file in a spool as intake does, for the tests of
the spool sweep (xdsi.store.blobs.sweep_spool)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A process that spools a partial copy, says where, and works on.
_SPOOLING = """
import sys, time
from pathlib import Path
from xdsi.store.blobs import spool_path
path = spool_path(Path(sys.argv[1]), sys.argv[2])
path.write_bytes(b"a partial copy of an instance")
print(path, flush=True)
time.sleep(600)
"""


@contextmanager
def spooling(spool: Path, kind: str) -> Iterator[Path]:
    """A process at work with a file of ``kind`` in ``spool``; the path of
    the file. The process is killed on leaving."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SPOOLING, str(spool), kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield Path(process.stdout.readline().strip())
    finally:
        process.kill()
        process.wait()


def left_by_killed_process(spool: Path, kind: str) -> Path:
    """A file of ``kind`` left in ``spool`` by a process killed (SIGKILL)
    while it wrote it."""
    with spooling(spool, kind) as path:
        pass
    assert path.is_file()
    return path

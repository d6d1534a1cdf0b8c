"""Benchmark: write and read a large MTOM/XOP message, against a plain file copy.

Checks DESIGN principle 5 (stream big things) for SOAP 1.2 MTOM 4.3 and
XOP 1.0: the MTOM codec should run near file-copy speed with a peak RSS close
to that of a copy, whatever the document size.

Run from the repository root::

    PYTHONPATH=. python tests/benchmarks/bench_mtom.py [--size-mb 300] [--dir D]

Prints seconds, MB/s and peak RSS for each phase, then MTOM write and read
throughput and peak RSS as ratios to the plain copy done in this process.
"""

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from xdsi.ns import XDSB
from xdsi.wire import (
    OutgoingPart,
    attachment_for,
    build_envelope,
    read_message,
    write_message,
    xop_include,
)

PNR = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
MIB = 1024 * 1024


def _read_kib(field: str) -> int:
    """Return a /proc/self/status field (VmHWM, VmRSS) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(phase: Callable[[], None]) -> tuple[float, int]:
    """Run ``phase``; return its seconds and its peak RSS in bytes.

    The peak is reset before the phase through /proc/self/clear_refs (Linux
    4.0 and later), so each phase reports its own high-water mark.
    """
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    phase()
    return time.perf_counter() - started, _read_kib("VmHWM") * 1024


def _generate(path: Path, size: int) -> None:
    with path.open("wb") as file:
        for _ in range(size // MIB):
            file.write(os.urandom(MIB))


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        shutil.copyfileobj(reader, writer, 65536)


def _write_mtom(source: Path, target: Path) -> str:
    request = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest")
    document = etree.SubElement(request, f"{{{XDSB}}}Document", id="Document01")
    document.append(xop_include("large@xdsi.bench"))
    parts = [OutgoingPart("large@xdsi.bench", "application/octet-stream", path=source)]
    content_type, length, chunks = write_message(
        build_envelope(request, PNR), PNR, parts
    )
    with target.open("wb") as file:
        for chunk in chunks:
            file.write(chunk)
    if target.stat().st_size != length:
        raise RuntimeError("the written message differs from its Content-Length")
    return content_type


def _read_mtom(message: Path, content_type: str, spool: Path) -> tuple[int, str]:
    with (
        message.open("rb") as stream,
        read_message(stream, content_type, spool) as read,
    ):
        attachment = attachment_for(next(read.body.iter(f"{{{XDSB}}}Document")), read)
        return attachment.size, attachment.sha1


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=300, help="document size, MiB")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    size = args.size_mb * MIB

    work = Path(tempfile.mkdtemp(prefix="bench-mtom-", dir=args.dir))
    try:
        source, copy, message = work / "document", work / "copy", work / "message"
        spool = work / "spool"
        spool.mkdir()
        _generate(source, size)
        result: dict[str, object] = {}

        # The copy runs first and last; the faster run is the reference, so that
        # page-cache and write-back effects do not favour either side.
        first_copy = _measure(lambda: _copy(source, copy))
        copy.unlink()
        write_time, write_rss = _measure(
            lambda: result.update(content_type=_write_mtom(source, message))
        )
        read_time, read_rss = _measure(
            lambda: result.update(
                read=_read_mtom(message, str(result["content_type"]), spool)
            )
        )
        last_copy = _measure(lambda: _copy(source, copy))
        copy_time, copy_rss = min(first_copy, last_copy)

        if result["read"] != (size, _sha1(source)):
            raise RuntimeError("the document read back differs from the one written")
        print(f"document {size / MIB:.0f} MiB, MTOM message {message.stat().st_size} B")
        print(f"{'phase':<12}{'seconds':>9}{'MB/s':>9}{'peak RSS MiB':>14}")
        for name, (seconds, rss) in (
            ("file copy 1", first_copy),
            ("MTOM write", (write_time, write_rss)),
            ("MTOM read", (read_time, read_rss)),
            ("file copy 2", last_copy),
        ):
            rate = size / 1e6 / seconds
            print(f"{name:<12}{seconds:>9.2f}{rate:>9.0f}{rss / MIB:>14.1f}")
        print(
            f"ratio to the faster file copy: throughput write "
            f"{copy_time / write_time:.2f}, read {copy_time / read_time:.2f}; "
            f"peak RSS write {write_rss / copy_rss:.2f}, read {read_rss / copy_rss:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

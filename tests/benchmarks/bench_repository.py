"""Benchmark: ITI-41 and ITI-43 of one big document, against a plain copy.

Checks DESIGN principle 5 (stream big things) at the Document Repository
(ITI TF-2 3.41, 3.43): for each size a fresh ``xdsi serve`` runs in a
subprocess on loopback; one document goes in with ITI-41 (through our
Document Source, which reads the file once for its SHA-1 and once to send
it) and comes back with ITI-43. Prints MB/s of each and of a plain file
copy of the same file, and the node's peak RSS (VmHWM) per size.

Run from the repository root::

    PYTHONPATH=. python tests/benchmarks/bench_repository.py [--sizes-mb 10 100 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from lxml import etree

from tests.integration.conftest import PATIENT
from tests.integration.node_process import NodeProcess, node_settings
from xdsi import ns, wire
from xdsi.actors.document_source import DocumentSource
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message

MIB = 1024 * 1024
RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"


def make_document(path: Path, size: int) -> None:
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for n in range(size // MIB):
            out.write(hashlib.sha256(n.to_bytes(8, "big")).digest() + block[32:])


def retrieve(url: str, repository_unique_id: str, unique_id: str, spool: Path) -> int:
    request = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    item = etree.SubElement(request, f"{{{ns.XDSB}}}DocumentRequest")
    etree.SubElement(
        item, f"{{{ns.XDSB}}}RepositoryUniqueId"
    ).text = repository_unique_id
    etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
    client = wire.SoapClient(url, timeout=600, spool_dir=spool)
    with client.call(RETRIEVE, request) as reply:
        (attachment,) = reply.attachments.values()
        return attachment.size


def run(size_mb: int, workdir: Path) -> dict[str, float]:
    size = size_mb * MIB
    work = Path(tempfile.mkdtemp(prefix=f"bench-{size_mb}-", dir=workdir))
    try:
        document = work / "document.bin"
        make_document(document, size)

        started = time.monotonic()
        shutil.copyfile(document, work / "copy.bin")
        copy_s = time.monotonic() - started
        (work / "copy.bin").unlink()

        settings = node_settings(work / "node")
        node = NodeProcess.start(settings, work / "xdsi.toml")
        try:
            settings = node.effective(settings)
            send_message(
                settings.node.host, settings.registry.feed_port, build_feed(PATIENT)
            )
            idle_rss = node.peak_rss()
            source = DocumentSource(settings, work / "spool")
            started = time.monotonic()
            submitted = source.submit(
                [document], PATIENT, mime_type="application/octet-stream"
            )
            iti41_s = time.monotonic() - started

            spool = work / "retrieved"
            spool.mkdir()
            started = time.monotonic()
            got = retrieve(
                settings.url("repository"),
                settings.repository.repository_unique_id,
                submitted.document_unique_ids[0],
                spool,
            )
            iti43_s = time.monotonic() - started
            assert got == size
            peak = node.peak_rss()
        finally:
            node.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "MB": size / 1e6,
        "copy MB/s": size / 1e6 / copy_s,
        "ITI-41 MB/s": size / 1e6 / iti41_s,
        "ITI-43 MB/s": size / 1e6 / iti43_s,
        "idle RSS MB": idle_rss / 1e6,
        "peak RSS MB": peak / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1024])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    rows = [run(size, args.dir) for size in args.sizes_mb]
    columns = list(rows[0])
    print("  ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]:12.1f}" for c in columns))


if __name__ == "__main__":
    main()

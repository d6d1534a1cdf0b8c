"""Benchmark: how fast the MLLP listener's deframer goes through what a peer
sends, frames or not, against a scan of the same bytes for the frame end.

Run from the repository root::

    PYTHONPATH=. python tests/benchmarks/bench_mllp.py [--mb 16]

Feeds the deframer (HL7 v2.5 Implementation Guide C.4) in 64 KiB reads:
megabytes of random bytes outside a frame, of <VT> start blocks, and of
small ADT frames one after another. Prints MB/s for each and its time as a
ratio to ``bytes.find`` of the frame end over the same buffers, done in this
process: a ratio near 1 means the deframer costs about one pass over the
bytes, whatever they hold.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from xdsi.hl7.mllp import _Deframer

VT = b"\x0b"
FS_CR = b"\x1c\r"
READ = 65536
FRAME = VT + b"MSH|^~\\&|A|B|C|D|20260101000000||ADT^A01|1|P|2.3.1\rPID|1||X\r" + FS_CR


def _timed(chunks: list[bytes], work: Callable[[bytes], object]) -> float:
    started = time.perf_counter()
    for chunk in chunks:
        work(chunk)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=16)
    args = parser.parse_args()
    size = args.mb * 1024 * 1024
    streams = {
        "random bytes, no frame": os.urandom(size).replace(VT, b"\x00"),
        "<VT> start blocks": VT * size,
        "ADT frames": FRAME * (size // len(FRAME)),
    }
    for name, data in streams.items():
        chunks = [data[i : i + READ] for i in range(0, len(data), READ)]
        deframer = _Deframer()
        took = _timed(chunks, deframer.feed)
        scan = _timed(chunks, lambda chunk: chunk.find(FS_CR))
        print(
            f"{name:24} {len(data) / 1e6 / took:9.1f} MB/s   "
            f"ratio to a scan for the frame end: {took / scan:8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: memory of the intake check (xdsi.dicom.check.check_file) of a
large multi-frame instance, against the instance's size.

A synthetic multi-frame instance is built as bench_wado_uri.py builds it
(``--megabytes`` of Pixel Data, native or, with ``--encapsulated``, RLE
Lossless) and checked as C-STORE, STOW-RS and import check every instance.
Printed: the peak of the memory Python and NumPy allocate (tracemalloc)
against the instance's size, and the time against a plain read of the file.

Run on demand::

    PYTHONPATH=. python tests/benchmarks/bench_check.py [--megabytes 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.benchmarks.bench_wado_uri import build, measure
from xdsi.dicom.check import check_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--encapsulated", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-check-") as work:
        path = Path(work) / "multi-frame.dcm"
        count = build(path, args.megabytes, args.encapsulated)
        size = path.stat().st_size

        peak, checked, read = measure(lambda: check_file(path), path, args.runs)

    kind = "RLE Lossless" if args.encapsulated else "native"
    print(f"instance: {count} frames, {size / 1e6:.1f} MB ({kind})")
    print(f"peak memory of the check:   {peak / 1e6:8.2f} MB")
    print(f"ratio peak / instance size: {peak / size:8.3f}")
    print(f"check:                      {checked * 1000:8.1f} ms")
    print(f"plain read:                 {read * 1000:8.1f} ms")
    print(f"ratio check / plain read:   {checked / read:8.2f}")


if __name__ == "__main__":
    main()

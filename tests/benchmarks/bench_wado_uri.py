"""Benchmark: memory and time of a WADO-URI rendering (DICOM PS3.18
WADO-URI, RAD TF-3 4.55) of one frame of a large multi-frame instance.

A synthetic multi-frame instance is built from the first image of the CT
study xdsi ships (the image repeated as frames until ``--megabytes`` MB of
Pixel Data, native or, with ``--encapsulated``, RLE Lossless), and its
middle frame is rendered as the node renders it, here in this process (the
node renders in a transcoding process, where the same memory is taken,
plus a round trip of a few milliseconds). Printed: the peak of the
memory Python and NumPy allocate (tracemalloc) against the size of the
instance, and the time against a plain read of the file.

Run on demand::

    PYTHONPATH=. python tests/benchmarks/bench_wado_uri.py [--megabytes 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import RLELossless, generate_uid

from xdsi.actors.dicomweb import Rendering, _rendered
from xdsi.cli import bundled_study


def build(target: Path, megabytes: float, encapsulated: bool) -> int:
    """Write the synthetic instance; return its number of frames."""
    ds = pydicom.dcmread(sorted(bundled_study().rglob("*.dcm"))[0])
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    per_frame = frames[0].nbytes
    count = max(2, int(megabytes * 1e6 // per_frame))
    pixels = np.resize(frames, (count, *frames.shape[1:]))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "PerFrameFunctionalGroupsSequence" in ds:
        # Every frame shares the first frame's functional groups.
        first = ds.PerFrameFunctionalGroupsSequence[0]
        ds.PerFrameFunctionalGroupsSequence = [first] * count
    ds.NumberOfFrames = count
    ds.PixelData = pixels.tobytes()
    if encapsulated:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(target, enforce_file_format=True)
    return count


def measure(
    run: Callable[[], object], path: Path, runs: int
) -> tuple[int, float, float]:
    """The peak of the memory ``run`` allocates (tracemalloc, after one run
    untimed), and the median time of ``run`` and of a plain read of
    ``path``, the two taking turns ``runs`` times."""
    run()
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    run_times, read_times = [], []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        run_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        path.read_bytes()
        read_times.append(time.perf_counter() - started)
    return peak, statistics.median(run_times), statistics.median(read_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--encapsulated", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-wado-uri-") as work:
        path = Path(work) / "multi-frame.dcm"
        count = build(path, args.megabytes, args.encapsulated)
        size = path.stat().st_size
        frame = count // 2 + 1

        peak, render, read = measure(
            lambda: _rendered(path, frame, Rendering()), path, args.runs
        )

    kind = "RLE Lossless" if args.encapsulated else "native"
    print(f"instance: {count} frames, {size / 1e6:.1f} MB ({kind})")
    print(f"peak memory rendering frame {frame}: {peak / 1e6:8.2f} MB")
    print(f"ratio peak / instance size:       {peak / size:8.3f}")
    print(f"rendering:       {render * 1000:8.1f} ms")
    print(f"plain read:      {read * 1000:8.1f} ms")
    print(f"ratio rendering / plain read:     {render / read:8.2f}")


if __name__ == "__main__":
    main()

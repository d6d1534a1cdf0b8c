"""Benchmark: publish and fetch a study through the whole chain, against a
plain copy of the same files.

Run on demand (not a test)::

    python tests/benchmarks/bench_chain.py [STUDY_DIR] [--copies N]

A node runs on loopback ports; the study is published (scan, KOS, RAD-68
with ITI-42) and fetched (ITI-18, ITI-43, RAD-69 per series). The figures
are printed next to a ``shutil.copytree`` of the same study made in the
same process, twice (the copy onto the Imaging Document Source's store and
back out), and peak RSS next to the study's size. ``--copies N`` publishes N
copies of the study with fresh UIDs, to see how time and memory grow.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from xdsi.app import Node
from xdsi.cli import bundled_study, qualify_patient_id
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def relabel(source: Path, target: Path) -> Path:
    """Copy a study with a fresh Study, Series and SOP Instance UIDs."""
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(
            ds.SeriesInstanceUID, generate_uid()
        )
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", type=Path, default=bundled_study())
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-"))
    try:
        studies = [args.study] + [
            relabel(args.study, work / f"copy-{n}") for n in range(1, args.copies)
        ]
        size = sum(
            p.stat().st_size for s in studies for p in s.rglob("*") if p.is_file()
        )

        copy_times = []
        for n, study in enumerate(studies):
            started = time.perf_counter()
            shutil.copytree(study, work / f"plain-in-{n}")
            shutil.copytree(work / f"plain-in-{n}", work / f"plain-out-{n}")
            copy_times.append(time.perf_counter() - started)

        settings = (
            Settings()
            .with_storage(work / "node")
            .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
        )
        publish_times, fetch_times = [], []
        with Node(settings) as node:
            services = node.services
            assert services is not None
            settings = node.settings
            patient = qualify_patient_id("BENCH-1", settings)
            send_message(
                settings.node.host, settings.registry.feed_port, build_feed(patient)
            )
            for study_dir in studies:
                (study,) = scan.scan_directory(study_dir).studies
                started = time.perf_counter()
                services.imaging_source.publish(study, patient)
                publish_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            result = services.consumer.fetch(patient, work / "fetched")
            fetch_times.append(time.perf_counter() - started)
            assert not result.missing
    finally:
        shutil.rmtree(work, ignore_errors=True)

    chain = sum(publish_times) + sum(fetch_times)
    copy = sum(copy_times)
    print(f"studies: {len(studies)}, {size / 1e6:.1f} MB in all")
    print(f"plain copy in and out:   {copy:7.2f} s  {size * 2 / 1e6 / copy:8.1f} MB/s")
    print(f"publish (median/study):  {statistics.median(publish_times):7.2f} s")
    print(f"fetch (all):             {sum(fetch_times):7.2f} s")
    print(f"chain / plain copy:      {chain / copy:7.1f} x")
    print(
        f"peak RSS:                {peak_rss_mb():7.1f} MB "
        f"({peak_rss_mb() * 1e6 / size:.2f} x the studies' size)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: RAD-69 retrieve of a study against Orthanc's WADO-RS download of
the same study, and time-to-share against a plain copy.

Run on demand (not a test), as root, since Orthanc runs in a private network
namespace::

    python tests/benchmarks/bench_rad69.py [STUDY_DIR] [--synthetic-gb N]

Orthanc 1.10 listens on every interface (peers.md, "Read this first"), so
the script re-runs itself under ``unshare --net`` with only loopback up;
Orthanc and the xdsi node both run in there and bind nothing outside it.
The node serves from a process of its own, as Orthanc does; this process
plays the Imaging Document Source's publisher and the Consumer. The study
(the bundled CT unless named; with ``--synthetic-gb N`` copies of it under
one fresh Study Instance UID until N GB) is loaded into Orthanc over its
REST API and published by the node (RAD-68). Then, each timed ``--runs``
times, the two sides of a ratio taking turns, and the median kept:

- RAD-69: the Consumer's retrieve of every instance (RAD TF-3 4.69), in the
  syntax held, each instance written to its own file;
- Orthanc: GET /dicom-web/studies/{uid} (DICOM PS3.18 10.4) with
  transfer-syntax=*, the multipart answer split as it streams (by
  python-multipart, the parser under xdsi's MTOM reader) and each instance
  written to its own file;
- time-to-share: publish (RAD-68) + find (ITI-18) + fetch (ITI-43, RAD-69)
  of a fresh copy of the study, for a patient the registry knows already,
  against ``shutil.copytree`` of another fresh copy. Both copies are
  written just before the runs; the page cache cannot be dropped here, so
  both sides read files that are still cached.
  The node fsyncs every instance it keeps; the plain copy does not, and a
  copy that does is printed too.

Every timed step starts after a sync, untimed, so that none pays for the
write-back of files another step (or the set-up) left in the page cache.

It prints both ratios: Orthanc / RAD-69 (target >= 1.0) and time-to-share /
plain copy (target <= 3). It prints too how long each server's answer takes
to read to its end, dropped as it comes: the servers compared alone, the
clients' parsing and filing left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import BinaryIO

import pydicom
import requests
from pydicom.uid import generate_uid
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select

from xdsi import wire
from xdsi.actors.consumer import Consumer, FetchResult
from xdsi.actors.soap_endpoint import transaction
from xdsi.app import Node, build_services
from xdsi.cli import bundled_study, qualify_patient_id
from xdsi.config import Settings
from xdsi.dicom import kos, scan
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import imaging_manifest
from xdsi.wire.mtom import READ_SIZE

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = "/usr/share/orthanc/plugins"
ORTHANC_HTTP = 18042
ORTHANC_URL = f"http://127.0.0.1:{ORTHANC_HTTP}"
IN_NETNS = "XDSI_BENCH_IN_NETNS"


def orthanc_config(root: Path) -> Path:
    """Write an Orthanc configuration with its storage under ``root``."""
    config = {
        "Name": "xdsi-bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": ORTHANC_HTTP,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpThreadsCount": 8,
        "StorageCompression": False,
        "Plugins": [
            f"{ORTHANC_PLUGINS}/libOrthancDicomWeb.so",
            f"{ORTHANC_PLUGINS}/libOrthancGdcm.so",
        ],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def synthetic(source: Path, target: Path, gigabytes: float) -> Path:
    """Copy ``source`` under one fresh Study Instance UID, with fresh Series
    and SOP Instance UIDs, once and then again until ``gigabytes`` GB."""
    study_uid = generate_uid()
    files = sorted(p for p in source.rglob("*") if p.is_file())
    written, copy = 0, 0
    while copy == 0 or written < gigabytes * 1e9:
        series_uids: dict[str, str] = {}
        for path in files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uids.setdefault(
                ds.SeriesInstanceUID, generate_uid()
            )
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out = target / f"copy{copy}" / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
            written += out.stat().st_size
        copy += 1
    return target


def relabelled(source: Path, target: Path) -> Path:
    """One copy of ``source`` with fresh UIDs, for a second publication."""
    return synthetic(source, target, 0)


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


class _PartFiles:
    """Write each part of a multipart body to its own numbered file."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.count = 0
        self.size = 0
        self._file: BinaryIO | None = None

    def begin(self) -> None:
        self._file = open(self.target / f"{self.count:06d}.dcm", "xb")

    def data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(memoryview(data)[start:end])
        self.size += end - start

    def end(self) -> None:
        assert self._file is not None
        self._file.close()
        self.count += 1


def orthanc_download(study_uid: str, target: Path) -> tuple[int, int]:
    """Stream Orthanc's WADO-RS study answer into one file per instance
    under ``target``; return the instances and bytes written."""
    answer = requests.get(
        f"{ORTHANC_URL}/dicom-web/studies/{study_uid}",
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
        },
        stream=True,
        timeout=3600,
    )
    answer.raise_for_status()
    _, params = parse_options_header(answer.headers["Content-Type"])
    target.mkdir()
    parts = _PartFiles(target)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_headers_finished": parts.begin,
            "on_part_data": parts.data,
            "on_part_end": parts.end,
        },
    )
    answer.raw.decode_content = True
    while chunk := answer.raw.read(READ_SIZE):
        parser.write(chunk)
    return parts.count, parts.size


def rad69_request(consumer: Consumer, manifest: kos.Manifest) -> tuple[str, bytes, str]:
    """The URL, body and media type of the Consumer's RAD-69 request for
    every instance of ``manifest``, held at one Retrieve Location."""
    by_series: dict[tuple[str, str], list[kos.ManifestReference]] = defaultdict(list)
    for ref in manifest.references:
        by_series[(ref.study_instance_uid, ref.series_instance_uid)].append(ref)
    (location,) = {ref.retrieve_location_uid for ref in manifest.references}
    action = transaction("RAD-69")["request_action"]
    envelope = wire.build_envelope(consumer._rad69_request(location, by_series), action)
    return (
        consumer.endpoint_for(location),
        wire.serialize(envelope),
        f'application/soap+xml; charset=UTF-8; action="{action}"',
    )


def drain_rad69(url: str, body: bytes, content_type: str) -> int:
    """POST a RAD-69 request and read its answer to the end, dropping it;
    return the bytes read."""
    with requests.post(
        url, data=body, headers={"Content-Type": content_type}, stream=True
    ) as answer:
        answer.raise_for_status()
        return sum(len(c) for c in answer.raw.stream(READ_SIZE, decode_content=False))


def drain_wado_rs(study_uid: str) -> int:
    """GET Orthanc's WADO-RS answer for a study and read it to the end,
    dropping it; return the bytes read."""
    with requests.get(
        f"{ORTHANC_URL}/dicom-web/studies/{study_uid}",
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'
        },
        stream=True,
        timeout=3600,
    ) as answer:
        answer.raise_for_status()
        return sum(len(c) for c in answer.raw.stream(READ_SIZE, decode_content=False))


def fsynced_copy(source: Path, target: Path) -> None:
    """Copy a tree file by file, fsyncing each copy."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        descriptor = os.open(out, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def serve_node(settings: Settings, ready: Connection, stop: EventType) -> None:
    """Run an xdsi node until ``stop`` is set; send its settings to ``ready``."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with Node(settings) as node:
        ready.send(node.settings)
        stop.wait()


def timed_turns(runs: int, *steps: Callable[[int], Path]) -> list[float]:
    """Time each step ``runs`` times, the steps taking turns; return the
    median of each.

    Every step starts with nothing left to write back: what the step before
    left in the page cache (a plain copy's files, say) is written out first,
    untimed, so that no step pays for another's writes. The folder a step
    returns, its output, is removed once its time is taken, so that the next
    step writes into memory the last one freed. Otherwise each run would
    take fresh pages, and on a virtual machine whose balloon driver hands
    free pages back to the host (virtio free page reporting) the first
    touch of such a page can cost more than the copy being timed: a plain
    copy of the bundled CT took 17 ms in reused memory and 100 ms in fresh.
    Time-to-share still pays for the pages of the instances the node keeps,
    as it would in service.
    """
    times: list[list[float]] = [[] for _ in steps]
    for n in range(runs):
        for step, kept in zip(steps, times, strict=True):
            os.sync()
            started = time.perf_counter()
            output = step(n)
            kept.append(time.perf_counter() - started)
            shutil.rmtree(output)
    return [statistics.median(kept) for kept in times]


def bench(study_dir: Path, gigabytes: float, runs: int, work: Path) -> None:
    """Run every measurement; Orthanc and the node live only in here."""
    if gigabytes:
        study_dir = synthetic(study_dir, work / "synthetic", gigabytes)
    files = sorted(p for p in study_dir.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    (study,) = scan.scan_directory(study_dir).studies

    orthanc_root = work / "orthanc"
    orthanc_root.mkdir()
    log = open(orthanc_root / "orthanc.log", "wb")
    orthanc = subprocess.Popen(
        [ORTHANC, str(orthanc_config(orthanc_root))], stdout=log, stderr=log
    )
    try:
        wait_for(f"{ORTHANC_URL}/system")
        with requests.Session() as session:
            for path in files:
                session.post(
                    f"{ORTHANC_URL}/instances", data=path.read_bytes(), timeout=120
                ).raise_for_status()

        requested = (
            Settings()
            .with_storage(work / "node")
            .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
        )
        spawn = multiprocessing.get_context("spawn")
        receiver, sender = spawn.Pipe(duplex=False)
        stop = spawn.Event()
        server = spawn.Process(target=serve_node, args=(requested, sender, stop))
        server.start()
        try:
            if not receiver.poll(60):
                raise RuntimeError("the xdsi node did not start within 60 s")
            settings = receiver.recv()
            services = build_services(settings)
            patient = qualify_patient_id("BENCH-69", settings)
            send_message(
                settings.node.host, settings.registry.feed_port, build_feed(patient)
            )
            services.imaging_source.publish(study, patient)
            with services.engine.connect() as conn:
                (blob,) = conn.execute(
                    select(imaging_manifest.c.blob).where(
                        imaging_manifest.c.study_instance_uid
                        == study.study_instance_uid
                    )
                ).one()
            manifest = kos.parse_manifest(services.imaging_source.blobs.path(blob))

            def rad69(n: int) -> Path:
                result = FetchResult()
                out = work / f"rad69-{n}"
                services.consumer.retrieve_images(manifest, out, result, patient)
                assert not result.missing and len(result.instances) == len(files)
                return out

            def wado_rs(n: int) -> Path:
                target = work / f"orthanc-{n}"
                count, got = orthanc_download(study.study_instance_uid, target)
                assert count == len(files) and got >= size
                return target

            rad69_time, orthanc_time = timed_turns(runs, rad69, wado_rs)

            # The servers alone: each answer read to its end and dropped,
            # nothing parsed or filed, so that what the two clients do with
            # the bytes is left out.
            request = rad69_request(services.consumer, manifest)

            def rad69_wire(n: int) -> Path:
                out = work / f"rad69-wire-{n}"
                out.mkdir()
                assert drain_rad69(*request) >= size
                return out

            def wado_rs_wire(n: int) -> Path:
                out = work / f"orthanc-wire-{n}"
                out.mkdir()
                assert drain_wado_rs(study.study_instance_uid) >= size
                return out

            rad69_wire_time, orthanc_wire_time = timed_turns(
                runs, rad69_wire, wado_rs_wire
            )

            # Time-to-share needs a study not yet published: a relabelled
            # copy; the plain copies start from other fresh copies.
            copies = [relabelled(study_dir, work / f"share-{n}") for n in range(runs)]
            plain = [relabelled(study_dir, work / f"plain-{n}") for n in range(runs)]
            synced = [relabelled(study_dir, work / f"synced-{n}") for n in range(runs)]
            # The patients are known to the registry before their studies
            # are shared (ITI-8 is not part of time-to-share).
            sharers = [
                qualify_patient_id(f"BENCH-SHARE-{n}", settings) for n in range(runs)
            ]
            for sharer in sharers:
                send_message(
                    settings.node.host, settings.registry.feed_port, build_feed(sharer)
                )

            def share(n: int) -> Path:
                (fresh,) = scan.scan_directory(copies[n]).studies
                services.imaging_source.publish(fresh, sharers[n])
                result = services.consumer.fetch(sharers[n], work / f"fetched-{n}")
                assert not result.missing
                return work / f"fetched-{n}"

            def plain_copy(n: int) -> Path:
                shutil.copytree(plain[n], work / f"plain-copy-{n}")
                return work / f"plain-copy-{n}"

            def synced_copy(n: int) -> Path:
                fsynced_copy(synced[n], work / f"synced-copy-{n}")
                return work / f"synced-copy-{n}"

            share_time, copy_time, synced_time = timed_turns(
                runs, share, plain_copy, synced_copy
            )
            services.engine.dispose()
        finally:
            stop.set()
            server.join(timeout=30)
            if server.is_alive():
                server.kill()
                server.join()
    finally:
        try:
            requests.post(f"{ORTHANC_URL}/tools/shutdown", timeout=10)
            orthanc.wait(timeout=30)
        except (requests.RequestException, subprocess.TimeoutExpired):
            orthanc.kill()
            orthanc.wait()
        log.close()

    mb = size / 1e6
    print(f"study: {len(files)} instances, {mb:.1f} MB, {runs} runs (median)")
    print(f"RAD-69 retrieve:          {rad69_time:8.3f} s {mb / rad69_time:8.1f} MB/s")
    print(
        f"Orthanc WADO-RS download: {orthanc_time:8.3f} s {mb / orthanc_time:8.1f} MB/s"
    )
    print(f"ratio Orthanc / RAD-69:   {orthanc_time / rad69_time:8.2f} (target >= 1.0)")
    print(f"RAD-69 answer, read only: {rad69_wire_time:8.3f} s")
    print(f"Orthanc answer, read only:{orthanc_wire_time:8.3f} s")
    print(f"ratio, servers alone:     {orthanc_wire_time / rad69_wire_time:8.2f}")
    print(f"time-to-share:            {share_time:8.3f} s")
    print(f"plain copy:               {copy_time:8.3f} s")
    print(f"plain copy, fsynced:      {synced_time:8.3f} s")
    print(f"ratio share / copy:       {share_time / copy_time:8.2f} (target <= 3)")
    print(f"ratio share / fsynced:    {share_time / synced_time:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", type=Path, default=bundled_study())
    parser.add_argument("--synthetic-gb", type=float, default=0.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    if os.environ.get(IN_NETNS) != "1":
        # Re-run inside a private network namespace whose only interface is
        # loopback, so that Orthanc's 0.0.0.0 is loopback only.
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            str(args.study.resolve()),
            f"--synthetic-gb={args.synthetic_gb}",
            f"--runs={args.runs}",
        ]
        script = "ip link set lo up && exec " + shlex.join(command)
        env = {**os.environ, IN_NETNS: "1"}
        return subprocess.call(
            ["unshare", "--net", "--fork", "--", "bash", "-c", script], env=env
        )

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="xdsi-bench-rad69-"))
    try:
        bench(args.study, args.synthetic_gb, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

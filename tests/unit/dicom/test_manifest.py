"""Tests of manifests built in the worker process (xdsi.dicom.manifest)."""

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from xdsi import worker
from xdsi.cli import bundled_study
from xdsi.dicom.kos import NotAManifest, parse_manifest
from xdsi.dicom.manifest import ManifestOptions, encode, encoded_manifest
from xdsi.dicom.scan import scan_directory

OPTIONS = ManifestOptions(
    retrieve_ae_title="XDSI_IDS",
    retrieve_location_uid="1.3.6.1.4.1.21367.13.80.110",
    retrieve_url="http://127.0.0.1:9083/dicomweb",
    institution_name="xdsi test",
    accession_assigning_authority="1.3.6.1.4.1.21367.13.20.1000",
)


@pytest.fixture(scope="module")
def study():
    (study,) = scan_directory(bundled_study()).studies
    return study


def _same_but_new(facts):
    """Facts without what every build makes anew."""
    return dataclasses.replace(facts, unique_id="", creation_time="")


def test_worker_builds_the_manifest_built_in_process(study, own_worker):
    here = encode(study, OPTIONS)
    there = encoded_manifest(study, OPTIONS, in_worker=True)

    assert worker.DEFAULT.executor is not None
    assert parse_manifest(there.data).references == parse_manifest(here.data).references
    assert _same_but_new(there.facts) == _same_but_new(here.facts)
    assert parse_manifest(there.data).sop_instance_uid == there.facts.unique_id


def test_small_study_is_built_without_a_worker(study, own_worker):
    assert len(study.instances) < worker.MIN_INSTANCES
    encoded_manifest(study, OPTIONS)
    assert worker.DEFAULT.executor is None


def test_large_study_goes_to_the_worker(study, own_worker, monkeypatch):
    monkeypatch.setattr(worker, "MIN_INSTANCES", len(study.instances))
    built = encoded_manifest(study, OPTIONS)
    assert worker.DEFAULT.executor is not None
    assert len(parse_manifest(built.data).references) == len(study.instances)


def _alive(pid: int) -> bool:
    """Whether the process ``pid`` still runs: an exited one may linger as a
    zombie until whoever adopted it reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_idle_worker_is_stopped_and_started_again(study, own_worker, monkeypatch):
    """A worker that has had nothing to do for IDLE_SECONDS exits; the next
    large study starts another."""
    monkeypatch.setattr(worker, "IDLE_SECONDS", 0.5)
    encoded_manifest(study, OPTIONS, in_worker=True)
    first = worker.DEFAULT.executor
    (pid,) = first._processes

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        worker.DEFAULT.executor is not None or _alive(pid)
    ):
        time.sleep(0.1)
    assert worker.DEFAULT.executor is None
    assert not _alive(pid)

    built = encoded_manifest(study, OPTIONS, in_worker=True)
    assert worker.DEFAULT.executor not in (None, first)
    assert len(parse_manifest(built.data).references) == len(study.instances)


def test_worker_of_a_killed_process_exits(tmp_path):
    """A process killed outright (SIGKILL) cannot stop its worker; the worker
    sees it gone and exits rather than linger under init."""
    script = (
        "import sys, time\n"
        "from xdsi import worker\n"
        "worker.run(1, sum, [1, 2])\n"
        "(pid,) = worker.DEFAULT.executor._processes\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_process_whose_stuck_worker_was_killed_under_work_still_exits():
    """Work larger than a pipe holds, sent to a worker that has stopped
    reading, is done here once its allowance is over and the worker killed;
    the process then exits, though the pool's feeder thread was left
    writing into a pipe no process reads (CPython gh-94777, in Pythons
    before 3.11.5: xdsi serve would never end)."""
    script = (
        "import os, signal\n"
        "from xdsi import worker\n"
        "worker.run(1, sum, [1, 2])\n"
        "(process,) = worker.DEFAULT.executor._processes.values()\n"
        "os.kill(process.pid, signal.SIGSTOP)\n"
        "worker.BASE_ALLOWANCE, worker.ALLOWANCE_PER_INSTANCE = 1.0, 0.0\n"
        "print(worker.run(1, len, b'x' * (4 << 20)), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        # A hang, not a speed: the process ends in a second or two.
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(4 << 20)


def test_a_busy_worker_is_not_stopped(study, own_worker, monkeypatch):
    monkeypatch.setattr(worker, "IDLE_SECONDS", 0.5)
    future = worker.submit(time.sleep, 1.5)
    running = worker.DEFAULT.executor
    time.sleep(1.0)
    assert worker.DEFAULT.executor is running
    future.result(10)


def test_error_in_the_worker_is_raised_as_itself(study, own_worker):
    bad = dataclasses.replace(OPTIONS, retrieve_location_uid="not-a-uid")
    with pytest.raises(ValueError, match="not a valid UID"):
        encoded_manifest(study, bad, in_worker=True)
    # The worker survives a refused study.
    started = worker.DEFAULT.executor
    encoded_manifest(study, OPTIONS, in_worker=True)
    assert worker.DEFAULT.executor is started


def test_not_a_manifest_survives_pickling():
    error = pickle.loads(pickle.dumps(NotAManifest("1.2.3", "no Content Date")))
    assert (error.sop_instance_uid, error.reason) == ("1.2.3", "no Content Date")
    assert str(error) == "1.2.3 is not an XDS-I.b manifest: no Content Date"


def test_dead_worker_falls_back_and_is_replaced(study, own_worker, caplog):
    encoded_manifest(study, OPTIONS, in_worker=True)
    dead = worker.DEFAULT.executor
    for pid in list(dead._processes):
        os.kill(pid, signal.SIGKILL)
    for process in list(dead._processes.values()):
        process.join(10)

    with caplog.at_level(logging.WARNING, logger="xdsi.worker"):
        built = encoded_manifest(study, OPTIONS, in_worker=True)
    assert len(parse_manifest(built.data).references) == len(study.instances)
    assert "the worker process failed" in caplog.text
    assert worker.DEFAULT.executor is None

    encoded_manifest(study, OPTIONS, in_worker=True)
    assert worker.DEFAULT.executor not in (None, dead)


def test_stopped_worker_is_killed_and_the_work_done_here(
    study, own_worker, monkeypatch, caplog
):
    """A worker that does not answer in its allowance (here stopped) holds
    up nothing for long: it is killed and the manifest built in-process."""
    encoded_manifest(study, OPTIONS, in_worker=True)
    stuck = worker.DEFAULT.executor
    (process,) = stuck._processes.values()
    os.kill(process.pid, signal.SIGSTOP)
    monkeypatch.setattr(worker, "BASE_ALLOWANCE", 1.0)
    monkeypatch.setattr(worker, "ALLOWANCE_PER_INSTANCE", 0.0)

    with caplog.at_level(logging.WARNING, logger="xdsi.worker"):
        built = encoded_manifest(study, OPTIONS, in_worker=True)

    assert len(parse_manifest(built.data).references) == len(study.instances)
    assert "no answer within 1 s" in caplog.text
    process.join(10)
    assert process.exitcode == -signal.SIGKILL
    assert worker.DEFAULT.executor is None

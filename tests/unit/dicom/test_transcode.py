"""Transfer syntax choice and re-encoding for RAD-69 (RAD TF-3 4.69.4.2.3)."""

from __future__ import annotations

import contextlib
import csv
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from werkzeug.exceptions import NotAcceptable

from tests.conftest import SHARED, dicom_path
from xdsi import worker
from xdsi.actors.dicomweb import _render
from xdsi.cli import bundled_study
from xdsi.dicom import frames, transcode
from xdsi.dicom.transcode import is_lossless, is_lossy, produce

# The one single no pydicom plugin decodes (shared dicom README, "Decoding
# caveat"): it can be sent only as stored.
UNDECODABLE = "ts-jpeg-extended-12bit__MR1_JPLY.dcm"


def _singles() -> list[str]:
    """The singles/ files of the shared MANIFEST.tsv (a placeholder without
    the shared data, so that the test skips or, under CI, fails)."""
    manifest = SHARED / "dicom" / "MANIFEST.tsv"
    if not manifest.exists():
        return ["shared-data-missing"]
    with open(manifest, encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return [Path(r["path"]).name for r in rows if r["path"].startswith("singles/")]


SINGLES = _singles()


def _single(name: str) -> tuple[Path, str]:
    path = dicom_path("singles", name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return path, str(syntax)


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        # Some public test files carry values pydicom warns about.
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _pixels(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read(path).pixel_array


def _has_pixels(path: Path) -> bool:
    return "PixelData" in _read(path)


@pytest.mark.parametrize("name", SINGLES)
def test_instance_asked_in_its_own_syntax_comes_back_byte_identical(
    name: str, tmp_path: Path
) -> None:
    """RAD TF-3 4.69.4.2.3: an instance held in a listed syntax is sent as held."""
    path, syntax = _single(name)

    produced = produce(path, syntax, [ExplicitVRBigEndian, syntax], tmp_path)

    assert produced is not None
    assert produced.transfer_syntax_uid == syntax
    assert produced.path.read_bytes() == path.read_bytes()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", SINGLES)
def test_instance_asked_in_explicit_little_endian_decodes_to_equal_pixels(
    name: str, tmp_path: Path
) -> None:
    """RAD TF-3 4.69.4.2.3; DICOM PS3.5 A.2: native pixels equal the held ones."""
    path, syntax = _single(name)
    asked = [f" {ExplicitVRLittleEndian}\n"]

    produced = produce(path, syntax, asked, tmp_path)

    if name == UNDECODABLE:
        assert produced is None
        return
    assert produced is not None
    assert produced.transfer_syntax_uid == ExplicitVRLittleEndian
    sent = _read(produced.path)
    assert sent.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sent.SOPInstanceUID == _read(path).SOPInstanceUID
    if _has_pixels(path):
        assert np.array_equal(_pixels(produced.path), _pixels(path))
    else:
        assert sent == _read(path)


@pytest.mark.parametrize(
    "target", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name
)
@pytest.mark.parametrize(
    "name",
    [
        "ts-explicit-le__CT_small.dcm",
        "ts-explicit-be__MR_small_bigendian.dcm",
        "ts-jpeg-lossless-sv1__CT1_JPLL.dcm",
        "enhanced-mr-mf__emri_small.dcm",
    ],
)
def test_lossless_encoding_keeps_every_pixel(
    name: str, target: str, tmp_path: Path
) -> None:
    """DICOM PS3.5 A.4: a lossless encapsulated result decodes to equal pixels."""
    path, syntax = _single(name)

    produced = produce(path, syntax, [target], tmp_path)

    assert produced is not None
    assert produced.transfer_syntax_uid == target
    assert _read(produced.path).file_meta.TransferSyntaxUID == target
    assert np.array_equal(_pixels(produced.path), _pixels(path))
    held_label = _read(path).get("LossyImageCompression")
    assert _read(produced.path).get("LossyImageCompression") == held_label


@pytest.mark.parametrize(
    "target", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name
)
def test_lossless_encoding_of_colour_held_by_plane_keeps_every_pixel(
    target: str, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.6.3.1.3: a native RGB image held colour by plane
    (Planar Configuration 1) decodes to its own pixels once encoded; RLE
    scrambled it, its planes read as if interleaved."""
    path = dicom_path("study-ct", "S4010", "I0030.dcm")
    held = _read(path)
    assert (held.SamplesPerPixel, held.PlanarConfiguration) == (3, 1)

    produced = produce(path, str(held.file_meta.TransferSyntaxUID), [target], tmp_path)

    assert produced is not None and produced.transfer_syntax_uid == target
    assert np.array_equal(_pixels(produced.path), _pixels(path))


def test_lossy_syntax_is_skipped_when_a_lossless_one_is_listed(tmp_path: Path) -> None:
    """RAD TF-3 4.69.4.2.3: lossless stays lossless while the consumer accepts it."""
    path, syntax = _single("ts-explicit-le__CT_small.dcm")

    produced = produce(path, syntax, [JPEG2000, RLELossless], tmp_path)

    assert produced is not None
    assert produced.transfer_syntax_uid == RLELossless


@pytest.mark.parametrize("target", [JPEG2000, JPEGLSNearLossless], ids=str)
def test_lossy_result_only_when_consumer_lists_only_lossy_syntaxes(
    target: str, tmp_path: Path
) -> None:
    """DICOM PS3.3 C.7.6.1.1.5: a lossy result says so in its attributes."""
    path, syntax = _single("ts-explicit-le__CT_small.dcm")

    produced = produce(path, syntax, [JPEGBaseline8Bit, target], tmp_path)

    assert produced is not None
    assert produced.transfer_syntax_uid == target
    sent = _read(produced.path)
    assert sent.LossyImageCompression == "01"
    assert sent.SOPInstanceUID == _read(path).SOPInstanceUID
    assert _pixels(produced.path).shape == _pixels(path).shape


@pytest.mark.parametrize(
    ("name", "asked"),
    [
        ("ts-explicit-le__CT_small.dcm", ["1.2.840.10008.1.2.1.999"]),
        ("ts-explicit-le__CT_small.dcm", [JPEGBaseline8Bit]),
        ("ts-explicit-le__CT_small.dcm", [ExplicitVRBigEndian]),
        ("ts-explicit-le__CT_small.dcm", ["", "  "]),
        (UNDECODABLE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
        ("sr-comprehensive__test-SR.dcm", [RLELossless, JPEG2000Lossless]),
        ("ecg-waveform__waveform_ecg.dcm", [JPEGLSLossless]),
        ("mg-screening-jpegll__GH133.dcm", [JPEGBaseline8Bit]),
    ],
    ids=[
        "unknown-uid",
        "no-jpeg-baseline-encoder",
        "big-endian-only-as-held",
        "blank-uids",
        "undecodable-pixels",
        "sr-in-encapsulated",
        "waveform-in-encapsulated",
        "lossless-held-to-baseline",
    ],
)
def test_no_listed_syntax_can_be_produced(
    name: str, asked: list[str], tmp_path: Path
) -> None:
    """RAD TF-3 4.69.4.2.3: nothing to send when no listed syntax fits."""
    path, syntax = _single(name)

    assert produce(path, syntax, asked, tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_native_syntaxes_follow_the_list_order(tmp_path: Path) -> None:
    """RAD TF-3 4.69.4.2.3: the first listed syntax that can be produced wins."""
    path, syntax = _single("ts-rle__MR_small_RLE.dcm")
    asked = [JPEGBaseline8Bit, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian]

    produced = produce(path, syntax, asked, tmp_path)

    assert produced is not None
    assert produced.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert np.array_equal(_pixels(produced.path), _pixels(path))


def test_syntax_classes_follow_dicom_ps3_5() -> None:
    """DICOM PS3.5 A.4: JPEG 2000 (4.91) may be lossy, 4.90 never is."""
    assert is_lossy(JPEG2000) and not is_lossless(JPEG2000)
    assert is_lossless(JPEG2000Lossless) and not is_lossy(JPEG2000Lossless)
    assert not is_lossy("1.2.840.10008.1.2.1.999")
    assert not is_lossless("1.2.840.10008.1.2.1.999")


def test_a_failed_decode_is_not_logged_once_per_plugin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance no plugin decodes rules a syntax out quietly: pydicom's
    ERROR per failed plugin would otherwise fill the log on every request.
    The 12-bit JPEG Extended single is one none of the installed plugins
    decodes."""
    source = dicom_path("singles", "ts-jpeg-extended-12bit__MR1_JPLY.dcm")
    held = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    caplog.set_level(logging.DEBUG)

    produced = produce(
        source, held.TransferSyntaxUID, [ExplicitVRLittleEndian], tmp_path
    )

    assert produced is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Elsewhere, pydicom's own records still pass.
    logging.getLogger("pydicom.pixels.decoders.base").error("elsewhere")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "elsewhere"
    ]


def test_a_failed_encode_is_not_logged_either(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An image no encoder takes (openjpeg refuses the 10 columns of this CR
    for JPEG 2000) rules the syntax out quietly, openjpeg's own errors
    included; the next syntax listed is sent."""
    source = dicom_path("singles", "cr__ids-1301.dcm")
    held = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    caplog.set_level(logging.DEBUG)

    produced = produce(
        source,
        held.TransferSyntaxUID,
        [JPEG2000Lossless, RLELossless],
        tmp_path,
    )

    assert produced is not None and produced.transfer_syntax_uid == RLELossless
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_wado_uri_answers_an_undecodable_image_406_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DICOM PS3.18 WADO-URI: an image that cannot be rendered is not
    acceptable as image/jpeg; the log says so once, at WARNING."""
    source = dicom_path("singles", "ts-jpeg-extended-12bit__MR1_JPLY.dcm")
    caplog.set_level(logging.DEBUG)

    with pytest.raises(NotAcceptable):
        _render(source, 1)

    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in logged] == [
        ("xdsi.actors.dicomweb", "WARNING")
    ]


def test_no_more_instances_are_re_encoded_at_once_than_there_are_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of requests that each re-encode an instance waits for a free
    slot instead of holding every decoded image in memory at once."""
    path, held = _single("ts-explicit-le__CT_small.dcm")
    writing = 0
    most = 0
    lock = threading.Lock()
    real_write = transcode._write

    def counted_write(source: Path, target: str, destination: Path) -> None:
        nonlocal writing, most
        with lock:
            writing += 1
            most = max(most, writing)
        try:
            time.sleep(0.05)
            real_write(source, target, destination)
        finally:
            with lock:
                writing -= 1

    monkeypatch.setattr(transcode, "_write", counted_write)
    bursts = transcode.TRANSCODING_SLOTS * 4

    def one(n: int) -> transcode.Produced | None:
        spool = tmp_path / str(n)
        spool.mkdir()
        return produce(path, held, [RLELossless], spool)

    with ThreadPoolExecutor(bursts) as pool:
        produced = list(pool.map(one, range(bursts)))

    assert all(p is not None and p.transfer_syntax_uid == RLELossless for p in produced)
    assert 1 < most <= transcode.TRANSCODING_SLOTS


# Two threads re-encoding one instance into a JPEG 2000 syntax, each into a
# spool of its own, as two requests served at once do.
_TWO_AT_ONCE = """
import sys, threading
from pathlib import Path
from xdsi.dicom.transcode import produce
source, held, target = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
spool = Path(sys.argv[4])
def work(n):
    for _ in range(30):
        assert produce(source, held, [target], spool / str(n)) is not None
threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@pytest.mark.parametrize(
    "target", [JPEG2000Lossless, JPEG2000], ids=["j2k", "j2k-lossy"]
)
def test_two_threads_encoding_jpeg_2000_at_once_do_not_kill_the_process(
    tmp_path: Path, target: str
) -> None:
    """The JPEG 2000 encoder is taken by one thread at a time: two at once
    corrupted memory and the process died of SIGSEGV, the node with it. The
    encoding runs in a process of its own, which such a death cannot take
    the test run with."""
    # A 512 x 512 slice: small images did not show it.
    path = min(p for p in bundled_study().rglob("*.dcm"))
    held = str(
        pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    )

    done = subprocess.run(
        [sys.executable, "-c", _TWO_AT_ONCE, str(path), held, target, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture
def own_transcoders(monkeypatch: pytest.MonkeyPatch) -> Iterator[worker.Pool]:
    """Transcoding processes of this test's own, stopped after it."""
    own = worker.Pool(2, "the test's transcoding processes")
    monkeypatch.setattr(transcode, "TRANSCODERS", own)
    yield own
    own.close()


def _ct_jobs(count: int) -> list[transcode.Job]:
    """Re-encodings of ``count`` slices of the bundled CT's largest series
    (of files named apart, as stored copies are, since a re-encoding is
    named after its source file)."""
    series = max(bundled_study().iterdir(), key=lambda s: len(list(s.iterdir())))
    files = sorted(series.glob("*.dcm"))[:count]
    assert len(files) == count
    held = str(
        pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
    return [(path, held, [RLELossless]) for path in files]


def test_every_re_encoding_is_made_by_the_transcoding_processes(
    tmp_path: Path, own_transcoders: worker.Pool
) -> None:
    """Re-encodings are made side by side in processes of their own, one
    instance alone included, each as produce makes it; an instance sent as
    held is not handed to them."""
    jobs = _ct_jobs(6)
    source, held, _ = jobs[0]

    with transcode.Production([(source, held, [held])], tmp_path / "held") as same:
        as_held = same.result(0)
    assert own_transcoders.executor is None
    with transcode.Production(jobs[:1], tmp_path / "one") as one:
        alone = one.result(0)
    assert own_transcoders.executor is not None
    with transcode.Production(jobs, tmp_path / "many") as many:
        made = [many.result(n) for n in range(len(jobs))]
    here = produce(source, held, [RLELossless], tmp_path / "here")

    assert as_held is not None and as_held.path == source
    assert alone is not None and here is not None and made[0] is not None
    assert alone.path.read_bytes() == here.path.read_bytes()
    assert made[0].path.read_bytes() == here.path.read_bytes()
    for (path, _, _), produced in zip(jobs, made, strict=True):
        assert produced is not None and produced.transfer_syntax_uid == RLELossless
        assert np.array_equal(_pixels(produced.path), _pixels(path))


def test_instances_of_a_transcoding_process_that_died_are_not_sent_and_the_next_are(
    tmp_path: Path, own_transcoders: worker.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A transcoding process that dies (a codec's SIGSEGV) takes only the
    re-encodings under way with it: they cannot be produced, one WARNING
    says so, and the next request starts new processes."""
    jobs = _ct_jobs(12)

    with transcode.Production(jobs, tmp_path / "first") as first:
        assert own_transcoders.executor is not None
        for process in list(own_transcoders.executor._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        lost = [first.result(n) for n in range(len(jobs))]
    with transcode.Production(jobs, tmp_path / "second") as second:
        again = [second.result(n) for n in range(len(jobs))]

    assert None in lost
    warnings = [
        r for r in caplog.records if "transcoding process died" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert all(p is not None and p.transfer_syntax_uid == RLELossless for p in again)


@pytest.mark.parametrize(
    ("cores", "processes", "each"),
    [(16, 1, 16), (16, 4, 4), (16, 3, 6), (2, 2, 1), (2, 4, 1)],
)
def test_http_processes_serving_side_by_side_share_the_cores_for_transcoding(
    monkeypatch: pytest.MonkeyPatch, cores: int, processes: int, each: int
) -> None:
    """[node] workers: each HTTP process has transcoding processes of its
    own, as many as its share of the cores, one at least."""
    own = worker.Pool(cores, "the test's transcoding processes")
    monkeypatch.setattr(transcode, "TRANSCODERS", own)
    monkeypatch.setattr(transcode, "TRANSCODING_SLOTS", cores)

    transcode.share_cores(processes)

    assert own.size == each


def test_instances_of_a_stuck_transcoding_process_are_not_sent_and_the_next_are(
    tmp_path: Path,
    own_transcoders: worker.Pool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transcoding process that takes longer than its allowance over an
    instance (a decoder looping on a corrupt frame; stopped here) does not
    hold the request: the transcoding processes are killed, the instances
    they had cannot be produced, one WARNING says so, and the next request
    starts new processes."""
    monkeypatch.setattr(transcode, "ALLOWANCE", 3.0)
    monkeypatch.setattr(transcode, "ALLOWANCE_PER_MB", 0.0)
    jobs = _ct_jobs(12)

    lost: list[transcode.Produced | None] = []
    stuck: list[multiprocessing.Process] = []

    def request() -> None:
        with transcode.Production(jobs, tmp_path / "first") as first:
            assert own_transcoders.executor is not None
            stuck.extend(own_transcoders.executor._processes.values())
            for process in stuck:
                os.kill(process.pid, signal.SIGSTOP)
            lost.extend(first.result(n) for n in range(len(jobs)))

    answering = threading.Thread(target=request)
    answering.start()
    # A bound on liveness, not on speed: without an allowance the request
    # waits for good; its processes are then killed to end the test.
    answering.join(120)
    if answering.is_alive():
        for process in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        answering.join(60)
    assert not answering.is_alive()
    with transcode.Production(jobs, tmp_path / "second") as second:
        again = [second.result(n) for n in range(len(jobs))]

    assert len(stuck) == 2
    assert lost == [None] * len(jobs)
    for process in stuck:
        process.join(10)
        assert process.exitcode == -signal.SIGKILL
    warned = [r for r in caplog.records if "(a codec stuck)" in r.getMessage()]
    assert len(warned) == 1
    assert all(p is not None and p.transfer_syntax_uid == RLELossless for p in again)


def test_a_request_queued_behind_another_is_not_taken_for_stuck(
    tmp_path: Path,
    own_transcoders: worker.Pool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two requests share the transcoding processes: the second's first
    instance waits in the queue for the first's many. That wait is not
    counted against its allowance, which starts when a process takes it up;
    counted, it would take the busy processes for stuck and kill them,
    failing both requests."""
    series = max(bundled_study().iterdir(), key=lambda s: len(list(s.iterdir())))
    other = next(s for s in bundled_study().iterdir() if len(list(s.iterdir())) > 4)
    assert other != series
    many = _ct_jobs(len(list(series.iterdir())))
    held = many[0][1]
    few = [(path, held, [RLELossless]) for path in sorted(other.glob("*.dcm"))[:4]]
    # The processes are started first: their start is no part of a job.
    with transcode.Production(few, tmp_path / "warm") as warm:
        assert all(warm.result(n) is not None for n in range(len(few)))
    # Far less than the first request's queue takes (54 RLE encodings on two
    # processes), far more than one encoding does.
    monkeypatch.setattr(transcode, "ALLOWANCE", 0.75)
    monkeypatch.setattr(transcode, "ALLOWANCE_PER_MB", 0.0)

    with transcode.Production(many, tmp_path / "first") as first:
        with transcode.Production(few, tmp_path / "second") as second:
            behind = [second.result(n) for n in range(len(few))]
        ahead = [first.result(n) for n in range(len(many))]

    assert all(p is not None for p in behind + ahead)
    assert not [r for r in caplog.records if "(a codec stuck)" in r.getMessage()]


def _keep_busy(pool: worker.Pool, folder: Path) -> list[Future]:
    """Give each of the pool's two processes five seconds' work; return
    once both have taken it up."""
    started = [folder / "first", folder / "second"]
    long = [
        pool.submit(
            subprocess.run, ["sh", "-c", f'touch "{path}" && sleep 5'], check=True
        )
        for path in started
    ]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in started):
        assert time.monotonic() < deadline, "the processes did not start"
        time.sleep(0.05)
    return long


def test_work_waiting_for_a_busy_process_is_not_taken_for_stuck(
    tmp_path: Path,
    own_transcoders: worker.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Work given while every transcoding process is busy (a rendering during
    long re-encodings) waits for one, however long: its allowance counts from
    when a process takes it up. ProcessPoolExecutor marks work running once
    it is queued for its processes; counted from then, the wait was taken for
    a codec stuck and the processes were killed, the long work with them."""
    long = _keep_busy(own_transcoders, tmp_path)

    assert transcode.isolated(abs, -1, allowance=1.0, what="a short job") == 1
    assert all(transcode.within(f, 60.0).returncode == 0 for f in long)
    assert not [r for r in caplog.records if "(a codec stuck)" in r.getMessage()]


def test_a_request_left_while_its_work_waits_for_a_busy_process_stops_nothing(
    tmp_path: Path,
    own_transcoders: worker.Pool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request left before its re-encodings are made (a peer gone) awaits
    those already queued for the processes, each within its allowance from
    when a process takes it up: the wait for other requests' long work
    before them is not taken for a codec stuck, which killed that work."""
    long = _keep_busy(own_transcoders, tmp_path)
    monkeypatch.setattr(transcode, "ALLOWANCE", 1.0)
    monkeypatch.setattr(transcode, "ALLOWANCE_PER_MB", 0.0)

    with transcode.Production(_ct_jobs(1), tmp_path / "left"):
        pass

    assert all(transcode.within(f, 60.0).returncode == 0 for f in long)
    assert not [r for r in caplog.records if "(a codec stuck)" in r.getMessage()]


@pytest.mark.parametrize("fate", ["dies", "hangs"])
def test_a_rendering_whose_process_dies_or_hangs_is_refused_and_the_next_is_made(
    fate: str,
    own_transcoders: worker.Pool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Images are rendered in the transcoding processes: one killed under a
    rendering (a codec's SIGSEGV) or stopped past its allowance (a codec
    stuck) makes that image not renderable (406, one WARNING), and neither
    ends nor holds the node; the next rendering starts new processes."""
    source = _ct_jobs(1)[0][0]
    assert _render(source, 1).startswith(b"\xff\xd8")
    assert own_transcoders.executor is not None
    processes = list(own_transcoders.executor._processes.values())
    monkeypatch.setattr(transcode, "ALLOWANCE", 2.0)
    monkeypatch.setattr(transcode, "ALLOWANCE_PER_MB", 0.0)
    for process in processes:
        if fate == "dies":
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        else:
            os.kill(process.pid, signal.SIGSTOP)

    with pytest.raises(NotAcceptable):
        _render(source, 1)
    # New processes start: their start (a second or more on a busy machine)
    # is within the allowance of the job that waits for them.
    monkeypatch.setattr(transcode, "ALLOWANCE", 60.0)
    again = _render(source, 1)

    for process in processes:
        process.join(10)
        assert process.exitcode == -signal.SIGKILL
    warned = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "transcoding process" in r.getMessage()
    ]
    assert len(warned) == 1
    assert ("stuck" if fate == "hangs" else "died") in warned[0].getMessage()
    assert again.startswith(b"\xff\xd8")


def test_a_frame_to_decode_is_decoded_by_a_transcoding_process(
    own_transcoders: worker.Pool,
) -> None:
    """WADO-RS Retrieve Frames of a compressed image asked for decoded: the
    frame is decoded by a transcoding process, as the calling thread would
    decode it; one whose process dies under it is a CodecFailure (the
    request's 406), and the next is decoded by new processes."""
    path, _ = _single("ts-rle__CT1_RLE.dcm")
    header = _read(path)
    expected = np.ascontiguousarray(_pixels(path), dtype="<i2").tobytes()

    decoded = frames.read_frame(path, header, 0, frames.decoded())
    assert own_transcoders.executor is not None
    processes = list(own_transcoders.executor._processes.values())
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    with pytest.raises(transcode.CodecFailure):
        frames.read_frame(path, header, 0, frames.decoded())
    again = frames.read_frame(path, header, 0, frames.decoded())

    assert decoded == again
    assert decoded == expected


# Decodes a JPEG image to Explicit VR Little Endian, as a rendering or a
# transcoding does, and prints what came of it.
_DECODE_ONE = """
import sys
from pathlib import Path
from xdsi.dicom.transcode import produce
produced = produce(Path(sys.argv[1]), sys.argv[2], [sys.argv[3]], Path(sys.argv[4]))
print("produced" if produced else "none")
"""


def _decode_one(path: Path, held: str, spool: Path) -> subprocess.CompletedProcess[str]:
    """Decode ``path``, held in ``held``, to Explicit VR Little Endian in a
    process of its own (_DECODE_ONE), which a codec's abort cannot take the
    test run with."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _DECODE_ONE,
            str(path),
            held,
            ExplicitVRLittleEndian,
            str(spool),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_corrupt_jpeg_frame_does_not_kill_the_process(tmp_path: Path) -> None:
    """A JPEG frame whose first Huffman table marker (ITU-T T.81 B.1.1.2,
    0xFFC4) lost its 0xFF, which intake keeps as received, is not decoded:
    GDCM's decoder aborted the process on it (an uncaught C++ exception),
    the node with it. Decoded in a process of its own, which such a death
    cannot take the test run with."""
    ds = _read(dicom_path("singles", "ts-jpeg-baseline-rgb__SC_rgb_jpeg_dcmtk.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert frame[177:179] == b"\xff\xc4"
    frame[177] = 0xE0
    ds.PixelData = encapsulate([bytes(frame)])
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)

    done = _decode_one(corrupt, JPEGBaseline8Bit, tmp_path / "spool")

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ("produced", "none")


def test_a_jpeg_ls_frame_smaller_than_rows_and_columns_does_not_kill_the_process(
    tmp_path: Path,
) -> None:
    """A JPEG-LS frame of 512x512 (ISO/IEC 14495-1 C.2.2, its SOF55 marker
    segment) in an image whose Rows and Columns say 1024, which intake keeps
    as received, is not decoded: GDCM's decoder aborted the process on it
    (an uncaught C++ exception), the transcoding process with it, and the
    work of other requests there. Decoded in a process of its own, which
    such a death cannot take the test run with."""
    ds = _read(dicom_path("singles", "ts-jpegls-lossless__CT1_JLSL.dcm"))
    assert (ds.Rows, ds.Columns) == (512, 512)
    ds.Rows = ds.Columns = 1024
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)

    done = _decode_one(corrupt, JPEGLSLossless, tmp_path / "spool")

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "none"


# Decodes the image at argv[1] as xdsi does, then prints its peak memory.
# The peak is VmHWM, of this program's own memory since its exec: ru_maxrss
# would carry the peak of the process it was forked from (a test worker that
# may have grown past the bound).
_DECODE_PEAK = """
import re, sys
import pydicom
import xdsi.dicom.transcode
try:
    pydicom.dcmread(sys.argv[1]).pixel_array
except Exception:
    pass
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


def _decoding_peak_mb(path: Path) -> int:
    """The peak memory, in MB, of a process of its own decoding ``path``
    as xdsi does (_DECODE_PEAK)."""
    done = subprocess.run(
        [sys.executable, "-c", _DECODE_PEAK, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_an_rle_frame_stating_a_larger_image_than_it_can_hold_is_not_decoded(
    tmp_path: Path,
) -> None:
    """DICOM PS3.5 G.3.1: an RLE frame decodes to at most 64 times its
    length. One of an image whose Rows and Columns state far more (a header
    not matching its pixel data, kept as received) is refused before its
    frame is allocated; one stating 65535x65535 took 8.6 GB for each
    request. Here 30000x30000 at 16 bits, 1.8 GB."""
    ds = _read(dicom_path("singles", "ts-rle__CT1_RLE.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert len(frame) * 64 < 30_000 * 30_000 * 2
    ds.Rows = ds.Columns = 30_000
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)

    assert _decoding_peak_mb(corrupt) < 600


def test_a_jpeg_frame_stating_a_huge_image_is_not_decoded(tmp_path: Path) -> None:
    """ITU-T T.81 B.2.2: a JPEG Lossless frame of 512x512 whose frame header
    (SOF3) and the image's Rows and Columns both say 16000x16000, kept as
    received, is refused before the decoder allocates and fills 256 million
    cells for it (more than transcode.MAX_FRAME_CELLS); 30000x30000 took
    7 GB and 20 s."""
    ds = _read(dicom_path("singles", "ts-jpeg-lossless-sv1__CT1_JPLL.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.find(b"\xff\xc3")
    assert sof >= 0 and frame[sof + 5 : sof + 9] == bytes.fromhex("02000200")
    frame[sof + 5 : sof + 9] = (16_000).to_bytes(2, "big") * 2  # Y, then X
    ds.PixelData = encapsulate([bytes(frame)])
    ds.Rows = ds.Columns = 16_000
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)

    assert _decoding_peak_mb(corrupt) < 600


# Re-encodes the image at argv[1] in Explicit VR Little Endian as xdsi does
# into the folder argv[2], then says whether it did and its peak memory (see
# _DECODE_PEAK).
_PRODUCE_PEAK = """
import re, sys
from pathlib import Path
from xdsi.dicom.transcode import produce
held = "1.2.840.10008.1.2.4.80"
made = produce(Path(sys.argv[1]), held, ["1.2.840.10008.1.2.1"], Path(sys.argv[2]))
status = open("/proc/self/status").read()
print("produced" if made else "none")
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


def test_an_instance_decoding_to_more_than_the_bound_is_not_re_encoded(
    tmp_path: Path,
) -> None:
    """A JPEG-LS image of 70 uniform frames of 4096x4096, each a few hundred
    bytes, decodes to 2.3 GB, more than transcode.MAX_DECODED_BYTES: it is
    not re-encoded (held only), rather than decoded whole in memory; 100
    such frames took 6.5 GB and 30 s."""
    ds = _read(dicom_path("singles", "ts-jpegls-lossless__CT1_JLSL.dcm"))
    ds.Rows = ds.Columns = 4096
    ds.PixelData = np.zeros((4096, 4096), np.uint16).tobytes()
    ds.set_original_encoding(False, True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(JPEGLSLossless, generate_instance_uid=False)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame] * 70, has_bot=True)
    ds.NumberOfFrames = 70
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 100_000

    done = subprocess.run(
        [sys.executable, "-c", _PRODUCE_PEAK, str(bomb), str(tmp_path / "spool")],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    made, peak = done.stdout.split()[-2:]
    assert made == "none"
    assert int(peak) < 600, "MB at peak"
    assert not list((tmp_path / "spool").glob("*"))


def test_a_jpeg_2000_frame_stating_a_larger_image_is_not_decoded(
    tmp_path: Path,
) -> None:
    """ISO/IEC 15444-1 A.5.1: a frame whose SIZ marker states far more rows
    than the image's Rows (a corrupt frame, kept as received) is refused
    before openjpeg allocates for it; one stating gigapixels had the node
    killed for memory. Here 128 million cells, some 800 MB to openjpeg."""
    ds = _read(dicom_path("singles", "ts-j2k-lossy__CT1_J2KI.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    siz = frame.find(b"\xff\x4f\xff\x51")
    assert siz >= 0 and (ds.Rows, ds.Columns) == (512, 512)
    frame[siz + 12 : siz + 16] = (250_000).to_bytes(4, "big")  # Ysiz, the rows
    ds.PixelData = encapsulate([bytes(frame)])
    corrupt = tmp_path / "corrupt.dcm"
    ds.save_as(corrupt, enforce_file_format=True)

    assert _decoding_peak_mb(corrupt) < 600

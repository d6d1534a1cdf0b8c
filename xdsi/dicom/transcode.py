"""Transfer syntaxes: pick the one to send an instance in and re-encode it.

Implements RAD TF-3 4.69.4.2.3 (the pixel data is encoded in one of the
transfer syntaxes the request lists, the first that can be produced; lossless
stays lossless unless the consumer accepts lossy syntaxes only), with the
encodings of DICOM PS3.5 7, 8.2 and Annex A and the Lossy Image Compression
attributes of DICOM PS3.3 C.7.6.1.1.5.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders import (
    HTJ2KDecoder,
    HTJ2KLosslessDecoder,
    HTJ2KLosslessRPCLDecoder,
    JPEG2000Decoder,
    JPEG2000LosslessDecoder,
    JPEGBaseline8BitDecoder,
    JPEGExtended12BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLSLosslessDecoder,
    JPEGLSNearLosslessDecoder,
    RLELosslessDecoder,
)
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from xdsi import worker

logger = logging.getLogger(__name__)

# pydicom logs an ERROR for each pixel data plugin that fails, then raises
# once all have, and openjpeg logs its own errors on the way. Where xdsi
# decodes or encodes, it answers that failure itself (a syntax ruled out,
# an HTTP 406) and logs it once; the plugins' records are dropped in those
# threads only.
# (A logger's filter sees only what is logged to that logger itself.)
_PLUGIN_LOGGERS = (
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
    "openjpeg.decode",
    "openjpeg.encode",
)
_muted = threading.local()


class _MutedInThisThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_muted, "on", False)


for _name in _PLUGIN_LOGGERS:
    logging.getLogger(_name).addFilter(_MutedInThisThread())


@contextmanager
def plugin_errors_muted() -> Iterator[None]:
    """Drop the pixel data plugins' errors logged in this thread."""
    before = getattr(_muted, "on", False)
    _muted.on = True
    try:
        yield
    finally:
        _muted.on = before


# GDCM's JPEG (ISO 10918) decoder throws a C++ exception that nothing
# catches on some corrupt frames (a marker byte overwritten), and the process
# aborts, the node with it: intake keeps a corrupt frame as received, so one
# rendering or transcoding of such an image did it. Its JPEG-LS (ISO 14495)
# decoder does the same on a frame smaller than Rows and Columns say: the
# transcoding process died on each request for such an image, and the work
# of other requests with it. pylibjpeg, pyjpegls and Pillow decode these
# syntaxes here and raise on such a frame instead.
# Limitation: a frame that only GDCM's decoder reads is not decoded here.
# The JPEG (ITU-T T.81) and JPEG-LS (ISO/IEC 14495-1) decoders.
_JPEG_DECODERS = (
    JPEGBaseline8BitDecoder,
    JPEGExtended12BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLSLosslessDecoder,
    JPEGLSNearLosslessDecoder,
)
for _decoder in _JPEG_DECODERS:
    if "gdcm" in _decoder.available_plugins:
        _decoder.remove_plugin("gdcm")

# A JPEG 2000 codestream states its own image size in its SIZ marker
# segment (ISO/IEC 15444-1 A.5.1), and pylibjpeg's decoder (openjpeg)
# allocates for that size before it finds the data short: one corrupt frame
# stating gigapixels took tens of GB and the node was killed for memory. A
# frame stating more cells than Rows and Columns hold is refused unread.
_SIZ = b"\xff\x4f\xff\x51"


def _within_rows_and_columns(decode: Callable) -> Callable:
    def checked(src: bytes, runner: Any) -> Any:
        at = src.find(_SIZ, 0, 4096)
        if at >= 0 and len(src) >= at + 24:
            # Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (four bytes each).
            x, y, x0, y0 = struct.unpack(">4L", src[at + 8 : at + 24])
            if (x - x0) * (y - y0) > runner.rows * runner.columns:
                raise ValueError(
                    f"the JPEG 2000 codestream states a {x - x0}x{y - y0} image, "
                    f"more than Rows {runner.rows} and Columns {runner.columns}"
                )
        return decode(src, runner)

    return checked


for _decoder in (JPEG2000Decoder, JPEG2000LosslessDecoder):
    if "pylibjpeg" in _decoder._available:
        _decoder._available["pylibjpeg"] = _within_rows_and_columns(
            _decoder._available["pylibjpeg"]
        )

# An RLE segment (DICOM PS3.5 G.3.1) gives at most 128 bytes for each two
# bytes of its own (a Replicate Run), so that a frame decodes to at most 64
# times its length. pydicom's decoder allocates, and zeroes, the frame that
# Rows, Columns and Bits Allocated state before it finds the data short: a
# 100 kB frame of an image stating 65535x65535 at 16 bits took 8.6 GB and
# some seconds for each request. A frame stating more than it can hold is
# refused unread.
RLE_MAX_RATIO = 64


def _within_rle_bound(decode: Callable) -> Callable:
    def checked(src: bytes, runner: Any) -> Any:
        stated = (
            runner.rows
            * runner.columns
            * runner.samples_per_pixel
            * -(-runner.bits_allocated // 8)
        )
        if stated > RLE_MAX_RATIO * len(src):
            raise ValueError(
                f"an RLE frame of {len(src)} bytes cannot hold the {stated} "
                "bytes Rows, Columns and Bits Allocated state"
            )
        return decode(src, runner)

    return checked


for _name, _plugin in list(RLELosslessDecoder._available.items()):
    RLELosslessDecoder._available[_name] = _within_rle_bound(_plugin)

# A JPEG or JPEG-LS frame states its size in its own header (ITU-T T.81
# B.2.2, ISO/IEC 14495-1 C.2.2), and the decoders allocate for it, and fill
# it, before they find the data short: a frame of 100 kB in an image whose
# Rows and Columns say 30000x30000 as its header does took 5 to 10 GB and
# up to 100 s a request, and 65535x65535 more than the machine has. A
# frame of more cells (Rows x Columns x Samples per Pixel) than
# MAX_FRAME_CELLS, some 11585x11585 (a digitized film is 15 million), is
# refused unread.
# Limitation: an image of larger frames is sent only as held: not rendered,
# re-encoded or its frames decoded.
MAX_FRAME_CELLS = 2**27


def _within_max_frame_cells(decode: Callable) -> Callable:
    def checked(src: bytes, runner: Any) -> Any:
        cells = runner.rows * runner.columns * runner.samples_per_pixel
        if cells > MAX_FRAME_CELLS:
            raise ValueError(
                f"a frame of {runner.rows}x{runner.columns}x"
                f"{runner.samples_per_pixel} cells is more than "
                f"{MAX_FRAME_CELLS} to decode"
            )
        return decode(src, runner)

    return checked


for _decoder in (
    *_JPEG_DECODERS,
    JPEG2000LosslessDecoder,
    JPEG2000Decoder,
    HTJ2KLosslessDecoder,
    HTJ2KLosslessRPCLDecoder,
    HTJ2KDecoder,
    RLELosslessDecoder,
):
    for _name, _plugin in list(_decoder._available.items()):
        _decoder._available[_name] = _within_max_frame_cells(_plugin)

# A re-encoding decodes the whole instance in memory, and holds about twice
# that at its peak: a JPEG-LS image of 100 uniform 4096x4096 frames, 67 kB
# stored, took 6.5 GB and 30 s, and one of 300 frames more than the machine
# has. An instance decoding to more than MAX_DECODED_BYTES (a 4000-slice
# enhanced CT, 2 GB) is not re-encoded.
# Limitation: such an instance is sent only as held.
MAX_DECODED_BYTES = 2**31

# Native (uncompressed) encodings, DICOM PS3.5 A.1-A.3 and A.5.
NATIVE = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# Encapsulated syntaxes that keep every pixel value, DICOM PS3.5 A.4.
LOSSLESS_ENCAPSULATED = (
    RLELossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
)

# Encapsulated syntaxes that may discard pixel information (DICOM PS3.5
# A.4.1, A.4.4, A.4.5), with the Lossy Image Compression Method (0028,2114)
# a lossy result of ours is labelled with (DICOM PS3.3 C.7.6.1.1.5.1).
LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}

# The lossy syntaxes pydicom's plugins encode.
LOSSY_ENCODERS = (JPEGLSNearLossless, JPEG2000)

# The lossy encoders' settings: JPEG-LS NEAR of 2 and a JPEG 2000 rate of
# 10:1, both diagnostic-quality choices for CT and MR.
JPEG_LS_NEAR = 2
JPEG_2000_RATIO = 10.0

# Instances re-encoded at once in one process, whatever asks (RAD-69,
# WADO-RS, WADO-URI): each holds its decoded pixel data, hundreds of MB
# for a large multi-frame, and more at once than there are cores only adds
# memory, not speed. A burst of requests waits its turn instead.
TRANSCODING_SLOTS = max(2, os.cpu_count() or 2)
_TRANSCODING = threading.BoundedSemaphore(TRANSCODING_SLOTS)

# The JPEG 2000 encoder (pylibjpeg-openjpeg) corrupts memory, and so kills
# the process, when two threads encode at once: one encodes at a time. Its
# decoder, and the other codecs, take threads side by side.
_JPEG_2000_ENCODER = threading.Lock()
JPEG_2000_SYNTAXES = (JPEG2000Lossless, JPEG2000)

# Pixel-bearing elements (DICOM PS3.3 C.7.6.3, C.7.6.24); an object without
# one (SR, KOS, waveform) can change only between native encodings.
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Produced:
    """An instance ready to send: the file and its transfer syntax.

    ``path`` is the stored file itself when no re-encoding was needed, or
    the spool file written for this answer.
    """

    path: Path
    transfer_syntax_uid: str


def is_lossy(transfer_syntax_uid: str) -> bool:
    """Return whether a transfer syntax may discard pixel information."""
    return transfer_syntax_uid in LOSSY_METHOD


def is_lossless(transfer_syntax_uid: str) -> bool:
    """Return whether a transfer syntax always keeps every pixel value."""
    return transfer_syntax_uid in NATIVE or transfer_syntax_uid in LOSSLESS_ENCAPSULATED


def produce(
    source: Path,
    held_syntax: str,
    requested: Sequence[str],
    spool: Path,
) -> Produced | None:
    """Return the instance in the first requested syntax it can take.

    A syntax it is held in is sent as stored, byte for byte. Another one is
    written to a file under ``spool``: a native target by decoding the pixel
    data, a lossless one by encoding it without loss. A lossy encoding is
    made only when ``requested`` lists no lossless syntax (RAD TF-3
    4.69.4.2.3). Returns None when no listed syntax can be produced.
    ``spool`` is made when a first file is written into it.
    """
    # Limitation: Explicit VR Big Endian (retired, DICOM PS3.5 A.3) is sent
    # only as stored; JPEG Baseline, JPEG Extended and JPEG Lossless have no
    # encoder here, so an instance is sent in them only as stored.
    for target in _attempts(held_syntax, requested):
        if target == held_syntax:
            return Produced(source, held_syntax)
        destination = spool / f"{source.name}-{target}.dcm"
        # Made on first need: most answers go as stored and write nothing.
        spool.mkdir(mode=0o700, exist_ok=True)
        try:
            with _TRANSCODING, plugin_errors_muted():
                _write(source, target, destination)
        except Exception as exc:
            # Any decoder or encoder failure only rules this syntax out.
            logger.debug("%s cannot be produced in %s: %s", source.name, target, exc)
            destination.unlink(missing_ok=True)
            continue
        return Produced(destination, target)
    return None


def writes(held_syntax: str, requested: Sequence[str]) -> bool:
    """Whether :func:`produce` re-encodes an instance held in
    ``held_syntax`` for ``requested``, rather than sending it as stored or
    not at all."""
    first = next(_attempts(held_syntax, requested), None)
    return first is not None and first != held_syntax


def _attempts(held_syntax: str, requested: Sequence[str]) -> Iterator[str]:
    """The syntaxes :func:`produce` tries, in order: those it may encode
    into, and the held one, where it ends."""
    # The list is walked lazily: most instances go out in the first syntax
    # listed, as held, and a long list is then read no further.
    tried: set[str] = set()
    lossy_allowed: bool | None = None
    for listed in requested:
        target = listed.strip()
        if not target or target in tried:
            continue
        tried.add(target)
        if target == held_syntax:
            yield target
            return
        if lossy_allowed is None:
            lossy_allowed = not any(is_lossless(uid.strip()) for uid in requested)
        lossy_encodable = lossy_allowed and target in LOSSY_ENCODERS
        if target == ExplicitVRBigEndian or not (
            is_lossless(target) or lossy_encodable
        ):
            continue
        yield target


# Processes that re-encode instances (and render images, see
# xdsi.actors.dicomweb), one at a time each, as many as there are cores
# (TRANSCODING_SLOTS): the codecs hold the GIL, so that threads of one
# process take turns, and a codec that crashes (a SIGSEGV in a decoder given
# hostile pixel data) or hangs takes down or holds its process, not the
# node. Every re-encoding goes there, one instance alone included: the
# round trip costs a few milliseconds, the first start after an idle spell
# about a second (worker.IDLE_SECONDS).
TRANSCODERS = worker.Pool(TRANSCODING_SLOTS, "the transcoding processes")


def share_cores(processes: int) -> None:
    """Size TRANSCODERS for one of ``processes`` processes serving HTTP side
    by side (``[node] workers``), each with transcoding processes of its
    own: the cores are shared among them, one transcoding process each at
    least, rather than as many as there are cores in each (which multiplied
    the memory, some 150 MB a process, and not the speed). Called before
    the first request."""
    TRANSCODERS.size = max(1, -(-TRANSCODING_SLOTS // max(1, processes)))


# How long a transcoding process may take over one instance: a minute, plus
# a second a megabyte of its stored copy (the slowest encoder here, RLE,
# takes some 0.15 s a megabyte). One that takes longer is stuck (a decoder
# looping on a corrupt frame): the transcoding processes are killed, as if
# it had crashed, rather than holding the request, and its thread, for good.
ALLOWANCE = 60.0
ALLOWANCE_PER_MB = 1.0

Job = tuple[Path, str, Sequence[str]]
"""An instance to produce: its stored copy, the syntax it is held in and the
syntaxes requested, as :func:`produce` takes them."""


class Production:
    """What :func:`produce` gives for each of a request's instances (its
    ``jobs``), those to re-encode started at once in TRANSCODERS.

    Used as a context manager: on leaving, re-encodings not yet begun are
    cancelled and those under way awaited, so that nothing is written into
    ``spool`` after the caller is done with it.
    """

    def __init__(self, jobs: Sequence[Job], spool: Path) -> None:
        self._jobs = list(jobs)
        self._spool = spool
        self._futures: dict[int, Future[Produced | None]] = {}
        for n, (source, held, requested) in enumerate(self._jobs):
            if writes(held, requested):
                self._futures[n] = TRANSCODERS.submit(
                    produce, source, held, list(requested), spool
                )

    def __enter__(self) -> Production:
        return self

    def __exit__(self, *_: object) -> None:
        for future in self._futures.values():
            future.cancel()
        under_way = {n: f for n, f in self._futures.items() if not f.done()}
        if not under_way:
            return
        # Each within its allowance from when a process takes it up
        # (within): those queued behind other requests' work wait for it. A
        # future of processes killed already (a pool discarded) may never be
        # settled by the pool's manager thread; nothing of it can write into
        # the spool any more.
        for n, future in under_way.items():
            try:
                within(future, self._allowance(n))
            except TimeoutError:
                _stop_transcoders(_stuck(self._allowance(n)))
                return
            except Exception:
                # Its failure is for the caller, who has left.
                continue

    def result(self, index: int) -> Produced | None:
        """What :func:`produce` gives for job ``index``; raises what it
        raises (OSError: the stored copy cannot be read). An instance whose
        transcoding process died cannot be produced."""
        future = self._futures.get(index)
        if future is None:
            # Sent as held: nothing is decoded or written.
            return produce(*self._jobs[index], self._spool)
        produced, failure = _settled(future, self._allowance(index))
        if failure is None:
            return produced
        _stop_transcoders(
            failure,
            "; the instances it and its fellows were re-encoding are not sent "
            "in the syntaxes asked for",
        )
        return None

    def _allowance(self, index: int) -> float:
        """Seconds a transcoding process may take over job ``index``."""
        return allowance(self._jobs[index][0])


def allowance(source: Path) -> float:
    """Seconds a transcoding process may take over the stored copy
    ``source``: ALLOWANCE, and ALLOWANCE_PER_MB a megabyte of it."""
    try:
        size = source.stat().st_size
    except OSError:
        size = 0
    return ALLOWANCE + ALLOWANCE_PER_MB * size / 1e6


T = TypeVar("T")


class CodecFailure(RuntimeError):
    """A transcoding process died or was stopped over work given to it by
    :func:`isolated` (a codec crashed or hung on the pixel data)."""


def isolated(function: Callable[..., T], *args: Any, allowance: float, what: str) -> T:
    """``function(*args)`` run by a transcoding process, within
    ``allowance`` seconds from when one takes it up (:func:`within`).

    For pixel decoding outside :class:`Production` (an image rendered, a
    frame decoded): a codec crashing or hanging costs that process, not the
    node or the caller's thread. ``function`` is a module-level function,
    its arguments and result picklable; what it raises is raised here.

    Raises
    ------
    CodecFailure
        The process died, or was stopped past its allowance, over it (one
        WARNING names ``what``).
    """
    result, failure = _settled(TRANSCODERS.submit(function, *args), allowance)
    if failure is None:
        return result  # type: ignore[return-value]
    _stop_transcoders(failure, f" while {what}")
    raise CodecFailure(f"the transcoding process {failure}")


def _settled(future: Future[T], allowance: float) -> tuple[T | None, str | None]:
    """The result of ``future`` (:func:`within`) and None; or None and how
    its transcoding process failed: died (a crash; a job cancelled, not
    begun when its fellows were stopped, counts so) or stuck."""
    try:
        return within(future, allowance), None
    except (BrokenProcessPool, CancelledError):
        return None, "died (a codec crashed)"
    except TimeoutError:
        return None, _stuck(allowance)


def _stuck(allowance: float) -> str:
    return f"took over {allowance:.0f} s over one job (a codec stuck) and was stopped"


def _stop_transcoders(failure: str, consequence: str = "") -> None:
    """Kill TRANSCODERS after ``failure`` of one of them; one WARNING says
    so, for the first of the requests that saw it."""
    if TRANSCODERS.discard():
        logger.warning("a transcoding process %s%s", failure, consequence)


# How often a caller waiting for a re-encoding looks whether it has begun.
_LOOK_EVERY = 0.25


def within(future: Future[T], allowance: float) -> T:
    """The result of ``future`` once done; TimeoutError once it has run for
    more than ``allowance`` seconds.

    Its time counts from when a process of TRANSCODERS takes it up
    (:meth:`worker.Pool.begun`), not from when the caller begins to wait:
    the re-encodings of other requests queued before it are not its time,
    and counting them would take a busy pool for a stuck one and kill it
    under them all.
    """
    began = None
    while True:
        try:
            return future.result(timeout=_LOOK_EVERY)
        except TimeoutError:
            pass
        if began is None and TRANSCODERS.begun(future):
            began = time.monotonic()
        if began is not None and time.monotonic() - began > allowance:
            raise TimeoutError


def _write(source: Path, target: str, destination: Path) -> None:
    """Write ``source`` re-encoded in ``target`` to ``destination``."""
    ds = pydicom.dcmread(source)
    pixels = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    held = UID(ds.file_meta.TransferSyntaxUID)
    if pixels is None and target not in NATIVE:
        raise ValueError("an object without pixel data is sent in native syntaxes")
    if pixels == "PixelData" and held.is_compressed:
        decoded = _decoded_size(ds)
        if decoded > MAX_DECODED_BYTES:
            raise ValueError(
                f"the pixel data decodes to {decoded} bytes, more than "
                f"{MAX_DECODED_BYTES} to re-encode"
            )
        ds.decompress(generate_instance_uid=False)
    elif pixels == "PixelData" and (
        not held.is_little_endian or (target not in NATIVE and _by_plane(ds))
    ):
        _pixels_to_little_endian(ds)

    if target in NATIVE:
        ds.file_meta.TransferSyntaxUID = target
        ds.save_as(destination, enforce_file_format=True)
        return
    native_size = len(ds.PixelData)
    one_at_a_time = (
        _JPEG_2000_ENCODER if target in JPEG_2000_SYNTAXES else nullcontext()
    )
    with one_at_a_time:
        _compress(ds, target)
    if is_lossy(target):
        _label_lossy(ds, target, native_size / max(len(ds.PixelData), 1))
    ds.save_as(destination, enforce_file_format=True)


def _decoded_size(ds: Dataset) -> int:
    """The bytes the encapsulated Pixel Data of ``ds`` decodes to, as Rows,
    Columns, Samples per Pixel, Bits Allocated and Number of Frames say."""
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    return (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("SamplesPerPixel", 1))
        * -(-int(ds.BitsAllocated) // 8)
        * frames
    )


def _compress(ds: Dataset, target: str) -> None:
    """Encode the native Pixel Data of ``ds`` in ``target``, in place."""
    ds.compress(
        target,
        # GDCM's RLE encoder aborts the process on some images; pydicom's own
        # is used instead.
        encoding_plugin="pydicom" if target == RLELossless else "",
        generate_instance_uid=False,
        jls_error=JPEG_LS_NEAR if target == JPEGLSNearLossless else None,
        j2k_cr=[JPEG_2000_RATIO] if target == JPEG2000 else None,
    )


def _by_plane(ds: Dataset) -> bool:
    """Whether a native colour image is held colour by plane, Planar
    Configuration 1 (DICOM PS3.3 C.7.6.3.1.3).

    pydicom's RLE encoders read native colour cells as colour by pixel
    whatever Planar Configuration says, and so scrambled such an image: its
    cells are put by pixel before they are encoded.
    """
    return ds.get("SamplesPerPixel", 1) > 1 and ds.get("PlanarConfiguration") == 1


def _pixels_to_little_endian(ds: Dataset) -> None:
    """Re-encode native Pixel Data as little endian, colour by pixel (DICOM
    PS3.5 A.3: OW words of a big endian file are byte-swapped; DICOM PS3.3
    C.7.6.3.1.3: Planar Configuration 0)."""
    # Limitation: only Pixel Data is swapped; other OW, OF or OL values of a
    # big endian file (curves, LUT data) keep their big endian bytes.
    array = np.ascontiguousarray(ds.pixel_array)
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    if ds.get("SamplesPerPixel", 1) > 1:
        # pixel_array interleaves the samples of each pixel.
        ds.PlanarConfiguration = 0
    ds.set_original_encoding(False, True)


def _label_lossy(ds: Dataset, target: str, ratio: float) -> None:
    """Record a lossy encoding in Lossy Image Compression (0028,2110),
    Ratio (0028,2112) and Method (0028,2114), DICOM PS3.3 C.7.6.1.1.5."""
    ratios = _values(ds, "LossyImageCompressionRatio")
    methods = _values(ds, "LossyImageCompressionMethod")
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, round(ratio, 2)]
    ds.LossyImageCompressionMethod = [*methods, LOSSY_METHOD[target]]


def _values(ds: Dataset, keyword: str) -> list:
    """Return the values of a multi-valued element as a list (none: [])."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]

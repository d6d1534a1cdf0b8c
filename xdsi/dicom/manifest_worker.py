"""Build and encode manifests, those of large studies in a worker process.

Building a Key Object Selection Document (highdicom) and encoding it
(pydicom) is pure Python, about a millisecond per referenced instance. In the
node's own process the manifest of a 2000-instance study holds the GIL for
two seconds, and every other thread of the node waits behind it: those that
copy, hash and fsync the same study's instances while the manifest is built
(:meth:`xdsi.actors.imaging_source.ImagingSource.publish`), and those that
serve other peers. A study of at least :data:`WORKER_MIN_INSTANCES` instances
is therefore built in one worker process, started on first need and shared
by the whole Python process; smaller studies are built in the calling thread,
where a worker's start and round trip would cost more than they save.

A worker that cannot be started or dies mid-build is not an error: the
manifest is then built in the calling thread, and a new worker is started
for the next large study.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from xdsi.dicom import kos, mapping
from xdsi.dicom.scan import Study

logger = logging.getLogger(__name__)

# Studies with at least this many instances are built in the worker process.
WORKER_MIN_INSTANCES = 500

_lock = threading.Lock()
_worker: ProcessPoolExecutor | None = None


@dataclass(frozen=True)
class ManifestOptions:
    """What the Imaging Document Source puts into each manifest it builds;
    see :func:`xdsi.dicom.kos.build_manifest` and
    :func:`xdsi.dicom.mapping.manifest_facts`."""

    retrieve_ae_title: str
    retrieve_location_uid: str
    retrieve_url: str | None
    institution_name: str
    accession_assigning_authority: str


@dataclass(frozen=True)
class EncodedManifest:
    """A manifest encoded as a DICOM PS3.10 file, with its XDS metadata."""

    data: bytes
    facts: mapping.ManifestFacts


def encode(study: Study, options: ManifestOptions) -> EncodedManifest:
    """Build and encode the manifest of ``study`` in this process."""
    manifest = kos.build_manifest(
        study,
        retrieve_ae_title=options.retrieve_ae_title,
        retrieve_location_uid=options.retrieve_location_uid,
        retrieve_url=options.retrieve_url,
        institution_name=options.institution_name,
    )
    data = kos.manifest_bytes(manifest)
    facts = mapping.manifest_facts(
        study,
        manifest,
        accession_assigning_authority=options.accession_assigning_authority,
    )
    return EncodedManifest(data, facts)


def build(
    study: Study, options: ManifestOptions, *, in_worker: bool | None = None
) -> EncodedManifest:
    """Build and encode the manifest of ``study``, in the worker process
    when the study is large (or ``in_worker`` says so).

    Raises what :func:`encode` raises, from whichever process built it.
    """
    if in_worker is None:
        in_worker = len(study.instances) >= WORKER_MIN_INSTANCES
    if not in_worker:
        return encode(study, options)
    try:
        return _executor().submit(encode, study, options).result()
    except (BrokenProcessPool, OSError) as exc:
        logger.warning(
            "the manifest worker process failed (%s); building the manifest of "
            "study %s in the node's process",
            exc,
            study.study_instance_uid,
        )
        _discard()
        return encode(study, options)


def _executor() -> ProcessPoolExecutor:
    """The worker, started on first call."""
    global _worker
    with _lock:
        if _worker is None:
            # A fresh interpreter rather than a fork of this multi-threaded
            # process; it takes no SIGINT, so that Ctrl-C stops the node
            # without a traceback from the worker.
            _worker = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=signal.signal,
                initargs=(signal.SIGINT, signal.SIG_IGN),
            )
        return _worker


def _discard() -> None:
    """Drop a broken worker; the next large study starts another."""
    global _worker
    with _lock:
        broken, _worker = _worker, None
    if broken is not None:
        broken.shutdown(wait=False, cancel_futures=True)

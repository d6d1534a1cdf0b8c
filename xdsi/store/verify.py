"""Check every stored copy against the hash it was kept with.

The Document Repository keeps each document's SHA-1 (the DocumentEntry's
hash, ITI TF-3 4.2.3.2.11) and the Imaging Document Source each instance's
SHA-256, both computed as the bytes were stored. Serving checks the sizes
only (a hash of every instance sent would cost a read of the whole study
before its first byte), so a copy damaged in place, its size kept, goes out
as it is; reading the store through, as a scrub, finds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import Engine, select

from xdsi.store.blobs import Blobs
from xdsi.store.schema import imaging_instance, repository_document

logger = logging.getLogger(__name__)

READ_SIZE = 1 << 20
# The repository's state of a document that is retrievable.
STORED = "stored"


@dataclass(frozen=True)
class Damage:
    """A stored copy that is not what was stored: ``what`` is "document" or
    "instance", ``unique_id`` its uniqueId or SOP Instance UID."""

    what: str
    unique_id: str
    blob: str
    problem: str
    # The study of an instance, which `xdsi remove` takes; "" for a document.
    study_instance_uid: str = ""


@dataclass(frozen=True)
class Report:
    checked: int
    damaged: tuple[Damage, ...]


def verify_store(
    engine: Engine,
    repository_blobs: Blobs,
    imaging_blobs: Blobs,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Read every retrievable document and every instance held, and compare
    each with its recorded size and hash. ``progress`` is told of each copy
    read. Each damaged copy is logged at ERROR, by its id and blob only."""
    checked = 0
    damaged: list[Damage] = []
    for what, unique_id, study, blob, size, digest, algorithm, blobs in _copies(
        engine, repository_blobs, imaging_blobs
    ):
        problem = _problem(blobs, blob, size, digest, algorithm)
        checked += 1
        if progress is not None:
            progress(checked)
        if problem is not None:
            logger.error("stored %s %s (%s): %s", what, unique_id, blob, problem)
            damaged.append(Damage(what, unique_id, blob, problem, study))
    return Report(checked, tuple(damaged))


def count_copies(engine: Engine) -> int:
    """How many copies :func:`verify_store` reads."""
    with engine.connect() as conn:
        documents = conn.execute(
            select(repository_document.c.unique_id).where(
                repository_document.c.state == STORED
            )
        ).all()
        instances = conn.execute(select(imaging_instance.c.sop_instance_uid)).all()
    return len(documents) + len(instances)


def _copies(
    engine: Engine, repository_blobs: Blobs, imaging_blobs: Blobs
) -> Iterator[tuple[str, str, str, str, int, str, str, Blobs]]:
    """Each stored copy with what it was stored as, read from the database
    in one pass per table (the rows, not the blobs, are held in memory)."""
    documents = repository_document.c
    instances = imaging_instance.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(documents.unique_id, documents.blob, documents.size, documents.sha1)
            .where(documents.state == STORED)
            .order_by(documents.unique_id)
        ).all()
    for row in rows:
        yield (
            "document",
            row.unique_id,
            "",
            row.blob,
            row.size,
            row.sha1,
            "sha1",
            repository_blobs,
        )
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                instances.sop_instance_uid,
                instances.study_instance_uid,
                instances.blob,
                instances.size,
                instances.sha256,
            ).order_by(instances.sop_instance_uid)
        ).all()
    for row in rows:
        yield (
            "instance",
            row.sop_instance_uid,
            row.study_instance_uid,
            row.blob,
            row.size,
            row.sha256,
            "sha256",
            imaging_blobs,
        )


def _problem(
    blobs: Blobs, blob: str, size: int, digest: str, algorithm: str
) -> str | None:
    """What is wrong with a stored copy, or None when it is as stored."""
    hasher = hashlib.new(algorithm)
    read = 0
    try:
        with blobs.open(blob) as stream:
            while chunk := stream.read(READ_SIZE):
                hasher.update(chunk)
                read += len(chunk)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if read != size:
        return f"{read} bytes, stored as {size}"
    if hasher.hexdigest() != digest.lower():
        return f"{algorithm.upper()} differs from the one it was stored with"
    return None

"""Build and encode manifests, those of large studies in the worker process.

A Key Object Selection Document built by highdicom and encoded by pydicom
costs about a millisecond per referenced instance, all of it holding the
GIL; a large study's goes to the node's worker process (:mod:`xdsi.worker`),
so that the node's other threads go on meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsi import worker
from xdsi.dicom import kos, mapping
from xdsi.dicom.scan import Study


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


def encoded_manifest(
    study: Study, options: ManifestOptions, *, in_worker: bool | None = None
) -> EncodedManifest:
    """Build and encode the manifest of ``study``, in the worker process
    when the study is large (or ``in_worker`` says so).

    Raises what :func:`encode` raises, from whichever process built it.
    """
    if in_worker is None:
        in_worker = len(study.instances) >= worker.MIN_INSTANCES
    if not in_worker:
        return encode(study, options)
    return worker.run(len(study.instances), encode, study, options)

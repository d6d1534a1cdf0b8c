"""Imaging Document Consumer: find a patient's manifests (ITI-18), retrieve
them (ITI-43) and the images they reference (RAD-69).

ITI TF-2 3.18 and 3.43, RAD TF-3 4.69. A repositoryUniqueId is resolved to
an endpoint through the consumer's configuration; this node's own Document
Repository and Imaging Document Source are always known.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree
from pydicom.filereader import read_file_meta_info
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian

from xdsi import audit, logs, ns, tls, wire
from xdsi.actors.soap_endpoint import transaction
from xdsi.config import Settings
from xdsi.dicom import kos, scan
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.responses import (
    RegistryError,
    ResponseStatus,
    read_errors,
    read_status,
)

logger = logging.getLogger(__name__)

STUDY_INSTANCE_UID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"
# Under an output directory, where answers are spooled while they arrive.
PARTIAL_DIR = ".xdsi-partial"

# Instances asked for in one RAD-69 at most. The Imaging Document Source
# sends its answer once every instance is in a syntax asked for, and may
# have to re-encode each one (a compressed study asked for in Explicit VR
# Little Endian, the default here): at some 30 to 70 ms an instance a core,
# a study of thousands in one request would keep its first byte past the
# Consumer's timeout. Batches bound that wait, and cost a round trip each.
RAD69_BATCH = 500
# A uniqueId (an OID, with an ^extension at most: ITI TF-3 4.2.3.2.26) that
# can name a file in the output directory as it is; nothing that could
# climb out of it.
SAFE_FILE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z.^_-]{0,127}")
# ITI TF-3 4.2.3.2.11: the hash slot is the SHA-1 of the document, in hex.
SHA1_HEX = re.compile(r"[0-9a-f]{40}")


class ConsumerError(Exception):
    """A transaction failed; ``errors`` holds the responder's RegistryErrors."""

    def __init__(self, message: str, errors: list[RegistryError] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass(frozen=True)
class FoundEntry:
    """A DocumentEntry as ITI-18 returned it, reduced to what a user reads."""

    entry_uuid: str
    unique_id: str
    repository_unique_id: str
    # The RegistryObject's home attribute (homeCommunityId); None when the
    # registry names no community, as a registry outside XCA may.
    home_community_id: str | None
    mime_type: str
    title: str
    creation_time: str
    service_start_time: str
    modalities: tuple[str, ...]
    study_instance_uids: tuple[str, ...]
    size: int | None
    status: str
    # The document's SHA-1 as registered (ITI TF-3 4.2.3.2.11), lower-case
    # hex; None when the registry gave none that reads as one.
    hash: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in self.__dict__.items()
        }


@dataclass
class FetchResult:
    """What one fetch wrote, and what it could not get."""

    manifests: list[Path] = field(default_factory=list)
    instances: list[Path] = field(default_factory=list)
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    # Documents found as application/dicom that were not fetched: their
    # uniqueId and why.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Transactions that failed, what they were for and why; the fetch went
    # on with the others.
    failed: list[tuple[str, str]] = field(default_factory=list)


Progress = Callable[[str, int, int], None]


class Consumer:
    """Imaging Document Consumer: ITI-18, ITI-43 and RAD-69 clients."""

    def __init__(
        self, settings: Settings, auditor: audit.Auditor, spool_dir: Path | None = None
    ) -> None:
        self.settings = settings
        self.auditor = auditor
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        self.spool_dir.mkdir(parents=True, exist_ok=True)

    def endpoint_for(self, repository_unique_id: str) -> str:
        """Resolve a repositoryUniqueId to a Retrieve endpoint URL."""
        configured = self.settings.consumer.repositories.get(repository_unique_id)
        if configured:
            return configured
        if repository_unique_id == self.settings.repository.repository_unique_id:
            return self.settings.url("repository")
        if repository_unique_id == self.settings.imaging_source.repository_unique_id:
            return self.settings.url("imaging_source")
        raise ConsumerError(
            "no endpoint is configured for repositoryUniqueId "
            f"{logs.shown(repository_unique_id, 100)}"
            " (add it to [consumer] repositories, or give the configuration of the"
            " node that published it)"
        )

    def _client(self, url: str, spool_dir: Path) -> wire.SoapClient:
        """A client for one exchange with a peer, under the Consumer's
        timeout and wire.ANSWER_PACE."""
        return wire.SoapClient(
            url,
            timeout=self.settings.consumer.timeout,
            min_rate=wire.ANSWER_PACE,
            spool_dir=spool_dir,
            ssl_context=tls.client_context_for(self.settings),
        )

    def _audit(
        self, transaction_id: str, actor: str, url: str, ok: bool, **details: object
    ) -> None:
        self.auditor.record(
            audit.AuditEvent(
                transaction=transaction_id,
                actor=actor,
                outcome=audit.Outcome.SUCCESS if ok else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(ns.WSA_ANONYMOUS, self.settings.node.advertised),
                destination=audit.Endpoint(url, urlsplit(url).hostname or ""),
                **details,  # type: ignore[arg-type]
            )
        )

    # --- ITI-18 ---------------------------------------------------------

    def find(
        self, patient_id: str, *, statuses: tuple[str, ...] = (ebrim.STATUS_APPROVED,)
    ) -> list[FoundEntry]:
        """FindDocuments for one patient, LeafClass (ITI TF-2 3.18.4.1.2.3.7.1)."""
        url = self.settings.consumer_registry_url
        request = stored_query.build_query(
            "FindDocuments",
            {
                "$XDSDocumentEntryPatientId": patient_id,
                "$XDSDocumentEntryStatus": list(statuses),
            },
        )
        body = self.query(url, request, patient_id=patient_id)
        found = [
            _found_entry(o) for o in ebrim.read_registry_objects(body).document_entries
        ]
        logger.info(
            "%s %s to %s: %d DocumentEntries",
            "ITI-18",
            "Registry Stored Query",
            url,
            len(found),
        )
        return found

    def query(
        self, url: str, request: etree._Element, *, patient_id: str | None = None
    ) -> etree._Element:
        """Send an AdhocQueryRequest (ITI-18) to ``url``, audited; return the
        AdhocQueryResponse of a query that succeeded.

        Raises
        ------
        ConsumerError
            No answer, or the registry refused the query.
        """
        ok = False
        try:
            client = self._client(url, self.spool_dir)
            # An AdhocQueryResponse carries no document: its envelope
            # alone, as a root part at most.
            with client.call(
                transaction("ITI-18")["request_action"],
                request,
                max_parts=1,
                max_bytes=self.settings.consumer.max_answer_size,
            ) as reply:
                status = read_status(reply.body)
                errors = read_errors(reply.body)
                if status != ResponseStatus.SUCCESS.value:
                    raise ConsumerError(
                        "the Document Registry refused the query: " + _describe(errors),
                        errors,
                    )
                body = reply.body
            ok = True
        except ANSWER_ERRORS as exc:
            raise _call_failed("ITI-18", url, exc) from exc
        finally:
            self._audit(
                "ITI-18",
                "Document Consumer",
                url,
                ok,
                patient_id=patient_id,
                query_id=request.find(f"{{{ns.RIM}}}AdhocQuery").get("id"),
                query_request=etree.tostring(request),
            )
        return body

    # --- ITI-43 ---------------------------------------------------------

    def retrieve_document(
        self, entry: FoundEntry, target: Path, patient_id: str | None = None
    ) -> Path:
        """Retrieve one document into ``target`` (ITI TF-2 3.43).

        The answer is refused as it streams once it grows past [consumer]
        max_answer_size, or its document past the size the Document
        Registry gave (``entry.size``, ITI TF-3 4.2.3.2.19), when known. A
        document of another size or SHA-1 than registered (ITI TF-3
        4.2.3.2.11) is refused too: the repository's copy is not the one the
        Document Source submitted.
        """
        url = self.endpoint_for(entry.repository_unique_id)
        request = retrieve_request(
            entry.repository_unique_id, entry.unique_id, entry.home_community_id
        )
        ok = False
        spool = _partial_dir(target.parent)
        try:
            client = self._client(url, spool)
            # The envelope and the one document asked for (XOP 1.0 4.1).
            with client.call(
                transaction("ITI-43")["request_action"],
                request,
                max_parts=2,
                max_bytes=self.settings.consumer.max_answer_size,
                max_part_bytes=entry.size,
            ) as reply:
                got = _documents(reply)
                if entry.unique_id not in got:
                    raise ConsumerError(
                        f"the Document Repository did not return {entry.unique_id}: "
                        + _describe(read_errors(reply.body)),
                        read_errors(reply.body),
                    )
                document = got[entry.unique_id]
                if entry.size is not None and document.size > entry.size:
                    # Inline base64 content, decoded from the envelope
                    # rather than streamed as a part.
                    raise wire.AnswerTooLarge(entry.size, part=True)
                if unlike := _unlike_registered(entry, document):
                    raise ConsumerError(
                        f"the Document Repository returned {entry.unique_id}, but "
                        f"not as registered: {unlike}; it is not kept"
                    )
                document.path.replace(target)
            ok = True
        except ANSWER_ERRORS as exc:
            raise _call_failed("ITI-43", url, exc) from exc
        finally:
            _remove_if_empty(spool)
            self._audit(
                "ITI-43",
                "Document Consumer",
                url,
                ok,
                patient_id=patient_id,
                documents=(
                    audit.DocumentRef(entry.unique_id, entry.repository_unique_id),
                ),
            )
        return target

    # --- RAD-69 ---------------------------------------------------------

    def retrieve_images(
        self,
        manifest: kos.Manifest,
        out_dir: Path,
        result: FetchResult,
        patient_id: str,
        progress: Progress | None = None,
        done: int = 0,
        total: int = 0,
        *,
        keep_going: bool = False,
    ) -> int:
        """Retrieve every instance a manifest references, one RAD-69 per source.

        ``patient_id`` is the patient the manifest was found under, whom the
        audit record names (RAD TF-3 4.69.5).

        A RetrieveImagingDocumentSetRequest may name several studies and
        series (RAD TF-3 4.69.4.1.2), so the instances held at one Retrieve
        Location UID come RAD69_BATCH at most in one request and one MTOM
        answer, refused as it streams once it grows past [consumer]
        max_answer_size.
        Instances land as ``out_dir/StudyUID/SeriesUID/SOPUID.dcm``, in
        folders that are not symbolic links. A returned file whose own SOP
        Instance UID is not the one asked for, or that is no DICOM file,
        counts as not returned (``result.missing``) and is removed.

        A source that cannot be reached or refuses every instance raises
        ConsumerError; with ``keep_going`` it is noted in ``result.failed``
        instead, its instances in ``result.missing``, and the other sources
        are asked.
        """
        by_location: dict[str, dict[tuple[str, str], list[kos.ManifestReference]]]
        by_location = defaultdict(lambda: defaultdict(list))
        for ref in manifest.references:
            series = by_location[ref.retrieve_location_uid or ""]
            series[(ref.study_instance_uid, ref.series_instance_uid)].append(ref)

        for location, by_series in by_location.items():
            try:
                done = self._retrieve_from(
                    location,
                    by_series,
                    out_dir,
                    result,
                    progress,
                    done,
                    total,
                    patient_id,
                )
            except ConsumerError as exc:
                if not keep_going:
                    raise
                known = set(result.missing) | {p.stem for p in result.instances}
                asked = dict.fromkeys(
                    ref.sop_instance_uid for refs in by_series.values() for ref in refs
                )
                result.missing.extend(uid for uid in asked if uid not in known)
                result.failed.append(
                    (
                        f"images of manifest {manifest.sop_instance_uid}"
                        f" at {location or 'no Retrieve Location UID'}",
                        str(exc),
                    )
                )
        return done

    def _retrieve_from(
        self,
        location: str,
        by_series: dict[tuple[str, str], list[kos.ManifestReference]],
        out_dir: Path,
        result: FetchResult,
        progress: Progress | None,
        done: int,
        total: int,
        patient_id: str | None,
    ) -> int:
        """Ask ``location`` for the instances of ``by_series``, RAD69_BATCH
        at most a RAD-69, and file each instance it returns; each RAD-69 is
        audited on its own."""
        url = self.endpoint_for(location)
        # Said before the first request goes out: the instances could not
        # be filed.
        for study_uid, series_uid in by_series:
            _folder(out_dir, study_uid, series_uid, make=False)
        for batch in _batches(by_series, RAD69_BATCH):
            request = self._rad69_request(location, batch)
            studies = tuple(dict.fromkeys(study for study, _ in batch))
            ok = False
            spool = _partial_dir(out_dir)
            try:
                client = self._client(url, spool)
                # The Consumer keeps instances as sent; no hash is checked, so
                # none is computed. The answer has the envelope and a part per
                # instance asked for at most: a peer's parts beyond would each
                # be a spool file and memory, however many it sends.
                asked = sum(len(refs) for refs in batch.values())
                with client.call(
                    transaction("RAD-69")["request_action"],
                    request,
                    digest=False,
                    max_parts=1 + asked,
                    max_bytes=self.settings.consumer.max_answer_size,
                ) as reply:
                    got = _documents(reply)
                    # Taken before filing empties ``got``.
                    returned = bool(got)
                    errors = read_errors(reply.body)
                    # Returned files that are not the instance asked for.
                    wrong: list[str] = []
                    for (study_uid, series_uid), refs in batch.items():
                        folder = _folder(out_dir, study_uid, series_uid)
                        for ref in refs:
                            # Taken once: a SOP Instance UID the manifest
                            # lists twice has one file.
                            attachment = got.pop(ref.sop_instance_uid, None)
                            if attachment is None:
                                result.missing.append(ref.sop_instance_uid)
                                continue
                            unlike = _unlike(attachment, ref.sop_instance_uid)
                            if unlike is not None:
                                attachment.path.unlink()
                                wrong.append(unlike)
                                result.missing.append(ref.sop_instance_uid)
                                continue
                            target = folder / f"{ref.sop_instance_uid}.dcm"
                            attachment.path.replace(target)
                            result.instances.append(target)
                            result.bytes += attachment.size
                            done += 1
                            if progress:
                                progress("RAD-69", done, total)
                    if wrong:
                        logger.warning(
                            "%d instances from the Imaging Document Source at %s are "
                            "not the ones asked for and count as not returned; the "
                            "first: %s",
                            len(wrong),
                            url,
                            wrong[0],
                        )
                    if errors and not returned:
                        raise ConsumerError(
                            f"RAD-69 for {len(studies)} "
                            f"{'study' if len(studies) == 1 else 'studies'} failed: "
                            + _describe(errors),
                            errors,
                        )
                ok = True
            except ANSWER_ERRORS as exc:
                raise _call_failed("RAD-69", url, exc) from exc
            finally:
                _remove_if_empty(spool)
                self._audit(
                    "RAD-69",
                    "Imaging Document Consumer",
                    url,
                    ok,
                    patient_id=patient_id,
                    study_instance_uids=studies,
                )
        return done

    def _rad69_request(
        self,
        location: str,
        by_series: dict[tuple[str, str], list[kos.ManifestReference]],
    ) -> etree._Element:
        """Build a RetrieveImagingDocumentSetRequest (RAD TF-3 4.69.4.1.2)."""
        request = etree.Element(
            f"{{{ns.XDSIB}}}RetrieveImagingDocumentSetRequest",
            nsmap={"xdsi": ns.XDSIB, "xdsb": ns.XDSB},
        )
        studies: dict[str, etree._Element] = {}
        for (study_uid, series_uid), refs in by_series.items():
            if study_uid not in studies:
                studies[study_uid] = etree.SubElement(
                    request, f"{{{ns.XDSIB}}}StudyRequest", studyInstanceUID=study_uid
                )
            series = etree.SubElement(
                studies[study_uid],
                f"{{{ns.XDSIB}}}SeriesRequest",
                seriesInstanceUID=series_uid,
            )
            for ref in refs:
                item = etree.SubElement(series, f"{{{ns.XDSB}}}DocumentRequest")
                etree.SubElement(
                    item, f"{{{ns.XDSB}}}RepositoryUniqueId"
                ).text = location
                etree.SubElement(
                    item, f"{{{ns.XDSB}}}DocumentUniqueId"
                ).text = ref.sop_instance_uid
        syntaxes = etree.SubElement(request, f"{{{ns.XDSIB}}}TransferSyntaxUIDList")
        # Unless configured: every syntax pydicom knows, Explicit VR Little
        # Endian first.
        ordered = list(self.settings.consumer.transfer_syntaxes) or [
            ExplicitVRLittleEndian,
            *(uid for uid in AllTransferSyntaxes if uid != ExplicitVRLittleEndian),
        ]
        for uid in ordered:
            etree.SubElement(syntaxes, f"{{{ns.XDSIB}}}TransferSyntaxUID").text = uid
        return request

    # --- the whole pull ---------------------------------------------------

    def fetch(
        self, patient_id: str, out_dir: Path, progress: Progress | None = None
    ) -> FetchResult:
        """Find the patient's manifests, retrieve each and all its images."""
        result = FetchResult()
        entries = [
            e for e in self.find(patient_id) if e.mime_type == "application/dicom"
        ]
        manifests: list[kos.Manifest] = []
        if entries:
            _folder(out_dir, "manifests")
        for n, entry in enumerate(entries, start=1):
            if not SAFE_FILE_NAME.fullmatch(entry.unique_id):
                # The file is named after the uniqueId a registry sent: one
                # that could name a path elsewhere is not used. The entry may
                # well be a manifest: not retrieving it is a failure, not
                # "no manifest found".
                logger.warning(
                    "Document %s not retrieved: its uniqueId cannot name a file",
                    logs.quoted(entry.unique_id),
                )
                result.failed.append(
                    (
                        f"manifest {entry.unique_id}",
                        "not retrieved: its uniqueId cannot name a file",
                    )
                )
                continue
            target = out_dir / "manifests" / f"{entry.unique_id}.dcm"
            try:
                self.retrieve_document(entry, target, patient_id)
            except ConsumerError as exc:
                # One repository down or refusing leaves the patient's other
                # manifests to fetch.
                result.failed.append((f"manifest {entry.unique_id}", str(exc)))
                continue
            try:
                manifests.append(kos.parse_manifest(target))
            except kos.NotAManifest as exc:
                # Another DICOM object shared as a document (RAD TF-3
                # 4.68.4.1.2: a manifest is a KOS titled Manifest).
                target.unlink()
                self._skip(result, entry, exc.reason)
            else:
                result.manifests.append(target)
            if progress:
                progress("ITI-43", n, len(entries))
        # Made for the manifests; none came (every retrieve failed).
        _remove_if_empty(out_dir / "manifests")
        total = sum(len(m.references) for m in manifests)
        done = 0
        for manifest in manifests:
            done = self.retrieve_images(
                manifest,
                out_dir,
                result,
                patient_id,
                progress,
                done,
                total,
                keep_going=True,
            )
        return result

    def _skip(self, result: FetchResult, entry: FoundEntry, reason: str) -> None:
        logger.warning(
            "Document %s is not an imaging manifest this Consumer can use, skipped: %s",
            logs.quoted(entry.unique_id),
            logs.quoted(reason),
        )
        result.skipped.append((entry.unique_id, reason))


def retrieve_request(
    repository_unique_id: str, unique_id: str, home_community_id: str | None = None
) -> etree._Element:
    """A RetrieveDocumentSetRequest for one document (ITI TF-2 3.43.4.1.2)."""
    request = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    item = etree.SubElement(request, f"{{{ns.XDSB}}}DocumentRequest")
    if home_community_id:
        etree.SubElement(item, f"{{{ns.XDSB}}}HomeCommunityId").text = home_community_id
    etree.SubElement(
        item, f"{{{ns.XDSB}}}RepositoryUniqueId"
    ).text = repository_unique_id
    etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
    return request


def _partial_dir(out_dir: Path) -> Path:
    """The directory answers are spooled to while they arrive: inside the
    output directory, so that a finished file is renamed into place on the
    same file system and no partial one ever has a final name."""
    return _folder(out_dir, PARTIAL_DIR)


def _batches(
    by_series: dict[tuple[str, str], list[kos.ManifestReference]], size: int
) -> Iterator[dict[tuple[str, str], list[kos.ManifestReference]]]:
    """``by_series`` in pieces of ``size`` instances at most, in order; a
    series of more is split across pieces."""
    batch: dict[tuple[str, str], list[kos.ManifestReference]] = {}
    room = size
    for key, refs in by_series.items():
        start = 0
        while start < len(refs):
            taken = refs[start : start + room]
            batch.setdefault(key, []).extend(taken)
            start += len(taken)
            room -= len(taken)
            if room == 0:
                yield batch
                batch, room = {}, size
    if batch:
        yield batch


def _folder(out_dir: Path, *names: str, make: bool = True) -> Path:
    """The folder ``out_dir/names...``, each made if need be (with ``make``;
    otherwise those that exist are checked), none a symbolic link.

    A link planted under the output directory (``out/StudyUID`` pointing
    elsewhere) would have files written where it points; the output
    directory itself is the user's choice and may be one.

    Raises
    ------
    ConsumerError
        A folder on the way is a symbolic link, or no folder.
    """
    if make:
        out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir
    for name in names:
        folder = folder / name
        if make:
            try:
                folder.mkdir(exist_ok=True)
            except FileExistsError:
                # A link that leads nowhere, or a file: said below.
                pass
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            if make:
                raise
            return folder
        if not stat.S_ISDIR(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "no folder"
            raise ConsumerError(
                f"{folder} is {kind}: this Consumer writes only into folders of "
                f"its own under {out_dir}, never through a link out of it"
            )
    # Limitation: a folder swapped for a link between this check and the
    # files renamed into it (by someone who can write in the output
    # directory meanwhile) is followed.
    return folder


def _unlike(attachment: wire.Attachment, sop_instance_uid: str) -> str | None:
    """Why a returned file is not the instance ``sop_instance_uid`` asked
    for (RAD TF-3 4.69.4.2.3: each DocumentResponse carries the instance its
    DocumentUniqueId names), or None when it is.

    The file's identity is its File Meta Information's Media Storage SOP
    Instance UID, which names the SOP Instance of the data set that follows
    (DICOM PS3.10 7.1). A file that is no DICOM Part 10 file is not the
    instance either.
    """
    try:
        own = _media_storage_uid(attachment)
    except Exception:
        # Whatever a peer put in the file may break the read.
        return f"asked for {sop_instance_uid}, got a file that is no DICOM file"
    if own != sop_instance_uid:
        return (
            f"asked for {sop_instance_uid}, got SOP Instance UID "
            f"{logs.shown(own, 100) or 'none'}"
        )
    return None


# (0002,0003) Media Storage SOP Instance UID.
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003


def _media_storage_uid(attachment: wire.Attachment) -> str:
    """The Media Storage SOP Instance UID of a returned file.

    It is read from the part's first bytes, kept in memory as the answer
    streamed (the preamble, the prefix and the File Meta Information,
    always Explicit VR Little Endian: DICOM PS3.10 7.1), without opening
    the file again: a quarter of the time of pydicom's read_file_meta_info
    on the file. Where those bytes do not hold the whole element, the file
    is read.
    """
    head = attachment.head
    try:
        for element in scan.file_meta_elements(BytesIO(head)):
            if element.tag == MEDIA_STORAGE_SOP_INSTANCE_UID:
                if element.value_tell + element.length <= len(head):
                    return bytes(element.value or b"").decode("latin-1").rstrip("\0 ")
                break
    except Exception:
        # A head cut inside an element, or no DICOM file: the file says.
        pass
    meta = read_file_meta_info(attachment.path)
    return str(meta.get("MediaStorageSOPInstanceUID") or "")


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


# The failures of an exchange that _call_failed tells.
ANSWER_ERRORS = (
    wire.TransportError,
    wire.PeerFault,
    wire.SpoolError,
    wire.AnswerTooLarge,
)

# How many of a peer's RegistryErrors a ConsumerError quotes; the rest are
# counted (the exception keeps them all).
DESCRIBED_ERRORS = 3


def _call_failed(transaction_id: str, url: str, exc: Exception) -> ConsumerError:
    """What a failed exchange is told as: the answer not kept here (this
    side's disk, or an answer larger than this side takes), or the peer's
    failure, its text escaped and cut."""
    if isinstance(exc, wire.SpoolError):
        return ConsumerError(
            f"the {transaction_id} answer from {url} could not be kept here: {exc}"
        )
    if isinstance(exc, wire.AnswerTooLarge) and exc.part:
        return ConsumerError(
            f"this side refused the {transaction_id} answer from {url}: its "
            f"document is larger than the {exc.limit} bytes the Document "
            "Registry gives as its size (ITI TF-3 4.2.3.2.19); nothing of it "
            "is kept"
        )
    if isinstance(exc, wire.AnswerTooLarge):
        return ConsumerError(
            f"this side refused the {transaction_id} answer from {url}: it is "
            f"larger than {exc.limit} bytes, the most [consumer] "
            "max_answer_size takes; nothing of it is kept"
        )
    return ConsumerError(f"{transaction_id} to {url} failed: {logs.shown(str(exc))}")


def _describe(errors: list[RegistryError]) -> str:
    # A peer's codes and texts, escaped and cut (logs.shown).
    text = "; ".join(
        f"{logs.shown(e.code, 100)}: {logs.shown(e.message)}"
        for e in errors[:DESCRIBED_ERRORS]
    )
    if len(errors) > DESCRIBED_ERRORS:
        text += f"; and {len(errors) - DESCRIBED_ERRORS} more errors"
    return text or "no error given"


def _documents(reply: wire.SoapMessage) -> dict[str, wire.Attachment]:
    """Map each returned DocumentUniqueId to its spooled attachment.

    A document the answer does not carry readably is left out, and so
    counts as not returned: an xop:Include naming no MIME part (XOP 1.0
    4.1), inline content that is not base64, or a part another
    DocumentResponse claimed first (a part is one document; its file is
    moved into place once). One WARNING counts them, with the first reason.
    """
    got: dict[str, wire.Attachment] = {}
    claimed: set[Path] = set()
    left_out: list[str] = []
    for item in reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse"):
        unique_id = (item.findtext(f"{{{ns.XDSB}}}DocumentUniqueId") or "").strip()
        document = item.find(f"{{{ns.XDSB}}}Document")
        if document is None:
            continue
        try:
            attachment = wire.attachment_for(document, reply)
        except (wire.MissingAttachment, wire.MalformedMessage) as exc:
            left_out.append(str(exc))
            continue
        if attachment.path in claimed:
            left_out.append("its MIME part is another document's")
            continue
        claimed.add(attachment.path)
        got[unique_id] = attachment
    if left_out:
        logger.warning(
            "%d documents of the answer cannot be read and are left out; the first: %s",
            len(left_out),
            logs.quoted(left_out[0]),
        )
    return got


def _found_entry(obj: ebrim.RegistryObject) -> FoundEntry:
    reference_slot = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "referenceIdList")[
        "slot"
    ]
    studies = tuple(
        value.split("^", 1)[0]
        for value in obj.slots.get(reference_slot, [])
        if value.endswith(STUDY_INSTANCE_UID_TYPE)
    )
    size = obj.slot("size")
    sha1 = (obj.slot("hash") or "").strip().lower()
    return FoundEntry(
        entry_uuid=obj.id,
        unique_id=obj.unique_id or "",
        repository_unique_id=obj.slot("repositoryUniqueId") or "",
        home_community_id=obj.element.get("home") or None,
        mime_type=obj.mime_type,
        title=obj.name,
        creation_time=obj.slot("creationTime") or "",
        service_start_time=obj.slot("serviceStartTime") or "",
        modalities=tuple(c.code for c in obj.codes("eventCodeList")),
        study_instance_uids=studies,
        # isdigit() alone takes digits int() refuses, such as "²".
        size=int(size) if size and size.isascii() and size.isdigit() else None,
        status=obj.status.rsplit(":", 1)[-1],
        hash=sha1 if SHA1_HEX.fullmatch(sha1) else None,
    )


def _unlike_registered(entry: FoundEntry, document: wire.Attachment) -> str | None:
    """How a retrieved document differs from its DocumentEntry's size and
    hash (ITI TF-3 4.2.3.2.19, 4.2.3.2.11), or None when it does not."""
    if entry.size is not None and document.size != entry.size:
        return f"{document.size} bytes, {entry.size} registered"
    if entry.hash is not None and document.sha1 is not None:
        if document.sha1.lower() != entry.hash.lower():
            return f"SHA-1 {document.sha1.lower()}, {entry.hash} registered"
    return None

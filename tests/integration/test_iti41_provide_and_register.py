"""ITI-41 Provide and Register Document Set-b at the Document Repository:
all or nothing, also when submissions race (ITI TF-2 3.41.4.1.3)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from threading import Barrier

import pytest
import requests
from lxml import etree
from sqlalchemy import func, select

from tests.integration.conftest import PATIENT, RunningNode
from xdsi import ns, wire
from xdsi.actors.consumer import retrieve_request
from xdsi.config import ImagingSourceSettings
from xdsi.dicom.mapping import MANIFEST_FORMAT_CODE
from xdsi.metadata import ebrim
from xdsi.metadata.build import ManifestEntry, SubmissionSetSpec, manifest_submission
from xdsi.metadata.codes import Code
from xdsi.metadata.responses import read_errors, read_status
from xdsi.store.schema import registry_object, repository_document

PNR = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"
# Codes of the default affinity-domain code sets (ITI TF-3 4.2.3.1.7).
CODES = ImagingSourceSettings()


def pnr_request(
    document_unique_id: str,
    data: bytes,
    *,
    submission_set_uid: str,
    size: int | None = None,
) -> etree._Element:
    entry = ManifestEntry(
        entry_id="Document01",
        unique_id=document_unique_id,
        patient_id=PATIENT,
        source_patient_id="S1^^^&1.2.3&ISO",
        source_patient_info=(),
        title="t",
        creation_time="20240101120000",
        service_start_time=None,
        service_stop_time=None,
        event_codes=(),
        reference_ids=(),
        mime_type="application/dicom",
        format_code=MANIFEST_FORMAT_CODE,
        class_code=Code(*CODES.class_code),
        type_code=Code(*CODES.type_code),
        practice_setting_code=Code(*CODES.practice_setting_code),
        healthcare_facility_type_code=Code(*CODES.healthcare_facility_type_code),
        confidentiality_code=Code(*CODES.confidentiality_code),
        language_code="en-US",
        author_institution="xdsi",
        size=len(data) if size is None else size,
        sha1=hashlib.sha1(data).hexdigest(),
    )
    submission_set = SubmissionSetSpec(
        entry_id="SubmissionSet01",
        unique_id=submission_set_uid,
        source_id="1.2.3",
        patient_id=PATIENT,
        content_type_code=Code(*CODES.content_type_code),
        author_institution="xdsi",
        submission_time="20240101120000",
    )
    request = etree.Element(
        f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    request.append(manifest_submission(entry, submission_set))
    return request


def provide(url: str, request: etree._Element, data: bytes) -> etree._Element:
    content_id = wire.new_content_id()
    document = etree.SubElement(request, f"{{{ns.XDSB}}}Document", id="Document01")
    document.append(wire.xop_include(content_id))
    part = wire.OutgoingPart(content_id, "application/dicom", data=data)
    with wire.SoapClient(url).call(PNR, request, parts=[part]) as reply:
        return reply.body


def _counts(node: RunningNode) -> tuple[int, int]:
    with node.services.engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(registry_object)).scalar(),
            conn.execute(
                select(func.count()).select_from(repository_document)
            ).scalar(),
        )


def test_size_mismatch_leaves_nothing(running_node: RunningNode):
    """ITI TF-2 3.41.4.1.3: a wrong size is XDSRepositoryMetadataError."""
    running_node.feed()
    data = b"DICM" * 100
    request = pnr_request("1.2.3.4.5.1", data, submission_set_uid="1.2.3.4.6.1", size=7)
    reply = provide(running_node.settings.url("repository"), request, data)
    assert [e.code for e in read_errors(reply)] == ["XDSRepositoryMetadataError"]
    assert _counts(running_node) == (0, 0)


def test_two_documents_under_one_id_leave_nothing(running_node: RunningNode):
    """ITI TF-2 3.41.4.1.2: each DocumentEntry pairs with one Document; two
    Documents of one id (one MTOM, one inline) cannot both be it, so the
    submission fails as XDSRepositoryMetadataError and nothing is kept."""
    running_node.feed()
    data = b"DICM" * 100
    request = pnr_request("1.2.3.4.5.2", data, submission_set_uid="1.2.3.4.6.2")
    etree.SubElement(
        request, f"{{{ns.XDSB}}}Document", id="Document01"
    ).text = base64.b64encode(b"other bytes").decode()

    reply = provide(running_node.settings.url("repository"), request, data)

    assert [e.code for e in read_errors(reply)] == ["XDSRepositoryMetadataError"]
    assert "two Documents have id Document01" in read_errors(reply)[0].message
    assert _counts(running_node) == (0, 0)


def test_an_entry_and_its_document_pair_whatever_the_case_of_their_uuid(
    running_node: RunningNode,
):
    """RFC 4122 3: a DocumentEntry whose entryUUID is in upper case and the
    Document that names it in lower case are one pair; the document is
    stored and registered, and retrievable."""
    running_node.feed()
    data = b"DICM" * 100
    request = pnr_request("1.2.3.4.5.3", data, submission_set_uid="1.2.3.4.6.3")
    entry_uuid = str(uuid.uuid4())
    for element in request.iter():
        for name, value in element.attrib.items():
            if value == "Document01":
                element.set(name, f"urn:uuid:{entry_uuid.upper()}")
    content_id = wire.new_content_id()
    document = etree.SubElement(
        request, f"{{{ns.XDSB}}}Document", id=f"urn:uuid:{entry_uuid}"
    )
    document.append(wire.xop_include(content_id))
    part = wire.OutgoingPart(content_id, "application/dicom", data=data)
    url = running_node.settings.url("repository")
    with wire.SoapClient(url).call(PNR, request, parts=[part]) as reply:
        status = read_status(reply.body)

    assert status.endswith("Success"), read_errors(reply.body)
    assert _counts(running_node)[1] == 1


def test_racing_submissions_of_one_uniqueid_store_it_once(running_node: RunningNode):
    """ITI TF-3 Table 4.2.4.1-2: of eight concurrent submissions of one
    document uniqueId, the repository stores one copy. A submission that
    finds another still under way gets XDSDuplicateUniqueIdInRegistry and
    leaves nothing; one that comes after another has finished registers
    the same document again (same hash), which the registry accepts. So
    every Success, and only a Success, registered its SubmissionSet and
    DocumentEntry, however the threads were scheduled.
    """
    running_node.feed()
    data = b"the same document bytes" * 1000
    url = running_node.settings.url("repository")
    start = Barrier(8)

    def submit(n: int) -> etree._Element:
        request = pnr_request(
            "1.2.3.4.5.99", data, submission_set_uid=f"1.2.3.4.6.{n + 10}"
        )
        start.wait()
        return provide(url, request, data)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(submit, range(8)))
    succeeded = set()
    for n, reply in enumerate(replies):
        if read_status(reply).endswith("Success"):
            succeeded.add(f"1.2.3.4.6.{n + 10}")
        else:
            assert {e.code for e in read_errors(reply)} == {
                "XDSDuplicateUniqueIdInRegistry"
            }
    assert succeeded

    registry = registry_object.c
    with running_node.services.engine.connect() as conn:
        registered_sets = set(
            conn.execute(
                select(registry.unique_id).where(registry.kind == ebrim.SUBMISSION_SET)
            ).scalars()
        )
        entries = conn.execute(
            select(func.count()).where(
                registry.kind == ebrim.DOCUMENT_ENTRY,
                registry.unique_id == "1.2.3.4.5.99",
            )
        ).scalar()
        copies = conn.execute(
            select(repository_document.c.state).where(
                repository_document.c.unique_id == "1.2.3.4.5.99"
            )
        ).all()
    assert registered_sets == succeeded
    assert entries == len(succeeded)
    assert [row.state for row in copies] == ["stored"]

    retrieve = retrieve_request(
        running_node.settings.repository.repository_unique_id, "1.2.3.4.5.99"
    )
    with wire.SoapClient(url).call(RETRIEVE, retrieve) as reply:
        (document,) = reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse")
        attachment = wire.attachment_for(document.find(f"{{{ns.XDSB}}}Document"), reply)
        assert attachment.read_bytes() == data


@pytest.mark.parametrize("inline", ["!!!not base64***", "QUJD="])
def test_bad_inline_base64_is_a_sender_fault(running_node: RunningNode, inline: str):
    """A Document whose inline base64 is broken is the sender's fault, and
    nothing is stored."""
    running_node.feed()
    request = pnr_request("1.2.3.4.5.7", b"x", submission_set_uid="1.2.3.4.6.7")
    etree.SubElement(request, f"{{{ns.XDSB}}}Document", id="Document01").text = inline
    envelope = wire.build_envelope(request, PNR)
    answer = requests.post(
        running_node.settings.url("repository"),
        data=wire.serialize(envelope),
        headers={
            "Content-Type": f'application/soap+xml; charset=UTF-8; action="{PNR}"'
        },
        timeout=30,
    )
    assert answer.status_code == 400
    assert b"env:Sender" in answer.content
    assert _counts(running_node) == (0, 0)


def _pending_row(unique_id: str, blob: str, size: int):  # type: ignore[no-untyped-def]
    """The insert of a document left pending long ago by a submission."""
    return repository_document.insert().values(
        unique_id=unique_id,
        mime_type="application/dicom",
        size=size,
        sha1="0" * 40,
        state="pending",
        blob=blob,
        created_at=datetime(2020, 1, 1),
    )


def test_documents_left_pending_by_a_crash_are_swept(running_node: RunningNode):
    """DESIGN.md principle 6: a submission killed between storing and the
    registry's answer leaves nothing once the repository starts again."""
    repository = running_node.services.repository
    blob = repository.blobs.put_bytes("1.2.3.4.5.42\ncrashed", b"half a submission")
    with running_node.services.engine.begin() as conn:
        conn.execute(_pending_row("1.2.3.4.5.42", blob, size=17))

    assert repository.sweep_pending() == 1
    assert _counts(running_node) == (0, 0)
    assert not repository.blobs.path(blob).exists()


def test_sweep_keeps_a_pending_document_only_as_the_registry_holds_it(
    running_node: RunningNode,
):
    """ITI TF-2 3.18.4.1.2.3.7.5: the sweep asks the registry (GetDocuments)
    about documents left pending. One it holds for this repository with the
    same hash is confirmed and retrievable; one whose registry entry carries
    another hash is not the document registered, and goes."""
    running_node.feed()
    url = running_node.settings.url("repository")
    documents = {"1.2.3.4.5.61": b"registered, unheard" * 100}
    documents["1.2.3.4.5.62"] = b"registered with other bytes" * 100
    for n, (unique_id, data) in enumerate(documents.items()):
        request = pnr_request(unique_id, data, submission_set_uid=f"1.2.3.4.6.6{n}")
        assert read_status(provide(url, request, data)).endswith("Success")
    # As a node killed before it heard the registry would leave them; the
    # second row's bytes are not those the registry registered.
    with running_node.services.engine.begin() as conn:
        conn.execute(
            repository_document.update().values(
                state="pending", created_at=datetime(2020, 1, 1)
            )
        )
        conn.execute(
            repository_document.update()
            .where(repository_document.c.unique_id == "1.2.3.4.5.62")
            .values(sha1="0" * 40)
        )

    repository = running_node.services.repository
    assert repository.sweep_pending() == 2
    with running_node.services.engine.connect() as conn:
        rows = conn.execute(
            select(repository_document.c.unique_id, repository_document.c.state)
        ).all()
    assert [tuple(r) for r in rows] == [("1.2.3.4.5.61", "stored")]
    retrieve = retrieve_request(
        running_node.settings.repository.repository_unique_id, "1.2.3.4.5.61"
    )
    with wire.SoapClient(url).call(RETRIEVE, retrieve) as reply:
        (document,) = reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse")
        attachment = wire.attachment_for(document.find(f"{{{ns.XDSB}}}Document"), reply)
        assert attachment.read_bytes() == documents["1.2.3.4.5.61"]


def test_a_document_the_registry_cannot_be_asked_about_holds_up_no_other(
    running_node: RunningNode,
):
    """A pending document whose uniqueId is too long to quote in a
    rim:Value (ebRIM LongName, 256 characters) cannot be asked about: it
    stays pending, and the sweep still settles the others."""
    running_node.feed()
    url = running_node.settings.url("repository")
    data = b"registered, unheard" * 100
    request = pnr_request("1.2.3.4.5.71", data, submission_set_uid="1.2.3.4.6.71")
    assert read_status(provide(url, request, data)).endswith("Success")
    long_id = "1.2.3." + "9" * 250
    repository = running_node.services.repository
    blob = repository.blobs.put_bytes(f"{long_id}\nunheard", b"unheard")
    with running_node.services.engine.begin() as conn:
        conn.execute(
            repository_document.update().values(
                state="pending", created_at=datetime(2020, 1, 1)
            )
        )
        conn.execute(_pending_row(long_id, blob, size=7))

    assert repository.sweep_pending() == 1
    with running_node.services.engine.connect() as conn:
        states = dict(
            conn.execute(
                select(repository_document.c.unique_id, repository_document.c.state)
            ).all()
        )
    assert states == {"1.2.3.4.5.71": "stored", long_id: "pending"}


def test_a_removal_never_takes_a_document_confirmed_meanwhile(
    running_node: RunningNode,
):
    """A sweep that found a document pending, then asks to remove it after
    its submission confirmed it, removes nothing: removal claims only
    pending rows."""
    running_node.feed()
    url = running_node.settings.url("repository")
    data = b"confirmed while the sweep was asking" * 100
    request = pnr_request("1.2.3.4.5.72", data, submission_set_uid="1.2.3.4.6.72")
    assert read_status(provide(url, request, data)).endswith("Success")
    repository = running_node.services.repository
    held = repository.find("1.2.3.4.5.72")
    assert held is not None and held.state == "stored"

    repository._remove([replace(held, state="pending")])

    assert repository.find("1.2.3.4.5.72") == held
    assert repository.blobs.path(held.blob).read_bytes() == data


def test_a_fresh_pending_document_is_left_to_its_submission(running_node: RunningNode):
    """A pending document younger than the sweep's age may belong to a
    submission still under way in another worker; so too where PostgreSQL's
    session time zone is west of UTC, which shifts a naive time by hours."""
    engine = running_node.services.engine
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f'ALTER DATABASE "{engine.url.database}" '
                "SET timezone TO 'America/New_York'"
            )
        engine.dispose()
    repository = running_node.services.repository
    blob = repository.blobs.put_bytes("1.2.3.4.5.43\nunder way", b"in flight")
    with running_node.services.engine.begin() as conn:
        conn.execute(
            repository_document.insert().values(
                unique_id="1.2.3.4.5.43",
                mime_type="application/dicom",
                size=9,
                sha1="0" * 40,
                state="pending",
                blob=blob,
            )
        )
    assert repository.sweep_pending() == 0
    assert repository.blobs.path(blob).exists()


def test_retrieve_of_several_documents_from_several_repositories(
    running_node: RunningNode,
):
    """ITI TF-2 3.43.4.2.3: two held documents come back, one of another
    repository gets XDSUnknownRepositoryId and an unknown one
    XDSDocumentUniqueIdError, so the answer is PartialSuccess."""
    running_node.feed()
    url = running_node.settings.url("repository")
    ours = running_node.settings.repository.repository_unique_id
    held = {"1.2.3.4.5.201": b"first" * 100, "1.2.3.4.5.202": b"second" * 100}
    for n, (unique_id, data) in enumerate(held.items()):
        provide(
            url,
            pnr_request(unique_id, data, submission_set_uid=f"1.2.3.4.6.20{n}"),
            data,
        )

    retrieve = etree.Element(
        f"{{{ns.XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    for repository, unique_id in (
        (ours, "1.2.3.4.5.201"),
        ("1.2.3.999", "1.2.3"),
        (ours, "1.2.3.4.5.202"),
        (ours, "1.2.3.4.5.404"),
    ):
        item = etree.SubElement(retrieve, f"{{{ns.XDSB}}}DocumentRequest")
        etree.SubElement(item, f"{{{ns.XDSB}}}RepositoryUniqueId").text = repository
        etree.SubElement(item, f"{{{ns.XDSB}}}DocumentUniqueId").text = unique_id
    with wire.SoapClient(url).call(RETRIEVE, retrieve) as reply:
        assert read_status(reply.body).endswith("PartialSuccess")
        assert sorted(e.code for e in read_errors(reply.body)) == [
            "XDSDocumentUniqueIdError",
            "XDSUnknownRepositoryId",
        ]
        got = {}
        for document in reply.body.findall(f"{{{ns.XDSB}}}DocumentResponse"):
            unique_id = document.findtext(f"{{{ns.XDSB}}}DocumentUniqueId")
            got[unique_id] = wire.attachment_for(
                document.find(f"{{{ns.XDSB}}}Document"), reply
            ).read_bytes()
    assert got == held

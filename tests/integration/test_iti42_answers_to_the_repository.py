"""What the Document Repository makes of the registry's answer to its ITI-42
(ITI TF-2 3.42.4.2): only Success registers and only Failure or a Sender
Fault refuses; any other answer leaves the outcome unknown, and the
registry is asked (ITI-18 GetDocuments) before anything is kept or dropped.

A scripted relay stands between the repository and the node's own registry:
it may pass ITI-42 on or not, and answers it as each case says; ITI-18
passes straight through unless a case answers it too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import select
from werkzeug.wrappers import Response

from tests.integration.conftest import PATIENT
from tests.integration.registry_relay import Answer, ScriptedRelay
from xdsi import ns, wire
from xdsi.actors.consumer import retrieve_request
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.provide import SubmitError
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.errors import SEVERITY_WARNING
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.metadata.responses import RegistryError, ResponseStatus, registry_response
from xdsi.store.schema import repository_document

ITI_42_RESPONSE = "urn:ihe:iti:2007:RegisterDocumentSet-bResponse"
ITI_43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
# registry_timeout of a repository that must give up soon.
BRIEF = 1.0


def _soap(body: etree._Element, action: str = ITI_42_RESPONSE) -> Response:
    envelope = wire.build_envelope(body, action)
    content_type, _, chunks = wire.write_message(envelope, action, mtom=False)
    return Response(b"".join(chunks), content_type=content_type)


def _response(status: str, errors: tuple[RegistryError, ...] = ()) -> Answer:
    def answer() -> Response:
        element = registry_response(list(errors))
        element.set("status", status)
        return _soap(element)

    return answer


def _fault(fault: wire.SoapFault) -> Answer:
    def answer() -> Response:
        return Response(
            wire.fault_envelope(fault),
            status=500 if fault.code == "env:Receiver" else 400,
            content_type="application/soap+xml; charset=utf-8",
        )

    return answer


class _GatewayFault(wire.SoapFault):
    """A Fault with a code SOAP 1.2 does not define, as a gateway might send."""

    code = "s11:Server"


def _other_element() -> Response:
    return _soap(
        etree.Element(
            f"{{{ns.QUERY}}}AdhocQueryResponse", status=ResponseStatus.SUCCESS
        )
    )


def _object_refs_only() -> Response:
    """A GetDocuments answer that ignored the LeafClass asked for."""
    body = etree.Element(
        f"{{{ns.QUERY}}}AdhocQueryResponse",
        nsmap={"query": ns.QUERY, "rim": ns.RIM},
        status=ResponseStatus.SUCCESS,
    )
    objects = etree.SubElement(body, f"{{{ns.RIM}}}RegistryObjectList")
    etree.SubElement(objects, f"{{{ns.RIM}}}ObjectRef", id=f"urn:uuid:{'0' * 32}")
    return _soap(body, "urn:ihe:iti:2007:RegistryStoredQueryResponse")


@dataclass
class RelayedNode:
    node: Node
    settings: Settings
    relay: ScriptedRelay

    def rows(self) -> list[tuple[str, str]]:
        with self.node.services.engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    select(repository_document.c.unique_id, repository_document.c.state)
                )
            ]

    def retrieved(self, unique_id: str, spool: Path) -> bytes | None:
        """The document ITI-43 returns, None when it returns none."""
        request = retrieve_request(
            self.settings.repository.repository_unique_id, unique_id
        )
        spool.mkdir(parents=True, exist_ok=True)
        client = wire.SoapClient(self.settings.url("repository"), spool_dir=spool)
        with client.call(ITI_43, request) as reply:
            document = reply.body.find(
                f"{{{ns.XDSB}}}DocumentResponse/{{{ns.XDSB}}}Document"
            )
            if document is None:
                return None
            return wire.attachment_for(document, reply).read_bytes()


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[RelayedNode]:
    yield from _relayed(tmp_path)


@pytest.fixture
def relayed_briefly(tmp_path: Path) -> Iterator[RelayedNode]:
    """A relayed node whose repository waits a second for ITI-42's answer."""
    yield from _relayed(tmp_path, registry_timeout=BRIEF)


def _relayed(tmp_path: Path, **repository: object) -> Iterator[RelayedNode]:
    relay = ScriptedRelay()
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        repository=replace(settings.repository, registry_url=relay.url, **repository),
    )
    node = Node(settings)
    effective = node.start()
    relay.target = effective.url("registry")
    send_message(effective.node.host, effective.registry.feed_port, build_feed(PATIENT))
    try:
        yield RelayedNode(node, effective, relay)
    finally:
        node.stop()
        relay.close()


def _submit(node: RelayedNode, tmp_path: Path) -> tuple[Path, str | None, list]:
    """Submit one document; return it, its uniqueId when it succeeded, and
    the errors when it did not."""
    document = tmp_path / "report.txt"
    document.write_bytes(b"a report\n" * 500)
    source = DocumentSource(node.settings, tmp_path / "source-spool")
    try:
        (unique_id,) = source.submit([document], PATIENT).document_unique_ids
    except SubmitError as exc:
        return document, None, exc.errors
    return document, unique_id, []


@pytest.mark.parametrize(
    "answer",
    [
        _response(ResponseStatus.PARTIAL_SUCCESS),
        _response("Success"),
        _fault(wire.ReceiverFault("the registry failed after its commit")),
        _fault(_GatewayFault("gateway timeout")),
        _other_element,
    ],
    ids=[
        "partial-success",
        "status-not-a-urn",
        "receiver-fault",
        "fault-of-another-code",
        "other-element",
    ],
)
def test_an_answer_that_does_not_say_is_checked_with_the_registry(
    relayed: RelayedNode, tmp_path: Path, answer: Answer
) -> None:
    """The registry registered the submission, but answered neither Success
    nor Failure: asked, it holds the document, so the submission succeeds
    and the document is retrievable."""
    relayed.relay.iti42 = answer
    document, unique_id, errors = _submit(relayed, tmp_path)
    assert errors == [] and unique_id is not None
    assert relayed.rows() == [(unique_id, "stored")]
    assert relayed.retrieved(unique_id, tmp_path / "got") == document.read_bytes()


@pytest.mark.parametrize(
    "answer",
    [_response(ResponseStatus.PARTIAL_SUCCESS), _other_element],
    ids=["partial-success", "other-element"],
)
def test_an_answer_that_does_not_say_keeps_an_unregistered_document_pending(
    relayed: RelayedNode, tmp_path: Path, answer: Answer
) -> None:
    """The registry never got the submission and answered neither Success
    nor Failure: the document stays pending, not retrievable, the answer is
    XDSRegistryNotAvailable, and the sweep removes it."""
    relayed.relay.passes_iti42 = False
    relayed.relay.iti42 = answer
    _, unique_id, errors = _submit(relayed, tmp_path)
    assert unique_id is None
    assert [e.code for e in errors] == ["XDSRegistryNotAvailable"]
    # The registry's address stays the repository's own business.
    assert relayed.relay.url not in errors[0].message
    ((held, state),) = relayed.rows()
    assert state == "pending"
    assert relayed.retrieved(held, tmp_path / "got") is None

    assert relayed.node.services.repository.sweep_pending(timedelta(0)) == 1
    assert relayed.rows() == []


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (
            _response(
                ResponseStatus.FAILURE,
                (
                    RegistryError(
                        "XDSRegistryMetadataError", "x", severity=SEVERITY_WARNING
                    ),
                ),
            ),
            "XDSRegistryError",
        ),
        (_fault(wire.MalformedMessage("not for me")), "XDSRegistryNotAvailable"),
    ],
    ids=["failure-with-warnings-only", "sender-fault"],
)
def test_a_refusal_leaves_nothing(
    relayed: RelayedNode, tmp_path: Path, answer: Answer, code: str
) -> None:
    """Failure, whatever the severity of its RegistryErrors, and a Sender
    Fault are refusals: the repository keeps nothing."""
    relayed.relay.passes_iti42 = False
    relayed.relay.iti42 = answer
    _, unique_id, errors = _submit(relayed, tmp_path)
    assert unique_id is None
    assert code in [e.code for e in errors]
    assert relayed.rows() == []


def test_a_registry_response_sent_with_an_error_status_is_read(
    relayed: RelayedNode, tmp_path: Path
) -> None:
    """A RegistryResponse of status Failure sent with HTTP 500 (SOAP 1.2
    Part 2 7.5.1.2 wants 200) is still the registry's refusal: its own
    error code reaches the Source, and nothing is kept."""
    relayed.relay.passes_iti42 = False
    refusal = _response(
        ResponseStatus.FAILURE,
        (RegistryError("XDSPatientIdDoesNotMatch", "not this patient"),),
    )

    def with_500() -> Response:
        answer = refusal()
        answer.status_code = 500
        return answer

    relayed.relay.iti42 = with_500
    _, unique_id, errors = _submit(relayed, tmp_path)
    assert unique_id is None
    assert [e.code for e in errors] == ["XDSPatientIdDoesNotMatch"]
    assert relayed.rows() == []


def test_a_getdocuments_answer_without_leafclass_settles_nothing(
    relayed: RelayedNode, tmp_path: Path
) -> None:
    """A registry that answers GetDocuments with ObjectRefs only, though
    LeafClass was asked, has not said it lacks the document: the pending
    document is neither confirmed nor removed."""
    relayed.relay.passes_iti42 = False
    relayed.relay.iti42 = _other_element
    relayed.relay.iti18 = _object_refs_only
    _, unique_id, _ = _submit(relayed, tmp_path)
    assert unique_id is None
    assert relayed.node.services.repository.sweep_pending(timedelta(0)) == 0
    ((_, state),) = relayed.rows()
    assert state == "pending"


def _trickled(answer: Answer, sent: list[int]) -> Answer:
    """``answer``, sent a byte every 50 ms (about half a minute in all);
    ``sent`` counts the bytes that went out."""

    def respond() -> Response:
        whole = answer().get_data()

        def bytes_slowly() -> Iterator[bytes]:
            for offset in range(len(whole)):
                sent.append(offset)
                yield whole[offset : offset + 1]
                time.sleep(0.05)

        return Response(
            bytes_slowly(),
            content_type=answer().content_type,
            headers={"Content-Length": str(len(whole))},
        )

    return respond


def test_an_answer_trickling_in_past_registry_timeout_is_not_waited_for(
    relayed_briefly: RelayedNode, tmp_path: Path
) -> None:
    """[repository] registry_timeout bounds the whole answer, not each read:
    a registry that sends a byte at a time is given up at the timeout, as
    one that sends nothing is. The outcome is unknown, so the registry is
    asked; it never got the submission, so the document stays pending and
    the Source hears XDSRegistryNotAvailable (ITI TF-2 3.42.4.2)."""
    sent: list[int] = []
    relayed_briefly.relay.passes_iti42 = False
    relayed_briefly.relay.iti42 = _trickled(_response(ResponseStatus.SUCCESS), sent)

    _, unique_id, errors = _submit(relayed_briefly, tmp_path)

    assert unique_id is None
    assert [e.code for e in errors] == ["XDSRegistryNotAvailable"]
    assert len(sent) < len(_response(ResponseStatus.SUCCESS)().get_data()) // 2
    ((_, state),) = relayed_briefly.rows()
    assert state == "pending"


def _with_parts(answer: Answer, count: int) -> Answer:
    """``answer``'s envelope in an MTOM package with ``count`` empty parts
    beside it."""

    def respond() -> Response:
        envelope = wire.parse_xml(answer().get_data())
        flood = [
            wire.OutgoingPart(f"flood{n}@peer", "application/octet-stream", data=b"")
            for n in range(count)
        ]
        content_type, _, chunks = wire.write_message(envelope, ITI_42_RESPONSE, flood)
        return Response(b"".join(chunks), content_type=content_type)

    return respond


def test_an_answer_of_more_parts_than_a_registry_response_is_not_heard(
    relayed: RelayedNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.42.4.2: the answer is a RegistryResponse, and no part
    beside it. A Success in an MTOM package with thousands of parts more
    (each a spool file) is refused at the first part too many and so tells
    nothing: the registry is asked, and as it never got the submission the
    document stays pending and the Source hears XDSRegistryNotAvailable."""
    relayed.relay.passes_iti42 = False
    relayed.relay.iti42 = _with_parts(_response(ResponseStatus.SUCCESS), 5_000)

    _, unique_id, errors = _submit(relayed, tmp_path)

    assert unique_id is None
    assert [e.code for e in errors] == ["XDSRegistryNotAvailable"]
    ((_, state),) = relayed.rows()
    assert state == "pending"

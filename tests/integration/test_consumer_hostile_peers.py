"""The Imaging Document Consumer against registries, repositories and
Imaging Document Sources it does not control: a peer on 127.0.0.1 that
answers with crafted SOAP and MTOM bytes. Whatever it sends, the Consumer
ends with a ConsumerError or a result, writes nothing under a final name
that it did not get whole, and holds no more of the answer than it asked
for."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.conftest import dicom_path
from xdsi.actors.consumer import (
    PARTIAL_DIR,
    Consumer,
    ConsumerError,
    FetchResult,
    FoundEntry,
)
from xdsi.app import node_auditor
from xdsi.cli import EXIT_NOT_FOUND
from xdsi.config import MIN_REQUEST_SIZE, Settings
from xdsi.dicom import kos

REPOSITORY = "1.2.3.4.5.6"
STUDY = "1.2.3.10"
SERIES = "1.2.3.10.1"
RETRIEVE_RESPONSE = b"urn:ihe:iti:2007:RetrieveDocumentSetResponse"
XOP = b"http://www.w3.org/2004/08/xop/include"
BOUNDARY = "hostile"

# What the peer answers a request body with: status, Content-Type, body.
Answer = Callable[[bytes], tuple[int, str, bytes]]


class HostilePeer:
    """An HTTP peer on 127.0.0.1 answering every POST with ``answer``, or
    serving the WSGI ``app`` given."""

    def __init__(self, answer: Answer, app: Callable | None = None) -> None:
        self.answer = answer
        self._server = make_server("127.0.0.1", 0, app or self._app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/peer"

    def _app(self, environ: dict, start_response: Callable) -> object:
        status, content_type, body = self.answer(Request(environ).get_data())
        return Response(body, status=status, content_type=content_type)(
            environ, start_response
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def peer() -> Iterator[Callable[[Answer], HostilePeer]]:
    started: list[HostilePeer] = []

    def start(answer: Answer) -> HostilePeer:
        started.append(HostilePeer(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def wsgi_peer() -> Iterator[Callable[[Callable], HostilePeer]]:
    """Start a peer on 127.0.0.1 serving a WSGI app of its own."""
    started: list[HostilePeer] = []

    def start(app: Callable) -> HostilePeer:
        started.append(HostilePeer(lambda _: (500, "text/plain", b""), app))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _consumer(tmp_path: Path, url: str, **consumer_settings: object) -> Consumer:
    settings = Settings()
    settings = replace(
        settings,
        node=replace(settings.node, storage_dir=str(tmp_path / "node")),
        consumer=replace(
            settings.consumer,
            registry_url=url,
            repositories={REPOSITORY: url},
            timeout=10.0,
            **consumer_settings,
        ),
    )
    return Consumer(settings, node_auditor(settings), tmp_path / "spool")


def _instance(sop_instance_uid: bytes | str) -> bytes:
    """A real DICOM file (a CT slice) made the instance
    ``sop_instance_uid``, as an Imaging Document Source returns it."""
    uid = (
        sop_instance_uid.decode("latin-1")
        if isinstance(sop_instance_uid, bytes)
        else sop_instance_uid
    )
    # Read here, in the test or its peer's thread alike: one of the studies
    # xdsi ships, so that no peer thread needs the shared data set.
    ds = pydicom.dcmread(dicom_path("study-ct", "S1000", "I0010.dcm"))
    with warnings.catch_warnings():
        # pydicom warns of a UID that is not valid; a forged one is the point.
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _manifest(*sop_instance_uids: str) -> kos.Manifest:
    return kos.Manifest(
        sop_instance_uid="1.2.3.99",
        study_instance_uids=(STUDY,),
        references=tuple(
            kos.ManifestReference(
                STUDY, SERIES, "1.2.840.10008.5.1.4.1.1.2", uid, "X", REPOSITORY
            )
            for uid in sop_instance_uids
        ),
    )


def _requested(body: bytes) -> list[bytes]:
    return re.findall(rb"<xdsb:DocumentUniqueId>([^<]+)<", body)


def _envelope(action: bytes, payload: bytes) -> bytes:
    return (
        b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope" '
        b'xmlns:wsa="http://www.w3.org/2005/08/addressing"><env:Header>'
        b"<wsa:Action>"
        + action
        + b"</wsa:Action></env:Header><env:Body>"
        + payload
        + b"</env:Body></env:Envelope>"
    )


def _document_response(unique_id: bytes, document: bytes) -> bytes:
    return (
        b"<xdsb:DocumentResponse><xdsb:RepositoryUniqueId>"
        + REPOSITORY.encode()
        + b"</xdsb:RepositoryUniqueId><xdsb:DocumentUniqueId>"
        + unique_id
        + b"</xdsb:DocumentUniqueId><xdsb:mimeType>application/dicom"
        b"</xdsb:mimeType><xdsb:Document>" + document + b"</xdsb:Document>"
        b"</xdsb:DocumentResponse>"
    )


def _include(content_id: bytes) -> bytes:
    return b'<xop:Include xmlns:xop="' + XOP + b'" href="cid:' + content_id + b'"/>'


def _mtom(
    responses: list[bytes], parts: list[tuple[bytes, bytes]]
) -> tuple[str, bytes]:
    """A RetrieveDocumentSetResponse in an MTOM package, as given."""
    root = _envelope(
        RETRIEVE_RESPONSE,
        b'<xdsb:RetrieveDocumentSetResponse xmlns:xdsb="urn:ihe:iti:xds-b:2007" '
        b'xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"><rs:RegistryResponse '
        b'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"/>'
        + b"".join(responses)
        + b"</xdsb:RetrieveDocumentSetResponse>",
    )
    delimiter = b"--" + BOUNDARY.encode()
    body = [
        delimiter + b"\r\nContent-Type: application/xop+xml; "
        b'type="application/soap+xml"\r\nContent-ID: <root@peer>\r\n\r\n' + root
    ]
    for content_id, data in parts:
        body.append(
            b"\r\n" + delimiter + b"\r\nContent-Type: application/dicom\r\n"
            b"Content-ID: <" + content_id + b">\r\n\r\n" + data
        )
    body.append(b"\r\n" + delimiter + b"--\r\n")
    content_type = (
        f'multipart/related; type="application/xop+xml"; boundary="{BOUNDARY}"; '
        'start="<root@peer>"; start-info="application/soap+xml"'
    )
    return content_type, b"".join(body)


def _consumer_config(tmp_path: Path, registry_url: str) -> Path:
    """A configuration whose Consumer asks ``registry_url``."""
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f'[consumer]\nregistry_url = "{registry_url}"\n'
    )
    return config


def test_documents_an_answer_cannot_carry_count_as_not_returned(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """XOP 1.0 4.1: an xop:Include names a part of the package. One that
    names none, and inline content that is not base64, leave their
    document out of the result instead of ending the fetch with a
    traceback; the readable one is filed."""

    def answer(body: bytes) -> tuple[int, str, bytes]:
        good, missing, garbled = _requested(body)
        content_type, package = _mtom(
            [
                _document_response(good, _include(b"good@peer")),
                _document_response(missing, _include(b"nowhere@peer")),
                _document_response(garbled, b"!!!!"),
            ],
            [(b"good@peer", _instance(good))],
        )
        return 200, content_type, package

    consumer = _consumer(tmp_path, peer(answer).url)
    result = FetchResult()
    out = tmp_path / "out"

    consumer.retrieve_images(
        _manifest("1.2.3.10.1.1", "1.2.3.10.1.2", "1.2.3.10.1.3"), out, result, "P"
    )

    assert [p.name for p in result.instances] == ["1.2.3.10.1.1.dcm"]
    assert result.missing == ["1.2.3.10.1.2", "1.2.3.10.1.3"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["1.2.3.10.1.1.dcm"]


def test_one_part_claimed_by_two_documents_is_filed_once(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """A part is one document: a second DocumentResponse whose xop:Include
    names the part of the first, or a SOP Instance UID the manifest lists
    twice, is not returned, rather than failing on the file already moved."""

    def answer(body: bytes) -> tuple[int, str, bytes]:
        requested = _requested(body)
        content_type, package = _mtom(
            [_document_response(uid, _include(b"one@peer")) for uid in requested],
            [(b"one@peer", _instance(requested[0]))],
        )
        return 200, content_type, package

    consumer = _consumer(tmp_path, peer(answer).url)
    result = FetchResult()
    out = tmp_path / "out"

    consumer.retrieve_images(
        _manifest("1.2.3.10.1.1", "1.2.3.10.1.2", "1.2.3.10.1.1"), out, result, "P"
    )

    assert [p.name for p in result.instances] == ["1.2.3.10.1.1.dcm"]
    assert result.missing == ["1.2.3.10.1.2", "1.2.3.10.1.1"]
    assert len([p for p in out.rglob("*") if p.is_file()]) == 1


STORED_QUERY_RESPONSE = b"urn:ihe:iti:2007:RegistryStoredQueryResponse"
UNIQUE_ID_SCHEME = b"urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
# CSI and OSC as C1 controls (XML 1.0 forbids ESC, not these), a
# right-to-left override, a carriage return and a line break (as character
# references: XML turns a raw CR into LF).
STEERING = "\x9b2J\x9d0;owned\x9c\u202eevil\u202c&#13;error: forged&#10;".encode()
# How logs.shown writes them.
STEERING_SHOWN = "\\x9b2J\\x9d0;owned\\x9c\\u202eevil\\u202c\\rerror: forged\\n"

# A FindDocuments refused for a patient the registry does not know (ITI TF-3
# Table 4.2.4.1-2).
UNKNOWN_PATIENT = _envelope(
    STORED_QUERY_RESPONSE,
    b'<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:'
    b'xsd:query:3.0" xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" '
    b'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure">'
    b"<rs:RegistryErrorList><rs:RegistryError "
    b'errorCode="XDSUnknownPatientId" codeContext="no such patient" '
    b'severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"/>'
    b"</rs:RegistryErrorList></query:AdhocQueryResponse>",
)


def _query_response(title: bytes, size: bytes) -> bytes:
    """An AdhocQueryResponse with one DocumentEntry of ``title`` and ``size``."""
    slot = b'<rim:Slot name="%s"><rim:ValueList><rim:Value>%s</rim:Value>'
    slot += b"</rim:ValueList></rim:Slot>"
    entry = (
        b'<rim:ExtrinsicObject id="urn:uuid:1" mimeType="application/dicom" '
        b'status="urn:oasis:names:tc:ebxml-regrep:StatusType:Approved">'
        + slot % (b"size", size)
        + slot % (b"repositoryUniqueId", REPOSITORY.encode())
        + b'<rim:Name><rim:LocalizedString value="'
        + title
        + b'"/></rim:Name><rim:ExternalIdentifier identificationScheme="'
        + UNIQUE_ID_SCHEME
        + b'" value="1.2.3.77"/></rim:ExtrinsicObject>'
    )
    return _envelope(
        STORED_QUERY_RESPONSE,
        b'<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:'
        b'xsd:query:3.0" xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0" '
        b'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success">'
        b"<rim:RegistryObjectList>" + entry + b"</rim:RegistryObjectList>"
        b"</query:AdhocQueryResponse>",
    )


def test_a_size_of_digits_int_refuses_is_no_size(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """ITI TF-3 4.2.3.2.19: size is an integer. "²" passes str.isdigit()
    but not int(); the entry is found with no size, not a traceback."""
    url = peer(
        lambda _: (200, "application/soap+xml", _query_response(b"T", "²".encode()))
    ).url

    (entry,) = _consumer(tmp_path, url).find("P^^^&1.2.3&ISO")

    assert entry.unique_id == "1.2.3.77" and entry.size is None


def test_a_peer_text_reaches_the_user_escaped_and_cut(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """A SOAP Fault's Reason and a RegistryError's codeContext are a peer's
    words: in the error a user reads, its line breaks and terminal controls
    are escaped and a megabyte of text is cut."""
    fault = _envelope(
        b"http://www.w3.org/2005/08/addressing/soap/fault",
        b"<env:Fault><env:Code><env:Value>env:Receiver</env:Value></env:Code>"
        b'<env:Reason><env:Text xml:lang="en">'
        + STEERING
        + b"A" * 1_000_000
        + b"</env:Text></env:Reason></env:Fault>",
    )
    refusal = _envelope(
        STORED_QUERY_RESPONSE,
        b'<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:'
        b'xsd:query:3.0" xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" '
        b'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure">'
        b'<rs:RegistryErrorList><rs:RegistryError errorCode="X'
        + STEERING
        + b'" codeContext="'
        + STEERING
        + b"B" * 1_000_000
        + b'"/></rs:RegistryErrorList></query:AdhocQueryResponse>',
    )
    for status, answer in ((500, fault), (200, refusal)):
        url = peer(lambda _, s=status, a=answer: (s, "application/soap+xml", a)).url

        with pytest.raises(ConsumerError) as failed:
            _consumer(tmp_path, url).find("P^^^&1.2.3&ISO")

        message = str(failed.value)
        assert len(message) < 2_000
        assert message.isprintable(), message[:300]
        assert STEERING_SHOWN in (message)


def test_find_prints_a_registry_value_as_text_not_markup_or_controls(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """`xdsi find` prints each DocumentEntry's values as the registry sent
    them: "[/bold]" is no markup error, "[link=...]" no hyperlink on the
    user's terminal, and a C1 control no terminal command."""
    title = b"[/bold][link=http://evil.example/]click[/link]" + STEERING
    url = peer(
        lambda _: (200, "application/soap+xml", _query_response(title, b"1"))
    ).url
    config = _consumer_config(tmp_path, url)

    shown = subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), "find"]
        + ["--patient-id", "P"],
        capture_output=True,
        timeout=120,
        # A terminal as wide as the title, where rich would write links.
        env={**os.environ, "FORCE_COLOR": "1", "COLUMNS": "400"},
    )

    assert shown.returncode == 0, shown.stderr.decode()[-2000:]
    out = shown.stdout.decode()
    assert "[/bold][link=http://evil.example/]click[/link]" in out
    assert STEERING_SHOWN in out
    assert "\x1b]8;" not in out and "\x9b" not in out and "\u202e" not in out


@pytest.mark.parametrize(
    "command",
    [("find",), ("fetch", "--out", "{out}")],
    ids=["find", "fetch"],
)
def test_a_registry_refusing_an_unknown_patient_is_nothing_found(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path, command: tuple[str, ...]
):
    """ITI TF-3 Table 4.2.4.1-2: a registry that refuses FindDocuments with
    XDSUnknownPatientId, where ours finds nothing, ends ``find`` and
    ``fetch`` as an empty answer does: exit EXIT_NOT_FOUND, not 1."""
    url = peer(lambda _: (200, "application/soap+xml", UNKNOWN_PATIENT)).url
    config = _consumer_config(tmp_path, url)
    out = tmp_path / "out"

    ran = subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config)]
        + [part.format(out=out) for part in command]
        + ["--patient-id", "P"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert ran.returncode == EXIT_NOT_FOUND, ran.stderr[-2000:]
    assert "does not know this patient" in ran.stderr
    assert "XDSUnknownPatientId" in ran.stderr
    assert not out.exists()


def test_find_json_for_a_patient_the_registry_refuses_prints_an_empty_list(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """ITI TF-3 Table 4.2.4.1-2: XDSUnknownPatientId counts as an answer
    that finds nothing, so ``find --json`` prints the same empty JSON list
    on stdout as for one, besides exiting EXIT_NOT_FOUND."""
    url = peer(lambda _: (200, "application/soap+xml", UNKNOWN_PATIENT)).url
    config = _consumer_config(tmp_path, url)

    ran = subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), "find"]
        + ["--patient-id", "P", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert ran.returncode == EXIT_NOT_FOUND, ran.stderr[-2000:]
    assert json.loads(ran.stdout) == []
    assert "does not know this patient" in ran.stderr


def test_an_answer_of_more_parts_than_documents_asked_for_is_refused(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """XOP 1.0 4.1: a RAD-69 answer carries the envelope and a part per
    document asked for at most. A peer sending a flood of parts beyond
    (each a spool file and memory, 200,000 of them took 17 s and 340 MB)
    is refused at the first one too many, and nothing is filed."""
    parsed: list[int] = []

    def answer(body: bytes) -> tuple[int, str, bytes]:
        requested = _requested(body)
        parts = [(b"p%d@peer" % i, b"DICM") for i in range(len(requested))]
        parts += [(b"flood%d@peer" % i, b"") for i in range(5_000)]
        parsed.append(len(parts))
        return 200, *_mtom(
            [
                _document_response(uid, _include(b"p%d@peer" % i))
                for i, uid in enumerate(requested)
            ],
            parts,
        )

    consumer = _consumer(tmp_path, peer(answer).url)
    out = tmp_path / "out"

    with pytest.raises(ConsumerError) as failed:
        consumer.retrieve_images(
            _manifest("1.2.3.10.1.1", "1.2.3.10.1.2"), out, FetchResult(), "P"
        )

    assert parsed == [5_002]
    assert "more than 3 MIME parts" in str(failed.value)
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_an_answer_trickling_in_is_given_up(tmp_path: Path):
    """A registry that sends its answer a byte at a time, each within the
    per-read timeout, held a find for as long as it liked (a 6 KB answer
    at a byte every 2 s: hours). The answer must keep ANSWER_PACE on
    average, pausing the timeout at most; this one is given up within
    about twice the timeout."""
    stop = threading.Event()
    answer = _query_response(b"T", b"1")

    def trickle(environ: dict, start_response: Callable) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/soap+xml")])
        for byte in answer:
            if stop.wait(0.5):
                return
            yield bytes([byte])

    server = make_server("127.0.0.1", 0, trickle, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    consumer = _consumer(tmp_path, f"http://127.0.0.1:{server.server_port}/")
    consumer = Consumer(
        replace(
            consumer.settings,
            consumer=replace(consumer.settings.consumer, timeout=2.0),
        ),
        consumer.auditor,
        tmp_path / "spool",
    )
    try:
        with pytest.raises(ConsumerError) as failed:
            consumer.find("P^^^&1.2.3&ISO")
    finally:
        stop.set()
        server.shutdown()
        server.server_close()

    assert "slower than 8192 bytes a second on average" in str(failed.value)


def _package_stream(requested: list[bytes], size: int) -> tuple[str, Iterator[bytes]]:
    """A RAD-69 answer whose first instance is ``size`` bytes of zeros,
    sent in 1 MiB pieces as they are made."""
    content_type, package = _mtom(
        [_document_response(requested[0], _include(b"big@peer"))],
        [(b"big@peer", b"@@BODY@@")],
    )
    head, tail = package.split(b"@@BODY@@")

    def pieces() -> Iterator[bytes]:
        yield head
        for _ in range(size // (1 << 20)):
            yield bytes(1 << 20)
        yield tail

    return content_type, pieces()


@pytest.mark.parametrize("announced", [False, True], ids=["streamed", "announced"])
def test_a_rad69_answer_past_max_answer_size_is_refused_as_it_streams(
    wsgi_peer: Callable[[Callable], HostilePeer], tmp_path: Path, announced: bool
):
    """RAD TF-3 4.69: an answer carries the instances asked for, of no size
    the request bounds. One growing past [consumer] max_answer_size, sent
    without a length or announcing its length, is refused before more
    than that is spooled, the peer is cut off, and nothing of it is kept."""
    size = 64 << 20
    sent: list[int] = []

    def app(environ: dict, start_response: Callable) -> Iterator[bytes]:
        requested = _requested(Request(environ).get_data())
        content_type, pieces = _package_stream(requested, size)
        headers = [("Content-Type", content_type)]
        if announced:
            headers.append(("Content-Length", str(size + 4096)))
        start_response("200 OK", headers)
        for piece in pieces:
            sent.append(len(piece))
            yield piece

    consumer = _consumer(tmp_path, wsgi_peer(app).url, max_answer_size=MIN_REQUEST_SIZE)
    out = tmp_path / "out"

    with pytest.raises(ConsumerError) as refused:
        consumer.retrieve_images(_manifest("1.2.3.10.1.1"), out, FetchResult(), "P")

    message = str(refused.value)
    assert "this side refused the RAD-69 answer" in message
    assert f"larger than {MIN_REQUEST_SIZE} bytes" in message
    assert "[consumer] max_answer_size" in message
    assert sum(sent) < size / 2
    assert not [p for p in out.rglob("*") if p.is_file()]
    assert not (out / PARTIAL_DIR).exists()


def _entry(size: int | None, sha1: str | None = None) -> FoundEntry:
    return FoundEntry(
        entry_uuid="urn:uuid:1",
        unique_id="1.2.3.77",
        repository_unique_id=REPOSITORY,
        home_community_id=None,
        mime_type="application/dicom",
        title="T",
        creation_time="",
        service_start_time="",
        modalities=(),
        study_instance_uids=(),
        size=size,
        status="Approved",
        hash=sha1,
    )


@pytest.mark.parametrize(
    ("content", "inline"),
    [
        (b"the submitted document, as SENT", False),
        (b"the submitted document, as SENT", True),
        (b"the submitted", False),
    ],
    ids=["same-size-mtom-part", "same-size-inline-base64", "cut-short"],
)
def test_an_iti43_document_other_than_registered_is_refused(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path, content: bytes, inline: bool
):
    """ITI TF-3 4.2.3.2.11 and 4.2.3.2.19: the registry holds the size and
    SHA-1 of the document the Source submitted. A repository answering with
    other content (edited to the same size, or cut short) is refused and no
    file is kept."""
    submitted = b"the submitted document, as sent"
    assert len(content) == len(submitted) or content == b"the submitted"

    def answer(body: bytes) -> tuple[int, str, bytes]:
        (unique_id,) = _requested(body)
        if inline:
            return 200, *_mtom(
                [_document_response(unique_id, base64.b64encode(content))], []
            )
        return 200, *_mtom(
            [_document_response(unique_id, _include(b"doc@peer"))],
            [(b"doc@peer", content)],
        )

    consumer = _consumer(tmp_path, peer(answer).url)
    target = tmp_path / "out" / "manifests" / "1.2.3.77.dcm"
    entry = _entry(len(submitted), hashlib.sha1(submitted).hexdigest())

    with pytest.raises(ConsumerError) as refused:
        consumer.retrieve_document(entry, target)

    message = str(refused.value)
    assert "returned 1.2.3.77, but not as registered" in message
    if len(content) == len(submitted):
        assert f"{entry.hash} registered" in message
    else:
        assert f"{len(submitted)} registered" in message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_an_iti43_document_as_registered_is_kept(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    submitted = b"the submitted document, as sent"

    def answer(body: bytes) -> tuple[int, str, bytes]:
        (unique_id,) = _requested(body)
        return 200, *_mtom(
            [_document_response(unique_id, _include(b"doc@peer"))],
            [(b"doc@peer", submitted)],
        )

    consumer = _consumer(tmp_path, peer(answer).url)
    target = tmp_path / "out" / "manifests" / "1.2.3.77.dcm"
    entry = _entry(len(submitted), hashlib.sha1(submitted).hexdigest().upper())

    assert consumer.retrieve_document(entry, target) == target
    assert target.read_bytes() == submitted


@pytest.mark.parametrize("inline", [False, True], ids=["mtom-part", "inline-base64"])
def test_an_iti43_document_larger_than_its_registered_size_is_refused(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path, inline: bool
):
    """ITI TF-3 4.2.3.2.19: the registry gives a document's size. A
    repository answering with a larger document is refused as it streams,
    as an MTOM part or inline base64 alike, and no file is written."""
    document = bytes(3 << 20)

    def answer(body: bytes) -> tuple[int, str, bytes]:
        (unique_id,) = _requested(body)
        if inline:
            content = base64.b64encode(document)
            return 200, *_mtom([_document_response(unique_id, content)], [])
        return 200, *_mtom(
            [_document_response(unique_id, _include(b"doc@peer"))],
            [(b"doc@peer", document)],
        )

    consumer = _consumer(tmp_path, peer(answer).url)
    target = tmp_path / "out" / "manifests" / "1.2.3.77.dcm"

    with pytest.raises(ConsumerError) as refused:
        consumer.retrieve_document(_entry(1000), target)

    message = str(refused.value)
    assert "this side refused the ITI-43 answer" in message
    assert "larger than the 1000 bytes the Document Registry gives" in message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_an_answer_with_a_content_coding_not_asked_for_is_refused(
    wsgi_peer: Callable[[Callable], HostilePeer], tmp_path: Path
):
    """RFC 9110 12.5.3: the Consumer asks for answers uncompressed
    (Accept-Encoding: identity), so that a small gzip answer cannot inflate
    past every bound on what is read. A peer sending gzip all the same,
    here a valid RAD-69 answer, is refused and nothing is filed."""
    asked: list[str | None] = []

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        asked.append(environ.get("HTTP_ACCEPT_ENCODING"))
        requested = _requested(Request(environ).get_data())
        content_type, package = _mtom(
            [_document_response(requested[0], _include(b"p@peer"))],
            [(b"p@peer", _instance(requested[0]))],
        )
        body = gzip.compress(package)
        start_response(
            "200 OK",
            [
                ("Content-Type", content_type),
                ("Content-Encoding", "gzip"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    consumer = _consumer(tmp_path, wsgi_peer(app).url)
    out = tmp_path / "out"

    with pytest.raises(ConsumerError, match="Content-Encoding gzip"):
        consumer.retrieve_images(_manifest("1.2.3.10.1.1"), out, FetchResult(), "P")

    assert asked == ["identity"]
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_an_instance_that_is_not_the_one_asked_for_is_not_returned(
    peer: Callable[[Answer], HostilePeer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """RAD TF-3 4.69.4.2.3: each DocumentResponse carries the instance its
    DocumentUniqueId names. A file whose own SOP Instance UID is another's,
    or that is no DICOM file, is not filed under the UID the peer claims:
    it counts as not returned, its file is removed, and a WARNING names the
    source, the peer's UID escaped."""
    # A line break and an ESC sequence, as logs.shown writes them.
    forged = "9.9.9\\r\\nerror: forged\\x1b[2J"

    def answer(body: bytes) -> tuple[int, str, bytes]:
        good, other, text = _requested(body)
        return 200, *_mtom(
            [
                _document_response(good, _include(b"good@peer")),
                _document_response(other, _include(b"other@peer")),
                _document_response(text, _include(b"text@peer")),
            ],
            [
                (b"good@peer", _instance(good)),
                (b"other@peer", _instance(forged.encode().decode("unicode_escape"))),
                (b"text@peer", b"DICM, but no DICOM file"),
            ],
        )

    url = peer(answer).url
    consumer = _consumer(tmp_path, url)
    result = FetchResult()
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="xdsi")

    consumer.retrieve_images(
        _manifest("1.2.3.10.1.1", "1.2.3.10.1.2", "1.2.3.10.1.3"), out, result, "P"
    )

    assert [p.name for p in result.instances] == ["1.2.3.10.1.1.dcm"]
    assert result.missing == ["1.2.3.10.1.2", "1.2.3.10.1.3"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["1.2.3.10.1.1.dcm"]
    (warning,) = [
        r
        for r in caplog.records
        if r.name.startswith("xdsi") and r.levelno == logging.WARNING
    ]
    said = warning.getMessage()
    assert said.startswith(
        f"2 instances from the Imaging Document Source at {url} are not the ones"
    )
    assert f"asked for 1.2.3.10.1.2, got SOP Instance UID {forged}" in said
    assert said.isprintable()


@pytest.mark.parametrize(
    "link",
    [(STUDY,), (STUDY, SERIES), (PARTIAL_DIR,)],
    ids=["study-folder", "series-folder", "spool-folder"],
)
def test_a_folder_planted_as_a_link_under_out_is_not_written_through(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path, link: tuple[str, ...]
):
    """A folder the Consumer files into, or spools into, that is a symbolic
    link (out/StudyUID pointing elsewhere) is refused, naming it, before
    the Imaging Document Source is asked: nothing is written outside the
    output folder."""
    asked: list[bytes] = []

    def answer(body: bytes) -> tuple[int, str, bytes]:
        asked.append(body)
        (uid,) = _requested(body)
        return 200, *_mtom(
            [_document_response(uid, _include(b"p@peer"))],
            [(b"p@peer", _instance(uid))],
        )

    consumer = _consumer(tmp_path, peer(answer).url)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.joinpath(*link[:-1]).mkdir(parents=True)
    out.joinpath(*link).symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(ConsumerError, match="is a symbolic link") as refused:
        consumer.retrieve_images(_manifest("1.2.3.10.1.1"), out, FetchResult(), "P")

    assert str(out.joinpath(*link)) in str(refused.value)
    assert not asked
    assert not list(elsewhere.iterdir())


def test_a_manifests_folder_planted_as_a_link_fails_the_fetch(
    peer: Callable[[Answer], HostilePeer], tmp_path: Path
):
    """The manifests ITI-43 retrieves land in out/manifests; planted as a
    link, it fails the fetch, naming it, and nothing is written through."""
    asked: list[bytes] = []

    def answer(body: bytes) -> tuple[int, str, bytes]:
        asked.append(body)
        return 200, "application/soap+xml", _query_response(b"T", b"1")

    consumer = _consumer(tmp_path, peer(answer).url)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "manifests").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(ConsumerError, match="manifests is a symbolic link"):
        consumer.fetch("P^^^&1.2.3&ISO", out)

    # The ITI-18 alone: no ITI-43 went out.
    assert len(asked) == 1
    assert not list(elsewhere.iterdir())

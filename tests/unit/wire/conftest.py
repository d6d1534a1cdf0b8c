"""Fixtures of the wire tests: real messages, schemas, loopback servers."""

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree
from werkzeug.serving import make_server

from tests.conftest import SCHEMAS, SHARED, shared_path
from xdsi.ns import SOAP12, WSA

DICOM = SHARED / "dicom"
CASES = SHARED / "conformance" / "cases"


def _capture(case: str) -> tuple[bytes, str]:
    """Return a wire capture's HTTP body and its Content-Type value."""
    header = shared_path("conformance", "cases", case, "http-headers.txt").read_text()
    header = header.strip()
    name, _, value = header.partition(":")
    assert name.lower() == "content-type"
    return (CASES / case / "body.mime").read_bytes(), value.strip()


@pytest.fixture
def nist_mtom() -> tuple[bytes, str]:
    """ITI-41 MTOM/XOP capture of the NIST XDS Toolkit: body, Content-Type."""
    return _capture("iti41-wire-mtom_xop")


@pytest.fixture
def vendor_inline() -> tuple[bytes, str]:
    """RAD-68 capture of a vendor system, its KOS inline as base64."""
    return _capture("rad68-wire-kos_vendor_capture")


@pytest.fixture
def pnr_envelope(nist_mtom: tuple[bytes, str]) -> etree._Element:
    """The SOAP envelope of the NIST ITI-41 capture (its root MIME part)."""
    body, _ = nist_mtom
    start = body.index(b"<?xml")
    end = body.index(b"</soapenv:Envelope>") + len(b"</soapenv:Envelope>")
    return etree.fromstring(body[start:end])


@pytest.fixture(scope="session")
def soap_schema() -> etree.XMLSchema:
    """SOAP 1.2 envelope schema with the WS-Addressing 1.0 schema imported."""
    envelope, addressing = SCHEMAS / "w3/soap-envelope.xsd", SCHEMAS / "w3/ws-addr.xsd"
    wrapper = f"""<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
      <xs:import namespace="{SOAP12}" schemaLocation="{envelope}"/>
      <xs:import namespace="{WSA}" schemaLocation="{addressing}"/>
    </xs:schema>"""
    return etree.XMLSchema(etree.fromstring(wrapper))


@pytest.fixture(scope="session")
def repository_schema() -> etree.XMLSchema:
    """IHE XDS.b Document Repository schema (ITI-41, ITI-43)."""
    return etree.XMLSchema(
        etree.parse(str(SCHEMAS / "IHE/XDS.b_DocumentRepository.xsd"))
    )


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


WsgiApp = Callable[[dict, Callable], Iterator[bytes]]


@pytest.fixture
def serve() -> Iterator[Callable[[WsgiApp], str]]:
    """Start WSGI apps on 127.0.0.1, a free port each; yield the starter.

    One request at a time, so that shutting down waits for the request in
    hand and nothing of it runs on into the next test.
    """
    servers = []

    def start(app: WsgiApp) -> str:
        server = make_server("127.0.0.1", 0, app)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}/soap"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _serve_forever(app: WsgiApp, ports: "multiprocessing.Queue[int]") -> None:
    server = make_server("127.0.0.1", 0, app)
    ports.put(server.server_port)
    server.serve_forever()


@pytest.fixture
def serve_process() -> Iterator[Callable[[WsgiApp], str]]:
    """Like ``serve`` but in a forked process, so its memory is its own."""
    context = multiprocessing.get_context("fork")
    processes = []

    def start(app: WsgiApp) -> str:
        ports = context.Queue()
        process = context.Process(target=_serve_forever, args=(app, ports), daemon=True)
        process.start()
        processes.append(process)
        return f"http://127.0.0.1:{ports.get(timeout=10)}/soap"

    yield start
    for process in processes:
        process.terminate()
        process.join(5)

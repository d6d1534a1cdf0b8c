"""The conformance runner against a peer that answers with a content
coding it was not asked for: the answer is not unpacked, the case fails
and says why."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import shared_path
from xdsi.conformance.cases import load_cases
from xdsi.conformance.runner import Runner, Target

FAULT = (
    b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">'
    b"<env:Body><env:Fault><env:Code><env:Value>env:Receiver</env:Value>"
    b'</env:Code><env:Reason><env:Text xml:lang="en">x</env:Text></env:Reason>'
    b"</env:Fault></env:Body></env:Envelope>"
)


class _Gzipping(BaseHTTPRequestHandler):
    """Answers every POST with a gzip-coded SOAP body, asked for or not."""

    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Accept-Encoding", ""))
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = gzip.compress(FAULT)
        self.send_response(500)
        self.send_header("Content-Type", "application/soap+xml; charset=UTF-8")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gzipping_peer() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gzipping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/repository"
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_with_a_content_coding_not_asked_for_is_not_unpacked(
    gzipping_peer: str, tmp_path: Path
) -> None:
    """RFC 9110 12.5.3: the runner asks for identity; a gzip answer (which
    could unpack to far more than it weighs) fails its case unread."""
    cases = load_cases(shared_path("conformance"))
    _Gzipping.seen.clear()

    # A wire capture, replayed as it was taken.
    (result,) = Runner(Target(repository=gzipping_peer), tmp_path / "spool").run(
        cases, only="iti41-wire-mtom_xop"
    )

    assert not result.passed
    assert result.got == "no answer"
    assert "Content-Encoding 'gzip', not asked for" in result.why
    assert _Gzipping.seen and set(_Gzipping.seen) == {"identity"}

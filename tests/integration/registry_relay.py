"""HTTP relays that stand between a Document Repository and its registry on
127.0.0.1, so that tests can hold, drop or rewrite the registry's answer to
ITI-42 (ITI TF-2 3.42) while ITI-18 passes straight through."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ITI_42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
ITI_18 = "urn:ihe:iti:2007:RegistryStoredQuery"

# A canned answer of a relay.
Answer = Callable[[], Response]


class Relay:
    """A relay to ``target`` (the registry's URL, set once it is known)."""

    def __init__(self) -> None:
        self.target = ""
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/registry"

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        content_type = request.headers.get("Content-Type", "")
        return self.answer(body, content_type)(environ, start_response)

    def answer(self, body: bytes, content_type: str) -> Response:
        """What the relay answers a request with; here, the registry's."""
        return self.forward(body, content_type)

    def forward(self, body: bytes, content_type: str) -> Response:
        """Pass a request on to the registry; return its answer."""
        answer = requests.post(
            self.target, data=body, headers={"Content-Type": content_type}, timeout=60
        )
        return Response(
            answer.content,
            status=answer.status_code,
            content_type=answer.headers.get("Content-Type"),
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HoldingRelay(Relay):
    """A relay that holds ITI-42 until released, then answers it 503.

    Without ``forward_first`` the ITI-42 never reaches the registry; with it
    the registry gets it at once and only its answer is lost.
    """

    def __init__(self) -> None:
        self.forward_first = False
        self.arrived = threading.Event()
        self.release = threading.Event()
        super().__init__()

    def answer(self, body: bytes, content_type: str) -> Response:
        if ITI_42 not in content_type:
            return self.forward(body, content_type)
        if self.forward_first:
            self.forward(body, content_type)
        self.arrived.set()
        self.release.wait(60)
        return Response("held", status=503)

    def close(self) -> None:
        self.release.set()
        super().close()


class ScriptedRelay(Relay):
    """A relay that passes ITI-42 on or not (``forward``ing it), and answers
    it with ``iti42`` when set, ITI-18 with ``iti18`` when set."""

    def __init__(self) -> None:
        self.passes_iti42 = True
        self.iti42: Answer | None = None
        self.iti18: Answer | None = None
        super().__init__()

    def answer(self, body: bytes, content_type: str) -> Response:
        if ITI_42 in content_type:
            registry = self.forward(body, content_type) if self.passes_iti42 else None
            answer = self.iti42() if self.iti42 else registry
            assert answer is not None, "an ITI-42 not passed on needs an answer"
            return answer
        if ITI_18 in content_type and self.iti18 is not None:
            return self.iti18()
        return self.forward(body, content_type)

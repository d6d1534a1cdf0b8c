"""A recording HTTP relay on loopback, placed between two actors in a test.

Every request and response that crosses it is kept as sent, so that a test
can validate each XML message the node emits against the official schemas.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class Exchange:
    url: str
    request_type: str
    request_body: bytes
    status: int
    response_type: str
    response_body: bytes


@dataclass
class Wiretap:
    """Relay from its own loopback URL to ``target``; records exchanges."""

    target: str
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/relay"

    def _app(self, environ, start_response):  # type: ignore[no-untyped-def]
        request = Request(environ)
        body = request.get_data()
        content_type = request.headers.get("Content-Type", "")
        answer = requests.post(
            self.target, data=body, headers={"Content-Type": content_type}, timeout=120
        )
        self.exchanges.append(
            Exchange(
                self.target,
                content_type,
                body,
                answer.status_code,
                answer.headers.get("Content-Type", ""),
                answer.content,
            )
        )
        response = Response(
            answer.content,
            status=answer.status_code,
            content_type=answer.headers.get("Content-Type"),
        )
        return response(environ, start_response)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def body_stream(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)

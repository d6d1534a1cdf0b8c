"""A bound on the connections a socketserver server serves at once.

Each connection of a threading server holds a thread, and what its peer
sent so far; a peer that opens connections and never finishes a request
could pile them up without bound. :class:`BoundedConnections` serves at most
``max_connections`` at once and hands one more, at once, to
``refuse_connection``.
"""

from __future__ import annotations

import threading
from typing import Any


class BoundedConnections:
    """Serve at most ``max_connections`` connections at once.

    Mix in before ``socketserver.ThreadingMixIn`` (or a server class built
    on it). ``refuse_connection`` answers, or just closes, one more.
    """

    max_connections = 256
    _slots: threading.BoundedSemaphore | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(self.max_connections)
        if not self._slots.acquire(blocking=False):
            self.refuse_connection(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            assert self._slots is not None
            self._slots.release()

    def refuse_connection(self, request: Any, client_address: Any) -> None:
        """Close a connection beyond ``max_connections``."""
        self.shutdown_request(request)  # type: ignore[attr-defined]

"""A bound on the connections a socketserver server serves at once.

Each connection of a threading server holds a thread, and what its peer
sent so far; a peer that opens connections and never finishes a request
could pile them up without bound. :class:`BoundedConnections` serves at most
``max_connections`` at once and hands one more, at once, to
``refuse_connection``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)


class BoundedConnections:
    """Serve at most ``max_connections`` connections at once.

    Mix in before ``socketserver.ThreadingMixIn`` (or a server class built
    on it). ``refuse_connection`` answers, or just closes, one more. One
    WARNING marks the first refusal while the listener is full, and one
    more, when it next accepts, says how many it refused meanwhile, so that
    a flood of connections does not flood the log too.
    """

    max_connections = 256
    # What the log calls the listener, before its address.
    listener_name = "listener"
    _slots: threading.BoundedSemaphore | None = None
    # Refusals since the listener last accepted; touched by the accepting
    # thread only.
    _refusals = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(self.max_connections)
        host, port = self.server_address[:2]  # type: ignore[attr-defined]
        if not self._slots.acquire(blocking=False):
            if not self._refusals:
                logger.warning(
                    "%s %s:%s: %d connections in progress; refusing more, the "
                    "first from %s",
                    self.listener_name,
                    host,
                    port,
                    self.max_connections,
                    client_address[0],
                )
            self._refusals += 1
            self.refuse_connection(request, client_address)
            return
        if self._refusals:
            logger.warning(
                "%s %s:%s accepts again; %d connections refused while %d were "
                "in progress",
                self.listener_name,
                host,
                port,
                self._refusals,
                self.max_connections,
            )
            self._refusals = 0
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        serve = super().process_request_thread  # type: ignore[misc]
        try:
            serve(request, client_address)
        finally:
            assert self._slots is not None
            self._slots.release()

    def refuse_connection(self, request: Any, client_address: Any) -> None:
        """Close a connection beyond ``max_connections``."""
        self.shutdown_request(request)  # type: ignore[attr-defined]

"""The node's logging policy: no patient data in the log above DEBUG.

Who saw which patient belongs in the audit trail (ITI TF-2 3.20); the log
says what the node did without the values it handled.
"""

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# A log line above DEBUG quotes at most this many characters of what a peer
# sent the HTTP layer (a request line it cannot parse, say).
QUOTED_PREFIX = 80


# Libraries whose log lines quote what a peer sent as it came: pynetdicom
# quotes a malformed PDU's AE titles and values, with a traceback, at ERROR.
PEER_QUOTING_LOGGERS = ("pynetdicom",)


class PeerTextFilter(logging.Filter):
    """On a handler: a line of a PEER_QUOTING_LOGGERS logger above DEBUG is
    written with its unprintable characters escaped (no forged lines, no
    terminal escapes) and without its traceback (one line per bad PDU, not
    twenty); at DEBUG it is left whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and record.name.startswith(
            PEER_QUOTING_LOGGERS
        ):
            record.msg = escaped(record.getMessage())
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


def guard_peer_text() -> None:
    """Put a PeerTextFilter on each handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, PeerTextFilter) for f in handler.filters):
            handler.addFilter(PeerTextFilter())


def quiet_pydicom(level: int) -> None:
    """Keep pydicom's complaints about values out of the log but at DEBUG.

    pydicom quotes a value it finds invalid ("Invalid value for VR DA:
    '1970-01-01'"), and the value may be a patient's birth date or name. It
    logs the complaint at WARNING and also raises it as a Python warning,
    which would print it a second time; the node reports what it refuses
    in its own words, without values. Every process that reads DICOM sets
    this: the command line's and each HTTP worker's.
    """
    logging.getLogger("pydicom").setLevel(
        logging.DEBUG if level <= logging.DEBUG else logging.ERROR
    )
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


# The threads inside warnings_muted(), and what showed a warning before
# _show_unless_muted was put in its place.
_muted = threading.local()
_installing = threading.Lock()
_show_before: Any = None


@contextmanager
def warnings_muted() -> Iterator[None]:
    """Drop the Python warnings this thread raises meanwhile (pydicom's,
    which may quote a patient's value, attributed to the caller's module
    and so past the filter of quiet_pydicom).

    ``warnings.catch_warnings`` cannot do this in a threaded server: it
    swaps the process's one filter list and puts back, on leaving, what it
    found on entering, so that a thread leaving takes the ignore filter from
    under another thread still inside, whose warning is then shown. Here the
    filters stay as they are, and the function that shows a warning passes
    over those raised in a muted thread.
    """
    _install()
    _muted.depth = getattr(_muted, "depth", 0) + 1
    try:
        yield
    finally:
        _muted.depth -= 1


def _install() -> None:
    """Put _show_unless_muted in place of ``warnings.showwarning``, once
    (again after something, a test's catch_warnings say, put it back)."""
    global _show_before
    with _installing:
        if warnings.showwarning is not _show_unless_muted:
            _show_before = warnings.showwarning
            warnings.showwarning = _show_unless_muted


def _show_unless_muted(*args: Any, **kwargs: Any) -> None:
    # Limitation: a warning passed over here still counts as shown for the
    # filters' "default" and "once" actions, which show it once per place.
    if not getattr(_muted, "depth", 0):
        _show_before(*args, **kwargs)


def quoted(text: str | None) -> str | None:
    """A peer's value for a log line: its first QUOTED_PREFIX characters in
    printable ASCII, others escaped, and its length when it is longer, so
    that a value sent long (a megabyte wsa:MessageID) or with line breaks
    neither fills the log nor forges lines in it."""
    if text is None:
        return None
    shown = "".join(
        c
        if c.isascii() and c.isprintable()
        else c.encode("unicode_escape").decode("ascii")
        for c in text[:QUOTED_PREFIX]
    )
    if len(text) > QUOTED_PREFIX:
        shown += f"... ({len(text)} characters)"
    return shown


# A peer's text shown to a user (a Fault reason, a RegistryError) is cut
# after this many characters.
SHOWN_PREFIX = 500


def escaped(text: str) -> str:
    """``text`` with each character Unicode counts as unprintable escaped
    (line breaks, C0 and C1 controls, bidirectional overrides)."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def shown(text: str, limit: int = SHOWN_PREFIX) -> str:
    """A peer's text for a terminal: its first ``limit`` characters, each
    character Unicode counts as unprintable (line breaks, C0 and C1 controls
    such as ESC and CSI, bidirectional overrides) escaped, and its length
    when it is longer, so that a peer's answer can neither steer the
    terminal nor forge lines, nor fill the screen."""
    out = escaped(text[:limit])
    if len(text) > limit:
        out += f"... ({len(text)} characters)"
    return out


def escaped_prefix(text: str) -> str:
    """Return the start of ``text`` in printable ASCII, other characters
    escaped, so that a peer's bytes neither fill a log nor forge lines in it.

    Nothing from the first ``?`` on is quoted: in a request line that is the
    query string (RFC 3986 3.4), where a DICOMweb search carries patient
    names and birth dates (DICOM PS3.18 8.3.4); the prefix says it was left
    out.
    """
    head, query, _ = text.partition("?")
    prefix = quoted(head) or ""
    if len(head) > QUOTED_PREFIX:
        # The whole request line's length, query string included.
        prefix = prefix.rsplit("... (", 1)[0] + f"... ({len(text)} characters)"
    if query:
        prefix += "?... (query left out)"
    return prefix


class PeerRefusalLog:
    """For an http.server request handler (werkzeug's WSGIRequestHandler):
    what the HTTP layer refuses is the peer's doing, logged at INFO.

    http.server and werkzeug report a request line or header they cannot
    parse (send_error), a read that timed out and a broken TLS session
    through log_error, which werkzeug logs at ERROR, quoting the request
    line whole, be it a TLS ClientHello sent to a plain port or any bytes.
    Here the line quotes a short, escaped prefix without the query string
    (no patient data above DEBUG), the error answer quotes no more of it,
    and a refused request gets no access line besides.
    """

    # The HTTP layer refused the request in hand and logged so (log_error).
    _refused = False

    def handle_one_request(self) -> None:
        self._refused = False
        super().handle_one_request()  # type: ignore[misc]

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        if message is not None:
            message = escaped_prefix(message)
        super().send_error(code, message, explain)  # type: ignore[misc]

    def log_error(self, format: str, *args: Any) -> None:
        self._refused = True
        logging.getLogger(type(self).__module__).info(
            "HTTP peer %s: %s",
            self.address_string(),  # type: ignore[attr-defined]
            escaped_prefix(format % args if args else format),
        )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self._refused:
            super().log_request(code, size)  # type: ignore[misc]


# A peer's repeats of one fault (handshakes failing for one reason, audit
# messages malformed alike) are logged at WARNING, and audited, at most once
# in this many seconds; those between are counted into the next record.
REPEAT_INTERVAL = 60.0
# Hosts and faults a Throttle remembers at once; past it, a new one's
# repeats are all recorded until older ones' intervals have run out.
MAX_THROTTLED = 4096


class Throttle:
    """Which repeats of a fault a peer host causes to record.

    A host failing in a loop (a scanner, a misconfigured sender retrying,
    an attacker) would otherwise write a WARNING, and an audit record, per
    attempt, without bound. A host's first fault of a kind is recorded at
    once, then at most one each ``interval`` seconds for that kind,
    carrying the count of those left out; another kind is news, recorded at
    once.
    """

    def __init__(
        self,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = REPEAT_INTERVAL if interval is None else interval
        self._clock = clock
        self._lock = threading.Lock()
        # (host, kind) -> (when it was last recorded, repeats left out since).
        self._hosts: dict[tuple[str, str], tuple[float, int]] = {}

    def admit(self, host: str, kind: str) -> int | None:
        """None when this fault of ``host`` of ``kind`` goes unrecorded;
        else how many such before it went so."""
        key = (host, kind)
        now = self._clock()
        with self._lock:
            last = self._hosts.get(key)
            if last is not None and now - last[0] < self.interval:
                self._hosts[key] = (last[0], last[1] + 1)
                return None
            if last is None and len(self._hosts) >= MAX_THROTTLED:
                self._hosts = {
                    k: v for k, v in self._hosts.items() if now - v[0] < self.interval
                }
                if len(self._hosts) >= MAX_THROTTLED:
                    return 0
            self._hosts[key] = (now, 0)
            return last[1] if last is not None else 0

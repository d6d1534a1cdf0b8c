"""The log policy for what peers send: escaped, one line, no traceback."""

from __future__ import annotations

import io
import logging

import pytest

from xdsi.logs import PeerTextFilter


@pytest.fixture
def written() -> io.StringIO:
    """What a handler with a PeerTextFilter writes, at DEBUG and above."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PeerTextFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _raise() -> None:
    raise ValueError("bad PDU")


def test_a_pynetdicom_error_quoting_a_peer_is_one_escaped_line(written):
    """A malformed A-ASSOCIATE-RQ's AE title, as pynetdicom quotes it: no
    terminal escape or line break reaches the log, nor a traceback."""
    try:
        _raise()
    except ValueError:
        logging.getLogger("pynetdicom.dul").error(
            "Invalid AE title %s", "\x1b[31mEVIL\nFORGED LINE\x9b", exc_info=True
        )

    text = written.getvalue()
    assert text == (
        "ERROR pynetdicom.dul: Invalid AE title \\x1b[31mEVIL\\nFORGED LINE\\x9b\n"
    )


def test_at_debug_and_from_other_loggers_lines_are_left_whole(written):
    try:
        _raise()
    except ValueError:
        logging.getLogger("pynetdicom.dul").debug("seen %s", "\x1b", exc_info=True)
        logging.getLogger("xdsi.app").error("ours", exc_info=True)

    text = written.getvalue()
    assert "seen \x1b" in text
    assert text.count("Traceback") == 2

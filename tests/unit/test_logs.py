"""The log policy for what peers send: escaped, one line, no traceback."""

from __future__ import annotations

import io
import logging
import threading
import warnings

import pytest

from xdsi.logs import PeerTextFilter, warnings_muted


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


@pytest.fixture
def shown() -> list[warnings.WarningMessage]:
    """The warnings shown while a test runs, each one every time."""
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        yield recorded


def test_a_thread_leaving_its_muted_block_leaves_another_muted(shown):
    # Two request threads each reading a header: the first leaves its
    # block while the second, inside its own, meets an invalid value.
    entered, second_in, left = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with warnings_muted():
            entered.set()
            second_in.wait(10)
        left.set()

    def second() -> None:
        entered.wait(10)
        with warnings_muted():
            second_in.set()
            left.wait(10)
            warnings.warn(
                "Invalid value for VR DA: '19700101X'", UserWarning, stacklevel=1
            )

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert left.is_set()
    assert [str(w.message) for w in shown] == []


def test_muting_one_thread_leaves_the_others_warnings_shown(shown):
    inside, done = threading.Event(), threading.Event()

    def muted() -> None:
        with warnings_muted():
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=muted)
    thread.start()
    inside.wait(10)
    try:
        warnings.warn("not muted here", UserWarning, stacklevel=1)
    finally:
        done.set()
        thread.join(10)
    with warnings_muted():
        warnings.warn("muted here", UserWarning, stacklevel=1)

    assert [str(w.message) for w in shown] == ["not muted here"]

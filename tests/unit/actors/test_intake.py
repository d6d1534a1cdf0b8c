"""The Imaging Document Source intake's retry delays (RAD TF-3 4.68), and
its auto-publisher while the database cannot be reached."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import PostgresCluster
from xdsi.actors.intake import (
    MAX_RETRY_DELAY,
    MAX_ROUND_DELAY,
    AutoPublisher,
    retry_delay,
)
from xdsi.app import Services, build_services
from xdsi.config import Settings


@pytest.mark.parametrize(
    ("quiet", "failures", "delay"),
    [
        (30.0, 1, 30.0),
        (30.0, 2, 60.0),
        (30.0, 5, 480.0),
        (30.0, 8, MAX_RETRY_DELAY),
        (30.0, 10_000, MAX_RETRY_DELAY),
        (0.0, 1, 1.0),
    ],
    ids=["first", "second", "fifth", "capped", "many", "no-quiet-time"],
)
def test_retry_delay_doubles_from_the_quiet_time_up_to_an_hour(
    quiet: float, failures: int, delay: float
) -> None:
    """RAD TF-3 4.68: a study that failed to publish waits longer each time."""
    assert retry_delay(quiet, failures) == delay


def _sqlite_services(tmp_path: Path) -> Services:
    """A node's services on a SQLite database in a folder of its own."""
    (tmp_path / "db").mkdir()
    settings = Settings().with_storage(tmp_path / "node")
    url = f"sqlite:///{tmp_path / 'db' / 'xdsi.sqlite'}"
    return build_services(
        replace(settings, node=replace(settings.node, database_url=url))
    )


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xdsi.actors.intake"]


def test_auto_publish_logs_an_unreachable_database_once_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that cannot be reached (PEP 249 OperationalError) fails
    the rounds: the first is one ERROR line naming the error, no traceback;
    the others go to DEBUG, each waiting twice as long up to
    MAX_ROUND_DELAY; the first round to succeed again says so."""
    services = _sqlite_services(tmp_path)
    publisher = AutoPublisher(services.intake, quiet=30.0, interval=1.0)
    caplog.set_level(logging.DEBUG, logger="xdsi.actors.intake")
    assert publisher.run_round() == 1.0

    (tmp_path / "db").rename(tmp_path / "away")
    services.engine.dispose()
    delays = [publisher.run_round() for _ in range(7)]

    assert delays == [2.0, 4.0, 8.0, 16.0, MAX_ROUND_DELAY, MAX_ROUND_DELAY, 30.0]
    (error,) = [r for r in _records(caplog) if r.levelno >= logging.INFO]
    assert error.levelno == logging.ERROR
    assert not error.exc_info
    assert "the database cannot be reached" in error.getMessage()
    assert "sqlite3.OperationalError: unable to open database file" in (
        error.getMessage()
    )
    debug = [r for r in _records(caplog) if r.levelno == logging.DEBUG]
    assert len(debug) == 6
    assert not any(r.exc_info for r in debug)

    caplog.clear()
    (tmp_path / "away").rename(tmp_path / "db")
    assert publisher.run_round() == 1.0
    (back,) = _records(caplog)
    assert back.levelno == logging.WARNING
    assert back.getMessage() == "auto-publish back after 7 failed rounds in a row"

    caplog.clear()
    assert publisher.run_round() == 1.0
    assert _records(caplog) == []
    services.engine.dispose()


def test_auto_publish_logs_an_error_of_the_node_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round failing of this node's own error keeps its traceback, once a
    run of failures, and is backed off as a database down is."""
    services = _sqlite_services(tmp_path)
    publisher = AutoPublisher(services.intake, quiet=30.0, interval=1.0)

    def broken(quiet: float) -> list[object]:
        raise KeyError("a bug")

    monkeypatch.setattr(services.intake, "publish_due", broken)
    caplog.set_level(logging.DEBUG, logger="xdsi.actors.intake")
    delays = [publisher.run_round() for _ in range(3)]

    assert delays == [2.0, 4.0, 8.0]
    first, *later = _records(caplog)
    assert first.levelno == logging.ERROR
    assert first.getMessage() == "auto-publish round failed"
    assert first.exc_info is not None and first.exc_info[0] is KeyError
    assert [r.levelno for r in later] == [logging.DEBUG, logging.DEBUG]
    services.engine.dispose()


class _Relay:
    """A TCP relay on 127.0.0.1 to a PostgreSQL cluster, which a test cuts
    (the database down: its connections broken, new ones refused) and opens
    again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._sockets: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        self._sockets = [listener]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        for sock in self._sockets:
            try:
                # Wakes the thread blocked in accept() or recv() on it.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_auto_publish_logs_a_postgresql_down_once(
    tmp_path: Path, postgresql: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL cut off under a running node, its connections broken and
    new ones refused (PEP 249 OperationalError): one ERROR line without
    traceback, then DEBUG, then a WARNING once it answers again."""
    url = postgresql.create_database()
    relay = _Relay(postgresql.port)
    settings = Settings().with_storage(tmp_path / "node")
    relayed = url.replace(f":{postgresql.port}/", f":{relay.port}/")
    services = build_services(
        replace(settings, node=replace(settings.node, database_url=relayed))
    )
    publisher = AutoPublisher(services.intake, quiet=30.0, interval=1.0)
    caplog.set_level(logging.DEBUG, logger="xdsi.actors.intake")
    assert publisher.run_round() == 1.0

    relay.cut()
    delays = [publisher.run_round() for _ in range(4)]
    relay.open()
    assert publisher.run_round() == 1.0

    assert delays == [2.0, 4.0, 8.0, 16.0]
    error, *debug, back = _records(caplog)
    assert error.levelno == logging.ERROR
    assert not error.exc_info
    assert "the database cannot be reached (psycopg.OperationalError: " in (
        error.getMessage()
    )
    assert [r.levelno for r in debug] == [logging.DEBUG] * 3
    assert not any(r.exc_info for r in debug)
    assert back.levelno == logging.WARNING
    assert back.getMessage() == "auto-publish back after 4 failed rounds in a row"
    services.engine.dispose()
    relay.cut()
    postgresql.drop_database(url)

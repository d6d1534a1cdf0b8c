"""RFC 5425 gives the receiver no acknowledgement: the sender reads how a
session ended to tell whether its last message was read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.pki import Pki, make_pki
from xdsi.audit.syslog import TlsSender, frame


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class _ClosingReceiver:
    """A TLS syslog receiver on 127.0.0.1 that closes its first session
    after reading one message, then reads a second session to its end."""

    def __init__(self, pki: Pki) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._context = pki.server_context()
        self.sessions: list[bytes] = []
        self.first_closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _read(self, first: bool) -> None:
        raw, _ = self._listener.accept()
        with self._context.wrap_socket(raw, server_side=True) as session:
            session.settimeout(5)
            data = b""
            while True:
                try:
                    chunk = session.recv(65536)
                except OSError:
                    break
                data += chunk
                if not chunk or (first and data):
                    break
            self.sessions.append(data)
        if first:
            self.first_closed.set()

    def _serve(self) -> None:
        self._read(first=True)
        self._read(first=False)

    def stop(self) -> list[bytes]:
        self._thread.join(timeout=10)
        self._listener.close()
        return self.sessions


@pytest.fixture
def receiver(pki: Pki) -> Iterator[_ClosingReceiver]:
    receiver = _ClosingReceiver(pki)
    yield receiver
    receiver._listener.close()


def test_a_message_written_after_the_receiver_closed_goes_again(
    receiver: _ClosingReceiver, pki: Pki
) -> None:
    """The receiver closes (FIN) just after the sender last looked: the next
    message reaches a closed socket, whose kernel answers with a reset that
    arrives after the FIN. The sender must still see that message unread."""
    sender = TlsSender("127.0.0.1", receiver.port, pki.client_context())
    sender.send(b"one")
    assert receiver.first_closed.wait(5)
    time.sleep(0.1)
    # Stages the interleaving: "two" is written as send() writes it, but
    # after the FIN came, as when the FIN arrives between send()'s look at
    # the session and its write.
    assert sender._sock is not None
    sender._sock.sendall(frame(b"two"))
    sender._last_sent = b"two"
    time.sleep(0.1)

    sender.send(b"three")
    sender.close()

    first, second = receiver.stop()
    assert first == frame(b"one")
    assert second == frame(b"two") + frame(b"three")


def test_a_receiver_that_read_everything_and_closed_gets_nothing_twice(
    receiver: _ClosingReceiver, pki: Pki
) -> None:
    sender = TlsSender("127.0.0.1", receiver.port, pki.client_context())
    sender.send(b"one")
    assert receiver.first_closed.wait(5)
    time.sleep(0.1)

    sender.send(b"two")
    sender.close()

    first, second = receiver.stop()
    assert first == frame(b"one")
    assert second == frame(b"two")

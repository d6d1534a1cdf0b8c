"""ITI-8 over MLLP: a Document Registry listener on 127.0.0.1, real sockets."""

import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from tests.conftest import require
from tests.unit.hl7.conftest import (
    ADT_A01_V231,
    ADT_A04_V25,
    AFFINITY_DOMAIN,
    AFFINITY_ID,
)
from xdsi.hl7 import (
    MllpError,
    MllpServer,
    PatientIdentity,
    build_ack,
    build_feed,
    mllp,
    send_message,
)
from xdsi.hl7.mllp import MAX_FRAME_SIZE, _Deframer, decode_payload

VT, FS_CR = b"\x0b", b"\x1c\r"


def frame(message: str, encoding: str = "utf-8") -> bytes:
    """Frame a message by hand, as a peer's MLLP sender would."""
    return VT + message.encode(encoding) + FS_CR


def msa(ack_text: str) -> tuple[str, str]:
    """MSA-1 and MSA-2 of an ACK, read with hl7apy."""
    ack = parse_message(
        ack_text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )
    return ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()


def read_frames(sock: socket.socket, count: int, timeout: float = 5.0) -> list[str]:
    """Read ``count`` answer frames from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while data.count(FS_CR) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data.count(FS_CR)} frames"
        data += chunk
    frames = [f for f in data.split(FS_CR) if f]
    assert all(f.startswith(VT) for f in frames)
    return [f[1:].decode() for f in frames]


@pytest.fixture
def client(registry: MllpServer) -> Iterator[socket.socket]:
    """A raw TCP connection to the registry's listener."""
    with socket.create_connection(registry.address, timeout=5.0) as sock:
        yield sock


@pytest.mark.parametrize("message", [ADT_A01_V231, ADT_A04_V25], ids=["A01", "A04"])
def test_create_feed_is_accepted_and_handed_over(
    registry: MllpServer, fed: list[PatientIdentity], message: str
) -> None:
    """ITI TF-2 3.8.4.1.3: A01 and A04 answer AA; the Registry gets the CX."""
    ack = send_message(*registry.address, message)

    assert msa(ack)[0] == "AA"
    assert [p.patient_id for p in fed] == [f"{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO"]


def test_ack_msa_2_echoes_the_message_control_id(registry: MllpServer) -> None:
    """ITI TF-2x C.2.3: MSA-2 of the ACK is MSH-10 of the feed."""
    message = ADT_A01_V231.replace("|PIF-0001|", "|CTRL-77|")

    assert msa(send_message(*registry.address, message)) == ("AA", "CTRL-77")


def test_feed_from_another_domain_is_answered_ae(
    registry: MllpServer, fed: list[PatientIdentity]
) -> None:
    """ITI TF-2 3.8.4.1.3: no identifier of the affinity domain answers AE."""
    message = ADT_A01_V231.replace(AFFINITY_DOMAIN, "1.2.840.99999.7")

    ack = send_message(*registry.address, message)

    assert msa(ack) == ("AE", "PIF-0001")
    # Table 0357 code in ERR, not in MSH-7's date and time.
    assert "204" in ack.partition("\rERR")[2] and fed == []


@pytest.mark.parametrize(
    "message_type", ["ADT^A03^ADT_A03", "ORM^O01^ORM_O01"], ids=["A03", "ORM"]
)
def test_other_messages_are_answered_ar(
    registry: MllpServer, fed: list[PatientIdentity], message_type: str
) -> None:
    """ITI TF-2 3.8.4.1.1: events that ITI-8 does not name are rejected AR."""
    message = ADT_A01_V231.replace("ADT^A01^ADT_A01", message_type)

    assert msa(send_message(*registry.address, message)) == ("AR", "PIF-0001")
    assert fed == []


def test_garbage_is_answered_ar_and_the_server_lives_on(registry: MllpServer) -> None:
    """ITI TF-2x C.2.3: an unreadable frame still earns an ACK AR."""
    assert msa(send_message(*registry.address, "\x00 this is not HL7 \xff")) == (
        "AR",
        "",
    )

    assert msa(send_message(*registry.address, ADT_A01_V231))[0] == "AA"


def test_frame_split_over_several_packets_is_reassembled(
    registry: MllpServer, client: socket.socket, fed: list[PatientIdentity]
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame may arrive in pieces."""
    data = frame(ADT_A01_V231)
    for piece in (data[:1], data[1:40], data[40:-1], data[-1:]):
        client.sendall(piece)
        time.sleep(0.05)

    assert msa(read_frames(client, 1)[0]) == ("AA", "PIF-0001")
    assert len(fed) == 1


def test_two_frames_in_one_write_get_two_acks_in_order(
    registry: MllpServer, client: socket.socket, fed: list[PatientIdentity]
) -> None:
    """HL7 v2.5 Implementation Guide C.4: frames are cut by <VT> and <FS><CR>."""
    client.sendall(frame(ADT_A01_V231) + frame(ADT_A04_V25))

    acks = read_frames(client, 2)

    assert [msa(a) for a in acks] == [("AA", "PIF-0001"), ("AA", "PIF-0002")]
    assert [p.trigger for p in fed] == ["A01", "A04"]


def test_bytes_before_the_start_block_are_skipped_and_logged_without_content(
    registry: MllpServer, client: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: only <VT> opens a frame."""
    junk = b"SECRET-JUNK-4711 "
    with caplog.at_level(logging.WARNING, logger="xdsi.hl7"):
        client.sendall(junk + frame(ADT_A01_V231))
        ack = read_frames(client, 1)[0]

    assert msa(ack) == ("AA", "PIF-0001")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipped {len(junk) - 1} bytes" in w for w in warnings)
    assert not any("SECRET" in w for w in warnings)


def test_a_peer_streaming_bytes_outside_a_frame_is_logged_twice_in_all(
    registry: MllpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: bytes outside a frame are skipped;
    a peer that streams megabytes of them gets one line as they begin and
    one with their total as its connection ends, not one per read."""
    junk = b"x" * 65536
    with caplog.at_level(logging.WARNING, logger="xdsi.hl7"):
        with socket.create_connection(registry.address, timeout=5.0) as sock:
            for _ in range(200):
                sock.sendall(junk)
            sock.sendall(frame(ADT_A01_V231))
            assert msa(read_frames(sock, 1)[0]) == ("AA", "PIF-0001")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(
            "in all" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.05)

    lines = [
        r.getMessage() for r in caplog.records if "outside a frame" in r.getMessage()
    ]
    assert len(lines) == 2
    assert lines[1].endswith(
        f"skipped {200 * len(junk)} bytes outside a frame in all on this connection"
    )


def test_start_block_inside_a_frame_starts_it_afresh(
    registry: MllpServer, client: socket.socket, fed: list[PatientIdentity]
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a new <VT> opens a new frame."""
    client.sendall(VT + b"MSH|^~\\&|TRUNCATED" + frame(ADT_A01_V231))

    assert msa(read_frames(client, 1)[0]) == ("AA", "PIF-0001")
    assert len(fed) == 1


def test_a_stream_of_start_blocks_starts_the_frame_at_the_last() -> None:
    """HL7 v2.5 Implementation Guide C.4: each <VT> inside a frame starts
    it afresh; of a megabyte of them the last starts the frame, which is
    read whole, and the bytes before it count as skipped. (How fast they are
    skipped is for tests/benchmarks/bench_mllp.py.)"""
    deframer = _Deframer()

    for _ in range(16):
        assert deframer.feed(VT * 65536) == ([], 0)
    frames, skipped = deframer.feed(b"abc" + VT + b"MSH|x" + FS_CR)

    assert (frames, skipped) == ([b"MSH|x"], 3)


def test_oversized_frame_is_answered_ar_and_its_connection_closed(
    registry: MllpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame past MAX_FRAME_SIZE is
    refused with an ACK AR naming its MSH-10, logged, and the connection
    closed."""
    oversized = VT + ADT_A01_V231.encode() + b"Z" * (MAX_FRAME_SIZE + 1) + FS_CR
    with socket.create_connection(registry.address, timeout=5.0) as sock:
        with caplog.at_level(logging.WARNING, logger="xdsi.hl7"):
            sock.sendall(oversized)
            ack = read_frames(sock, 1)[0]
            closed = sock.recv(1024)

    assert msa(ack) == ("AR", "PIF-0001")
    assert str(MAX_FRAME_SIZE) in ack
    assert closed == b""
    assert any("exceeds" in r.getMessage() for r in caplog.records)
    assert send_message(*registry.address, ADT_A01_V231).startswith("MSH|")


def test_frame_over_a_small_cap_is_refused_even_when_complete() -> None:
    """HL7 v2.5 Implementation Guide C.4: the cap holds for whole frames."""
    server = MllpServer("127.0.0.1", 0, lambda m: m, max_frame_size=64)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5.0) as sock:
            sock.sendall(frame(ADT_A01_V231))
            ack = read_frames(sock, 1)[0]
            closed = sock.recv(1024)
    finally:
        server.stop()

    assert msa(ack) == ("AR", "PIF-0001") and closed == b""


def test_several_messages_travel_on_one_connection(
    registry: MllpServer, client: socket.socket
) -> None:
    """HL7 v2.5 Implementation Guide C.4: the connection stays open between frames."""
    client.sendall(frame(ADT_A01_V231))
    first = read_frames(client, 1)[0]
    client.sendall(frame(ADT_A04_V25))
    second = read_frames(client, 1)[0]

    assert (msa(first)[1], msa(second)[1]) == ("PIF-0001", "PIF-0002")


def test_segments_ending_in_lf_are_accepted_over_the_wire(registry: MllpServer) -> None:
    """ITI TF-2 3.8.4.1.2: a sender writing LF segment ends is still served."""
    ack = send_message(*registry.address, ADT_A01_V231.replace("\r", "\n"))

    assert msa(ack) == ("AA", "PIF-0001")


def test_latin1_message_is_decoded_by_fallback(
    registry: MllpServer, client: socket.socket, fed: list[PatientIdentity]
) -> None:
    """ITI TF-2 3.8.4.1.2: a Latin-1 PID-5 reads correctly when not UTF-8."""
    message = ADT_A01_V231.replace("MOORE^CHIP", "MÜLLER^JÖRG")
    client.sendall(frame(message, "latin-1"))

    assert msa(read_frames(client, 1)[0])[0] == "AA"
    assert fed[0].name == "MÜLLER^JÖRG^^^^^L"


def test_frame_that_never_ends_is_closed_after_the_timeout(
    fed: list[PatientIdentity], caplog: pytest.LogCaptureFixture
) -> None:
    """HL7 v2.5 Implementation Guide C.4: a frame without <FS> ties up nothing."""
    server = MllpServer("127.0.0.1", 0, lambda m: m, timeout=0.5)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5.0) as sock:
            with caplog.at_level(logging.WARNING, logger="xdsi.hl7"):
                started = time.monotonic()
                sock.sendall(VT + ADT_A01_V231.encode())
                closed = sock.recv(1024)
                elapsed = time.monotonic() - started
    finally:
        server.stop()

    assert closed == b""
    assert 0.4 <= elapsed < 3.0
    assert any("unfinished" in r.getMessage() for r in caplog.records)


def test_handler_failure_leaves_the_frame_unanswered_and_the_server_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HL7 v2.5 Implementation Guide C.4: one bad exchange does not stop the rest."""

    def handler(message: str) -> str:
        if "BOOM" in message:
            raise RuntimeError("handler bug")
        return message.upper()

    server = MllpServer("127.0.0.1", 0, handler, timeout=2.0)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5.0) as sock:
            with caplog.at_level(logging.ERROR, logger="xdsi.hl7"):
                sock.sendall(frame("BOOM") + frame("after"))
                answers = read_frames(sock, 1)
        with pytest.raises(MllpError, match="no answer"):
            send_message(*server.address, "BOOM again", timeout=0.5)
        assert send_message(*server.address, "still here") == "STILL HERE"
    finally:
        server.stop()

    assert answers == ["AFTER"]
    failures = [r.exc_info[0] for r in caplog.records if r.exc_info]
    assert failures == [RuntimeError, RuntimeError]


def test_connections_are_served_concurrently() -> None:
    """ITI TF-2 3.8: a slow sender does not hold up another Patient Identity Source."""
    server = MllpServer("127.0.0.1", 0, lambda m: "ok:" + m, timeout=5.0)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5.0) as slow:
            slow.sendall(VT + b"half a frame")
            answer = send_message(*server.address, "quick", timeout=2.0)
            slow.sendall(b" and the rest" + FS_CR)
            late = read_frames(slow, 1)
    finally:
        server.stop()

    assert answer == "ok:quick"
    assert late == ["ok:half a frame and the rest"]


def test_send_message_raises_when_the_peer_closes_without_answer() -> None:
    """HL7 v2.5 Implementation Guide C.4: no ACK frame is an MLLP failure."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_and_close() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        with pytest.raises(MllpError, match="closed before an answer"):
            send_message(*listener.getsockname()[:2], ADT_A01_V231, timeout=5.0)
    finally:
        thread.join(timeout=5.0)
        listener.close()


def test_stopped_server_refuses_connections() -> None:
    """HL7 v2.5 Implementation Guide C.4: stop() closes the listening socket."""
    server = MllpServer("127.0.0.1", 0, lambda m: m)
    server.start()
    address = server.address
    assert send_message(*address, "ping") == "ping"

    server.stop()

    with pytest.raises(MllpError):
        send_message(*address, "ping", timeout=1.0)


def test_stop_closes_open_connections() -> None:
    """HL7 v2.5 Implementation Guide C.4: no connection outlives its server."""
    server = MllpServer("127.0.0.1", 0, lambda m: m, timeout=30.0)
    server.start()
    with socket.create_connection(server.address, timeout=5.0) as sock:
        sock.sendall(frame("hello"))
        assert read_frames(sock, 1) == ["hello"]

        server.stop()

        assert sock.recv(1024) == b""


def test_python_hl7_mllp_send_is_answered_aa(
    registry: MllpServer, fed: list[PatientIdentity], tmp_path: Path
) -> None:
    """ITI TF-2x C.2.1: python-hl7's mllp_send, a peer sender, gets our ACK."""
    beside_python = Path(sys.executable).with_name("mllp_send")
    program = (
        str(beside_python) if beside_python.exists() else shutil.which("mllp_send")
    )
    require("program mllp_send (python-hl7)", program is not None)
    assert program is not None
    feed = tmp_path / "a01.hl7"
    feed.write_text(ADT_A01_V231.replace("\r", "\n"))
    host, port = registry.address

    done = subprocess.run(
        [program, "--loose", "-p", str(port), "-f", str(feed), host],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "MSA|AA|PIF-0001" in done.stdout
    assert len(fed) == 1


def test_send_message_reads_the_ack_of_hl7apy_mllp_server() -> None:
    """ITI TF-2x C.2.1: our Patient Identity Source talks to hl7apy's listener."""

    class Registry(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            ack = build_ack(self.incoming_message, "AA")
            return str(
                parse_message(ack, validation_level=VALIDATION_LEVEL.TOLERANT).to_mllp()
            )

    server = MLLPServer("127.0.0.1", 0, {"ADT^A01^ADT_A01": (Registry,)}, timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ack = send_message(
            *server.server_address[:2], build_feed("X1^^^&1.2.3&ISO", control_id="F-9")
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    assert msa(ack) == ("AA", "F-9")


@pytest.mark.parametrize(
    ("character_set", "codec"),
    [("8859/2", "iso8859-2"), ("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8")],
)
def test_msh_18_names_the_character_set_the_frame_is_read_in(
    character_set: str, codec: str
) -> None:
    """HL7 v2.5 Table 0211: MSH-18 says how the message's bytes read."""
    name = "ŁASKA^ŻANETA" if codec != "latin-1" else "MÜLLER^JÖRG"
    message = ADT_A01_V231.replace("MOORE^CHIP", name).replace(
        "|P|2.3.1\r", f"|P|2.3.1||||||{character_set}\r"
    )

    text, used = decode_payload(message.encode(codec))

    assert (text, used) == (message, codec)


def test_character_set_the_node_cannot_read_falls_back() -> None:
    """HL7 v2.5 Table 0211: an MSH-18 not read here falls back to UTF-8."""
    message = ADT_A01_V231.replace("|P|2.3.1\r", "|P|2.3.1||||||ISO IR87\r")

    assert decode_payload(message.encode()) == (message, "utf-8")


def test_msh_18_character_set_is_used_over_the_wire(
    registry: MllpServer, client: socket.socket, fed: list[PatientIdentity]
) -> None:
    """HL7 v2.5 Table 0211: an 8859/2 PID-5 reaches the Registry intact."""
    message = ADT_A01_V231.replace("MOORE^CHIP", "ŁASKA^ŻANETA").replace(
        "|P|2.3.1\r", "|P|2.3.1||||||8859/2\r"
    )
    client.sendall(frame(message, "iso8859-2"))

    assert msa(read_frames(client, 1)[0])[0] == "AA"
    assert fed[0].name == "ŁASKA^ŻANETA^^^^^L"


@pytest.mark.parametrize("line_end", [b"\r", b"\n"], ids=["cr", "lf"])
def test_a_header_cut_after_msh_is_answered_and_the_frames_after_it_served(
    registry: MllpServer,
    client: socket.socket,
    fed: list[PatientIdentity],
    line_end: bytes,
) -> None:
    """ITI TF-2x C.2.3: a frame whose MSH ends before its separators
    ("MSH" then a line end) still earns an ACK AR, and the connection goes
    on: the valid feed sent after it in the same write is answered AA."""
    client.sendall(VT + b"MSH" + line_end + b"XXXXXXX" + FS_CR + frame(ADT_A01_V231))

    first, second = read_frames(client, 2)

    assert msa(first)[0] == "AR"
    assert msa(second) == ("AA", "PIF-0001")
    assert len(fed) == 1


def test_connections_beyond_the_cap_are_closed_and_the_server_serves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection may hold an unfinished frame of up to MAX_FRAME_SIZE:
    no more than MAX_CONNECTIONS are served at once, so that peers opening
    connections cannot make the listener hold memory without bound. One
    more is closed at once; once one ends, a new one is served."""
    monkeypatch.setattr(mllp._TcpServer, "max_connections", 2)
    server = MllpServer("127.0.0.1", 0, lambda m: "ok:" + m, timeout=10.0)
    server.start()
    try:
        held = [socket.create_connection(server.address, timeout=5.0) for _ in range(2)]
        for sock in held:
            sock.sendall(VT + b"never finished")
        time.sleep(0.3)
        with socket.create_connection(server.address, timeout=5.0) as third:
            third.settimeout(5.0)
            assert third.recv(100) == b""
        held[0].close()
        time.sleep(0.3)
        answer = send_message(*server.address, "after", timeout=5.0)
        held[1].close()
    finally:
        server.stop()

    assert answer == "ok:after"


def test_a_connection_silent_from_the_start_is_closed_before_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender connects to send (HL7 v2.5 Implementation Guide C.4): a
    connection that sends nothing gives its place back after
    FIRST_BYTE_TIMEOUT, while one that has begun a frame has the whole
    timeout to finish it."""
    monkeypatch.setattr(mllp, "FIRST_BYTE_TIMEOUT", 0.3)
    server = MllpServer("127.0.0.1", 0, lambda m: m, timeout=30.0)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=10.0) as silent:
            with socket.create_connection(server.address, timeout=10.0) as slow:
                message = frame(ADT_A01_V231)
                slow.sendall(message[:10])
                # Past FIRST_BYTE_TIMEOUT: the silent one is closed...
                assert silent.recv(1024) == b""
                # ...the one that began its frame is not.
                slow.sendall(message[10:])
                answer = slow.recv(65536)
    finally:
        server.stop()

    assert answer.startswith(VT) and answer.endswith(FS_CR)

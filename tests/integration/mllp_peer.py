"""A raw MLLP peer run as its own process: writes chosen bytes, reads answers.

Run as ``python -m tests.integration.mllp_peer HOST PORT`` with a JSON plan
on standard input::

    {"writes": [{"hex": "0b4d5348...", "pause": 0.1}, ...],
     "answers": 2, "timeout": 5.0}

Each write goes out in its own ``sendall`` after its pause, so the bytes reach
the listener in the chunks the plan chooses. The peer then reads until it
holds ``answers`` frames, the listener closes, or ``timeout`` passes, and
prints ``{"frames": [...], "closed": bool, "seconds": float}`` as JSON: the
answer frames' payloads (Latin-1 text), whether the listener closed the
connection, and how long reading took. It uses no xdsi code, so that what
the listener answers is read by an independent implementation of the
framing (HL7 v2.5 Implementation Guide C.4).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"


def run(host: str, port: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Carry out ``plan`` against ``host``:``port``; return what came back."""
    timeout = float(plan.get("timeout", 5.0))
    received = b""
    closed = False
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for write in plan["writes"]:
            time.sleep(float(write.get("pause", 0.0)))
            try:
                sock.sendall(bytes.fromhex(write["hex"]))
            except OSError:
                closed = True
                break
        started = time.monotonic()
        deadline = started + timeout
        while received.count(END_BLOCK) < plan["answers"] and not closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            closed = not chunk
            received += chunk
        if not closed and plan.get("expect_close"):
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                closed = sock.recv(65536) == b""
            except TimeoutError:
                closed = False
            except OSError:
                closed = True
        seconds = time.monotonic() - started
    frames = [
        part.lstrip(b"\r\n").removeprefix(START_BLOCK).decode("latin-1")
        for part in received.split(END_BLOCK)
        if part.strip(b"\r\n")
    ]
    return {"frames": frames, "closed": closed, "seconds": seconds}


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    json.dump(run(host, port, json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()

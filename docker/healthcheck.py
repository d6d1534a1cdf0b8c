"""The image's HEALTHCHECK: healthy when the node listens on its ports.

Every port ``xdsi serve`` listens on under $XDSI_CONFIG (the registry's,
repository's, imaging source's, ITI-8's and the C-STORE SCP's, as enabled
and numbered there), or the port $XDSI_HEALTH_PORT alone when it is set,
must have a listening TCP socket in the container's network namespace.

The sockets are looked up in /proc/net/tcp and /proc/net/tcp6, not
connected to: with [tls] enabled, a connection closed before its handshake
is a refused peer, logged as a WARNING and recorded as a Security Alert
audit event (sent to every audit target) at each check.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The state of a listening socket in /proc/net/tcp (TCP_LISTEN).
LISTEN = "0A"


def listening() -> set[int]:
    """The ports of the listening TCP sockets of this network namespace."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wanted() -> list[tuple[str, int]]:
    """The ports the node listens on, each named by its setting."""
    port = os.environ.get("XDSI_HEALTH_PORT")
    if port:
        return [("XDSI_HEALTH_PORT", int(port))]
    from xdsi.config import load_settings

    return [(name, p) for name, p in load_settings().listening_ports() if p]


def main() -> int:
    try:
        ports = wanted()
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {exc}")
        return 1
    up = listening()
    down = [f"{name} {port}" for name, port in ports if port not in up]
    if down:
        print(f"not listening: {', '.join(down)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

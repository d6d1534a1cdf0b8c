"""Processes of this host, told apart across process id reuse.

A claim on a study (intake) or a spool file (blob stores) names the process
that made it by host name, process id and start time, so that what a
process killed on the way left can be taken back at once, and what a live
one holds is left alone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# The largest process id Linux hands out (PID_MAX_LIMIT, the most that
# /proc/sys/kernel/pid_max may be set to, proc(5)).
PID_MAX_LIMIT = 1 << 22


def started(pid: int) -> str:
    """A process's start time in clock ticks since boot (proc(5), stat field
    22), which tells a process id used again from the one named; "" where
    there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> tuple[str, int, str]:
    """This process: host name, process id and start time."""
    pid = os.getpid()
    return socket.gethostname(), pid, started(pid)


def gone(host: str, pid: str, since: str) -> bool | None:
    """Whether the process ``pid`` of ``host``, started at ``since``, is
    gone: True or False for a process of this host, None for one of
    another host or a process id that is none (no ASCII digits, 0, or
    beyond any pid_max, proc(5)), which cannot be told: such an id comes
    from a spool entry's name, which anything writing the spool folder
    chose. A process whose start time cannot be read counts as running."""
    # Limitation: two hosts (containers) of one host name sharing the
    # storage or database look like one; each takes the other's live
    # processes for gone.
    if host != socket.gethostname() or not _process_id(pid):
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        # A process of another user runs under this id.
        pass
    # A process id used again since: its start time tells, where it can be
    # read.
    running_since = started(int(pid))
    return bool(since and running_since) and running_since != since


def _process_id(pid: str) -> bool:
    """Whether ``pid`` can name a process: str.isdigit alone takes other
    scripts' digits, which int() refuses or reads as another number, and
    os.kill refuses (OverflowError) a number past a C int."""
    return pid.isascii() and pid.isdigit() and 0 < int(pid) <= PID_MAX_LIMIT

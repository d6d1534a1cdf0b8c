"""Audit delivery: spooled AuditMessages to every syslog target, in order.

Implements the sending side of ITI TF-2 3.20 (Record Audit Event) over
RFC 5425 (TLS) and RFC 5426 (UDP): each target has its own thread and its own
durable cursor into the spool (DESIGN.md principle 7), so a target that is
down delays only itself, and nothing spooled is lost while it is.
"""

import fcntl
import logging
import os
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from xdsi.audit.spool import SUFFIX, AuditSpool
from xdsi.audit.syslog import (
    AUTHPRIV_FACILITY,
    LOG_AUDIT_FACILITY,
    MAX_UDP_PAYLOAD,
    TargetDown,
    TlsSender,
    UdpSender,
    format_message,
)

logger = logging.getLogger(__name__)

SCHEMES = ("tls", "udp")

# Deliveries in a row after which a target that failed counts as back.
RECOVERED_AFTER = 2

_CURSOR_PREFIX = ".cursor-"
_NOT_NAME = re.compile(r"[^A-Za-z0-9.-]")


@dataclass(frozen=True)
class Target:
    """One syslog destination: ``tls://host:port`` or ``udp://host:port``."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "Target":
        """Return the target a URL names.

        Raises
        ------
        ValueError
            The scheme is not tls or udp, or the host or port is missing.
        """
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"audit target {url!r}: {exc}") from exc
        if parts.scheme not in SCHEMES or not parts.hostname or port is None:
            raise ValueError(
                f"audit target {url!r} is not tls://host:port (RFC 5425) or "
                "udp://host:port (RFC 5426)"
            )
        return cls(parts.scheme, parts.hostname, port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def cursor_name(self) -> str:
        return _CURSOR_PREFIX + _NOT_NAME.sub(
            "_", f"{self.scheme}-{self.host}-{self.port}"
        )


@dataclass(frozen=True)
class Backoff:
    """Retry delays: doubling from ``initial`` seconds up to ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2 ** max(0, failures - 1))


class _Cursor:
    """The name of the last spool file a target has taken, kept on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.name = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            self.name = ""

    def advance(self, name: str) -> None:
        """Record ``name`` as delivered; durable when this returns."""
        fd, temporary = tempfile.mkstemp(
            prefix=".", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "w", encoding="ascii") as stream:
                stream.write(name)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.name = name


# The file whose lock the one process delivering a spool holds, so that a
# command line client and a serving node on one storage never both send it.
DELIVERY_LOCK = ".delivery.lock"
# How often a command line client looks whether the delivery is free.
CLAIM_POLL = 0.1
# The file whose lock a serving node holds for as long as it delivers, so
# that a command line client on its storage leaves the delivery to it at
# once rather than wait for a lock the node never gives up.
SERVING_LOCK = ".serving.lock"
# How often a forwarder stopping looks whether what waited has gone.
DRAIN_POLL = 0.05


class _Worker(threading.Thread):
    """Delivers the spool to one target, oldest first, with backoff."""

    def __init__(
        self,
        forwarder: "AuditForwarder",
        target: Target,
        sender: TlsSender | UdpSender,
    ) -> None:
        super().__init__(daemon=True, name=f"xdsi-audit-{target.url}")
        self.forwarder = forwarder
        self.target = target
        self.sender = sender
        self.cursor = _Cursor(forwarder.spool.directory / target.cursor_name)
        self.failures = 0
        self.delivered_since_failure = 0

    def pending(self) -> list[str]:
        directory = self.forwarder.spool.directory
        if not directory.is_dir():
            return []
        # Limitation: the spool is listed whole on each pass; a spool of
        # millions of messages makes each pass slow, though never wrong.
        return sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.name.endswith(SUFFIX)
            and not entry.name.startswith(".")
            and entry.name > self.cursor.name
        )

    def _deliver(self, name: str) -> None:
        """Send one spool file and advance the cursor past it.

        Raises
        ------
        TargetDown
            The target is unreachable; the cursor stays where it was.
        """
        forwarder = self.forwarder
        xml = (forwarder.spool.directory / name).read_bytes()
        message = format_message(
            xml,
            app_name=forwarder.app_name,
            hostname=forwarder.hostname,
            facility=forwarder.facility,
        )
        try:
            self.sender.send(message)
        except ValueError:
            # RFC 5426 3.1: a message that does not fit one datagram cannot
            # go over UDP at all; it stays in the spool and goes to the other
            # targets, and this one moves on rather than stall for good.
            logger.warning(
                "audit message %s (%d bytes) skipped for %s: larger than one datagram",
                name,
                len(message),
                self.target.url,
            )
        # Limitation: syslog has no acknowledgement (RFC 5425 4.4, RFC 5426),
        # so a message counts as delivered once the kernel has taken it. When
        # the receiver resets the session (it closed with bytes unread), the
        # sender writes its last message again; more than one message unread
        # at that moment, or messages a receiver read and then dropped while
        # stopping, are lost. A crash between the write and the cursor update
        # sends that one message twice after restart. UDP gives no sign of
        # loss at all.
        self.cursor.advance(name)

    def deliver_all(self, until: float) -> None:
        """Deliver what waits, in this thread, until done or ``until``
        (time.monotonic); stop at the first failure."""
        try:
            for name in self.pending():
                if time.monotonic() > until:
                    return
                self._deliver(name)
        except TargetDown as exc:
            self._failed(exc)
        finally:
            self.sender.close()

    def run(self) -> None:
        stop = self.forwarder.stopping
        while not stop.is_set():
            if not self.forwarder.claim():
                # Another process delivers this spool (a serving node).
                stop.wait(self.forwarder.poll_interval)
                continue
            try:
                pending = self.pending()
                for name in pending:
                    if stop.is_set():
                        break
                    self._deliver(name)
                    self._recovered()
            except TargetDown as exc:
                self._failed(exc)
                stop.wait(self.forwarder.backoff.delay(self.failures))
                continue
            except Exception:
                logger.exception("audit delivery to %s failed", self.target.url)
                stop.wait(self.forwarder.backoff.maximum)
                continue
            if not pending:
                self.forwarder.wake.wait(self.forwarder.poll_interval)
                self.forwarder.wake.clear()
        self.sender.close()

    def _failed(self, exc: TargetDown) -> None:
        self.failures += 1
        self.delivered_since_failure = 0
        delay = self.forwarder.backoff.delay(self.failures)
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        logger.log(
            level,
            "audit target %s down (%s); retrying in %.1f s",
            self.target.url,
            exc.__cause__ or exc,
            delay,
        )

    def _recovered(self) -> None:
        # One delivery is no sign of a target being back: over UDP to a port
        # nobody listens on, every other send fails (the ICMP Port
        # Unreachable of one send refuses the next, RFC 1122 4.1.3.3), and
        # the target would be logged back and down again all day.
        self.delivered_since_failure += 1
        if self.failures and self.delivered_since_failure >= RECOVERED_AFTER:
            logger.warning(
                "audit target %s is back after %d failed attempts",
                self.target.url,
                self.failures,
            )
            self.failures = 0


class AuditForwarder:
    """Sends what the spool holds to each target, in background threads.

    Request handling only writes the spool (:class:`~xdsi.audit.Auditor`);
    these threads read it, so a target that is down never blocks a
    transaction. Each target's cursor is advanced only after its write has
    returned, so a restart resumes where delivery stopped.

    Parameters
    ----------
    targets
        URLs, ``tls://host:port`` (RFC 5425) or ``udp://host:port``
        (RFC 5426).
    tls_context
        The client context for TLS targets, holding this node's certificate
        and the trusted ones (ITI TF-2 3.19); required if any target is TLS.
    """

    def __init__(
        self,
        spool: AuditSpool,
        targets: list[str] | tuple[str, ...],
        *,
        app_name: str,
        hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        facility: int = AUTHPRIV_FACILITY,
        backoff: Backoff = Backoff(),
        poll_interval: float = 0.5,
        udp_max_payload: int = MAX_UDP_PAYLOAD,
    ) -> None:
        if facility not in (AUTHPRIV_FACILITY, LOG_AUDIT_FACILITY):
            raise ValueError(
                f"syslog facility {facility}; ITI TF-2 3.20.6.1 allows "
                f"{AUTHPRIV_FACILITY} or {LOG_AUDIT_FACILITY}"
            )
        self.spool = spool
        self.app_name = app_name
        self.hostname = hostname
        self.facility = facility
        self.backoff = backoff
        self.poll_interval = poll_interval
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._claim_lock = threading.Lock()
        self._claimed: int | None = None
        self._serving: int | None = None
        self._workers = []
        for url in targets:
            target = Target.parse(url)
            sender: TlsSender | UdpSender
            if target.scheme == "tls":
                if tls_context is None:
                    raise ValueError(
                        f"audit target {target.url} needs a TLS context (RFC 5425)"
                    )
                sender = TlsSender(target.host, target.port, tls_context)
            else:
                sender = UdpSender(target.host, target.port, udp_max_payload)
            self._workers.append(_Worker(self, target, sender))

    def start(self) -> None:
        """Start one delivery thread per target, for as long as this
        process serves (until :meth:`stop`)."""
        self.spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._claim_lock:
            if self._serving is None:
                # Held by another node serving the same storage, it is
                # that node's to deliver; its lock does for both.
                self._serving = self._lock_file(SERVING_LOCK)
        for worker in self._workers:
            worker.start()
        logger.info(
            "audit delivery started to %s",
            ", ".join(w.target.url for w in self._workers) or "no target",
        )

    def claim(self) -> bool:
        """Take the spool's delivery for this process, or tell it is
        another's; once taken, it is held until :meth:`stop`."""
        with self._claim_lock:
            if self._claimed is not None:
                return True
            self._claimed = self._lock_file(DELIVERY_LOCK)
            return self._claimed is not None

    def _release(self) -> None:
        with self._claim_lock:
            if self._claimed is not None:
                os.close(self._claimed)
                self._claimed = None
            if self._serving is not None:
                os.close(self._serving)
                self._serving = None

    def _lock_file(self, name: str) -> int | None:
        """An open descriptor of ``name`` in the spool, locked exclusively;
        None when another process holds the lock."""
        self.spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.spool.directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _served_elsewhere(self) -> bool:
        """Whether a node serving this storage delivers its spool."""
        fd = self._lock_file(SERVING_LOCK)
        if fd is None:
            return True
        os.close(fd)
        return False

    def deliver_pending(self, within: float) -> dict[str, int] | None:
        """Deliver what the spool holds now, in this thread, for ``within``
        seconds at most; return what still waits, per target URL. None when
        another process delivers the spool (a serving node), which then
        sends it.

        For a command line client, whose events would otherwise wait for a
        node serving its storage (ITI TF-2 3.20: audit messages are sent
        as events occur).
        """
        if self._served_elsewhere():
            return None
        until = time.monotonic() + within
        # Another client's pass ends within its own allowance.
        while not self.claim():
            if time.monotonic() > until:
                return None
            time.sleep(CLAIM_POLL)
        try:
            # Each target in a thread of its own, so that one that is down
            # or slow holds up no other.
            threads = [
                threading.Thread(target=worker.deliver_all, args=(until,), daemon=True)
                for worker in self._workers
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(0.0, until - time.monotonic()))
            return self.backlog()
        finally:
            self._release()

    def notify(self) -> None:
        """Say that the spool has grown, so delivery need not wait to poll."""
        self.wake.set()

    def stop(self, timeout: float = 10.0, drain: float = 0.0) -> None:
        """Stop delivering; what is not sent yet stays in the spool.

        With ``drain``, what waits is first given up to that many seconds to
        go to each target that is up (not failing), so that the last events
        of a node stopping (its Application Stop, DICOM PS3.15 A.5.3.1) reach
        the repository now, not when it next starts (ITI TF-2 3.20: messages
        are sent as events occur). A target down, or a spool delivered by
        another process, is not waited for. Then the delivery threads are
        given ``timeout`` seconds, all of them together, to end.
        """
        self._drain(drain)
        self.stopping.set()
        self.wake.set()
        # One allowance for all workers, not one each: each stops at once
        # but for the send it is in, and those run side by side.
        until = time.monotonic() + timeout
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, until - time.monotonic()))
        self._release()

    def _drain(self, within: float) -> None:
        until = time.monotonic() + within
        self.wake.set()
        while time.monotonic() < until:
            with self._claim_lock:
                delivering = self._claimed is not None
            waiting = [
                worker
                for worker in self._workers
                if worker.is_alive() and not worker.failures and worker.pending()
            ]
            if not delivering or not waiting:
                return
            time.sleep(DRAIN_POLL)

    def backlog(self) -> dict[str, int]:
        """Return, per target URL, how many spooled messages wait."""
        return {w.target.url: len(w.pending()) for w in self._workers}

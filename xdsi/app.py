"""Compose the enabled actors into one running node.

Each HTTP actor is its own WSGI app on its own port, and the Document
Repository reaches the Document Registry only through ITI-42 over HTTP
(DESIGN.md principle 1). Ports may be 0: the node binds first, then builds
every actor with the effective endpoint URLs. With ``[node] workers`` above
1, further processes serve the same listening sockets, each with its own
actors over the shared database and storage; the node restarts a worker
that dies. With [tls] enabled every listener, HTTP and MLLP, authenticates
its peers by mutual TLS (ITI TF-2 3.19) and audits those it refuses.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import Message
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, BinaryIO

from flask import Flask
from sqlalchemy import Engine
from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer, WSGIRequestHandler

from xdsi import audit, tls, wire
from xdsi.actors.consumer import Consumer
from xdsi.actors.imaging_source import ImagingSource
from xdsi.actors.intake import AutoPublisher, Intake
from xdsi.actors.registry import Registry
from xdsi.actors.repository import Repository
from xdsi.actors.soap_endpoint import BODY_PACE_KEY, SENDFILE_KEY
from xdsi.actors.store_scp import StoreScp
from xdsi.actors.stow import add_stow_route
from xdsi.audit.forwarder import AuditForwarder, Backoff
from xdsi.config import ConfigError, Settings
from xdsi.connections import BoundedConnections
from xdsi.dicom import transcode
from xdsi.hl7.mllp import MllpServer
from xdsi.logs import PeerRefusalLog, guard_peer_text, quiet_pydicom
from xdsi.ns import SOAP12
from xdsi.store.blobs import Blobs, BlobStore, open_spool
from xdsi.store.schema import make_engine

logger = logging.getLogger(__name__)

HTTP_ACTORS = ("registry", "repository", "imaging_source")
# Connections one HTTP listener serves at once (a thread each).
MAX_CONNECTIONS = 256
# The repository's pending documents are settled this often, in seconds.
SWEEP_EVERY = 60.0
# The storage folder, made by the node: its owner's alone.
STORAGE_MODE = 0o700
# What asks a worker process to stop: SIGTERM from the node, SIGINT (Ctrl-C)
# and SIGHUP (its terminal closed), which reach every process of the group.
WORKER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Those held back while a worker starts, until it takes them: a Ctrl-C then
# interrupts no import half done. SIGTERM is not held back, so that a worker
# the node stops while it starts ends at once, as quietly.
HELD_WHILE_STARTING = {signal.SIGINT, signal.SIGHUP}
# How often, in seconds, a worker also checks that its parent is the node's
# process still.
PARENT_CHECK_EVERY = 1.0
# The longest a stopping node waits for its last audit events to reach the
# targets that are up.
AUDIT_DRAIN_SECONDS = 5.0


# The longest a peer may take over a request line and its headers, however
# steadily they trickle in (each read alone waits up to a minute).
HEAD_DEADLINE = 30.0
# The pace a request body must keep, from its first read to its last: each
# byte read buys 1/BODY_MIN_RATE seconds, and at most BODY_SLACK seconds can
# be banked. A body must thus come at BODY_MIN_RATE bytes a second on
# average and may pause for BODY_SLACK seconds, no longer. A 4 GiB body over
# a 2 MB/s link, 250 times that pace, never comes near the rule, while a peer
# that means only to hold a connection must keep sending to do so.
# Limitation: a peer that keeps the pace holds its connection until its body
# ends ([node] max_request_size), and the node's own pauses between reads (a
# slow spool disk) count against the peer.
BODY_MIN_RATE = 8 * 1024
BODY_SLACK = 30.0
# The most bytes of a body read at once, so that a slow but steady body earns
# its time while it comes: at BODY_MIN_RATE a step takes 8 s of BODY_SLACK.
BODY_STEP = 64 * 1024
# Once an answer is sent, werkzeug reads and drops what the peer still
# sends of its request (so that a peer whose body was refused, a 413, reads
# the answer rather than a reset), each read waiting up to a minute; the
# connection is shut down this many seconds after the answer, whatever
# is left.
DRAIN_DEADLINE = 10.0
# The environ key of the function that starts that deadline.
ANSWERED_KEY = "xdsi.answered"


class _Watch:
    """Shut down the connections whose peer is overdue: with its request
    head, which has a fixed deadline, or with its body, whose deadline each
    byte read pushes back (:class:`_BodyPace`).

    One thread for every listener of the process, woken each second, rather
    than a timer per request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[socket.socket, float] = {}
        self._bodies: dict[socket.socket, _BodyPace] = {}
        self._thread: threading.Thread | None = None

    def watch(
        self, connection: socket.socket, seconds: float, body: _BodyPace | None = None
    ) -> None:
        """Shut ``connection`` down in ``seconds`` unless released first;
        ``body`` is told if it is."""
        with self._lock:
            self._due[connection] = time.monotonic() + seconds
            if body is not None:
                self._bodies[connection] = body
            else:
                self._bodies.pop(connection, None)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="xdsi-http-watch", daemon=True
                )
                self._thread.start()

    def extend(self, connection: socket.socket, seconds: float, most: float) -> None:
        """Push a watched connection's deadline back by ``seconds``, to at
        most ``most`` seconds from now."""
        with self._lock:
            due = self._due.get(connection)
            if due is not None:
                self._due[connection] = min(due + seconds, time.monotonic() + most)

    def release(self, connection: socket.socket) -> None:
        with self._lock:
            self._due.pop(connection, None)
            self._bodies.pop(connection, None)

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                late = [c for c, due in self._due.items() if due <= now]
                bodies = [self._bodies.pop(c, None) for c in late]
                for connection in late:
                    del self._due[connection]
            for connection, body in zip(late, bodies, strict=True):
                if body is not None:
                    body.overdue()
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCH = _Watch()


class _BodyPace:
    """The pace rule of one request's body (soap_endpoint.BodyPace): armed
    when the body's first read begins, told of each step read, released at
    its end, so that the node's own time to answer is not limited."""

    def __init__(self, connection: socket.socket, peer: str, listener: str) -> None:
        self.step = BODY_STEP
        self.cut_off = False
        self._connection = connection
        self._peer = peer
        self._listener = listener
        self._rate = BODY_MIN_RATE
        self._slack = BODY_SLACK
        self._received = 0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        _WATCH.watch(self._connection, self._slack, self)

    def arrived(self, count: int) -> None:
        self._received += count
        _WATCH.extend(self._connection, count / self._rate, self._slack)

    def done(self) -> None:
        _WATCH.release(self._connection)

    def overdue(self) -> None:
        """Called by the watch as it shuts the connection down."""
        self.cut_off = True
        logger.warning(
            "%s: the request body from %s fell behind the minimum pace (%d bytes "
            "a second, pauses up to %.0f s) after %d bytes in %.0f s; connection "
            "closed, request dropped",
            self._listener,
            self._peer,
            self._rate,
            self._slack,
            self._received,
            time.monotonic() - self._started,
        )


class _RequestHandler(PeerRefusalLog, WSGIRequestHandler):
    """Close a connection whose peer stops sending for a minute, takes more
    than HEAD_DEADLINE seconds over a request's line and headers, or lets
    its body fall behind BODY_MIN_RATE (the _BodyPace that the app's
    soap_endpoint.RequestBody keeps to); answer a request the HTTP layer
    refuses (a garbled request line, an oversized header or URI) with a SOAP
    1.2 Fault, never an HTML page, and log it at INFO as the peer's doing.

    SOAP 1.2 Part 2 7.5.1.2: env:Sender for what the peer sent wrong.
    """

    timeout = 60

    def handle_one_request(self) -> None:
        _WATCH.watch(self.connection, HEAD_DEADLINE)
        try:
            super().handle_one_request()
        finally:
            _WATCH.release(self.connection)

    def parse_request(self) -> bool:
        try:
            parsed = super().parse_request()
        finally:
            # The head is in: the body keeps its own pace, from its first
            # read, and the answer takes its own time.
            _WATCH.release(self.connection)
        problem = _framing_problem(self.headers) if parsed else None
        if problem is not None:
            self.send_error(400, "Bad request framing", problem)
            return False
        if parsed and self.request_version == "HTTP/1.0":
            # An HTTP/1.0 peer knows no chunked transfer coding (RFC 9112
            # 6.1): an answer of no known length (a streamed WADO-RS
            # metadata array) is sent as it comes, ended by closing the
            # connection (RFC 9112 6.3), which werkzeug does for an
            # HTTP/1.0 answer. The handler serves this one connection.
            self.protocol_version = "HTTP/1.0"
            # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0
            # request is ignored (no 1xx goes to an HTTP/1.0 peer).
            del self.headers["Expect"]
        return parsed

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        """A SOAP Fault, or plain text for a DICOMweb path: a DICOMweb user
        agent gets the HTTP status and why, as the service itself answers
        it, even when the HTTP layer refuses the request before it is
        routed (an oversized header, too many header fields)."""
        path = getattr(self, "path", "") or ""
        if not path:
            # A request line too long to parse (414) has its target read
            # from the bytes that came.
            raw = getattr(self, "raw_requestline", b"") or b""
            words = raw[:4096].split(b" ", 2)
            path = words[1].decode("latin-1") if len(words) > 1 else ""
        path = path.split("?", 1)[0]
        plain = getattr(self.server, "plain_text_paths", ())
        if any(path == p or path.startswith(p + "/") for p in plain):
            self.error_content_type = "text/plain; charset=utf-8"
            self.error_message_format = "%(code)d %(message)s: %(explain)s\n"
        super().send_error(code, message, explain)

    def handle_expect_100(self) -> bool:
        """Send nothing yet: werkzeug answers Expect: 100-continue itself
        as the request reaches the application, and one 100 (Continue) is
        enough (RFC 9110 15.2.1)."""
        return True

    # A request line too garbled to name its HTTP version is answered as
    # HTTP/1.1, status line and headers included, not as HTTP/0.9 (body
    # alone, RFC 1945 4.1); no SOAP peer speaks HTTP/0.9.
    default_request_version = "HTTP/1.1"
    error_content_type = "application/soap+xml; charset=UTF-8"
    # BaseHTTPRequestHandler.send_error fills in the code and the escaped
    # message and explanation.
    error_message_format = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<env:Envelope xmlns:env="{SOAP12}"><env:Body><env:Fault>'
        "<env:Code><env:Value>env:Sender</env:Value></env:Code>"
        '<env:Reason><env:Text xml:lang="en">HTTP %(code)d: %(message)s. '
        "%(explain)s</env:Text></env:Reason></env:Fault></env:Body></env:Envelope>"
    )

    def make_environ(self) -> dict[str, Any]:
        """werkzeug's environ, plus the body's pace rule and a sendfile for
        answers over plain TCP.

        Over TLS the bytes must pass through the SSL layer, so there is no
        sendfile (socket.sendfile would fall back to 8 KiB sends).
        """
        environ = super().make_environ()
        host, port = self.server.server_address[:2]
        environ[BODY_PACE_KEY] = _BodyPace(
            self.connection, self.address_string(), f"{host}:{port}"
        )
        environ[ANSWERED_KEY] = self._answered
        if not isinstance(self.connection, ssl.SSLSocket):
            environ[SENDFILE_KEY] = self._sendfile
        return environ

    def _answered(self) -> None:
        """The answer is out: what the peer still sends is read and dropped
        for DRAIN_DEADLINE seconds at most."""
        _WATCH.watch(self.connection, DRAIN_DEADLINE)

    def _sendfile(self, file: BinaryIO, count: int) -> int:
        """Send ``count`` bytes of ``file`` from its position (os.sendfile)."""
        self.wfile.flush()
        return self.connection.sendfile(file, file.tell(), count)


def _framing_problem(headers: Message) -> str | None:
    """Why a request head cannot be trusted to say where its body ends, if
    it cannot: a peer and this node must never read one request two ways
    (RFC 9112 11.2, request smuggling)."""
    if any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in headers.defects):
        # The email parser stops at a field line with no colon and takes
        # the lines after it for body: a Content-Length there is not seen.
        # (Its other defects are of a MIME body, which a head has none of.)
        return "a header field line is malformed (RFC 9112 5.1)"
    lengths = {value.strip() for value in headers.get_all("Content-Length", [])}
    if len(lengths) > 1:
        return "the Content-Length fields disagree (RFC 9112 6.3)"
    if any(not (v.isascii() and v.isdigit()) for v in lengths):
        return "Content-Length is not a number (RFC 9112 6.3)"
    if lengths and headers.get("Transfer-Encoding") is not None:
        return "both Transfer-Encoding and Content-Length (RFC 9112 6.1)"
    return None


def _plain_text_paths(settings: Settings, actor: str) -> tuple[str, ...]:
    """The paths on an actor's port whose HTTP-layer errors are plain text:
    the DICOMweb services of the Imaging Document Source."""
    if actor != "imaging_source":
        return ()
    cfg = settings.imaging_source
    return tuple(
        path.rstrip("/") for path in (cfg.dicomweb_path, cfg.wado_path, cfg.stow_path)
    )


class _HttpServer(BoundedConnections, tls.TlsServerMixin, ThreadedWSGIServer):
    """werkzeug's threaded server; each connection passes the TLS gate, if set.

    At most ``max_connections`` are served at once, a thread each; one more
    is answered at once with 503 and a SOAP Receiver Fault (over TLS, whose
    handshake happens in the connection's thread, it is closed), so that
    peers that never finish a request cannot pile up threads without bound.
    """

    max_connections = MAX_CONNECTIONS
    listener_name = "HTTP"
    # Paths whose HTTP-layer errors are plain text, not SOAP Faults.
    plain_text_paths: tuple[str, ...] = ()

    def server_bind(self) -> None:
        """Bind, or raise ConfigError: werkzeug would print advice of its
        own (a command line option this node does not have) and exit."""
        try:
            super().server_bind()
        except OSError as exc:
            host, port = self.server_address[:2]
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop "
                "what holds the port or set another in the configuration"
            ) from None

    def refuse_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            if self.tls_gate is None:
                fault = wire.fault_envelope(
                    wire.ReceiverFault(
                        "the node is serving as many connections as it takes; "
                        "retry later"
                    )
                )
                request.settimeout(1.0)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\n"
                    b"Content-Type: application/soap+xml; charset=UTF-8\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(fault), fault)
                )
        except OSError:
            pass
        finally:
            self.shutdown_request(request)


class _Deferred:
    """A WSGI app whose target is set after the socket is bound."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: dict, start_response: Any) -> Any:
        answer = self.app(environ, start_response)
        answered = environ.get(ANSWERED_KEY)
        return answer if answered is None else _ThenAnswered(answer, answered)


class _ThenAnswered:
    """A WSGI answer that calls ``answered`` once its last piece is out
    (PEP 3333: close() is still the answer's own)."""

    def __init__(self, answer: Iterable[bytes], answered: Callable[[], None]) -> None:
        self._answer = answer
        self._answered = answered

    def __iter__(self) -> Iterator[bytes]:
        yield from self._answer
        self._answered()

    def close(self) -> None:
        close = getattr(self._answer, "close", None)
        if close is not None:
            close()


@dataclass
class Services:
    """The actors of one node over one database and storage directory."""

    settings: Settings
    engine: Engine
    registry: Registry
    repository: Repository
    imaging_source: ImagingSource
    consumer: Consumer
    audit_spool: audit.AuditSpool
    auditor: audit.Auditor
    intake: Intake


def repository_blobs(settings: Settings) -> Blobs:
    """The Document Repository's blob store: the local directory or S3."""
    storage = settings.storage / "repository"
    cfg = settings.repository
    if cfg.blob_store == "local":
        return BlobStore(storage)
    # boto3 is imported only by nodes that keep documents in S3.
    from xdsi.store.s3 import S3BlobStore

    return S3BlobStore(
        endpoint_url=cfg.s3_endpoint_url,
        bucket=cfg.s3_bucket,
        region=cfg.s3_region,
        access_key_id=cfg.s3_access_key_id,
        secret_access_key=cfg.s3_secret_access_key,
        spool=storage / ".spool",
    )


def _registry(settings: Settings, engine: Engine, auditor: audit.Auditor) -> Registry:
    try:
        return Registry(settings, engine, auditor)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def node_auditor(settings: Settings) -> audit.Auditor:
    """The node's Auditor over its audit spool, ``storage/audit``."""
    return audit.Auditor(
        audit.AuditSpool(settings.storage / "audit"),
        audit_source_id=settings.node.audit_source_id,
        enterprise_site_id=settings.node.enterprise_site_id,
    )


def _warn_if_open(storage: Path) -> None:
    """Say so when other users of the host may read the storage folder,
    which holds patient data (images, documents, the database)."""
    try:
        mode = storage.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        logger.warning(
            "[node] storage_dir %s can be read by other users of this host "
            "(mode %03o); it holds patient data: chmod 700 it",
            storage,
            mode,
        )


def make_storage(settings: Settings) -> Path:
    """The node's storage folder, made if need be: it holds patient data,
    so it is for this user alone (os.umask may only narrow this further)."""
    storage = settings.storage
    if not storage.exists():
        storage.mkdir(parents=True, mode=STORAGE_MODE)
    return storage


def node_consumer(settings: Settings, auditor: audit.Auditor) -> Consumer:
    """The node's Imaging Document Consumer, spooling under the storage."""
    spool = open_spool(settings.storage / "spool" / "consumer", "consumer")
    return Consumer(settings, auditor, spool)


def build_services(settings: Settings) -> Services:
    """Build every actor over the node's storage, without starting servers."""
    storage = make_storage(settings)
    engine = make_engine(settings.database_url)
    auditor = node_auditor(settings)
    spool = auditor.spool
    imaging_source = ImagingSource(
        settings, engine, BlobStore(storage / "imaging-source"), auditor
    )
    return Services(
        settings=settings,
        engine=engine,
        registry=_registry(settings, engine, auditor),
        repository=Repository(settings, engine, repository_blobs(settings), auditor),
        imaging_source=imaging_source,
        consumer=node_consumer(settings, auditor),
        audit_spool=spool,
        auditor=auditor,
        intake=Intake(imaging_source),
    )


def _tls_gate(
    settings: Settings, context: ssl.SSLContext, listener: str
) -> tls.TlsGate:
    """A TLS gate for one listener that audits each peer it refuses."""
    auditor = node_auditor(settings)
    return tls.TlsGate(
        context,
        listener,
        lambda refused: tls.audit_refusal(auditor, settings.node.advertised, refused),
        timeout=settings.tls.handshake_timeout,
    )


def _actor_app(settings: Settings, services: Services, actor: str) -> Flask:
    """The WSGI app of one HTTP actor; the imaging source's takes STOW-RS too.

    No request body larger than [node] max_request_size is read.
    """
    app = getattr(services, actor).app(settings.storage / "spool" / actor)
    app.config["MAX_CONTENT_LENGTH"] = settings.node.max_request_size
    if actor == "imaging_source":
        add_stow_route(
            app,
            services.intake,
            settings.imaging_source.stow_path,
            settings.storage / "imaging-source" / ".spool",
        )
    return app


def _serve(servers: list[BaseWSGIServer]) -> list[threading.Thread]:
    threads = []
    for server in servers:
        # Worker processes share each listening socket: when another process
        # takes the connection that woke this one, accept() must fail at
        # once rather than block this server (and its shutdown) for good.
        server.socket.setblocking(False)
        thread = threading.Thread(
            target=server.serve_forever,
            # A short poll interval makes stopping quick.
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"xdsi-http-{server.socket.getsockname()[1]}",
        )
        thread.start()
        threads.append(thread)
    return threads


def _watch_parent(stop: threading.Event) -> None:
    """Set ``stop`` once the node's process that started this worker ends,
    however it ends, SIGKILL included.

    A worker left alone would go on answering HTTP with no ITI-8 feed,
    C-STORE, publishing or audit delivery behind it, and hold the ports a
    new node needs. The parent holds the write end of a pipe whose read end
    is this process's sentinel (multiprocessing.parent_process()): the kernel
    closes it when the parent dies, so the read end sees end of file at
    once. Should a fork of the parent have inherited that end too, the
    parent process id that changes when this process is orphaned still
    tells, within PARENT_CHECK_EVERY. (Linux's PR_SET_PDEATHSIG would not
    do: it fires when the thread that spawned the worker ends, and the
    supervisor's thread, or any thread that started the node, may end
    before the node's process.)
    """
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    sentinel = parent.sentinel if parent is not None else None

    def watch() -> None:
        while os.getppid() == parent_pid:
            if sentinel is None:
                time.sleep(PARENT_CHECK_EVERY)
            elif multiprocessing.connection.wait([sentinel], PARENT_CHECK_EVERY):
                break
        logger.warning(
            "the node's process %s ended; HTTP worker process %s stops",
            parent_pid,
            os.getpid(),
        )
        stop.set()

    threading.Thread(target=watch, daemon=True, name="xdsi-parent").start()


def _worker(settings: Settings, sockets: dict[str, socket.socket], level: int) -> None:
    """Serve the HTTP actors on sockets bound by the node, until SIGTERM,
    SIGINT or SIGHUP, or until the node's process ends."""
    stop = threading.Event()
    for signum in WORKER_STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    # The node spawned this process with these held back (Node._spawn); one
    # that came meanwhile is taken now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_WHILE_STARTING)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("xdsi").setLevel(level)
    logging.getLogger("werkzeug").setLevel(max(level, logging.WARNING))
    quiet_pydicom(level)
    guard_peer_text()
    _watch_parent(stop)
    if stop.is_set():
        return
    transcode.share_cores(settings.node.workers)
    services = build_services(settings)
    context = tls.server_context(settings.tls) if settings.tls.enabled else None
    servers = []
    for actor, listening in sockets.items():
        server = _HttpServer(
            settings.node.host,
            listening.getsockname()[1],
            _actor_app(settings, services, actor),
            _RequestHandler,
            fd=listening.fileno(),
        )
        server.plain_text_paths = _plain_text_paths(settings, actor)
        if context is not None:
            server.ssl_context = context
            server.tls_gate = _tls_gate(settings, context, settings.url(actor))
        servers.append(server)
    threads = _serve(servers)
    stop.wait()
    for server in servers:
        server.shutdown()
    for thread in threads:
        thread.join(timeout=5)
    services.engine.dispose()


def audit_forwarder(
    settings: Settings,
    spool: audit.AuditSpool,
    tls_context: ssl.SSLContext | None = None,
) -> AuditForwarder:
    """Return the delivery of ``spool`` to the ``[audit] targets`` (ITI-20).

    ``tls_context`` is the client context of TLS targets; without one, the
    node's own ``[tls]`` client context when TLS is on (ITI TF-2 3.19), else
    the system's default context.
    """
    if tls_context is None and any(
        t.startswith("tls:") for t in settings.audit.targets
    ):
        tls_context = tls.client_context_for(settings)
    if tls_context is None and any(
        t.startswith("tls:") for t in settings.audit.targets
    ):
        # Limitation: without [tls], the default context authenticates the
        # target's server certificate against the system's trust store and
        # presents no client certificate, so an ARR that demands mutual TLS
        # (ITI TF-2 3.19) refuses the node.
        logger.warning(
            "[audit] targets name tls:// but [tls] is not enabled: this node "
            "presents no certificate, and trusts the system's CAs only"
        )
        tls_context = ssl.create_default_context()
    return AuditForwarder(
        spool,
        settings.audit.targets,
        app_name=settings.node.audit_source_id,
        hostname=settings.node.host,
        tls_context=tls_context,
        facility=settings.audit.facility,
        backoff=Backoff(settings.audit.retry_initial, settings.audit.retry_max),
        udp_max_payload=settings.audit.udp_max_payload,
    )


def _storage_directory(settings: Settings) -> None:
    """Create ``[node] storage_dir`` if need be, or raise ConfigError saying
    why the node cannot keep its data there."""
    storage = settings.storage
    try:
        if not storage.is_dir():
            # It holds patient data: for this user alone.
            storage.mkdir(parents=True, mode=STORAGE_MODE)
    except OSError as exc:
        raise ConfigError(
            f"[node] storage_dir: cannot keep the node's data in {storage} "
            f"({exc.strerror or exc}: {exc.filename or storage}); set it to a "
            "directory this node may write, or to a path where one can be made"
        ) from None


def _cannot_listen(setting: str, host: str, port: int, exc: OSError) -> ConfigError:
    """The error of a listener that cannot bind, naming its setting."""
    return ConfigError(
        f"{setting}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
        "stop what holds the port or set another in the configuration"
    )


def _application_activity(settings: Settings, transaction: str) -> audit.AuditEvent:
    """DICOM PS3.15 A.5.3.1: this node started or stopped."""
    return audit.AuditEvent(
        transaction=transaction,
        actor="Secure Node",
        outcome=audit.Outcome.SUCCESS,
        source=audit.Endpoint(settings.node.audit_source_id, settings.node.advertised),
    )


class Node:
    """A running node: HTTP servers per actor and the ITI-8 MLLP listener.

    Audits its Application Start and Stop, and delivers the audit spool to
    the ``[audit] targets`` with ``audit_tls_context`` for TLS targets.
    """

    def __init__(
        self, settings: Settings, *, audit_tls_context: ssl.SSLContext | None = None
    ) -> None:
        self.requested = settings
        self.settings = settings
        self.audit_tls_context = audit_tls_context
        self.forwarder: AuditForwarder | None = None
        self.services: Services | None = None
        self._servers: list[BaseWSGIServer] = []
        self._threads: list[threading.Thread] = []
        self._mllp: MllpServer | None = None
        self._sockets: dict[str, socket.socket] = {}
        self._workers: list[BaseProcess] = []
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._store_scp: StoreScp | None = None
        self._auto_publisher: AutoPublisher | None = None
        # Whether the HTTP listeners' threads serve, so that shutdown() has
        # a loop to stop.
        self._serving = False

    def start(self) -> Settings:
        """Bind, build the actors, serve; return the effective settings.

        Raises
        ------
        ConfigError
            A setting the node cannot start with (a port another program
            holds, a storage directory that is a file); it is named, and
            whatever was bound or started before is closed again.
        """
        try:
            return self._start()
        except BaseException:
            self._abandon()
            raise

    def _start(self) -> Settings:
        settings = self.requested
        self._stopping.clear()
        _storage_directory(settings)
        context = tls.server_context(settings.tls) if settings.tls.enabled else None
        deferred: dict[str, _Deferred] = {}
        for actor in HTTP_ACTORS:
            section = getattr(settings, actor)
            if not section.enabled:
                continue
            deferred[actor] = _Deferred()
            try:
                server = _HttpServer(
                    settings.node.host, section.port, deferred[actor], _RequestHandler
                )
            except ConfigError as exc:
                raise ConfigError(f"[{actor}] port: {exc}") from None
            server.plain_text_paths = _plain_text_paths(settings, actor)
            self._servers.append(server)
            self._sockets[actor] = server.socket
            settings = settings.with_ports(**{actor: server.server_port})
            if context is not None:
                server.ssl_context = context
                server.tls_gate = _tls_gate(settings, context, settings.url(actor))

        # The listener is bound before the actors exist, so that its port is
        # known, and serves once the registry is there (its database
        # checked); a peer connecting meanwhile waits in the backlog.
        registry: list[Registry] = []
        if settings.registry.enabled:
            gate = None if context is None else _tls_gate(settings, context, "")
            try:
                self._mllp = MllpServer(
                    settings.node.host,
                    settings.registry.feed_port,
                    lambda text: registry[0].feed(text),
                    tls_gate=gate,
                    timeout=settings.registry.feed_timeout,
                )
            except OSError as exc:
                raise _cannot_listen(
                    "[registry] feed_port",
                    settings.node.host,
                    settings.registry.feed_port,
                    exc,
                ) from None
            settings = settings.with_ports(feed=self._mllp.address[1])
            if gate is not None:
                # The listener is named once its port is known.
                gate.listener = f"mllps://{settings.node.host}:{self._mllp.address[1]}"
        services = build_services(settings)
        self.services = services
        registry.append(services.registry)
        if self._mllp is not None:
            self._mllp.start()

        for actor, target in deferred.items():
            target.app = _actor_app(settings, services, actor)
        if "imaging_source" in deferred:
            settings = self._start_intake(settings, services)
        self._threads.extend(_serve(self._servers))
        self._serving = True
        if settings.repository.enabled:
            # Once serving: the registry asked may be this node's own.
            sweeper = threading.Thread(
                target=self._sweep,
                args=(
                    services.repository,
                    timedelta(seconds=settings.repository.pending_sweep_age),
                ),
                daemon=True,
                name="xdsi-sweep",
            )
            sweeper.start()
            self._threads.append(sweeper)
        if settings.node.workers > 1 and self._sockets:
            transcode.share_cores(settings.node.workers)
            for _ in range(settings.node.workers - 1):
                self._workers.append(self._spawn(settings))
            supervisor = threading.Thread(
                target=self._supervise,
                args=(settings,),
                daemon=True,
                name="xdsi-workers",
            )
            supervisor.start()
            self._supervisor = supervisor
            self._threads.append(supervisor)
        self.settings = settings
        self.services = services
        services.auditor.record(_application_activity(settings, "Application Start"))
        if settings.audit.targets:
            self.forwarder = audit_forwarder(
                settings, services.audit_spool, self.audit_tls_context
            )
            self.forwarder.start()
        logger.info(
            "node %s started: %s",
            settings.node.name,
            ", ".join(f"{a} {settings.url(a)}" for a in deferred),
        )
        _warn_if_open(settings.storage)
        return settings

    def _sweep(self, repository: Repository, age: timedelta) -> None:
        """Settle the repository's pending documents at start-up, then every
        SWEEP_EVERY seconds (or half their age, if less), until the node
        stops."""
        every = min(SWEEP_EVERY, max(1.0, age.total_seconds() / 2))
        while True:
            try:
                repository.sweep_pending(age)
            except Exception:
                logger.exception("the sweep of pending documents failed")
            if self._stopping.wait(every):
                return

    def _spawn(self, settings: Settings) -> BaseProcess:
        # A fresh interpreter, not a fork of this threaded process.
        process = multiprocessing.get_context("spawn").Process(
            target=_worker,
            args=(
                settings,
                self._sockets,
                logging.getLogger("xdsi").getEffectiveLevel(),
            ),
            name="xdsi-worker",
            daemon=True,
        )
        # The new interpreter inherits this thread's signal mask: with Ctrl-C
        # and hang-up held back until _worker takes them, one that comes
        # while it imports its modules prints no KeyboardInterrupt traceback.
        # The resource tracker, if it must start first, unblocks SIGINT and
        # SIGTERM behind it; started beforehand, it leaves the mask alone.
        multiprocessing.resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_WHILE_STARTING)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        logger.info("HTTP worker process %s started", process.pid)
        return process

    def _supervise(self, settings: Settings) -> None:
        """Start a new worker for each one that ended while the node runs."""
        while not self._stopping.wait(1):
            for index, process in enumerate(self._workers):
                if not process.is_alive() and not self._stopping.is_set():
                    logger.warning(
                        "HTTP worker process %s ended (exit code %s); starting another",
                        process.pid,
                        process.exitcode,
                    )
                    self._workers[index] = self._spawn(settings)

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the extra HTTP workers, if any."""
        return [p.pid for p in self._workers if p.pid is not None]

    def _start_intake(self, settings: Settings, services: Services) -> Settings:
        """Start the C-STORE SCP and auto-publishing, in the node's process."""
        cfg = settings.imaging_source
        if cfg.store_scp:
            context = tls.server_context(settings.tls) if settings.tls.enabled else None
            gate = None if context is None else _tls_gate(settings, context, "")
            self._store_scp = StoreScp(
                services.intake,
                cfg.ae_title,
                settings.node.host,
                cfg.dicom_port,
                tls_gate=gate,
                # As a STOW-RS body is bounded.
                max_data_set_size=settings.node.max_request_size,
            )
            try:
                host, port = self._store_scp.start()
            except OSError as exc:
                raise _cannot_listen(
                    "[imaging_source] dicom_port",
                    settings.node.host,
                    cfg.dicom_port,
                    exc,
                ) from None
            if gate is not None:
                # The listener is named once its port is known.
                gate.listener = f"dicom-tls://{host}:{port}"
            settings = replace(settings, imaging_source=replace(cfg, dicom_port=port))
        if cfg.publish_after > 0:
            self._auto_publisher = AutoPublisher(services.intake, cfg.publish_after)
            self._auto_publisher.start()
        return settings

    def _abandon(self) -> None:
        """Close what a start that failed bound or started, so that nothing
        is left half-started: no port stays held, no thread serves."""
        self._stop_supervising()
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
        for process in self._workers:
            process.terminate()
            process.join(timeout=10)
        self._workers.clear()
        self._stop_intake()
        # A listener serves once its thread runs; shutdown() would wait
        # for good on one that never did.
        for server in self._servers:
            if self._serving:
                server.shutdown()
            server.server_close()
        self._serving = False
        for thread in self._threads:
            thread.join(timeout=5)
        if self._mllp is not None:
            self._mllp.stop()
            self._mllp = None
        if self.services is not None:
            self.services.engine.dispose()
            self.services.audit_spool.close()
            self.services = None
        self._servers.clear()
        self._sockets.clear()
        self._threads.clear()

    def _stop_supervising(self) -> None:
        """Stop the node's threads, and first the one that would start a
        worker again while the workers are stopped."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
            self._supervisor = None

    def _stop_intake(self) -> None:
        """Stop the C-STORE SCP and auto-publishing, if they run."""
        if self._store_scp is not None:
            self._store_scp.stop()
            self._store_scp = None
        if self._auto_publisher is not None:
            self._auto_publisher.stop()
            self._auto_publisher = None

    def stop(self) -> None:
        self._stop_supervising()
        self._stop_intake()
        for process in self._workers:
            process.terminate()
        for process in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers.clear()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._mllp is not None:
            self._mllp.stop()
        if self.services is not None:
            self.services.auditor.record(
                _application_activity(self.settings, "Application Stop")
            )
            self.services.engine.dispose()
        if self.forwarder is not None:
            # The Application Stop, just spooled, goes out now to each
            # target that is up.
            self.forwarder.stop(drain=AUDIT_DRAIN_SECONDS)
            self.forwarder = None
        if self.services is not None:
            self.services.audit_spool.close()
        self._servers.clear()
        self._sockets.clear()
        self._threads.clear()
        self._serving = False
        logger.info("node %s stopped", self.settings.node.name)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

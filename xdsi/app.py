"""Compose the enabled actors into one running node.

Each HTTP actor is its own WSGI app on its own port, and the Document
Repository reaches the Document Registry only through ITI-42 over HTTP
(DESIGN.md principle 1). Ports may be 0: the node binds first, then builds
every actor with the effective endpoint URLs.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from xdsi import audit
from xdsi.actors.consumer import Consumer
from xdsi.actors.imaging_source import ImagingSource
from xdsi.actors.registry import Registry
from xdsi.actors.repository import Repository
from xdsi.audit.forwarder import AuditForwarder, Backoff
from xdsi.config import ConfigError, Settings
from xdsi.hl7.mllp import MllpServer
from xdsi.store.blobs import Blobs, BlobStore
from xdsi.store.schema import make_engine

logger = logging.getLogger(__name__)

HTTP_ACTORS = ("registry", "repository", "imaging_source")


class _RequestHandler(WSGIRequestHandler):
    """Close a connection whose peer stops sending for a minute."""

    # Limitation: the development-grade werkzeug server answers a malformed
    # HTTP request line or an oversized header with its own HTML error page,
    # before any SOAP layer sees it.
    timeout = 60


class _Deferred:
    """A WSGI app whose target is set after the socket is bound."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: dict, start_response: Any) -> Any:
        return self.app(environ, start_response)


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


def build_services(settings: Settings) -> Services:
    """Build every actor over the node's storage, without starting servers."""
    storage = settings.storage
    storage.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    spool = audit.AuditSpool(storage / "audit")
    auditor = audit.Auditor(
        spool,
        audit_source_id=settings.node.audit_source_id,
        enterprise_site_id=settings.node.enterprise_site_id,
    )
    return Services(
        settings=settings,
        engine=engine,
        registry=_registry(settings, engine, auditor),
        repository=Repository(settings, engine, repository_blobs(settings), auditor),
        imaging_source=ImagingSource(
            settings, engine, BlobStore(storage / "imaging-source"), auditor
        ),
        consumer=Consumer(settings, auditor, storage / "spool" / "consumer"),
        audit_spool=spool,
        auditor=auditor,
    )


def audit_forwarder(
    settings: Settings,
    spool: audit.AuditSpool,
    tls_context: ssl.SSLContext | None = None,
) -> AuditForwarder:
    """Return the delivery of ``spool`` to the ``[audit] targets`` (ITI-20).

    ``tls_context`` is the client context of TLS targets. Without one, TLS
    targets get the system's default context.
    """
    if tls_context is None and any(
        t.startswith("tls:") for t in settings.audit.targets
    ):
        # Limitation: the default context authenticates the target's server
        # certificate against the system's trust store and presents no
        # client certificate, so an ARR that demands mutual TLS
        # (ITI TF-2 3.19) refuses the node until a context is passed.
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


def _application_activity(settings: Settings, transaction: str) -> audit.AuditEvent:
    """DICOM PS3.15 A.5.3.1: this node started or stopped."""
    return audit.AuditEvent(
        transaction=transaction,
        actor="Secure Node",
        outcome=audit.Outcome.SUCCESS,
        source=audit.Endpoint(settings.node.audit_source_id, settings.node.host),
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

    def start(self) -> Settings:
        """Bind, build the actors, serve; return the effective settings."""
        settings = self.requested
        deferred: dict[str, _Deferred] = {}
        for actor in HTTP_ACTORS:
            section = getattr(settings, actor)
            if not section.enabled:
                continue
            deferred[actor] = _Deferred()
            server = make_server(
                settings.node.host,
                section.port,
                deferred[actor],
                threaded=True,
                request_handler=_RequestHandler,
            )
            self._servers.append(server)
            settings = settings.with_ports(**{actor: server.server_port})

        # The listener is bound before the actors exist, so that its port is
        # known; a message in that instant finds no registry, and the
        # listener answers nothing for it.
        registry: list[Registry] = []
        if settings.registry.enabled:
            self._mllp = MllpServer(
                settings.node.host,
                settings.registry.feed_port,
                lambda text: registry[0].feed(text),
            )
            self._mllp.start()
            settings = settings.with_ports(feed=self._mllp.address[1])
        services = build_services(settings)
        registry.append(services.registry)
        if settings.repository.enabled:
            services.repository.sweep_pending(
                timedelta(seconds=settings.repository.pending_sweep_age)
            )

        spool_root = settings.storage / "spool"
        for actor, target in deferred.items():
            target.app = getattr(services, actor).app(spool_root / actor)
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever,
                # A short poll interval makes stop() quick.
                kwargs={"poll_interval": 0.1},
                daemon=True,
                name=f"xdsi-http-{server.server_port}",
            )
            thread.start()
            self._threads.append(thread)
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
        return settings

    def stop(self) -> None:
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
            self.forwarder.stop()
            self.forwarder = None
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

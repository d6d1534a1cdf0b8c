"""A whole node on loopback ports, with a wiretap between every two actors."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import SCHEMA_FOR_ROOT, PostgresCluster, assert_valid, schema
from tests.integration.wiretap import Wiretap
from xdsi import ns, wire
from xdsi.app import Node, Services
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message

PATIENT = "XDSI-TEST-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"

# Every node fixture runs its tests once per database the node supports.
BACKENDS = ["sqlite", "postgresql"]


@dataclass
class RunningNode:
    node: Node
    settings: Settings
    services: Services
    taps: dict[str, Wiretap]

    def feed(self, patient_id: str = PATIENT) -> str:
        return send_message(
            self.settings.node.host,
            self.settings.registry.feed_port,
            build_feed(patient_id),
        )


@pytest.fixture(params=BACKENDS)
def running_node(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RunningNode]:
    with _database(request) as database_url:
        yield from _run_node(tmp_path, database_url)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    """One node for a whole module of tests that leave no state behind."""
    with _database(request) as database_url:
        yield from _run_node(tmp_path_factory.mktemp("node"), database_url)


@contextmanager
def _database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The node's database URL: empty for SQLite in the storage directory,
    else a new database in the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        yield ""
        return
    cluster: PostgresCluster = request.getfixturevalue("postgresql")
    database_url = cluster.create_database()
    try:
        yield database_url
    finally:
        cluster.drop_database(database_url)


def _run_node(tmp_path: Path, database_url: str) -> Iterator[RunningNode]:
    taps = {name: Wiretap("") for name in ("registry", "repository", "imaging_source")}
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(settings, node=replace(settings.node, database_url=database_url))
    imaging = settings.imaging_source
    settings = replace(
        settings,
        repository=replace(settings.repository, registry_url=taps["registry"].url),
        imaging_source=replace(imaging, repository_url=taps["repository"].url),
        consumer=replace(
            settings.consumer,
            registry_url=taps["registry"].url,
            repositories={
                settings.repository.repository_unique_id: taps["repository"].url,
                imaging.repository_unique_id: taps["imaging_source"].url,
            },
        ),
    )
    node = Node(settings)
    effective = node.start()
    for name, tap in taps.items():
        tap.target = effective.url(name)
    assert node.services is not None
    yield RunningNode(node, effective, node.services, taps)
    node.stop()
    for tap in taps.values():
        tap.close()


def soap_body(content_type: str, data: bytes, tmp_path: Path) -> etree._Element:
    """Read a recorded message and inline its XOP includes as base64.

    The schemas declare xdsb:Document as base64Binary; the MTOM body is
    validated with the include resolved (XOP 1.0, 3.1).
    """
    message = wire.read_message(io.BytesIO(data), content_type, tmp_path)
    assert_valid_envelope(content_type, data, tmp_path)
    body = message.body
    for include in list(body.iter(f"{{{ns.XOP}}}Include")):
        parent = include.getparent()
        attachment = wire.attachment_for(parent, message)
        parent.remove(include)
        parent.text = base64.b64encode(attachment.read_bytes()).decode("ascii")
    return body


def assert_valid_envelope(content_type: str, data: bytes, tmp_path: Path) -> None:
    """The SOAP 1.2 envelope and its WS-Addressing headers are valid."""
    message = wire.read_message(io.BytesIO(data), content_type, tmp_path)
    envelope = message.body.getroottree().getroot()
    assert envelope.tag == f"{{{ns.SOAP12}}}Envelope"
    assert_valid(envelope, "w3/soap-envelope.xsd")
    header = envelope.find(f"{{{ns.SOAP12}}}Header")
    assert header is not None
    for child in header:
        if child.tag.startswith(f"{{{ns.WSA}}}"):
            copy = etree.fromstring(etree.tostring(child))
            if not schema("w3/ws-addr.xsd").validate(etree.ElementTree(copy)):
                raise AssertionError(
                    f"{child.tag}: {schema('w3/ws-addr.xsd').error_log}"
                )


def validate_exchanges(taps: dict[str, Wiretap], tmp_path: Path) -> int:
    """Validate every request and response that crossed the wiretaps."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    count = 0
    for tap in taps.values():
        for exchange in tap.exchanges:
            for content_type, data in (
                (exchange.request_type, exchange.request_body),
                (exchange.response_type, exchange.response_body),
            ):
                body = soap_body(content_type, data, tmp_path)
                assert body.tag in SCHEMA_FOR_ROOT, body.tag
                assert_valid(body)
                count += 1
    return count

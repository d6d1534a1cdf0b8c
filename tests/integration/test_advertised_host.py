"""A node named by peers otherwise than by the address it binds
([node] advertised_host): the URLs it gives out and its audit records
name the advertised host, and the whole chain runs through it."""

from dataclasses import replace
from pathlib import Path

import pydicom
from lxml import etree

from tests.integration.conftest import PATIENT
from xdsi import tls
from xdsi.actors.identity_source import send_feed
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.store.schema import imaging_manifest

from ..conftest import dicom_path

# Resolves to the loopback address the node binds: the node's own
# transactions to itself go by this name too.
ADVERTISED = "localhost"


def test_urls_and_audit_records_name_the_advertised_host(tmp_path: Path) -> None:
    """RAD TF-3 4.68.4.1.2 and DICOM PS3.18 10.5.3: a manifest's Retrieve
    URL names a host peers can reach; DICOM PS3.15 A.5.1: so does each
    audit record's NetworkAccessPointID."""
    requested = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    requested = replace(
        requested, node=replace(requested.node, advertised_host=ADVERTISED)
    )
    with Node(requested) as node:
        settings = node.settings
        services = node.services
        assert services is not None
        assert settings.url("imaging_source").startswith(f"http://{ADVERTISED}:")
        assert "MSA|AA" in send_message(
            settings.node.host, settings.registry.feed_port, build_feed(PATIENT)
        )
        (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies
        services.imaging_source.publish(study, PATIENT)
        result = services.consumer.fetch(PATIENT, tmp_path / "out")

        assert not result.missing and len(result.instances) == len(study.instances)
        with services.engine.connect() as conn:
            (blob,) = (conn.execute(imaging_manifest.select()).one()._mapping["blob"],)
        manifest = pydicom.dcmread(services.imaging_source.blobs.path(blob))
        urls = [
            series.RetrieveURL
            for item in manifest.CurrentRequestedProcedureEvidenceSequence
            for series in item.ReferencedSeriesSequence
        ]
        assert urls and all(
            url.startswith(f"http://{ADVERTISED}:{settings.imaging_source.port}/")
            for url in urls
        )
        # This node's own part in each record: named by one of its URLs or
        # by its audit source id.
        own = {
            participant.get("NetworkAccessPointID")
            for record in services.audit_spool.records()
            for participant in etree.fromstring(record.xml).iter("ActiveParticipant")
            if participant.get("UserID", "").startswith(f"http://{ADVERTISED}:")
            or participant.get("UserID") == settings.node.audit_source_id
        }
        assert own == {ADVERTISED}, own


def test_the_feed_goes_to_the_advertised_host_which_the_certificate_names(
    tmp_path: Path,
) -> None:
    """ITI TF-2 3.19: under mutual TLS the client checks the host it dialled
    against the node's certificate, which names the host peers use (here
    the advertised one alone), not the address the node binds; ITI-8 from
    this node to its own registry dials that name, as its URLs do."""
    ca = tls.make_ca(tmp_path / "pki")
    certificate = tls.make_cert(tmp_path / "pki", ca, hosts=(ADVERTISED,))
    requested = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    requested = replace(
        requested,
        node=replace(requested.node, advertised_host=ADVERTISED),
        tls=tls.tls_settings(certificate, ca.certificate),
    )
    with Node(requested) as node:
        assert node.services is not None
        summary = send_feed(node.settings, node.services.auditor, PATIENT)

    assert summary.code == "AA"

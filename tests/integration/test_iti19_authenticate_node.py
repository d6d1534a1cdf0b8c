"""ITI-19 Authenticate Node: a node over mutual TLS on every HTTP actor and on
its MLLP listener, refusing and auditing peers it cannot authenticate."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from lxml import etree
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import dicom_path, shared_path
from tests.integration.conftest import PATIENT, RunningNode
from xdsi import logs, tls
from xdsi.actors.consumer import Consumer, ConsumerError
from xdsi.app import Node
from xdsi.audit import AuditRecord
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.dicom.store_scu import Destination, StoreScuError, send_files
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import MllpError, encode_frame, send_message

# DICOM PS3.15 A.5.3.11; DICOM PS3.16 CID 403.
SECURITY_ALERT = "110113"
NODE_AUTHENTICATION = "110126"

ENDPOINTS = ["registry", "repository", "imaging_source", "feed", "dicom"]


@dataclass(frozen=True)
class Pki:
    ca: tls.CertificateFiles
    node: tls.CertificateFiles
    rogue: tls.CertificateFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The node's CA and certificate, and a certificate of a CA it distrusts."""
    root = tmp_path_factory.mktemp("pki")
    ca = tls.make_ca(root / "ca")
    rogue_ca = tls.make_ca(root / "rogue-ca", common_name="rogue CA")
    return Pki(
        ca=ca,
        node=tls.make_cert(root / "ca", ca),
        rogue=tls.make_cert(root / "rogue-ca", rogue_ca, name="rogue"),
    )


@pytest.fixture(scope="module")
def tls_node(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    """Every actor of one node over mutual TLS, on loopback ports."""
    yield from _served_over_tls(pki, tmp_path_factory.mktemp("node"))


def _served_over_tls(
    pki: Pki, storage: Path, crls: tuple[str, ...] = ()
) -> Iterator[RunningNode]:
    """A node of every actor over mutual TLS (checking ``crls``), with its
    C-STORE SCP, on loopback ports."""
    settings = (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        tls=replace(tls.tls_settings(pki.node, pki.ca.certificate), crls=crls),
        imaging_source=replace(settings.imaging_source, store_scp=True, dicom_port=0),
    )
    # Each case here looks at its own refusal's alert: the node's listeners
    # record every refusal, none held back as repeated (tests/unit/test_tls.py
    # has the throttle).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logs, "REPEAT_INTERVAL", 0.0)
        with Node(settings) as node:
            assert node.services is not None
            yield RunningNode(node, node.settings, node.services, {})


def _address(node: RunningNode, endpoint: str) -> tuple[str, int]:
    settings = node.settings
    if endpoint == "feed":
        return settings.node.host, settings.registry.feed_port
    if endpoint == "dicom":
        return settings.node.host, settings.imaging_source.dicom_port
    return settings.node.host, getattr(settings, endpoint).port


def _listener(node: RunningNode, endpoint: str) -> str:
    if endpoint in ("feed", "dicom"):
        host, port = _address(node, endpoint)
        scheme = "mllps" if endpoint == "feed" else "dicom-tls"
        return f"{scheme}://{host}:{port}"
    return node.settings.url(endpoint)


def _request(node: RunningNode, endpoint: str) -> bytes:
    """What a peer sends first: an ITI-8 frame, an HTTP POST, or for DICOM
    the start of an A-ASSOCIATE-RQ PDU (DICOM PS3.8 9.3.2)."""
    if endpoint == "dicom":
        return b"\x01\x00\x00\x00\x00\x44\x00\x01"
    if endpoint == "feed":
        return encode_frame(
            build_feed("XDSI-TLS-REFUSED^^^&1.3.6.1.4.1.21367.13.20.1000&ISO")
        )
    path = getattr(node.settings, endpoint).path
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/soap+xml\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def _exchange(
    context: ssl.SSLContext, address: tuple[str, int], request: bytes
) -> bytes:
    """Send ``request`` over TLS; return all answered, b"" when refused."""
    answer = b""
    try:
        with socket.create_connection(address, timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=address[0]) as sock:
                sock.sendall(request)
                while chunk := sock.recv(65536):
                    answer += chunk
                    if answer.endswith(b"\x1c\r"):
                        break
    except (ssl.SSLError, OSError):
        pass
    return answer


def _c_echo(context: ssl.SSLContext, address: tuple[str, int]) -> int | None:
    """C-ECHO over TLS (DICOM PS3.7 9.3.5); the status, None if refused."""
    ae = AE(ae_title="TLSPEER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(*address, ae_title="XDSI", tls_args=(context, address[0]))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _trusting_ca(pki: Pki) -> ssl.SSLContext:
    """A client that trusts the node's CA and presents no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.ca.certificate)
    return context


def _no_certificate(pki: Pki) -> ssl.SSLContext:
    return _trusting_ca(pki)


def _no_certificate_tls_1_2(pki: Pki) -> ssl.SSLContext:
    context = _trusting_ca(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def _untrusted_certificate(pki: Pki) -> ssl.SSLContext:
    context = _trusting_ca(pki)
    context.load_cert_chain(pki.rogue.certificate, pki.rogue.private_key)
    return context


def _tls_1_1_only(pki: Pki) -> ssl.SSLContext:
    """A client with a trusted certificate that offers TLS 1.1 and nothing else."""
    context = _trusting_ca(pki)
    context.load_cert_chain(pki.node.certificate, pki.node.private_key)
    with warnings.catch_warnings():
        # TLS 1.1 is deprecated; offering it is the point of this client.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level would not even send a TLS 1.1 hello.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


# Under TLS 1.3 a client without a certificate completes its handshake and is
# dropped afterwards; capped at TLS 1.2, its handshake itself fails.
REFUSED_CLIENTS: dict[str, Callable[[Pki], ssl.SSLContext]] = {
    "no-certificate": _no_certificate,
    "no-certificate-tls-1.2": _no_certificate_tls_1_2,
    "untrusted-certificate": _untrusted_certificate,
    "tls-1.1-only": _tls_1_1_only,
}


def _new_records(node: RunningNode, before: int) -> list[AuditRecord]:
    """Audit records spooled after the first ``before``, once some arrive."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = list(node.services.audit_spool.records())[before:]
        if records:
            # Anything the refused request could have caused comes later.
            time.sleep(0.3)
            return list(node.services.audit_spool.records())[before:]
        time.sleep(0.05)
    return []


@pytest.mark.parametrize("client", REFUSED_CLIENTS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_peer_that_cannot_authenticate_is_refused_and_audited(
    tls_node: RunningNode,
    pki: Pki,
    endpoint: str,
    client: str,
    audit_schema: etree.RelaxNG,
) -> None:
    """ITI TF-2 3.19: refused, nothing processed, a Node Authentication alert."""
    before = len(list(tls_node.services.audit_spool.records()))
    context = REFUSED_CLIENTS[client](pki)

    answer = _exchange(
        context, _address(tls_node, endpoint), _request(tls_node, endpoint)
    )

    assert answer == b""
    (record,) = _new_records(tls_node, before)
    root = etree.fromstring(record.xml)
    assert audit_schema.validate(root), audit_schema.error_log
    assert record.event_id is not None
    assert record.event_id.code == SECURITY_ALERT
    event_type = root.find("EventIdentification/EventTypeCode")
    assert event_type.get("csd-code") == NODE_AUTHENTICATION
    assert record.actor_user_ids[1] == _listener(tls_node, endpoint)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_trusted_peer_is_answered(
    tls_node: RunningNode, pki: Pki, endpoint: str
) -> None:
    """ITI TF-2 3.19: a peer with a certificate of a trusted CA is served."""
    before = len(list(tls_node.services.audit_spool.records()))
    context = tls.client_context(tls_node.settings.tls)

    if endpoint == "dicom":
        assert _c_echo(context, _address(tls_node, endpoint)) == 0x0000
    else:
        answer = _exchange(
            context, _address(tls_node, endpoint), _request(tls_node, endpoint)
        )
        expected = b"\x0bMSH|" if endpoint == "feed" else b"HTTP/1.1 "
        assert answer.startswith(expected)
    alerts = [
        r
        for r in list(tls_node.services.audit_spool.records())[before:]
        if r.event_id is not None and r.event_id.code == SECURITY_ALERT
    ]
    assert alerts == []


def test_imaging_chain_over_mutual_tls_comes_back_byte_identical(
    tls_node: RunningNode, tmp_path: Path
) -> None:
    """ITI TF-2 3.19, RAD TF-3 4.68, 4.69: the whole chain over mutual TLS."""
    settings = tls_node.settings
    ack = send_message(
        settings.node.host,
        settings.registry.feed_port,
        build_feed(PATIENT),
        ssl_context=tls.client_context_for(settings),
    )
    assert "MSA|AA" in ack
    (study,) = scan.scan_directory(dicom_path("study-mr", "images")).studies

    tls_node.services.imaging_source.publish(study, PATIENT)
    result = tls_node.services.consumer.fetch(PATIENT, tmp_path / "out")

    assert not result.missing

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert {p.stem: digest(p) for p in result.instances} == {
        h.sop_instance_uid: digest(h.path) for h in study.instances
    }
    transactions = {r.event_type for r in tls_node.services.audit_spool.records()}
    assert {"ITI-8", "RAD-68", "ITI-42", "ITI-18", "ITI-43", "RAD-69"} <= transactions


def _sop_instance_uid(path: Path) -> str:
    (study,) = scan.scan_files([path]).studies
    (header,) = study.instances
    return header.sop_instance_uid


def test_instances_go_to_a_pacs_over_dicom_tls(tls_node: RunningNode) -> None:
    """DICOM PS3.15 B.1, ITI TF-2 3.19: C-STORE into a PACS (the node's own
    storage SCP behind its TLS gate, as ``fetch --to-pacs --pacs-tls`` does)
    runs over mutual TLS, and the PACS keeps what it got."""
    path = dicom_path("singles", "cr__ids-1301.dcm")
    pacs = Destination("XDSI", *_address(tls_node, "dicom"))

    sent = send_files(
        [path],
        pacs,
        calling_ae_title="TLSPEER",
        ssl_context=tls.client_context(tls_node.settings.tls),
    )

    assert sent.statuses == {path: 0x0000}
    uid = _sop_instance_uid(path)
    assert set(tls_node.services.imaging_source.held_instances([uid])) == {uid}


def test_a_pacs_that_does_not_trust_the_sender_stores_nothing(
    tls_node: RunningNode, pki: Pki
) -> None:
    """ITI TF-2 3.19: C-STORE over TLS with a certificate the PACS does not
    trust gets no association, and nothing is stored."""
    path = dicom_path("singles", "dx__dx_image.dcm")
    pacs = Destination("XDSI", *_address(tls_node, "dicom"))

    with pytest.raises(StoreScuError, match="over TLS"):
        send_files(
            [path],
            pacs,
            calling_ae_title="ROGUE",
            ssl_context=_untrusted_certificate(pki),
        )

    uid = _sop_instance_uid(path)
    assert tls_node.services.imaging_source.held_instances([uid]) == {}


def test_client_refuses_a_node_it_does_not_trust(
    tls_node: RunningNode, pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.19: a client checks the server's certificate too."""
    rogue = replace(
        tls_node.settings,
        tls=tls.tls_settings(pki.rogue, pki.rogue.certificate.parent / "ca.pem"),
    )
    consumer = Consumer(rogue, tls_node.services.auditor, tmp_path / "spool")

    with pytest.raises(ConsumerError, match="CERTIFICATE_VERIFY_FAILED"):
        consumer.find(PATIENT)
    with pytest.raises(MllpError, match="CERTIFICATE_VERIFY_FAILED"):
        send_message(
            rogue.node.host,
            rogue.registry.feed_port,
            build_feed(PATIENT),
            ssl_context=tls.client_context(rogue.tls),
        )


def test_a_feed_whose_certificate_is_refused_says_so(
    crl_node: RunningNode, pki: Pki, revoked_peer: RevokedPeer
) -> None:
    """ITI TF-2 3.19: under TLS 1.3 the listener refuses the client's
    certificate once the client's handshake is done, so the client reads
    only the end of the session; the error says what that likely means, as
    the HTTP clients do, not a bare "EOF occurred in violation of
    protocol"."""
    revoked = tls.client_context(
        tls.tls_settings(revoked_peer.certificate, pki.ca.certificate)
    )
    before = len(list(crl_node.services.audit_spool.records()))

    with pytest.raises(MllpError) as refused:
        send_message(
            crl_node.settings.node.host,
            crl_node.settings.registry.feed_port,
            build_feed(PATIENT),
            ssl_context=revoked,
        )

    assert "violation of protocol" not in str(refused.value)
    assert "may not accept this node's certificate" in str(refused.value)
    # The listener's audit of the refusal, which may come after the client
    # gave up, is this test's, not the next one's on the same node.
    (record,) = _new_records(crl_node, before)
    assert record.event_id is not None and record.event_id.code == SECURITY_ALERT


def test_plain_client_gets_no_answer_from_a_tls_listener(
    tls_node: RunningNode,
) -> None:
    """ITI TF-2 3.19: an MLLP frame in clear text is not processed."""
    settings = tls_node.settings

    with pytest.raises(MllpError):
        send_message(
            settings.node.host,
            settings.registry.feed_port,
            build_feed(PATIENT),
            timeout=3,
        )


@pytest.fixture(scope="module")
def audit_schema() -> etree.RelaxNG:
    """The DICOM PS3.15 A.5.1 schema from the shared schemas."""
    return etree.RelaxNG(
        etree.parse(shared_path("schemas", "dicom", "audit-message.rng"))
    )


@dataclass(frozen=True)
class RevokedPeer:
    certificate: tls.CertificateFiles
    crl: Path


@pytest.fixture(scope="module")
def revoked_peer(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> RevokedPeer:
    """A peer of the node's CA whose certificate the CA's CRL lists."""
    root = tmp_path_factory.mktemp("revoked")
    peer = tls.make_cert(root, pki.ca, name="revoked-peer")
    crl = tls.make_crl(pki.ca, root / "ca.crl", revoked=[peer.certificate])
    return RevokedPeer(peer, crl)


@pytest.fixture(scope="module")
def crl_node(
    pki: Pki, revoked_peer: RevokedPeer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    """Every actor of one node over mutual TLS, checking the CA's CRL."""
    yield from _served_over_tls(
        pki, tmp_path_factory.mktemp("crl-node"), (str(revoked_peer.crl),)
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_peer_whose_certificate_was_revoked_is_refused_and_audited(
    crl_node: RunningNode,
    pki: Pki,
    revoked_peer: RevokedPeer,
    endpoint: str,
    audit_schema: etree.RelaxNG,
) -> None:
    """ITI TF-2 3.19, RFC 5280 6.3: with [tls] crls, a certificate of a
    trusted CA that its CRL lists is refused at every listener, nothing
    processed, and audited as a Node Authentication alert; a peer in good
    standing is served."""
    before = len(list(crl_node.services.audit_spool.records()))
    revoked = tls.client_context(
        tls.tls_settings(revoked_peer.certificate, pki.ca.certificate)
    )

    if endpoint == "dicom":
        assert _c_echo(revoked, _address(crl_node, endpoint)) is None
    else:
        answer = _exchange(
            revoked, _address(crl_node, endpoint), _request(crl_node, endpoint)
        )
        assert answer == b""
    (record,) = _new_records(crl_node, before)
    root = etree.fromstring(record.xml)
    assert audit_schema.validate(root), audit_schema.error_log
    assert record.event_id is not None and record.event_id.code == SECURITY_ALERT
    assert record.actor_user_ids[1] == _listener(crl_node, endpoint)

    good = tls.client_context(crl_node.settings.tls)
    if endpoint == "dicom":
        assert _c_echo(good, _address(crl_node, endpoint)) == 0x0000
    else:
        answer = _exchange(
            good, _address(crl_node, endpoint), _request(crl_node, endpoint)
        )
        assert answer.startswith(b"\x0bMSH|" if endpoint == "feed" else b"HTTP/1.1 ")

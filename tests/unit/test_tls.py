"""Tests of xdsi.tls: contexts, test certificates, the handshake gate."""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from lxml import etree

from tests.conftest import shared_path
from xdsi import audit, tls
from xdsi.config import ConfigError, Settings, TlsSettings, load_settings, to_toml


@dataclass(frozen=True)
class Pki:
    ca: tls.CertificateFiles
    node: tls.CertificateFiles
    rogue: tls.CertificateFiles

    @property
    def settings(self) -> TlsSettings:
        return tls.tls_settings(self.node, self.ca.certificate)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with one node, and a node of another CA that nobody trusts."""
    root = tmp_path_factory.mktemp("pki")
    ca = tls.make_ca(root / "ca")
    rogue_ca = tls.make_ca(root / "rogue-ca", common_name="rogue CA")
    return Pki(
        ca=ca,
        node=tls.make_cert(root / "ca", ca),
        rogue=tls.make_cert(root / "rogue-ca", rogue_ca, name="rogue"),
    )


def _certificate(files: tls.CertificateFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.certificate.read_bytes())


def test_node_certificate_names_localhost_and_loopback(pki: Pki) -> None:
    """ITI TF-2 3.19: the client checks the dialled host against the SAN."""
    san = _certificate(pki.node).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )

    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]


def test_node_certificate_serves_both_ends_and_is_issued_by_the_ca(pki: Pki) -> None:
    """ITI TF-2 3.19: one certificate authenticates a node as server and client."""
    certificate = _certificate(pki.node)
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)

    assert set(usages.value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    certificate.verify_directly_issued_by(_certificate(pki.ca))
    with pytest.raises(ValueError):
        certificate.verify_directly_issued_by(
            x509.load_pem_x509_certificate(
                (pki.rogue.certificate.parent / "ca.pem").read_bytes()
            )
        )


def test_private_keys_are_readable_by_their_owner_only(pki: Pki) -> None:
    """ITI TF-2 3.19: a node's key is its identity; no one else may read it."""
    for files in (pki.ca, pki.node):
        assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600


def test_make_cert_without_hosts_is_refused(pki: Pki, tmp_path: Path) -> None:
    """ITI TF-2 3.19: a node certificate must name a host to be checked."""
    with pytest.raises(ValueError, match="at least one host"):
        tls.make_cert(tmp_path, pki.ca, hosts=())


def test_server_context_requires_a_client_certificate_over_tls_1_2(pki: Pki) -> None:
    """ITI TF-2 3.19: mutual authentication, TLS 1.2 or higher."""
    context = tls.server_context(pki.settings)

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_trusts_the_configured_ca_only(pki: Pki) -> None:
    """ITI TF-2 3.19: peers are authenticated against the node's own trust."""
    context = tls.client_context(pki.settings)

    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    subjects = [dict(x[0] for x in ca["subject"]) for ca in context.get_ca_certs()]
    assert subjects == [{"organizationName": "xdsi", "commonName": "xdsi test CA"}]


def test_missing_certificate_file_is_a_configuration_error(
    pki: Pki, tmp_path: Path
) -> None:
    """ITI TF-2 3.19: a node that cannot present its certificate does not start."""
    settings = TlsSettings(
        enabled=True,
        certificate=str(tmp_path / "absent.pem"),
        private_key=str(pki.node.private_key),
        trusted=(str(pki.ca.certificate),),
    )

    with pytest.raises(tls.TlsConfigError, match=r"\[tls\] cannot be loaded"):
        tls.server_context(settings)


def test_enabled_tls_without_trusted_peers_is_refused(pki: Pki) -> None:
    """ITI TF-2 3.19: with no trusted certificate no peer could authenticate."""
    with pytest.raises(ConfigError, match="needs certificate, private_key and trusted"):
        TlsSettings(
            enabled=True,
            certificate=str(pki.node.certificate),
            private_key=str(pki.node.private_key),
        )


def test_tls_section_is_read_and_endpoints_become_https(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITI TF-2 3.19: a [tls] node publishes https:// endpoints."""
    monkeypatch.delenv("XDSI_CONFIG", raising=False)
    path = tmp_path / "xdsi.toml"
    path.write_text(
        "[tls]\nenabled = true\n"
        f'certificate = "{pki.node.certificate}"\n'
        f'private_key = "{pki.node.private_key}"\n'
        f'trusted = ["{pki.ca.certificate}"]\n',
        encoding="utf-8",
    )

    settings = load_settings(path)

    assert settings.tls == pki.settings
    assert settings.url("registry") == "https://127.0.0.1:9081/xds/registry"
    assert Settings().url("registry") == "http://127.0.0.1:9081/xds/registry"
    assert tls.client_context_for(Settings()) is None


def test_tls_section_survives_config_show(pki: Pki, tmp_path: Path) -> None:
    """ITI TF-2 3.19: ``xdsi config show`` prints a [tls] that reads back."""
    settings = replace(Settings(), tls=replace(pki.settings, ciphers="ECDHE+AESGCM"))
    path = tmp_path / "shown.toml"
    path.write_text(to_toml(settings), encoding="utf-8")

    assert load_settings(path).tls == settings.tls


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.request.recv(1024))


class _EchoServer(tls.TlsServerMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True


@pytest.fixture
def gated_echo(pki: Pki) -> Iterator[tuple[tuple[str, int], list[tls.RefusedPeer]]]:
    """An echo server on 127.0.0.1 behind a TLS gate; the refusals it saw."""
    refused: list[tls.RefusedPeer] = []
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    server.tls_gate = tls.TlsGate(
        tls.server_context(pki.settings), "echo", refused.append, timeout=5
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[:2], refused
    server.shutdown()
    server.server_close()
    thread.join()


def _exchange(context: ssl.SSLContext, address: tuple[str, int]) -> bytes:
    """Send ``ping`` over TLS; return the answer, b"" when refused."""
    try:
        with socket.create_connection(address, timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=address[0]) as sock:
                sock.sendall(b"ping")
                return sock.recv(1024)
    except (ssl.SSLError, OSError):
        return b""


def _wait_for(refused: list[tls.RefusedPeer]) -> list[tls.RefusedPeer]:
    for _ in range(100):
        if refused:
            break
        threading.Event().wait(0.05)
    return refused


def test_gate_lets_a_trusted_peer_through(
    pki: Pki, gated_echo: tuple[tuple[str, int], list[tls.RefusedPeer]]
) -> None:
    """ITI TF-2 3.19: a peer with a trusted certificate is served."""
    address, refused = gated_echo

    assert _exchange(tls.client_context(pki.settings), address) == b"ping"
    assert refused == []


def test_gate_refuses_an_untrusted_peer_before_reading_from_it(
    pki: Pki, gated_echo: tuple[tuple[str, int], list[tls.RefusedPeer]]
) -> None:
    """ITI TF-2 3.19: a certificate of an untrusted CA is refused and reported."""
    address, refused = gated_echo
    rogue = tls.client_context(tls.tls_settings(pki.rogue, pki.ca.certificate))

    assert _exchange(rogue, address) == b""
    (peer,) = _wait_for(refused)
    assert (peer.listener, peer.host) == ("echo", "127.0.0.1")
    assert "certificate" in peer.reason.lower()


def test_refusal_audit_is_a_node_authentication_security_alert(
    tmp_path: Path, audit_schema: etree.RelaxNG
) -> None:
    """DICOM PS3.15 A.5.3.11: Security Alert 110113, Node Authentication 110126."""
    auditor = audit.Auditor(audit.AuditSpool(tmp_path), audit_source_id="xdsi")

    tls.audit_refusal(
        auditor,
        "127.0.0.1",
        tls.RefusedPeer("mllps://127.0.0.1:2575", "127.0.0.1", 50000, "NO_CERT"),
    )

    (record,) = auditor.spool.records()
    root = etree.fromstring(record.xml)
    assert audit_schema.validate(root), audit_schema.error_log
    assert record.event_id is not None and record.event_id.code == "110113"
    event_type = root.find("EventIdentification/EventTypeCode")
    assert (event_type.get("csd-code"), event_type.get("codeSystemName")) == (
        "110126",
        "DCM",
    )
    assert record.outcome == audit.Outcome.MINOR_FAILURE
    assert record.actor_user_ids == ("127.0.0.1:50000", "mllps://127.0.0.1:2575")
    assert "NO_CERT" in root.findtext("EventIdentification/EventOutcomeDescription")


@pytest.fixture(scope="module")
def audit_schema() -> etree.RelaxNG:
    """The DICOM PS3.15 A.5.1 schema from the shared schemas."""
    return etree.RelaxNG(
        etree.parse(shared_path("schemas", "dicom", "audit-message.rng"))
    )

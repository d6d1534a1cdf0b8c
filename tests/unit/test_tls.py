"""Tests of xdsi.tls: contexts, test certificates, the handshake gate."""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from lxml import etree

from tests.conftest import shared_path
from xdsi import audit, cli, logs, tls
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

    with pytest.raises(
        tls.TlsConfigError, match=r"\[tls\] certificate .*absent.pem: No such file"
    ):
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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_of_a_host_for_one_reason_are_recorded_once_an_interval() -> None:
    """A host failing handshakes in a loop writes one record a minute for
    each reason, which counts those held back since the last."""
    clock = _Clock()
    throttle = logs.Throttle(60.0, clock)

    assert throttle.admit("192.0.2.7", "NO_CERT") == 0
    assert [throttle.admit("192.0.2.7", "NO_CERT") for _ in range(5)] == [None] * 5
    # Another reason, or another host, is news.
    assert throttle.admit("192.0.2.7", "UNKNOWN_CA") == 0
    assert throttle.admit("192.0.2.8", "NO_CERT") == 0
    clock.now += 59.9
    assert throttle.admit("192.0.2.7", "NO_CERT") is None
    clock.now += 0.1
    assert throttle.admit("192.0.2.7", "NO_CERT") == 6
    assert throttle.admit("192.0.2.7", "NO_CERT") is None


def test_the_refusal_throttle_remembers_a_bounded_number_of_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refusals from ever new addresses cannot grow the throttle's table
    without bound; past its size, new hosts are recorded unthrottled."""
    monkeypatch.setattr(logs, "MAX_THROTTLED", 3)
    clock = _Clock()
    throttle = logs.Throttle(60.0, clock)
    for n in range(3):
        assert throttle.admit(f"192.0.2.{n}", "NO_CERT") == 0
    assert [throttle.admit("192.0.2.9", "NO_CERT") for _ in range(3)] == [0, 0, 0]
    assert len(throttle._hosts) == 3
    # Once the others' intervals have run out, they make room.
    clock.now += 60
    assert throttle.admit("192.0.2.9", "NO_CERT") == 0
    assert throttle.admit("192.0.2.9", "NO_CERT") is None


def test_a_refusal_record_counts_those_held_back_before_it(tmp_path: Path) -> None:
    auditor = audit.Auditor(audit.AuditSpool(tmp_path), audit_source_id="xdsi")
    peer = tls.RefusedPeer("https://127.0.0.1:9081", "192.0.2.7", 5, "NO_CERT", 41)

    tls.audit_refusal(auditor, "127.0.0.1", peer)

    (record,) = auditor.spool.records()
    detail = etree.fromstring(record.xml).findtext(
        "EventIdentification/EventOutcomeDescription"
    )
    assert detail == (
        "TLS handshake refused: NO_CERT; 41 refusals of 192.0.2.7 for this "
        "reason since the last record, not recorded one by one"
    )


def test_a_peer_refused_again_and_again_is_reported_once(
    pki: Pki,
    gated_echo: tuple[tuple[str, int], list[tls.RefusedPeer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twenty refused handshakes from one host within the interval: one
    report to audit, one WARNING; another failure is reported at once."""
    address, refused = gated_echo
    rogue = tls.client_context(tls.tls_settings(pki.rogue, pki.ca.certificate))
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(cafile=pki.ca.certificate)
    no_certificate.maximum_version = ssl.TLSVersion.TLSv1_2

    with caplog.at_level(logging.DEBUG, logger="xdsi.tls"):
        for _ in range(20):
            assert _exchange(rogue, address) == b""
        assert _exchange(no_certificate, address) == b""
        for _ in range(100):
            if len(refused) >= 2:
                break
            threading.Event().wait(0.05)

    assert [p.unrecorded for p in refused] == [0, 0]
    assert "certificate" in refused[0].reason.lower()
    assert refused[1].reason != refused[0].reason
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert len([r for r in caplog.records if "refused peer" in r.getMessage()]) == 21


@pytest.fixture(scope="module")
def audit_schema() -> etree.RelaxNG:
    """The DICOM PS3.15 A.5.1 schema from the shared schemas."""
    return etree.RelaxNG(
        etree.parse(shared_path("schemas", "dicom", "audit-message.rng"))
    )


@dataclass(frozen=True)
class RevokingPki:
    """A CA with a server, a peer in good standing and a revoked peer."""

    ca: tls.CertificateFiles
    server: tls.CertificateFiles
    good: tls.CertificateFiles
    revoked: tls.CertificateFiles
    crl: Path

    def settings(self, node: tls.CertificateFiles) -> TlsSettings:
        return replace(
            tls.tls_settings(node, self.ca.certificate), crls=(str(self.crl),)
        )


@pytest.fixture
def revoking(tmp_path: Path) -> RevokingPki:
    ca = tls.make_ca(tmp_path / "ca")
    server = tls.make_cert(tmp_path / "ca", ca, name="server")
    good = tls.make_cert(tmp_path / "ca", ca, name="good")
    revoked = tls.make_cert(tmp_path / "ca", ca, name="revoked")
    # Issued an hour ago, so that a CRL issued now is the later of the two.
    crl = tls.make_crl(
        ca,
        tmp_path / "ca.crl",
        revoked=[revoked.certificate],
        issued=datetime.now(UTC) - timedelta(hours=1),
    )
    return RevokingPki(ca, server, good, revoked, crl)


@contextmanager
def _gated(
    context: ssl.SSLContext,
) -> Iterator[tuple[tuple[str, int], list[tls.RefusedPeer]]]:
    refused: list[tls.RefusedPeer] = []
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    server.tls_gate = tls.TlsGate(context, "echo", refused.append, timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2], refused
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_peer_whose_certificate_its_ca_revoked_is_refused(
    revoking: RevokingPki,
) -> None:
    """ITI TF-2 3.19, RFC 5280 6.3: with [tls] crls, a certificate its CA's
    CRL lists is refused at the handshake and the refusal reported; one in
    good standing is served."""
    server = tls.server_context(revoking.settings(revoking.server))
    with _gated(server) as (address, refused):
        good = tls.client_context(revoking.settings(revoking.good))
        assert _exchange(good, address) == b"ping"
        assert refused == []

        revoked = tls.client_context(revoking.settings(revoking.revoked))
        assert _exchange(revoked, address) == b""
        (peer,) = _wait_for(refused)
    assert "revoked" in peer.reason.lower()


def test_without_crls_a_revoked_certificate_is_not_looked_up(
    revoking: RevokingPki,
) -> None:
    """A node with no [tls] crls knows nothing of revocation: the CRL on disk
    does not count until it is listed."""
    plain = replace(revoking.settings(revoking.server), crls=())
    with _gated(tls.server_context(plain)) as (address, refused):
        revoked = tls.client_context(revoking.settings(revoking.revoked))
        assert _exchange(revoked, address) == b"ping"
        assert refused == []


def test_the_client_refuses_a_server_whose_certificate_was_revoked(
    revoking: RevokingPki, tmp_path: Path
) -> None:
    """ITI TF-2 3.19: both ends check; our client refuses a revoked server."""
    crl = tls.make_crl(
        revoking.ca,
        tmp_path / "server-revoked.crl",
        revoked=[revoking.server.certificate],
    )
    server = tls.server_context(
        tls.tls_settings(revoking.server, revoking.ca.certificate)
    )
    with _gated(server) as (address, _):
        client = replace(revoking.settings(revoking.good), crls=(str(crl),))
        assert _exchange(tls.client_context(client), address) == b""
        assert _exchange(tls.client_context(revoking.settings(revoking.good)), address)


def test_a_crl_renewed_on_disk_is_taken_without_a_restart(
    revoking: RevokingPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 5280 5.1.2.5: a CA issues its next CRL before nextUpdate; written
    over the old file, it is in force from the next handshake after the
    recheck time, without restarting the node."""
    monkeypatch.setattr(tls, "CRL_RECHECK_SECONDS", 0.0)
    server = tls.server_context(revoking.settings(revoking.server))
    good = tls.client_context(revoking.settings(revoking.good))
    with _gated(server) as (address, refused):
        assert _exchange(good, address) == b"ping"

        tls.make_crl(
            revoking.ca,
            revoking.crl,
            revoked=[revoking.revoked.certificate, revoking.good.certificate],
        )
        assert _exchange(good, address) == b""
        (peer,) = _wait_for(refused)
    assert "revoked" in peer.reason.lower()


def test_a_peer_whose_ca_crl_is_out_of_date_is_refused(
    revoking: RevokingPki, tmp_path: Path
) -> None:
    """RFC 5280 6.3.3: a CRL past its nextUpdate is not current; with none
    current for the peer's CA the peer is refused (no unchecked way in)."""
    issued = datetime.now(UTC) - timedelta(days=10)
    stale = tls.make_crl(revoking.ca, tmp_path / "stale.crl", issued=issued, days=7)
    server = replace(revoking.settings(revoking.server), crls=(str(stale),))
    with _gated(tls.server_context(server)) as (address, refused):
        assert (
            _exchange(tls.client_context(revoking.settings(revoking.good)), address)
            == b""
        )
        (peer,) = _wait_for(refused)
    assert "expired" in peer.reason.lower()


def test_an_unreadable_crl_is_a_configuration_error(
    revoking: RevokingPki, tmp_path: Path
) -> None:
    """A [tls] crls file missing or not a CRL stops the node at start."""
    missing = replace(revoking.settings(revoking.server), crls=(str(tmp_path / "no"),))
    with pytest.raises(tls.TlsConfigError, match=r"\[tls\] crls .*no: No such file"):
        tls.server_context(missing)
    (tmp_path / "garbage.crl").write_text("-----BEGIN X509 CRL-----\nnope\n")
    garbage = replace(missing, crls=(str(tmp_path / "garbage.crl"),))
    with pytest.raises(tls.TlsConfigError):
        tls.server_context(garbage)


def test_crls_are_read_from_the_tls_section(
    revoking: RevokingPki, tmp_path: Path
) -> None:
    """[tls] crls is a list of PEM files, as trusted is."""
    config = tmp_path / "xdsi.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f'certificate = "{revoking.server.certificate}"\n'
        f'private_key = "{revoking.server.private_key}"\n'
        f'trusted = ["{revoking.ca.certificate}"]\n'
        f'crls = ["{revoking.crl}"]\n'
    )
    assert load_settings(config).tls.crls == (str(revoking.crl),)
    config.write_text(config.read_text().replace(f'["{revoking.crl}"]', '"one.crl"'))
    with pytest.raises(ConfigError, match=r"\[tls\] crls wants a list of strings"):
        load_settings(config)


def test_a_crl_past_its_next_update_is_warned_of_when_read(
    revoking: RevokingPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 5280 6.3.3: the node says when a CRL it reads is no longer
    current, since every peer of its CA is then refused."""
    issued = datetime.now(UTC) - timedelta(days=10)
    stale = tls.make_crl(revoking.ca, tmp_path / "stale.crl", issued=issued, days=7)
    caplog.set_level(logging.WARNING, logger="xdsi.tls")

    tls.server_context(replace(revoking.settings(revoking.server), crls=(str(stale),)))

    (warning,) = [r.getMessage() for r in caplog.records]
    assert "due for renewal" in warning and str(stale) in warning


def test_the_arr_checks_senders_against_the_crls_given(revoking: RevokingPki) -> None:
    """ITI TF-2 3.19: ``xdsi arr --crl`` refuses a sender whose certificate
    its CA revoked, as a node with [tls] crls does."""
    context = cli._arr_tls_context(
        Settings(),
        revoking.server.certificate,
        revoking.server.private_key,
        revoking.ca.certificate,
        (revoking.crl,),
    )
    assert context is not None
    with _gated(context) as (address, refused):
        assert _exchange(tls.client_context(revoking.settings(revoking.good)), address)
        revoked = tls.client_context(revoking.settings(revoking.revoked))
        assert _exchange(revoked, address) == b""
        (peer,) = _wait_for(refused)
    assert "revoked" in peer.reason.lower()


def test_a_crl_written_over_on_disk_is_in_force_as_it_is(
    revoking: RevokingPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 5280 5, 6.3.3: the CRL now on disk decides, not one read before:
    one that lifts a revocation lets the peer in again, and one past its
    next update shuts every peer of its CA out."""
    monkeypatch.setattr(tls, "CRL_RECHECK_SECONDS", 0.0)
    server = tls.server_context(revoking.settings(revoking.server))
    good = tls.client_context(tls.tls_settings(revoking.good, revoking.ca.certificate))
    revoked = tls.client_context(
        tls.tls_settings(revoking.revoked, revoking.ca.certificate)
    )
    with _gated(server) as (address, _):
        assert _exchange(revoked, address) == b""

        tls.make_crl(revoking.ca, revoking.crl)
        assert _exchange(revoked, address) == b"ping"

        issued = datetime.now(UTC) - timedelta(days=10)
        tls.make_crl(revoking.ca, revoking.crl, issued=issued, days=7)
        assert _exchange(good, address) == b""


def test_a_ca_with_an_ec_key_issues_certificates_and_crls(tmp_path: Path) -> None:
    """A site's own CA may sign with ECDSA (P-256) as well as RSA: make-cert
    and make-crl take its key, and what they write verifies against it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "EC CA")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca = tls.CertificateFiles(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    ca.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    ca.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    node = tls.make_cert(tmp_path / "node", ca)
    crl_path = tls.make_crl(ca, tmp_path / "ca.crl", revoked=[node.certificate])

    issued = x509.load_pem_x509_certificate(node.certificate.read_bytes())
    issued.verify_directly_issued_by(certificate)
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert crl.is_signature_valid(key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(issued.serial_number)

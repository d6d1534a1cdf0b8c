"""Mutual TLS for every endpoint and client, and a test CA to run it with.

Implements ITI TF-2 3.19 (Authenticate Node): both ends of every connection
present an X.509 certificate that the other end trusts, over TLS 1.2 or
higher (RFC 5246, RFC 8446; BCP 195). A peer refused at the handshake is
audited as a Security Alert of type Node Authentication (DICOM PS3.15
A.5.3.11; ITI TF-2 3.20).
"""

import datetime
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xdsi import audit
from xdsi.config import ConfigError, Settings, TlsSettings
from xdsi.logs import Throttle

logger = logging.getLogger(__name__)

# ITI TF-2 3.19: TLS 1.2 is the floor; nothing lower is ever negotiated.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# The audit row of a refused peer in profiles/audit_events.toml: a Security
# Alert (110113, DCM) of type Node Authentication (110126, DCM).
REFUSAL_TRANSACTION = "Node Authentication Failure"
REFUSAL_ACTOR = "Secure Node"

# How often a CRL file is looked at again for a renewed CRL, in seconds.
CRL_RECHECK_SECONDS = 60.0

# Test certificates: RSA keys of this size, signed with SHA-256.
_KEY_SIZE = 2048


class TlsConfigError(ConfigError):
    """A [tls] file is missing or unusable (no key, a key not matching)."""


@dataclass(frozen=True)
class CertificateFiles:
    """A PEM certificate and the PEM file of its private key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class RefusedPeer:
    """A peer the TLS handshake refused, and why, in OpenSSL's words.

    ``unrecorded`` counts the refusals of the same host for the same reason
    before this one that a :class:`~xdsi.logs.Throttle` left unlogged and
    unaudited.
    """

    listener: str
    host: str
    port: int
    reason: str
    unrecorded: int = 0

    @property
    def detail(self) -> str:
        """The reason, and what went unrecorded before it."""
        if not self.unrecorded:
            return self.reason
        plural = "s" if self.unrecorded != 1 else ""
        return (
            f"{self.reason}; {self.unrecorded} refusal{plural} of {self.host} "
            "for this reason since the last record, not recorded one by one"
        )


class _Revocation:
    """The CRLs a context checks peers against, read again when they change.

    A CA issues its next CRL before the current one's nextUpdate (RFC 5280
    5.1.2.5), and a site writes it over the old file: when a CRL file has
    changed, at most every CRL_RECHECK_SECONDS, the context is built anew
    from the files as they are, so that a running node takes a newer CRL,
    one that lifts a revocation, or one past its next update (whose CA's
    peers are then refused). A file that can no longer be read leaves the
    context as it was, and says so.
    """

    def __init__(
        self, purpose: ssl._SSLMethod, tls: TlsSettings, context: ssl.SSLContext
    ) -> None:
        self._purpose = purpose
        self._tls = tls
        self.context = context
        self._seen = _stamps(tls.crls)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> ssl.SSLContext:
        """The context to use now, built anew if a CRL file changed and
        CRL_RECHECK_SECONDS have passed since the last look."""
        now = time.monotonic()
        if now - self._checked < CRL_RECHECK_SECONDS:
            return self.context
        with self._lock:
            if now - self._checked < CRL_RECHECK_SECONDS:
                return self.context
            self._checked = now
            try:
                seen = _stamps(self._tls.crls)
                if seen != self._seen:
                    fresh = _new_context(self._purpose, self._tls)
                    _REVOCATIONS[fresh] = self
                    self.context, self._seen = fresh, seen
            except (OSError, ssl.SSLError, TlsConfigError) as exc:
                logger.warning(
                    "TLS: a CRL file cannot be read again (%s); the CRLs read "
                    "before stay in force",
                    exc,
                )
            return self.context


def _stamps(paths: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """When each file last changed, and its size."""
    stamps = {}
    for path in paths:
        status = os.stat(path)
        stamps[path] = (status.st_mtime_ns, status.st_size)
    return stamps


def _warn_if_out_of_date(path: str) -> None:
    """Warn of a CRL past its next update: the peers of its CA are refused
    until a current one comes (RFC 5280 6.3.3)."""
    marker = b"-----BEGIN X509 CRL-----"
    try:
        blocks = Path(path).read_bytes().split(marker)[1:]
        crls = [x509.load_pem_x509_crl(marker + block) for block in blocks]
    except (OSError, ValueError):
        return  # OpenSSL read it; what it makes of it decides
    now = datetime.datetime.now(datetime.UTC)
    for crl in crls:
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            logger.warning(
                "TLS: the CRL of %s in %s was due for renewal at %s; the "
                "peers it covers are refused until a current one is written",
                crl.issuer.rfc4514_string(),
                path,
                crl.next_update_utc.isoformat(timespec="seconds"),
            )


# The CRLs of each context built with [tls] crls.
_REVOCATIONS: weakref.WeakKeyDictionary[ssl.SSLContext, _Revocation] = (
    weakref.WeakKeyDictionary()
)


def refresh_revocation(context: ssl.SSLContext) -> ssl.SSLContext:
    """The context to run a handshake with in place of ``context``: the
    same, or one built anew with the CRLs renewed on disk since (see
    :class:`_Revocation`). Called before each handshake."""
    revocation = _REVOCATIONS.get(context)
    return context if revocation is None else revocation.current()


def _context(purpose: ssl._SSLMethod, tls: TlsSettings) -> ssl.SSLContext:
    """Return a context that presents our certificate and trusts ``trusted``,
    checking peers against ``crls`` when any are listed (and built anew as
    they are renewed: :func:`refresh_revocation`)."""
    context = _new_context(purpose, tls)
    if tls.crls:
        try:
            _REVOCATIONS[context] = _Revocation(purpose, tls, context)
        except OSError as exc:
            raise TlsConfigError(f"[tls] cannot be loaded: {exc}") from exc
    return context


def _new_context(purpose: ssl._SSLMethod, tls: TlsSettings) -> ssl.SSLContext:
    # Limitation: no OCSP (RFC 6960); revocation is known from CRLs alone.
    context = ssl.SSLContext(purpose)
    context.minimum_version = MINIMUM_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    files = [
        ("certificate", tls.certificate),
        ("private_key", tls.private_key),
        *(("trusted", path) for path in tls.trusted),
        *(("crls", path) for path in tls.crls),
    ]
    for setting, path in files:
        # Said of the file itself: OpenSSL's error names neither it nor
        # which of the two files of a chain it could not open.
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsConfigError(
                f"[tls] {setting} {path}: {exc.strerror or exc}"
            ) from exc
    with _naming(
        "certificate and private_key", f"{tls.certificate}, {tls.private_key}"
    ):
        context.load_cert_chain(tls.certificate, tls.private_key)
    for trusted in tls.trusted:
        with _naming("trusted", trusted):
            context.load_verify_locations(cafile=trusted)
    for crl in tls.crls:
        with _naming("crls", crl):
            context.load_verify_locations(cafile=crl)
        _warn_if_out_of_date(crl)
    if tls.crls:
        # The peer's own certificate; its CA is one of ``trusted``.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if tls.ciphers:
        with _naming("ciphers", tls.ciphers):
            context.set_ciphers(tls.ciphers)
    return context


@contextmanager
def _naming(setting: str, value: str) -> Iterator[None]:
    """Turn an error loading a [tls] setting into a TlsConfigError that
    names the setting and its value."""
    try:
        yield
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"[tls] {setting} {value} cannot be used: {exc}") from exc


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """Return the context of a listener: TLS 1.2 or higher, client certificate
    required and checked against ``tls.trusted`` only (ITI TF-2 3.19).

    Raises
    ------
    TlsConfigError
        A certificate, key or trusted file cannot be read or used.
    """
    return _context(ssl.PROTOCOL_TLS_SERVER, tls)


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """Return the context of a client: TLS 1.2 or higher, our certificate
    offered, the server's certificate and host name checked against
    ``tls.trusted`` only, never the system's CAs (ITI TF-2 3.19).

    Raises
    ------
    TlsConfigError
        A certificate, key or trusted file cannot be read or used.
    """
    return _context(ssl.PROTOCOL_TLS_CLIENT, tls)


@cache
def _cached_client_context(tls: TlsSettings) -> ssl.SSLContext:
    return client_context(tls)


def client_context_for(settings: Settings) -> ssl.SSLContext | None:
    """Return the node's client context when [tls] is enabled, else None.

    The context is built once per distinct [tls] section; a certificate
    renewed on disk is read by the next process.
    """
    if not settings.tls.enabled:
        return None
    return refresh_revocation(_cached_client_context(settings.tls))


class TlsGate:
    """The handshake a listener runs on each accepted connection.

    The handshake runs in the connection's own thread, so a slow or silent
    peer holds no other connection up. A refused peer is logged, handed to
    ``on_refused`` and its connection closed before anything is read from it.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        listener: str,
        on_refused: Callable[[RefusedPeer], None],
        *,
        timeout: float = 10.0,
    ) -> None:
        self.context = context
        self.listener = listener
        self.on_refused = on_refused
        self.timeout = timeout
        # DICOM PS3.15 A.5.3.11 asks for a Security Alert per failed node
        # authentication; a host failing in a loop writes one a minute.
        self.throttle = Throttle()

    def accept(self, sock: socket.socket, address: Any) -> ssl.SSLSocket | None:
        """Run the server handshake on ``sock``; None when the peer is refused.

        Under TLS 1.3 a client without a certificate believes its handshake
        done; the refusal shows here, and the client learns of it on its
        first read.
        """
        host, port = str(address[0]), int(address[1])
        sock.settimeout(self.timeout)
        context = refresh_revocation(self.context)
        try:
            secured = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
                # Why the peer's certificate failed: untrusted, expired,
                # revoked, or its CA's CRL out of date.
                reason = f"{reason}: {exc.verify_message}"
            sock.close()
            unrecorded = self.throttle.admit(host, str(reason))
            if unrecorded is None:
                logger.debug(
                    "TLS %s: refused peer %s:%d: %s", self.listener, host, port, reason
                )
                return None
            refused = RefusedPeer(self.listener, host, port, str(reason), unrecorded)
            logger.warning(
                "TLS %s: refused peer %s:%d: %s",
                self.listener,
                host,
                port,
                refused.detail,
            )
            self.on_refused(refused)
            return None
        secured.settimeout(None)
        logger.debug("TLS %s: %s:%d authenticated", self.listener, host, port)
        return secured


class TlsServerMixin:
    """Put a socketserver server's connections through ``tls_gate``, if set.

    Mix in before the server class; the listening socket stays plain and
    each connection is wrapped in its own thread (ThreadingMixIn).
    """

    tls_gate: TlsGate | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls_gate is None:
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        secured = self.tls_gate.accept(request, client_address)
        if secured is None:
            return
        try:
            super().finish_request(secured, client_address)  # type: ignore[misc]
        finally:
            try:
                secured.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("TLS %s: peer already gone", self.tls_gate.listener)
            secured.close()


def audit_refusal(
    auditor: audit.Auditor, local_host: str, refused: RefusedPeer
) -> None:
    """Record a refused peer as a Node Authentication Security Alert.

    DICOM PS3.15 A.5.3.11: EventOutcomeIndicator 4 (minor failure) says the
    mitigation, refusing the connection, worked; the reason OpenSSL gave goes
    in EventOutcomeDescription.
    """
    auditor.record(
        audit.AuditEvent(
            transaction=REFUSAL_TRANSACTION,
            actor=REFUSAL_ACTOR,
            outcome=audit.Outcome.MINOR_FAILURE,
            source=audit.Endpoint(f"{refused.host}:{refused.port}", refused.host),
            destination=audit.Endpoint(refused.listener, local_host),
            outcome_detail=f"TLS handshake refused: {refused.detail}",
            alert_subjects=(f"tls://{refused.host}:{refused.port}",),
        )
    )


# --- Test certificates -------------------------------------------------


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    """Write an unencrypted PEM key readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(pem)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xdsi"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    directory: Path, *, common_name: str = "xdsi test CA", days: int = 365
) -> CertificateFiles:
    """Create a self-signed test CA as ``ca.pem`` and ``ca-key.pem``.

    For test and demo nodes: a site runs its own PKI, whose CA certificate
    goes in every node's ``[tls] trusted``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    files = CertificateFiles(directory / "ca.pem", directory / "ca-key.pem")
    files.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(files.private_key, key)
    return files


def _subject_alternative_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_cert(
    directory: Path,
    ca: CertificateFiles,
    *,
    name: str = "node",
    hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
) -> CertificateFiles:
    """Create a node certificate signed by ``ca`` as ``<name>.pem`` and
    ``<name>-key.pem``.

    The certificate serves both ends of mutual TLS (extended key usages
    serverAuth and clientAuth) and names ``hosts`` as subjectAltName, DNS
    names and IP addresses alike, since a client checks the host it dialled
    against them.

    Raises
    ------
    ValueError
        ``hosts`` is empty, or the CA files are not a certificate and its key.
    """
    hosts = tuple(hosts)
    if not hosts:
        raise ValueError("make_cert needs at least one host for subjectAltName")
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
    ca_key = _signing_key(ca.private_key)
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertificateFiles(directory / f"{name}.pem", directory / f"{name}-key.pem")
    files.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(files.private_key, key)
    return files


def _signing_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The CA's private key at ``path``: RSA (as make_ca writes) or EC, the
    two a CA of ITI-19 certificates signs with SHA-256; ValueError for
    another."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an RSA or EC private key")
    return key


def make_crl(
    ca: CertificateFiles,
    path: Path,
    *,
    revoked: Iterable[Path] = (),
    days: float = 7,
    issued: datetime.datetime | None = None,
) -> Path:
    """Write the test CA's Certificate Revocation List to ``path`` (PEM).

    The CRL (RFC 5280 5) lists the serial numbers of the ``revoked``
    certificate files, is issued now (or at ``issued``) and names its next
    update ``days`` later; a CRL past its next update is no longer current,
    and a node checking CRLs then refuses the CA's peers.

    Raises
    ------
    ValueError
        The CA files are not a certificate and its RSA or EC key, or a
        revoked file is no PEM certificate.
    """
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
    ca_key = _signing_key(ca.private_key)
    now = issued or datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_certificate.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
    )
    for certificate_file in revoked:
        certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=5))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    # Renamed into place: a node reading the CRL again never sees half of it.
    temporary.replace(path)
    return path


def tls_settings(node: CertificateFiles, *trusted: Path) -> TlsSettings:
    """Return an enabled [tls] section for ``node``, trusting ``trusted``."""
    return TlsSettings(
        enabled=True,
        certificate=str(node.certificate),
        private_key=str(node.private_key),
        trusted=tuple(str(path) for path in trusted),
    )

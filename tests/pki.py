"""A throwaway certificate authority for TLS tests (ITI TF-2 3.19).

Writes PEM files for a CA, a server ("localhost", 127.0.0.1), a client
trusted by the CA, and a client signed by another CA, with the product's own
test-PKI commands (xdsi.tls), and builds the ``ssl`` contexts the product
takes. Keys are named ``<name>.key``, as the rsyslog test configuration reads
them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from xdsi import tls


@dataclass(frozen=True)
class Pki:
    """PEM file paths of one test CA and the certificates it signed."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def ca(self) -> Path:
        return self.path("ca.pem")

    def _settings(self, name: str) -> tls.TlsSettings:
        files = tls.CertificateFiles(self.path(f"{name}.pem"), self.path(f"{name}.key"))
        return tls.tls_settings(files, self.ca)

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.2+ server context that requires a client certificate."""
        return tls.server_context(self._settings("server"))

    def client_context(self, name: str = "client") -> ssl.SSLContext:
        """A TLS 1.2+ client context presenting certificate ``name``, or
        none when ``name`` is empty."""
        if name:
            return tls.client_context(self._settings(name))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(self.ca)
        return context


def _issue(directory: Path, ca: tls.CertificateFiles, name: str) -> None:
    files = tls.make_cert(directory / "work", ca, name=name)
    files.certificate.replace(directory / f"{name}.pem")
    files.private_key.replace(directory / f"{name}.key")


def make_pki(directory: Path) -> Pki:
    """Write ca, server, client and untrusted (another CA's) PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = tls.make_ca(directory / "work" / "ca", common_name="xdsi test CA")
    ca.certificate.replace(directory / "ca.pem")
    ca = tls.CertificateFiles(directory / "ca.pem", ca.private_key)
    for name in ("server", "client"):
        _issue(directory, ca, name)
    other = tls.make_ca(directory / "work" / "other", common_name="untrusted CA")
    _issue(directory, other, "untrusted")
    return Pki(directory)

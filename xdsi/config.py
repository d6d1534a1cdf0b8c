"""Node configuration: one TOML file to typed settings; defaults run the demo.

Every value has a default, so a node runs with no file at all on SQLite and
a local directory. A file overrides what it names:

.. code-block:: toml

    [node]
    storage_dir = "/var/lib/xdsi"
    assigning_authority = "1.3.6.1.4.1.21367.13.20.1000"

    [repository]
    port = 9082
    repository_unique_id = "1.3.6.1.4.1.21367.13.40.216"
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from xdsi.metadata.validation import MAX_OID_LENGTH, is_oid

# Default OIDs live under a UUID-derived OID (ITU-T X.667, arc 2.25) fixed for
# xdsi, so that an unconfigured node still has stable, valid identifiers.
XDSI_OID_ROOT = "2.25.127890502356717902159250805506845543275"

# The IHE Connectathon affinity domain's assigning authority, which the NIST
# and Gazelle test patients use (ITI TF-3 4.2.3.2.16 CX form).
CONNECTATHON_ASSIGNING_AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"


# Addresses that bind every interface and name none a peer can use.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")
# A host name (RFC 1123 labels) or an IPv4 or IPv6 address.
_HOST = re.compile(r"[A-Za-z0-9.:-]{1,253}")


def _is_host(value: str) -> bool:
    """Whether ``value`` is empty or could name a host in a URL."""
    return not value or bool(_HOST.fullmatch(value))


class ConfigError(Exception):
    """The configuration file is unreadable or names an unknown setting."""


BLOB_STORES = ("local", "s3")

# The smallest max_request_size and max_answer_size: a SOAP message with
# its envelope and a small document.
MIN_REQUEST_SIZE = 1024 * 1024

CODE_SET_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class NodeSettings:
    name: str = "xdsi"
    host: str = "127.0.0.1"
    # The host name or address peers reach this node by, when it is not
    # ``host`` (a listener on every interface, 0.0.0.0 or ::, or behind
    # NAT): named in the URLs the node gives out (a manifest's Retrieve
    # URL, STOW-RS answers, its endpoints) and in its audit records.
    advertised_host: str = ""
    storage_dir: str = "xdsi-data"
    database_url: str = ""
    assigning_authority: str = CONNECTATHON_ASSIGNING_AUTHORITY
    # Further patient identifier domains whose ITI-8 feeds the registry
    # accepts, for a registry that serves test systems of several domains.
    # An affinity domain normally has one (ITI TF-1 10.2.2); the command
    # line always qualifies bare ids with assigning_authority.
    other_assigning_authorities: tuple[str, ...] = ()
    home_community_id: str = f"urn:oid:{XDSI_OID_ROOT}.4"
    audit_source_id: str = "xdsi"
    enterprise_site_id: str = "xdsi"
    # Processes serving the HTTP actors, all on the same listening sockets
    # (DESIGN.md, Storage: web workers are stateless). 1 serves from the
    # node's own process; more use more cores. The MLLP listener and the
    # start-up sweep run in the node's own process only.
    workers: int = 1
    # The largest HTTP request body an actor takes, in bytes: a larger one
    # (an ITI-41, RAD-68 or STOW-RS) is refused with HTTP 413 before it
    # fills the spool. 4 GiB by default.
    max_request_size: int = 4 * 1024**3

    def __post_init__(self) -> None:
        # ITI TF-3 4.2.3.2.16: every patientId is ID^^^&OID&ISO, its
        # assigning authority an ISO OID (ITI TF-3 4.2.3.1.5, DICOM PS3.5
        # 9.1); a node qualifying ids with anything else could register none.
        for key, values in (
            ("assigning_authority", (self.assigning_authority,)),
            ("other_assigning_authorities", self.other_assigning_authorities),
        ):
            for value in values:
                if not is_oid(value):
                    raise ConfigError(
                        f"[node] {key} {value!r} is not an ISO OID: digits in "
                        f"arcs joined by dots, as 1.3.6.1.4.1.21367.13.20.1000, "
                        f"at most {MAX_OID_LENGTH} characters (ITI TF-3 4.2.3.1.5)"
                    )
        if self.host in WILDCARD_HOSTS and not self.advertised_host:
            # A URL naming 0.0.0.0 reaches no peer's way back to this node.
            raise ConfigError(
                f"[node] host {self.host} listens on every interface but names "
                "no address peers can reach; set [node] advertised_host to the "
                "name or address they use"
            )
        if self.advertised_host in WILDCARD_HOSTS or not _is_host(self.advertised_host):
            raise ConfigError(
                f"[node] advertised_host {self.advertised_host!r} is not a host "
                "name or address peers can reach"
            )
        if self.workers < 1:
            raise ConfigError("[node] workers must be at least 1")
        if self.max_request_size < MIN_REQUEST_SIZE:
            raise ConfigError(
                f"[node] max_request_size must be at least {MIN_REQUEST_SIZE} bytes"
            )

    @property
    def advertised(self) -> str:
        """The host peers reach this node by, as audit records name it
        (NetworkAccessPointID, DICOM PS3.15 A.5.1)."""
        return self.advertised_host or self.host

    @property
    def public_host(self) -> str:
        """The host peers reach this node by, as a URL names it (an IPv6
        address in brackets, RFC 3986 3.2.2)."""
        host = self.advertised
        return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class RegistrySettings:
    enabled: bool = True
    port: int = 9081
    path: str = "/xds/registry"
    feed_port: int = 2575
    # Seconds an ITI-8 MLLP connection may wait for its next complete frame
    # before it is closed (HL7 v2.5 Implementation Guide C.4).
    feed_timeout: float = 30.0
    max_results: int = 5000
    # The affinity domain's code sets (profiles/code_sets/<name>.toml) that
    # coded metadata must come from (ITI TF-3 4.2.3.1.7); an empty list, for
    # a domain that publishes none, accepts any code.
    code_sets: tuple[str, ...] = ("connectathon", "xdsi")

    def __post_init__(self) -> None:
        if self.feed_timeout <= 0:
            raise ConfigError(
                f"registry.feed_timeout {self.feed_timeout}: must be more than "
                "0 seconds"
            )
        for name in self.code_sets:
            if not CODE_SET_NAME.fullmatch(name):
                raise ConfigError(
                    f"[registry] code_sets names {name!r}; a code set is a file "
                    "name under profiles/code_sets without .toml"
                )


# The longest a repository waits for the registry's answer, and the oldest a
# pending document may grow before it is settled, in seconds.
MIN_TIMEOUT = 0.1
MAX_TIMEOUT = 86400.0
MAX_SWEEP_AGE = 30 * 86400


@dataclass(frozen=True)
class RepositorySettings:
    enabled: bool = True
    port: int = 9082
    path: str = "/xds/repository"
    repository_unique_id: str = f"{XDSI_OID_ROOT}.1"
    # ITI-42 goes to this URL; empty means this node's own registry.
    registry_url: str = ""
    # Where documents are kept: "local" (storage_dir/repository) or "s3".
    blob_store: str = "local"
    # The S3-compatible store; empty credentials fall back to the standard
    # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables.
    s3_endpoint_url: str = ""
    s3_bucket: str = "xdsi"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # ITI-42 waits this many seconds for the registry's whole answer.
    registry_timeout: float = 120.0
    # A document still pending this many seconds after it was stored is
    # settled by the sweep (at start-up, then every minute or half this age):
    # confirmed if the registry holds it, else removed. Younger ones may
    # belong to a submission under way in another worker, or to an ITI-42
    # the registry is still working on; it must exceed registry_timeout.
    pending_sweep_age: int = 600

    def __post_init__(self) -> None:
        if self.blob_store not in BLOB_STORES:
            raise ConfigError(
                f"[repository] blob_store {self.blob_store!r} is not one of "
                + ", ".join(BLOB_STORES)
            )
        if not (
            math.isfinite(self.registry_timeout)
            and MIN_TIMEOUT <= self.registry_timeout <= MAX_TIMEOUT
        ):
            raise ConfigError(
                f"[repository] registry_timeout must be {MIN_TIMEOUT} to "
                f"{MAX_TIMEOUT:.0f} seconds"
            )
        if not 1 <= self.pending_sweep_age <= MAX_SWEEP_AGE:
            raise ConfigError(
                f"[repository] pending_sweep_age must be 1 to {MAX_SWEEP_AGE} seconds"
            )
        if self.pending_sweep_age <= self.registry_timeout:
            raise ConfigError(
                "[repository] pending_sweep_age must exceed registry_timeout: a "
                "submission still waiting for the registry would be swept"
            )


@dataclass(frozen=True)
class ImagingSourceSettings:
    enabled: bool = True
    port: int = 9083
    path: str = "/xdsi/imaging-source"
    repository_unique_id: str = f"{XDSI_OID_ROOT}.2"
    source_id: str = f"{XDSI_OID_ROOT}.3"
    ae_title: str = "XDSI"
    institution_name: str = "xdsi"
    # RAD-68 goes to this URL; empty means this node's own repository.
    repository_url: str = ""
    # ITI-57, which deprecates a withdrawn manifest, goes to this URL: the
    # Document Registry of that repository. Empty means the registry this
    # node's repository registers with.
    registry_url: str = ""
    # Affinity-domain codes of the manifest's DocumentEntry and SubmissionSet
    # (ITI TF-3 4.2.3.2; the domain fixes them, these are the DICOM and
    # HL7 codes RAD TF-3 4.68.4.1.2.3 suggests as examples).
    class_code: tuple[str, str, str] = ("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images")
    type_code: tuple[str, str, str] = (
        "18748-4",
        "2.16.840.1.113883.6.1",
        "Diagnostic imaging study",
    )
    practice_setting_code: tuple[str, str, str] = (
        "394914008",
        "2.16.840.1.113883.6.96",
        "Radiology",
    )
    healthcare_facility_type_code: tuple[str, str, str] = (
        "22232009",
        "2.16.840.1.113883.6.96",
        "Hospital",
    )
    confidentiality_code: tuple[str, str, str] = (
        "N",
        "2.16.840.1.113883.5.25",
        "Normal",
    )
    content_type_code: tuple[str, str, str] = (
        "18748-4",
        "2.16.840.1.113883.6.1",
        "Diagnostic imaging study",
    )
    language_code: str = "en-US"
    accession_assigning_authority: str = f"{XDSI_OID_ROOT}.5"
    # DICOMweb WADO-RS and QIDO-RS (RAD TF-3 4.107, 4.129) and WADO-URI
    # (RAD TF-3 4.55) on the same HTTP port as RAD-69.
    dicomweb_path: str = "/dicomweb"
    wado_path: str = "/wado"
    # C-STORE SCP of the intake (DICOM PS3.4 B), on node.host; off unless set.
    store_scp: bool = False
    dicom_port: int = 11112
    # A study taken in is published once quiet for this many seconds; 0
    # turns auto-publishing off.
    publish_after: float = 30.0
    # STOW-RS Store Instances (DICOM PS3.18 10.5) on the imaging source's port.
    stow_path: str = "/dicomweb/studies"

    def __post_init__(self) -> None:
        # DICOM PS3.5 6.2 (AE): 1 to 16 characters of the default repertoire,
        # no backslash, no control character, not all spaces.
        title = self.ae_title
        if not (
            title.strip()
            and len(title) <= 16
            and title.isascii()
            and all(c.isprintable() and c != "\\" for c in title)
        ):
            raise ConfigError(
                f"[imaging_source] ae_title {title!r}: an AE title is 1 to 16 "
                "printable ASCII characters, no backslash (DICOM PS3.5 6.2)"
            )
        if not (math.isfinite(self.publish_after) and self.publish_after >= 0):
            raise ConfigError(
                f"[imaging_source] publish_after {self.publish_after}: seconds, "
                "0 or more (0 turns auto-publishing off)"
            )


@dataclass(frozen=True)
class SourceSettings:
    """The Document Source of ``xdsi submit`` (ITI-41 for plain documents)."""

    source_id: str = f"{XDSI_OID_ROOT}.6"
    # ITI-41 goes to this URL; empty means this node's own repository.
    repository_url: str = ""
    # The Patient Identity Source of ``xdsi feed`` (ITI-8) sends to this
    # HOST:PORT, the affinity domain registry's MLLP listener; empty means
    # this node's own registry (its feed_port).
    feed_address: str = ""
    timeout: float = 600.0
    author_institution: str = "xdsi"
    language_code: str = "en-US"
    # Affinity-domain codes (ITI TF-3 4.2.3.2); the domain fixes them. The
    # defaults are LOINC, SNOMED CT and HL7 codes of general use, and the
    # formatCode that says the mimeType alone tells the format.
    class_code: tuple[str, str, str] = (
        "34133-9",
        "2.16.840.1.113883.6.1",
        "Summary of episode note",
    )
    type_code: tuple[str, str, str] = (
        "34133-9",
        "2.16.840.1.113883.6.1",
        "Summary of episode note",
    )
    format_code: tuple[str, str, str] = (
        "urn:ihe:iti:xds:2017:mimeTypeSufficient",
        "1.3.6.1.4.1.19376.1.2.3",
        "mimeType Sufficient",
    )
    practice_setting_code: tuple[str, str, str] = (
        "394802001",
        "2.16.840.1.113883.6.96",
        "General medicine",
    )
    healthcare_facility_type_code: tuple[str, str, str] = (
        "22232009",
        "2.16.840.1.113883.6.96",
        "Hospital",
    )
    confidentiality_code: tuple[str, str, str] = (
        "N",
        "2.16.840.1.113883.5.25",
        "Normal",
    )
    content_type_code: tuple[str, str, str] = (
        "34133-9",
        "2.16.840.1.113883.6.1",
        "Summary of episode note",
    )

    def __post_init__(self) -> None:
        if self.feed_address:
            self.feed_target()

    def feed_target(self) -> tuple[str, int] | None:
        """``feed_address`` as a host and port; None when it is empty."""
        if not self.feed_address:
            return None
        host, _, port = self.feed_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"[source] feed_address {self.feed_address!r} must be HOST:PORT, "
                "the registry's ITI-8 MLLP listener"
            )
        return host, int(port)


@dataclass(frozen=True)
class ConsumerSettings:
    # ITI-18 goes to this URL; empty means this node's own registry.
    registry_url: str = ""
    timeout: float = 120.0
    # repositoryUniqueId -> ITI-43 or RAD-69 endpoint URL of other nodes.
    repositories: dict[str, str] = field(default_factory=dict)
    # The transfer syntaxes a RAD-69 request lists, most wanted first (RAD
    # TF-3 4.69.4.1.2); empty: every syntax pydicom knows, Explicit VR Little
    # Endian first. The Imaging Document Source sends each instance in the
    # first one it can produce, so list a study's own syntax first to get its
    # instances byte for byte as published.
    transfer_syntaxes: tuple[str, ...] = ()
    # The largest answer a find or fetch takes from a peer, in bytes: an
    # ITI-18, ITI-43 or RAD-69 answer (a RAD-69 answer carries every
    # instance asked of one Imaging Document Source) growing past it is
    # refused as it streams, and what came of it is removed, so that a peer
    # cannot fill this side's disk without end. 64 GiB by default: the
    # largest studies (breast tomosynthesis, thin-slice CT, whole-slide
    # microscopy) run to tens of GB at one source.
    max_answer_size: int = 64 * 1024**3

    def __post_init__(self) -> None:
        if self.max_answer_size < MIN_REQUEST_SIZE:
            raise ConfigError(
                f"[consumer] max_answer_size must be at least {MIN_REQUEST_SIZE} bytes"
            )
        # Refused here rather than at the first fetch, which would fail each
        # retrieve of a study and still exit after the others.
        if self.registry_url and not _is_http_url(self.registry_url):
            raise ConfigError(
                f"[consumer] registry_url {self.registry_url!r} is no http:// or "
                "https:// URL (ITI-18 is SOAP over HTTP, ITI TF-2 3.18.4)"
            )
        for unique_id, url in self.repositories.items():
            # ITI TF-3 4.2.3.2.18: a repositoryUniqueId is an OID.
            if not is_oid(unique_id):
                raise ConfigError(
                    f"[consumer.repositories] {unique_id!r} is no repositoryUniqueId: "
                    "an OID of digits in arcs joined by dots, at most "
                    f"{MAX_OID_LENGTH} characters (ITI TF-3 4.2.3.2.18)"
                )
            if not _is_http_url(url):
                raise ConfigError(
                    f"[consumer.repositories] {unique_id} = {url!r} is no http:// "
                    "or https:// URL of an ITI-43 or RAD-69 endpoint"
                )
        for syntax in self.transfer_syntaxes:
            # RAD TF-3 4.69.4.1.2: the list names Transfer Syntax UIDs
            # (DICOM PS3.5 9.1, 10).
            if not is_oid(syntax):
                raise ConfigError(
                    f"[consumer] transfer_syntaxes {syntax!r} is no Transfer "
                    "Syntax UID, such as 1.2.840.10008.1.2.1 (DICOM PS3.5 10)"
                )


@dataclass(frozen=True)
class TlsSettings:
    """ITI-19 Node Authentication: mutual TLS on every endpoint and client.

    ``certificate`` is this node's PEM certificate (its chain may follow),
    ``private_key`` its PEM key, and ``trusted`` the PEM files of the CAs, or
    the peers' own certificates, whose holders may connect and be connected
    to. ``crls`` are PEM files of the CAs' Certificate Revocation Lists
    (RFC 5280 5): with any listed, a peer's certificate is checked against
    its CA's CRL, and a peer whose CA has no current CRL among them is
    refused. The protocol floor is TLS 1.2 and cannot be lowered; ``ciphers``
    is an OpenSSL cipher list for TLS 1.2 (empty: Python's defaults).
    """

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    trusted: tuple[str, ...] = ()
    crls: tuple[str, ...] = ()
    ciphers: str = ""
    # A peer that has not finished its handshake this many seconds after
    # connecting is dropped.
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.enabled and not (
            self.certificate and self.private_key and self.trusted
        ):
            raise ConfigError(
                "[tls] enabled needs certificate, private_key and trusted; "
                "ITI TF-2 3.19 authenticates both ends of every connection"
            )
        if self.handshake_timeout <= 0:
            raise ConfigError("[tls] handshake_timeout must be more than 0 seconds")


@dataclass(frozen=True)
class AuditSettings:
    """ATNA: where audit goes (ITI-20), and the Audit Record Repository."""

    # ITI TF-2 3.20.6 syslog targets, "tls://host:port" (RFC 5425) or
    # "udp://host:port" (RFC 5426); each receives the whole audit spool.
    targets: tuple[str, ...] = ()
    # ITI TF-2 3.20.6.1: 10 (security/authorization) or 13 (log audit).
    facility: int = 10
    # Seconds before the first retry of a target that is down, doubled per
    # failure up to retry_max.
    retry_initial: float = 1.0
    retry_max: float = 60.0
    # RFC 5426 3.2: a larger message is not sent to UDP targets.
    udp_max_payload: int = 65507
    # The Audit Record Repository of ``xdsi arr``, on [node] host: syslog over
    # TLS (RFC 5425's port) and UDP, and the JSON query endpoint over HTTP.
    arr_tls_port: int = 6514
    arr_udp_port: int = 5514
    arr_http_port: int = 9084

    def __post_init__(self) -> None:
        from xdsi.audit.forwarder import Target

        for url in self.targets:
            try:
                Target.parse(url)
            except ValueError as exc:
                raise ConfigError(f"[audit] targets: {exc}") from exc
        if self.facility not in (10, 13):
            raise ConfigError("[audit] facility must be 10 or 13 (ITI TF-2 3.20.6.1)")


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    repository: RepositorySettings = field(default_factory=RepositorySettings)
    imaging_source: ImagingSourceSettings = field(default_factory=ImagingSourceSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    def __post_init__(self) -> None:
        taken: dict[int, str] = {}
        for where, port in self.listening_ports():
            if port and port in taken:
                raise ConfigError(
                    f"{taken[port]} and {where} are both {port}: each listener "
                    f"of the node on {self.node.host} needs a port of its own"
                )
            taken[port] = where

    def listening_ports(self) -> list[tuple[str, int]]:
        """The ports ``xdsi serve`` listens on, each named by its setting."""
        ports = []
        if self.registry.enabled:
            ports += [
                ("[registry] port", self.registry.port),
                ("[registry] feed_port", self.registry.feed_port),
            ]
        if self.repository.enabled:
            ports.append(("[repository] port", self.repository.port))
        if self.imaging_source.enabled:
            ports.append(("[imaging_source] port", self.imaging_source.port))
            if self.imaging_source.store_scp:
                ports.append(
                    ("[imaging_source] dicom_port", self.imaging_source.dicom_port)
                )
        return ports

    @property
    def storage(self) -> Path:
        return Path(self.node.storage_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.storage / 'xdsi.sqlite'}"

    def url(self, actor: str) -> str:
        """Return the endpoint URL of one of this node's HTTP actors."""
        section = getattr(self, actor)
        scheme = "https" if self.tls.enabled else "http"
        return f"{scheme}://{self.node.public_host}:{section.port}{section.path}"

    @property
    def dicomweb_url(self) -> str:
        """The base URL of the Imaging Document Source's DICOMweb services."""
        cfg = self.imaging_source
        scheme = "https" if self.tls.enabled else "http"
        host = self.node.public_host
        return f"{scheme}://{host}:{cfg.port}{cfg.dicomweb_path.rstrip('/')}"

    def dicomweb_resource(
        self, study: str, series: str | None = None, instance: str | None = None
    ) -> str:
        """The URL of a study, series or instance of this node's WADO-RS
        (DICOM PS3.18 10.4.1): its Retrieve URL (0008,1190)."""
        url = f"{self.dicomweb_url}/studies/{study}"
        if series is not None:
            url += f"/series/{series}"
            if instance is not None:
                url += f"/instances/{instance}"
        return url

    def imaging_endpoints(self) -> list[tuple[str, str]]:
        """The Imaging Document Source's services besides RAD-69, by name."""
        source = self.imaging_source
        root = self.url("imaging_source").removesuffix(source.path)
        endpoints = [
            ("dicomweb", f"{self.dicomweb_url} (QIDO-RS, WADO-RS)"),
            ("stow-rs", f"{root}{source.stow_path}"),
            ("wado-uri", f"{root}{source.wado_path}"),
        ]
        if source.store_scp:
            endpoints.append(
                (
                    "c-store scp",
                    f"{source.ae_title}@{self.node.public_host}:{source.dicom_port}",
                )
            )
        return endpoints

    @property
    def registry_url(self) -> str:
        return self.repository.registry_url or self.url("registry")

    @property
    def repository_url(self) -> str:
        return self.imaging_source.repository_url or self.url("repository")

    @property
    def imaging_source_registry_url(self) -> str:
        return self.imaging_source.registry_url or self.registry_url

    @property
    def source_repository_url(self) -> str:
        return self.source.repository_url or self.url("repository")

    @property
    def consumer_registry_url(self) -> str:
        return self.consumer.registry_url or self.url("registry")

    def with_ports(self, **ports: int) -> Settings:
        """Return a copy with other ports, e.g. ``with_ports(registry=0)``."""
        changed = self
        for actor, port in ports.items():
            key = "feed_port" if actor == "feed" else "port"
            section = "registry" if actor == "feed" else actor
            changed = replace(
                changed, **{section: replace(getattr(changed, section), **{key: port})}
            )
        return changed

    def with_storage(self, storage_dir: Path) -> Settings:
        return replace(self, node=replace(self.node, storage_dir=str(storage_dir)))


# The highest TCP or UDP port number (a 16-bit field, RFC 793 3.1).
MAX_PORT = 65535


def _is_http_url(value: str) -> bool:
    """Whether ``value`` is an http:// or https:// URL naming a host."""
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_port(key: str) -> bool:
    return key == "port" or key.endswith("_port")


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown setting [{name}] {key}{hint}")
        default = getattr(cls(), key)
        if isinstance(default, dict):
            if not isinstance(value, dict) or not all(
                isinstance(v, str) for v in value.values()
            ):
                raise ConfigError(f"[{name}] {key} wants a table of strings")
        elif isinstance(default, tuple) and (
            not default or known[key].type == "tuple[str, ...]"
        ):
            if not isinstance(value, list) or not all(
                isinstance(v, str) for v in value
            ):
                raise ConfigError(f"[{name}] {key} wants a list of strings")
            value = tuple(value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or len(value) != len(default):
                raise ConfigError(
                    f"[{name}] {key} wants a list of {len(default)} strings "
                    "(code, coding scheme, display name)"
                )
            value = tuple(str(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"[{name}] {key} wants true or false")
        elif isinstance(default, int) and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ConfigError(f"[{name}] {key} wants a whole number")
        elif _is_port(key) and not 0 <= value <= MAX_PORT:
            raise ConfigError(
                f"[{name}] {key} {value}: a port is 0 to {MAX_PORT} (RFC 793 3.1; "
                "0 lets the system choose)"
            )
        elif isinstance(default, float) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ConfigError(f"[{name}] {key} wants a number")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"[{name}] {key} wants a string")
        kwargs[key] = value
    return cls(**kwargs)


# Settings that name files: relative ones are read from the configuration
# file's own folder, wherever a command runs, so that a node and the client
# commands given its configuration find the same storage.
FILE_SETTINGS = {
    "node": ("storage_dir",),
    "tls": ("certificate", "private_key", "trusted", "crls"),
}


def _anchored(values: dict[str, Any], keys: tuple[str, ...], folder: Path) -> dict:
    """``values`` with each relative path of ``keys`` made one under
    ``folder``; other values as they are (their checks come after)."""
    anchored = dict(values)
    for key in keys:
        value = anchored.get(key)
        if isinstance(value, str):
            anchored[key] = _anchor(value, folder)
        elif isinstance(value, list):
            anchored[key] = [
                _anchor(item, folder) if isinstance(item, str) else item
                for item in value
            ]
    return anchored


def _anchor(value: str, folder: Path) -> str:
    path = Path(value).expanduser()
    return str(folder / path) if value and not path.is_absolute() else value


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from ``path``, or from $XDSI_CONFIG, or use defaults."""
    if path is None and os.environ.get("XDSI_CONFIG"):
        path = Path(os.environ["XDSI_CONFIG"])
    if path is None:
        return Settings()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    sections = {f.name: f.type for f in fields(Settings)}
    kwargs = {}
    for name, values in data.items():
        if name not in sections or not isinstance(values, dict):
            raise ConfigError(f"unknown section [{name}] in {path}")
        cls = type(getattr(Settings(), name))
        if name in FILE_SETTINGS:
            values = _anchored(values, FILE_SETTINGS[name], Path(path).resolve().parent)
        try:
            kwargs[name] = _section(cls, values, name)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
    try:
        return Settings(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path})") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def hide_password(url: str) -> str:
    """Return a database URL with its password, if any, as ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def to_toml(settings: Settings) -> str:
    """Render the effective settings as TOML that load_settings reads back;
    the storage folder as an absolute path.

    Secrets (settings whose name holds ``secret``, a database password) are
    not shown.
    """
    lines: list[str] = []
    for section in fields(Settings):
        values = dataclasses.asdict(getattr(settings, section.name))
        lines.append(f"[{section.name}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if key in tables:
                continue
            if isinstance(value, list):
                value = tuple(value)
            if key == "database_url" and value:
                value = hide_password(value)
            if section.name == "node" and key == "storage_dir":
                # Where it is, wherever the output is read back from.
                value = str(settings.storage)
            if "secret" in key and value:
                # A secret is never printed; the line says it is set.
                lines.append(f"# {key} is set (not shown)")
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables.items():
            lines.append(f"[{section.name}.{key}]")
            lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in table.items())
        lines.append("")
    lines.append(f"# database: {hide_password(settings.database_url)}")
    lines.append("# Effective endpoints")
    lines.extend(f"# {name}: {where}" for name, where in _endpoints(settings))
    return "\n".join(lines) + "\n"


def _endpoints(settings: Settings) -> list[tuple[str, str]]:
    """Where each actor listens; an actor not served here (``enabled =
    false``) says so and, for the registry, where its transactions go."""
    shown: list[tuple[str, str]] = []
    for actor in ("registry", "repository", "imaging_source"):
        if getattr(settings, actor).enabled:
            shown.append((actor, settings.url(actor)))
        elif actor == "registry":
            shown.append(
                (
                    actor,
                    f"not served here; ITI-42 to {settings.registry_url}, "
                    f"ITI-18 to {settings.consumer_registry_url}",
                )
            )
        else:
            shown.append((actor, "not served here"))
    feed = "patient identity feed (MLLP)"
    if settings.registry.enabled:
        shown.append(
            (feed, f"{settings.node.public_host}:{settings.registry.feed_port}")
        )
    else:
        target = settings.source.feed_address or "none ([source] feed_address)"
        shown.append((feed, f"not served here; xdsi feed sends to {target}"))
    if settings.imaging_source.enabled:
        shown.extend(settings.imaging_endpoints())
    return shown

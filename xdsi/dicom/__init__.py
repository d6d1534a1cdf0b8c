"""DICOM side of XDS-I.b: study scanning, the KOS manifest, metadata facts."""

from xdsi.dicom.kos import (
    Manifest,
    ManifestReference,
    NotAManifest,
    build_manifest,
    manifest_bytes,
    parse_manifest,
    write_manifest,
)
from xdsi.dicom.mapping import ManifestFacts, manifest_facts
from xdsi.dicom.scan import (
    DicomInputError,
    InstanceHeader,
    InvalidInstance,
    NotDicom,
    Patient,
    ScanResult,
    Series,
    Study,
    read_header,
    scan_directory,
)

__all__ = [
    "DicomInputError",
    "InstanceHeader",
    "InvalidInstance",
    "Manifest",
    "ManifestFacts",
    "ManifestReference",
    "NotAManifest",
    "NotDicom",
    "Patient",
    "ScanResult",
    "Series",
    "Study",
    "build_manifest",
    "manifest_bytes",
    "manifest_facts",
    "parse_manifest",
    "read_header",
    "scan_directory",
    "write_manifest",
]

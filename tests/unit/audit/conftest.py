"""Real identifiers for audit tests, read from the shared XDS-I.b data set."""

from dataclasses import dataclass

import pydicom
import pytest
from lxml import etree

from tests.conftest import dicom_path, shared_path
from xdsi import ns

XDSIB = ns.XDSIB
XDSB = ns.XDSB


@dataclass(frozen=True)
class RealIds:
    """Identifiers as a real XDS-I.b exchange carries them."""

    patient_id: str
    submission_set_unique_id: str
    document_unique_id: str
    study_instance_uid: str
    rad69_study_instance_uid: str
    rad69_document_unique_id: str
    repository_unique_id: str
    query_id: str
    query_request: bytes


def _external_identifier(metadata: etree._Element, name: str) -> str:
    # The NIST file uses a pre-release ebRIM 3.0 namespace, so match by local
    # name.
    for identifier in metadata.iter("{*}ExternalIdentifier"):
        label = identifier.find("{*}Name/{*}LocalizedString")
        if label is not None and label.get("value") == name:
            return identifier.get("value")
    raise LookupError(name)


@pytest.fixture(scope="session")
def real_ids() -> RealIds:
    """Ids of the IHE IDS-DEPT002-a MR study and two NIST conformance cases."""
    manifest = dicom_path("study-mr", "manifest")
    cases = shared_path("conformance", "cases")
    metadata = etree.parse(manifest / "metadata.xml").getroot()
    kos = pydicom.dcmread(manifest / "kos.dcm", stop_before_pixels=True)
    rad69 = etree.parse(
        cases / "rad69-ids2018-4803a-single_image" / "rad69-request.xml"
    ).getroot()
    query_file = cases / "iti18-findDocuments-refid" / "query.xml"
    query = etree.parse(query_file).getroot()
    return RealIds(
        patient_id=_external_identifier(metadata, "XDSSubmissionSet.patientId"),
        submission_set_unique_id=_external_identifier(
            metadata, "XDSSubmissionSet.uniqueId"
        ),
        document_unique_id=_external_identifier(metadata, "XDSDocumentEntry.uniqueId"),
        study_instance_uid=str(kos.StudyInstanceUID),
        rad69_study_instance_uid=rad69.find(f"{{{XDSIB}}}StudyRequest").get(
            "studyInstanceUID"
        ),
        rad69_document_unique_id=rad69.findtext(f".//{{{XDSB}}}DocumentUniqueId"),
        repository_unique_id=rad69.findtext(f".//{{{XDSB}}}RepositoryUniqueId"),
        query_id=query.find(f"{{{ns.RIM}}}AdhocQuery").get("id"),
        query_request=query_file.read_bytes(),
    )


@pytest.fixture(scope="session")
def audit_schema() -> etree.RelaxNG:
    """The DICOM PS3.15 A.5.1 audit message schema (RELAX NG), shared copy."""
    return etree.RelaxNG(
        etree.parse(shared_path("schemas", "dicom", "audit-message.rng"))
    )


@pytest.fixture(scope="session")
def ipf_audit_schema() -> etree.XMLSchema:
    """The IPF project's XSD form of the DICOM 2017c audit schema."""
    xsd = shared_path("schemas", "dicom", "dicom2017c-ipf.xsd")
    return etree.XMLSchema(etree.parse(xsd))

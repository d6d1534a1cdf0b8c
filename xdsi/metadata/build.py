"""Build the SubmitObjectsRequest of a submission (ITI-41, RAD-68, ITI-57).

ITI TF-3 4.2.3 and ITI TF-2 3.41.4.1.2: DocumentEntries, their SubmissionSet
and a HasMember Association from the SubmissionSet to each, with the
attributes tabled in profiles/xds_metadata.toml. RAD TF-3 4.68.4.1.2.3: an
imaging manifest is the submission of one DocumentEntry for the KOS.
ITI TF-2 3.57.4.1.3.3.2: an Update Document Set that changes a DocumentEntry's
availabilityStatus.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from lxml import etree

from xdsi import ns
from xdsi.metadata import ebrim
from xdsi.metadata.codes import Code
from xdsi.metadata.ebrim import add_code, add_external_id, add_name, add_slot, rim


@dataclass(frozen=True)
class DocumentEntrySpec:
    """What one DocumentEntry says (ITI TF-3 4.2.3.2).

    The affinity-domain codes and identifiers come from the Document
    Source's configuration; the others from the document.
    """

    entry_id: str
    unique_id: str
    patient_id: str
    source_patient_id: str
    source_patient_info: tuple[str, ...]
    title: str
    creation_time: str
    service_start_time: str | None
    service_stop_time: str | None
    event_codes: tuple[Code, ...]
    reference_ids: tuple[str, ...]
    mime_type: str
    format_code: Code
    class_code: Code
    type_code: Code
    practice_setting_code: Code
    healthcare_facility_type_code: Code
    confidentiality_code: Code
    language_code: str
    author_institution: str
    size: int
    sha1: str


@dataclass(frozen=True)
class ManifestEntry(DocumentEntrySpec):
    """What the DocumentEntry of one KOS manifest says (RAD TF-3
    4.68.4.1.2.3): the DICOM-derived values come from the manifest."""


@dataclass(frozen=True)
class SubmissionSetSpec:
    entry_id: str
    unique_id: str
    source_id: str
    patient_id: str
    content_type_code: Code
    author_institution: str
    submission_time: str
    # The SubmissionSet's title (rim:Name); none when empty.
    title: str = ""


# The title of a SubmissionSet that carries an imaging manifest.
MANIFEST_SUBMISSION_TITLE = "Imaging study manifest"


def new_oid() -> str:
    """Return a fresh UUID-derived OID (ITU-T X.667, arc 2.25), 44 characters
    at most, within the 64 that ITI TF-3 4.2.3.1.5 allows."""
    return f"2.25.{uuid.uuid4().int}"


def utc_dtm(moment: datetime | None = None) -> str:
    """Return a UTC DTM to the second (ITI TF-3 4.2.3.1.6)."""
    return (moment or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S")


def _attribute(kind: str, name: str) -> dict:
    return ebrim.attribute_spec(kind, name)


def _document_entry(entry: DocumentEntrySpec) -> etree._Element:
    kind = ebrim.DOCUMENT_ENTRY
    element = rim(
        "ExtrinsicObject",
        id=entry.entry_id,
        mimeType=entry.mime_type,
        objectType=ebrim.metadata_table()[kind]["object_type_stable"],
    )
    add_slot(element, "creationTime", [entry.creation_time])
    add_slot(element, "languageCode", [entry.language_code])
    if entry.service_start_time:
        add_slot(element, "serviceStartTime", [entry.service_start_time])
    if entry.service_stop_time:
        add_slot(element, "serviceStopTime", [entry.service_stop_time])
    add_slot(element, "sourcePatientId", [entry.source_patient_id])
    if entry.source_patient_info:
        add_slot(element, "sourcePatientInfo", list(entry.source_patient_info))
    add_slot(element, "hash", [entry.sha1])
    add_slot(element, "size", [str(entry.size)])
    if entry.reference_ids:
        add_slot(
            element,
            _attribute(kind, "referenceIdList")["slot"],
            list(entry.reference_ids),
        )
    add_name(element, entry.title)

    author = etree.SubElement(
        element,
        f"{{{ns.RIM}}}Classification",
        id=ebrim.new_uuid(),
        classificationScheme=_attribute(kind, "author")["scheme"],
        classifiedObject=entry.entry_id,
        nodeRepresentation="",
    )
    add_slot(author, "authorInstitution", [entry.author_institution])

    codes = {
        "classCode": [entry.class_code],
        "confidentialityCode": [entry.confidentiality_code],
        "eventCodeList": list(entry.event_codes),
        "formatCode": [entry.format_code],
        "healthcareFacilityTypeCode": [entry.healthcare_facility_type_code],
        "practiceSettingCode": [entry.practice_setting_code],
        "typeCode": [entry.type_code],
    }
    for attribute, values in codes.items():
        for code in values:
            add_code(
                element, _attribute(kind, attribute)["scheme"], code, entry.entry_id
            )

    for attribute, value in (
        ("patientId", entry.patient_id),
        ("uniqueId", entry.unique_id),
    ):
        spec = _attribute(kind, attribute)
        add_external_id(element, spec["scheme"], value, spec["name"], entry.entry_id)
    return element


def _submission_set(spec: SubmissionSetSpec) -> etree._Element:
    kind = ebrim.SUBMISSION_SET
    element = rim("RegistryPackage", id=spec.entry_id)
    add_slot(element, "submissionTime", [spec.submission_time])
    if spec.title:
        add_name(element, spec.title)
    author = etree.SubElement(
        element,
        f"{{{ns.RIM}}}Classification",
        id=ebrim.new_uuid(),
        classificationScheme=_attribute(kind, "author")["scheme"],
        classifiedObject=spec.entry_id,
        nodeRepresentation="",
    )
    add_slot(author, "authorInstitution", [spec.author_institution])
    add_code(
        element,
        _attribute(kind, "contentTypeCode")["scheme"],
        spec.content_type_code,
        spec.entry_id,
    )
    for attribute, value in (
        ("uniqueId", spec.unique_id),
        ("sourceId", spec.source_id),
        ("patientId", spec.patient_id),
    ):
        row = _attribute(kind, attribute)
        add_external_id(element, row["scheme"], value, row["name"], spec.entry_id)
    return element


def manifest_submission(
    entry: ManifestEntry, submission_set: SubmissionSetSpec
) -> etree._Element:
    """Build the SubmitObjectsRequest for one manifest."""
    if not submission_set.title:
        submission_set = replace(submission_set, title=MANIFEST_SUBMISSION_TITLE)
    return submission([entry], submission_set)


def submission(
    entries: Sequence[DocumentEntrySpec], submission_set: SubmissionSetSpec
) -> etree._Element:
    """Build the SubmitObjectsRequest of a SubmissionSet and its
    DocumentEntries (ITI TF-2 3.41.4.1.2)."""
    if not entries:
        raise ValueError("a submission needs at least one DocumentEntry")
    request = etree.Element(
        f"{{{ns.LCM}}}SubmitObjectsRequest", nsmap={"lcm": ns.LCM, "rim": ns.RIM}
    )
    object_list = etree.SubElement(request, f"{{{ns.RIM}}}RegistryObjectList")
    for entry in entries:
        object_list.append(_document_entry(entry))
    object_list.append(_submission_set(submission_set))
    etree.SubElement(
        object_list,
        f"{{{ns.RIM}}}Classification",
        id=ebrim.new_uuid(),
        classifiedObject=submission_set.entry_id,
        classificationNode=ebrim.metadata_table()[ebrim.SUBMISSION_SET][
            "classification_node"
        ],
    )
    for entry in entries:
        association = etree.SubElement(
            object_list,
            f"{{{ns.RIM}}}Association",
            id=ebrim.new_uuid(),
            associationType=ebrim.HAS_MEMBER,
            sourceObject=submission_set.entry_id,
            targetObject=entry.entry_id,
        )
        add_slot(association, "SubmissionSetStatus", ["Original"])
    return request


def add_replacement(
    request: etree._Element, entry_id: str, replaced_entry_uuid: str
) -> None:
    """Add an RPLC Association: ``entry_id`` replaces an Approved entry.

    ITI TF-3 4.2.2.2.3: the sourceObject is the new DocumentEntry, the
    targetObject the entryUUID of the one it replaces, which the Document
    Registry then deprecates.
    """
    rplc = ebrim.metadata_table()["DocumentRelationship"]["RPLC"]["type"]
    object_list = request.find(f"{{{ns.RIM}}}RegistryObjectList")
    if object_list is None:
        raise ValueError("the request has no rim:RegistryObjectList")
    etree.SubElement(
        object_list,
        f"{{{ns.RIM}}}Association",
        id=ebrim.new_uuid(),
        associationType=rplc,
        sourceObject=entry_id,
        targetObject=replaced_entry_uuid,
    )


def status_update_submission(
    submission_set: SubmissionSetSpec,
    entry_uuid: str,
    original_status: str,
    new_status: str,
) -> etree._Element:
    """Build the Update Document Set request that changes one DocumentEntry's
    availabilityStatus (ITI TF-2 3.57.4.1.3.3.2).

    The SubmissionSet and an UpdateAvailabilityStatus Association from it to
    ``entry_uuid``, with the OriginalStatus and NewStatus Slots.
    """
    table = ebrim.metadata_table()["MetadataUpdate"]
    request = etree.Element(
        f"{{{ns.LCM}}}SubmitObjectsRequest", nsmap={"lcm": ns.LCM, "rim": ns.RIM}
    )
    object_list = etree.SubElement(request, f"{{{ns.RIM}}}RegistryObjectList")
    object_list.append(_submission_set(submission_set))
    etree.SubElement(
        object_list,
        f"{{{ns.RIM}}}Classification",
        id=ebrim.new_uuid(),
        classifiedObject=submission_set.entry_id,
        classificationNode=ebrim.metadata_table()[ebrim.SUBMISSION_SET][
            "classification_node"
        ],
    )
    association = etree.SubElement(
        object_list,
        f"{{{ns.RIM}}}Association",
        id=ebrim.new_uuid(),
        associationType=table["update_availability_status"],
        sourceObject=submission_set.entry_id,
        targetObject=entry_uuid,
    )
    add_slot(association, table["original_status_slot"], [original_status])
    add_slot(association, table["new_status_slot"], [new_status])
    return request

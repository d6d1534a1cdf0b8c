"""Check a submission's metadata against XDS.b and XDS-I.b rules.

Implements the checks of ITI TF-3 4.1 and 4.2 that need no registry state:
one SubmissionSet, the attributes that profiles/xds_metadata.toml marks
required, value formats (CX patient ids, OIDs, DTM, SHA-1, size), patient id
agreement, uniqueIds unique within the message and membership of every
DocumentEntry in the SubmissionSet; and, given what the Document Registry
holds of the objects Associations name outside the submission, the rules of
ITI TF-3 4.2.2.1 (HasMember) and 4.2.2.2 (document relationships). Looking
those objects up is the registry's own. Given the affinity domain's code sets
(profiles/code_sets), check_codes holds coded metadata to them
(ITI TF-3 4.2.3.1.7).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from lxml import etree

from xdsi import ns
from xdsi.errors import (
    DeprecatedDocument,
    DuplicateUniqueIdInMessage,
    MetadataInvalid,
    PatientIdDoesNotMatch,
    UnresolvedReference,
    XdsError,
)
from xdsi.metadata import ebrim
from xdsi.metadata.ebrim import RegistryObject, Submission
from xdsi.profiles_loader import load_profile_table

# Per coded attribute (classCode, eventCodeList, codeList …), the
# (code, codingScheme) pairs the affinity domain allows.
CodeSets = Mapping[str, frozenset[tuple[str, str]]]

# Each pattern ends in \Z, not $, which would let a final newline through.

# ITI TF-3 4.2.3.1.5: an OID is at most 64 characters of digits and dots.
OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\Z")
MAX_OID_LENGTH = 64

# ITI TF-3 4.2.3.2.16: patientId is a CX with ID and an ISO assigning
# authority; the ID holds no delimiter and no control character.
PATIENT_ID_CX = re.compile(r"^[^\^&~\\|\x00-\x1f\x7f]+\^\^\^&([0-9.]+)&ISO\Z")
# The longest XDS patient id (CX) a registry keeps: what ITI-18 can name,
# an ebRIM Value being at most 256 characters (ebRS 3.0 rim.xsd).
MAX_PATIENT_ID = 256

# ITI TF-3 4.2.3.2.26: DocumentEntry uniqueId is OID or OID^extension.
DOCUMENT_UNIQUE_ID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+(\^[^\s]{1,16})?\Z")

SHA1_HEX = re.compile(r"^[0-9a-fA-F]{40}\Z")

# ITI TF-3 4.2.3.1.6: DTM precisions, YYYY up to YYYYMMDDhhmmss.
_DTM_FORMATS = {
    4: "%Y",
    6: "%Y%m",
    8: "%Y%m%d",
    10: "%Y%m%d%H",
    12: "%Y%m%d%H%M",
    14: "%Y%m%d%H%M%S",
}


# The largest document size the store's 64-bit size column holds.
MAX_SIZE = 2**63 - 1


def is_dtm(value: str) -> bool:
    """Tell whether ``value`` is an XDS DTM (ITI TF-3 Table 4.2.3.1.7-2)."""
    fmt = _DTM_FORMATS.get(len(value))
    if fmt is None or not value.isdigit():
        return False
    try:
        datetime.strptime(value, fmt)
    except ValueError:
        return False
    return True


def is_oid(value: str) -> bool:
    return len(value) <= MAX_OID_LENGTH and OID.match(value) is not None


def patient_id_problem(patient_id: str) -> str | None:
    """Say what keeps ``patient_id`` from being an XDS patientId, or None.

    ITI TF-3 4.2.3.2.16: a CX ``ID^^^&OID&ISO`` whose ID is not empty and
    holds no HL7 delimiter (``^ & ~ \\ |``) and no control character, its
    assigning authority an ISO OID (ITI TF-3 4.2.3.1.5); at most
    MAX_PATIENT_ID characters, so that a registry can keep and query it.
    The answer names no part of the value: it may reach a log or a peer.
    """
    if not patient_id:
        return "is empty; ITI TF-3 4.2.3.2.16 wants a CX ID^^^&OID&ISO"
    if len(patient_id) > MAX_PATIENT_ID:
        return (
            f"is {len(patient_id)} characters as an XDS CX; at most "
            f"{MAX_PATIENT_ID} can be registered and queried"
        )
    form = PATIENT_ID_CX.match(patient_id)
    if form is not None and is_oid(form.group(1)):
        return None

    # Say which part is wrong, reading the CX from its end.
    not_cx = "is not a CX of the form ID^^^&OID&ISO"
    id_part, cut, rest = patient_id.rpartition("^^^&")
    if not cut or not rest.endswith("&ISO"):
        return f"{not_cx} (ITI TF-3 4.2.3.2.16)"
    if not is_oid(rest.removesuffix("&ISO")):
        return (
            f"{not_cx}: its assigning authority is not an ISO OID (ITI TF-3 4.2.3.1.5)"
        )
    if not id_part:
        return f"{not_cx}: its ID is empty (ITI TF-3 4.2.3.2.16)"
    return (
        f"{not_cx}: its ID holds an HL7 delimiter (^ & ~ \\ |) or a control "
        "character (ITI TF-3 4.2.3.2.16)"
    )


def assign_entry_uuids(submission: Submission) -> dict[str, str]:
    """Replace symbolic ids by fresh entryUUIDs, and every reference to them.

    ITI TF-3 4.2.3.1.2: a Document Registry assigns a UUID to each object
    submitted with a symbolic id and rewrites the references.
    """
    mapping: dict[str, str] = {}
    for obj in submission.objects:
        if obj.id and not ebrim.is_uuid(obj.id):
            mapping.setdefault(obj.id, ebrim.new_uuid())

    reference_attributes = (
        "id",
        "classifiedObject",
        "registryObject",
        "sourceObject",
        "targetObject",
        "lid",
    )
    for element in submission.element.iter():
        if not isinstance(element.tag, str):
            continue
        for attribute in reference_attributes:
            value = element.get(attribute)
            if value in mapping:
                element.set(attribute, mapping[value])
            elif attribute == "id" and value is not None and not ebrim.is_uuid(value):
                # Classifications and ExternalIdentifiers need ids too.
                if element.tag != f"{{{ns.RIM}}}ObjectRef":
                    element.set(attribute, mapping.setdefault(value, ebrim.new_uuid()))

    for obj in submission.objects:
        obj.id = mapping.get(obj.id, obj.id)
        obj.source_object = mapping.get(obj.source_object, obj.source_object)
        obj.target_object = mapping.get(obj.target_object, obj.target_object)
        for classification in obj.classifications:
            classification.classified_object = mapping.get(
                classification.classified_object, classification.classified_object
            )
    return mapping


def check_submission(submission: Submission) -> list[XdsError]:
    """Return every rule the submission breaks, without registry state."""
    errors: list[XdsError] = []

    # ITI TF-3 4.1.4: exactly one SubmissionSet per submission.
    submission_sets = submission.submission_sets
    if len(submission_sets) != 1:
        errors.append(
            MetadataInvalid(
                f"submission holds {len(submission_sets)} SubmissionSets; "
                "ITI TF-3 4.1.4 wants exactly one"
            )
        )
    for obj in submission.objects:
        if obj.kind == "":
            errors.append(
                MetadataInvalid(
                    f"RegistryPackage {obj.id} is not classified as exactly one of "
                    "SubmissionSet and Folder (ITI TF-3 4.2.3.3, 4.2.3.4)",
                    obj.id,
                )
            )

    ids = Counter(o.id for o in submission.objects)
    for object_id, count in ids.items():
        if not object_id:
            errors.append(MetadataInvalid("a registry object has no id attribute"))
        elif count > 1:
            errors.append(
                MetadataInvalid(f"id {object_id} names {count} objects", object_id)
            )

    for obj in submission.objects:
        if obj.kind in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER):
            errors.extend(check_object(obj))
        # ITI TF-3 4.2.3.2 (logicalID): an object registered by ITI-42 is
        # its first version, whose lid is its own id; a lid naming another
        # object (another patient's, say) is a new version, which only an
        # Update Document Set (ITI-57) submits.
        if obj.logical_id and obj.logical_id != obj.id:
            errors.append(
                MetadataInvalid(
                    f"{obj.kind or 'RegistryObject'} {obj.id} has lid "
                    f"{obj.logical_id}: a first version's logicalID is its own id",
                    obj.id,
                )
            )

    if len(submission_sets) == 1:
        errors.extend(_check_patient_ids(submission, submission_sets[0]))
        errors.extend(_check_membership(submission, submission_sets[0]))
    errors.extend(_check_unique_ids_in_message(submission))
    return errors


def check_object(obj: RegistryObject) -> list[XdsError]:
    """Check one DocumentEntry, SubmissionSet or Folder against the table."""
    errors: list[XdsError] = []
    table = ebrim.metadata_table()[obj.kind]
    label = f"{obj.kind} {obj.id}"

    if obj.kind == ebrim.DOCUMENT_ENTRY:
        allowed = (table["object_type_stable"], table["object_type_on_demand"])
        if obj.object_type not in allowed:
            errors.append(
                MetadataInvalid(
                    f"{label} objectType is {obj.object_type!r}; "
                    "ITI TF-3 4.2.5.2 wants "
                    f"{allowed[0]} (stable)",
                    obj.id,
                )
            )

    for attribute, spec in table["attributes"].items():
        values = _values(obj, attribute, spec)
        if spec["required"] == "R" and not any(values):
            errors.append(
                MetadataInvalid(
                    f"{label} has no {attribute}; ITI TF-3 4.2.3 requires it", obj.id
                )
            )
            continue
        if not spec.get("multiple") and len(values) > 1:
            errors.append(
                MetadataInvalid(
                    f"{label} has {len(values)} values of {attribute}; one is allowed",
                    obj.id,
                )
            )
        if spec.get("dtm"):
            for value in values:
                if not is_dtm(value):
                    errors.append(
                        MetadataInvalid(
                            f"{label} {attribute} {value!r} is not a DTM "
                            "(ITI TF-3 4.2.3.1.6: YYYY[MM[DD[hh[mm[ss]]]]])",
                            obj.id,
                        )
                    )
        if spec["kind"] == "classification":
            for classification in obj.classifications:
                if classification.scheme == spec["scheme"]:
                    errors.extend(_check_code(label, attribute, classification))

    errors.extend(_check_formats(obj, label))
    return errors


def _values(obj: RegistryObject, attribute: str, spec: dict) -> list[str]:
    kind = spec["kind"]
    if kind == "external_identifier":
        # Every ExternalIdentifier of the scheme, so that a second one (which
        # RegistryObject.external_ids would hide) is counted.
        return [
            child.get("value", "")
            for child in obj.element.findall(f"{{{ns.RIM}}}ExternalIdentifier")
            if child.get("identificationScheme") == spec["scheme"]
        ]
    if kind in ("classification", "author"):
        return [
            c.node_representation or "author"
            for c in obj.classifications
            if c.scheme == spec["scheme"]
        ]
    if kind == "attribute":
        value = obj.element.get(spec["name"])
        return [value] if value else []
    return obj.slots.get(spec.get("slot", attribute), [])


def _check_code(
    label: str, attribute: str, classification: ebrim.Classification
) -> list[XdsError]:
    """ITI TF-3 4.2.3.1.7: a code has a value, a codingScheme and a name."""
    errors: list[XdsError] = []
    if not classification.node_representation:
        errors.append(
            MetadataInvalid(
                f"{label} {attribute} has an empty nodeRepresentation", label
            )
        )
    schemes = classification.slots.get("codingScheme", [])
    if len(schemes) != 1 or not schemes[0]:
        errors.append(
            MetadataInvalid(
                f"{label} {attribute} {classification.node_representation!r} needs "
                "exactly one codingScheme slot value (ITI TF-3 4.2.3.1.7)",
                label,
            )
        )
    return errors


@lru_cache(maxsize=8)
def load_code_sets(names: tuple[str, ...]) -> CodeSets:
    """Merge profiles/code_sets/<name>.toml for each name into one CodeSets.

    Raises
    ------
    ValueError
        A name has no table under profiles/code_sets.
    """
    merged: dict[str, set[tuple[str, str]]] = {}
    for name in names:
        try:
            table = load_profile_table(f"code_sets/{name}")
        except FileNotFoundError:
            raise ValueError(
                f"no code set {name!r}: profiles/code_sets/{name}.toml is missing"
            ) from None
        for attribute, entries in table.items():
            codes = merged.setdefault(attribute, set())
            codes.update((entry["code"], entry["scheme"]) for entry in entries)
    return MappingProxyType({a: frozenset(c) for a, c in merged.items()})


def check_codes(submission: Submission, code_sets: CodeSets) -> list[XdsError]:
    """Return a MetadataInvalid for each coded value outside the code sets.

    ITI TF-3 4.2.3.1.7: coded metadata takes its values from the XDS
    Affinity Domain's code sets; a code is its value and codingScheme
    together. An attribute that no code set lists is not checked, so empty
    code sets accept anything (a domain that publishes no codes).
    """
    # Limitation: only code and scheme are compared; a display name that
    # differs from the code set's is accepted as sent.
    errors: list[XdsError] = []
    table = ebrim.metadata_table()
    for obj in submission.objects:
        if obj.kind not in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER):
            continue
        for attribute, spec in table[obj.kind]["attributes"].items():
            allowed = code_sets.get(attribute)
            if spec["kind"] != "classification" or allowed is None:
                continue
            for classification in obj.classifications:
                if classification.scheme != spec["scheme"]:
                    continue
                code = classification.code()
                # An empty value or scheme is reported by check_object.
                if not code.code or not code.scheme:
                    continue
                if (code.code, code.scheme) not in allowed:
                    errors.append(
                        MetadataInvalid(
                            f"{obj.kind} {obj.id} {attribute} {code.code!r} "
                            f"(scheme {code.scheme}) is not in the affinity "
                            "domain's code set (ITI TF-3 4.2.3.1.7)",
                            obj.id,
                        )
                    )
    return errors


def _check_formats(obj: RegistryObject, label: str) -> list[XdsError]:
    errors: list[XdsError] = []
    problem = None if obj.patient_id is None else patient_id_problem(obj.patient_id)
    if problem is not None:
        errors.append(MetadataInvalid(f"{label} patientId {problem}", obj.id))
    unique_id = obj.unique_id
    if obj.kind == ebrim.DOCUMENT_ENTRY:
        if unique_id is not None and (
            not DOCUMENT_UNIQUE_ID.match(unique_id)
            or len(unique_id.split("^")[0]) > MAX_OID_LENGTH
        ):
            errors.append(
                MetadataInvalid(
                    f"{label} uniqueId {unique_id!r} is not an OID of at most "
                    f"{MAX_OID_LENGTH} characters with an optional ^extension "
                    "(ITI TF-3 4.2.3.1.5, 4.2.3.2.26)",
                    obj.id,
                )
            )
        hash_value = obj.slot("hash")
        if hash_value and not SHA1_HEX.match(hash_value):
            errors.append(
                MetadataInvalid(
                    f"{label} hash has {len(hash_value)} characters; "
                    "ITI TF-3 4.2.3.2.10 "
                    "wants 40 hex digits",
                    obj.id,
                )
            )
        size = obj.slot("size")
        if size and not (size.isascii() and size.isdigit()):
            errors.append(
                MetadataInvalid(
                    f"{label} size {size!r} is not a non-negative integer "
                    "(ITI TF-3 4.2.3.2.19)",
                    obj.id,
                )
            )
        elif size and int(size) > MAX_SIZE:
            errors.append(
                MetadataInvalid(
                    f"{label} size {size} is more than this registry records "
                    f"({MAX_SIZE} bytes, a signed 64-bit integer)",
                    obj.id,
                )
            )
        errors.extend(_check_imaging_manifest(obj, label))
    elif unique_id is not None and not is_oid(unique_id):
        errors.append(
            MetadataInvalid(
                f"{label} uniqueId {unique_id!r} is not an OID (ITI TF-3 4.2.3.3.12)",
                obj.id,
            )
        )
    if obj.kind == ebrim.SUBMISSION_SET:
        source_id = obj.external_id("sourceId")
        if source_id is not None and not is_oid(source_id):
            errors.append(
                MetadataInvalid(
                    f"{label} sourceId {source_id!r} is not an OID "
                    "(ITI TF-3 4.2.3.3.9)",
                    obj.id,
                )
            )
    return errors


def _check_imaging_manifest(obj: RegistryObject, label: str) -> list[XdsError]:
    """RAD TF-3 4.68.4.1.2.3: a KOS manifest entry is application/dicom."""
    xdsi_table = ebrim.metadata_table()["XDS-I"]
    formats = [c.code for c in obj.codes("formatCode")]
    if (
        xdsi_table["format_code"] in formats
        and obj.mime_type != xdsi_table["mime_type"]
    ):
        return [
            MetadataInvalid(
                f"{label} has the KOS manifest formatCode but mimeType "
                f"{obj.mime_type!r}; RAD TF-3 4.68.4.1.2.3 wants application/dicom",
                obj.id,
            )
        ]
    return []


def _check_patient_ids(
    submission: Submission, submission_set: RegistryObject
) -> list[XdsError]:
    """ITI TF-3 4.2.3.2.16: every object carries the SubmissionSet's patientId."""
    expected = submission_set.patient_id
    if expected is None:
        # The missing attribute is reported by check_object already.
        return []
    errors: list[XdsError] = []
    for obj in submission.document_entries + submission.folders:
        if obj.patient_id is not None and obj.patient_id != expected:
            errors.append(
                PatientIdDoesNotMatch(
                    f"{obj.kind} {obj.id} patientId differs from the SubmissionSet's",
                    obj.id,
                )
            )
    return errors


def _check_membership(
    submission: Submission, submission_set: RegistryObject
) -> list[XdsError]:
    """ITI TF-3 4.2.2.1: each DocumentEntry and Folder is a member of the
    SubmissionSet; each Association is of a type of ITI TF-3 4.2.2.

    An end of an Association that is an entryUUID outside the submission may
    name an object already registered; check_references judges those.
    """
    errors: list[XdsError] = []
    known = {o.id for o in submission.objects}
    members = set()
    for association in submission.associations:
        kind = association.association_type
        if kind != ebrim.HAS_MEMBER and kind not in relationship_types():
            errors.append(
                MetadataInvalid(
                    f"Association {association.id} type {kind} is none of "
                    "ITI TF-3 4.2.2",
                    association.id,
                )
            )
            continue
        for end, value in (
            ("sourceObject", association.source_object),
            ("targetObject", association.target_object),
        ):
            if value not in known and not ebrim.is_uuid(value):
                errors.append(
                    UnresolvedReference(
                        f"Association {association.id} {end} {value} names no "
                        "object of the submission and is no entryUUID",
                        association.id,
                    )
                )
        if association.source_object == submission_set.id:
            members.add(association.target_object)
            status = association.slot("SubmissionSetStatus")
            if status not in (None, "Original", "Reference"):
                errors.append(
                    MetadataInvalid(
                        f"Association {association.id} SubmissionSetStatus {status!r}; "
                        "ITI TF-3 4.2.2.1.1 wants Original or Reference",
                        association.id,
                    )
                )
    for entry in submission.document_entries + submission.folders:
        if entry.id not in members:
            errors.append(
                MetadataInvalid(
                    f"{entry.kind} {entry.id} is not a member of the SubmissionSet "
                    "(no HasMember Association; ITI TF-3 4.2.2.1)",
                    entry.id,
                )
            )
    return errors


@dataclass(frozen=True)
class HeldObject:
    """An object already in the Document Registry that a submission names."""

    entry_uuid: str
    kind: str
    patient_id: str | None
    status: str


def relationship_types() -> dict[str, dict[str, Any]]:
    """Document relationship rows of profiles/xds_metadata.toml, by type URN."""
    return {
        row["type"]: {"name": name, **row}
        for name, row in ebrim.metadata_table()["DocumentRelationship"].items()
    }


def external_references(submission: Submission) -> set[str]:
    """Return the entryUUIDs Associations name outside the submission."""
    known = {o.id for o in submission.objects}
    return {
        value
        for association in submission.associations
        for value in (association.source_object, association.target_object)
        if value not in known
    }


def check_references(
    submission: Submission, held: Mapping[str, HeldObject]
) -> list[XdsError]:
    """Check each Association against the objects its ends name.

    ``held`` maps the entryUUIDs of external_references that the Document
    Registry holds to what it knows of them. ITI TF-3 4.2.2.1: a HasMember
    Association runs from the SubmissionSet to an object of the submission
    or to a registered DocumentEntry of the same patient, or from a Folder
    (new or registered) to a DocumentEntry of the Folder's patient.
    ITI TF-3 4.2.2.2: a document relationship runs from a DocumentEntry of
    the submission to an Approved DocumentEntry already registered, of the
    same patient.
    """
    new = {o.id: o for o in submission.objects}
    errors: list[XdsError] = []
    for association in submission.associations:
        ends = []
        for end, value in (
            ("sourceObject", association.source_object),
            ("targetObject", association.target_object),
        ):
            if value in new:
                obj = new[value]
                ends.append(HeldObject(value, obj.kind, obj.patient_id, ""))
            elif value in held:
                ends.append(held[value])
            else:
                errors.append(
                    UnresolvedReference(
                        f"Association {association.id} {end} {value} names no "
                        "object of the submission nor of the Document Registry",
                        association.id,
                    )
                )
        if len(ends) == 2:
            errors.extend(_check_association(association, *ends, new))
    return errors


def _check_association(
    association: RegistryObject,
    source: HeldObject,
    target: HeldObject,
    new: Mapping[str, RegistryObject],
) -> list[XdsError]:
    label = f"Association {association.id}"
    kind = association.association_type
    if kind == ebrim.HAS_MEMBER:
        if source.kind == ebrim.SUBMISSION_SET and source.entry_uuid in new:
            if target.entry_uuid in new or target.kind == ebrim.DOCUMENT_ENTRY:
                return _same_patient(label, source, target)
            return [
                MetadataInvalid(
                    f"{label} makes registered {target.kind} {target.entry_uuid} a "
                    "member of the SubmissionSet; ITI TF-3 4.2.2.1 allows only "
                    "registered DocumentEntries",
                    association.id,
                )
            ]
        if source.kind == ebrim.FOLDER and target.kind == ebrim.DOCUMENT_ENTRY:
            return _same_patient(label, source, target)
        return [
            MetadataInvalid(
                f"{label} HasMember from {source.kind or 'object'} "
                f"{source.entry_uuid} to {target.kind or 'object'} "
                f"{target.entry_uuid}; ITI TF-3 4.2.2.1 wants SubmissionSet or "
                "Folder members",
                association.id,
            )
        ]

    if source.entry_uuid not in new or source.kind != ebrim.DOCUMENT_ENTRY:
        return [
            MetadataInvalid(
                f"{label} {kind} sourceObject must be a DocumentEntry of the "
                "submission (ITI TF-3 4.2.2.2)",
                association.id,
            )
        ]
    if target.entry_uuid in new or target.kind != ebrim.DOCUMENT_ENTRY:
        return [
            MetadataInvalid(
                f"{label} {kind} targetObject must be a DocumentEntry already in "
                "the Document Registry (ITI TF-3 4.2.2.2)",
                association.id,
            )
        ]
    if target.status != ebrim.STATUS_APPROVED:
        return [
            DeprecatedDocument(
                f"{label} {kind} targets DocumentEntry {target.entry_uuid}, which "
                "is not Approved (ITI TF-3 4.2.2.2)",
                association.id,
            )
        ]
    return _same_patient(label, source, target)


def _same_patient(label: str, source: HeldObject, target: HeldObject) -> list[XdsError]:
    """ITI TF-3 4.2.2: both ends of an Association are of one patient."""
    if (
        source.patient_id
        and target.patient_id
        and source.patient_id != target.patient_id
    ):
        return [
            PatientIdDoesNotMatch(
                f"{label} links {source.kind} {source.entry_uuid} and "
                f"{target.kind} {target.entry_uuid} of different patients",
                target.entry_uuid,
            )
        ]
    return []


def _check_unique_ids_in_message(submission: Submission) -> list[XdsError]:
    counts = Counter(o.unique_id for o in submission.objects if o.unique_id)
    return [
        DuplicateUniqueIdInMessage(
            f"uniqueId {unique_id} is used by {count} objects of the submission",
            unique_id,
        )
        for unique_id, count in counts.items()
        if count > 1
    ]


def set_status(submission: Submission, status: str) -> None:
    """Set availabilityStatus on every object (ITI TF-3 4.1.4: Approved)."""
    for obj in submission.objects:
        obj.element.set("status", status)


def entry_elements(submission: Submission) -> list[etree._Element]:
    """Return the elements of every object, in submission order."""
    return [o.element for o in submission.objects]

"""ebRIM 3.0 objects of XDS: read a RegistryObjectList into plain objects.

Implements the mapping of ITI TF-3 4.2.3 (DocumentEntry, SubmissionSet,
Folder, Association) onto ExtrinsicObject, RegistryPackage, Classification,
ExternalIdentifier and Slot, as tabled in profiles/xds_metadata.toml.
Each object keeps the element it was read from, so that the Document
Registry can store what was submitted and return it faithfully
(DESIGN.md, "store what was submitted, index what is queried").
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from lxml import etree

from xdsi import ns
from xdsi.metadata.codes import Code
from xdsi.profiles_loader import load_profile_table
from xdsi.wire.xml import xml_text

RIM = ns.RIM

# ebRIM status values (ebRS 3.0, ITI TF-3 4.2.2).
STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
STATUS_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
STATUS_SUBMITTED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Submitted"

# ITI TF-3 4.2.2.2: Association types.
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
REGISTRY_PACKAGE_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage"
)
ASSOCIATION_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association"
)
CLASSIFICATION_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
)
EXTERNAL_IDENTIFIER_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
)

DOCUMENT_ENTRY = "DocumentEntry"
SUBMISSION_SET = "SubmissionSet"
FOLDER = "Folder"
ASSOCIATION = "Association"


@cache
def metadata_table() -> dict[str, Any]:
    """Return profiles/xds_metadata.toml."""
    return load_profile_table("xds_metadata")


def attribute_spec(kind: str, attribute: str) -> dict[str, Any]:
    """Return the table row for one attribute of an object kind."""
    return metadata_table()[kind]["attributes"][attribute]


def new_uuid() -> str:
    """Return a fresh entryUUID in ``urn:uuid:`` form (ITI TF-3 4.2.3.1.2)."""
    return f"urn:uuid:{uuid.uuid4()}"


# ITI TF-3 4.2.3.1.2: urn:uuid: and the UUID's canonical 8-4-4-4-12 hex
# form (RFC 4122 3; hex digits of either case, as RFC 4122 reads them).
_UUID_URN = re.compile(
    r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    r"-[0-9a-fA-F]{12}"
)


def is_uuid(value: str) -> bool:
    """Tell whether ``value`` is a ``urn:uuid:`` id rather than a symbolic id.

    Only the canonical form counts: braces, missing hyphens or a doubled
    prefix (which Python's UUID parser takes) make the id symbolic, so the
    registry assigns a UUID of its own instead of keeping one UUID under
    several spellings.
    """
    return _UUID_URN.fullmatch(value) is not None


def canonical_id(value: str) -> str:
    """Return a ``urn:uuid:`` id in lower case, any other id as given.

    RFC 4122 3: the hex digits of a UUID are case insensitive on input and
    output in lower case, so ``urn:uuid:7EDCA82F-…`` and
    ``urn:uuid:7edca82f-…`` name one object. A symbolic id is the
    submitter's own word and is not touched.
    """
    return value.lower() if is_uuid(value) else value


# The ebRIM 3.0 attributes whose value names a registry object (its own id,
# or a reference to another): the ids of ExtrinsicObject, RegistryPackage,
# Association, Classification, ExternalIdentifier and ObjectRef, and the
# ClassificationSchemes, ClassificationNodes and objectTypes that ITI TF-3
# 4.2.5 names by UUID. Values such as uniqueId and patientId are not ids.
ID_ATTRIBUTES = (
    "id",
    "lid",
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
    "classificationScheme",
    "classificationNode",
    "identificationScheme",
    "objectType",
)


def canonicalise_ids(container: etree._Element) -> None:
    """Write every ``urn:uuid:`` id under ``container`` in lower case.

    RFC 4122 3: a UUID is case insensitive on input; read in one case, an
    entryUUID compares equal however its sender spelled it, and is stored
    and answered in the lower case RFC 4122 3 outputs.
    """
    for element in container.iter(tag=etree.Element):
        for attribute in ID_ATTRIBUTES:
            value = element.get(attribute)
            if value is not None and is_uuid(value):
                element.set(attribute, value.lower())


@dataclass
class Classification:
    """An ebRIM Classification: a coded value, an author, or a node."""

    scheme: str
    classified_object: str
    node_representation: str
    classification_node: str
    slots: dict[str, list[str]]
    name: str
    element: etree._Element

    def code(self) -> Code:
        scheme = (self.slots.get("codingScheme") or [""])[0]
        return Code(self.node_representation, scheme, self.name)


@dataclass
class RegistryObject:
    """One XDS object as submitted, with its children read out."""

    kind: str
    id: str
    element: etree._Element
    slots: dict[str, list[str]] = field(default_factory=dict)
    classifications: list[Classification] = field(default_factory=list)
    external_ids: dict[str, str] = field(default_factory=dict)
    name: str = ""

    # Associations only.
    association_type: str = ""
    source_object: str = ""
    target_object: str = ""

    def slot(self, name: str) -> str | None:
        values = self.slots.get(name)
        return values[0] if values else None

    @property
    def status(self) -> str:
        return self.element.get("status", "")

    @property
    def mime_type(self) -> str:
        return self.element.get("mimeType", "")

    @property
    def object_type(self) -> str:
        return self.element.get("objectType", "")

    @property
    def logical_id(self) -> str:
        return self.element.get("lid", "")

    def external_id(self, attribute: str) -> str | None:
        attributes = metadata_table().get(self.kind, {}).get("attributes", {})
        if attribute not in attributes:
            return None
        return self.external_ids.get(attributes[attribute]["scheme"])

    @property
    def unique_id(self) -> str | None:
        return self.external_id("uniqueId")

    @property
    def patient_id(self) -> str | None:
        return self.external_id("patientId")

    def codes(self, attribute: str) -> list[Code]:
        scheme = attribute_spec(self.kind, attribute)["scheme"]
        return [c.code() for c in self.classifications if c.scheme == scheme]

    def authors(self) -> list[dict[str, list[str]]]:
        attributes = metadata_table().get(self.kind, {}).get("attributes", {})
        if "author" not in attributes:
            return []
        scheme = attributes["author"]["scheme"]
        return [c.slots for c in self.classifications if c.scheme == scheme]


@dataclass
class Submission:
    """The objects of one SubmitObjectsRequest or RegistryObjectList."""

    objects: list[RegistryObject]
    element: etree._Element

    def of_kind(self, kind: str) -> list[RegistryObject]:
        return [o for o in self.objects if o.kind == kind]

    @property
    def document_entries(self) -> list[RegistryObject]:
        return self.of_kind(DOCUMENT_ENTRY)

    @property
    def submission_sets(self) -> list[RegistryObject]:
        return self.of_kind(SUBMISSION_SET)

    @property
    def folders(self) -> list[RegistryObject]:
        return self.of_kind(FOLDER)

    @property
    def associations(self) -> list[RegistryObject]:
        return self.of_kind(ASSOCIATION)


def _text_name(element: etree._Element) -> str:
    value = element.find(f"{{{RIM}}}Name/{{{RIM}}}LocalizedString")
    return value.get("value", "") if value is not None else ""


def _slots(element: etree._Element) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {}
    for slot in element.findall(f"{{{RIM}}}Slot"):
        values = [
            v.text or "" for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
        ]
        slots.setdefault(slot.get("name", ""), []).extend(values)
    return slots


def _classification(element: etree._Element) -> Classification:
    return Classification(
        scheme=element.get("classificationScheme", ""),
        classified_object=element.get("classifiedObject", ""),
        node_representation=element.get("nodeRepresentation", ""),
        classification_node=element.get("classificationNode", ""),
        slots=_slots(element),
        name=_text_name(element),
        element=element,
    )


def _read_object(element: etree._Element, kind: str) -> RegistryObject:
    obj = RegistryObject(
        kind=kind,
        id=element.get("id", ""),
        element=element,
        slots=_slots(element),
        name=_text_name(element),
    )
    for child in element.findall(f"{{{RIM}}}Classification"):
        obj.classifications.append(_classification(child))
    for child in element.findall(f"{{{RIM}}}ExternalIdentifier"):
        obj.external_ids[child.get("identificationScheme", "")] = child.get("value", "")
    return obj


def _package_kind(package: etree._Element, loose: list[etree._Element]) -> str | None:
    """Tell a SubmissionSet from a Folder by its classification node.

    ITI TF-3 4.2.3.3 and 4.2.3.4: the Classification may sit inside the
    RegistryPackage or stand alone in the RegistryObjectList. None when it
    is classified as neither, or as both.
    """
    nodes = {
        metadata_table()[SUBMISSION_SET]["classification_node"]: SUBMISSION_SET,
        metadata_table()[FOLDER]["classification_node"]: FOLDER,
    }
    package_id = package.get("id", "")
    candidates = package.findall(f"{{{RIM}}}Classification") + [
        c for c in loose if c.get("classifiedObject") == package_id
    ]
    kinds = {
        nodes[node]
        for classification in candidates
        if (node := classification.get("classificationNode", "")) in nodes
    }
    # Classified as both, it is neither: validation refuses it.
    return kinds.pop() if len(kinds) == 1 else None


def read_registry_objects(container: etree._Element) -> Submission:
    """Read a SubmitObjectsRequest, RegistryObjectList or query response.

    Objects that are not XDS objects (an unclassified RegistryPackage) are
    read as kind ``""``; validation decides what to make of them.
    """
    object_list = container
    if container.tag != f"{{{RIM}}}RegistryObjectList":
        found = container.find(f".//{{{RIM}}}RegistryObjectList")
        object_list = found if found is not None else container
    loose = object_list.findall(f"{{{RIM}}}Classification")

    objects: list[RegistryObject] = []
    for element in object_list:
        if not isinstance(element.tag, str):
            continue
        if element.tag == f"{{{RIM}}}ExtrinsicObject":
            objects.append(_read_object(element, DOCUMENT_ENTRY))
        elif element.tag == f"{{{RIM}}}RegistryPackage":
            obj = _read_object(element, _package_kind(element, loose) or "")
            objects.append(obj)
        elif element.tag == f"{{{RIM}}}Association":
            obj = _read_object(element, ASSOCIATION)
            obj.association_type = element.get("associationType", "")
            obj.source_object = element.get("sourceObject", "")
            obj.target_object = element.get("targetObject", "")
            objects.append(obj)

    # Loose Classifications (ITI TF-3 4.2.3.3.1) join the object they classify.
    by_id = {o.id: o for o in objects}
    for element in loose:
        target = by_id.get(element.get("classifiedObject", ""))
        if target is not None:
            target.classifications.append(_classification(element))
    return Submission(objects=objects, element=container)


# --- writing -----------------------------------------------------------


def rim(tag: str, **attributes: str) -> etree._Element:
    """Make an element in the rim namespace with the given attributes."""
    element = etree.Element(f"{{{RIM}}}{tag}", nsmap={"rim": RIM})
    for key, value in attributes.items():
        element.set(key, value)
    return element


def add_slot(parent: etree._Element, name: str, values: list[str]) -> None:
    """Append ``<rim:Slot name=...>`` with its values, before any other child.

    ebRIM 3.0 orders a RegistryObject's children Slot, Name, Description,
    VersionInfo, Classification, ExternalIdentifier; slots come first.
    """
    slot = rim("Slot", name=name)
    value_list = etree.SubElement(slot, f"{{{RIM}}}ValueList")
    for value in values:
        etree.SubElement(value_list, f"{{{RIM}}}Value").text = xml_text(value)
    existing = parent.findall(f"{{{RIM}}}Slot")
    if existing:
        existing[-1].addnext(slot)
    else:
        parent.insert(0, slot)


def set_slot(parent: etree._Element, name: str, values: list[str]) -> None:
    """Replace the values of slot ``name``, adding the slot if absent."""
    for slot in parent.findall(f"{{{RIM}}}Slot"):
        if slot.get("name") == name:
            parent.remove(slot)
    add_slot(parent, name, values)


def add_name(parent: etree._Element, text: str) -> None:
    name = etree.SubElement(parent, f"{{{RIM}}}Name")
    etree.SubElement(name, f"{{{RIM}}}LocalizedString", value=xml_text(text))


def add_code(
    parent: etree._Element, scheme: str, code: Code, object_id: str
) -> etree._Element:
    """Append a coded-value Classification (ITI TF-3 4.2.3.1.7)."""
    classification = etree.SubElement(
        parent,
        f"{{{RIM}}}Classification",
        id=new_uuid(),
        classificationScheme=scheme,
        classifiedObject=object_id,
        nodeRepresentation=xml_text(code.code),
    )
    add_slot(classification, "codingScheme", [code.scheme])
    add_name(classification, code.display or code.code)
    return classification


def add_external_id(
    parent: etree._Element, scheme: str, value: str, name: str, object_id: str
) -> None:
    """Append an ExternalIdentifier (ITI TF-3 4.2.3.1.6)."""
    identifier = etree.SubElement(
        parent,
        f"{{{RIM}}}ExternalIdentifier",
        id=new_uuid(),
        registryObject=object_id,
        identificationScheme=scheme,
        value=xml_text(value),
    )
    add_name(identifier, name)

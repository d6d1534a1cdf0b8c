"""NIST XDS Toolkit submissions of the shared conformance set, made sendable.

ITI TF-3 4.2.3: the testkit files hold placeholders for patient ids and
symbolic uniqueIds; the NIST engine fills them before it sends, and so does
nist_submission.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any
from xml.sax.saxutils import escape

from lxml import etree

from tests.conftest import shared_path
from xdsi import ns, wire
from xdsi.actors.soap_endpoint import transaction
from xdsi.metadata import ebrim, stored_query
from xdsi.metadata.build import new_oid
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.responses import read_errors
from xdsi.metadata.validation import assign_entry_uuids, is_oid

REGISTER_ACTION = transaction("ITI-42")["request_action"]
QUERY_ACTION = transaction("ITI-18")["request_action"]

SOURCE_ID_SCHEME = ebrim.attribute_spec(ebrim.SUBMISSION_SET, "sourceId")["scheme"]
PATIENT_ID_SCHEMES = frozenset(
    ebrim.attribute_spec(kind, "patientId")["scheme"]
    for kind in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER)
)
UNIQUE_ID_SCHEMES = frozenset(
    ebrim.attribute_spec(kind, "uniqueId")["scheme"]
    for kind in (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER)
)


SOURCE_ID = "1.3.6.1.4.1.21367.2005.3.7"


@cache
def cases() -> dict[str, dict[str, Any]]:
    """Return the cases of the shared conformance set, by id."""
    index = shared_path("conformance", "index.json")
    return {c["id"]: c for c in json.loads(index.read_text(encoding="utf-8"))}


def nist_submission(
    case_id: str, values: dict[str, str], *, patient_id: str | None = None
) -> etree._Element:
    """Return a case's SubmitObjectsRequest ready to send.

    ``values`` fills the ``$...$`` placeholders; each uniqueId that is still
    symbolic then becomes a fresh OID, and the SubmissionSet's sourceId one
    of ours, as the NIST engine does. ``patient_id``, when given, replaces
    every patientId the file spells out.
    """
    text = shared_path("conformance", cases()[case_id]["file"]).read_text("utf-8")
    for placeholder, value in values.items():
        text = text.replace(placeholder, escape(value))
    request = etree.fromstring(text.encode("utf-8"))
    for identifier in request.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
        value = identifier.get("value", "")
        scheme = identifier.get("identificationScheme")
        if scheme in UNIQUE_ID_SCHEMES and not is_oid(value.split("^")[0]):
            identifier.set("value", new_oid())
        elif scheme == SOURCE_ID_SCHEME:
            identifier.set("value", SOURCE_ID)
        elif scheme in PATIENT_ID_SCHEMES and patient_id is not None:
            identifier.set("value", patient_id)
    return request


def register(url: str, request: etree._Element) -> etree._Element:
    """Send an ITI-42 Register Document Set-b; return the RegistryResponse."""
    client = wire.SoapClient(url)
    with client.call(REGISTER_ACTION, request) as reply:
        return reply.body


def run_query(
    url: str,
    name: str,
    parameters: dict[str, str | list[str]],
    return_type: str = stored_query.RETURN_LEAF_CLASS,
) -> etree._Element:
    """Send an ITI-18 Registry Stored Query; return the AdhocQueryResponse."""
    request = stored_query.build_query(name, parameters, return_type=return_type)
    client = wire.SoapClient(url)
    with client.call(QUERY_ACTION, request) as reply:
        return reply.body


def error_codes(response: etree._Element) -> list[str]:
    return [e.code for e in read_errors(response)]


def entry_uuids(request: etree._Element) -> dict[str, str]:
    """Give the request's symbolic ids entryUUIDs; return symbol to entryUUID."""
    return assign_entry_uuids(read_registry_objects(request))


# The attributes that hold an object's own id or name another object.
OBJECT_ID_ATTRIBUTES = (
    "id",
    "lid",
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
)


def upper_case_uuid(entry_uuid: str) -> str:
    """The same UUID with its hex digits in upper case (RFC 4122 3)."""
    return "urn:uuid:" + entry_uuid.removeprefix("urn:uuid:").upper()


def in_upper_case(
    request: etree._Element, attributes: tuple[str, ...] = OBJECT_ID_ATTRIBUTES
) -> etree._Element:
    """Write every urn:uuid: id of ``attributes`` in ``request`` in upper case."""
    for element in request.iter(tag=etree.Element):
        for attribute in attributes:
            value = element.get(attribute)
            if value is not None and ebrim.is_uuid(value):
                element.set(attribute, upper_case_uuid(value))
    return request

"""ITI-42 Register Document Set-b against the affinity domain's code sets.

ITI TF-3 4.2.3.1.7: a Document Registry refuses coded metadata outside the
XDS Affinity Domain's code sets with XDSRegistryMetadataError, naming the
object, the attribute, the code and its scheme; a registry configured with no
code sets accepts any code. The submissions are the NIST XDS Toolkit's
test 12346 messages, changed in one code.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from tests.integration.conftest import RunningNode
from tests.nist_submissions import error_codes, nist_submission, register
from xdsi import ns
from xdsi.app import Node
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import send_message
from xdsi.metadata import ebrim
from xdsi.metadata.responses import read_errors

AUTHORITY = "1.3.6.1.4.1.21367.13.20.1000"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
CLASS_CODE = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "classCode")["scheme"]
FOLDER_CODE_LIST = ebrim.attribute_spec(ebrim.FOLDER, "codeList")["scheme"]
UNKNOWN = "XDSI-NOT-A-CODE"


def fed_patient(host: str, feed_port: int) -> str:
    patient_id = f"XDSI-{uuid.uuid4().hex[:12]}^^^&{AUTHORITY}&ISO"
    send_message(host, feed_port, build_feed(patient_id))
    return patient_id


def with_unknown_code(patient_id: str, scheme: str) -> etree._Element:
    """The doc_w_fol submission with its first code of ``scheme`` replaced."""
    request = nist_submission("iti42-12346-doc_w_fol", {"$patientid$": patient_id})
    target = next(
        c
        for c in request.iter(f"{{{ns.RIM}}}Classification")
        if c.get("classificationScheme") == scheme
    )
    target.set("nodeRepresentation", UNKNOWN)
    return request


@pytest.fixture
def open_node(tmp_path: Path) -> Iterator[Settings]:
    """A node whose registry is configured with no code sets."""
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(settings, registry=replace(settings.registry, code_sets=()))
    node = Node(settings)
    effective = node.start()
    yield effective
    node.stop()


@pytest.mark.parametrize(
    ("scheme", "kind", "attribute"),
    [
        (CLASS_CODE, "DocumentEntry", "classCode"),
        (FOLDER_CODE_LIST, "Folder", "codeList"),
    ],
    ids=["classCode", "codeList"],
)
def test_code_outside_the_domain_is_a_registry_metadata_error(
    running_node: RunningNode, scheme: str, kind: str, attribute: str
) -> None:
    """ITI TF-3 4.2.3.1.7: XDSRegistryMetadataError names object, attribute,
    code and scheme, and nothing is registered."""
    patient_id = fed_patient(
        running_node.settings.node.host, running_node.settings.registry.feed_port
    )
    response = register(
        running_node.settings.url("registry"), with_unknown_code(patient_id, scheme)
    )

    assert response.get("status") == FAILURE
    assert error_codes(response) == ["XDSRegistryMetadataError"]
    (error,) = read_errors(response)
    assert error.message.startswith(kind)
    assert f"{attribute} '{UNKNOWN}' (scheme " in error.message
    assert "is not in the affinity domain's code set (ITI TF-3 4.2.3.1.7)" in (
        error.message
    )


def test_submission_with_domain_codes_is_registered(running_node: RunningNode) -> None:
    """ITI TF-3 4.2.3.1.7: the NIST submission, as published, is accepted."""
    patient_id = fed_patient(
        running_node.settings.node.host, running_node.settings.registry.feed_port
    )
    request = nist_submission("iti42-12346-doc_w_fol", {"$patientid$": patient_id})

    response = register(running_node.settings.url("registry"), request)

    assert response.get("status") == SUCCESS, error_codes(response)


def test_registry_without_code_sets_accepts_any_code(open_node: Settings) -> None:
    """ITI TF-3 4.2.3.1.7: a domain that publishes no code sets checks none."""
    patient_id = fed_patient(open_node.node.host, open_node.registry.feed_port)

    response = register(
        open_node.url("registry"), with_unknown_code(patient_id, CLASS_CODE)
    )

    assert response.get("status") == SUCCESS, error_codes(response)

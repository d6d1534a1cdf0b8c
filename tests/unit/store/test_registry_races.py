"""Registrations that meet at the Document Registry, on SQLite and PostgreSQL.

ITI TF-3 4.2.2.2.3: a DocumentEntry is replaced once; a replacement that
comes after it is Deprecated gets XDSRegistryDeprecatedDocumentError, however
close the two arrive. ITI TF-3 4.2.3.2.26: a uniqueId names one document,
which is of one patient.
"""

from __future__ import annotations

import threading
from collections import Counter

from lxml import etree

from tests.nist_submissions import nist_submission
from tests.unit.store.conftest import fed
from xdsi import ns
from xdsi.actors.registry import RegisterOutcome
from xdsi.app import Services
from xdsi.metadata import ebrim

DOCUMENT_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"


def _entry(request: etree._Element) -> ebrim.RegistryObject:
    (entry,) = ebrim.read_registry_objects(request).document_entries
    return entry


def _codes(outcome: RegisterOutcome) -> list[str]:
    return [e.code for e in outcome.errors]


def test_concurrent_replacements_of_one_document_replace_it_once(
    services: Services,
) -> None:
    """Six RPLC of one Approved DocumentEntry sent at once: one replaces it,
    the others find it Deprecated and register nothing."""
    patient_id = fed(services)
    values = {"$patientid$": patient_id}
    original = nist_submission("iti42-12346-doc_for_rplc", values)
    assert services.registry.register(original).errors == []
    values["$rplc_doc_uuid$"] = _entry(original).id
    replacements = [nist_submission("iti42-12346-rplc", values) for _ in range(6)]
    start = threading.Barrier(len(replacements))
    outcomes: list[RegisterOutcome] = []

    def replace_it(request: etree._Element) -> None:
        start.wait()
        outcomes.append(services.registry.register(request))

    threads = [threading.Thread(target=replace_it, args=(r,)) for r in replacements]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert Counter(tuple(_codes(o)) for o in outcomes) == {
        (): 1,
        ("XDSRegistryDeprecatedDocumentError",): 5,
    }


def test_a_document_of_one_patient_is_not_registered_for_another(
    services: Services,
) -> None:
    """The same uniqueId and hash under another patient is refused with
    XDSPatientIdDoesNotMatch; under the same patient it registers again."""
    first, second = fed(services), fed(services)
    registered = nist_submission("iti42-12374-submit_doc", {}, patient_id=first)
    assert services.registry.register(registered).errors == []
    unique_id = _entry(registered).unique_id

    def same_document(patient_id: str) -> etree._Element:
        request = nist_submission("iti42-12374-submit_doc", {}, patient_id=patient_id)
        for identifier in request.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
            if identifier.get("identificationScheme") == DOCUMENT_UNIQUE_ID:
                identifier.set("value", unique_id)
        return request

    other = services.registry.register(same_document(second))
    again = services.registry.register(same_document(first))

    assert _codes(other) == ["XDSPatientIdDoesNotMatch"]
    assert _codes(again) == []

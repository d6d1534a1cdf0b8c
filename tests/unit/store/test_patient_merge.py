"""ITI-8 merges in the Document Registry's tables, on SQLite and PostgreSQL.

ITI TF-2 3.8.4.2.3: the subsumed patient's objects move to the survivor in
one transaction, merges chain, and a merge waits for an ITI-42 that checked
the subsumed patient.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import select

from tests.conftest import PostgresCluster
from tests.nist_submissions import nist_submission
from tests.unit.store.conftest import fed, node_services
from xdsi import ns
from xdsi.actors.registry import _patient_id_error
from xdsi.app import Services
from xdsi.hl7.adt import FeedRejected
from xdsi.metadata import ebrim, stored_query
from xdsi.store.schema import registry_object


def registered(services: Services, patient_id: str) -> str:
    """Register NIST 12374's DocumentEntry for the patient; its entryUUID."""
    request = nist_submission("iti42-12374-submit_doc", {}, patient_id=patient_id)
    outcome = services.registry.register(request)
    assert outcome.errors == []
    (entry,) = [o.id for o in ebrim.read_registry_objects(request).document_entries]
    return entry


def find_documents(services: Services, patient_id: str) -> dict[str, str]:
    """ITI-18 FindDocuments: entryUUID to the patientId each entry carries."""
    request = stored_query.build_query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
        return_type=stored_query.RETURN_LEAF_CLASS,
    )
    response, _ = services.registry.query(request)
    entries = ebrim.read_registry_objects(response).document_entries
    return {e.id: e.patient_id or "" for e in entries}


def test_merges_chain_to_the_last_survivor(services: Services) -> None:
    """ITI TF-2 3.8.4.2.3: A into B, then B into C: A's documents go to C."""
    first, second, third = fed(services), fed(services), fed(services)
    entry = registered(services, first)

    assert services.registry.merge_patients(second, first) >= 2
    assert services.registry.merge_patients(third, second) >= 2

    assert find_documents(services, third) == {entry: third}
    assert find_documents(services, first) == find_documents(services, second) == {}
    assert services.registry.merged_into(first) == third
    assert services.registry.merged_into(second) == third
    assert not services.registry.knows_patient(first)


def test_every_patient_object_is_rewritten_with_the_survivor(
    services: Services,
) -> None:
    """ITI TF-2 3.8.4.2.3: SubmissionSet and DocumentEntry move, XML too."""
    survivor, subsumed = fed(services), fed(services)
    registered(services, subsumed)

    moved = services.registry.merge_patients(survivor, subsumed)

    with services.engine.connect() as conn:
        rows = conn.execute(
            select(registry_object.c.kind, registry_object.c.xml).where(
                registry_object.c.patient_id == survivor
            )
        ).all()
    assert moved == len(rows) == 2
    assert {r.kind for r in rows} == {ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET}
    for row in rows:
        values = {
            e.get("value")
            for e in etree.fromstring(row.xml).iter(f"{{{ns.RIM}}}ExternalIdentifier")
        }
        assert survivor in values and subsumed not in values


def test_subsumed_patient_cannot_survive_a_later_merge(services: Services) -> None:
    """ITI TF-2 3.8.4.2.3: an id merged away is unknown to the next A40."""
    survivor, subsumed, other = fed(services), fed(services), fed(services)
    services.registry.merge_patients(survivor, subsumed)

    with pytest.raises(FeedRejected, match="PID-3 patient was already merged"):
        services.registry.merge_patients(subsumed, other)
    assert services.registry.knows_patient(other)


def test_merge_waits_for_an_iti42_that_checked_the_subsumed_patient(
    postgresql: PostgresCluster, tmp_path: Path
) -> None:
    """ITI TF-2 3.8.4.2.3: on PostgreSQL the ITI-42 patient check share-locks
    the row, so a merge lands after the submission and re-points it."""
    url = postgresql.create_database()
    services = node_services(url, tmp_path)
    try:
        survivor, subsumed = fed(services), fed(services)
        done = threading.Event()

        def merge() -> None:
            services.registry.merge_patients(survivor, subsumed)
            done.set()

        with services.engine.connect() as conn:
            with conn.begin():
                assert _patient_id_error(conn, subsumed, lock=True) is None
                merging = threading.Thread(target=merge)
                merging.start()
                time.sleep(0.5)
                waited = not done.is_set()
        merging.join(timeout=10)
    finally:
        services.engine.dispose()
        postgresql.drop_database(url)

    assert waited and done.is_set()


def test_an_iti42_that_checked_the_subsumed_patient_is_re_pointed_by_the_merge(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ITI TF-2 3.8.4.2.3: an A40 that comes while an ITI-42 for the
    subsumed patient is between its patient check and its commit waits for
    it and re-points its objects, on SQLite (which has no row locks) as on
    PostgreSQL; the submission never lands under the subsumed id."""
    survivor, subsumed = fed(services), fed(services)
    checked, merged = threading.Event(), threading.Event()
    check = _patient_id_error

    def slow_check(*args: object, **kwargs: object) -> object:
        error = check(*args, **kwargs)  # type: ignore[arg-type]
        checked.set()
        # The merge gets its chance to commit in between.
        merged.wait(timeout=1.0)
        return error

    monkeypatch.setattr("xdsi.actors.registry._patient_id_error", slow_check)

    def merge() -> None:
        services.registry.merge_patients(survivor, subsumed)
        merged.set()

    # Built here: nist_submission skips the test without ../shared, which a
    # thread could not.
    request = nist_submission("iti42-12374-submit_doc", {}, patient_id=subsumed)
    merging = threading.Thread(target=merge)
    registering = threading.Thread(target=lambda: services.registry.register(request))
    registering.start()
    assert checked.wait(timeout=10)
    merging.start()
    registering.join(timeout=60)
    merging.join(timeout=60)

    assert merged.is_set()
    assert set(find_documents(services, survivor).values()) == {survivor}
    assert len(find_documents(services, survivor)) == 1

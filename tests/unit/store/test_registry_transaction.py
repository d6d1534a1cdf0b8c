"""ITI-42 writes are one database transaction: a fault half-way leaves no row.

ITI TF-2 3.42.4.1.3 (the Document Registry accepts all of a submission or
none of it), DESIGN.md principle 6, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from tests.conftest import shared_path
from xdsi import ns
from xdsi.actors.soap_endpoint import Peer, transaction
from xdsi.app import Services, build_services
from xdsi.config import Settings
from xdsi.conformance.cases import load_cases
from xdsi.conformance.prepare import Ledger, prepare
from xdsi.hl7.adt import build_feed
from xdsi.metadata.responses import ResponseStatus, read_errors, read_status
from xdsi.store.schema import metadata, patient
from xdsi.wire import SoapMessage

# NIST test 12346: two DocumentEntries and a Folder, with their ebRIM
# Associations, so that many rows go to several tables.
CASE = "iti42-12346-two_doc_w_fol"
REGISTER_ACTION = transaction("ITI-42")["request_action"]
PROVIDE_ACTION = transaction("ITI-41")["request_action"]
PEER = Peer("127.0.0.1", "http://www.w3.org/2005/08/addressing/anonymous", "")

REGISTRY_TABLES = [
    table
    for name, table in metadata.tables.items()
    if name.startswith("registry_") and table is not patient
]


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    settings = Settings().with_storage(tmp_path / "node")
    settings = replace(settings, node=replace(settings.node, database_url=database_url))
    services = build_services(settings)
    yield services
    services.engine.dispose()


def _submission(services: Services) -> SoapMessage:
    """The case's SubmitObjectsRequest, its patient fed to the registry."""
    (case,) = [c for c in load_cases(shared_path("conformance")) if c.id == CASE]
    ledger = Ledger(
        [case.id],
        assigning_authority=services.settings.node.assigning_authority,
        repository_unique_id=services.settings.repository.repository_unique_id,
    )
    prepared = prepare(case, ledger, PROVIDE_ACTION)
    assert prepared.body.tag == f"{{{ns.LCM}}}SubmitObjectsRequest"
    for patient_id in prepared.feed:
        assert "MSA|AA" in services.registry.feed(build_feed(patient_id))
    return SoapMessage(REGISTER_ACTION, "urn:uuid:fault", None, None, prepared.body)


def _rows(services: Services) -> dict[str, int]:
    with services.engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar()
            for table in REGISTRY_TABLES
        }


@contextmanager
def _fail_on_second_insert(services: Services) -> Iterator[list[str]]:
    """Let the first INSERT of the registry through, then raise at the next.

    The fault comes from the database layer, between two statements of the
    one transaction, whatever the registry's code batches together.
    """
    inserts: list[str] = []

    def before_execute(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO REGISTRY_"):
            inserts.append(statement)
            if len(inserts) == 2:
                raise RuntimeError("fault injected between two inserts")

    event.listen(services.engine, "before_cursor_execute", before_execute)
    try:
        yield inserts
    finally:
        event.remove(services.engine, "before_cursor_execute", before_execute)


def test_fault_between_inserts_leaves_no_registry_row(services: Services):
    """ITI TF-2 3.42.4.1.3: a failed submission leaves nothing half-written."""
    message = _submission(services)
    with _fail_on_second_insert(services) as inserts:
        reply = services.registry.handle_register(message, PEER)

    assert len(inserts) == 2, "the fault was not reached"
    assert read_status(reply.body) == ResponseStatus.FAILURE
    assert [e.code for e in read_errors(reply.body)] == ["XDSRegistryError"]
    assert _rows(services) == {table.name: 0 for table in REGISTRY_TABLES}


def test_submission_refused_by_a_fault_is_registered_when_sent_again(
    services: Services,
):
    """ITI TF-2 3.42.4.1.3: nothing of the failed attempt blocks a retry."""
    message = _submission(services)
    with _fail_on_second_insert(services) as inserts:
        services.registry.handle_register(message, PEER)
    assert len(inserts) == 2, "the fault was not reached"

    reply = services.registry.handle_register(message, PEER)

    assert read_status(reply.body) == ResponseStatus.SUCCESS, read_errors(reply.body)
    assert _rows(services)["registry_object"] > 2

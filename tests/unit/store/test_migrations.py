"""Alembic migrations: every database upgraded to head has schema.py's tables.

DESIGN.md "Storage": one SQLAlchemy schema on SQLite and PostgreSQL, with
migrations by Alembic.
"""

from __future__ import annotations

import logging
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from lxml import etree
from sqlalchemy import Engine, create_engine, func, insert, inspect, select

from tests.conftest import PostgresCluster
from xdsi.metadata import ebrim
from xdsi.store import migrations
from xdsi.store.schema import (
    make_engine,
    metadata,
    patient,
    registry_code,
    registry_object,
)


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)


def test_upgraded_database_has_no_difference_from_schema_metadata(
    database_url: str,
):
    """DESIGN.md "Storage": the revisions build exactly xdsi.store.schema."""
    engine = make_engine(database_url)
    try:
        assert _differences(engine) == []
    finally:
        engine.dispose()


def test_upgraded_database_has_each_table_column_and_index_of_the_schema(
    database_url: str,
):
    """DESIGN.md "Storage": tables, columns and indexes by name, as declared."""
    engine = make_engine(database_url)
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) == set(metadata.tables) | {
            migrations.VERSION_TABLE
        }
        for name, table in metadata.tables.items():
            columns = {c["name"]: c for c in inspector.get_columns(name)}
            assert list(columns) == [c.name for c in table.columns], name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, (
                    f"{name}.{column.name}"
                )
            indexes = {i["name"]: i for i in inspector.get_indexes(name)}
            for index in table.indexes:
                assert indexes[index.name]["column_names"] == [
                    c.name for c in index.columns
                ], index.name
                assert bool(indexes[index.name]["unique"]) == index.unique
    finally:
        engine.dispose()


def test_revisions_form_one_line_from_base_to_head():
    """DESIGN.md "Storage": one head, every revision reachable from it."""
    scripts = ScriptDirectory.from_config(migrations.config())

    assert scripts.get_heads() == [migrations.head()]
    chain = list(scripts.walk_revisions())
    assert chain[-1].down_revision is None
    assert len({script.revision for script in chain}) == len(chain)


def test_starting_again_keeps_the_rows_and_the_revision(database_url: str):
    """DESIGN.md "Storage": a start-up upgrade of a current database is a no-op."""
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(insert(patient).values(patient_id="PAT-1^^^&1.2.3&ISO"))
    engine.dispose()

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert migrations.current(connection) == migrations.head()
            count = select(func.count()).select_from(patient)
            assert connection.execute(count).scalar() == 1
    finally:
        engine.dispose()


def test_a_new_database_is_said_to_be_created_not_upgraded_from_none(
    tmp_path, caplog: pytest.LogCaptureFixture
):
    """A node's first start logs the schema it created; an upgrade names the
    revision it started from, which a new database has none of."""
    url = f"sqlite:///{tmp_path / 'xdsi.sqlite'}"
    with caplog.at_level(logging.INFO, logger=migrations.__name__):
        make_engine(url).dispose()
        make_engine(url).dispose()

    said = [r.getMessage() for r in caplog.records if r.name == migrations.__name__]
    assert said == [f"database schema created at {migrations.head()}"]


def test_downgrade_to_base_leaves_only_the_version_table(database_url: str):
    """DESIGN.md "Storage": each revision's downgrade undoes its upgrade."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            command.downgrade(migrations.config(connection), "base")
        assert inspect(engine).get_table_names() == [migrations.VERSION_TABLE]
    finally:
        engine.dispose()


def test_database_made_without_migrations_is_refused(database_url: str):
    """DESIGN.md "Storage": tables of unknown revision are not migrated blindly."""
    engine = create_engine(database_url)
    metadata.create_all(engine)
    engine.dispose()

    with pytest.raises(migrations.UnversionedDatabase, match="registry_object"):
        make_engine(database_url)


def test_workers_starting_together_create_the_schema_once(postgresql: PostgresCluster):
    """DESIGN.md "Storage": web workers sharing one PostgreSQL start at once."""
    database_url = postgresql.create_database()
    start = threading.Barrier(4)
    errors: list[Exception] = []

    def start_worker() -> None:
        start.wait()
        try:
            make_engine(database_url).dispose()
        except Exception as exc:
            errors.append(exc)

    # Without the upgrade lock the workers block each other for good.
    workers = [threading.Thread(target=start_worker, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    try:
        assert not any(worker.is_alive() for worker in workers)
        assert errors == []
        engine = create_engine(database_url)
        assert _differences(engine) == []
        engine.dispose()
    finally:
        postgresql.drop_database(database_url)


def test_processes_starting_together_on_one_new_sqlite_file_create_it_once(
    tmp_path,
):
    """``xdsi serve`` and ``xdsi arr`` started at once on one new storage:
    one creates the schema, the other finds it made, rather than both
    creating its tables ("table ... already exists"). Five new files, four
    starts at once each."""
    for round_ in range(5):
        database_url = f"sqlite:///{tmp_path / f'xdsi-{round_}.sqlite'}"
        start = threading.Barrier(4)
        errors: list[Exception] = []

        def start_one(url: str = database_url, barrier=start, errors=errors) -> None:
            barrier.wait()
            try:
                make_engine(url).dispose()
            except Exception as exc:
                errors.append(exc)

        starts = [threading.Thread(target=start_one, daemon=True) for _ in range(4)]
        for thread in starts:
            thread.start()
        for thread in starts:
            thread.join(timeout=120)

        assert not any(thread.is_alive() for thread in starts)
        assert errors == []
        engine = create_engine(database_url)
        assert _differences(engine) == []
        engine.dispose()


# --- revision 0007: urn:uuid: ids in lower case ----------------------------

DOCUMENT = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET = "urn:uuid:2b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8"


def _upper_case(entry_uuid: str) -> str:
    return "urn:uuid:" + entry_uuid.removeprefix("urn:uuid:").upper()


def _object(entry_uuid: str, kind: str, **columns: str) -> dict[str, object]:
    element = ebrim.rim(
        "Association" if kind == ebrim.ASSOCIATION else "ExtrinsicObject",
        id=entry_uuid,
        **{k: v for k, v in columns.items() if k in ("sourceObject", "targetObject")},
    )
    if kind == ebrim.DOCUMENT_ENTRY:
        element.set("lid", entry_uuid)
    return {
        "entry_uuid": entry_uuid,
        "kind": kind,
        "status": ebrim.STATUS_APPROVED,
        "version": 1,
        "logical_id": entry_uuid if kind == ebrim.DOCUMENT_ENTRY else None,
        "source_object": columns.get("sourceObject"),
        "target_object": columns.get("targetObject"),
        "resubmission": "",
        "xml": etree.tostring(element),
    }


def _at_0006(database_url: str) -> Engine:
    engine = make_engine(database_url)
    with engine.begin() as connection:
        command.downgrade(migrations.config(connection), "0006")
    return engine


def test_upgrade_writes_upper_case_entry_uuids_in_lower_case(database_url: str):
    """RFC 4122 3: objects registered in upper case stay findable once the
    registry reads every id in lower case."""
    engine = _at_0006(database_url)
    document = _upper_case(DOCUMENT)
    with engine.begin() as connection:
        connection.execute(
            insert(registry_object),
            [
                _object(document, ebrim.DOCUMENT_ENTRY),
                _object(
                    "urn:uuid:0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                    ebrim.ASSOCIATION,
                    sourceObject=_upper_case(SUBMISSION_SET),
                    targetObject=document,
                ),
            ],
        )
        connection.execute(
            insert(registry_code).values(
                entry_uuid=document, attribute="classCode", code="C", scheme="S"
            )
        )

    with engine.begin() as connection:
        migrations.upgrade(connection)

    with engine.connect() as connection:
        objects = connection.execute(
            select(registry_object).order_by(registry_object.c.kind)
        ).all()
        (code,) = connection.execute(select(registry_code.c.entry_uuid)).scalars()
    engine.dispose()
    association, entry = objects
    assert (association.source_object, association.target_object) == (
        SUBMISSION_SET,
        DOCUMENT,
    )
    assert etree.fromstring(association.xml).get("targetObject") == DOCUMENT
    assert (entry.entry_uuid, entry.logical_id, code) == (DOCUMENT,) * 3
    assert etree.fromstring(entry.xml).get("id") == DOCUMENT


def test_upgrade_stops_at_one_uuid_registered_in_two_cases(database_url: str):
    """RFC 4122 3: two objects under one UUID cannot both keep it; the
    upgrade names them and changes nothing."""
    engine = _at_0006(database_url)
    with engine.begin() as connection:
        connection.execute(
            insert(registry_object),
            [
                _object(DOCUMENT, ebrim.DOCUMENT_ENTRY),
                _object(_upper_case(DOCUMENT), ebrim.DOCUMENT_ENTRY),
            ],
        )

    try:
        with pytest.raises(Exception, match="RFC 4122 3") as refused:
            with engine.begin() as connection:
                migrations.upgrade(connection)
        assert _upper_case(DOCUMENT) in str(refused.value)
        with engine.connect() as connection:
            assert migrations.current(connection) == "0006"
            ids = connection.execute(select(registry_object.c.entry_uuid)).scalars()
            assert sorted(ids) == sorted([DOCUMENT, _upper_case(DOCUMENT)])
    finally:
        engine.dispose()

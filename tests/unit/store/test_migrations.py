"""Alembic migrations: every database upgraded to head has schema.py's tables.

DESIGN.md "Storage": one SQLAlchemy schema on SQLite and PostgreSQL, with
migrations by Alembic.
"""

from __future__ import annotations

import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, func, insert, inspect, select

from tests.conftest import PostgresCluster
from xdsi.store import migrations
from xdsi.store.schema import make_engine, metadata, patient


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

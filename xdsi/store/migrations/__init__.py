"""Schema migrations of the xdsi database (Alembic), applied at start-up.

make_engine upgrades every database, SQLite or PostgreSQL, to the newest
revision under ``versions/`` (DESIGN.md, "Storage"). A change to
xdsi.store.schema comes with a new revision; autogenerate writes its first
draft::

    from alembic import command
    from xdsi.store import migrations
    with engine.begin() as connection:
        command.revision(
            migrations.config(connection), "what changed", autogenerate=True
        )

tests/unit/store/test_migrations.py fails while the revisions and
xdsi.store.schema.metadata differ.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from xdsi.store.schema import metadata

logger = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"

# Key of the PostgreSQL advisory lock that lets one of several workers
# starting together upgrade the schema while the others wait ("xdsi").
UPGRADE_LOCK_KEY = 0x78647369


class UnversionedDatabase(Exception):
    """The database has xdsi tables but no Alembic revision recorded."""

    def __init__(self, tables: set[str]) -> None:
        super().__init__(
            f"the database holds the xdsi tables {', '.join(sorted(tables))} but "
            f"no {VERSION_TABLE} table, so its schema revision is unknown; "
            "start from an empty database"
        )
        self.tables = tables


def config(connection: Connection | None = None) -> Config:
    """Return the Alembic configuration that migrates ``connection``."""
    alembic_config = Config()
    alembic_config.set_main_option("script_location", str(SCRIPT_LOCATION))
    alembic_config.attributes["connection"] = connection
    return alembic_config


def head() -> str:
    """Return the newest revision."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None, "xdsi.store.migrations has no revision"
    return revision


def current(connection: Connection) -> str | None:
    """Return the revision the database is at, None when unversioned."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` within the connection's transaction.

    Raises
    ------
    UnversionedDatabase
        The database was made without migrations (by ``create_all``), so
        which revision it matches is unknown.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY}
        )
    tables = set(inspect(connection).get_table_names())
    if VERSION_TABLE not in tables and tables & set(metadata.tables):
        raise UnversionedDatabase(tables & set(metadata.tables))

    before = current(connection)
    command.upgrade(config(connection), revision)
    after = current(connection)
    if before is None and after is not None:
        logger.info("database schema created at %s", after)
    elif after != before:
        logger.info("database schema upgraded from %s to %s", before, after)

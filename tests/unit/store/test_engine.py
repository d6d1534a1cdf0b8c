"""A pooled PostgreSQL connection that died while idle is replaced unseen.

DESIGN.md (Storage): the node keeps serving across a database restart; the
engine tests a connection idle longer than IDLE_PING_SECONDS before use.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DisconnectionError

from tests.conftest import PostgresCluster
from xdsi.store import schema


def test_connection_killed_while_idle_is_replaced_at_next_use(
    postgresql: PostgresCluster,
) -> None:
    """A backend ended by the server is not handed to the next request."""
    url = postgresql.create_database()
    engine = schema.make_engine(url)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with postgresql.admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        time.sleep(schema.IDLE_PING_SECONDS + 0.5)

        with engine.connect() as conn:
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

        assert second != first
    finally:
        engine.dispose()
        postgresql.drop_database(url)


def test_a_sql_ascii_database_is_read_as_utf8(postgresql: PostgresCluster) -> None:
    """A database made with ENCODING 'SQL_ASCII' (initdb without a UTF-8
    locale does so) takes the schema and keeps text as it was written."""
    url = postgresql.create_database()
    name = url.rsplit("/", 1)[1]
    with postgresql.admin() as admin:
        admin.execute(f'DROP DATABASE "{name}"')
        admin.execute(
            f'CREATE DATABASE "{name}" OWNER "{postgresql.user}" '
            "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    engine = schema.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW server_encoding")).scalar_one() == (
                "SQL_ASCII"
            )
            assert conn.execute(text("SELECT 'Müller^Jürgen'")).scalar_one() == (
                "Müller^Jürgen"
            )
    finally:
        engine.dispose()
        postgresql.drop_database(url)


class _Untouchable:
    """A DBAPI connection that fails the test if anything is run on it."""

    def cursor(self) -> None:
        raise AssertionError("a connection in steady use was pinged")


class _Record:
    def __init__(self, checked_in: float | None) -> None:
        self.info = {} if checked_in is None else {"checked_in": checked_in}


def test_connection_in_steady_use_is_not_tested_first() -> None:
    """A connection reused at once, or just made, costs no extra round trip."""
    schema._ping_if_idle(_Untouchable(), _Record(time.monotonic()), None)
    schema._ping_if_idle(_Untouchable(), _Record(None), None)


def test_idle_connection_that_fails_its_test_is_a_disconnection() -> None:
    """SQLAlchemy replaces a connection whose checkout raises DisconnectionError."""
    with pytest.raises(DisconnectionError):
        schema._ping_if_idle(
            _Untouchable(),
            _Record(time.monotonic() - schema.IDLE_PING_SECONDS - 1),
            None,
        )

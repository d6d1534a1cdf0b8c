"""An empty database of each kind xdsi runs on, for the store's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PostgresCluster


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database with no tables, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'xdsi.sqlite'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgresql")
    url = cluster.create_database()
    yield url
    cluster.drop_database(url)

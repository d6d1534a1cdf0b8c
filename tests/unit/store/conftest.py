"""An empty database of each kind xdsi runs on, for the store's tests, and
the services of a node on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import PostgresCluster
from xdsi.app import Services, build_services
from xdsi.config import Settings
from xdsi.hl7.adt import PatientIdentity

AUTHORITY = Settings().node.assigning_authority


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


def node_services(database_url: str, tmp_path: Path) -> Services:
    """The services of a node on ``database_url``, stored under ``tmp_path``."""
    settings = Settings().with_storage(tmp_path / "node")
    return build_services(
        replace(settings, node=replace(settings.node, database_url=database_url))
    )


@pytest.fixture
def services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    services = node_services(database_url, tmp_path)
    yield services
    services.engine.dispose()


def fed(services: Services) -> str:
    """A new patient of the affinity domain, fed by an A01."""
    patient_id = f"FED-{uuid.uuid4().hex[:10]}^^^&{AUTHORITY}&ISO"
    services.registry.add_patient(PatientIdentity(patient_id, (), "", "", "", "A01"))
    return patient_id

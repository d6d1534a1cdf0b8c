"""Shared test fixtures: the shared data folder, peers, schema validators."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from lxml import etree

from xdsi.wire.schema import compiled

ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared data folder: $XDSI_SHARED, else ../shared beside the clone."""
    return Path(os.environ.get("XDSI_SHARED", ROOT.parent / "shared"))


SHARED = shared_dir()
SCHEMAS = ROOT / "xdsi" / "schemas"


def require(what: str, present: bool) -> None:
    """Fail under CI=true, skip elsewhere, when a peer or data set is missing."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing; CI installs it (.ci/run)")
    pytest.skip(f"{what} is missing")


def require_program(name: str) -> str:
    path = shutil.which(name)
    require(f"program {name}", path is not None)
    assert path is not None
    return path


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    require(f"shared data {path}", path.exists())
    return path


def schema(relative: str) -> etree.XMLSchema:
    """Compile one of the official schemas (the copy under xdsi/schemas)."""
    return compiled(relative)


# Which schema validates which root element (xdsi/schemas/README.md).
_QUERY = "{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}"
_XDSB = "{urn:ihe:iti:xds-b:2007}"
_REPOSITORY_XSD = "IHE/XDS.b_DocumentRepository.xsd"
SCHEMA_FOR_ROOT = {
    f"{_QUERY}AdhocQueryRequest": "ebRS/query.xsd",
    f"{_QUERY}AdhocQueryResponse": "ebRS/query.xsd",
    "{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest": "ebRS/lcm.xsd",
    "{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse": "ebRS/rs.xsd",
    f"{_XDSB}ProvideAndRegisterDocumentSetRequest": _REPOSITORY_XSD,
    f"{_XDSB}RetrieveDocumentSetRequest": _REPOSITORY_XSD,
    f"{_XDSB}RetrieveDocumentSetResponse": _REPOSITORY_XSD,
    "{urn:ihe:rad:xdsi-b:2009}RetrieveImagingDocumentSetRequest": (
        "IHE/XDSI.b_ImagingDocumentSource.xsd"
    ),
}


def assert_valid(element: etree._Element, relative: str | None = None) -> None:
    """Validate an element against its official schema, with the errors shown."""
    relative = relative or SCHEMA_FOR_ROOT[element.tag]
    validator = schema(relative)
    document = etree.ElementTree(etree.fromstring(etree.tostring(element)))
    if not validator.validate(document):
        errors = "\n".join(str(e) for e in validator.error_log)
        raise AssertionError(
            f"{element.tag} is not valid against {relative}:\n{errors}"
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests of a module that reads it mark
    themselves with ``pytestmark = pytest.mark.usefixtures("shared_data")``."""
    require(f"shared data {SHARED}", SHARED.is_dir())
    return SHARED

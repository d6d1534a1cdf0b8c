"""Validate a message body against the official schema of its transaction.

The schemas are the published ebRS 3.0, XDS.b and XDS-I.b XSDs shipped in
xdsi/schemas; profiles/transactions.toml names the one for each request.
Compilation never touches the network.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from lxml import etree

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


class _LocalOnly(etree.Resolver):
    """Refuse any schema import that is not a local file."""

    def resolve(self, url, public_id, context):  # type: ignore[no-untyped-def]
        if url and "://" in url and not url.startswith("file:"):
            raise OSError(f"schema import {url} is not local")
        return None


# libxml2 fails now and then when two threads compile a schema at once
# ("xmlSchemaPValAttrNodeValue, the given type is not a built-in type"), and
# a schema object keeps the error log of its last validation: both are done
# under this lock.
_LOCK = threading.Lock()


def compiled(relative: str) -> etree.XMLSchema:
    """Compile a schema of xdsi/schemas once."""
    with _LOCK:
        return _compiled(relative)


@cache
def _compiled(relative: str) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True, resolve_entities=False)
    parser.resolvers.add(_LocalOnly())
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / relative), parser))


def schema_errors(
    element: etree._Element, relative: str, *, limit: int = 3
) -> list[str]:
    """Return the first schema violations of ``element``, empty when valid.

    The element is validated as a document of its own, so that an element
    inside an envelope is checked exactly as the schema declares its root.
    """
    validator = compiled(relative)
    document = etree.ElementTree(etree.fromstring(etree.tostring(element)))
    with _LOCK:
        if validator.validate(document):
            return []
        errors = list(validator.error_log)[:limit]
    return [f"line {e.line}: {e.message}" for e in errors]

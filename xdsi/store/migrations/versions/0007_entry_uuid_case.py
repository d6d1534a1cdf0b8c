"""Revision 0007: the Document Registry's urn:uuid: ids in lower case.

RFC 4122 3: a UUID is case insensitive on input and output in lower case.
The Document Registry now reads the ids of every submission and query in
lower case, so an object registered before with upper case hex digits would
no longer be found by its entryUUID. Its entry_uuid, logical_id,
source_object, target_object and resubmission columns, the ids and
references in its stored XML, and the registry_code and registry_value rows
that index it are rewritten in lower case.

Two objects registered under one UUID in two letter cases cannot both keep
it: the upgrade then stops, names them, and leaves the database as it was,
for the operator to settle which one stands.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import sqlalchemy as sa
from alembic import op
from lxml import etree

revision = "0007"
down_revision = "0006"

# ITI TF-3 4.2.3.1.2: urn:uuid: and the 8-4-4-4-12 hex form, as the registry
# reads an id when this revision was written.
UUID_URN = re.compile(
    r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    r"-[0-9a-fA-F]{12}"
)
ID_COLUMNS = ("entry_uuid", "logical_id", "source_object", "target_object")
XML_ID_ATTRIBUTES = (
    "id",
    "lid",
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
    "classificationScheme",
    "classificationNode",
    "identificationScheme",
    "objectType",
)
INDEX_TABLES = ("registry_code", "registry_value")
# Bound parameters per IN list, well under SQLite's and PostgreSQL's limits.
IN_CHUNK = 1000


class EntryUuidInTwoCases(Exception):
    """Two registered objects hold one UUID in two letter cases."""

    def __init__(self, entry_uuids: list[str]) -> None:
        super().__init__(
            "the Document Registry holds objects under "
            f"{', '.join(entry_uuids)} and under the same UUIDs in another "
            "letter case, which RFC 4122 3 reads as one; remove one object of "
            "each pair, then start again"
        )
        self.entry_uuids = entry_uuids


def _lower(value: str | None) -> str | None:
    if value is not None and UUID_URN.fullmatch(value):
        return value.lower()
    return value


def _lower_xml(xml: bytes) -> bytes:
    element = etree.fromstring(xml, etree.XMLParser(resolve_entities=False))
    for child in element.iter(tag=etree.Element):
        for attribute in XML_ID_ATTRIBUTES:
            value = child.get(attribute)
            lowered = _lower(value)
            if lowered is not None and lowered != value:
                child.set(attribute, lowered)
    return etree.tostring(element)


def upgrade() -> None:
    conn = op.get_bind()
    tables = sa.MetaData()
    objects = sa.Table("registry_object", tables, autoload_with=conn)
    indexes = [sa.Table(name, tables, autoload_with=conn) for name in INDEX_TABLES]
    columns = objects.c
    rows = [
        dict(row)
        for row in conn.execute(
            sa.select(objects).where(
                sa.or_(*[columns[c] != sa.func.lower(columns[c]) for c in ID_COLUMNS])
            )
        ).mappings()
    ]
    if not rows:
        return

    # An object whose entryUUID changes must not land on another's.
    renamed = {
        row["entry_uuid"]: _lower(row["entry_uuid"])
        for row in rows
        if _lower(row["entry_uuid"]) != row["entry_uuid"]
    }
    new_ids = sorted(set(renamed.values()))
    taken: set[str] = set()
    for start in range(0, len(new_ids), IN_CHUNK):
        taken.update(
            conn.execute(
                sa.select(columns.entry_uuid).where(
                    columns.entry_uuid.in_(new_ids[start : start + IN_CHUNK])
                )
            ).scalars()
        )
    counts = Counter(renamed.values())
    clashes = sorted(
        old for old, new in renamed.items() if new in taken or counts[new] > 1
    )
    if clashes:
        raise EntryUuidInTwoCases(clashes)

    for row in rows:
        old = row["entry_uuid"]
        changed: dict[str, Any] = {c: _lower(row[c]) for c in ID_COLUMNS}
        changed["resubmission"] = _lower(row["resubmission"])
        changed["xml"] = _lower_xml(row["xml"])
        if old not in renamed:
            conn.execute(
                sa.update(objects).where(columns.entry_uuid == old).values(changed)
            )
            continue
        # The primary key changes under the index rows' foreign keys: the
        # rows go, then come back under the new entryUUID.
        index_rows = {
            table.name: [
                {**r, "entry_uuid": changed["entry_uuid"]}
                for r in conn.execute(
                    sa.select(table).where(table.c.entry_uuid == old)
                ).mappings()
            ]
            for table in indexes
        }
        for table in indexes:
            conn.execute(sa.delete(table).where(table.c.entry_uuid == old))
        conn.execute(sa.delete(objects).where(columns.entry_uuid == old))
        conn.execute(sa.insert(objects).values({**row, **changed}))
        for table in indexes:
            if index_rows[table.name]:
                conn.execute(sa.insert(table), index_rows[table.name])


def downgrade() -> None:
    # Lower case ids are what RFC 4122 3 outputs; revision 0006 reads them
    # as they are, so there is nothing to undo.
    pass

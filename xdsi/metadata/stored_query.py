"""Stored queries: read and build an AdhocQueryRequest and check its parameters.

Implements ITI TF-2 3.18.4.1.2.3 (request syntax, value lists of 3.18.4.1.2.3.5,
parameter rules of 3.18.4.1.2.3.7) for the queries of
profiles/stored_queries.toml; urn:uuid: values are read in lower case
(RFC 4122 3). What each query selects is the registry's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from lxml import etree

from xdsi import ns
from xdsi.errors import (
    StoredQueryMissingParam,
    StoredQueryParamNumber,
    UnknownStoredQuery,
)
from xdsi.metadata import ebrim
from xdsi.metadata.codes import Code
from xdsi.metadata.validation import is_dtm, patient_id_problem
from xdsi.profiles_loader import load_profile_table

RETURN_LEAF_CLASS = "LeafClass"
RETURN_OBJECT_REF = "ObjectRef"
# A rim:Value is an ebRIM 3.0 LongName: at most this many characters.
VALUE_LENGTH = 256


@cache
def stored_queries() -> dict[str, dict[str, Any]]:
    """Return the queries of profiles/stored_queries.toml, keyed by name."""
    return {
        name: row
        for name, row in load_profile_table("stored_queries").items()
        if "id" in row
    }


@cache
def parameter_values() -> dict[str, list[str]]:
    """Return the allowed values of the parameters that have a closed list."""
    return load_profile_table("stored_queries")["parameter_values"]


@cache
def query_names() -> dict[str, str]:
    """Map each stored query id to its name."""
    return {row["id"]: name for name, row in stored_queries().items()}


@dataclass(frozen=True)
class StoredQuery:
    """A parsed stored query: name, return type and parameter values.

    ``parameters`` maps each parameter name to one list per Slot element
    given for it: values within a list are OR-ed, lists are AND-ed
    (ITI TF-2 3.18.4.1.2.3.6).
    """

    query_id: str
    name: str
    return_type: str
    parameters: dict[str, list[list[str]]]

    def single(self, name: str) -> str | None:
        values = self.parameters.get(name)
        return values[0][0] if values else None

    def values(self, name: str) -> list[str]:
        """All values of a parameter, flattened (for OR-only parameters)."""
        return [v for group in self.parameters.get(name, []) for v in group]

    def patient_id(self) -> str | None:
        """The patient the query is about, if it names one (ITI TF-2 3.18.5.1)."""
        specs = stored_queries()[self.name].get("parameters", {})
        for param, spec in specs.items():
            if spec.get("patient") and param in self.parameters:
                return self.single(param)
        return None

    def codes(self, name: str) -> list[list[Code]]:
        """Code parameters as ``code^^scheme`` values, grouped by slot."""
        return [
            [parse_code_value(name, v) for v in group]
            for group in self.parameters.get(name, [])
        ]


def parse_value_list(name: str, text: str) -> list[str]:
    """Parse one Value element: ``'a'``, ``('a','b')`` or a bare number.

    ITI TF-2 3.18.4.1.2.3.5: strings are in single quotes, a quote inside is
    doubled, lists are in parentheses separated by commas; blanks between
    items are allowed.
    """
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        body = text[1:-1]
    else:
        body = text
    items: list[str] = []
    # After an item, only blanks and one comma may come before the next.
    separated = True
    i = 0
    while i < len(body):
        char = body[i]
        if char.isspace():
            i += 1
            continue
        if char == ",":
            if separated:
                raise StoredQueryParamNumber(
                    f"{name} value {text!r} has a comma with no item before it "
                    "(ITI TF-2 3.18.4.1.2.3.5)",
                    name,
                )
            separated = True
            i += 1
            continue
        if not separated:
            raise StoredQueryParamNumber(
                f"{name} value {text!r} lists items without a comma between "
                "them (ITI TF-2 3.18.4.1.2.3.5)",
                name,
            )
        separated = False
        if char == "'":
            i += 1
            value = []
            while True:
                if i >= len(body):
                    raise StoredQueryParamNumber(
                        f"{name} value {text!r} has an unterminated string", name
                    )
                if body[i] == "'":
                    if i + 1 < len(body) and body[i + 1] == "'":
                        value.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                value.append(body[i])
                i += 1
            items.append("".join(value))
        else:
            end = i
            while end < len(body) and body[end] not in ",":
                end += 1
            token = body[i:end].strip()
            if not token.lstrip("-").isdigit():
                raise StoredQueryParamNumber(
                    f"{name} value {token!r} is neither a quoted string nor a "
                    "number (ITI TF-2 3.18.4.1.2.3.5)",
                    name,
                )
            items.append(token)
            i = end
    if not items:
        raise StoredQueryParamNumber(f"{name} has an empty value", name)
    if separated:
        raise StoredQueryParamNumber(
            f"{name} value {text!r} ends in a comma (ITI TF-2 3.18.4.1.2.3.5)", name
        )
    return items


def _slot_values(name: str, texts: list[str]) -> list[str]:
    """Parse the Values of one Slot into one OR-ed list.

    ITI TF-2 3.18.4.1.2.3.5 lets a list be one Value, a Value per item, or
    one parenthesised list broken across several Values; the last is read
    by joining the Values when they do not parse one by one.
    """
    try:
        return [item for text in texts for item in parse_value_list(name, text)]
    except StoredQueryParamNumber:
        if len(texts) < 2:
            raise
        return parse_value_list(name, ",".join(texts))


def parse_code_value(name: str, value: str) -> Code:
    """Parse ``code^^scheme`` (ITI TF-2 3.18.4.1.2.3.7.1 coded parameters)."""
    parts = value.split("^^")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise StoredQueryParamNumber(
            f"{name} value {value!r} is not of the form code^^codingScheme", name
        )
    return Code(parts[0], parts[1])


# ITI TF-2 3.18.4.1.2.3.7 sets no bound on the values of a multiple-valued
# parameter; this registry answers one over these bounds with
# XDSStoredQueryParamNumber rather than build a query its database refuses
# (SQLite parses at most 1000 nested expressions).
MAX_PARAMETER_VALUES = 256
MAX_QUERY_VALUES = 1024


def read_query(request: etree._Element) -> StoredQuery:
    """Read an AdhocQueryRequest and check its parameters against the table."""
    response_option = request.find(f"{{{ns.QUERY}}}ResponseOption")
    return_type = (
        response_option.get("returnType", RETURN_OBJECT_REF)
        if response_option is not None
        else RETURN_OBJECT_REF
    )
    if return_type not in (RETURN_LEAF_CLASS, RETURN_OBJECT_REF):
        raise StoredQueryParamNumber(
            f"returnType {return_type!r}; ITI TF-2 3.18.4.1.2.2 allows LeafClass or "
            "ObjectRef",
            "returnType",
        )
    adhoc = request.find(f"{{{ns.RIM}}}AdhocQuery")
    if adhoc is None:
        raise UnknownStoredQuery("AdhocQueryRequest holds no AdhocQuery")
    # RFC 4122 3: the query id and the entryUUIDs a query names are UUIDs,
    # case insensitive on input; read in lower case, they match the ids the
    # Document Registry stores in lower case, however the consumer spelled
    # them.
    query_id = ebrim.canonical_id(adhoc.get("id", ""))
    name = query_names().get(query_id)
    if name is None:
        raise UnknownStoredQuery(
            f"stored query id {query_id!r} is not one of ITI TF-2 3.18.4.1.2.3.7",
            query_id,
        )

    parameters: dict[str, list[list[str]]] = {}
    counts: dict[str, int] = {}
    for number, slot in enumerate(adhoc.iterfind(f"{{{ns.RIM}}}Slot"), 1):
        slot_name = slot.get("name", "")
        texts = [
            (v.text or "").strip()
            for v in slot.iterfind(f"{{{ns.RIM}}}ValueList/{{{ns.RIM}}}Value")
        ]
        # A Value may hold a list ('a','b',...): what counts is the values
        # the lists hold, parsed, or the Value elements if more.
        group = _slot_values(slot_name, texts)
        counts[slot_name] = counts.get(slot_name, 0) + max(len(texts), len(group))
        if counts[slot_name] > MAX_PARAMETER_VALUES:
            raise StoredQueryParamNumber(
                f"{slot_name} has more than {MAX_PARAMETER_VALUES} values; this "
                "registry takes at most that many per parameter",
                slot_name,
            )
        if number + sum(counts.values()) > MAX_QUERY_VALUES:
            raise StoredQueryParamNumber(
                f"the query has more than {MAX_QUERY_VALUES} slots and values; this "
                "registry takes at most that many in one query",
                slot_name,
            )
        # RFC 4122 3: a UUID is case insensitive on input, wherever it
        # stands ($XDSDocumentEntryEntryUUID, $uuid, $XDSDocumentEntryType
        # ...); any other value (uniqueId, patient id, code) is kept as sent.
        group = [ebrim.canonical_id(value) for value in group]
        if group:
            parameters.setdefault(slot_name, []).append(group)

    query = StoredQuery(query_id, name, return_type, parameters)
    check_parameters(query)
    return query


def check_parameters(query: StoredQuery) -> None:
    """Apply ITI TF-2 3.18.4.1.2.3.7 cardinalities to a query's parameters."""
    table = stored_queries()[query.name]
    specs = table.get("parameters", {})
    for param, spec in specs.items():
        if spec.get("required") and param not in query.parameters:
            raise StoredQueryMissingParam(f"{query.name} requires {param}", param)
    one_of = table.get("one_of", [])
    given = [p for p in one_of if p in query.parameters]
    if one_of and not given:
        raise StoredQueryMissingParam(
            f"{query.name} requires one of {', '.join(one_of)}", one_of[0]
        )
    if len(given) > 1:
        raise StoredQueryParamNumber(
            f"{query.name} takes only one of {', '.join(one_of)}", given[1]
        )
    for param, groups in query.parameters.items():
        spec = specs.get(param)
        if spec is None:
            # A parameter this query does not take is ignored, but one of
            # the closed lists of ITI TF-2 3.18.4.1.2.3.7 ($MetadataLevel,
            # say) is still held to its values.
            if param in parameter_values():
                _check_values(query.name, param, {}, query.values(param))
            continue
        if not spec.get("multiple") and (len(groups) > 1 or len(groups[0]) > 1):
            raise StoredQueryParamNumber(
                f"{query.name} parameter {param} takes one value; "
                f"{sum(len(g) for g in groups)} were given",
                param,
            )
        if spec.get("code"):
            query.codes(param)
        _check_values(query.name, param, spec, query.values(param))


def _check_values(
    name: str, param: str, spec: dict[str, Any], values: list[str]
) -> None:
    """Check values against a closed list, the DTM format or the patientId
    format."""
    allowed = parameter_values().get(param)
    for value in values:
        # ITI TF-3 4.2.3.2.16: a patient the query is about is named by an
        # XDS patientId; any other value names no patient a registry holds.
        # The message names no part of the value, which may identify one.
        problem = patient_id_problem(value) if spec.get("patient") else None
        if problem is not None:
            raise StoredQueryParamNumber(f"{name} parameter {param} {problem}", param)
        if allowed is not None and value not in allowed:
            raise StoredQueryParamNumber(
                f"{name} parameter {param} value {value!r} is not one of "
                f"{', '.join(allowed)} (ITI TF-2 3.18.4.1.2.3.7)",
                param,
            )
        if spec.get("dtm") and not is_dtm(value):
            raise StoredQueryParamNumber(
                f"{param} value {value!r} is not a DTM (ITI TF-3 4.2.3.1.6)", param
            )


def quote_value(value: str) -> str:
    """Quote one string value as ITI TF-2 3.18.4.1.2.3.5 writes it."""
    return "'" + value.replace("'", "''") + "'"


def build_query(
    name: str,
    parameters: dict[str, str | list[str]],
    *,
    return_type: str = RETURN_LEAF_CLASS,
) -> etree._Element:
    """Build an AdhocQueryRequest for stored query ``name``.

    A ``str`` value is sent as one quoted value, a ``list`` as quoted lists
    of as many items as fit one Value element (an ebRIM LongName, at most
    VALUE_LENGTH characters; ITI TF-2 3.18.4.1.2.3.5 lets a list span
    several Values).
    """
    request = etree.Element(
        f"{{{ns.QUERY}}}AdhocQueryRequest", nsmap={"query": ns.QUERY, "rim": ns.RIM}
    )
    etree.SubElement(
        request,
        f"{{{ns.QUERY}}}ResponseOption",
        returnComposedObjects="true",
        returnType=return_type,
    )
    adhoc = etree.SubElement(
        request, f"{{{ns.RIM}}}AdhocQuery", id=stored_queries()[name]["id"]
    )
    for param, value in parameters.items():
        slot = etree.SubElement(adhoc, f"{{{ns.RIM}}}Slot", name=param)
        value_list = etree.SubElement(slot, f"{{{ns.RIM}}}ValueList")
        texts = _value_lists(value) if isinstance(value, list) else [quote_value(value)]
        for text in texts:
            etree.SubElement(value_list, f"{{{ns.RIM}}}Value").text = text
    return request


def _value_lists(values: list[str]) -> list[str]:
    """``values`` as parenthesised quoted lists, each of at most
    VALUE_LENGTH characters where an item alone fits."""
    texts: list[str] = []
    items: list[str] = []
    for quoted in (quote_value(v) for v in values):
        if items and len(",".join([*items, quoted])) + 2 > VALUE_LENGTH:
            texts.append("(" + ",".join(items) + ")")
            items = []
        items.append(quoted)
    if items or not texts:
        texts.append("(" + ",".join(items) + ")")
    return texts

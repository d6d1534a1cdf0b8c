"""Load a conformance case set: ``index.json`` and the files each case names.

A case set is a folder in the format of the NIST XDS Toolkit replay set
(one ``index.json`` entry per request message, with its expected outcome);
the transactions it may hold are ITI TF-2 3.18, 3.41, 3.42, 3.43 and RAD
TF-3 4.68, 4.69.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

# The ``endpoint`` of a case names the actor that receives it.
ENDPOINTS = {
    "Document Registry": "registry",
    "Document Repository": "repository",
    "Imaging Document Source": "imaging_source",
}

# ITI TF-3 4.2.4.2: the RegistryResponse status values, by short name.
STATUS_URNS = {
    "Success": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success",
    "Failure": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure",
    "PartialSuccess": "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess",
}


class CaseSetError(Exception):
    """The case set is unreadable or one of its entries is incomplete."""


@dataclass(frozen=True)
class Document:
    """A document a Provide and Register case attaches (ITI TF-2 3.41.4.1.2)."""

    id: str
    path: Path


@dataclass(frozen=True)
class Expectation:
    """What the answer must show: its status, error codes and contents.

    ``status`` is the short name (Success, Failure, PartialSuccess);
    ``contents`` maps a kind of object (Documents, ObjectRefs, ...) to its
    expected count, or ``None: true`` to no object at all.
    """

    status: str
    errors: tuple[str, ...] = ()
    contents: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    basis: str = ""

    @property
    def label(self) -> str:
        """The expectation as the report prints it, e.g. ``Failure[XDSX]``."""
        if not self.errors:
            return self.status
        return f"{self.status}[{','.join(self.errors)}]"


@dataclass(frozen=True)
class Case:
    """One request message of the set and everything needed to replay it."""

    id: str
    transaction: str
    index: int
    file: Path
    expect: Expectation
    needs: str
    soap_action: str
    endpoint: str
    origin: str
    preprocess: Mapping[str, Any]
    placeholders: Mapping[str, str]
    documents: tuple[Document, ...]
    requested_instances: tuple[str, ...]
    stand_ins: tuple[str, ...] | None
    http_headers: Path | None

    @property
    def is_wire_capture(self) -> bool:
        """A complete HTTP body to POST as it is, with its Content-Type."""
        return self.http_headers is not None

    def content_type(self) -> str:
        """Return the Content-Type line of a wire capture's HTTP headers."""
        if self.http_headers is None:
            raise ValueError(f"case {self.id} is not a wire capture")
        for line in self.http_headers.read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                return value.strip()
        raise CaseSetError(f"case {self.id}: {self.http_headers} has no Content-Type")


def _path(root: Path, case_id: str, relative: object, what: str) -> Path:
    """Resolve a file named by a case and check it exists inside the set."""
    if not isinstance(relative, str) or not relative:
        raise CaseSetError(f"case {case_id}: {what} is missing")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise CaseSetError(f"case {case_id}: {what} {relative} lies outside {root}")
    if not path.is_file():
        raise CaseSetError(f"case {case_id}: {what} {relative} does not exist")
    return path


def _case(root: Path, index: int, entry: Mapping[str, Any]) -> Case:
    """Build one Case from its index.json entry."""
    case_id = entry.get("id")
    if not isinstance(case_id, str) or not case_id:
        raise CaseSetError(f"entry {index} of index.json has no id")
    for key in ("transaction", "expect", "soap_action", "endpoint"):
        if not entry.get(key):
            raise CaseSetError(f"case {case_id}: {key} is missing")
    if entry["endpoint"] not in ENDPOINTS:
        raise CaseSetError(
            f"case {case_id}: endpoint {entry['endpoint']!r} is none of "
            f"{', '.join(ENDPOINTS)}"
        )

    expect = entry["expect"]
    if expect.get("status") not in STATUS_URNS:
        raise CaseSetError(
            f"case {case_id}: expect.status {expect.get('status')!r} is none of "
            f"{', '.join(STATUS_URNS)}"
        )
    expectation = Expectation(
        status=expect["status"],
        errors=tuple(expect.get("errors") or ()),
        contents=MappingProxyType(dict(expect.get("contents") or {})),
        basis=str(expect.get("errors_basis") or ""),
    )

    documents = tuple(
        Document(str(d["id"]), _path(root, case_id, d.get("file"), "document"))
        for d in entry.get("documents") or ()
    )
    headers = entry.get("http_headers")
    stand_ins = entry.get("stand_ins")
    return Case(
        id=case_id,
        transaction=str(entry["transaction"]),
        index=index,
        file=_path(root, case_id, entry.get("file"), "file"),
        expect=expectation,
        needs=str(entry.get("needs") or ""),
        soap_action=str(entry["soap_action"]),
        endpoint=ENDPOINTS[entry["endpoint"]],
        origin=str(entry.get("origin") or ""),
        preprocess=MappingProxyType(dict(entry.get("preprocess") or {})),
        placeholders=MappingProxyType(dict(entry.get("placeholders") or {})),
        documents=documents,
        requested_instances=tuple(entry.get("requested_instances") or ()),
        stand_ins=tuple(stand_ins) if stand_ins is not None else None,
        http_headers=_path(root, case_id, headers, "http_headers") if headers else None,
    )


def load_cases(folder: Path) -> list[Case]:
    """Read ``folder/index.json`` and return its cases in index order.

    Raises
    ------
    CaseSetError
        No readable index.json, two cases with one id, or an entry that
        lacks what a replay needs (id, transaction, expect.status, file,
        soap_action, a known endpoint) or names a file that is not there.
    """
    index = folder / "index.json"
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaseSetError(f"cannot read {index}: {exc}") from exc
    if not isinstance(entries, list):
        raise CaseSetError(f"{index} is not a JSON list of cases")
    cases = [_case(folder, i, entry) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise CaseSetError(f"case id {case.id} appears twice in {index}")
        seen.add(case.id)
    logger.debug("loaded %d cases from %s", len(cases), folder)
    return cases

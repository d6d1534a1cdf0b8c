"""Tests of xdsi.errors against profiles/rules.toml and error_codes.toml.

ITI TF-3 Table 4.2.4.1-2 (error codes per actor) and RAD TF-3 4.69.4.2.3.
"""

from __future__ import annotations

import inspect

import pytest

from xdsi import errors
from xdsi.errors import (
    HashMismatch,
    MetadataInvalid,
    UnknownStoredQuery,
    UnresolvedReference,
    XdsError,
    error_code,
    generic_code,
)
from xdsi.profiles_loader import load_profile_table

RULES = load_profile_table("rules")
ERROR_CODES = load_profile_table("error_codes")
ACTORS = ("registry", "repository", "imaging_source")
GENERIC_CODES = {"XDSRegistryError", "XDSRepositoryError"}

# Codes of ITI TF-3 Table 4.2.4.1-2 that no rule of the pure core raises on
# purpose: the node is never too busy and never out of resources by rule.
DELIBERATELY_UNUSED = {"XDSRegistryBusy", "XDSRepositoryOutOfResources"}

RULE_CLASSES = {
    name: cls
    for name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, XdsError) and cls is not XdsError
}


def test_every_rule_class_has_a_row() -> None:
    """ITI TF-3 Table 4.2.4.1-2: every rule has a row in rules.toml."""
    assert sorted(set(RULE_CLASSES) - set(RULES)) == []


def test_every_row_names_a_rule_class() -> None:
    """ITI TF-3 Table 4.2.4.1-2: every row of rules.toml has a class."""
    assert sorted(set(RULES) - set(RULE_CLASSES)) == []


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_row_names_known_actors_and_codes(rule: str) -> None:
    """ITI TF-3 Table 4.2.4.1-2: rules.toml names codes of the table."""
    row = RULES[rule]

    assert row, f"{rule} maps to no actor"
    assert set(row) <= set(ACTORS), sorted(row)
    assert {code for code in row.values() if code not in ERROR_CODES} == set()


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_row_is_complete(code: str) -> None:
    """ITI TF-3 Table 4.2.4.1-2: each code has description and severity."""
    row = ERROR_CODES[code]

    assert row["description"]
    assert row["transactions"]
    assert row["severity"] in ("Error", "Warning")


def test_every_error_code_is_produced_or_deliberately_unused() -> None:
    """ITI TF-3 Table 4.2.4.1-2: no code of the table is forgotten."""
    produced = {code for row in RULES.values() for code in row.values()}

    forgotten = set(ERROR_CODES) - produced - GENERIC_CODES - DELIBERATELY_UNUSED

    assert sorted(forgotten) == []


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize("rule", sorted(RULE_CLASSES))
def test_error_code_is_the_row_or_the_actor_generic_code(rule: str, actor: str) -> None:
    """ITI TF-3 Table 4.2.4.1-2: an actor with no row gets a generic code."""
    expected = RULES[rule].get(actor, generic_code(actor))

    assert error_code(RULE_CLASSES[rule], actor) == expected
    assert RULE_CLASSES[rule]("broken").code_for(actor) == expected


def test_rule_known_to_one_actor_only_falls_back_for_the_other() -> None:
    """ITI TF-3 Table 4.2.4.1-2: XDSRegistryError, XDSRepositoryError."""
    assert error_code(UnknownStoredQuery, "registry") == "XDSUnknownStoredQuery"
    assert error_code(UnknownStoredQuery, "repository") == "XDSRepositoryError"
    assert error_code(HashMismatch, "repository") == "XDSRepositoryMetadataError"
    assert error_code(HashMismatch, "registry") == "XDSRegistryError"


def test_generic_codes_of_each_actor() -> None:
    """ITI TF-3 Table 4.2.4.1-2: the internal error code of each actor."""
    assert generic_code("registry") == "XDSRegistryError"
    assert generic_code("repository") == "XDSRepositoryError"
    assert generic_code("imaging_source") == "XDSRepositoryError"


def test_rule_without_row_inherits_its_parent_code() -> None:
    """ITI TF-3 Table 4.2.4.1-2: a subclass answers with its parent's code."""

    class EmptyTitle(MetadataInvalid):
        """A title is empty."""

    assert error_code(EmptyTitle, "registry") == "XDSRegistryMetadataError"
    assert error_code(UnresolvedReference, "registry") == "XDSRegistryMetadataError"


def test_rule_without_any_row_is_the_generic_code() -> None:
    """ITI TF-3 Table 4.2.4.1-2: an unmapped rule is an internal error."""

    class Unmapped(XdsError):
        """A rule nobody mapped."""

    assert error_code(Unmapped, "registry") == "XDSRegistryError"
    assert error_code(Unmapped, "repository") == "XDSRepositoryError"


def test_error_keeps_message_and_location() -> None:
    """ITI TF-3 4.2.4.1: a RegistryError names what is wrong and where."""
    error = MetadataInvalid("DocumentEntry Document01 has no classCode", "Document01")

    assert str(error) == "DocumentEntry Document01 has no classCode"
    assert error.message == str(error)
    assert error.location == "Document01"
    assert MetadataInvalid("no location").location == ""

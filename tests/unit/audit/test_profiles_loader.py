"""Loading the declarative IHE tables of profiles/."""

import tomllib
from pathlib import Path

import pytest

import xdsi
from xdsi.profiles_loader import load_profile_table

PROFILES = Path(xdsi.__file__).resolve().parent.parent / "profiles"


@pytest.mark.parametrize("name", ["audit_events", "transactions", "error_codes"])
def test_table_is_read_from_the_profiles_directory(name: str) -> None:
    """ITI TF-2 3.20: the audit table, like every profile table, is TOML."""
    with (PROFILES / f"{name}.toml").open("rb") as table:
        expected = tomllib.load(table)

    assert load_profile_table(name) == expected


def test_each_load_returns_a_fresh_table() -> None:
    """ITI TF-2 3.20: a caller changing its copy leaves the next load whole."""
    first = load_profile_table("audit_events")
    first["events"].clear()

    assert load_profile_table("audit_events")["events"]


def test_unknown_table_is_refused() -> None:
    """ITI TF-2 3.20: a missing table is an error, not an empty profile."""
    with pytest.raises(FileNotFoundError):
        load_profile_table("no_such_table")

"""QIDO-RS wildcard matching (DICOM PS3.4 C.2.2.2.4, PS3.18 8.3.4.6)."""

from __future__ import annotations

import fnmatch

import pytest
from pydicom.dataset import Dataset

from xdsi.actors.dicomweb import _matches, wildcard_match


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("CT*", "CT HEAD", True),
        ("*HEAD", "CT HEAD", True),
        ("C?", "CT", True),
        ("C?", "C", False),
        ("*", "", True),
        ("", "", True),
        ("", "x", False),
        ("?", "", False),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXbY", False),
        ("**", "anything", True),
        # Nothing but * and ? is special: no character classes, no escapes.
        ("[ab]", "a", False),
        ("[ab]", "[ab]", True),
        ("a.c", "abc", False),
        ("a\\*", "a\\xyz", True),
    ],
)
def test_wildcard_matches_as_dicom_defines(pattern: str, text: str, matches: bool):
    assert wildcard_match(pattern, text) is matches


def test_wildcard_agrees_with_a_glob_on_many_cases() -> None:
    """The same answers as fnmatch for patterns of *, ? and letters."""
    patterns = ["*", "?", "a*", "*a", "a?b", "*a*b*", "??*", "a**b", "*?a"]
    texts = ["", "a", "b", "ab", "ba", "aab", "abab", "xaxbx", "acb"]
    for pattern in patterns:
        for text in texts:
            expected = fnmatch.fnmatchcase(text, pattern)
            assert wildcard_match(pattern, text) is expected, (pattern, text)


def test_many_stars_against_a_value_they_miss_end_quickly() -> None:
    """A pattern of many stars that does not match (a regular expression
    would backtrack for minutes) is answered at once."""
    assert wildcard_match("*" * 40 + "Z", "A" * 64) is False
    assert wildcard_match("*A" * 30 + "Z", "A" * 64) is False


def test_a_star_alone_matches_an_empty_value_too() -> None:
    """DICOM PS3.4 C.2.2.2.4: "*" alone is universal matching, so an
    attribute that is empty (Type 2) or absent matches it as well."""
    answer = Dataset()
    answer.AccessionNumber = ""

    assert _matches(answer, "AccessionNumber", "*")
    assert _matches(answer, "PatientName", "**")
    assert not _matches(answer, "AccessionNumber", "*1")

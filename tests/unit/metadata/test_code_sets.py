"""The affinity domain's code sets and the check that holds metadata to them.

ITI TF-3 4.2.3.1.7: classCode, typeCode, formatCode, healthcareFacilityTypeCode,
practiceSettingCode, confidentialityCode, eventCodeList, contentTypeCode and the
Folder codeList take their values from the XDS Affinity Domain's code sets.
Rule tests start from the NIST XDS Toolkit submission of test 12346 doc_w_fol,
which carries every coded attribute, and change one code.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import SHARED, shared_path
from tests.nist_submissions import cases, nist_submission
from xdsi import ns
from xdsi.config import (
    ConfigError,
    ImagingSourceSettings,
    RegistrySettings,
    SourceSettings,
    load_settings,
)
from xdsi.dicom.mapping import ACQUISITION_MODALITY, DCM_SCHEME, MANIFEST_FORMAT_CODE
from xdsi.errors import MetadataInvalid
from xdsi.metadata import ebrim
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.validation import check_codes, load_code_sets

PROFILES = Path(__file__).resolve().parents[3] / "profiles"
FIXTURE_CASE = "iti42-12346-doc_w_fol"
PATIENT = "XDSI-CODES-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
UNKNOWN = "XDSI-NOT-A-CODE"
KINDS = (ebrim.DOCUMENT_ENTRY, ebrim.SUBMISSION_SET, ebrim.FOLDER)

# The coded attributes of profiles/xds_metadata.toml: (kind, attribute, scheme).
CODED = [
    (kind, attribute, spec["scheme"])
    for kind in KINDS
    for attribute, spec in ebrim.metadata_table()[kind]["attributes"].items()
    if spec["kind"] == "classification"
]

SUBMITTING_TRANSACTIONS = ("ITI-41", "ITI-42", "RAD-68")


@pytest.fixture
def request_element() -> etree._Element:
    return nist_submission(FIXTURE_CASE, {"$patientid$": PATIENT})


def domain_code_sets() -> dict[str, frozenset[tuple[str, str]]]:
    return dict(load_code_sets(RegistrySettings().code_sets))


def classifications(request: etree._Element, scheme: str) -> list[etree._Element]:
    return [
        c
        for c in request.iter(f"{{{ns.RIM}}}Classification")
        if c.get("classificationScheme") == scheme
    ]


def submitted_codes(message: etree._Element) -> set[tuple[str, str, str]]:
    """(attribute, code, codingScheme) of every coded value in a message."""
    attribute_of = {scheme: attribute for _, attribute, scheme in CODED}
    found = set()
    for classification in message.iter(f"{{{ns.RIM}}}Classification"):
        attribute = attribute_of.get(classification.get("classificationScheme"))
        if attribute is None:
            continue
        schemes = [
            value.text or ""
            for slot in classification.iter(f"{{{ns.RIM}}}Slot")
            if slot.get("name") == "codingScheme"
            for value in slot.iter(f"{{{ns.RIM}}}Value")
        ]
        found.add((attribute, classification.get("nodeRepresentation"), schemes[0]))
    return found


def case_message(case: dict) -> etree._Element:
    """The case's SubmitObjectsRequest, from its file or its wire capture."""
    data = shared_path("conformance", case["file"]).read_bytes()
    if case["file"].endswith(".mime"):
        envelope = re.search(rb"<(\w+:)?Envelope\b.*</(\w+:)?Envelope>", data, re.S)
        assert envelope is not None, case["id"]
        return etree.fromstring(envelope.group(0))
    return etree.fromstring(data)


@pytest.mark.parametrize(
    ("kind", "attribute", "scheme"), CODED, ids=[a for _, a, _ in CODED]
)
def test_code_outside_the_code_sets_is_refused(
    request_element: etree._Element, kind: str, attribute: str, scheme: str
) -> None:
    """ITI TF-3 4.2.3.1.7: each coded attribute takes the domain's codes only."""
    code_sets = domain_code_sets()
    assert check_codes(read_registry_objects(request_element), code_sets) == []

    target = classifications(request_element, scheme)[0]
    target.set("nodeRepresentation", UNKNOWN)
    submission = read_registry_objects(request_element)
    owner = target.get("classifiedObject")
    (error,) = check_codes(submission, code_sets)

    assert isinstance(error, MetadataInvalid)
    assert error.location == owner
    scheme_value = target.find(f"{{{ns.RIM}}}Slot/{{{ns.RIM}}}ValueList")[0].text
    assert error.message == (
        f"{kind} {owner} {attribute} {UNKNOWN!r} (scheme {scheme_value}) is not "
        "in the affinity domain's code set (ITI TF-3 4.2.3.1.7)"
    )


def test_known_code_under_another_scheme_is_refused(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.7: a code is its value and its codingScheme together."""
    scheme = ebrim.attribute_spec(ebrim.DOCUMENT_ENTRY, "classCode")["scheme"]
    target = classifications(request_element, scheme)[0]
    target.find(f".//{{{ns.RIM}}}Value").text = "1.2.3.4.5"

    errors = check_codes(read_registry_objects(request_element), domain_code_sets())

    assert [type(e) for e in errors] == [MetadataInvalid]
    assert "(scheme 1.2.3.4.5)" in errors[0].message


def test_every_bad_code_of_a_submission_is_reported(
    request_element: etree._Element,
) -> None:
    """ITI TF-3 4.2.3.1.7: each refused value is named, not only the first."""
    for _, _, scheme in CODED:
        for classification in classifications(request_element, scheme):
            classification.set("nodeRepresentation", UNKNOWN)
    count = sum(len(classifications(request_element, s)) for _, _, s in CODED)

    errors = check_codes(read_registry_objects(request_element), domain_code_sets())

    assert len(errors) == count


def test_empty_code_sets_accept_any_code(request_element: etree._Element) -> None:
    """ITI TF-3 4.2.3.1.7: a domain that publishes no code sets checks none."""
    for _, _, scheme in CODED:
        for classification in classifications(request_element, scheme):
            classification.set("nodeRepresentation", UNKNOWN)

    assert check_codes(read_registry_objects(request_element), load_code_sets(())) == []


def test_unknown_code_set_name_is_refused() -> None:
    """ITI TF-3 4.2.3.1.7: a code set is a table under profiles/code_sets."""
    with pytest.raises(ValueError, match="no code set 'nowhere'"):
        load_code_sets(("nowhere",))


def _success_case_ids() -> list[str]:
    """The shared set's accepted submissions; without the shared data, one
    placeholder id whose test then skips (or fails under CI=true)."""
    if not (SHARED / "conformance" / "index.json").is_file():
        return ["shared-conformance-set"]
    return [
        c["id"]
        for c in cases().values()
        if c["transaction"] in SUBMITTING_TRANSACTIONS
        and c["expect"]["status"] == "Success"
    ]


@pytest.mark.parametrize("case_id", _success_case_ids())
def test_conformance_success_cases_use_connectathon_codes(case_id: str) -> None:
    """ITI TF-3 4.2.3.1.7: what the NIST tests submit and expect accepted is in
    the Connectathon code set."""
    shared_path("conformance", "index.json")
    connectathon = load_code_sets(("connectathon",))
    codes = submitted_codes(case_message(cases()[case_id]))

    missing = {c for c in codes if (c[1], c[2]) not in connectathon.get(c[0], ())}

    assert codes
    assert missing == set()


@pytest.mark.parametrize("settings_class", [ImagingSourceSettings, SourceSettings])
def test_default_source_codes_are_in_the_xdsi_code_set(settings_class: type) -> None:
    """ITI TF-3 4.2.3.1.7: what xdsi's sources send by default is registrable."""
    xdsi = load_code_sets(("xdsi",))
    attribute_of = {
        "class_code": "classCode",
        "type_code": "typeCode",
        "format_code": "formatCode",
        "practice_setting_code": "practiceSettingCode",
        "healthcare_facility_type_code": "healthcareFacilityTypeCode",
        "confidentiality_code": "confidentialityCode",
        "content_type_code": "contentTypeCode",
    }
    defaults = settings_class()
    sent = {
        (attribute_of[f.name], *getattr(defaults, f.name)[:2])
        for f in fields(settings_class)
        if f.name in attribute_of
    }

    assert sent
    assert {s for s in sent if (s[1], s[2]) not in xdsi[s[0]]} == set()


def test_imaging_manifest_codes_are_in_the_default_code_sets() -> None:
    """RAD TF-3 4.68.4.1.2.3: the KOS formatCode and every CID 29 modality an
    imaging manifest's eventCodeList may carry are registrable by default."""
    code_sets = domain_code_sets()
    modalities = {(m, DCM_SCHEME) for m in ACQUISITION_MODALITY}

    assert (MANIFEST_FORMAT_CODE.code, MANIFEST_FORMAT_CODE.scheme) in code_sets[
        "formatCode"
    ]
    assert modalities - code_sets["eventCodeList"] == set()


def test_connectathon_set_records_its_source() -> None:
    """ITI TF-3 4.2.3.1.7: the generated table names the published list it
    was made from (repository, commit, path, digest)."""
    text = (PROFILES / "code_sets" / "connectathon.toml").read_text("utf-8")
    header = text.split("\n\n", 1)[0]

    assert header.startswith("# Generated by profiles/code_sets/generate.py")
    assert re.search(r"usnistgov/iheos-toolkit2@[0-9a-f]{40}:", header)
    assert "toolkitx/environment/default/codes.xml" in header
    assert re.search(r"sha256 [0-9a-f]{64}", header)


@pytest.mark.parametrize("name", ["connectathon", "xdsi", "connectathon_supplement"])
def test_code_set_rows_name_only_coded_attributes(name: str) -> None:
    """ITI TF-3 4.2.3.1.7: a code set lists code, scheme and display per coded
    attribute of profiles/xds_metadata.toml."""
    table = tomllib.loads(
        (PROFILES / "code_sets" / f"{name}.toml").read_text(encoding="utf-8")
    )

    assert set(table) <= {attribute for _, attribute, _ in CODED}
    for rows in table.values():
        for row in rows:
            assert {"code", "scheme", "display"} <= set(row)
            assert row["code"] and row["scheme"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("[]", ()), ('["connectathon"]', ("connectathon",))],
)
def test_code_sets_setting_reads_a_list_of_names(
    tmp_path: Path, value: str, expected: tuple[str, ...]
) -> None:
    """ITI TF-3 4.2.3.1.7: [registry] code_sets names the domain's code sets."""
    path = tmp_path / "xdsi.toml"
    path.write_text(f"[registry]\ncode_sets = {value}\n", encoding="utf-8")

    assert load_settings(path).registry.code_sets == expected


def test_code_sets_setting_refuses_a_path(tmp_path: Path) -> None:
    """ITI TF-3 4.2.3.1.7: a code set is named, not read from anywhere."""
    path = tmp_path / "xdsi.toml"
    path.write_text('[registry]\ncode_sets = ["../etc/x"]\n', encoding="utf-8")

    with pytest.raises(ConfigError, match="code_sets"):
        load_settings(path)

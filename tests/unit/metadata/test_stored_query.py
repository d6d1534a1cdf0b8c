"""Tests of xdsi.metadata.stored_query: value lists and parameter rules.

ITI TF-2 3.18.4.1.2.3.5 (value syntax), 3.18.4.1.2.3.6 (AND and OR of
values) and 3.18.4.1.2.3.7 (parameters of each query); NIST ITI-18 requests
from the shared conformance set.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

import pytest
from lxml import etree

from tests.conftest import assert_valid, shared_path
from xdsi import ns
from xdsi.errors import (
    StoredQueryMissingParam,
    StoredQueryParamNumber,
    UnknownStoredQuery,
)
from xdsi.metadata.codes import Code
from xdsi.metadata.stored_query import (
    MAX_PARAMETER_VALUES,
    RETURN_LEAF_CLASS,
    RETURN_OBJECT_REF,
    StoredQuery,
    build_query,
    check_parameters,
    parse_value_list,
    quote_value,
    read_query,
    stored_queries,
)

RIM = f"{{{ns.RIM}}}"
QUERY = f"{{{ns.QUERY}}}"
PATIENT_ID = "PAT-FED-1^^^&1.3.6.1.4.1.21367.13.20.1000&ISO"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
FIND_DOCUMENTS = "FindDocuments"
GET_DOCUMENTS = "GetDocuments"
UNKNOWN_QUERY_ID = "urn:uuid:00000000-0000-4000-8000-000000000000"


# --- value lists ---------------------------------------------------------

VALUE_LISTS = {
    "single quoted": ("'abc'", ["abc"]),
    "list of one": ("('abc')", ["abc"]),
    "list of two": ("('a','b')", ["a", "b"]),
    "blanks between items": ("( 'a' ,  'b' )", ["a", "b"]),
    "blanks around the value": ("  'a'  ", ["a"]),
    "doubled quote": ("'O''Brien'", ["O'Brien"]),
    "doubled quote in a list": ("('it''s', '''x''')", ["it's", "'x'"]),
    "comma inside a string": ("('a,b','c')", ["a,b", "c"]),
    "parentheses inside a string": ("'(a)'", ["(a)"]),
    "blank inside a string": ("'a b'", ["a b"]),
    "empty string": ("''", [""]),
    "number": ("42", ["42"]),
    "negative number": ("-7", ["-7"]),
    "list of numbers": ("(1, 2,3)", ["1", "2", "3"]),
    "DTM number": ("20061224", ["20061224"]),
    "code value": (
        "('IMAGES^^1.3.6.1.4.1.19376.1.2.6.1')",
        ["IMAGES^^1.3.6.1.4.1.19376.1.2.6.1"],
    ),
    "mixed strings and numbers": ("('a', 1)", ["a", "1"]),
}


@pytest.mark.parametrize(("text", "expected"), VALUE_LISTS.values(), ids=VALUE_LISTS)
def test_value_list_syntax_is_read(text: str, expected: list[str]) -> None:
    """ITI TF-2 3.18.4.1.2.3.5: quoted strings, numbers and lists are read."""
    assert parse_value_list("$p", text) == expected


MALFORMED_VALUES = {
    "unterminated string": "'abc",
    "unterminated list item": "('a','b)",
    "bare word": "abc",
    "bare word in a list": "('a', b)",
    "empty list": "()",
    "empty value": "",
    "blank value": "   ",
    "double-quoted string": '"abc"',
    "decimal number": "1.5",
    "items without a comma": "('a' 'b')",
    "two commas": "('a',,'b')",
    "leading comma": "(,'a')",
    "trailing comma": "('a',)",
}


@pytest.mark.parametrize("text", MALFORMED_VALUES.values(), ids=MALFORMED_VALUES)
def test_malformed_value_is_stored_query_param_number(text: str) -> None:
    """ITI TF-2 3.18.4.1.2.3.5: a value is a quoted string, number or list."""
    with pytest.raises(StoredQueryParamNumber, match=r"\$XDSDocumentEntryStatus"):
        parse_value_list("$XDSDocumentEntryStatus", text)


@pytest.mark.parametrize(
    "value", ["plain", "O'Brien", "''", "a,b", "(x)", "a b", ""], ids=repr
)
def test_quoted_value_reads_back_unchanged(value: str) -> None:
    """ITI TF-2 3.18.4.1.2.3.5: quote_value is parse_value_list's inverse."""
    assert parse_value_list("$p", quote_value(value)) == [value]


# --- AdhocQueryRequest ---------------------------------------------------


def _request(query_id: str, slots: list[tuple[str, list[str]]]) -> etree._Element:
    """An AdhocQueryRequest with one Slot per entry, Value texts as given."""
    request = etree.Element(
        f"{QUERY}AdhocQueryRequest", nsmap={"query": ns.QUERY, "rim": ns.RIM}
    )
    etree.SubElement(
        request,
        f"{QUERY}ResponseOption",
        returnComposedObjects="true",
        returnType=RETURN_LEAF_CLASS,
    )
    adhoc = etree.SubElement(request, f"{RIM}AdhocQuery", id=query_id)
    for name, values in slots:
        slot = etree.SubElement(adhoc, f"{RIM}Slot", name=name)
        value_list = etree.SubElement(slot, f"{RIM}ValueList")
        for text in values:
            etree.SubElement(value_list, f"{RIM}Value").text = text
    return request


FIND_DOCUMENTS_ID = stored_queries()[FIND_DOCUMENTS]["id"]
VALID_SLOTS = [
    ("$XDSDocumentEntryPatientId", [quote_value(PATIENT_ID)]),
    ("$XDSDocumentEntryStatus", [f"('{APPROVED}')"]),
]


def test_find_documents_request_is_read() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: FindDocuments with patient id and status."""
    request = _request(FIND_DOCUMENTS_ID, VALID_SLOTS)
    assert_valid(request, "ebRS/query.xsd")

    query = read_query(request)

    assert query.name == FIND_DOCUMENTS
    assert query.query_id == FIND_DOCUMENTS_ID
    assert query.return_type == RETURN_LEAF_CLASS
    assert query.single("$XDSDocumentEntryPatientId") == PATIENT_ID
    assert query.values("$XDSDocumentEntryStatus") == [APPROVED]


def test_values_packed_into_lists_count_against_the_bound() -> None:
    """A parameter's values are counted as the lists hold them: Values each
    packing many codes cannot pass the bound that separate Values meet
    (XDSStoredQueryParamNumber rather than a query the database refuses)."""
    per_value = 100
    lists = [
        "(" + ",".join(f"'{n}^^1'" for n in range(start, start + per_value)) + ")"
        for start in range(0, MAX_PARAMETER_VALUES + per_value, per_value)
    ]
    request = _request(
        FIND_DOCUMENTS_ID, [*VALID_SLOTS, ("$XDSDocumentEntryClassCode", lists)]
    )

    with pytest.raises(StoredQueryParamNumber, match="more than 256 values"):
        read_query(request)


def test_values_of_several_value_elements_join_one_or_list() -> None:
    """ITI TF-2 3.18.4.1.2.3.5: a Slot's Value elements form one OR list."""
    request = _request(
        FIND_DOCUMENTS_ID,
        [
            VALID_SLOTS[0],
            ("$XDSDocumentEntryStatus", [f"('{APPROVED}')", f"('{DEPRECATED}')"]),
        ],
    )

    query = read_query(request)

    assert query.parameters["$XDSDocumentEntryStatus"] == [[APPROVED, DEPRECATED]]


def test_several_slots_of_one_parameter_are_and_groups() -> None:
    """ITI TF-2 3.18.4.1.2.3.6: repeated Slots of a parameter are AND-ed."""
    scheme = "1.3.6.1.4.1.21367.2017.3"
    request = _request(
        FIND_DOCUMENTS_ID,
        VALID_SLOTS
        + [
            ("$XDSDocumentEntryEventCodeList", [f"('a^^{scheme}', 'b^^{scheme}')"]),
            ("$XDSDocumentEntryEventCodeList", [f"('c^^{scheme}')"]),
        ],
    )

    query = read_query(request)

    assert query.codes("$XDSDocumentEntryEventCodeList") == [
        [Code("a", scheme), Code("b", scheme)],
        [Code("c", scheme)],
    ]


def test_missing_response_option_means_object_ref() -> None:
    """ebRS 3.0 query.xsd: returnType defaults to ObjectRef."""
    request = _request(FIND_DOCUMENTS_ID, VALID_SLOTS)
    request.remove(request.find(f"{QUERY}ResponseOption"))

    assert read_query(request).return_type == RETURN_OBJECT_REF


def test_other_return_type_is_stored_query_param_number() -> None:
    """ITI TF-2 3.18.4.1.2.2: returnType is LeafClass or ObjectRef."""
    request = _request(FIND_DOCUMENTS_ID, VALID_SLOTS)
    request.find(f"{QUERY}ResponseOption").set("returnType", "RegistryObject")

    with pytest.raises(StoredQueryParamNumber, match="returnType 'RegistryObject'"):
        read_query(request)


def test_unknown_query_id_is_unknown_stored_query() -> None:
    """ITI TF-3 Table 4.2.4.1-2: XDSUnknownStoredQuery."""
    request = _request(UNKNOWN_QUERY_ID, VALID_SLOTS)

    with pytest.raises(UnknownStoredQuery, match=UNKNOWN_QUERY_ID) as caught:
        read_query(request)
    assert caught.value.location == UNKNOWN_QUERY_ID


def test_request_without_adhoc_query_is_unknown_stored_query() -> None:
    """ITI TF-2 3.18.4.1.2.3: the request names a stored query."""
    request = _request(FIND_DOCUMENTS_ID, VALID_SLOTS)
    request.remove(request.find(f"{RIM}AdhocQuery"))

    with pytest.raises(UnknownStoredQuery):
        read_query(request)


@pytest.mark.parametrize(
    "missing", ["$XDSDocumentEntryPatientId", "$XDSDocumentEntryStatus"]
)
def test_missing_required_parameter_is_stored_query_missing_param(missing: str) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: FindDocuments needs patient id and status."""
    request = _request(FIND_DOCUMENTS_ID, [s for s in VALID_SLOTS if s[0] != missing])

    with pytest.raises(StoredQueryMissingParam, match=rf"\{missing}") as caught:
        read_query(request)
    assert caught.value.location == missing


ENTRY_UUID = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"


def _upper_case(entry_uuid: str) -> str:
    return "urn:uuid:" + entry_uuid.removeprefix("urn:uuid:").upper()


def test_uuid_values_and_query_id_are_read_in_lower_case() -> None:
    """RFC 4122 3: UUIDs are case insensitive on input, output in lower case."""
    query_id = stored_queries()[GET_DOCUMENTS]["id"]
    request = _request(
        _upper_case(query_id),
        [("$XDSDocumentEntryEntryUUID", [f"('{_upper_case(ENTRY_UUID)}')"])],
    )

    query = read_query(request)

    assert (query.name, query.query_id) == (GET_DOCUMENTS, query_id)
    assert query.values("$XDSDocumentEntryEntryUUID") == [ENTRY_UUID]


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("$XDSDocumentEntryUniqueId", "1.2.3^ABCDEF"),
        ("$XDSDocumentEntryUniqueId", "urn:uuid:7EDCA82F054D47F2A0329B2A5B5186C1"),
        ("$XDSDocumentEntryEntryUUID", "Document01"),
    ],
    ids=["uniqueId", "not a canonical UUID", "symbolic id"],
)
def test_values_that_are_no_uuid_are_kept_as_sent(parameter: str, value: str) -> None:
    """RFC 4122 3 reads only UUIDs case insensitively; other values stay."""
    request = _request(
        stored_queries()[GET_DOCUMENTS]["id"], [(parameter, [quote_value(value)])]
    )

    assert read_query(request).values(parameter) == [value]


def test_get_documents_without_uuid_or_unique_id_is_missing_param() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: GetDocuments needs entryUUID or uniqueId."""
    request = _request(
        stored_queries()[GET_DOCUMENTS]["id"], [("$homeCommunityId", ["'urn:oid:1'"])]
    )

    with pytest.raises(StoredQueryMissingParam, match="EntryUUID"):
        read_query(request)


@pytest.mark.parametrize(
    "values",
    [
        [f"('{PATIENT_ID}', 'OTHER^^^&1.2.3&ISO')"],
        [quote_value(PATIENT_ID), "'OTHER^^^&1.2.3&ISO'"],
    ],
    ids=["one Value", "two Values"],
)
def test_two_patient_ids_are_stored_query_param_number(values: list[str]) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: the patient id parameter has one value."""
    request = _request(
        FIND_DOCUMENTS_ID, [("$XDSDocumentEntryPatientId", values), VALID_SLOTS[1]]
    )

    with pytest.raises(
        StoredQueryParamNumber, match=r"\$XDSDocumentEntryPatientId takes one value"
    ):
        read_query(request)


PATIENT_PARAMETERS = [
    (name, param)
    for name, row in stored_queries().items()
    for param, spec in row.get("parameters", {}).items()
    if spec.get("patient")
]


@pytest.mark.parametrize(
    "patient_id",
    [
        "PAT-FED-1",
        "PAT-FED-1^^^1.3.6.1.4.1.21367.13.20.1000",
        "PAT-FED-1^^^&1.3.6.1.4.1.21367.13.20.1000&L",
        "PAT-FED-1^^^&not.an.oid&ISO",
        "^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
    ],
    ids=["bare id", "no &ISO", "not ISO", "not an OID", "empty id"],
)
@pytest.mark.parametrize(
    ("name", "param"), PATIENT_PARAMETERS, ids=[n for n, _ in PATIENT_PARAMETERS]
)
def test_patient_id_not_a_cx_is_stored_query_param_number(
    name: str, param: str, patient_id: str
) -> None:
    """ITI TF-3 4.2.3.2.16: the patient a query is about is a CX
    ID^^^&OID&ISO; any other value is refused, the value not quoted back,
    rather than answered with an empty Success."""
    valid = build_query(name, _required_values(name, param, PATIENT_ID))
    check_parameters(read_query(valid))
    request = build_query(name, _required_values(name, param, patient_id))

    with pytest.raises(StoredQueryParamNumber, match=r"is not a CX|ID is empty") as e:
        read_query(request)
    assert param in str(e.value) and "PAT-FED-1" not in str(e.value)


def _required_values(
    name: str, param: str, patient_id: str
) -> dict[str, str | list[str]]:
    """Values for every required parameter of ``name``, ``param`` the
    patient id given."""
    values: dict[str, str | list[str]] = {}
    for other, spec in stored_queries()[name].get("parameters", {}).items():
        if other == param:
            values[other] = patient_id
        elif spec.get("required"):
            values[other] = [APPROVED] if spec.get("multiple") else "x"
    return values


def test_patient_id_in_two_slots_is_stored_query_param_number() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: a single-valued parameter has one Slot."""
    request = _request(FIND_DOCUMENTS_ID, VALID_SLOTS + [VALID_SLOTS[0]])

    with pytest.raises(StoredQueryParamNumber, match="PatientId"):
        read_query(request)


@pytest.mark.parametrize(
    "code", ["IMAGES", "IMAGES^^", "^^1.2.3", "IMAGES^1.2.3", "a^^b^^c"]
)
def test_code_value_not_code_and_scheme_is_stored_query_param_number(code: str) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: a coded parameter value is code^^scheme."""
    request = _request(
        FIND_DOCUMENTS_ID,
        VALID_SLOTS + [("$XDSDocumentEntryClassCode", [f"('{code}')"])],
    )

    with pytest.raises(StoredQueryParamNumber, match="ClassCode"):
        read_query(request)


def test_check_parameters_accepts_a_built_query() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.1: a well-formed FindDocuments passes."""
    query = StoredQuery(
        FIND_DOCUMENTS_ID,
        FIND_DOCUMENTS,
        RETURN_LEAF_CLASS,
        {
            "$XDSDocumentEntryPatientId": [[PATIENT_ID]],
            "$XDSDocumentEntryStatus": [[APPROVED, DEPRECATED]],
        },
    )

    check_parameters(query)


# --- build_query ---------------------------------------------------------


def test_built_find_documents_is_schema_valid_and_reads_back() -> None:
    """ITI TF-2 3.18.4.1.2.3: build_query writes what read_query reads."""
    scheme = "1.3.6.1.4.1.19376.1.2.6.1"
    request = build_query(
        FIND_DOCUMENTS,
        {
            "$XDSDocumentEntryPatientId": PATIENT_ID,
            "$XDSDocumentEntryStatus": [APPROVED, DEPRECATED],
            "$XDSDocumentEntryClassCode": [f"IMAGES^^{scheme}"],
            "$XDSDocumentEntryAuthorPerson": ["O'Brien%"],
        },
        return_type=RETURN_OBJECT_REF,
    )
    assert_valid(request)

    query = read_query(request)

    assert query.name == FIND_DOCUMENTS
    assert query.return_type == RETURN_OBJECT_REF
    assert query.single("$XDSDocumentEntryPatientId") == PATIENT_ID
    assert query.parameters["$XDSDocumentEntryStatus"] == [[APPROVED, DEPRECATED]]
    assert query.codes("$XDSDocumentEntryClassCode") == [[Code("IMAGES", scheme)]]
    assert query.values("$XDSDocumentEntryAuthorPerson") == ["O'Brien%"]


def test_built_get_documents_is_schema_valid_and_reads_back() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: GetDocuments by entryUUID."""
    uuids = [
        "urn:uuid:7e1b1b4c-0e6a-4b8e-9d3c-2f1a5b6c7d8e",
        "urn:uuid:0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
    ]
    request = build_query(GET_DOCUMENTS, {"$XDSDocumentEntryEntryUUID": uuids})
    assert_valid(request)

    query = read_query(request)

    assert query.name == GET_DOCUMENTS
    assert query.return_type == RETURN_LEAF_CLASS
    assert query.values("$XDSDocumentEntryEntryUUID") == uuids


def test_a_long_list_spans_several_values_each_schema_valid() -> None:
    """ebRIM 3.0 LongName, ITI TF-2 3.18.4.1.2.3.5: a list too long for one
    Value of 256 characters is split over several, read back as one."""
    unique_ids = [f"2.25.{n:039d}" for n in range(40)]
    request = build_query(GET_DOCUMENTS, {"$XDSDocumentEntryUniqueId": unique_ids})
    assert_valid(request)

    values = request.findall(f".//{{{ns.RIM}}}Value")
    assert len(values) > 1
    assert max(len(v.text) for v in values) <= 256
    assert read_query(request).values("$XDSDocumentEntryUniqueId") == unique_ids


# --- NIST ITI-18 requests ------------------------------------------------

PLACEHOLDERS = {
    "$patient_id$": PATIENT_ID,
    "$patientid$": PATIENT_ID,
    "$altpatientid$": "PAT-FED-2^^^&1.3.6.1.4.1.21367.13.20.1000&ISO",
    "$uuid$": "urn:uuid:7e1b1b4c-0e6a-4b8e-9d3c-2f1a5b6c7d8e",
    "$uid$": "1.3.6.1.4.1.21367.2005.3.99.1",
    "$uniqueid$": "1.3.6.1.4.1.21367.2005.3.99.2",
    "$uuid1$": "urn:uuid:1e1b1b4c-0e6a-4b8e-9d3c-2f1a5b6c7d8e",
    "$uuid2$": "urn:uuid:2e1b1b4c-0e6a-4b8e-9d3c-2f1a5b6c7d8e",
}


def _cases() -> dict[str, dict]:
    index = shared_path("conformance", "index.json")
    return {c["id"]: c for c in json.loads(index.read_text(encoding="utf-8"))}


def _nist_request(case_id: str) -> etree._Element:
    """An ITI-18 request of the conformance set with placeholders filled."""
    case = _cases()[case_id]
    text = shared_path("conformance", case["file"]).read_text(encoding="utf-8")
    for placeholder in case.get("placeholders", {}):
        text = text.replace(placeholder, escape(PLACEHOLDERS[placeholder]))
    return etree.fromstring(text.encode("utf-8"))


NIST_ACCEPTED = {
    "iti18-findDocuments-approved": FIND_DOCUMENTS,
    "iti18-findDocuments-objectref": FIND_DOCUMENTS,
    "iti18-findDocuments-classcode_one": FIND_DOCUMENTS,
    "iti18-findDocuments-creationtime_between": FIND_DOCUMENTS,
    "iti18-findDocuments-author": FIND_DOCUMENTS,
    "iti18-findDocuments-eventcode_multi_select": FIND_DOCUMENTS,
    "iti18-findDocuments-refid": "FindDocumentsByReferenceId",
    "iti18-findDocuments-deprecated": FIND_DOCUMENTS,
    "iti18-getDocuments-uuid": GET_DOCUMENTS,
    "iti18-getDocuments-uniqueid": GET_DOCUMENTS,
    "iti18-findSubmissionSets-simple": "FindSubmissionSets",
    "iti18-findFolders-basic": "FindFolders",
    "iti18-getAll-all": "GetAll",
    "iti18-getFolders-uuid": "GetFolders",
    "iti18-getAssociations-single_from_doc": "GetAssociations",
    "iti18-getDocumentsAndAssociations-uuid": "GetDocumentsAndAssociations",
    "iti18-getSubmissionSets-doc_uuid": "GetSubmissionSets",
    "iti18-getSubmissionSetAndContents-uuid": "GetSubmissionSetAndContents",
    "iti18-getFolderAndContents-uuid": "GetFolderAndContents",
    "iti18-getFoldersForDocument-uuid": "GetFoldersForDocument",
    "iti18-getRelatedDocuments-uniqueid": "GetRelatedDocuments",
}


@pytest.mark.parametrize("case_id", NIST_ACCEPTED)
def test_nist_request_is_read(case_id: str) -> None:
    """ITI TF-2 3.18.4.1.2.3.7: NIST requests expecting Success are read."""
    request = _nist_request(case_id)
    assert_valid(request)

    query = read_query(request)

    assert query.name == NIST_ACCEPTED[case_id]
    if query.name.startswith("Find") or query.name == "GetAll":
        assert query.patient_id() == PATIENT_ID
    else:
        assert query.patient_id() is None


def test_nist_event_code_multi_select_is_two_and_groups() -> None:
    """ITI TF-2 3.18.4.1.2.3.6: NIST 11897 event code Slots are AND-ed."""
    query = read_query(_nist_request("iti18-findDocuments-eventcode_multi_select"))

    scheme = "1.3.6.1.4.1.21367.2017.3"
    assert query.codes("$XDSDocumentEntryEventCodeList") == [
        [Code("urn:connectathon:bppc:foundational:policy", scheme)],
        [Code("urn:connectathon:policy:full-access", scheme)],
    ]


def test_nist_get_documents_by_uuid_reads_the_uuid() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: NIST 11898 GetDocuments by entryUUID."""
    query = read_query(_nist_request("iti18-getDocuments-uuid"))

    assert query.values("$XDSDocumentEntryEntryUUID") == [PLACEHOLDERS["$uuid$"]]


NIST_REFUSED = {
    "iti18-derived-unknown_query_id": UnknownStoredQuery,
    "iti18-derived-missing_patient_id": StoredQueryMissingParam,
    "iti18-derived-two_patient_ids": StoredQueryParamNumber,
    "iti18-findDocuments-classcode_scheme_mismatch": StoredQueryParamNumber,
    "iti18-findDocuments-old_scheme": StoredQueryParamNumber,
}


@pytest.mark.parametrize("case_id", NIST_REFUSED)
def test_nist_request_expecting_failure_is_refused(case_id: str) -> None:
    """ITI TF-3 Table 4.2.4.1-2: each refused request raises its rule."""
    with pytest.raises(NIST_REFUSED[case_id]):
        read_query(_nist_request(case_id))


# --- parameter rules of ITI TF-2 3.18.4.1.2.3.7 ------------------------------


def test_every_stored_query_of_the_tf_is_in_the_table() -> None:
    """ITI TF-2 3.18.4.1.2.3.7: the fourteen stored queries and their ids."""
    assert len(stored_queries()) == 14
    assert len({row["id"] for row in stored_queries().values()}) == 14


def test_both_of_one_of_parameters_is_stored_query_param_number() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: entryUUID or uniqueId, not both."""
    request = build_query(
        GET_DOCUMENTS,
        {
            "$XDSDocumentEntryEntryUUID": [PLACEHOLDERS["$uuid$"]],
            "$XDSDocumentEntryUniqueId": [PLACEHOLDERS["$uid$"]],
        },
    )

    with pytest.raises(StoredQueryParamNumber, match="only one of"):
        read_query(request)


def test_unknown_document_entry_type_is_stored_query_param_number() -> None:
    """ITI TF-2 3.18.4.1.2.3.7: $XDSDocumentEntryType is an objectType UUID."""
    request = build_query(
        FIND_DOCUMENTS,
        {
            "$XDSDocumentEntryPatientId": PATIENT_ID,
            "$XDSDocumentEntryStatus": [
                "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
            ],
            "$XDSDocumentEntryType": ["urn:uuid:00000000-0000-4000-8000-000000000000"],
        },
    )

    with pytest.raises(StoredQueryParamNumber, match=r"\$XDSDocumentEntryType"):
        read_query(request)


@pytest.mark.parametrize(
    ("query", "parameters", "value"),
    [
        (
            GET_DOCUMENTS,
            {"$XDSDocumentEntryEntryUUID": [PLACEHOLDERS["$uuid$"]]},
            "3",
        ),
        (
            FIND_DOCUMENTS,
            {
                "$XDSDocumentEntryPatientId": PATIENT_ID,
                "$XDSDocumentEntryStatus": [APPROVED],
            },
            "9",
        ),
    ],
    ids=["get-documents", "find-documents"],
)
def test_metadata_level_other_than_1_or_2_is_stored_query_param_number(
    query: str, parameters: dict[str, str | list[str]], value: str
) -> None:
    """ITI TF-2 3.18.4.1.2.3.7.5: $MetadataLevel is 1 or 2, also in a query
    whose table here does not list it (it is read as level 1 there)."""
    request = build_query(query, parameters)
    slot = etree.SubElement(
        request.find(f"{{{ns.RIM}}}AdhocQuery"),
        f"{{{ns.RIM}}}Slot",
        name="$MetadataLevel",
    )
    value_list = etree.SubElement(slot, f"{{{ns.RIM}}}ValueList")
    etree.SubElement(value_list, f"{{{ns.RIM}}}Value").text = value

    with pytest.raises(StoredQueryParamNumber, match="MetadataLevel"):
        read_query(request)


@pytest.mark.parametrize("value", ["2006122", "20061332", "yesterday"])
def test_time_parameter_that_is_no_dtm_is_stored_query_param_number(
    value: str,
) -> None:
    """ITI TF-3 4.2.3.1.6: $XDSSubmissionSetSubmissionTimeFrom is a DTM."""
    request = build_query(
        "FindSubmissionSets",
        {
            "$XDSSubmissionSetPatientId": PATIENT_ID,
            "$XDSSubmissionSetStatus": [
                "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
            ],
            "$XDSSubmissionSetSubmissionTimeFrom": value,
        },
    )

    with pytest.raises(StoredQueryParamNumber, match="not a DTM"):
        read_query(request)


def test_get_related_documents_without_association_types_is_missing_param() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.13: $AssociationTypes is required."""
    request = build_query(
        "GetRelatedDocuments", {"$XDSDocumentEntryEntryUUID": PLACEHOLDERS["$uuid$"]}
    )

    with pytest.raises(StoredQueryMissingParam, match="AssociationTypes"):
        read_query(request)


def test_get_submission_set_and_contents_takes_one_submission_set() -> None:
    """ITI TF-2 3.18.4.1.2.3.7.10: $XDSSubmissionSetEntryUUID is single."""
    request = build_query(
        "GetSubmissionSetAndContents",
        {
            "$XDSSubmissionSetEntryUUID": [
                PLACEHOLDERS["$uuid1$"],
                PLACEHOLDERS["$uuid2$"],
            ]
        },
    )

    with pytest.raises(StoredQueryParamNumber, match="takes one value"):
        read_query(request)

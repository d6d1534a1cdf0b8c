"""ITI-8 Patient Identity Feed: parsing, ACKs and feeds, without sockets."""

import logging

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from tests.unit.hl7.conftest import (
    ADT_A01_V231,
    ADT_A04_V25,
    ADT_A08_V25,
    ADT_A40_V231,
    AFFINITY_DOMAIN,
    AFFINITY_ID,
    LOCAL_CX,
    SUBSUMED_ID,
)
from xdsi.hl7 import (
    FeedAction,
    FeedRejected,
    PatientIdentity,
    adt,
    build_ack,
    build_feed,
    handle_feed,
    parse_feed,
    read_ack,
)

AFFINITY_CX = f"{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO"
SUBSUMED_CX = f"{SUBSUMED_ID}^^^&{AFFINITY_DOMAIN}&ISO"


def hl7apy_parse(message: str):  # type: ignore[no-untyped-def]
    """Parse as a peer using hl7apy would, strictly as to segment ends."""
    assert "\n" not in message
    return parse_message(
        message, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )


@pytest.mark.parametrize(
    ("trigger", "version"),
    [(t, v) for t in ("A01", "A04", "A05") for v in ("2.3.1", "2.5")],
)
def test_create_events_yield_the_affinity_domain_identifier(
    trigger: str, version: str
) -> None:
    """ITI TF-2 3.8.4.1.1: A01, A04 and A05 create the patient, v2.3.1 or v2.5."""
    message = ADT_A01_V231.replace("ADT^A01^ADT_A01", f"ADT^{trigger}^ADT_A01")
    message = message.replace("|P|2.3.1\r", f"|P|{version}\r")

    identity = parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert identity == PatientIdentity(
        patient_id=AFFINITY_CX,
        other_ids=(LOCAL_CX,),
        name="MOORE^CHIP^^^^^L",
        birth_date="19380224",
        sex="M",
        trigger=trigger,
    )


def test_affinity_domain_identifier_is_found_in_any_repetition() -> None:
    """ITI TF-2 3.8.4.1.3: the domain's PID-3 repetition is kept, others aside."""
    identity = parse_feed(ADT_A04_V25, assigning_authority=AFFINITY_DOMAIN)

    assert identity.patient_id == AFFINITY_CX
    assert identity.other_ids == (LOCAL_CX,)
    assert identity.trigger == "A04"


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_segments_may_end_in_cr_lf_or_crlf(ending: str) -> None:
    """ITI TF-2 3.8.4.1.2: the same feed read whatever ends its segments."""
    message = ADT_A01_V231.replace("\r", ending)

    identity = parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert identity.patient_id == AFFINITY_CX
    assert identity.sex == "M"


def test_a08_updates_the_affinity_domain_patient() -> None:
    """ITI TF-2 3.8.4.1.1: A08 updates the patient PID-3 names."""
    identity = parse_feed(ADT_A08_V25, assigning_authority=AFFINITY_DOMAIN)

    assert identity.action is FeedAction.UPDATE
    assert identity.patient_id == AFFINITY_CX
    assert identity.name == "MOORE^CHIP^A^^^^L"
    assert identity.subsumed_patient_id == ""


@pytest.mark.parametrize("version", ["2.3.1", "2.5"])
def test_a40_names_the_subsumed_patient_of_mrg_1_in_the_same_domain(
    version: str,
) -> None:
    """ITI TF-2 3.8.4.2.2: MRG-1's affinity domain repetition is subsumed."""
    message = ADT_A40_V231.replace("|P|2.3.1\r", f"|P|{version}\r")

    identity = parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert identity.action is FeedAction.MERGE
    assert identity.trigger == "A40"
    assert identity.patient_id == AFFINITY_CX
    assert identity.subsumed_patient_id == SUBSUMED_CX
    assert identity.other_ids == (LOCAL_CX,)


def test_a40_mrg_1_is_read_in_the_domain_pid_3_was_found_in() -> None:
    """ITI TF-2 3.8.4.1.3: a second accepted domain serves PID-3 and MRG-1."""
    other = "1.2.840.99999.5"
    message = ADT_A40_V231.replace(AFFINITY_DOMAIN, other)

    identity = parse_feed(
        message, assigning_authority=AFFINITY_DOMAIN, other_authorities=(other,)
    )

    assert identity.patient_id == f"{AFFINITY_ID}^^^&{other}&ISO"
    assert identity.subsumed_patient_id == f"{SUBSUMED_ID}^^^&{other}&ISO"


def test_affinity_domain_wins_over_another_accepted_domain() -> None:
    """ITI TF-2 3.8.4.1.3: the affinity domain counts before the others."""
    identity = parse_feed(
        ADT_A01_V231,
        assigning_authority=AFFINITY_DOMAIN,
        other_authorities=("1.2.840.99999.1",),
    )

    assert identity.patient_id == AFFINITY_CX


def test_birth_date_is_the_time_of_a_v25_ts() -> None:
    """ITI TF-2 Table 3.8-2: PID-7 is a TS; its first component is the date."""
    message = ADT_A04_V25.replace("||19511030|F", "||19511030^D|F")

    assert parse_feed(message, assigning_authority=AFFINITY_DOMAIN).birth_date == (
        "19511030"
    )


# Each rule: one valid feed with one thing changed, and the answer it earns.
REJECTIONS = {
    "other assigning authority": (
        ADT_A01_V231.replace(f"&{AFFINITY_DOMAIN}&ISO", "&1.2.840.99999.7&ISO"),
        "AE",
        "204",
    ),
    "authority not ISO": (
        ADT_A01_V231.replace(f"&{AFFINITY_DOMAIN}&ISO", f"&{AFFINITY_DOMAIN}&DNS"),
        "AE",
        "204",
    ),
    "ORM^O01": (
        ADT_A01_V231.replace("ADT^A01^ADT_A01", "ORM^O01^ORM_O01"),
        "AR",
        "200",
    ),
    "ADT^A02 transfer": (
        ADT_A01_V231.replace("ADT^A01^ADT_A01", "ADT^A02^ADT_A02"),
        "AR",
        "201",
    ),
    "ADT^A34 merge patient id only": (
        ADT_A40_V231.replace("ADT^A40^ADT_A39", "ADT^A34^ADT_A30"),
        "AR",
        "201",
    ),
    "A40 without MRG": (ADT_A40_V231.rpartition("MRG|")[0], "AE", "100"),
    "A40 with two PID/MRG pairs": (
        ADT_A40_V231 + "".join(ADT_A40_V231.split("\r", 2)[2:]),
        "AE",
        "100",
    ),
    "A40 MRG-1 empty": (ADT_A40_V231.rpartition("MRG|")[0] + "MRG|\r", "AE", "101"),
    "A40 MRG-1 of no accepted domain": (
        ADT_A40_V231.replace(f"{SUBSUMED_ID}^^^&{AFFINITY_DOMAIN}&ISO", "X^^^&1.9&ISO"),
        "AE",
        "204",
    ),
    "A40 into itself": (
        ADT_A40_V231.replace(
            f"MRG|4712^^^HOSP&1.2.840.99999.1&ISO~{SUBSUMED_ID}", f"MRG|{AFFINITY_ID}"
        ),
        "AE",
        "205",
    ),
    "no MSH-10": (ADT_A01_V231.replace("|PIF-0001|", "||"), "AR", "101"),
    "version 2.4": (ADT_A01_V231.replace("|P|2.3.1", "|P|2.4"), "AR", "203"),
    "version 9.9": (ADT_A01_V231.replace("|P|2.3.1", "|P|9.9"), "AR", "203"),
    "no PID segment": (
        "".join(s + "\r" for s in ADT_A01_V231.split("\r") if s[:3] in ("MSH", "PV1")),
        "AE",
        "100",
    ),
    "empty PID-3": (
        ADT_A01_V231.replace(f"{AFFINITY_CX}~{LOCAL_CX}", ""),
        "AE",
        "101",
    ),
    "no MSH": (ADT_A01_V231.partition("\r")[2], "AR", "100"),
    "duplicate encoding characters": (
        ADT_A01_V231.replace("MSH|^~\\&|", "MSH|^^\\&|"),
        "AR",
        "100",
    ),
    "five encoding characters, no MSH-12": (
        ADT_A01_V231.replace("MSH|^~\\&|", "MSH|^~\\&#|").replace("|P|2.3.1", ""),
        "AR",
        "100",
    ),
    "empty": ("", "AR", "100"),
    "PID-3 longer than a registry can keep": (
        ADT_A01_V231.replace(f"{AFFINITY_CX}", "P" * 1000 + AFFINITY_CX),
        "AE",
        "102",
    ),
    "MRG-1 longer than a registry can keep": (
        ADT_A40_V231.replace(f"{SUBSUMED_ID}^^^", "M" * 300 + f"{SUBSUMED_ID}^^^"),
        "AE",
        "102",
    ),
    "PID-3 ID holding an escaped delimiter": (
        ADT_A01_V231.replace(AFFINITY_CX, f"A\\F\\B^^^&{AFFINITY_DOMAIN}&ISO"),
        "AE",
        "102",
    ),
    "PID-3 ID holding a control character": (
        ADT_A01_V231.replace(AFFINITY_CX, f"Y\x01Z^^^&{AFFINITY_DOMAIN}&ISO"),
        "AE",
        "102",
    ),
    "PID-3 ID holding a subcomponent": (
        ADT_A01_V231.replace(AFFINITY_CX, f"Q&R^^^&{AFFINITY_DOMAIN}&ISO"),
        "AE",
        "102",
    ),
    "PID-3 of more repetitions than are parsed": (
        ADT_A01_V231.replace(f"{AFFINITY_CX}", f"{LOCAL_CX}~" * 5000 + AFFINITY_CX),
        "AR",
        "207",
    ),
}


@pytest.mark.parametrize(
    ("message", "ack_code", "error_code"), REJECTIONS.values(), ids=REJECTIONS.keys()
)
def test_feed_breaking_a_rule_is_rejected_with_its_table_0357_code(
    message: str, ack_code: str, error_code: str
) -> None:
    """ITI TF-2 3.8.4.1.3: a feed the Registry cannot take earns AE or AR."""
    with pytest.raises(FeedRejected) as caught:
        parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert (caught.value.ack_code, caught.value.error_code) == (ack_code, error_code)


@pytest.mark.parametrize("version", ["9." + "9" * 5000, "2.3.1\x1b[2J" + "9" * 5000])
def test_an_unknown_version_is_quoted_back_cut_short(version: str) -> None:
    """HL7 v2.5 Table 0357 code 203: the ACK names the version it cannot
    take, as far as a short quote of the peer's MSH-12 goes."""
    message = ADT_A01_V231.replace("|P|2.3.1", f"|P|{version}")

    with pytest.raises(FeedRejected) as caught:
        parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert (caught.value.ack_code, caught.value.error_code) == ("AR", "203")
    assert len(str(caught.value)) < 400
    assert "\x1b" not in str(caught.value)


def test_an_assigning_authority_that_is_no_oid_is_blamed_not_the_id() -> None:
    """ITI TF-3 4.2.3.1.5: the CX's assigning authority is an ISO OID; a
    feed in a domain named otherwise is refused naming the authority, not
    the patient's ID."""
    domain = "1..2"
    message = ADT_A01_V231.replace(AFFINITY_DOMAIN, domain)

    with pytest.raises(FeedRejected, match="assigning authority is not an ISO OID"):
        parse_feed(message, assigning_authority=domain)


def test_segments_iti8_does_not_read_are_not_parsed() -> None:
    """ITI TF-2 3.8.4.1.2: NTE, OBX and the like carry nothing ITI-8 keeps;
    thousands of them, far beyond what is parsed, leave the feed as it is."""
    notes = "".join(f"NTE|{n}||note {n}\r" for n in range(20000))
    message = ADT_A01_V231.rstrip("\r") + "\r" + notes

    identity = parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert identity.patient_id == AFFINITY_CX


@pytest.mark.parametrize("separator", ["~", "&"], ids=["repetitions", "subcomponents"])
def test_thousands_of_repetitions_are_refused_unread(
    separator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HL7 v2.5 Table 0357: a PID of thousands of repetitions or
    subcomponents, each of which costs the parser a fraction of a
    millisecond, is answered AR 207 at once, unread."""
    message = ADT_A01_V231.replace("\rPID|", "\rPID|" + separator * 7000, 1)
    parsed: list[str] = []
    monkeypatch.setattr(adt, "parse_message", lambda text, **_: parsed.append(text))

    with pytest.raises(FeedRejected, match="repetitions and subcomponents") as caught:
        parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert (caught.value.ack_code, caught.value.error_code) == ("AR", "207")
    assert parsed == []


def test_a_pid_3_of_ten_identifiers_is_read() -> None:
    """ITI TF-2 3.8.4.1.3: the affinity domain's identifier among many."""
    others = "~".join(f"L{n}^^^&1.2.840.99999.{n}&ISO" for n in range(9))
    message = ADT_A01_V231.replace(AFFINITY_CX, f"{others}~{AFFINITY_CX}")
    assert AFFINITY_CX in ADT_A01_V231

    identity = parse_feed(message, assigning_authority=AFFINITY_DOMAIN)

    assert identity.patient_id == AFFINITY_CX
    assert len(identity.other_ids) >= 9


def test_unknown_authority_rejection_names_the_authority_sought() -> None:
    """ITI TF-2 3.8.4.1.3: the error says which assigning authority was sought."""
    with pytest.raises(FeedRejected, match="&1.2.840.99999.8&ISO"):
        parse_feed(ADT_A01_V231, assigning_authority="1.2.840.99999.8")


def test_feed_rejected_refuses_codes_outside_the_tables() -> None:
    """ITI TF-2x C.2.3: MSA-1 of a rejection is AE or AR; ERR uses Table 0357."""
    with pytest.raises(ValueError, match="AE or AR"):
        FeedRejected("AA", "204", "x")
    with pytest.raises(ValueError, match="Table 0357"):
        FeedRejected("AE", "999", "x")


@pytest.mark.parametrize(
    ("request_text", "version"),
    [(ADT_A01_V231, "2.3.1"), (ADT_A04_V25, "2.5")],
    ids=["v2.3.1", "v2.5"],
)
def test_ack_answers_the_request_header(request_text: str, version: str) -> None:
    """ITI TF-2x C.2.3: MSA-2 echoes MSH-10; the ACK is addressed back, same version."""
    request = hl7apy_parse(request_text)

    ack = hl7apy_parse(build_ack(request_text, "AA"))

    assert ack.msh.msh_12.to_er7() == version
    assert ack.msh.msh_9.to_er7() == f"ACK^{request.msh.msh_9.msh_9_2.to_er7()}^ACK"
    assert ack.msh.msh_3.to_er7() == "XDSI"
    assert ack.msh.msh_5.to_er7() == "PAT_ID_SOURCE"
    assert ack.msh.msh_6.to_er7() == "CLINIC"
    assert ack.msh.msh_10.to_er7() not in ("", request.msh.msh_10.to_er7())
    assert ack.msa.msa_1.to_er7() == "AA"
    assert ack.msa.msa_2.to_er7() == request.msh.msh_10.to_er7()
    assert len(ack.err) == 0


def test_ack_control_ids_are_fresh_each_time() -> None:
    """ITI TF-2x C.2.3: every ACK carries its own MSH-10."""
    first = hl7apy_parse(build_ack(ADT_A01_V231, "AA"))
    second = hl7apy_parse(build_ack(ADT_A01_V231, "AA"))

    assert first.msh.msh_10.to_er7() != second.msh.msh_10.to_er7()


def test_ack_error_sits_in_err_1_for_v231() -> None:
    """ITI TF-2x C.2.3: a v2.3.1 ACK reports the Table 0357 code in ERR-1."""
    ack = hl7apy_parse(build_ack(ADT_A01_V231, "AE", text="no id", error_code="204"))

    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.msa.msa_3.to_er7() == "no id"
    assert ack.err.err_1.to_er7() == "^^^204&Unknown key identifier&HL70357"


def test_ack_error_sits_in_err_3_and_err_4_for_v25() -> None:
    """ITI TF-2x C.2.3: a v2.5 ACK has ERR-3 HL7 Error Code and ERR-4 Severity."""
    ack = hl7apy_parse(build_ack(ADT_A04_V25, "AR", error_code="201"))

    assert ack.msa.msa_1.to_er7() == "AR"
    assert ack.err.err_3.to_er7() == "201^Unsupported event code^HL70357"
    assert ack.err.err_4.to_er7() == "E"


def test_ack_keeps_the_request_delimiters() -> None:
    """ITI TF-2x C.2.3: the ACK is written with MSH-1 and MSH-2 of the request."""
    table = str.maketrans({"|": "#", "^": "$", "~": "*", "\\": "!", "&": "@"})
    request = ADT_A01_V231.translate(table)

    ack_text = build_ack(request, "AE", text="a#b$c", error_code="204")
    ack = hl7apy_parse(ack_text)

    assert ack_text.startswith("MSH#$*!@#XDSI#XDSI#PAT_ID_SOURCE#CLINIC#")
    assert ack.msa.msa_2.to_er7() == "PIF-0001"
    assert ack.msa.msa_3.to_er7() == "a!F!b!S!c"
    assert ack.msh.msh_9.to_er7() == "ACK$A01$ACK"


def test_ack_text_delimiters_are_escaped() -> None:
    """HL7 v2.5 2.7: delimiters in MSA-3 travel as escape sequences."""
    ack = hl7apy_parse(build_ack(ADT_A01_V231, "AE", text="a|b^c&d~e\\f"))

    assert ack.msa.msa_3.to_er7() == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"


@pytest.mark.parametrize("swap", [False, True], ids=["usual", "own-delimiters"])
def test_ack_text_reads_back_with_its_escapes_undone(swap: bool) -> None:
    r"""HL7 v2.5 2.7: what an ACK says is shown as it was meant, its
    delimiters unescaped with the ACK's own MSH-1 and MSH-2 (an assigning
    authority's & is no \T\ to the user)."""
    request = ADT_A01_V231
    said = "no PID-3 in authority &1.2.3&ISO; a|b^c~d\\e"
    if swap:
        table = str.maketrans({"|": "#", "^": "$", "~": "*", "\\": "!", "&": "@"})
        request, said = request.translate(table), said.translate(table)

    summary = read_ack(build_ack(request, "AE", text=said, error_code="204"))

    assert said in summary.text


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not hl7 at all",
        "MSH|",
        "\x00\x01\x02",
        "PID|||x\rPV1||I",
        "MSH|^~\\&#|PIX|HOSP|||20240101||ADT^A01|X1\rPID|||x",
        "MSH|ABCD|PIX|HOSP|||20240101||ADT^A01|X1|P|2.3.1\rPID|||x",
        "MSH|A1\\&|PIX|HOSP|||20240101||ADT^A01|X1|P|2.3.1\rPID|||x",
    ],
    ids=[
        "empty",
        "text",
        "bare MSH",
        "binary",
        "no MSH",
        "five encoding chars",
        "letters as delimiters",
        "a digit as a delimiter",
    ],
)
def test_ack_for_garbage_is_a_default_ar(garbage: str) -> None:
    """ITI TF-2x C.2.3: an unreadable request still gets a v2.3.1 ACK AR."""
    ack = hl7apy_parse(build_ack(garbage, "AR", error_code="100"))

    assert ack.msh.msh_12.to_er7() == "2.3.1"
    assert ack.msh.msh_9.to_er7() == "ACK"
    assert ack.msa.msa_1.to_er7() == "AR"
    assert ack.msa.msa_2.to_er7() == ""
    assert ack.err.err_1.to_er7() == "^^^100&Segment sequence error&HL70357"


def test_ack_without_an_error_code_reports_internal_error() -> None:
    """HL7 v2.5 Table 0357: an AE with no stated cause reports 207."""
    ack = hl7apy_parse(build_ack(ADT_A04_V25, "AE"))

    assert ack.err.err_3.to_er7() == "207^Application internal error^HL70357"


def test_build_ack_refuses_codes_outside_the_tables() -> None:
    """HL7 v2.5 Table 0008 and Table 0357 bound MSA-1 and the error code."""
    with pytest.raises(ValueError, match="Table 0008"):
        build_ack(ADT_A01_V231, "CA")
    with pytest.raises(ValueError, match="Table 0357"):
        build_ack(ADT_A01_V231, "AE", error_code="42")


@pytest.mark.parametrize(
    ("trigger", "patient_class"), [("A01", "I"), ("A04", "O"), ("A05", "P")]
)
def test_built_feed_is_an_iti8_adt_a01_structure(
    trigger: str, patient_class: str
) -> None:
    """ITI TF-2 3.8.4.1.2: MSH, EVN, PID and PV1 in HL7 v2.3.1, CR separated."""
    text = build_feed(
        AFFINITY_CX,
        trigger=trigger,
        name="GREEN^ALMA",
        birth_date="19511030",
        sex="F",
        control_id="FEED-1",
    )
    feed = hl7apy_parse(text)

    assert [s.name for s in feed.children] == ["MSH", "EVN", "PID", "PV1"]
    assert text.endswith("\r") and "\n" not in text
    assert feed.msh.msh_9.to_er7() == f"ADT^{trigger}^ADT_A01"
    assert feed.msh.msh_10.to_er7() == "FEED-1"
    assert feed.msh.msh_12.to_er7() == "2.3.1"
    assert feed.msh.msh_3.to_er7() == "XDSI_PIX"
    assert feed.msh.msh_5.to_er7() == "XDSI_REG"
    assert feed.evn.evn_1.to_er7() == trigger
    assert feed.pid.pid_3.to_er7() == AFFINITY_CX
    assert feed.pv1.pv1_2.to_er7() == patient_class


def test_built_feed_reads_back_as_the_same_patient() -> None:
    """ITI TF-2 3.8.4.1.3: the Registry reads what the Identity Source sent."""
    text = build_feed(AFFINITY_CX, name="GREEN^ALMA", birth_date="19511030", sex="F")

    identity = parse_feed(text, assigning_authority=AFFINITY_DOMAIN)

    assert identity == PatientIdentity(
        patient_id=AFFINITY_CX,
        other_ids=(),
        name="GREEN^ALMA",
        birth_date="19511030",
        sex="F",
        trigger="A01",
    )


def test_blanks_around_the_patient_id_are_no_part_of_it() -> None:
    """HL7 v2.5 2.A.75: a PID-3 ID sent with blanks around it is the patient
    of the ID without them, as DICOM reads the images' Patient ID."""
    padded = ADT_A01_V231.replace(f"|{AFFINITY_ID}^", f"| {AFFINITY_ID} ^", 1)
    assert padded != ADT_A01_V231

    identity = parse_feed(padded, assigning_authority=AFFINITY_DOMAIN)

    assert identity.patient_id == AFFINITY_CX


def test_built_feeds_get_fresh_control_ids() -> None:
    """ITI TF-2x C.2.3: MSH-10 identifies each message for its ACK."""
    first = hl7apy_parse(build_feed(AFFINITY_CX))
    second = hl7apy_parse(build_feed(AFFINITY_CX))

    assert first.msh.msh_10.to_er7() != second.msh.msh_10.to_er7()


def test_built_a08_reads_back_as_an_update() -> None:
    """ITI TF-2 3.8.4.1.2: A08 travels in ADT_A01 with PV1."""
    text = build_feed(AFFINITY_CX, trigger="A08", name="GREEN^ALMA")

    feed = hl7apy_parse(text)
    identity = parse_feed(text, assigning_authority=AFFINITY_DOMAIN)

    assert [s.name for s in feed.children] == ["MSH", "EVN", "PID", "PV1"]
    assert feed.msh.msh_9.to_er7() == "ADT^A08^ADT_A01"
    assert identity.action is FeedAction.UPDATE and identity.name == "GREEN^ALMA"


def test_built_a40_is_an_adt_a39_structure_with_mrg() -> None:
    """ITI TF-2 3.8.4.2.2: MSH, EVN, PID, MRG; MRG-1 the subsumed patient."""
    text = build_feed(
        AFFINITY_CX, trigger="A40", subsumed_patient_id=SUBSUMED_CX, control_id="M-1"
    )

    feed = hl7apy_parse(text)
    identity = parse_feed(text, assigning_authority=AFFINITY_DOMAIN)

    assert [s.name for s in feed.children] == ["MSH", "EVN", "PID", "MRG"]
    assert feed.msh.msh_9.to_er7() == "ADT^A40^ADT_A39"
    assert feed.mrg.mrg_1.to_er7() == SUBSUMED_CX
    assert (identity.patient_id, identity.subsumed_patient_id) == (
        AFFINITY_CX,
        SUBSUMED_CX,
    )


def test_build_feed_refuses_events_outside_iti8_and_misplaced_mrg() -> None:
    """ITI TF-2 3.8.4.1.1, 3.8.4.2.1: ITI-8 events; MRG-1 with A40 only."""
    with pytest.raises(ValueError, match="A02"):
        build_feed(AFFINITY_CX, trigger="A02")
    with pytest.raises(ValueError, match="MRG-1"):
        build_feed(AFFINITY_CX, trigger="A40")
    with pytest.raises(ValueError, match="MRG-1"):
        build_feed(AFFINITY_CX, trigger="A08", subsumed_patient_id=SUBSUMED_CX)
    with pytest.raises(ValueError, match="PID-3"):
        build_feed("")


def test_handle_feed_hands_the_identity_over_and_answers_aa() -> None:
    """ITI TF-2 3.8.4.1.3: the Registry stores the patient and answers AA."""
    seen: list[PatientIdentity] = []

    ack_text, identity = handle_feed(
        ADT_A01_V231, seen.append, assigning_authority=AFFINITY_DOMAIN
    )

    assert identity is not None and seen == [identity]
    assert identity.patient_id == AFFINITY_CX
    ack = hl7apy_parse(ack_text)
    assert (ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()) == ("AA", "PIF-0001")


@pytest.mark.parametrize(
    ("message", "ack_code", "error_code"), REJECTIONS.values(), ids=REJECTIONS.keys()
)
def test_handle_feed_answers_a_rejection_without_calling_back(
    message: str, ack_code: str, error_code: str
) -> None:
    """ITI TF-2x C.2.3: a rejected feed answers its AE or AR and its code."""
    seen: list[PatientIdentity] = []

    ack_text, identity = handle_feed(
        message, seen.append, assigning_authority=AFFINITY_DOMAIN
    )

    assert identity is None and seen == []
    ack = hl7apy_parse(ack_text)
    assert ack.msa.msa_1.to_er7() == ack_code
    assert error_code in ack.err.to_er7()


@pytest.mark.parametrize(
    "control_id",
    ["PIF\x1b[2J\x85FORGED", "PIF\u2028FORGED\x00", "P" * 5000],
    ids=["escape-and-nel", "line-separator-and-nul", "5000-characters"],
)
def test_the_logged_msh_10_is_escaped_and_cut_short(
    control_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2x C.2.3: the ACK echoes MSH-10 as sent; the log line names it
    in printable ASCII and cut short, so that a sender can neither forge
    lines, steer a terminal nor fill the log with it."""
    message = ADT_A01_V231.replace("PIF-0001", control_id)

    with caplog.at_level(logging.INFO, logger="xdsi.hl7"):
        ack_text, _ = handle_feed(
            message, [].append, assigning_authority=AFFINITY_DOMAIN
        )

    assert hl7apy_parse(ack_text).msa.msa_2.to_er7() == control_id
    (line,) = [r.getMessage() for r in caplog.records if "MSH-10" in r.getMessage()]
    assert line.isascii() and line.isprintable()
    assert len(line) < 300


def test_handle_feed_answers_ae_207_when_storing_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HL7 v2.5 Table 0357: a Registry failure answers AE 207, logged with traceback."""

    def broken_store(identity: PatientIdentity) -> None:
        raise RuntimeError("database is gone")

    with caplog.at_level(logging.ERROR, logger="xdsi.hl7"):
        ack_text, identity = handle_feed(
            ADT_A04_V25, broken_store, assigning_authority=AFFINITY_DOMAIN
        )

    assert identity is None
    ack = hl7apy_parse(ack_text)
    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.msa.msa_2.to_er7() == "PIF-0002"
    assert ack.err.err_3.to_er7() == "207^Application internal error^HL70357"
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


def test_handle_feed_answers_the_rejection_the_registry_raises() -> None:
    """ITI TF-2 3.8.4.2.3: a merge of an unknown patient earns its AE."""

    def unknown(identity: PatientIdentity) -> None:
        raise FeedRejected("AE", "204", "MRG-1 patient is not known")

    ack_text, identity = handle_feed(
        ADT_A40_V231, unknown, assigning_authority=AFFINITY_DOMAIN
    )

    ack = hl7apy_parse(ack_text)
    assert identity is None
    assert (ack.msa.msa_1.to_er7(), ack.msa.msa_2.to_er7()) == ("AE", "PIF-0004")
    assert ack.msh.msh_9.to_er7() == "ACK^A40^ACK"
    assert "204" in ack.err.to_er7()


@pytest.mark.parametrize(
    "message",
    [ADT_A01_V231, REJECTIONS["other assigning authority"][0], ADT_A40_V231],
    ids=["accepted", "rejected", "merge"],
)
def test_handle_feed_logs_no_patient_data_at_info(
    message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ITI TF-2 3.8: the outcome is logged at INFO, the patient is not."""
    with caplog.at_level(logging.DEBUG, logger="xdsi.hl7"):
        handle_feed(message, lambda identity: None, assigning_authority=AFFINITY_DOMAIN)

    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 1 and "PIF-000" in info[0]
    for phi in (AFFINITY_ID, SUBSUMED_ID, "4711", "MOORE", "CHIP", "19380224"):
        assert phi not in info[0]

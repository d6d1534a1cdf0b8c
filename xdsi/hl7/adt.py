"""ITI-8 Patient Identity Feed: read ADT messages, answer ACK, build feeds.

Implements ITI TF-2 3.8.4.1.1 (trigger events), ITI TF-2 3.8.4.1.2 (message
semantics, PID Table 3.8-2), ITI TF-2 3.8.4.1.3 (the Document Registry keeps
only the affinity domain's identifier), ITI TF-2 3.8.4.2 (Patient Identifier
Merge, A40 with MRG-1) and the HL7 original-mode ACK of ITI TF-2x C.2.3, in
HL7 v2.3.1 and v2.5. Parsing and building go through hl7apy.
"""

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException, UnsupportedVersion
from hl7apy.parser import parse_message

from xdsi import logs
from xdsi.metadata.validation import patient_id_problem

logger = logging.getLogger(__name__)


class FeedAction(Enum):
    """What an ITI-8 message does to the Document Registry's patients."""

    CREATE = "create"
    UPDATE = "update"
    MERGE = "merge"


@dataclass(frozen=True)
class TriggerEvent:
    """One ADT event of ITI-8: its message structure (MSH-9.3), its action at
    the Document Registry and the PV1-2 Patient Class (HL7 Table 0004) a feed
    built here sends, None where the structure has no PV1."""

    structure: str
    action: FeedAction
    patient_class: str | None


# ITI TF-2 3.8.4.1.1 (A01, A04, A05 create, A08 updates) and ITI TF-2
# 3.8.4.2.1 (A40 merges MRG-1 into PID-3). Any other event is rejected AR.
TRIGGER_EVENTS = {
    "A01": TriggerEvent("ADT_A01", FeedAction.CREATE, "I"),  # Admit an in-patient
    "A04": TriggerEvent("ADT_A01", FeedAction.CREATE, "O"),  # Register an outpatient
    "A05": TriggerEvent("ADT_A01", FeedAction.CREATE, "P"),  # Pre-admit
    "A08": TriggerEvent("ADT_A01", FeedAction.UPDATE, "N"),  # Update patient info
    "A40": TriggerEvent("ADT_A39", FeedAction.MERGE, None),  # Merge patient id list
}

# ITI TF-2 3.8: ITI-8 is HL7 v2.3.1; the v2.5 spelling is accepted as well.
SUPPORTED_VERSIONS = ("2.3.1", "2.5")

# HL7 v2.5 Table 0357 (Message error condition codes).
ERROR_CONDITIONS = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

# HL7 v2.5 Table 0008 (Acknowledgment code), original acknowledgement mode.
ACK_CODES = ("AA", "AE", "AR")

# HL7 v2.5 2.5.4: the delimiters a message uses when MSH-1 and MSH-2 say
# nothing else.
DEFAULT_ENCODING = {
    "FIELD": "|",
    "COMPONENT": "^",
    "REPETITION": "~",
    "ESCAPE": "\\",
    "SUBCOMPONENT": "&",
    "SEGMENT": "\r",
    "GROUP": "\r",
}

# Characters of a peer's own text an ACK quotes back at most (the parser's
# words on an MSH-12 it cannot read, say).
ACK_QUOTE = 100
# ITI TF-2 3.8: an ACK to a message whose version is unknown speaks ITI-8's.
DEFAULT_VERSION = "2.3.1"

# HL7 v2.5 2.15.5: up to v2.4 the error sits in ERR-1 (ELD); from v2.5 in
# ERR-3 (HL7 Error Code) with ERR-4 (Severity).
ERR_1_VERSIONS = frozenset({"2.1", "2.2", "2.3", "2.3.1", "2.4"})

# ITI TF-2 3.8.4.1.2: the affinity domain's assigning authority is an ISO OID.
UNIVERSAL_ID_TYPE = "ISO"

_SEGMENT_END = re.compile(r"\r\n|\n|\r")

# The segments of an ADT message that ITI-8 reads (ITI TF-2 3.8.4.1.2,
# 3.8.4.2.2), and the most of them parsed: a PID segment is seldom over a
# few hundred characters, and hl7apy takes up to a third of a millisecond
# for each (empty) repetition it reads.
_READ_SEGMENTS = frozenset({"MSH", "EVN", "PID", "PD1", "PV1", "MRG"})
MAX_READ_LENGTH = 8 * 1024
# Repetition and subcomponent separators the read segments may hold: hl7apy
# takes some 0.2 ms for each repetition and 0.1 ms for each subcomponent,
# so that 8 KiB of them held a core for over a second; a PID-3 of ten
# identifiers (ID^^^&OID&ISO) has about thirty.
MAX_READ_REPETITIONS = 256


@dataclass(frozen=True)
class PatientIdentity:
    """A patient as one ITI-8 feed names them.

    ``patient_id`` is the affinity domain's identifier as an XDS CX value
    (``ID^^^&OID&ISO``); ``other_ids`` are the remaining PID-3 repetitions as
    sent (delimiters normalised to ``^~\\&``). ``name`` is PID-5's first
    repetition, ``birth_date`` PID-7's time and ``sex`` PID-8, all as ER7 text.
    For an A40, ``subsumed_patient_id`` is MRG-1's identifier in the same
    domain, as an XDS CX; it is empty for every other event.
    """

    patient_id: str
    other_ids: tuple[str, ...]
    name: str
    birth_date: str
    sex: str
    trigger: str
    subsumed_patient_id: str = ""

    @property
    def action(self) -> FeedAction:
        """What the feed does at the Document Registry."""
        return TRIGGER_EVENTS[self.trigger].action


class FeedRejected(Exception):
    """An ITI-8 message the Document Registry does not accept.

    ``ack_code`` is MSA-1 (``AE`` or ``AR``), ``error_code`` an HL7 Table 0357
    code, ``text`` says what is wrong without naming the patient.
    """

    def __init__(self, ack_code: str, error_code: str, text: str) -> None:
        if ack_code not in ("AE", "AR"):
            raise ValueError(f"ack_code {ack_code!r}: a rejection is AE or AR")
        if error_code not in ERROR_CONDITIONS:
            raise ValueError(f"error_code {error_code!r} is not in HL7 Table 0357")
        super().__init__(f"{ack_code} {error_code}: {text}")
        self.ack_code = ack_code
        self.error_code = error_code
        self.text = text


def parse_feed(
    message: str,
    *,
    assigning_authority: str,
    other_authorities: Sequence[str] = (),
) -> PatientIdentity:
    """Read an ITI-8 message and pick the affinity domain's identifiers.

    ITI TF-2 3.8.4.1.1 names A01, A04 and A05 as the events that create a
    patient and A08 as the one that updates; ITI TF-2 3.8.4.2.1 has A40 merge
    the patient of MRG-1 into the one of PID-3. ITI TF-2 3.8.4.1.3 has the
    Document Registry keep the PID-3 repetition of the affinity domain (CX-4.2
    ``assigning_authority``, CX-4.3 ``ISO``) and ignore the others; when the
    domain appears twice the first repetition wins and the second goes to
    ``other_ids``. ``other_authorities`` are further domains a registry is
    configured to accept, tried in order only when no repetition is of
    ``assigning_authority``; MRG-1 is read in the domain PID-3 was found in.
    Segments may end in CR, LF or CRLF.

    Raises
    ------
    FeedRejected
        AR 100 when the message cannot be parsed; AR 203 for a version other
        than 2.3.1 or 2.5; AR 200 when it is not ADT; AR 201 for an event not
        in TRIGGER_EVENTS; AR 101 without MSH-10; AE 100 without PID, or for
        an A40 without exactly one PID and one MRG; AE 101 when PID-3 (or
        MRG-1) is empty; AE 204 when no PID-3 (or MRG-1) repetition belongs to
        an accepted domain; AE 205 when an A40 merges a patient into itself.
    """
    msg = _parse(message)

    # ITI TF-2 3.8.4.1.1, 3.8.4.2.1: only the ITI-8 events are served here.
    msh = msg.msh
    message_type = msh.msh_9.msh_9_1.to_er7()
    trigger = msh.msh_9.msh_9_2.to_er7()
    if message_type != "ADT":
        raise FeedRejected("AR", "200", f"message type {message_type or '(empty)'}")
    if trigger not in TRIGGER_EVENTS:
        raise FeedRejected("AR", "201", f"ADT event {trigger or '(empty)'}")
    if not msh.msh_10.to_er7():
        raise FeedRejected("AR", "101", "MSH-10 Message Control ID is empty")

    pids = msg.pid
    if len(pids) == 0:
        raise FeedRejected("AE", "100", f"ADT {trigger} has no PID segment")
    pid = pids[0]
    if not any(cx.to_er7() for cx in pid.pid_3):
        raise FeedRejected("AE", "101", "PID-3 Patient Identifier List is empty")
    authorities = (assigning_authority, *other_authorities)
    patient_id, other_ids, authority = _domain_identifier(pid.pid_3, authorities)
    if not patient_id:
        raise FeedRejected(
            "AE",
            "204",
            "no PID-3 identifier has assigning authority "
            + " or ".join(f"&{a}&{UNIVERSAL_ID_TYPE}" for a in authorities),
        )

    _check_usable(patient_id, "PID-3")
    subsumed_patient_id = ""
    if TRIGGER_EVENTS[trigger].action is FeedAction.MERGE:
        subsumed_patient_id = _subsumed_identifier(msg, trigger, authority)
        _check_usable(subsumed_patient_id, "MRG-1")
        if subsumed_patient_id == patient_id:
            raise FeedRejected(
                "AE",
                "205",
                "MRG-1 names the PID-3 patient; a patient cannot be merged "
                "into itself (ITI TF-2 3.8.4.2)",
            )

    names = list(pid.pid_5)
    return PatientIdentity(
        patient_id=patient_id,
        other_ids=other_ids,
        name=names[0].to_er7(encoding_chars=DEFAULT_ENCODING) if names else "",
        birth_date=pid.pid_7.ts_1.to_er7(),
        sex=pid.pid_8.to_er7(),
        trigger=trigger,
        subsumed_patient_id=subsumed_patient_id,
    )


def _check_usable(patient_id: str, field: str) -> None:
    """Refuse an identifier no ITI-42 could name: one the Document Registry
    would refuse as patientId (ITI TF-3 4.2.3.2.16), such as an ID holding
    ^, &, ~, \\ or |, which reached here escaped."""
    problem = patient_id_problem(patient_id)
    if problem is not None:
        raise FeedRejected(
            "AE",
            "102",
            f"{field} identifier is not usable as an XDS patientId: it {problem}",
        )


def _domain_identifier(
    repetitions: Sequence[Any], authorities: Sequence[str]
) -> tuple[str, tuple[str, ...], str]:
    """Pick the first CX of the first domain in ``authorities`` that has one.

    Returns the identifier as an XDS CX (empty when none is found), the other
    repetitions as sent and the domain it was found in.
    """
    # Limitation: CX-1 is kept as sent; an escape sequence in it written with
    # an escape character other than \ is not rewritten for the XDS CX.
    for authority in authorities:
        for index, cx in enumerate(repetitions):
            # HL7 v2.5 2.A.75: trailing blanks of an ST are padding; blanks
            # around an identifier are no part of it, as DICOM reads a
            # Patient ID's (PS3.5 6.2 LO), so the two match.
            id_number = cx.cx_1.to_er7().strip(" ")
            in_domain = (
                cx.cx_4.hd_2.to_er7() == authority
                and cx.cx_4.hd_3.to_er7() == UNIVERSAL_ID_TYPE
            )
            if in_domain and id_number:
                others = tuple(
                    other.to_er7(encoding_chars=DEFAULT_ENCODING)
                    for position, other in enumerate(repetitions)
                    if position != index and other.to_er7()
                )
                xds_cx = f"{id_number}^^^&{authority}&{UNIVERSAL_ID_TYPE}"
                return xds_cx, others, authority
    return "", (), ""


def _subsumed_identifier(msg: Message, trigger: str, authority: str) -> str:
    """Return an A40's MRG-1 identifier in ``authority`` (ITI TF-2 3.8.4.2.2).

    Raises
    ------
    FeedRejected
        AE 100 unless the message has exactly one PID and one MRG; AE 101 when
        MRG-1 is empty; AE 204 when no MRG-1 repetition is of ``authority``.
    """
    # Limitation: HL7 lets one A40 carry several PID/MRG pairs; ITI-8 merges
    # one patient per message, and more pairs are rejected AE 100.
    mrgs = msg.mrg
    if len(mrgs) != 1 or len(msg.pid) != 1:
        raise FeedRejected(
            "AE",
            "100",
            f"ADT {trigger} has {len(msg.pid)} PID and {len(mrgs)} MRG segments; "
            "ITI TF-2 3.8.4.2.2 wants one of each",
        )
    repetitions = list(mrgs[0].mrg_1)
    if not any(cx.to_er7() for cx in repetitions):
        raise FeedRejected("AE", "101", "MRG-1 Prior Patient Identifier List is empty")
    subsumed, _, _ = _domain_identifier(repetitions, (authority,))
    if not subsumed:
        raise FeedRejected(
            "AE",
            "204",
            f"no MRG-1 identifier has assigning authority "
            f"&{authority}&{UNIVERSAL_ID_TYPE}",
        )
    return subsumed


def build_ack(
    message: str,
    ack_code: str,
    *,
    text: str = "",
    error_code: str | None = None,
    sending_application: str = "XDSI",
    sending_facility: str = "XDSI",
) -> str:
    """Build the original-mode ACK (ITI TF-2x C.2.3) answering ``message``.

    The ACK keeps the request's delimiters and version, addresses it back to
    MSH-3/MSH-4, echoes MSH-10 in MSA-2 and MSH-11 in MSH-11, and carries an
    ERR segment with the HL7 Table 0357 code on AE and AR (ERR-1 in v2.3.1,
    ERR-3 and ERR-4 from v2.5). When the request is unreadable the ACK is
    built from defaults: ``^~\\&``, version 2.3.1, MSA-2 empty. ``text`` is
    escaped; ``sending_application`` and ``sending_facility`` are HD values
    written as given.
    """
    if ack_code not in ACK_CODES:
        raise ValueError(f"ack_code {ack_code!r}: HL7 Table 0008 has {ACK_CODES}")
    if error_code is not None and error_code not in ERROR_CONDITIONS:
        raise ValueError(f"error_code {error_code!r} is not in HL7 Table 0357")
    if ack_code != "AA" and error_code is None:
        error_code = "207"
    request = _read_header(message)
    enc = request.encoding_chars if request is not None else DEFAULT_ENCODING
    version = request.version if request is not None else DEFAULT_VERSION

    ack = Message(
        "ACK",
        version=version,
        encoding_chars=enc,
        validation_level=VALIDATION_LEVEL.TOLERANT,
    )
    ack.msh.msh_3 = sending_application
    ack.msh.msh_4 = sending_facility
    ack.msh.msh_7 = datetime.now().strftime("%Y%m%d%H%M%S")
    ack.msh.msh_10 = uuid.uuid4().hex[:20]
    ack.msh.msh_11 = "P"
    if request is not None:
        msh = request.msh
        ack.msh.msh_5 = msh.msh_3.to_er7()
        ack.msh.msh_6 = msh.msh_4.to_er7()
        ack.msh.msh_11 = msh.msh_11.to_er7() or "P"
        event = msh.msh_9.msh_9_2.to_er7()
    else:
        event = ""

    # HL7 v2.3.1 added MSH-9.3 Message Structure; the ACK's is ACK.
    c = enc["COMPONENT"]
    ack.msh.msh_9 = f"ACK{c}{event}{c}ACK" if event else "ACK"

    ack.msa.msa_1 = ack_code
    if request is not None and request.msh.msh_10.to_er7():
        ack.msa.msa_2 = request.msh.msh_10.to_er7()
    if text:
        ack.msa.msa_3 = _escape(text, enc)

    if error_code is not None and ack_code != "AA":
        condition = (
            f"{error_code}{c}{_escape(ERROR_CONDITIONS[error_code], enc)}{c}HL70357"
        )
        err = ack.add_segment("ERR")
        if version in ERR_1_VERSIONS:
            # ERR-1 (ELD): segment^sequence^field^code; the CE is subcomponents.
            err.err_1 = c * 3 + condition.replace(c, enc["SUBCOMPONENT"])
        else:
            err.err_3 = condition
            err.err_4 = "E"
    return ack.to_er7() + "\r"


def build_feed(
    patient_id: str,
    *,
    trigger: str = "A01",
    subsumed_patient_id: str = "",
    name: str = "",
    birth_date: str = "",
    sex: str = "",
    sending_application: str = "XDSI_PIX",
    sending_facility: str = "XDSI",
    receiving_application: str = "XDSI_REG",
    receiving_facility: str = "XDSI",
    control_id: str | None = None,
) -> str:
    """Build an ITI-8 ADT message in HL7 v2.3.1 for one patient.

    ITI TF-2 3.8.4.1.2: A01, A04, A05 and A08 are MSH, EVN, PID and PV1 in
    structure ADT_A01, PV1-2 the Patient Class the event implies. ITI TF-2
    3.8.4.2.2: A40 is MSH, EVN, PID and MRG in structure ADT_A39, MRG-1 being
    ``subsumed_patient_id``. PID-3 is ``patient_id`` (a CX,
    ``ID^^^&OID&ISO``); ``name`` (an XPN in ER7, e.g. ``DOE^JANE``) goes to
    PID-5, ``birth_date`` (YYYYMMDD) to PID-7, ``sex`` (HL7 Table 0001) to
    PID-8. Segments end in CR. PID-5 is left empty when ``name`` is; ITI TF-2
    Table 3.8-2 wants a name from a real Patient Identity Source.
    """
    if trigger not in TRIGGER_EVENTS:
        raise ValueError(f"trigger {trigger!r}: ITI-8 has {sorted(TRIGGER_EVENTS)}")
    if not patient_id:
        raise ValueError("patient_id is empty; PID-3 is required")
    event = TRIGGER_EVENTS[trigger]
    merging = event.action is FeedAction.MERGE
    if merging != bool(subsumed_patient_id):
        raise ValueError(
            f"subsumed_patient_id {subsumed_patient_id!r}: MRG-1 is required "
            "for A40 and has no place in other events"
        )
    now = datetime.now().strftime("%Y%m%d%H%M%S")

    feed = Message(
        event.structure, version="2.3.1", validation_level=VALIDATION_LEVEL.TOLERANT
    )
    feed.msh.msh_3 = sending_application
    feed.msh.msh_4 = sending_facility
    feed.msh.msh_5 = receiving_application
    feed.msh.msh_6 = receiving_facility
    feed.msh.msh_7 = now
    feed.msh.msh_9 = f"ADT^{trigger}^{event.structure}"
    feed.msh.msh_10 = control_id or uuid.uuid4().hex[:20]
    feed.msh.msh_11 = "P"

    feed.evn.evn_1 = trigger
    feed.evn.evn_2 = now
    # ADT_A39 holds PID and MRG in its PATIENT group.
    patient = feed.add_group("ADT_A39_PATIENT") if merging else feed
    patient.pid.pid_3 = patient_id
    if name:
        patient.pid.pid_5 = name
    if birth_date:
        patient.pid.pid_7 = birth_date
    if sex:
        patient.pid.pid_8 = sex
    if merging:
        patient.mrg.mrg_1 = subsumed_patient_id
    else:
        feed.pv1.pv1_2 = event.patient_class
    return feed.to_er7() + "\r"


def handle_feed(
    message: str,
    on_patient: Callable[[PatientIdentity], None],
    *,
    assigning_authority: str,
    other_authorities: Sequence[str] = (),
) -> tuple[str, PatientIdentity | None]:
    """Serve one ITI-8 message as the Document Registry; never raises.

    Parses ``message``, hands the identity to ``on_patient`` and answers ACK
    AA (ITI TF-2 3.8.4.1.3). A rejected message answers AE or AR with its
    Table 0357 code, whether :func:`parse_feed` or ``on_patient`` raised the
    FeedRejected (an unknown patient in a merge, for one); any other failure
    of ``on_patient`` or of this node answers AE 207 and is logged with its
    traceback. The identity is returned only with an AA.
    """
    control_id = _control_id(message)
    try:
        identity = parse_feed(
            message,
            assigning_authority=assigning_authority,
            other_authorities=other_authorities,
        )
        on_patient(identity)
    except FeedRejected as exc:
        logger.info(
            "ITI-8 Patient Identity Feed: %s %s, MSH-10 %s: %s",
            exc.ack_code,
            exc.error_code,
            control_id,
            ERROR_CONDITIONS[exc.error_code],
        )
        return build_ack(
            message, exc.ack_code, text=exc.text, error_code=exc.error_code
        ), None
    except Exception:
        logger.exception(
            "ITI-8 Patient Identity Feed: serving MSH-10 %s failed", control_id
        )
        return build_ack(
            message, "AE", text="patient not stored", error_code="207"
        ), None

    logger.info(
        "ITI-8 Patient Identity Feed: AA, ADT %s, MSH-10 %s",
        identity.trigger,
        control_id,
    )
    return build_ack(message, "AA"), identity


def _parse(message: str) -> Message:
    """Parse the segments ITI-8 reads with hl7apy, tolerant of CR, LF or
    CRLF segment ends.

    Other segments (NTE, OBX, NK1 …) are left unparsed, and what is parsed
    is at most MAX_READ_LENGTH characters: hl7apy takes tens of microseconds
    a character, and a frame may hold megabytes.
    """
    if not _plain_delimiters(message):
        raise FeedRejected(
            "AR", "100", "MSH-1 or MSH-2 holds a letter, digit or white space"
        )
    segments = _SEGMENT_END.sub("\r", message.strip()).split("\r")
    normalised = "\r".join(s for s in segments if s[:3] in _READ_SEGMENTS)
    if len(normalised) > MAX_READ_LENGTH:
        raise FeedRejected(
            "AR",
            "207",
            f"the MSH, EVN, PID, PD1, PV1 and MRG segments hold more than "
            f"{MAX_READ_LENGTH} characters; message not read",
        )
    # MSH-2 names the repetition and subcomponent separators (HL7 v2.5
    # 2.5.4); _plain_delimiters let through only an MSH that has them.
    head = message.lstrip()
    encoding = head[4:].partition(head[3:4] or "|")[0] if head[:3] == "MSH" else ""
    separators = set(encoding[1:2] + encoding[3:4])
    if sum(normalised.count(c) for c in separators) > MAX_READ_REPETITIONS:
        raise FeedRejected(
            "AR",
            "207",
            f"the MSH, EVN, PID, PD1, PV1 and MRG segments hold more than "
            f"{MAX_READ_REPETITIONS} repetitions and subcomponents; message "
            "not read",
        )
    try:
        msg = parse_message(
            normalised,
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=False,
        )
    except UnsupportedVersion as exc:
        # The parser's words quote the peer's MSH-12, cut short here.
        said = logs.shown(str(exc), ACK_QUOTE)
        raise FeedRejected("AR", "203", f"HL7 version not supported: {said}") from exc
    except HL7apyException as exc:
        said = logs.shown(str(exc), ACK_QUOTE)
        raise FeedRejected("AR", "100", f"not an HL7 v2 message: {said}") from exc
    except (LookupError, ValueError) as exc:
        # hl7apy raises these on some malformed MSH segments.
        raise FeedRejected("AR", "100", "MSH segment cannot be parsed") from exc
    if msg.version not in SUPPORTED_VERSIONS:
        raise FeedRejected(
            "AR",
            "203",
            f"HL7 version {logs.shown(str(msg.version), ACK_QUOTE)}; ITI-8 here "
            f"is {SUPPORTED_VERSIONS}",
        )
    return msg


def _plain_delimiters(message: str) -> bool:
    """Whether the MSH's field separator and encoding characters (MSH-1,
    MSH-2) are neither letters, digits nor white space: an ACK written with
    such delimiters would escape its own fixed values (MSA-1, MSH-7) into
    nonsense (HL7 v2.5 2.5.4 recommends |^~\\&)."""
    head = message.lstrip()
    if not head.startswith("MSH") or len(head) < 4:
        return True  # not an MSH: unreadable anyway, answered from defaults
    separator = head[3]
    encoding = head[4:].partition(separator)[0]
    return not any(c.isalnum() or c.isspace() for c in separator + encoding)


def _read_header(message: str) -> Message | None:
    """Parse only the MSH of ``message``, or return None when it is
    unreadable, or has delimiters no ACK could be written with."""
    if not _plain_delimiters(message):
        return None
    normalised = _SEGMENT_END.sub("\r", message.strip())
    header = normalised.partition("\r")[0]
    try:
        return parse_message(
            header, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
        )
    except (HL7apyException, LookupError, ValueError):
        return None


def _control_id(message: str) -> str:
    """Return MSH-10 of ``message`` for the log, or ``-`` when unreadable:
    a peer's text, its start in printable ASCII (:func:`xdsi.logs.quoted`)."""
    header = _read_header(message)
    if header is None:
        return "-"
    return logs.quoted(header.msh.msh_10.to_er7()) or "-"


def _escape(text: str, enc: dict[str, str]) -> str:
    r"""Escape delimiters in free text: \F\ \S\ \T\ \R\ \E\ (HL7 v2.5 2.7)."""
    esc = enc["ESCAPE"]
    escapes = (
        (enc["FIELD"], "F"),
        (enc["COMPONENT"], "S"),
        (enc["SUBCOMPONENT"], "T"),
        (enc["REPETITION"], "R"),
    )
    out = text.replace(esc, f"{esc}E{esc}")
    for delimiter, letter in escapes:
        out = out.replace(delimiter, f"{esc}{letter}{esc}")
    return out.replace("\r", " ").replace("\n", " ")


def _unescape(text: str, delimiters: str) -> str:
    r"""Undo the delimiter escapes \F\ \S\ \T\ \R\ \E\ (HL7 v2.5 2.7) of
    free text, ``delimiters`` being MSH-1 and MSH-2 (field, component,
    repetition, escape, subcomponent); other escapes are left as sent."""
    field, component, repetition, esc, subcomponent = delimiters
    letters = {
        "F": field,
        "S": component,
        "T": subcomponent,
        "R": repetition,
        "E": esc,
    }
    pattern = re.escape(esc) + "([FSTRE])" + re.escape(esc)
    return re.sub(pattern, lambda m: letters[m.group(1)], text)


@dataclass(frozen=True)
class AckSummary:
    """What an ACK says: MSA-1, MSA-2 and the error text, for people and audit.

    ``sender`` and ``receiver`` are MSH-3|MSH-4 and MSH-5|MSH-6 of the ACK;
    ``trigger`` is MSH-9.2, the event of the message acknowledged.
    """

    code: str
    control_id: str
    text: str
    sender: str
    receiver: str
    trigger: str = ""


def read_ack(ack: str) -> AckSummary:
    """Summarise an HL7 v2 ACK (ITI TF-2x C.2.3) without failing on junk.

    The separators are the ACK's own (MSH-1, MSH-2); the text joins MSA-3
    and the ERR segment's readable components, their delimiter escapes
    undone.
    """
    segments = [s for s in ack.replace("\r\n", "\r").replace("\n", "\r").split("\r")]
    msh = next((s for s in segments if s.startswith("MSH") and len(s) > 8), "")
    field = msh[3] if msh else "|"
    component = msh[4] if msh else "^"
    # msh_fields[n] is MSH-n: MSH-1 is the field separator itself.
    msh_fields = ["MSH", field, *msh[4:].split(field)] if msh else []
    msa = next((s.split(field) for s in segments if s.startswith("MSA")), [])
    texts = [msa[3]] if len(msa) > 3 and msa[3] else []
    for segment in segments:
        if segment.startswith("ERR"):
            for value in segment.split(field)[1:]:
                parts = [p for p in value.split(component) if p and not p.isdigit()]
                texts.extend(p for p in parts if p not in ("HL70357", "E", "W"))

    def pair(first: int) -> str:
        return "|".join(f for f in msh_fields[first : first + 2] if f)

    message_type = msh_fields[9].split(component) if len(msh_fields) > 9 else []
    # MSH-1 and MSH-2 (^~\& when the ACK has none to read).
    encoding = msh[3:8] if len(msh) >= 8 else "|^~\\&"
    if len(set(encoding)) == len(encoding):
        texts = [_unescape(text, encoding) for text in texts]
    return AckSummary(
        code=msa[1] if len(msa) > 1 else "",
        control_id=msa[2] if len(msa) > 2 else "",
        text="; ".join(dict.fromkeys(texts)),
        sender=pair(3),
        receiver=pair(5),
        trigger=message_type[1] if len(message_type) > 1 else "",
    )

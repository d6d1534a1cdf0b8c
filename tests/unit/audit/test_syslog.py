"""RFC 5424 messages and RFC 5425 framing of audit (ITI TF-2 3.20.6)."""

import os
import socket
from datetime import UTC, datetime

import pytest

from tests.unit.audit.conftest import RealIds
from xdsi.audit import AuditEvent, DocumentRef, Endpoint, Outcome, build_audit_message
from xdsi.audit.syslog import (
    BOM,
    FrameReader,
    FramingError,
    SyslogFormatError,
    UdpSender,
    format_message,
    frame,
    parse_message,
)

WHEN = datetime(2024, 5, 2, 9, 30, 15, 250000, tzinfo=UTC)


def audit_xml(ids: RealIds, patient_id: str | None = None) -> bytes:
    """The Repository's ITI-43 audit message for the MR manifest."""
    event = AuditEvent(
        transaction="ITI-43",
        actor="Document Repository",
        outcome=Outcome.SUCCESS,
        source=Endpoint("http://127.0.0.1:9082/xds/repository", "127.0.0.1"),
        destination=Endpoint("http://www.w3.org/2005/08/addressing/anonymous", ""),
        patient_id=patient_id or ids.patient_id,
        documents=(DocumentRef(ids.document_unique_id, ids.repository_unique_id),),
        event_time=WHEN,
    )
    return build_audit_message(event, audit_source_id="xdsi")


def test_header_carries_pri_msgid_app_name_and_a_bom(real_ids: RealIds) -> None:
    """ITI TF-2 3.20.6.1: PRI 85, MSGID IHE+RFC-3881, BOM before the XML."""
    xml = audit_xml(real_ids)

    message = format_message(
        xml, app_name="xdsi", hostname="node.example", timestamp=WHEN
    )

    header, _, rest = message.partition(b" - ")
    assert header == (
        b"<85>1 2024-05-02T09:30:15.250000Z node.example xdsi "
        + str(os.getpid()).encode()
        + b" IHE+RFC-3881"
    )
    assert rest == BOM + xml


def test_log_audit_facility_gives_pri_109(real_ids: RealIds) -> None:
    """ITI TF-2 3.20.6.1: facility 13 (log audit) at severity notice."""
    message = format_message(audit_xml(real_ids), app_name="xdsi", facility=13)

    assert message.startswith(b"<109>1 ")


def test_other_facility_is_refused(real_ids: RealIds) -> None:
    """ITI TF-2 3.20.6.1: only facilities 10 and 13 carry audit messages."""
    with pytest.raises(ValueError, match="allows 10 or 13"):
        format_message(audit_xml(real_ids), app_name="xdsi", facility=16)


def test_header_fields_are_printable_ascii_within_their_length() -> None:
    """RFC 5424 6.2.5: APP-NAME is 1 to 48 PRINTUSASCII characters."""
    message = format_message(b"<x/>", app_name="x dsi é" + "a" * 60, hostname="h")

    app_name = message.split(b" ")[3]
    assert app_name == b"x_dsi__" + b"a" * 41


def test_formatted_message_parses_back(real_ids: RealIds) -> None:
    """RFC 5424 6: header fields and MSG come back as written."""
    xml = audit_xml(real_ids)

    parsed = parse_message(format_message(xml, app_name="xdsi", hostname="h"))

    assert (parsed.facility, parsed.severity) == (10, 5)
    assert (parsed.app_name, parsed.msgid, parsed.hostname) == (
        "xdsi",
        "IHE+RFC-3881",
        "h",
    )
    assert parsed.structured_data == "-"
    assert parsed.msg == xml


def test_structured_data_with_escaped_bracket_is_kept_whole() -> None:
    """RFC 5424 6.3.3: ']' inside a PARAM-VALUE is escaped and not an end."""
    raw = b'<85>1 - h a - m [x@1 k="a\\]b"][y@1] \xef\xbb\xbf<x/>'

    parsed = parse_message(raw)

    assert parsed.structured_data == '[x@1 k="a\\]b"][y@1]'
    assert parsed.msg == b"<x/>"


@pytest.mark.parametrize(
    "raw",
    [b"", b"plain text", b"<192>1 - - - - - -", b"<85> 2024 h a p m - x"],
    ids=["empty", "no-header", "pri-too-big", "no-version"],
)
def test_bytes_without_an_rfc5424_header_are_refused(raw: bytes) -> None:
    """RFC 5424 6: PRI, VERSION and six header fields come first."""
    with pytest.raises(SyslogFormatError):
        parse_message(raw)


def test_octet_count_is_bytes_not_characters(real_ids: RealIds) -> None:
    """RFC 5425 4.3: MSG-LEN counts octets; UTF-8 names take more than one."""
    xml = audit_xml(real_ids, patient_id="Müller-Ødegård^^^&1.2.3&ISO")
    message = format_message(xml, app_name="xdsi")

    framed = frame(message)

    length, _, body = framed.partition(b" ")
    assert int(length) == len(message) > len(message.decode("utf-8"))
    assert body == message


def test_reader_splits_frames_however_the_stream_is_cut(real_ids: RealIds) -> None:
    """RFC 5425 4.3: frames are found across and within TCP segments."""
    messages = [
        format_message(audit_xml(real_ids), app_name=f"xdsi{i}") for i in range(3)
    ]
    stream = b"".join(frame(m) for m in messages)
    reader = FrameReader(max_length=1 << 20)

    received = []
    for start in range(0, len(stream), 7):
        received += reader.feed(stream[start : start + 7])

    assert received == messages
    assert reader.pending == 0


@pytest.mark.parametrize(
    "stream",
    [b"abc def", b"0 x", b"1234567890123 x", b"x" * 20],
    ids=["letters", "leading-zero", "too-long", "no-space"],
)
def test_reader_refuses_a_stream_that_is_not_octet_counted(stream: bytes) -> None:
    """RFC 5425 4.3: MSG-LEN is NONZERO-DIGIT *DIGIT, then a space."""
    with pytest.raises(FramingError):
        list(FrameReader(max_length=1 << 20).feed(stream))


def test_reader_refuses_a_frame_above_its_limit() -> None:
    """RFC 5425 4.3.1: a receiver may refuse messages above its maximum."""
    with pytest.raises(FramingError, match="exceeds"):
        list(FrameReader(max_length=100).feed(b"101 "))


def test_udp_sender_puts_one_message_in_one_datagram(real_ids: RealIds) -> None:
    """RFC 5426 3.1: each datagram carries exactly one syslog message."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    message = format_message(audit_xml(real_ids), app_name="xdsi")
    sender = UdpSender("127.0.0.1", receiver.getsockname()[1])
    try:
        sender.send(message)
        assert receiver.recv(70000) == message
    finally:
        sender.close()
        receiver.close()


def test_udp_sender_refuses_a_message_larger_than_a_datagram() -> None:
    """RFC 5426 3.2: a message above the datagram limit is not truncated."""
    sender = UdpSender("127.0.0.1", 9, max_payload=1000)
    try:
        with pytest.raises(ValueError, match="exceeds the UDP limit"):
            sender.send(b"x" * 1001)
    finally:
        sender.close()

"""Tests of xdsi.wire.xml: safe parsing of what peers send."""

import os
import threading
from pathlib import Path

import pytest

from xdsi.wire import MalformedMessage, parse_xml

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"><env:Body>
<lolz>&lol9;</lolz></env:Body></env:Envelope>"""


def _hostile(kind: str, target: Path) -> bytes:
    """A SOAP envelope whose external entity of ``kind`` is ``target``."""
    uri = target.as_uri()
    prolog = {
        "general entity": f'<!DOCTYPE e [<!ENTITY x SYSTEM "{uri}">]>',
        "parameter entity": f'<!DOCTYPE e [<!ENTITY % x SYSTEM "{uri}"> %x;]>',
        "external DTD": f'<!DOCTYPE e SYSTEM "{uri}">',
    }[kind]
    return (
        f'<?xml version="1.0"?>{prolog}'
        '<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">'
        "<env:Body><r>&x;</r></env:Body></env:Envelope>"
        if kind == "general entity"
        else f'<?xml version="1.0"?>{prolog}'
        '<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">'
        "<env:Body><r/></env:Body></env:Envelope>"
    ).encode()


def test_billion_laughs_is_refused_without_expansion() -> None:
    """SOAP 1.2 Part 1 5: a document type declaration is refused, not expanded.

    libxml2's amplification guard may stop the parse before our DTD check;
    either way the peer gets MalformedMessage.
    """
    with pytest.raises(MalformedMessage):
        parse_xml(BILLION_LAUGHS)


@pytest.mark.parametrize("kind", ["general entity", "parameter entity", "external DTD"])
def test_external_entity_is_refused_and_its_file_never_opened(
    kind: str, tmp_path: Path
) -> None:
    """SOAP 1.2 Part 1 5: an external entity is refused, its file unopened.

    The entity points at a FIFO: opening it for reading would block until a
    writer comes, so a parser that tried would hang in its thread.
    """
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def parse() -> None:
        try:
            parse_xml(_hostile(kind, fifo))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=parse, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(5)
        pytest.fail(f"the parser opened the {kind} file")
    assert isinstance(outcome[0], MalformedMessage)
    assert "document type declaration" in outcome[0].reason
    with pytest.raises(OSError):
        # ENXIO: nobody holds the FIFO open for reading.
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def test_internal_entity_declaration_is_refused() -> None:
    """SOAP 1.2 Part 1 5: even a harmless internal entity is refused."""
    data = (
        b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY name "x">]>'
        b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">'
        b"<env:Body><r>&name;</r></env:Body></env:Envelope>"
    )
    with pytest.raises(MalformedMessage):
        parse_xml(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not xml at all",
        b"<env:Envelope xmlns:env='urn:x'><env:Body>",
        b"<a>&undefined;</a>",
    ],
    ids=["empty", "text", "unclosed", "undeclared entity"],
)
def test_not_well_formed_xml_is_malformed(data: bytes) -> None:
    """SOAP 1.2 Part 1 5: a SOAP message is a well-formed XML infoset."""
    with pytest.raises(MalformedMessage, match="not well-formed"):
        parse_xml(data)


def test_well_formed_envelope_parses() -> None:
    """SOAP 1.2 Part 1 5.1: a plain envelope parses to its Envelope element."""
    root = parse_xml(
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope">'
        b"<env:Body><r>&amp;</r></env:Body></env:Envelope>"
    )
    assert root.tag == "{http://www.w3.org/2003/05/soap-envelope}Envelope"
    assert root[0][0].text == "&"

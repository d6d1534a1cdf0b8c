"""ITI-8 messages as a Patient Identity Source puts them on the wire."""

from collections.abc import Iterator

import pytest

from xdsi.hl7 import MllpServer, PatientIdentity, handle_feed

# The affinity domain of the Connectathon registry (ITI TF-2 3.8.4.1.3).
AFFINITY_DOMAIN = "1.3.6.1.4.1.21367.2005.13.20.1000"
AFFINITY_ID = "IHEBLUE-2736"
LOCAL_CX = "4711^^^HOSP&1.2.840.99999.1&ISO"

ADT_A01_V231 = (
    "MSH|^~\\&|PAT_ID_SOURCE|CLINIC|XDSI_REG|XDSI|20240312101500||ADT^A01^ADT_A01"
    "|PIF-0001|P|2.3.1\r"
    "EVN||20240312101500\r"
    f"PID|||{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO~{LOCAL_CX}||MOORE^CHIP^^^^^L"
    "||19380224|M|||10 PINETREE^^WEBSTER^MO^63119\r"
    "PV1||I\r"
)

ADT_A04_V25 = (
    "MSH|^~\\&|PAT_ID_SOURCE|CLINIC|XDSI_REG|XDSI|20240312101600||ADT^A04^ADT_A01"
    "|PIF-0002|P|2.5\r"
    "EVN||20240312101600\r"
    f"PID|||{LOCAL_CX}~{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO||GREEN^ALMA^^^^^L"
    "||19511030|F\r"
    "PV1||O\r"
)

ADT_A08_V25 = (
    "MSH|^~\\&|PAT_ID_SOURCE|CLINIC|XDSI_REG|XDSI|20240312111500||ADT^A08^ADT_A01"
    "|PIF-0003|P|2.5\r"
    "EVN||20240312111500\r"
    f"PID|||{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO||MOORE^CHIP^A^^^^L"
    "||19380224|M\r"
    "PV1||N\r"
)

# ITI TF-2 3.8.4.2.2: MRG-1 names the subsumed patient, PID-3 the survivor.
SUBSUMED_ID = "IHEBLUE-2737"
ADT_A40_V231 = (
    "MSH|^~\\&|PAT_ID_SOURCE|CLINIC|XDSI_REG|XDSI|20240312121500||ADT^A40^ADT_A39"
    "|PIF-0004|P|2.3.1\r"
    "EVN|A40|20240312121500\r"
    f"PID|||{AFFINITY_ID}^^^&{AFFINITY_DOMAIN}&ISO~{LOCAL_CX}||MOORE^CHIP^^^^^L\r"
    f"MRG|4712^^^HOSP&1.2.840.99999.1&ISO~{SUBSUMED_ID}^^^&{AFFINITY_DOMAIN}&ISO\r"
)


@pytest.fixture
def fed() -> list[PatientIdentity]:
    """The identities the Document Registry was handed, in order."""
    return []


@pytest.fixture
def registry(fed: list[PatientIdentity]) -> Iterator[MllpServer]:
    """A Document Registry's ITI-8 listener on an ephemeral loopback port."""

    def handler(message: str) -> str:
        return handle_feed(message, fed.append, assigning_authority=AFFINITY_DOMAIN)[0]

    server = MllpServer("127.0.0.1", 0, handler, timeout=2.0)
    server.start()
    yield server
    server.stop()

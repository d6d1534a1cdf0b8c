"""HL7 v2 for xdsi: the ITI-8 Patient Identity Feed and its MLLP transport.

Implements ITI TF-2 3.8 (Patient Identity Feed) over MLLP (ITI TF-2x C.2.1).
"""

from xdsi.hl7.adt import (
    AckSummary,
    FeedAction,
    FeedRejected,
    PatientIdentity,
    build_ack,
    build_feed,
    handle_feed,
    parse_feed,
    read_ack,
)
from xdsi.hl7.mllp import MllpError, MllpServer, send_message

__all__ = [
    "AckSummary",
    "FeedAction",
    "FeedRejected",
    "MllpError",
    "MllpServer",
    "PatientIdentity",
    "build_ack",
    "build_feed",
    "handle_feed",
    "parse_feed",
    "read_ack",
    "send_message",
]

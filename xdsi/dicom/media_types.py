"""The media types DICOMweb answers go in, and which of them an Accept
header takes.

Implements the content negotiation of DICOM PS3.18 8.7 (Acceptable Media
Types, 406 when none is taken: 8.7.8.1) by RFC 9110 12.5.1: each media
type offered gets the weight of the most specific media range matching it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from werkzeug import http
from werkzeug.datastructures import MIMEAccept

# DICOM PS3.18 8.7.3.2 (Table 8.7.3-2): the DICOM JSON and Native DICOM
# Model (DICOM PS3.19 A.1) forms of metadata, search results and the Store
# Instances Response Module.
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
# RFC 6839 3.1: DICOM JSON is JSON, and may go as such.
JSON = "application/json"
MULTIPART_RELATED = "multipart/related"
# DICOM PS3.18 8.8.4: the charset a client may name in Accept; every answer
# of this node is in UTF-8.
UTF_8 = ("charset", "utf-8")


@dataclass(frozen=True)
class MediaType:
    """A media type an answer goes in, with its parameters (RFC 9110 8.3.1),
    names and values lower case."""

    name: str
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return "".join(
            [
                self.name,
                *(f'; {key}="{value}"' for key, value in self.parameters.items()),
            ]
        )


DICOM_JSON_TYPE = MediaType(DICOM_JSON)
JSON_TYPE = MediaType(JSON)
DICOM_XML_TYPE = MediaType(DICOM_XML)
# DICOM PS3.18 Table 10.4.4-1 and 10.6.3.3 (Table 8.7.3-2): metadata and
# search results as XML go one Native DICOM Model document a part.
MULTIPART_XML_TYPE = MediaType(MULTIPART_RELATED, {"type": DICOM_XML})


def preferred(accept: str | None, offered: Sequence[MediaType]) -> MediaType | None:
    """The media type of ``offered`` that the Accept header ``accept``
    weighs highest, the first of those it weighs alike; None when it takes
    none of them (a 406, DICOM PS3.18 8.7.8.1).

    No Accept header, or an empty one, takes any media type (RFC 9110
    12.5.1): the first offered goes. A media range whose weight is no
    qvalue, no number from 0 to 1 (RFC 9110 12.4.2) such as q=1.5, is
    malformed and left out, as if the header did not hold it.
    """
    if accept is None or not accept.strip():
        return offered[0] if offered else None
    ranges = http.parse_accept_header(_quoted_types(accept), MIMEAccept)
    best, best_weight = None, 0.0
    for media_type in offered:
        weight = _weight(ranges, media_type)
        if weight > best_weight:
            best, best_weight = media_type, weight
    return best


# A parameter value with a "/" left unquoted, as user agents write the type
# of a multipart range (type=application/dicom+xml).
_SLASHED_VALUE = re.compile(
    r'(;\s*[!#$%&\'*+.^_`|~0-9A-Za-z-]+\s*=\s*)([^\s";,]*/[^\s";,]*)'
)


def _quoted_types(accept: str) -> str:
    """``accept`` with each parameter value holding a "/" quoted.

    RFC 9110 5.6.6 wants such a value quoted (a "/" is no token character),
    and werkzeug cuts an unquoted one at it; but user agents write the type
    of a multipart range unquoted often enough, and WADO-RS instance
    retrieval takes it so: the type is read whole here too.
    """
    return _SLASHED_VALUE.sub(r'\1"\2"', accept)


def _weight(ranges: MIMEAccept, media_type: MediaType) -> float:
    """The weight ``ranges`` give ``media_type``.

    RFC 9110 12.5.1: that of the most specific media range matching it. A
    range with parameters matches only when each names one of the media
    type's own, or the charset every answer is in, UTF-8 (DICOM PS3.18
    8.8.4); each parameter makes it more specific.
    """
    kind, subtype = media_type.name.split("/")
    weight, specificity = 0.0, -1
    for value, quality in ranges:
        media_range, parameters = http.parse_options_header(value)
        range_kind, _, range_subtype = media_range.lower().partition("/")
        if range_kind == "*" and range_subtype == "*":
            rank = 0
        elif range_kind != kind:
            continue
        elif range_subtype == "*":
            rank = 1
        elif range_subtype == subtype:
            rank = 2
        else:
            continue
        named = {(name.lower(), v.lower()) for name, v in parameters.items()}
        if not named <= {UTF_8, *media_type.parameters.items()}:
            continue
        rank += len(named)
        if rank > specificity:
            weight, specificity = quality, rank
    return weight

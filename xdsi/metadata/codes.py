"""Coded values as XDS metadata carries them (ITI TF-3 4.2.3.1.2)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A code: value, coding scheme and display name.

    In ebRIM the value is the Classification's nodeRepresentation, the
    scheme its ``codingScheme`` slot and the display its Name.
    """

    code: str
    scheme: str
    display: str = ""

"""RegistryResponse and RegistryErrorList: build and read (ebRS 3.0, ITI TF-3 4.2.4)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lxml import etree

from xdsi import ns
from xdsi.errors import SEVERITY_ERROR, SEVERITY_WARNING


class ResponseStatus(StrEnum):
    """RegistryResponse status (ITI TF-3 4.2.4.2)."""

    SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
    FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
    PARTIAL_SUCCESS = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"


@dataclass(frozen=True)
class RegistryError:
    """One RegistryError of a RegistryErrorList."""

    code: str
    message: str
    location: str = ""
    severity: str = SEVERITY_ERROR

    @property
    def is_error(self) -> bool:
        return self.severity == SEVERITY_ERROR


def status_of(errors: list[RegistryError], *, partial: bool = False) -> ResponseStatus:
    """Return Failure when an error has Error severity, else Success.

    ``partial`` selects PartialSuccess instead of Failure, for retrievals
    that returned some of what was asked (ITI TF-2 3.43.4.2.3).
    """
    if any(e.is_error for e in errors):
        return ResponseStatus.PARTIAL_SUCCESS if partial else ResponseStatus.FAILURE
    return ResponseStatus.SUCCESS


def error_list(errors: list[RegistryError]) -> etree._Element:
    """Build ``rs:RegistryErrorList`` with one RegistryError per error."""
    element = etree.Element(f"{{{ns.RS}}}RegistryErrorList", nsmap={"rs": ns.RS})
    highest = SEVERITY_ERROR if any(e.is_error for e in errors) else SEVERITY_WARNING
    element.set("highestSeverity", highest)
    for error in errors:
        item = etree.SubElement(element, f"{{{ns.RS}}}RegistryError")
        item.set("errorCode", error.code)
        item.set("codeContext", error.message)
        item.set("severity", error.severity)
        if error.location:
            item.set("location", error.location)
    return element


def registry_response(
    errors: list[RegistryError], status: ResponseStatus | None = None
) -> etree._Element:
    """Build ``rs:RegistryResponse`` (ITI TF-2 3.42.4.2, 3.41.4.2)."""
    element = etree.Element(f"{{{ns.RS}}}RegistryResponse", nsmap={"rs": ns.RS})
    element.set("status", (status or status_of(errors)).value)
    if errors:
        element.append(error_list(errors))
    return element


def read_errors(response: etree._Element) -> list[RegistryError]:
    """Read the RegistryErrors of any response that may carry them."""
    return [
        RegistryError(
            code=item.get("errorCode", ""),
            message=item.get("codeContext", ""),
            location=item.get("location", ""),
            severity=item.get("severity", SEVERITY_ERROR),
        )
        for item in response.iter(f"{{{ns.RS}}}RegistryError")
    ]


def read_status(response: etree._Element) -> str:
    """Return the status URN of a RegistryResponse or a response wrapping one."""
    if response.get("status"):
        return response.get("status", "")
    inner = response.find(f".//{{{ns.RS}}}RegistryResponse")
    return inner.get("status", "") if inner is not None else ""

"""Rules of XDS and XDS-I.b that a request can break.

The pure core raises these; the actor that answers maps each class, through
profiles/rules.toml, to the XDS error code of ITI TF-3 Table 4.2.4.1-2 for
that actor (Registry or Repository variant) and answers with a
RegistryResponse or RetrieveDocumentSetResponse. Anything else that goes
wrong becomes XDSRegistryError or XDSRepositoryError.

XdsError
 +-- MetadataInvalid
 |    +-- UnresolvedReference
 +-- UnknownPatientId
 +-- PatientIdDoesNotMatch
 +-- DuplicateUniqueIdInRegistry
 +-- DuplicateUniqueIdInMessage
 +-- NonIdenticalHash
 +-- DeprecatedDocument
 +-- HashMismatch, SizeMismatch
 +-- MissingDocument, MissingDocumentMetadata
 +-- UnknownStoredQuery, StoredQueryMissingParam, StoredQueryParamNumber
 +-- TooManyResults, ResultNotSinglePatient
 +-- UnknownRepositoryId, DocumentUniqueIdError, StoredCopyMissing
 +-- ImagingRequestError, TransferSyntaxUnavailable
 +-- RegistryNotAvailable
 +-- MetadataUpdateInvalid, MetadataUpdateOperationUnsupported
"""

from __future__ import annotations

from functools import cache

from xdsi.profiles_loader import load_profile_table

SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"


class XdsError(Exception):
    """A broken rule: what is wrong, on which object (``location``)."""

    def __init__(self, message: str, location: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.location = location

    def code_for(self, actor: str) -> str:
        """Return the XDS error code this rule answers with for ``actor``."""
        return error_code(type(self), actor)


class MetadataInvalid(XdsError):
    """Metadata breaks a rule of ITI TF-3 4.1 or 4.2."""


class UnresolvedReference(MetadataInvalid):
    """An ebRIM reference names no object (ebRS 3.0 UnresolvedReferenceException)."""


class UnknownPatientId(XdsError):
    """The patient id is not known to the Document Registry (ITI TF-3 4.2.4.1)."""


class PatientIdDoesNotMatch(XdsError):
    """A DocumentEntry's or Folder's patient id differs from the SubmissionSet's."""


class DuplicateUniqueIdInRegistry(XdsError):
    """A uniqueId of the submission is already in the Document Registry."""


class DuplicateUniqueIdInMessage(XdsError):
    """A uniqueId is used by two objects of one submission."""


class NonIdenticalHash(XdsError):
    """A document with this uniqueId is already held with another hash."""


class DeprecatedDocument(XdsError):
    """A document relationship targets a DocumentEntry that is not Approved.

    ITI TF-3 4.2.2.2; the code is XDSRegistryDeprecatedDocumentError.
    """


class HashMismatch(XdsError):
    """The metadata's hash is not the document's SHA-1 (ITI TF-2 3.41.4.1.3)."""


class SizeMismatch(XdsError):
    """The size in the metadata is not the document's size (ITI TF-2 3.41.4.1.3)."""


class MissingDocument(XdsError):
    """A DocumentEntry has no attached document, or a requested one is gone."""


class MissingDocumentMetadata(XdsError):
    """An attached document has no DocumentEntry."""


class UnknownStoredQuery(XdsError):
    """The stored query id is not one of ITI TF-2 3.18.4.1.2.3.7."""


class StoredQueryMissingParam(XdsError):
    """A required stored query parameter is absent (ITI TF-2 3.18.4.1.2.3.7)."""


class StoredQueryParamNumber(XdsError):
    """A parameter is repeated where one value is allowed, or malformed."""


class UnknownRepositoryId(XdsError):
    """A retrieve names a repositoryUniqueId the responder does not hold."""


class DocumentUniqueIdError(XdsError):
    """A retrieve names a document uniqueId the responder does not hold."""


class StoredCopyMissing(XdsError):
    """A held document or instance whose stored copy is gone or is not of
    its recorded size; the responder's fault, not the requester's."""


class ImagingRequestError(XdsError):
    """A RAD-69 request is malformed (RAD TF-3 4.69.4.1.2)."""


class TransferSyntaxUnavailable(XdsError):
    """No transfer syntax of the request's list can be produced (RAD TF-3 4.69.4.2)."""


@cache
def _rules() -> dict[str, dict[str, str]]:
    return load_profile_table("rules")


def error_code(rule: type[XdsError], actor: str) -> str:
    """Return the code of ``rule`` for ``actor`` from profiles/rules.toml.

    A rule with no row for the actor answers with that actor's generic
    internal error code.
    """
    for cls in rule.__mro__:
        row = _rules().get(cls.__name__)
        if row and actor in row:
            return row[actor]
    return generic_code(actor)


def generic_code(actor: str) -> str:
    """Return the catch-all error code of an actor (ITI TF-3 Table 4.2.4.1-2)."""
    if actor == "registry":
        return "XDSRegistryError"
    return "XDSRepositoryError"


class TooManyResults(XdsError):
    """A query matches more entries than the registry returns at once."""


class RegistryNotAvailable(XdsError):
    """The Document Repository could not reach the Document Registry."""


class ResultNotSinglePatient(XdsError):
    """A query's results would span several patients (ITI TF-2 3.18.4.1.2.3.7)."""


class MetadataUpdateInvalid(XdsError):
    """An availabilityStatus update cannot be carried out.

    ITI TF-2 3.57.4.1.3.3.2: the target is no registered DocumentEntry, its
    status is not the OriginalStatus stated, or the change is not allowed.
    """


class MetadataUpdateOperationUnsupported(XdsError):
    """An Update Document Set operation this Document Registry does not do."""

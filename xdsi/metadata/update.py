"""XDS Metadata Update: read and check the status updates of an ITI-57.

Implements ITI TF-2 3.57.4.1.3.3.2 (change a DocumentEntry's
availabilityStatus): one SubmissionSet and, per DocumentEntry, an Association
of type UpdateAvailabilityStatus from the SubmissionSet to its entryUUID whose
Slots OriginalStatus and NewStatus name the change, one of those
profiles/xds_metadata.toml allows. The other operations of ITI TF-2
3.57.4.1.3.3 are refused. Looking the targets up is the Document Registry's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdsi.errors import (
    MetadataInvalid,
    MetadataUpdateInvalid,
    MetadataUpdateOperationUnsupported,
    PatientIdDoesNotMatch,
    XdsError,
)
from xdsi.metadata import ebrim, validation
from xdsi.metadata.ebrim import Submission
from xdsi.metadata.validation import HeldObject


@dataclass(frozen=True)
class StatusUpdate:
    """One availabilityStatus change: which DocumentEntry, from what to what."""

    association_id: str
    entry_uuid: str
    original_status: str
    new_status: str


def update_table() -> dict[str, Any]:
    """The [MetadataUpdate] table of profiles/xds_metadata.toml."""
    return ebrim.metadata_table()["MetadataUpdate"]


def allowed_changes() -> set[tuple[str, str]]:
    """The (OriginalStatus, NewStatus) pairs ITI TF-2 3.57.4.1.3.3.2 allows."""
    return {(row["original"], row["new"]) for row in update_table()["status_changes"]}


def read_status_updates(
    submission: Submission,
) -> tuple[list[StatusUpdate], list[XdsError]]:
    """Read the status updates of an Update Document Set request.

    Returns the updates and every rule the request breaks without registry
    state: exactly one valid SubmissionSet (ITI TF-2 3.57.4.1.3.1), each
    Association an UpdateAvailabilityStatus from the SubmissionSet with one
    OriginalStatus and one NewStatus of an allowed change, each DocumentEntry
    named once.
    """
    table = update_table()
    errors: list[XdsError] = []
    submission_sets = submission.submission_sets
    if len(submission_sets) != 1:
        errors.append(
            MetadataInvalid(
                f"Update Document Set holds {len(submission_sets)} SubmissionSets; "
                "ITI TF-2 3.57.4.1.3.1 wants exactly one"
            )
        )
    else:
        errors.extend(validation.check_object(submission_sets[0]))
    submission_set_id = submission_sets[0].id if len(submission_sets) == 1 else None

    # Limitation: new versions of DocumentEntries and Folders (ITI TF-2
    # 3.57.4.1.3.3.1, 3.57.4.1.3.3.3) are not carried out; such a request is
    # answered XDSMetadataUpdateOperationError.
    for obj in submission.objects:
        if obj.kind in (ebrim.DOCUMENT_ENTRY, ebrim.FOLDER):
            errors.append(
                MetadataUpdateOperationUnsupported(
                    f"{obj.kind} {obj.id}: this Document Registry changes only "
                    "the availabilityStatus of DocumentEntries (ITI TF-2 "
                    "3.57.4.1.3.3.2); new metadata versions are not supported",
                    obj.id,
                )
            )
        elif obj.kind == "":
            errors.append(
                MetadataInvalid(
                    f"RegistryPackage {obj.id} is not classified as exactly one of "
                    "SubmissionSet and Folder (ITI TF-3 4.2.3.3, 4.2.3.4)",
                    obj.id,
                )
            )

    updates: list[StatusUpdate] = []
    for association in submission.associations:
        label = f"Association {association.id}"
        if association.association_type != table["update_availability_status"]:
            errors.append(
                MetadataUpdateOperationUnsupported(
                    f"{label} of type {association.association_type!r}: this "
                    "Document Registry takes only "
                    f"{table['update_availability_status']} in an Update "
                    "Document Set",
                    association.id,
                )
            )
            continue
        if association.source_object != submission_set_id:
            errors.append(
                MetadataInvalid(
                    f"{label} sourceObject {association.source_object} is not the "
                    "SubmissionSet (ITI TF-2 3.57.4.1.3.3.2)",
                    association.id,
                )
            )
            continue
        statuses = []
        for slot in (table["original_status_slot"], table["new_status_slot"]):
            values = association.slots.get(slot, [])
            if len(values) != 1:
                errors.append(
                    MetadataInvalid(
                        f"{label} has {len(values)} values of Slot {slot}; "
                        "ITI TF-2 3.57.4.1.3.3.2 wants one",
                        association.id,
                    )
                )
            statuses.append(values[0] if values else "")
        original, new = statuses
        if original and new and (original, new) not in allowed_changes():
            errors.append(
                MetadataUpdateInvalid(
                    f"{label} changes availabilityStatus from {original} to {new}; "
                    "ITI TF-2 3.57.4.1.3.3.2 allows Approved to Deprecated and "
                    "Deprecated to Approved",
                    association.id,
                )
            )
        updates.append(
            StatusUpdate(association.id, association.target_object, original, new)
        )

    if not updates and not errors:
        errors.append(
            MetadataInvalid(
                "Update Document Set names no update (ITI TF-2 3.57.4.1.3.3)"
            )
        )
    for entry_uuid, count in Counter(u.entry_uuid for u in updates).items():
        if count > 1:
            errors.append(
                MetadataUpdateInvalid(
                    f"{count} status updates name DocumentEntry {entry_uuid}; "
                    "one change per DocumentEntry",
                    entry_uuid,
                )
            )
    return updates, errors


def check_targets(
    updates: list[StatusUpdate],
    held: Mapping[str, HeldObject],
    patient_id: str | None,
) -> list[XdsError]:
    """Check each update against the object the Document Registry holds.

    ``held`` maps the targets' entryUUIDs that the Document Registry holds to
    what it knows of them. ITI TF-2 3.57.4.1.3.3.2: the target is a
    registered DocumentEntry of the SubmissionSet's patient whose
    availabilityStatus is the OriginalStatus stated.
    """
    errors: list[XdsError] = []
    for update in updates:
        label = f"Association {update.association_id}"
        target = held.get(update.entry_uuid)
        if target is None:
            errors.append(
                MetadataUpdateInvalid(
                    f"{label} targetObject {update.entry_uuid} is not in the "
                    "Document Registry",
                    update.association_id,
                )
            )
        elif target.kind != ebrim.DOCUMENT_ENTRY:
            errors.append(
                MetadataUpdateInvalid(
                    f"{label} targetObject {update.entry_uuid} is a "
                    f"{target.kind or 'registry object'}; ITI TF-2 "
                    "3.57.4.1.3.3.2 changes the status of a DocumentEntry",
                    update.association_id,
                )
            )
        elif target.patient_id != patient_id:
            errors.append(
                PatientIdDoesNotMatch(
                    f"DocumentEntry {update.entry_uuid} is of another patient than "
                    "the SubmissionSet (ITI TF-2 3.57.4.1.3.3.2)",
                    update.entry_uuid,
                )
            )
        elif target.status != update.original_status:
            errors.append(
                MetadataUpdateInvalid(
                    f"{label} states OriginalStatus {update.original_status}, but "
                    f"DocumentEntry {update.entry_uuid} is {target.status}",
                    update.association_id,
                )
            )
    return errors

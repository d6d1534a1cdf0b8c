"""Patient Identity Source: send an ITI-8 Patient Identity Feed and audit it.

ITI TF-2 3.8.4 (the ADT message over MLLP, its ACK) and 3.8.5.1 (the
source's audit record: the HL7 application|facility of the sender as source,
the registry as destination, the patient, MSH-10; EventActionCode C for a
create, U for an update or for the surviving patient of a merge, D for the
patient an A40 subsumes).
"""

from __future__ import annotations

import logging
import uuid

from xdsi import audit, tls
from xdsi.config import Settings
from xdsi.hl7.adt import (
    TRIGGER_EVENTS,
    AckSummary,
    FeedAction,
    build_feed,
    read_ack,
)
from xdsi.hl7.mllp import send_message

logger = logging.getLogger(__name__)

# ITI TF-2 3.8.5.1: the EventActionCode of each action's record.
_ACTION_CODES = {FeedAction.CREATE: "C", FeedAction.UPDATE: "U", FeedAction.MERGE: "U"}
_SUBSUMED_ACTION_CODE = "D"

SENDING_APPLICATION = "XDSI_PIX"
SENDING_FACILITY = "XDSI"


def send_feed(
    settings: Settings,
    auditor: audit.Auditor,
    patient_id: str,
    *,
    trigger: str = "A01",
    subsumed_patient_id: str = "",
    name: str = "",
    birth_date: str = "",
    sex: str = "",
    host: str | None = None,
    port: int | None = None,
) -> AckSummary:
    """Send one ADT message to the registry's feed and audit it; return the ACK.

    The record is written whatever the outcome: a refused or failed feed is
    audited as a serious failure.

    Raises
    ------
    MllpError, OSError
        No ACK came back; the failure is audited first.
    """
    target = settings.source.feed_target()
    # This node's own listener: by the name peers use, which its certificate
    # names (the address it binds may be 0.0.0.0).
    host = host or (target[0] if target else settings.node.advertised)
    port = port or (target[1] if target else settings.registry.feed_port)
    # MSH-10, at most 20 characters in HL7 v2.3.1.
    control_id = uuid.uuid4().hex[:20]
    message = build_feed(
        patient_id,
        trigger=trigger,
        subsumed_patient_id=subsumed_patient_id,
        name=name,
        birth_date=birth_date,
        sex=sex,
        sending_application=SENDING_APPLICATION,
        sending_facility=SENDING_FACILITY,
        control_id=control_id,
    )
    summary: AckSummary | None = None
    try:
        summary = read_ack(
            send_message(
                host, port, message, ssl_context=tls.client_context_for(settings)
            )
        )
    finally:
        _audit(
            settings,
            auditor,
            f"{host}:{port}",
            trigger,
            patient_id,
            subsumed_patient_id,
            control_id,
            summary,
        )
    return summary


def _audit(
    settings: Settings,
    auditor: audit.Auditor,
    registry: str,
    trigger: str,
    patient_id: str,
    subsumed_patient_id: str,
    control_id: str,
    summary: AckSummary | None,
) -> None:
    accepted = summary is not None and summary.code == "AA"
    action = TRIGGER_EVENTS[trigger].action
    patients = [(patient_id, _ACTION_CODES[action])]
    if action is FeedAction.MERGE:
        patients.insert(0, (subsumed_patient_id, _SUBSUMED_ACTION_CODE))
    for audited_id, event_action in patients:
        auditor.record(
            audit.AuditEvent(
                transaction="ITI-8",
                actor="Patient Identity Source",
                outcome=audit.Outcome.SUCCESS
                if accepted
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(
                    f"{SENDING_APPLICATION}|{SENDING_FACILITY}",
                    settings.node.advertised,
                ),
                destination=audit.Endpoint(
                    summary.sender if summary and summary.sender else registry,
                    registry.rpartition(":")[0],
                ),
                patient_id=audited_id,
                message_id=control_id,
                event_action=event_action,
            )
        )

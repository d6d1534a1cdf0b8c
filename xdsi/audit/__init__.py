"""ATNA audit: messages per transaction, their spool, transport and ARR.

Implements DICOM PS3.15 A.5 audit messages, as ITI TF-2 3.20 records them,
for each transaction (:mod:`xdsi.audit.messages`), their durable local spool
(:mod:`xdsi.audit.spool`), syslog over RFC 5425 and RFC 5426
(:mod:`xdsi.audit.syslog`, :mod:`xdsi.audit.forwarder`) and the Audit Record
Repository (:mod:`xdsi.audit.repository`, which alone needs the database
and Flask).
"""

from xdsi.audit.messages import (
    AuditEvent,
    AuditEventRule,
    DocumentRef,
    Endpoint,
    Outcome,
    audit_event_rules,
    build_audit_message,
    media_type,
    studies_by_patient,
)
from xdsi.audit.spool import Auditor, AuditRecord, AuditSpool

__all__ = [
    "AuditEvent",
    "AuditEventRule",
    "AuditRecord",
    "AuditSpool",
    "Auditor",
    "DocumentRef",
    "Endpoint",
    "Outcome",
    "audit_event_rules",
    "build_audit_message",
    "media_type",
    "studies_by_patient",
]

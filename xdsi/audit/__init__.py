"""ATNA audit: audit messages per transaction and their durable local spool.

Implements DICOM PS3.15 A.5 audit messages, as ITI TF-2 3.20 records them,
for each transaction; see :mod:`xdsi.audit.messages` and
:mod:`xdsi.audit.spool`.
"""

from xdsi.audit.messages import (
    AuditEvent,
    AuditEventRule,
    DocumentRef,
    Endpoint,
    Outcome,
    audit_event_rules,
    build_audit_message,
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
]

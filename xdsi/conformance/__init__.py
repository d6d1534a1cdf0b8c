"""Conformance runner: replay NIST XDS Toolkit-style cases against any node.

Talks to the node under test only over the wire (ITI TF-2x Appendix V SOAP,
ITI TF-2 3.8 MLLP), so it serves for xdsi and for any other vendor's node.
"""

from xdsi.conformance.cases import Case, CaseSetError, load_cases
from xdsi.conformance.runner import CaseResult, Runner, Target, junit_xml, summary

__all__ = [
    "Case",
    "CaseResult",
    "CaseSetError",
    "Runner",
    "Target",
    "junit_xml",
    "load_cases",
    "summary",
]

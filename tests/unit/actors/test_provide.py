"""The sending side of Provide and Register: how a refusal is told."""

from __future__ import annotations

from xdsi.actors.provide import SubmitError, describe_errors
from xdsi.metadata.responses import RegistryError


def test_a_refusal_shows_each_code_with_its_code_context_escaped() -> None:
    """ITI TF-3 4.2.4.1: a RegistryError's codeContext says why; a peer's
    text reaches the terminal with its line breaks and escape sequences
    escaped, and cut."""
    errors = [
        RegistryError("XDSRegistryMetadataError", "patientId\nforged\x1b[2J line"),
        RegistryError("XDSRegistryMetadataError", "x" * 1000),
        RegistryError("XDSUnknownPatientId", ""),
    ]

    told = describe_errors(errors)

    assert told.startswith(
        "XDSRegistryMetadataError: patientId\\nforged\\x1b[2J line; "
        "XDSRegistryMetadataError: xxx"
    )
    assert "... (1000 characters); XDSUnknownPatientId" in told
    assert "\n" not in told and "\x1b" not in told


def test_a_refusal_for_the_log_names_the_codes_only() -> None:
    """ITI TF-3 4.2.4.1: codeContext may name the patient; a log line above
    DEBUG takes the codes alone."""
    refused = SubmitError(
        "refused", [RegistryError("XDSUnknownPatientId\n", "PAT-1 is unknown")]
    )

    assert refused.codes == "XDSUnknownPatientId\\n"

"""The conformance runner replays case sets against a node started here.

RAD TF-3 4.68, 4.69 and ITI TF-2 3.18, 3.41, 3.42, 3.43 as the NIST XDS
Toolkit cases exercise them; the runner talks to the node only over the wire.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner, Result
from lxml import etree

from tests.conftest import shared_path
from xdsi.cli import main

# The cases of the shared set that pass today; this list only grows.
SUPPORTED = [
    "iti42-12346-single_doc",
    "iti42-12346-doc_w_fol",
    "iti42-12346-two_doc_w_fol",
    "iti42-12346-doc_for_rplc",
    "iti42-12374-submit_doc",
    "iti42-11990-single_doc",
    "iti42-11999-empty_folder",
    "iti42-11996-unknown_patient",
    "iti42-11997-pid_mismatch",
    "iti42-11998a-missing_classCode",
    "iti42-11998a-missing_creationTime",
    "iti42-11998a-missing_sourcePatientId",
    "iti42-12002-create_folder",
    "iti42-12004-submit",
    "iti42-12004-resubmit_diff_hash",
    "iti42-12084-all_or_nothing",
    "iti42-15806-submit",
    "iti42-15806-resubmit_same_uuid",
    "iti41-11966-single_doc",
    "iti41-11979-two_docs",
    "iti41-11981-with_hash_size",
    "iti41-11981-bad_hash",
    "iti41-11981-bad_size",
    "iti41-11983-missing_document",
    "iti41-11983-missing_metadata",
    "iti41-11986-registry_error_relayed",
    "iti41-12029-submit",
    "iti41-12021-submit_two",
    "iti41-15816-pnr",
    "iti41-wire-mtom_xop",
    "rad68-wire-kos_vendor_capture",
    "rad68-wire-kos_vendor_capture-replayed",
    "rad68-idc_init-IDCDEPT001",
    "rad68-idc_init-IDCDEPT021",
    "rad68-idc_init-IDCDEPT034",
    "iti43-12029-single",
    "iti43-12021-two_docs",
    "iti43-15816-unknown_doc",
    "iti43-15816-partial",
    "iti18-derived-unknown_query_id",
    "iti18-derived-missing_patient_id",
    "iti18-derived-two_patient_ids",
    "rad69-ids2018-4803a-single_image",
    "rad69-ids2018-4803c-multi_modality",
    "rad69-ids2018-4820-with_hcid",
    "rad69-ids2018-4811-case-00-comparison_transaction",
    "rad69-ids2018-4811-case-01-invalid_repositoryuid",
    "rad69-ids2018-4811-case-02-unknown_sop_instance_uid",
    "rad69-ids2018-4811-case-05-empty_study_instance_uid",
    "rad69-ids2018-4811-case-08-empty_transfer_syntax_uid",
    "rad69-ids2018-4811-case-09-invalid_transfer_syntax_uid",
    "iti42-12346-rplc",
    "iti42-12002-add_doc_other_patient",
    "iti42-12004-resubmit_same_hash",
    "iti18-findDocuments-approved",
    "iti18-findDocuments-objectref",
    "iti18-findDocuments-classcode_one",
    "iti18-findDocuments-creationtime_between",
    "iti18-findDocuments-author",
    "iti18-findDocuments-eventcode_multi_select",
    "iti18-findDocuments-refid",
    "iti18-findDocuments-deprecated",
    "iti18-findDocuments-classcode_scheme_mismatch",
    "iti18-findDocuments-old_scheme",
    "iti18-findSubmissionSets-simple",
    "iti18-findFolders-basic",
    "iti18-getDocuments-uuid",
    "iti18-getDocuments-uniqueid",
    "iti18-getFolders-uuid",
    "iti18-getAssociations-single_from_doc",
    "iti18-getDocumentsAndAssociations-uuid",
    "iti18-getSubmissionSets-doc_uuid",
    "iti18-getSubmissionSetAndContents-uuid",
    "iti18-getFolderAndContents-uuid",
    "iti18-getFoldersForDocument-uuid",
    "iti18-getRelatedDocuments-uniqueid",
    "iti18-getAll-all",
    "iti18-notSinglePatient-doc_leafclass",
]

CASE_LINE_FIELDS = 5


def _run(cases: Path, junit: Path, *extra: str) -> Result:
    return CliRunner().invoke(
        main,
        [
            "conformance",
            "run",
            "--local",
            "--cases",
            str(cases),
            "--junit",
            str(junit),
            *extra,
        ],
        catch_exceptions=False,
    )


def _verdicts(output: str) -> dict[str, str]:
    """Map case id to PASS or FAIL from the runner's one line per case."""
    verdicts = {}
    for line in output.splitlines():
        fields = line.split("  ")
        if len(fields) >= CASE_LINE_FIELDS and fields[4] in ("PASS", "FAIL"):
            verdicts[fields[0]] = fields[4]
    return verdicts


def test_every_supported_case_of_the_shared_set_passes(tmp_path: Path) -> None:
    """ITI TF-3 Table 4.2.4.1-2: the NIST cases answer as the testkit expects."""
    cases = shared_path("conformance")
    junit = tmp_path / "junit.xml"

    result = _run(cases, junit)

    verdicts = _verdicts(result.output)
    assert len(verdicts) == 78, result.output
    failing = [c for c in SUPPORTED if verdicts.get(c) != "PASS"]
    assert not failing, result.output
    passed = sum(v == "PASS" for v in verdicts.values())
    assert result.output.splitlines()[-1] == f"{passed} passed, {78 - passed} failed"
    assert result.exit_code == (0 if passed == 78 else 1)
    suite = etree.parse(str(junit)).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "78"
    assert suite.get("failures") == str(78 - passed)


def _tiny_case_set(folder: Path, submission_status: str = "Success") -> Path:
    """Write a case set of one ITI-42 and two ITI-18 cases that use it."""
    source = shared_path("conformance", "cases")
    for case_id, original in (
        ("register", "iti42-12346-single_doc/single_doc.ebrim30.xml"),
        ("by-uuid", "iti18-getDocuments-uuid/query3.xml"),
        ("by-patient", "iti18-findDocuments-approved/query.xml"),
    ):
        (folder / case_id).mkdir(parents=True)
        shutil.copy(source / original, folder / case_id / "message.xml")
    registry = {"endpoint": "Document Registry", "origin": "derived"}
    query = {**registry, "soap_action": "urn:ihe:iti:2007:RegistryStoredQuery"}
    index = [
        {
            **registry,
            "id": "tiny-register",
            "transaction": "ITI-42",
            "file": "register/message.xml",
            "expect": {"status": submission_status, "errors": []},
            "needs": "Patient Identity Feed (ITI-8) of $patientid$",
            "soap_action": "urn:ihe:iti:2007:RegisterDocumentSet-b",
            "preprocess": {
                "patient_id": "replace patientId values with the fed test patient id",
                "assign_unique_ids": "fresh OIDs for uniqueId values",
                "assign_uuids": True,
            },
        },
        {
            **query,
            "id": "tiny-query-by-uuid",
            "transaction": "ITI-18",
            "file": "by-uuid/message.xml",
            "expect": {"status": "Success", "contents": {"Documents": {"count": "1"}}},
            "needs": "tiny-register accepted",
            "placeholders": {"$uuid$": "entryUUID of Document01 in case tiny-register"},
        },
        {
            **query,
            "id": "tiny-query-by-patient",
            "transaction": "ITI-18",
            "file": "by-patient/message.xml",
            "expect": {"status": "Success", "contents": {"Documents": {"count": "1"}}},
            "needs": "tiny-register accepted under one patient id",
            "placeholders": {
                "$patient_id$": "patient id assigned to SubmissionSet01 in case "
                "tiny-register"
            },
        },
    ]
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


def test_the_runner_accepts_any_folder_in_the_same_format(tmp_path: Path) -> None:
    """ITI TF-2 3.18.4.1.2.3.7: a query finds what an earlier case registered."""
    cases = _tiny_case_set(tmp_path / "cases")

    result = _run(cases, tmp_path / "junit.xml")

    assert _verdicts(result.output) == {
        "tiny-register": "PASS",
        "tiny-query-by-uuid": "PASS",
        "tiny-query-by-patient": "PASS",
    }, result.output
    assert result.output.splitlines()[-1] == "3 passed, 0 failed"
    assert result.exit_code == 0


def test_a_case_whose_prerequisite_failed_is_not_sent(tmp_path: Path) -> None:
    """ITI TF-2 3.42.4.1.3: a query is only meaningful after its submission."""
    cases = _tiny_case_set(tmp_path / "cases", submission_status="Failure")

    result = _run(cases, tmp_path / "junit.xml", "--only", "tiny-query-by-uuid")

    lines = result.output.splitlines()
    assert lines[0].startswith("tiny-register  ITI-42  Failure  Success  FAIL")
    assert lines[1] == (
        "tiny-query-by-uuid  ITI-18  Success  not sent  FAIL  "
        "prerequisite tiny-register failed"
    )
    assert lines[-1] == "0 passed, 2 failed"
    assert result.exit_code == 1


def test_xdsi_config_before_the_command_names_the_served_node(tmp_path: Path) -> None:
    """``xdsi --config FILE conformance run`` runs against that node, as every
    other command does, and says which Imaging Document Source
    repositoryUniqueId the RAD-69 cases need."""
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        "[imaging_source]\nport = 1\n"
        'repository_unique_id = "1.2.3.4"\n'
    )
    result = CliRunner().invoke(
        main,
        [
            "--config",
            str(config),
            "conformance",
            "run",
            "--cases",
            str(shared_path("conformance")),
            "--only",
            "rad69-ids2018-4811-case-00-*",
        ],
        catch_exceptions=False,
    )
    assert "give exactly one of" not in result.output
    assert (
        "the RAD-69 cases name Imaging Document Source 1.3.6.1.4.1.21367.13.80.110; "
        "this node is 1.2.3.4" in result.output
    )
    assert "127.0.0.1:1" in result.output
    assert result.exit_code == 1


def test_a_node_with_tls_is_refused_before_any_case_is_sent(tmp_path: Path) -> None:
    """ITI TF-2 3.19: a node with [tls] talks only to authenticated peers,
    and the runner has no TLS client: it says so and stops (exit 2) rather
    than failing every case with a handshake error."""
    pem = tmp_path / "node.pem"
    pem.write_text("")
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f'[tls]\nenabled = true\ncertificate = "{pem}"\nprivate_key = "{pem}"\n'
        f'trusted = ["{pem}"]\n'
    )
    for where in (
        ("--config", str(config), "conformance", "run"),
        ("conformance", "run", "--config", str(config)),
    ):
        result = CliRunner().invoke(
            main,
            [*where, "--cases", str(shared_path("conformance"))],
            catch_exceptions=False,
        )
        assert result.exit_code == 2, result.output
        assert "[tls] enabled" in result.output
        assert "PASS" not in result.output and "FAIL" not in result.output

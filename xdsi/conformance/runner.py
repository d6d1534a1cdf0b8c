"""Replay a conformance case set against a node over the wire, check, report.

Runs the cases in the order their ``needs`` impose, feeds their patients
(ITI TF-2 3.8), sends each as SOAP 1.2 with WS-Addressing, MTOM/XOP where
the transaction travels so (ITI TF-2x Appendix V), and checks the
RegistryResponse status and error codes (ITI TF-3 4.2.4, Table 4.2.4.1-2),
the ITI-18 result counts (ITI TF-2 3.18.4.1.3) and the official schemas of
request and response. Writes JUnit XML for CI.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import unquote

import requests
from lxml import etree

from xdsi import ns, wire
from xdsi.config import CONNECTATHON_ASSIGNING_AUTHORITY
from xdsi.conformance.cases import STATUS_URNS, Case, CaseSetError
from xdsi.conformance.prepare import (
    UNIQUE_ID_SCHEMES,
    Ledger,
    PreparationError,
    Prepared,
    Submitted,
    literal_patients,
    prepare,
    prerequisites,
)
from xdsi.hl7.adt import build_feed
from xdsi.hl7.mllp import MllpError, send_message
from xdsi.profiles_loader import load_profile_table
from xdsi.wire.schema import schema_errors

logger = logging.getLogger(__name__)

TRANSACTIONS = load_profile_table("transactions")
_BY_ACTION = {row["request_action"]: row for row in TRANSACTIONS.values()}
PROVIDE_ACTION = TRANSACTIONS["ITI-41"]["request_action"]
STORED_QUERY_ACTION = TRANSACTIONS["ITI-18"]["request_action"]
_STORED_QUERIES = load_profile_table("stored_queries")
_METADATA = load_profile_table("xds_metadata")
SUBMISSION_SET_NODE = _METADATA["SubmissionSet"]["classification_node"]
FOLDER_NODE = _METADATA["Folder"]["classification_node"]

# The schema (under xdsi/schemas) that validates each message body, by root
# element; the table of xdsi/schemas/README.md.
_REPOSITORY_XSD = "IHE/XDS.b_DocumentRepository.xsd"
SCHEMA_FOR_ROOT = {
    f"{{{ns.QUERY}}}AdhocQueryRequest": "ebRS/query.xsd",
    f"{{{ns.QUERY}}}AdhocQueryResponse": "ebRS/query.xsd",
    f"{{{ns.LCM}}}SubmitObjectsRequest": "ebRS/lcm.xsd",
    f"{{{ns.RS}}}RegistryResponse": "ebRS/rs.xsd",
    f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest": _REPOSITORY_XSD,
    f"{{{ns.XDSB}}}RetrieveDocumentSetRequest": _REPOSITORY_XSD,
    f"{{{ns.XDSB}}}RetrieveDocumentSetResponse": _REPOSITORY_XSD,
    f"{{{ns.XDSIB}}}RetrieveImagingDocumentSetRequest": (
        "IHE/XDSI.b_ImagingDocumentSource.xsd"
    ),
}

# HL7 v2.5 Table 0008: the acknowledgment codes that accept a message.
_ACCEPTED_ACKS = frozenset({"AA", "CA"})


@dataclass(frozen=True)
class Target:
    """The node under test: endpoint URLs, ITI-8 listener and identifiers."""

    registry: str | None = None
    repository: str | None = None
    imaging_source: str | None = None
    feed: tuple[str, int] | None = None
    repository_unique_id: str | None = None
    assigning_authority: str = CONNECTATHON_ASSIGNING_AUTHORITY
    timeout: float = 120.0

    def url(self, endpoint: str) -> str | None:
        """Return the URL of ``registry``, ``repository`` or ``imaging_source``."""
        return getattr(self, endpoint)


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case, as the report prints it."""

    case_id: str
    transaction: str
    expected: str
    got: str
    passed: bool
    why: str
    seconds: float

    def line(self) -> str:
        """``id  transaction  expected  got  PASS|FAIL  why``."""
        verdict = "PASS" if self.passed else "FAIL"
        return "  ".join(
            (self.case_id, self.transaction, self.expected, self.got, verdict, self.why)
        ).rstrip()


def summary(results: Sequence[CaseResult]) -> str:
    """Return the closing line, ``N passed, N failed``."""
    passed = sum(r.passed for r in results)
    return f"{passed} passed, {len(results) - passed} failed"


def order_cases(cases: Sequence[Case], only: str | None = None) -> list[Case]:
    """Select the cases ``only`` matches (fnmatch on id) plus what they need,
    and order them so that every case follows its prerequisites; among the
    cases ready to run, index order decides.

    Raises
    ------
    CaseSetError
        The prerequisites form a cycle.
    """
    by_id = {case.id: case for case in cases}
    needs = {case.id: prerequisites(case, by_id) for case in cases}
    wanted = [c.id for c in cases if only is None or fnmatch(c.id, only)]
    selected: set[str] = set()
    while wanted:
        case_id = wanted.pop()
        if case_id not in selected:
            selected.add(case_id)
            wanted.extend(needs[case_id])

    ordered: list[Case] = []
    done: set[str] = set()
    pending = sorted((by_id[i] for i in selected), key=lambda c: c.index)
    while pending:
        ready = next((c for c in pending if set(needs[c.id]) <= done), None)
        if ready is None:
            raise CaseSetError(
                "the needs of these cases form a cycle: "
                + ", ".join(c.id for c in pending)
            )
        pending.remove(ready)
        ordered.append(ready)
        done.add(ready.id)
    return ordered


def response_status(body: etree._Element) -> str:
    """Return the status URN of a response or of the RegistryResponse in it."""
    if body.get("status"):
        return body.get("status", "")
    inner = body.find(f"{{{ns.RS}}}RegistryResponse")
    return inner.get("status", "") if inner is not None else ""


def error_codes(body: etree._Element) -> list[str]:
    """Return the errorCode of every RegistryError in a response."""
    return [e.get("errorCode", "") for e in body.iter(f"{{{ns.RS}}}RegistryError")]


def _short_status(urn: str) -> str:
    return urn.rsplit(":", 1)[-1] if urn else "no status"


def count_contents(body: etree._Element) -> dict[str, int]:
    """Count the objects of an AdhocQueryResponse by kind.

    A RegistryPackage is a SubmissionSet or a Folder by the Classification
    that names its classificationNode (ITI TF-3 4.2.3.3, 4.2.3.4).
    """
    objects = body.find(f"{{{ns.RIM}}}RegistryObjectList")
    children = [] if objects is None else [c for c in objects if isinstance(c.tag, str)]
    kinds = {}
    for classification in body.iter(f"{{{ns.RIM}}}Classification"):
        node = classification.get("classificationNode")
        if node in (SUBMISSION_SET_NODE, FOLDER_NODE):
            kinds[classification.get("classifiedObject")] = node
    packages = [c for c in children if c.tag == f"{{{ns.RIM}}}RegistryPackage"]
    return {
        "Documents": sum(c.tag == f"{{{ns.RIM}}}ExtrinsicObject" for c in children),
        "ObjectRefs": sum(c.tag == f"{{{ns.RIM}}}ObjectRef" for c in children),
        "Associations": sum(c.tag == f"{{{ns.RIM}}}Association" for c in children),
        "SubmissionSets": sum(
            kinds.get(p.get("id")) == SUBMISSION_SET_NODE for p in packages
        ),
        "Folders": sum(kinds.get(p.get("id")) == FOLDER_NODE for p in packages),
        "All": len(children),
    }


def check_answer(case: Case, body: etree._Element) -> tuple[str, list[str]]:
    """Compare an answer with the case's expectation; return label, problems."""
    status = response_status(body)
    codes = error_codes(body)
    got = _short_status(status)
    if codes:
        got += f"[{','.join(dict.fromkeys(codes))}]"
    problems = []
    if status != STATUS_URNS[case.expect.status]:
        problems.append(f"status {_short_status(status)}")
    problems.extend(
        f"no {code} in the RegistryErrorList"
        for code in case.expect.errors
        if code not in codes
    )
    first = next(body.iter(f"{{{ns.RS}}}RegistryError"), None)
    if problems and first is not None:
        said = first.get("codeContext", "")
        problems[0] += f" ({first.get('errorCode')}: {said[:300]})"
    if case.expect.contents:
        counts = count_contents(body)
        for kind, want in case.expect.contents.items():
            if kind == "None":
                if want and counts["All"]:
                    problems.append(f"{counts['All']} objects where none was expected")
            elif kind not in counts:
                problems.append(f"cannot count {kind}")
            elif counts[kind] != int(want["count"]):
                problems.append(f"{counts[kind]} {kind}, {want['count']} expected")
    return got, problems


def _schema_problems(body: etree._Element, what: str) -> list[str]:
    relative = SCHEMA_FOR_ROOT.get(body.tag)
    if relative is None:
        return [f"{what} {body.tag} has no schema to validate it"]
    errors = schema_errors(body, relative, limit=1)
    return [f"{what} not valid against {relative}: {errors[0]}"] if errors else []


def _inline_includes(
    body: etree._Element, read: Callable[[etree._Element], bytes]
) -> etree._Element:
    """Return a copy with each xop:Include replaced by its part as base64.

    The schemas declare xdsb:Document as base64Binary; XOP 1.0 3.1 makes
    the resolved infoset the one to validate.
    """
    resolved = copy.deepcopy(body)
    for include in list(resolved.iter(f"{{{ns.XOP}}}Include")):
        parent = include.getparent()
        assert parent is not None
        data = read(parent)
        parent.remove(include)
        parent.text = base64.b64encode(data).decode("ascii")
    return resolved


class Runner:
    """Replay cases against one node and collect their results.

    ``report`` is called with each result as soon as it is known.
    """

    def __init__(
        self,
        target: Target,
        spool_dir: Path,
        report: Callable[[CaseResult], None] | None = None,
    ) -> None:
        self.target = target
        self.spool_dir = spool_dir
        self.report = report
        self._fed: dict[str, str | None] = {}
        # Limitation: the runner presents no client certificate, so a node
        # under mutual TLS (ITI TF-2 3.19) refuses it; run it against plain
        # endpoints.
        self._session = requests.Session()

    def run(self, cases: Sequence[Case], only: str | None = None) -> list[CaseResult]:
        """Run the selected cases in order; return one result per case."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        ordered = order_cases(cases, only)
        ids = {case.id for case in ordered}
        ledger = Ledger(
            ids,
            assigning_authority=self.target.assigning_authority,
            repository_unique_id=self.target.repository_unique_id,
            learn=self._learn,
        )
        results: dict[str, CaseResult] = {}
        for case in ordered:
            started = time.monotonic()
            failed = [
                p
                for p in prerequisites(case, ids)
                if p in ids and not results[p].passed
            ]
            if failed:
                got, problems = "not sent", [f"prerequisite {failed[0]} failed"]
            else:
                got, problems = self._run_case(case, ledger)
            result = CaseResult(
                case.id,
                case.transaction,
                case.expect.label,
                got,
                not problems,
                "; ".join(problems),
                time.monotonic() - started,
            )
            logger.info(
                "conformance case %s (%s): expected %s, got %s, %s",
                case.id,
                case.transaction,
                result.expected,
                result.got,
                "PASS" if result.passed else "FAIL",
            )
            results[case.id] = result
            if self.report is not None:
                self.report(result)
        return list(results.values())

    def _run_case(self, case: Case, ledger: Ledger) -> tuple[str, list[str]]:
        """Prepare, feed, send and check one case; return got and problems."""
        url = self.target.url(case.endpoint)
        if not url:
            return "not sent", [f"no URL for the {case.endpoint} endpoint"]
        if case.is_wire_capture:
            feed_problems = [p for p in map(self.feed, literal_patients(case)) if p]
            got, problems = self._send_capture(case, url)
            if problems:
                problems.extend(dict.fromkeys(feed_problems))
            return got, problems
        try:
            prepared = prepare(case, ledger, PROVIDE_ACTION)
        except (PreparationError, OSError) as exc:
            return "not sent", [f"cannot prepare: {exc}"]
        feed_problems = [p for p in map(self.feed, prepared.feed) if p]
        got, problems = self._send(case, url, prepared)
        if prepared.submitted is not None and not problems:
            ledger.submitted[case.id] = prepared.submitted
        if problems:
            problems.extend(dict.fromkeys(feed_problems))
        return got, problems

    def feed(self, patient_id: str) -> str | None:
        """Send one ITI-8 feed, once per patient; return a problem, if any."""
        if patient_id in self._fed:
            return self._fed[patient_id]
        problem = None
        if self.target.feed is None:
            problem = "patients not fed: no ITI-8 listener given (--feed)"
        else:
            host, port = self.target.feed
            try:
                ack = send_message(host, port, build_feed(patient_id))
                code = _ack_code(ack)
                if code not in _ACCEPTED_ACKS:
                    problem = f"the ITI-8 feed of a test patient was answered {code}"
            except MllpError as exc:
                problem = f"ITI-8 feed failed: {exc}"
        self._fed[patient_id] = problem
        return problem

    def _send(self, case: Case, url: str, prepared: Prepared) -> tuple[str, list[str]]:
        """Send a prepared request with SoapClient and check the answer."""
        problems = self._request_problems(prepared)
        row = _BY_ACTION.get(case.soap_action, {})
        client = wire.SoapClient(
            url, timeout=self.target.timeout, spool_dir=self.spool_dir
        )
        client.session = self._session
        try:
            message = client.call(
                case.soap_action,
                prepared.body,
                parts=prepared.parts,
                mtom=bool(row.get("request_mtom")),
            )
        except wire.PeerFault as exc:
            return f"Fault {' '.join((exc.code, *exc.subcodes))}", [
                *problems,
                f"SOAP Fault: {exc.reason}",
            ]
        except wire.TransportError as exc:
            return "no answer", [*problems, str(exc)]
        with message:
            return self._check(case, message, problems)

    def _request_problems(self, prepared: Prepared) -> list[str]:
        parts = {p.content_id: p for p in prepared.parts}

        def read(element: etree._Element) -> bytes:
            include = element.find(f"{{{ns.XOP}}}Include")
            assert include is not None
            part = parts[unquote(include.get("href", "")[4:])]
            if part.path is not None:
                return part.path.read_bytes()
            return part.data or b""

        return _schema_problems(_inline_includes(prepared.body, read), "request")

    def _check(
        self, case: Case, message: wire.SoapMessage, problems: list[str]
    ) -> tuple[str, list[str]]:
        """Check an answer's content and schema validity."""
        got, mismatches = check_answer(case, message.body)
        try:
            resolved = _inline_includes(
                message.body, lambda e: wire.attachment_for(e, message).read_bytes()
            )
        except wire.WireError as exc:
            return got, [*problems, *mismatches, f"response attachment: {exc}"]
        return got, [*problems, *mismatches, *_schema_problems(resolved, "response")]

    def _send_capture(self, case: Case, url: str) -> tuple[str, list[str]]:
        """POST a wire capture as it is, with its own Content-Type."""
        content_type = case.content_type()
        data = case.file.read_bytes()
        problems: list[str] = []
        try:
            with wire.read_message(
                io.BytesIO(data), content_type, self.spool_dir
            ) as request:
                resolved = _inline_includes(
                    request.body,
                    lambda e: wire.attachment_for(e, request).read_bytes(),
                )
                problems = _schema_problems(resolved, "request")
        except wire.WireError as exc:
            problems = [f"the capture is no readable SOAP message: {exc}"]
        try:
            response = self._session.post(
                url,
                data=data,
                headers={
                    "Content-Type": content_type,
                    "Accept-Encoding": wire.ACCEPT_ENCODING,
                },
                timeout=self.target.timeout,
                stream=True,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return "no answer", [*problems, f"POST {url}: {exc}"]
        with response:
            # Asked for without content coding: one the peer sends all the
            # same is not undone here (a small body can unpack to gigabytes).
            coding = response.headers.get("Content-Encoding", "").strip().lower()
            if coding not in ("", wire.ACCEPT_ENCODING):
                return "no answer", [
                    *problems,
                    f"the answer has Content-Encoding {coding[:40]!r}, not asked for",
                ]
            try:
                message = wire.read_message(
                    response.raw,
                    response.headers.get("Content-Type", ""),
                    self.spool_dir,
                )
            except wire.WireError as exc:
                return "no answer", [*problems, f"not a SOAP answer: {exc}"]
        with message:
            if message.body.tag == f"{{{ns.SOAP12}}}Fault":
                fault = wire.PeerFault.from_element(message.body)
                return f"Fault {' '.join((fault.code, *fault.subcodes))}", [
                    *problems,
                    f"SOAP Fault: {fault.reason}",
                ]
            return self._check(case, message, problems)

    def _learn(self, submitted: Submitted) -> None:
        """Ask the registry the entryUUIDs it gave a submission's symbolic ids.

        ITI TF-2 3.18.4.1.2.3.7.6 GetSubmissionSetAndContents by the
        SubmissionSet uniqueId, LeafClass; objects are matched by uniqueId.
        """
        unique_id = submitted.submission_set_unique_id
        if not unique_id or not self.target.registry:
            return
        query = etree.Element(
            f"{{{ns.QUERY}}}AdhocQueryRequest", nsmap={"query": ns.QUERY, "rim": ns.RIM}
        )
        etree.SubElement(
            query,
            f"{{{ns.QUERY}}}ResponseOption",
            returnType="LeafClass",
            returnComposedObjects="true",
        )
        adhoc = etree.SubElement(
            query,
            f"{{{ns.RIM}}}AdhocQuery",
            id=_STORED_QUERIES["GetSubmissionSetAndContents"]["id"],
        )
        slot = etree.SubElement(
            adhoc, f"{{{ns.RIM}}}Slot", name="$XDSSubmissionSetUniqueId"
        )
        values = etree.SubElement(slot, f"{{{ns.RIM}}}ValueList")
        etree.SubElement(values, f"{{{ns.RIM}}}Value").text = f"'{unique_id}'"
        client = wire.SoapClient(
            self.target.registry, timeout=self.target.timeout, spool_dir=self.spool_dir
        )
        try:
            with client.call(STORED_QUERY_ACTION, query) as message:
                body = message.body
        except wire.WireError as exc:
            logger.warning("could not learn entryUUIDs by ITI-18: %s", exc)
            return
        symbols = {value: symbol for symbol, value in submitted.unique_ids.items()}
        for identifier in body.iter(f"{{{ns.RIM}}}ExternalIdentifier"):
            if identifier.get("identificationScheme") not in UNIQUE_ID_SCHEMES:
                continue
            symbol = symbols.get(identifier.get("value", ""))
            owner = identifier.get("registryObject")
            if symbol is not None and owner:
                submitted.entry_uuids[symbol] = owner


def _ack_code(ack: str) -> str:
    """Return MSA-1 of an HL7 v2 acknowledgment."""
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(segment[3] if len(segment) > 3 else "|")
            return fields[1] if len(fields) > 1 else ""
    return "no MSA"


def junit_xml(results: Sequence[CaseResult], name: str = "xdsi-conformance") -> bytes:
    """Return the results as JUnit XML: one testcase per case, by transaction."""
    failures = sum(not r.passed for r in results)
    suite = etree.Element(
        "testsuite",
        name=name,
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for result in results:
        testcase = etree.SubElement(
            suite,
            "testcase",
            classname=result.transaction,
            name=result.case_id,
            time=f"{result.seconds:.3f}",
        )
        if not result.passed:
            failure = etree.SubElement(testcase, "failure", message=result.why)
            failure.text = f"expected {result.expected}, got {result.got}"
    root = etree.Element("testsuites")
    root.append(suite)
    return etree.tostring(
        root, xml_declaration=True, encoding="UTF-8", pretty_print=True
    )

"""Preprocess a conformance case before it is sent, as the NIST engine does.

Fills the ``$...$`` placeholders, sets patient ids, gives uniqueIds fresh
OIDs and symbolic ids fresh entryUUIDs, wraps ITI-41/RAD-68 metadata with its
documents, and plans the DICOM instances RAD-69 cases need. Implements the
submission rules of ITI TF-3 4.2.3.1.2 (entryUUID and symbolic ids), 4.2.3.1.5
(uniqueId OIDs), 4.2.3.2.16 (patientId CX) and ITI TF-2 3.41.4.1.2 (Provide
and Register body); RAD TF-3 4.69.4.1.2 for the instances RAD-69 names.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from xml.sax.saxutils import escape

import pydicom
from lxml import etree

from xdsi import ns, wire
from xdsi.config import XDSI_OID_ROOT
from xdsi.conformance.cases import Case
from xdsi.metadata.build import new_oid
from xdsi.profiles_loader import load_profile_table

logger = logging.getLogger(__name__)

_METADATA = load_profile_table("xds_metadata")


def _scheme(kind: str, attribute: str) -> str:
    return _METADATA[kind]["attributes"][attribute]["scheme"]


# ITI TF-3 4.2.3.2.26, 4.2.3.3.12, 4.2.3.4.7: uniqueId ExternalIdentifiers.
UNIQUE_ID_SCHEMES = frozenset(
    _scheme(kind, "uniqueId") for kind in ("DocumentEntry", "SubmissionSet", "Folder")
)
# ITI TF-3 4.2.3.2.16, 4.2.3.3.10, 4.2.3.4.6: patientId ExternalIdentifiers.
PATIENT_ID_SCHEMES = frozenset(
    _scheme(kind, "patientId") for kind in ("DocumentEntry", "SubmissionSet", "Folder")
)

# ITI TF-3 4.2.3.3.9: the SubmissionSet sourceId ExternalIdentifier.
SOURCE_ID_SCHEMES = frozenset({_scheme("SubmissionSet", "sourceId")})
# The sourceId this runner gives the submissions it sends, under xdsi's arc.
SOURCE_ID = f"{XDSI_OID_ROOT}.7"

# Attributes of ebRIM 3.0 objects that hold an object's id or refer to one.
_ID_ATTRIBUTES = (
    "id",
    "classifiedObject",
    "registryObject",
    "sourceObject",
    "targetObject",
)

_TOKEN = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*\$")
# A CX patient id in the ITI TF-3 4.2.3.2.16 form, as ``needs`` lists them.
_CX = re.compile(r"[^\s,;|()'\"]+\^\^\^&[0-9.]+&ISO")
# "entryUUID of Document01 in case X", "patient id assigned to ... in case X".
_REFERENCE = re.compile(
    r"\b(entryUUID|uniqueId|patient id assigned to) (?:of )?(\w+) in case ([\w.-]+)"
)
# "Document01_uid from case X" (a NIST report value).
_REPORTED_UID = re.compile(r"\b(\w+)_uid from case ([\w.-]+)")

# The placeholder names the case-set README gives one meaning to.
PATIENT_TOKENS = frozenset({"$patientid$", "$patient_id$"})
ALT_PATIENT_TOKENS = frozenset({"$altpatientid$"})
REPOSITORY_TOKENS = frozenset({"$repuid$"})

# RAD TF-3 4.69.4.2.3: the code for an instance the source does not hold.
UNKNOWN_DOCUMENT_CODE = "XDSDocumentUniqueIdError"


class PreparationError(Exception):
    """A case cannot be made ready: a value it refers to is not known."""


def new_entry_uuid() -> str:
    """Return a fresh entryUUID (ITI TF-3 4.2.3.1.2)."""
    return f"urn:uuid:{uuid.uuid4()}"


def new_patient_id(assigning_authority: str) -> str:
    """Return a test patient id never used before (ITI TF-3 4.2.3.2.16 CX)."""
    return f"XDSICONF-{uuid.uuid4().hex[:12]}^^^&{assigning_authority}&ISO"


def mentioned_cases(text: str, case_ids: Collection[str]) -> list[str]:
    """Return the case ids that ``text`` names, in the order it names them.

    Besides whole ids, ``prefix-* (a, b)`` names ``prefix-a`` and
    ``prefix-b``, and a bare ``prefix-*`` every case id it matches.
    """
    found: list[tuple[int, str]] = []
    for case_id in case_ids:
        match = re.search(rf"(?<![\w.-]){re.escape(case_id)}(?![\w-])", text)
        if match:
            found.append((match.start(), case_id))
    for match in re.finditer(r"([\w.-]+-)\*(?:\s*\(([^)]*)\))?", text):
        prefix, listed = match.group(1), match.group(2)
        if listed:
            names = [prefix + name.strip() for name in listed.split(",")]
            found.extend((match.start(), n) for n in names if n in case_ids)
        else:
            found.extend(
                (match.start(), c) for c in sorted(case_ids) if fnmatch(c, prefix + "*")
            )
    ordered: list[str] = []
    for _, case_id in sorted(found):
        if case_id not in ordered:
            ordered.append(case_id)
    return ordered


def prerequisites(case: Case, case_ids: Collection[str]) -> list[str]:
    """Return the cases that must have been run before ``case``.

    A case named only to say what this one must differ from ("different
    from the one used by X") is no prerequisite.
    """
    needs = re.sub(r"different from [^;|]*", "", case.needs)
    text = " ".join([needs, *case.placeholders.values()])
    return [c for c in mentioned_cases(text, case_ids) if c != case.id]


def _patient_source(case: Case, case_ids: Collection[str]) -> str | None:
    """Return the earlier case whose patient this case submits for, if any.

    ``needs`` says it as "same patient as X", or as "X accepted" when the
    case builds on that submission (a replacement, a resubmission).
    """
    for case_id in mentioned_cases(case.needs, case_ids):
        name = re.escape(case_id)
        if re.search(rf"same patient as {name}(?![\w-])", case.needs) or re.search(
            rf"(?<![\w.-]){name} accepted", case.needs
        ):
            return case_id
    return None


def literal_patients(case: Case) -> list[str]:
    """Return the patient ids that ``needs`` spells out, to feed as they are."""
    return list(dict.fromkeys(_CX.findall(case.needs)))


def wants_unknown_patient(case: Case) -> bool:
    """Tell whether the case must use a patient id the registry never got."""
    rule = str(case.preprocess.get("patient_id") or "")
    return "UNKNOWN" in rule or "NOT have been fed" in case.needs


@dataclass
class Submitted:
    """What one submission case registered: ids by the symbol in its file.

    ``entry_uuids`` holds the entryUUIDs known so far; a symbolic id sent
    as is gets its entryUUID from the registry, learned later by query.
    """

    patient_id: str
    unique_ids: dict[str, str] = field(default_factory=dict)
    entry_uuids: dict[str, str] = field(default_factory=dict)
    symbolic: set[str] = field(default_factory=set)

    @property
    def submission_set_unique_id(self) -> str | None:
        """The uniqueId this submission gave its SubmissionSet."""
        return self.unique_ids.get("__submission_set__")


class Ledger:
    """Patients and ids of the cases run so far, for the cases that follow.

    ``learn`` asks the registry for the entryUUIDs it assigned to a
    submission's symbolic ids and fills them into the Submitted record.
    """

    def __init__(
        self,
        case_ids: Collection[str],
        *,
        assigning_authority: str,
        repository_unique_id: str | None,
        learn: Callable[[Submitted], None] | None = None,
    ) -> None:
        self.case_ids = frozenset(case_ids)
        self.assigning_authority = assigning_authority
        self.repository_unique_id = repository_unique_id
        self.learn = learn
        self.patients: dict[str, str] = {}
        self.submitted: dict[str, Submitted] = {}

    def new_patient(self) -> str:
        """Return a patient id never used before, in the affinity domain."""
        return new_patient_id(self.assigning_authority)

    def patient_for(self, case: Case) -> str:
        """Return the patient id ``case`` submits for, fresh unless shared."""
        if case.id not in self.patients:
            source = _patient_source(case, self.case_ids)
            if source is not None and source in self.patients:
                self.patients[case.id] = self.patients[source]
            else:
                self.patients[case.id] = self.new_patient()
        return self.patients[case.id]

    def _submitted(self, case_id: str) -> Submitted:
        if case_id not in self.submitted:
            raise PreparationError(f"case {case_id} has not registered anything")
        return self.submitted[case_id]

    def entry_uuid(self, case_id: str, symbol: str) -> str:
        """Return the entryUUID of ``symbol`` as registered by ``case_id``."""
        submitted = self._submitted(case_id)
        if symbol not in submitted.entry_uuids and self.learn is not None:
            self.learn(submitted)
        if symbol not in submitted.entry_uuids:
            raise PreparationError(
                f"the entryUUID of {symbol} registered by case {case_id} is unknown"
            )
        return submitted.entry_uuids[symbol]

    def unique_id(self, case_id: str, symbol: str) -> str:
        """Return the uniqueId of ``symbol`` as registered by ``case_id``."""
        submitted = self._submitted(case_id)
        if symbol not in submitted.unique_ids:
            raise PreparationError(
                f"case {case_id} registered no uniqueId for {symbol}"
            )
        return submitted.unique_ids[symbol]


@dataclass
class Prepared:
    """A case ready to send: its body, attachments and patients to feed."""

    body: etree._Element
    parts: list[wire.OutgoingPart]
    feed: list[str]
    submitted: Submitted | None


def _resolve(token: str, case: Case, ledger: Ledger, patient: str, alt: str) -> str:
    """Return the value of one placeholder of ``case``."""
    description = case.placeholders.get(token, "")
    reference = _REFERENCE.search(description)
    if reference:
        what, symbol, source = reference.groups()
        if what == "entryUUID":
            return ledger.entry_uuid(source, symbol)
        if what == "uniqueId":
            return ledger.unique_id(source, symbol)
        if source not in ledger.patients:
            raise PreparationError(f"case {source} has not been given a patient")
        return ledger.patients[source]
    reported = _REPORTED_UID.search(description)
    if reported:
        return ledger.unique_id(reported.group(2), reported.group(1))
    if token in PATIENT_TOKENS:
        return patient
    if token in ALT_PATIENT_TOKENS:
        return alt
    if token in REPOSITORY_TOKENS:
        if not ledger.repository_unique_id:
            raise PreparationError(
                f"{token} needs the Document Repository's repositoryUniqueId "
                "(--repository-unique-id)"
            )
        return ledger.repository_unique_id
    raise PreparationError(f"placeholder {token} has no known meaning")


def _fill(case: Case, ledger: Ledger, patient: str, alt: str) -> tuple[str, set[str]]:
    """Substitute every placeholder of the case's file; return text and tokens."""
    text = case.file.read_text(encoding="utf-8")
    tokens = set(_TOKEN.findall(text))
    for token in sorted(tokens):
        value = _resolve(token, case, ledger, patient, alt)
        text = text.replace(token, escape(value, {'"': "&quot;"}))
    return text, tokens


def _unique_id_rule(rule: object) -> tuple[bool, set[str], set[str]]:
    """Read ``preprocess.assign_unique_ids``: on, objects and schemes kept."""
    if not rule:
        return False, set(), set()
    text = str(rule)
    _, _, exceptions = text.partition("except")
    schemes = set(re.findall(r"urn:uuid:[0-9a-fA-F-]{36}", exceptions))
    objects: set[str] = set()
    _, colon, names = exceptions.partition(":")
    if colon and not schemes:
        objects = {n.strip() for n in re.split(r"[,\s]+", names) if n.strip()}
    return True, objects, schemes


def _identifiers(root: etree._Element, schemes: frozenset[str]) -> list[etree._Element]:
    return [
        e
        for e in root.iter(f"{{{ns.RIM}}}ExternalIdentifier")
        if e.get("identificationScheme") in schemes
    ]


def _owner(identifier: etree._Element) -> str:
    """Return the id of the object an ExternalIdentifier belongs to."""
    owner = identifier.get("registryObject")
    if owner:
        return owner
    parent = identifier.getparent()
    return parent.get("id", "") if parent is not None else ""


def _submission(case: Case, request: etree._Element, patient: str) -> Submitted:
    """Apply patientId, uniqueId and entryUUID rules to a SubmitObjectsRequest."""
    if str(case.preprocess.get("patient_id") or "").startswith("replace"):
        for identifier in _identifiers(request, PATIENT_ID_SCHEMES):
            identifier.set("value", patient)

    # The NIST engine sends its own sourceId (ITI TF-3 4.2.3.3.9 wants an OID).
    if case.preprocess.get("source_id"):
        for identifier in _identifiers(request, SOURCE_ID_SCHEMES):
            identifier.set("value", SOURCE_ID)

    submitted = Submitted(patient_id=patient)
    fresh, kept_objects, kept_schemes = _unique_id_rule(
        case.preprocess.get("assign_unique_ids")
    )
    submission_set_scheme = _scheme("SubmissionSet", "uniqueId")
    for identifier in _identifiers(request, UNIQUE_ID_SCHEMES):
        owner = _owner(identifier)
        scheme = identifier.get("identificationScheme", "")
        if fresh and owner not in kept_objects and scheme not in kept_schemes:
            identifier.set("value", new_oid())
        submitted.unique_ids[owner] = identifier.get("value", "")
        if scheme == submission_set_scheme:
            submitted.unique_ids["__submission_set__"] = identifier.get("value", "")

    # ITI TF-3 4.2.3.1.2: symbolic ids are replaced by fresh UUIDs everywhere.
    objects = [e for e in request.iter() if isinstance(e.tag, str) and e.get("id")]
    symbolic = {
        e.get("id", "") for e in objects if not e.get("id", "").startswith("urn:uuid:")
    }
    if case.preprocess.get("assign_uuids") is True:
        mapping = {symbol: new_entry_uuid() for symbol in sorted(symbolic)}
        for element in request.iter():
            if not isinstance(element.tag, str):
                continue
            for attribute in _ID_ATTRIBUTES:
                value = element.get(attribute)
                if value in mapping:
                    element.set(attribute, mapping[value])
        submitted.entry_uuids.update(mapping)
    else:
        submitted.symbolic = symbolic
    for element in objects:
        original = element.get("id", "")
        if original.startswith("urn:uuid:") and original not in submitted.entry_uuids:
            submitted.entry_uuids.setdefault(original, original)
    return submitted


def _provide_and_register(
    case: Case, request: etree._Element, submitted: Submitted
) -> tuple[etree._Element, list[wire.OutgoingPart]]:
    """Wrap metadata and documents as ITI TF-2 3.41.4.1.2 asks, for MTOM."""
    body = etree.Element(
        f"{{{ns.XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap={"xdsb": ns.XDSB}
    )
    body.append(request)
    mime_types = {
        e.get("id"): e.get("mimeType", "")
        for e in request.iter(f"{{{ns.RIM}}}ExtrinsicObject")
    }
    parts = []
    for document in case.documents:
        entry_id = submitted.entry_uuids.get(document.id, document.id)
        content_id = wire.new_content_id()
        element = etree.SubElement(body, f"{{{ns.XDSB}}}Document", id=entry_id)
        element.append(wire.xop_include(content_id))
        mime_type = mime_types.get(entry_id) or "application/octet-stream"
        parts.append(wire.OutgoingPart(content_id, mime_type, path=document.path))
    return body, parts


def prepare(case: Case, ledger: Ledger, provide_action: str) -> Prepared:
    """Make a case's request ready to send and say which patients to feed.

    ``provide_action`` is the ITI-41 wsa:Action: a SubmitObjectsRequest sent
    with it travels inside a ProvideAndRegisterDocumentSetRequest.

    Raises
    ------
    PreparationError
        A placeholder refers to something no earlier case produced.
    """
    unknown = wants_unknown_patient(case)
    patient = ledger.patient_for(case)
    alt = ledger.new_patient()
    text, tokens = _fill(case, ledger, patient, alt)
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    try:
        root = etree.fromstring(text.encode("utf-8"), parser)
    except etree.XMLSyntaxError as exc:
        raise PreparationError(f"{case.file.name} is not XML: {exc}") from exc

    # The patients this case itself uses; ones named by reference were fed
    # by the case that registered them.
    used_patient = bool(tokens & PATIENT_TOKENS) and not any(
        _REFERENCE.search(case.placeholders.get(t, "")) for t in PATIENT_TOKENS
    )
    replaces = str(case.preprocess.get("patient_id") or "").startswith("replace")
    submitted = None
    parts: list[wire.OutgoingPart] = []
    request = (
        root
        if root.tag == f"{{{ns.LCM}}}SubmitObjectsRequest"
        else root.find(f".//{{{ns.LCM}}}SubmitObjectsRequest")
    )
    if request is not None:
        submitted = _submission(case, request, alt if unknown else patient)
        if root is request and case.soap_action == provide_action:
            root, parts = _provide_and_register(case, request, submitted)

    feed = literal_patients(case)
    if not unknown:
        if used_patient or replaces:
            feed.append(patient)
        if tokens & ALT_PATIENT_TOKENS:
            feed.append(alt)
    return Prepared(root, parts, list(dict.fromkeys(feed)), submitted)


# --- RAD-69: the instances the Imaging Document Source must hold ---------


@dataclass(frozen=True)
class InstanceRef:
    """One instance as a RAD-69 case names it (RAD TF-3 4.69.4.1.2)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def parse(cls, text: str) -> InstanceRef:
        """Read ``study/series/instance``."""
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"{text!r} is not study/series/instance")
        return cls(*(p.strip() for p in parts))

    @property
    def complete(self) -> bool:
        return all(
            (self.study_instance_uid, self.series_instance_uid, self.sop_instance_uid)
        )


def instances_to_hold(case: Case) -> list[InstanceRef]:
    """Return the instances the Imaging Document Source must hold for a case.

    ``stand_ins`` when the case gives it; else every requested instance,
    except those of a case that expects them to be unknown.
    """
    if case.stand_ins is not None:
        return [InstanceRef.parse(t) for t in case.stand_ins]
    if UNKNOWN_DOCUMENT_CODE in case.expect.errors:
        return []
    return [InstanceRef.parse(t) for t in case.requested_instances]


_LOOKUP_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality")


def _raw_text(ds: pydicom.Dataset, keyword: str) -> str:
    """Return an element's value as stored, without pydicom's VR checks."""
    element = ds.get_item(keyword)
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ")


def find_study_files(
    folders: list[Path], study_uids: set[str], series_uids: set[str]
) -> dict[str, list[Path]]:
    """Find the image files of the named studies, or of the named series.

    A study is taken from the first folder that holds it. Key Object
    Selection documents are left out: publishing builds a manifest anew.
    """
    found: dict[str, list[Path]] = {}
    for folder in folders:
        here: dict[str, list[Path]] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=list(_LOOKUP_TAGS),
                )
            except Exception:
                # Not a DICOM file, or not a readable one: not a study image.
                continue
            study, series, modality = (_raw_text(ds, k) for k in _LOOKUP_TAGS)
            if modality == "KO" or study in found:
                continue
            if study in study_uids or series in series_uids:
                here.setdefault(study, []).append(path)
        found.update(here)
    return found


def build_stand_ins(
    template: Path, instances: list[InstanceRef], folder: Path
) -> list[Path]:
    """Write one DICOM PS3.10 instance per reference, copied from a template.

    Only the Study, Series and SOP Instance UIDs change; what RAD-69 tests is
    which instances come back, not their pixels.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, ref in enumerate(instances, start=1):
        ds = pydicom.dcmread(template)
        ds.StudyInstanceUID = ref.study_instance_uid
        ds.SeriesInstanceUID = ref.series_instance_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        ds.file_meta.MediaStorageSOPInstanceUID = ref.sop_instance_uid
        ds.InstanceNumber = number
        path = folder / f"{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written

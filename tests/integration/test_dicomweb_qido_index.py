"""QIDO-RS (RAD TF-3 4.129, DICOM PS3.18 10.6) answered from the Imaging
Document Source's attribute index, with the instance files gone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from alembic import command
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from tests.integration.conftest import PATIENT, RunningNode
from xdsi.actors import dicomweb
from xdsi.cli import bundled_study
from xdsi.dicom import scan
from xdsi.store import migrations
from xdsi.store.schema import QIDO_COLUMNS, imaging_instance, imaging_manifest

SOURCE = bundled_study() / "S1000" / "I0010.dcm"


@dataclass(frozen=True)
class Spec:
    """One study to publish: its attributes and its series' modalities."""

    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    series: tuple[tuple[str, int], ...]


# Studies told apart by their Accession Number.
STUDIES = (
    Spec("ACC_1%", "IDX-1", "Doe^Jane", "20200105", "101500", (("CT", 2), ("CT", 1))),
    Spec("ACCX1", "IDX-1", "DOE^JOHN", "20210310", "230000", (("MR", 1),)),
    Spec("B", "idx-2", "Roe^Richard", "20220101", "120000", (("CT", 1), ("SR", 1))),
)
# A study whose manifest's registration is pending.
PENDING = Spec("P", "IDX-9", "Poe^Edgar", "20230101", "080000", (("CT", 1),))


def _write_study(folder: Path, spec: Spec) -> scan.Study:
    """Copies of the bundled CT image as one study of ``spec``."""
    ds = pydicom.dcmread(SOURCE)
    ds.StudyInstanceUID = generate_uid()
    for keyword, value in (
        ("AccessionNumber", spec.accession_number),
        ("PatientID", spec.patient_id),
        ("PatientName", spec.patient_name),
        ("StudyDate", spec.study_date),
        ("StudyTime", spec.study_time),
    ):
        setattr(ds, keyword, value)
    folder.mkdir(parents=True)
    for number, (modality, count) in enumerate(spec.series, start=1):
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = number
        ds.Modality = modality
        for instance in range(1, count + 1):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = instance
            ds.save_as(folder / f"{number}-{instance}.dcm", enforce_file_format=True)
    (study,) = scan.scan_directory(folder).studies
    return study


@pytest.fixture(scope="module")
def studies(
    shared_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, scan.Study]]:
    """The studies published by Accession Number, their files then removed
    from the store, the pending one's manifest marked pending."""
    shared_node.feed()
    source = shared_node.services.imaging_source
    folder = tmp_path_factory.mktemp("qido-index")
    published = {}
    for spec in (*STUDIES, PENDING):
        study = _write_study(folder / spec.accession_number.strip("%_"), spec)
        source.publish(study, PATIENT)
        published[spec.accession_number] = study
    with source.engine.begin() as conn:
        conn.execute(
            update(imaging_manifest)
            .where(
                imaging_manifest.c.study_instance_uid
                == published[PENDING.accession_number].study_instance_uid
            )
            .values(status="pending")
        )
        blobs = conn.execute(select(imaging_instance.c.blob)).scalars().all()
    for blob in blobs:
        source.blobs.path(blob).unlink()
    # No header read before the files went may answer for them.
    dicomweb._header.cache_clear()
    yield published


def _qido(node: RunningNode, path: str, **params: str) -> list[pydicom.Dataset]:
    answer = requests.get(
        f"{node.settings.dicomweb_url}{path}", params=params, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return [pydicom.Dataset.from_json(found) for found in answer.json()]


def _accessions(answers: list[pydicom.Dataset]) -> list[str]:
    return [answer.AccessionNumber for answer in answers]


def test_studies_are_answered_with_their_instance_files_gone(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 10.6.3.3.1: the study answer, counts and Modalities in
    Study included, comes from the index; no instance file is read."""
    study = studies["B"]

    (found,) = _qido(shared_node, "/studies", PatientID="idx-2")

    assert found.StudyInstanceUID == study.study_instance_uid
    assert found.PatientName == "Roe^Richard"
    assert found.StudyDate == "20220101"
    assert found.ModalitiesInStudy == ["CT", "SR"]
    assert found.NumberOfStudyRelatedSeries == 2
    assert found.NumberOfStudyRelatedInstances == 2
    assert found.RetrieveURL.endswith(f"/studies/{study.study_instance_uid}")


def test_series_and_instances_are_answered_with_their_instance_files_gone(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 10.6.3.3.2 and 10.6.3.3.3: series and instance answers
    from the index, each series counting all its instances."""
    study = studies["ACC_1%"]
    first = study.series[0]

    series = _qido(shared_node, f"/studies/{study.study_instance_uid}/series")
    instances = _qido(
        shared_node,
        f"/studies/{study.study_instance_uid}/series/"
        f"{first.series_instance_uid}/instances",
    )

    assert [(s.SeriesNumber, s.NumberOfSeriesRelatedInstances) for s in series] == [
        (one.series_number, len(one.instances))
        for one in sorted(study.series, key=lambda s: s.series_instance_uid)
    ]
    assert sorted(i.SOPInstanceUID for i in instances) == sorted(
        i.sop_instance_uid for i in first.instances
    )
    assert {(i.Rows, i.Columns, i.InstanceNumber) for i in instances} == {
        (256, 512, 1),
        (256, 512, 2),
    }


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientID": "IDX-1"}, {"ACC_1%", "ACCX1"}),
        ({"PatientID": "idx-1"}, set()),
        ({"PatientID": "IDX-*"}, {"ACC_1%", "ACCX1"}),
        ({"PatientID": "idx-?"}, {"B"}),
        ({"AccessionNumber": "ACC_1%"}, {"ACC_1%"}),
        ({"AccessionNumber": "ACC_*"}, {"ACC_1%"}),
        ({"AccessionNumber": "ACC?1*"}, {"ACC_1%", "ACCX1"}),
        ({"AccessionNumber": "acc*"}, set()),
        ({"PatientName": "doe^*"}, {"ACC_1%", "ACCX1"}),
        ({"PatientName": "DOE^JANE"}, {"ACC_1%"}),
        ({"StudyDate": "20210310"}, {"ACCX1"}),
        ({"StudyDate": "20200101-20201231"}, {"ACC_1%"}),
        ({"StudyDate": "20210101-"}, {"ACCX1", "B"}),
        ({"StudyDate": "-20210310"}, {"ACC_1%", "ACCX1"}),
        ({"StudyTime": "2200-2359"}, {"ACCX1"}),
        ({"StudyTime": "-12"}, {"ACC_1%", "B"}),
        ({"StudyTime": "101500.000000-101500.999999"}, {"ACC_1%"}),
        ({"StudyTime": "101500.0-"}, {"ACC_1%", "ACCX1", "B"}),
        ({"AccessionNumber": "*"}, {"ACC_1%", "ACCX1", "B"}),
        ({"ModalitiesInStudy": "MR"}, {"ACCX1"}),
        ({"ModalitiesInStudy": "SR"}, {"B"}),
        ({"ModalitiesInStudy": "C*"}, {"ACC_1%", "B"}),
        ({"PatientID": "IDX-1", "ModalitiesInStudy": "CT"}, {"ACC_1%"}),
        ({"PatientID": ""}, {"ACC_1%", "ACCX1", "B"}),
    ],
    ids=[
        "id",
        "id-case",
        "id-star",
        "id-question-mark",
        "accession-like-characters",
        "accession-underscore-literal",
        "accession-question-mark",
        "accession-case",
        "name-case",
        "name-single",
        "date",
        "date-range",
        "date-from",
        "date-until",
        "time-range",
        "time-until-hour",
        "time-range-fraction",
        "time-from-fraction",
        "star-alone",
        "modality",
        "modality-derived",
        "modality-wildcard",
        "two-keys",
        "universal",
    ],
)
def test_study_matching_on_the_index(
    shared_node: RunningNode,
    studies: dict[str, scan.Study],
    filters: dict[str, str],
    expected: set[str],
) -> None:
    """DICOM PS3.4 C.2.2.2: single values, wildcards (case-sensitive but
    for PN), ranges and universal matching on the indexed attributes."""
    assert set(_accessions(_qido(shared_node, "/studies", **filters))) == expected


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [("doe^*", {"ACC_1%", "ACCX1"}), ("DOE^JANE", {"ACC_1%"}), ("r?e*", {"B"})],
)
def test_patient_name_is_narrowed_in_sql(
    shared_node: RunningNode,
    studies: dict[str, scan.Study],
    wanted: str,
    expected: set[str],
) -> None:
    """DICOM PS3.4 C.2.2.2: a search on Patient Name alone selects its
    studies through the name's indexed column, not by matching the
    attributes of every study in scope."""
    condition = dicomweb._sql_condition("PatientName", wanted)
    assert condition is not None
    with shared_node.services.engine.connect() as conn:
        selected = conn.execute(
            select(imaging_instance.c.accession_number)
            .where(
                condition,
                imaging_instance.c.study_instance_uid.in_(
                    [s.study_instance_uid for s in studies.values()]
                ),
            )
            .distinct()
        ).scalars()
        assert set(selected) == expected
    assert set(_accessions(_qido(shared_node, "/studies", PatientName=wanted))) == (
        expected
    )


def test_a_key_repeated_alike_counts_once_and_too_many_keys_are_refused(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 8.3.4.1: a matching key given twice alike matches as
    once; a query of more keys than the node takes is a 400, never a 500."""
    url = f"{shared_node.settings.dicomweb_url}/studies"
    repeated = "&".join(["PatientID=IDX-1"] * 1000)
    answer = requests.get(f"{url}?{repeated}", timeout=30)
    assert answer.status_code == 200
    assert {a["00080050"]["Value"][0] for a in answer.json()} == {"ACC_1%", "ACCX1"}

    many = "&".join(f"PatientID=IDX-{n}" for n in range(100))
    refused = requests.get(f"{url}?{many}", timeout=30)
    assert refused.status_code == 400
    assert "matching keys" in refused.text


def test_uid_lists_match_any_uid_listed(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.4 C.2.2.2.2: a list of UIDs, comma or backslash apart."""
    wanted = [studies[a].study_instance_uid for a in ("ACC_1%", "B")]

    by_comma = _qido(shared_node, "/studies", StudyInstanceUID=",".join(wanted))
    by_tag = _qido(shared_node, "/studies", **{"0020000D": "\\".join(wanted)})
    sop_uid = studies["B"].series[1].instances[0].sop_instance_uid
    (instance,) = _qido(shared_node, "/instances", SOPInstanceUID=f"1.2.3,{sop_uid}")

    assert set(_accessions(by_comma)) == set(_accessions(by_tag)) == {"ACC_1%", "B"}
    assert instance.SOPInstanceUID == sop_uid
    assert instance.StudyInstanceUID == studies["B"].study_instance_uid


def test_limit_and_offset_page_the_matches_in_a_stable_order(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 8.3.4.4: offset and limit apply to the matches."""
    everything = _accessions(_qido(shared_node, "/studies"))
    pages = [
        _accessions(_qido(shared_node, "/studies", offset=str(n), limit="2"))
        for n in (0, 2, 4)
    ]
    matched = _qido(shared_node, "/studies", PatientID="IDX-1", offset="1", limit="5")

    assert set(everything) == {"ACC_1%", "ACCX1", "B"}
    assert pages == [everything[:2], everything[2:], []]
    assert (
        _accessions(matched) == [a for a in everything if a in ("ACC_1%", "ACCX1")][1:]
    )
    assert _qido(shared_node, "/studies", limit="0") == []


@pytest.mark.parametrize("batch", [1, 2])
def test_studies_and_series_are_paged_through_in_batches_alike(
    shared_node: RunningNode,
    studies: dict[str, scan.Study],
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
) -> None:
    """The studies or series of a search are found a batch at a time, each
    batch after the last UIDs of the one before; the answers are those of
    one batch holding them all, in the same order."""
    study_uid = studies["ACC_1%"].study_instance_uid
    searches = [
        ("/studies", {}),
        ("/studies", {"offset": "1", "limit": "2"}),
        ("/studies", {"PatientID": "IDX-1"}),
        ("/series", {}),
        ("/series", {"offset": "2", "limit": "3"}),
        ("/series", {"Modality": "CT"}),
        (f"/studies/{study_uid}/series", {}),
    ]
    url = shared_node.settings.dicomweb_url
    whole = [
        requests.get(f"{url}{path}", params=params, timeout=30).json()
        for path, params in searches
    ]
    monkeypatch.setattr(dicomweb, "ANSWER_BATCH", batch)
    batched = [
        requests.get(f"{url}{path}", params=params, timeout=30).json()
        for path, params in searches
    ]

    assert len(whole[0]) >= 3 and len(whole[3]) >= 5
    assert batched == whole


def test_an_answer_holds_at_most_the_servers_maximum_and_says_there_is_more(
    shared_node: RunningNode,
    studies: dict[str, scan.Study],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DICOM PS3.18 8.3.4: without a limit, or with one above the origin
    server's maximum, a search answers that many matches, with a Warning
    that more can be requested; offset pages through them all. A limit the
    maximum allows stops the answer without a Warning."""
    url = f"{shared_node.settings.dicomweb_url}/instances"
    everything = [i.SOPInstanceUID for i in _qido(shared_node, "/instances")]
    monkeypatch.setattr(dicomweb, "MAX_ANSWERS", 2, raising=False)

    pages = [
        requests.get(url, params=params, timeout=30)
        for params in ({}, {"offset": "2", "limit": "10"}, {"offset": "4"})
    ]
    limited = requests.get(url, params={"limit": "2"}, timeout=30)

    assert len(everything) == 6
    assert [len(page.json()) for page in pages] == [2, 2, 2]
    assert [
        answer["00080018"]["Value"][0] for page in pages for answer in page.json()
    ] == everything
    for page in pages[:2]:
        assert page.headers["Warning"].endswith(
            ": There are additional results that can be requested"
        )
    assert "Warning" not in pages[2].headers
    assert len(limited.json()) == 2 and "Warning" not in limited.headers


def test_series_matching_on_the_index(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 10.6.3.3.2: series of all studies, by study and series
    attributes."""
    series = _qido(shared_node, "/series", Modality="SR")
    of_patient = _qido(shared_node, "/series", PatientID="IDX-1", Modality="CT")

    assert [s.SeriesInstanceUID for s in series] == [
        studies["B"].series[1].series_instance_uid
    ]
    assert {s.SeriesInstanceUID for s in of_patient} == {
        s.series_instance_uid for s in studies["ACC_1%"].series
    }


def test_a_study_whose_manifest_is_pending_is_not_answered(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """RAD TF-3 4.129: a manifest whose registration is not yet known
    publishes nothing, at any level; once registered, the study is found."""
    study = studies[PENDING.accession_number]
    source = shared_node.services.imaging_source

    assert _qido(shared_node, "/studies", PatientID="IDX-9") == []
    assert _qido(shared_node, f"/studies/{study.study_instance_uid}/instances") == []
    assert _qido(shared_node, "/series", Modality="CT", PatientID="IDX-9") == []
    manifest = imaging_manifest.c.study_instance_uid == study.study_instance_uid
    with source.engine.begin() as conn:
        conn.execute(update(imaging_manifest).where(manifest).values(status="current"))
    try:
        (found,) = _qido(shared_node, "/studies", PatientID="IDX-9")
    finally:
        with source.engine.begin() as conn:
            conn.execute(
                update(imaging_manifest).where(manifest).values(status="pending")
            )
    assert found.StudyInstanceUID == study.study_instance_uid


def test_instances_stored_before_the_index_are_indexed_on_the_first_query(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.18 10.6: instances stored before revision 0006 kept their
    attributes have their headers read once, before the first answer."""
    running_node.feed()
    source = running_node.services.imaging_source
    spec = STUDIES[0]
    study = _write_study(tmp_path / "study", spec)
    source.publish(study, PATIENT)
    with source.engine.begin() as conn:
        command.downgrade(migrations.config(conn), "0005")
        command.upgrade(migrations.config(conn), "0006")
        before = conn.execute(select(imaging_instance)).all()

    found = _qido(running_node, "/studies", PatientID=spec.patient_id)

    with source.engine.connect() as conn:
        after = conn.execute(select(imaging_instance)).all()
    assert [row.attributes for row in before] == [None] * len(study.instances)
    assert {row.sop_instance_uid: row.accession_number for row in after} == {
        i.sop_instance_uid: spec.accession_number for i in study.instances
    }
    assert all(row.study_date == spec.study_date for row in after)
    assert all(row.attributes for row in after)
    assert {row.modality for row in after} == {"CT"}
    assert set(QIDO_COLUMNS.values()) <= set(after[0]._mapping)
    (answer,) = found
    assert answer.AccessionNumber == spec.accession_number
    assert answer.NumberOfStudyRelatedInstances == len(study.instances)


def test_metadata_of_a_study_whose_files_are_all_gone_is_a_500_that_says_so(
    shared_node: RunningNode, studies: dict[str, scan.Study]
) -> None:
    """DICOM PS3.18 10.4.3.3.2 and 8.7.1: metadata is made of the stored
    copies; when none can be read the answer is the origin server's failure
    with a reason, never an empty array that says the study holds nothing
    (the node logs each copy)."""
    study = studies["ACC_1%"]

    answer = requests.get(
        f"{shared_node.settings.dicomweb_url}/studies/"
        f"{study.study_instance_uid}/metadata",
        timeout=30,
    )

    assert answer.status_code == 500
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "stored copies of the instances asked for cannot be read" in answer.text


def test_a_study_whose_name_and_accession_number_hold_a_nul_is_kept_and_found(
    running_node: RunningNode, tmp_path: Path
) -> None:
    """DICOM PS3.5 6.1.3: a NUL is in no VR, yet found in the wild; an
    instance whose Patient's Name or Accession Number holds one is kept on
    every database (PostgreSQL text cannot hold a NUL, so no index column
    keeps the value) and matched on its attributes alone (DICOM PS3.4
    C.2.2.2)."""
    running_node.feed()
    spec = Spec("NUL\x00A", "IDX-1", "Nul\x00^Name", "20200105", "101500", (("CT", 1),))
    study = _write_study(tmp_path / "nul", spec)

    running_node.services.imaging_source.publish(study, PATIENT)

    (found,) = _qido(running_node, "/studies", PatientName="nul*")
    assert found.StudyInstanceUID == study.study_instance_uid
    assert _qido(running_node, "/studies", AccessionNumber="NUL*") == [found]
    assert _qido(running_node, "/studies", PatientName="other*") == []

"""Benchmark: QIDO-RS /studies?PatientID=… at the Imaging Document Source on
a store of many instances, against a plain SQL select of the same rows.

Measures RAD TF-3 4.129 (QIDO-RS Query, DICOM PS3.18 10.6.3.3.1) on a real
node (xdsi.app.Node, loopback, port 0), on SQLite by default or, with
``--postgresql``, in a private PostgreSQL cluster on 127.0.0.1 started with
the test suite's own code (tests/conftest.py) and stopped at the end.

The store holds ``--instances`` synthetic instances: rows, not files. Each
row is the one intake writes (xdsi.actors.imaging_source.instance_row) for
the bundled CT's first image with its UIDs, Patient ID and Name, Referring
Physician Name, Accession Number and Study Date replaced; ``--per-study``
instances in two series make a study, five studies a patient, and each
study has a current manifest row, so that every study is published. No
instance file exists: an answer that read one would fail.

Timed, each the median (and 95th percentile) of ``--queries`` runs after
one untimed:

- QIDO-RS: GET /studies?PatientID=… of one patient over HTTP (keep-alive),
  the answer read as JSON; then, for comparison, the same by Accession
  Number, by a Study Date range, by a Patient Name wildcard (ten
  patients), by a Referring Physician Name wildcard (no column:
  matched on the stored attributes, not in SQL), and the first ten
  studies of the whole store;
- baseline: in this process, a plain SELECT of that patient's rows from
  imaging_instance, every column fetched.

It prints the ratio QIDO-RS / baseline for the Patient ID query.

Run from the repository root::

    PYTHONPATH=. python tests/benchmarks/bench_qido.py [--instances 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import requests
from pydicom.datadict import tag_for_keyword
from pydicom.uid import generate_uid
from sqlalchemy import Engine, insert, select

from tests.conftest import PostgresCluster, _postgres_bin, _start_cluster, _stop_cluster
from xdsi.actors.imaging_source import instance_row
from xdsi.app import Node
from xdsi.cli import bundled_study
from xdsi.config import Settings
from xdsi.dicom import scan
from xdsi.store.schema import imaging_instance, imaging_manifest

STUDIES_PER_PATIENT = 5
SERIES_PER_STUDY = 2
BATCH = 5000


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


def patient_id(number: int) -> str:
    return f"BENCH-{number:07d}"


def load(engine: Engine, instances: int, per_study: int) -> int:
    """Write ``instances`` rows and a current manifest per study; return the
    number of patients."""
    header, _ = scan.read_header(bundled_study() / "S1000" / "I0010.dcm")
    template = json.loads(header.attributes or "{}")
    studies = max(1, instances // per_study)
    rows: list[dict[str, object]] = []
    manifests: list[dict[str, object]] = []

    def flush() -> None:
        with engine.begin() as conn:
            if rows:
                conn.execute(insert(imaging_instance), rows)
            if manifests:
                conn.execute(insert(imaging_manifest), manifests)
        rows.clear()
        manifests.clear()

    for study in range(studies):
        patient = study // STUDIES_PER_PATIENT
        study_uid = generate_uid()
        series_uids = [generate_uid() for _ in range(SERIES_PER_STUDY)]
        attributes = dict(template)
        attributes[_tag("PatientName")] = {
            "vr": "PN",
            "Value": [{"Alphabetic": f"Patient{patient:07d}^Bench"}],
        }
        attributes[_tag("ReferringPhysicianName")] = {
            "vr": "PN",
            "Value": [{"Alphabetic": f"Doctor{study % 100:03d}^Bench"}],
        }
        for keyword, value in (
            ("PatientID", patient_id(patient)),
            ("AccessionNumber", f"A{study:08d}"),
            ("StudyDate", f"20{study % 25:02d}0{1 + study % 9}{10 + study % 18}"),
            ("StudyInstanceUID", study_uid),
        ):
            attributes[_tag(keyword)] = {"vr": template[_tag(keyword)]["vr"]}
            attributes[_tag(keyword)]["Value"] = [value]
        for number in range(per_study):
            sop_uid = generate_uid()
            series_uid = series_uids[number % SERIES_PER_STUDY]
            attributes[_tag("SeriesInstanceUID")] = {"vr": "UI", "Value": [series_uid]}
            attributes[_tag("SOPInstanceUID")] = {"vr": "UI", "Value": [sop_uid]}
            instance = replace(
                header,
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                attributes=json.dumps(attributes, sort_keys=True),
            )
            rows.append(instance_row(instance, f"missing/{sop_uid}", "0" * 64, None))
        manifests.append(
            {
                "sop_instance_uid": generate_uid(),
                "study_instance_uid": study_uid,
                "submission_set_unique_id": generate_uid(),
                "blob": "missing",
                "status": "current",
            }
        )
        if len(rows) >= BATCH:
            flush()
    flush()
    return (studies - 1) // STUDIES_PER_PATIENT + 1


def timed(runs: int, call: Callable[[], object]) -> tuple[float, float]:
    """Median and 95th percentile in seconds of ``runs`` calls after one."""
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * runs))]


@contextmanager
def database(use_postgresql: bool, work: Path) -> Iterator[str]:
    """The node's database URL: SQLite in ``work`` or a private cluster."""
    if not use_postgresql:
        yield ""
        return
    pg_bin = _postgres_bin()
    if pg_bin is None:
        raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found")
    state = _start_cluster(pg_bin)
    try:
        yield PostgresCluster(state["port"]).create_database()
    finally:
        _stop_cluster(pg_bin, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--per-study", type=int, default=100)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--postgresql", action="store_true")
    args = parser.parse_args()
    # The development server logs a line per request; the figures are the output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-qido-") as work:
        with database(args.postgresql, Path(work)) as database_url:
            settings = (
                Settings()
                .with_storage(Path(work) / "node")
                .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
            )
            settings = replace(
                settings, node=replace(settings.node, database_url=database_url)
            )
            node = Node(settings)
            effective = node.start()
            try:
                assert node.services is not None
                engine = node.services.engine
                started = time.perf_counter()
                patients = load(engine, args.instances, args.per_study)
                print(
                    f"{args.instances} instance rows, {patients} patients "
                    f"({engine.dialect.name}), loaded in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                run(effective.dicomweb_url, engine, patients // 2, args)
            finally:
                node.stop()


def run(url: str, engine: Engine, patient: int, args: argparse.Namespace) -> None:
    session = requests.Session()
    wanted = patient_id(patient)

    def qido(**params: str) -> Callable[[], object]:
        def call() -> object:
            answer = session.get(f"{url}/studies", params=params, timeout=600)
            answer.raise_for_status()
            return answer.json()

        return call

    found = qido(PatientID=wanted)()
    assert isinstance(found, list) and len(found) == STUDIES_PER_PATIENT, found
    query = select(imaging_instance).where(
        imaging_instance.c.dicom_patient_id == wanted
    )

    def baseline() -> object:
        with engine.connect() as conn:
            return conn.execute(query).all()

    rows = len(baseline())  # type: ignore[arg-type]
    qido_median, qido_p95 = timed(args.queries, qido(PatientID=wanted))
    sql_median, sql_p95 = timed(args.queries, baseline)
    print(
        f"QIDO-RS /studies?PatientID=…  ({len(found)} studies, {rows} instances): "
        f"median {qido_median * 1000:.1f} ms, p95 {qido_p95 * 1000:.1f} ms"
    )
    print(
        f"plain SQL select of those {rows} rows: median {sql_median * 1000:.1f} "
        f"ms, p95 {sql_p95 * 1000:.1f} ms"
    )
    print(f"ratio QIDO-RS / plain select: {qido_median / sql_median:.1f}")
    accession = found[0][_tag("AccessionNumber")]["Value"][0]
    for label, params in (
        ("AccessionNumber=…", {"AccessionNumber": accession}),
        ("StudyDate=20100101-20101231", {"StudyDate": "20100101-20101231"}),
        ("PatientName=patient000004*", {"PatientName": "patient000004*"}),
        (
            "ReferringPhysicianName=doctor004* (not in SQL)",
            {"ReferringPhysicianName": "doctor004*"},
        ),
        # The first page of the whole store: one batch of UIDs is read, not
        # every study's.
        ("limit=10 (no key)", {"limit": "10"}),
    ):
        median, p95 = timed(max(3, args.queries // 10), qido(**params))
        print(
            f"QIDO-RS /studies?{label}: median {median * 1000:.1f} ms, "
            f"p95 {p95 * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()

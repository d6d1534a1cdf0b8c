"""Benchmark: Document Registry ITI-42 registrations/s and ITI-18 FindDocuments
latency as the registry grows.

Measures ITI TF-2 3.42 (Register Document Set-b) and ITI TF-2
3.18.4.1.2.3.7.1 (FindDocuments) on a real node (xdsi.app.Node, loopback,
port 0) over PostgreSQL, in a private cluster on 127.0.0.1 started with the
test suite's own code (tests/conftest.py; fsync and synchronous_commit off,
as there) and stopped at the end.

1. Registrations/s: single-DocumentEntry SubmitObjectsRequests, built with
   xdsi.metadata.build and carrying hash, size and repositoryUniqueId as a
   Document Repository sends them, go to a node serving with ``--workers``
   HTTP worker processes, from ``--threads`` client threads for
   ``--seconds``. The client runs in its own process, so that it does not
   share the node's interpreter lock. By default (``--client raw``) it is a
   load generator, as wrk would be: bodies serialised before the clock
   starts, sent over keep-alive http.client connections, the status read from
   the answer's bytes; ``--client soap`` sends through xdsi.wire.SoapClient
   (requests and lxml) instead, which costs the shared cores about 2 ms of
   CPU per registration more. Full validation runs (schema and ITI TF-3
   4.2.3 rules, as always). The CPU time each registration took in the
   node's processes, the database's and the client's is printed too: unlike
   the rate, it does not depend on what else the machine runs. ``--sqlite``
   puts this node on SQLite instead.
2. FindDocuments latency for one patient with 20 DocumentEntries, registered
   by ITI-42 over HTTP, while filler DocumentEntries bring the registry to
   each of ``--sizes``; median and p95 over ``--queries`` LeafClass queries
   over HTTP, and of Registry.query in-process (the SQL and the XML without
   HTTP, SOAP and audit).

The filler loader writes, with PostgreSQL COPY, exactly the rows the real
ITI-42 path writes. One template submission (a SubmissionSet, 10
DocumentEntries with event code and referenceIdList, 10 HasMember Associations)
is registered through Registry.register in a scratch database; the rows it
wrote (registry_object with its XML, registry_code per coded attribute,
registry_value) are read back and become the template. Each filler submission
is the template with its own values put in: every entryUUID and Classification
or ExternalIdentifier id, the uniqueIds, the referenceIdList study, the hash
and the patientId. Calling ``Registry._insert`` instead was the other choice;
it issues an INSERT per object and per child table (about 6 ms for a
one-document submission on a 2-core machine), so 1 M entries would take well
over half an hour. Before loading, the script proves the equivalence: three
filler submissions go through Registry.register into one database and through
the loader into another, and every column of every row written (serial ids and
created_at aside), the patients, and the LeafClass FindDocuments answers for
their patients must be identical, or the run stops. After each load,
FindDocuments for a filler patient must find that patient's loaded entries.
Filler submissions rotate over ``--patients`` patients (10 DocumentEntries
each), so at 1 M entries each patient has 20, like the measured one. Each load
ends with VACUUM ANALYZE, as autovacuum would eventually do on a registry that
grew over time; the load time includes it.

``--profile`` (also on its own when registrations/s miss the target)
profiles registrations in one thread with cProfile, through the registry's
WSGI app (SOAP parsing, validation, database, audit, answer), and prints
where the time goes.

Run from the repository root::

    PYTHONPATH=. python tests/benchmarks/bench_registry.py \\
        [--seconds 20] [--threads 4] [--workers 2] [--client raw|soap]
        [--sizes 1000,100000,1000000] [--sqlite]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import http.client
import io
import logging
import math
import multiprocessing
import os
import pstats
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from lxml import etree
from sqlalchemy import Engine, select

from tests.conftest import (
    PostgresCluster,
    _postgres_bin,
    _start_cluster,
    _stop_cluster,
)
from xdsi import ns, wire
from xdsi.actors.registry import Registry
from xdsi.actors.soap_endpoint import transaction
from xdsi.app import Node, build_services
from xdsi.config import Settings
from xdsi.hl7.adt import PatientIdentity, build_feed
from xdsi.hl7.mllp import send_message
from xdsi.metadata import build, ebrim, stored_query
from xdsi.metadata.codes import Code
from xdsi.metadata.ebrim import read_registry_objects
from xdsi.metadata.responses import read_errors, read_status
from xdsi.metadata.validation import assign_entry_uuids
from xdsi.store.schema import patient, registry_code, registry_object, registry_value

REGISTER_ACTION = transaction("ITI-42")["request_action"]
QUERY_ACTION = transaction("ITI-18")["request_action"]
AUTHORITY = Settings().node.assigning_authority
REPOSITORY_UNIQUE_ID = Settings().repository.repository_unique_id
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
ENTRIES_PER_SUBMISSION = 10
TARGET_ENTRIES = 20
REGISTRATIONS_TARGET = 200.0
LATENCY_RATIO_TARGET = 2.0

# Placeholders of the loader's template; none is a substring of another value.
COPY_TOKEN = "987654321987654321987"
PATIENT_TOKEN = "PATIENTTOKEN7654321"

KOS_FORMAT = Code(
    "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.2.6.1", "Key Object Selection"
)
IMAGING = Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")


def patient_id_of(local_id: str) -> str:
    return f"{local_id}^^^&{AUTHORITY}&ISO"


def submission_request(patient_id: str, stem: str, entries: int) -> etree._Element:
    """Build the ITI-42 SubmitObjectsRequest of ``entries`` imaging manifests.

    uniqueIds are ``stem.0`` (SubmissionSet) and ``stem.k``; each
    DocumentEntry has the hash, size and repositoryUniqueId a Document
    Repository adds (ITI TF-2 3.41.4.1.3).
    """
    specs = [
        build.ManifestEntry(
            entry_id=f"Document{k:02d}",
            unique_id=f"{stem}.{k}",
            patient_id=patient_id,
            source_patient_id=patient_id,
            source_patient_info=(f"PID-3|{patient_id}",),
            title="Manifest",
            creation_time="20240102030405",
            service_start_time="20240102030000",
            service_stop_time="20240102033000",
            event_codes=(Code("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),),
            reference_ids=(
                f"{stem}.{100 + k}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
            ),
            mime_type="application/dicom",
            format_code=KOS_FORMAT,
            class_code=Code("IMAGES", "1.3.6.1.4.1.19376.1.2.6.1", "Images"),
            type_code=IMAGING,
            practice_setting_code=Code(
                "394914008", "2.16.840.1.113883.6.96", "Radiology"
            ),
            healthcare_facility_type_code=Code(
                "22232009", "2.16.840.1.113883.6.96", "Hospital"
            ),
            confidentiality_code=Code("N", "2.16.840.1.113883.5.25", "Normal"),
            language_code="en-US",
            author_institution="xdsi",
            size=1000 + k,
            sha1=hashlib.sha1(f"{stem}.{k}".encode()).hexdigest(),
        )
        for k in range(1, entries + 1)
    ]
    submission_set = build.SubmissionSetSpec(
        entry_id="SubmissionSet01",
        unique_id=f"{stem}.0",
        source_id=f"{Settings().imaging_source.source_id}",
        patient_id=patient_id,
        content_type_code=IMAGING,
        author_institution="xdsi",
        submission_time="20240102040506",
        title=build.MANIFEST_SUBMISSION_TITLE,
    )
    request = build.submission(specs, submission_set)
    for entry in request.iter(f"{{{ns.RIM}}}ExtrinsicObject"):
        ebrim.set_slot(entry, "repositoryUniqueId", [REPOSITORY_UNIQUE_ID])
    return request


def find_documents(patient_id: str) -> etree._Element:
    return stored_query.build_query(
        "FindDocuments",
        {
            "$XDSDocumentEntryPatientId": patient_id,
            "$XDSDocumentEntryStatus": [ebrim.STATUS_APPROVED],
        },
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def libpq_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def node_settings(storage: Path, database_url: str, workers: int = 1) -> Settings:
    settings = (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    return replace(
        settings,
        node=replace(settings.node, database_url=database_url, workers=workers),
    )


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster on 127.0.0.1, stopped on the way out."""
    pg_bin = _postgres_bin()
    if pg_bin is None:
        raise SystemExit("PostgreSQL server binaries (initdb, pg_ctl) not found")
    state = _start_cluster(pg_bin)
    try:
        yield PostgresCluster(state["port"])
    finally:
        _stop_cluster(pg_bin, state)


@contextmanager
def running_node(storage: Path, database_url: str, workers: int = 1) -> Iterator[Node]:
    node = Node(node_settings(storage, database_url, workers))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def feed(settings: Settings, patient_id: str) -> None:
    """ITI-8 over MLLP to the node's Patient Identity Feed."""
    send_message(
        settings.node.host, settings.registry.feed_port, build_feed(patient_id)
    )


def register(client: wire.SoapClient, request: etree._Element) -> None:
    with client.call(REGISTER_ACTION, request) as reply:
        if read_status(reply.body) != SUCCESS:
            codes = [e.code for e in read_errors(reply.body)]
            raise RuntimeError(f"ITI-42 failed: {codes}")


# --- 1. ITI-42 registrations per second --------------------------------------


def register_for(
    url: str, patient_ids: list[str], threads: int, seconds: float
) -> dict[str, Any]:
    """Client process: send single-document ITI-42 requests from ``threads``
    threads until ``seconds`` have passed; return counts and latencies."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        client = wire.SoapClient(url)
        sent = 0
        while time.monotonic() < deadline:
            request = submission_request(
                patient_ids[(n + sent * threads) % len(patient_ids)],
                f"2.25.{uuid.uuid4().int}",
                1,
            )
            started = time.monotonic()
            try:
                register(client, request)
            except (RuntimeError, wire.WireError) as exc:
                with lock:
                    failures.append(str(exc))
                continue
            finally:
                sent += 1
            with lock:
                latencies.append(time.monotonic() - started)

    started = time.monotonic()
    cpu_started = time.process_time()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "elapsed": time.monotonic() - started,
        "cpu": time.process_time() - cpu_started,
        "latencies": latencies,
        "failures": failures,
    }


def register_raw(
    url: str, patient_ids: list[str], threads: int, seconds: float, rate: int
) -> dict[str, Any]:
    """Client process, lean: like register_for, but each thread sends bodies
    serialised before the clock starts over one keep-alive http.client
    connection, and reads the status from the answer's bytes.

    A load generator costs the two shared cores less than xdsi's own SOAP
    client (requests, lxml); ``rate`` bounds the bodies built per thread and
    second.
    """
    target = urlsplit(url)
    count = int(rate * seconds)
    bodies: list[list[tuple[str, bytes]]] = []
    for n in range(threads):
        mine = []
        for k in range(count):
            request = submission_request(
                patient_ids[(n + k * threads) % len(patient_ids)],
                f"2.25.{uuid.uuid4().int}",
                1,
            )
            envelope = wire.build_envelope(
                request, REGISTER_ACTION, to=url, reply_to_anonymous=True
            )
            content_type, _, chunks = wire.write_message(
                envelope, REGISTER_ACTION, mtom=False
            )
            mine.append((content_type, b"".join(chunks)))
        bodies.append(mine)
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port)
        for content_type, body in bodies[n]:
            if time.monotonic() >= deadline:
                break
            started = time.monotonic()
            connection.request(
                "POST", target.path, body, {"Content-Type": content_type}
            )
            answer = connection.getresponse().read()
            with lock:
                if b"ResponseStatusType:Success" in answer:
                    latencies.append(time.monotonic() - started)
                else:
                    failures.append(answer[:300].decode("utf-8", "replace"))
        else:
            with lock:
                failures.append(f"thread {n} ran out of prepared bodies")
        connection.close()

    started = time.monotonic()
    cpu_started = time.process_time()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "elapsed": time.monotonic() - started,
        "cpu": time.process_time() - cpu_started,
        "latencies": latencies,
        "failures": failures,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (proc(5), stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids(cluster: PostgresCluster) -> list[int]:
    """Every server process of the cluster: backends and background workers."""
    with cluster.admin() as admin:
        return [row[0] for row in admin.execute("SELECT pid FROM pg_stat_activity")]


def cpu_snapshot(node: Node, cluster: PostgresCluster | None) -> dict[str, float]:
    """CPU seconds used so far by the node's processes and the database's."""
    snapshot = {"node": sum(os.times()[:2])}
    snapshot["node"] += sum(cpu_seconds(pid) for pid in node.worker_pids)
    if cluster is not None:
        # Keyed by pid: a backend started during the run counts from zero.
        for pid in postgres_pids(cluster):
            snapshot[f"pg{pid}"] = cpu_seconds(pid)
    return snapshot


def profile_registrations(node: Node, patient_ids: list[str], count: int) -> None:
    """cProfile ``count`` registrations through the registry's WSGI app."""
    assert node.services is not None
    settings = node.settings
    app = node.services.registry.app(settings.storage / "spool" / "profile")
    client = app.test_client()
    url = settings.url("registry")
    bodies = []
    for n in range(count):
        request = submission_request(
            patient_ids[n % len(patient_ids)], f"2.25.{uuid.uuid4().int}", 1
        )
        envelope = wire.build_envelope(
            request, REGISTER_ACTION, to=url, reply_to_anonymous=True
        )
        content_type, _, chunks = wire.write_message(
            envelope, REGISTER_ACTION, mtom=False
        )
        bodies.append((content_type, b"".join(chunks)))

    profiler = cProfile.Profile()
    started = time.monotonic()
    profiler.enable()
    for content_type, body in bodies:
        answer = client.post(
            settings.registry.path, data=body, headers={"Content-Type": content_type}
        )
        if b"ResponseStatusType:Success" not in answer.data:
            raise RuntimeError("a profiled registration failed")
    profiler.disable()
    elapsed = time.monotonic() - started
    print(
        f"\nProfile: {count} registrations in one thread, no HTTP server: "
        f"{elapsed / count * 1000:.2f} ms each under cProfile"
    )
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    print(out.getvalue())


def bench_registrations(
    args: argparse.Namespace, cluster: PostgresCluster | None, work: Path
) -> None:
    database_url = cluster.create_database() if cluster else ""
    with running_node(work / "register-node", database_url, args.workers) as node:
        settings = node.settings
        patient_ids = [patient_id_of(f"REG{n:04d}") for n in range(20)]
        for patient_id in patient_ids:
            feed(settings, patient_id)
        url = settings.url("registry")

        # A few registrations first, so that caches and pools are warm.
        warm = register_for(url, patient_ids, 1, 1.0)
        if warm["failures"]:
            raise RuntimeError(f"warm-up failed: {warm['failures'][:3]}")
        # Let the worker processes come up before the clock starts.
        time.sleep(5 if args.workers > 1 else 0)
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            before = cpu_snapshot(node, cluster)
            if args.client == "soap":
                result = pool.apply(
                    register_for, (url, patient_ids, args.threads, args.seconds)
                )
            else:
                result = pool.apply(
                    register_raw,
                    (url, patient_ids, args.threads, args.seconds, 400),
                )
            after = cpu_snapshot(node, cluster)
        latencies = result["latencies"]
        rate = len(latencies) / result["elapsed"]
        backend = "SQLite" if cluster is None else "PostgreSQL"
        print(
            f"ITI-42, one DocumentEntry per submission, {args.threads} "
            f"{args.client} client threads, {args.workers} HTTP worker processes, "
            f"{backend}, "
            f"{os.cpu_count()} CPUs:"
        )
        print(
            f"  {len(latencies)} registered in {result['elapsed']:.1f} s: "
            f"{rate:.1f} registrations/s (target >= {REGISTRATIONS_TARGET:.0f}); "
            f"latency median {statistics.median(latencies) * 1000:.1f} ms, "
            f"p95 {percentile(latencies, 0.95) * 1000:.1f} ms; "
            f"{len(result['failures'])} failed"
        )
        for failure in result["failures"][:3]:
            print(f"  failure: {failure}")
        # CPU per registration does not depend on what else the machine runs;
        # the rate above does.
        count = max(1, len(latencies))
        node_cpu = after["node"] - before["node"]
        pg_cpu = sum(
            after[key] - before.get(key, 0.0) for key in after if key.startswith("pg")
        )
        total = node_cpu + pg_cpu + result["cpu"]
        print(
            f"  CPU per registration: node {node_cpu / count * 1000:.2f} ms, "
            f"database {pg_cpu / count * 1000:.2f} ms, client "
            f"{result['cpu'] / count * 1000:.2f} ms; all of it on "
            f"{os.cpu_count()} idle cores would allow "
            f"{(os.cpu_count() or 1) * count / total:.0f} registrations/s"
        )
        if args.profile or rate < REGISTRATIONS_TARGET:
            profile_registrations(node, patient_ids, args.profile_count)
    if cluster:
        cluster.drop_database(database_url)


# --- 2. the filler loader ------------------------------------------------------

TABLES = {
    "registry_object": [c.name for c in registry_object.c if c.name != "created_at"],
    "registry_code": [c.name for c in registry_code.c if c.name != "id"],
    "registry_value": [c.name for c in registry_value.c if c.name != "id"],
}
TABLE_OBJECTS = {
    "registry_object": registry_object,
    "registry_code": registry_code,
    "registry_value": registry_value,
}


def stem_of(copy: int) -> str:
    return f"2.25.{copy}"


@dataclass
class Template:
    """The rows ITI-42 wrote for the template submission, per table."""

    request: str
    rows: dict[str, list[tuple[Any, ...]]]
    uuids: list[str]
    hashes: list[str]

    @classmethod
    def register(cls, registry: Registry) -> Template:
        """Register the template submission through the real path; read back
        what it wrote."""
        request = submission_request(
            patient_id_of(PATIENT_TOKEN),
            stem_of(int(COPY_TOKEN)),
            ENTRIES_PER_SUBMISSION,
        )
        assign_entry_uuids(read_registry_objects(request))
        text = etree.tostring(request, encoding="unicode")
        uuids = sorted({e.get("id") for e in request.iter() if e.get("id")})
        registry.add_patient(
            PatientIdentity(patient_id_of(PATIENT_TOKEN), (), "", "", "", "A01")
        )
        outcome = registry.register(etree.fromstring(text))
        if outcome.errors:
            raise RuntimeError(f"template registration failed: {outcome.errors}")
        with registry.engine.connect() as conn:
            rows = {
                name: [
                    tuple(row)
                    for row in conn.execute(
                        select(*[TABLE_OBJECTS[name].c[c] for c in columns]).where(
                            TABLE_OBJECTS[name].c.entry_uuid.in_(uuids)
                        )
                    )
                ]
                for name, columns in TABLES.items()
            }
        hashes = [
            hashlib.sha1(f"{stem_of(int(COPY_TOKEN))}.{k}".encode()).hexdigest()
            for k in range(1, ENTRIES_PER_SUBMISSION + 1)
        ]
        return cls(text, rows, uuids, hashes)


class FillerLoader:
    """Write filler submissions as the template's rows with their own values."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.tokens = {*template.uuids, *template.hashes, COPY_TOKEN, PATIENT_TOKEN}
        # Any id, hash or placeholder; those not in a copy's values (the
        # classification scheme UUIDs) stay as they are.
        self.pattern = re.compile(
            rf"urn:uuid:[0-9a-f-]{{36}}|[0-9a-f]{{40}}|{COPY_TOKEN}|{PATIENT_TOKEN}"
        )
        # Each field that holds a placeholder, split into literal text and
        # placeholders, so that a copy is a join; other fields are copied.
        self.rows = {
            name: [(row, self._split_fields(row)) for row in rows]
            for name, rows in template.rows.items()
        }

    def _split_fields(
        self, row: tuple[Any, ...]
    ) -> list[tuple[int, bool, list[tuple[str, bool]]]]:
        """(index, is bytes, [(text, is placeholder)]) per field to fill."""
        fields = []
        for index, value in enumerate(row):
            is_bytes = isinstance(value, bytes)
            text = value.decode("utf-8") if is_bytes else value
            if not isinstance(text, str):
                continue
            parts: list[tuple[str, bool]] = []
            end = 0
            for match in self.pattern.finditer(text):
                if match.group(0) in self.tokens:
                    parts += [
                        (text[end : match.start()], False),
                        (match.group(0), True),
                    ]
                    end = match.end()
            if end:
                fields.append((index, is_bytes, [*parts, (text[end:], False)]))
        return fields

    def values(self, copy: int, local_patient_id: str) -> dict[str, str]:
        """The placeholder values of filler submission ``copy``."""
        stem = stem_of(copy)
        raw = os.urandom(16 * len(self.template.uuids)).hex()
        values = {
            token: (
                f"urn:uuid:{raw[32 * n : 32 * n + 8]}-{raw[32 * n + 8 : 32 * n + 12]}"
                f"-4{raw[32 * n + 13 : 32 * n + 16]}-8{raw[32 * n + 17 : 32 * n + 20]}"
                f"-{raw[32 * n + 20 : 32 * n + 32]}"
            )
            for n, token in enumerate(self.template.uuids)
        }
        for k, token in enumerate(self.template.hashes, start=1):
            values[token] = hashlib.sha1(f"{stem}.{k}".encode()).hexdigest()
        values[COPY_TOKEN] = str(copy)
        values[PATIENT_TOKEN] = local_patient_id
        return values

    def request(self, values: dict[str, str]) -> etree._Element:
        """The SubmitObjectsRequest the loaded rows stand for."""
        text = self.pattern.sub(
            lambda m: values.get(m.group(0), m.group(0)), self.template.request
        )
        return etree.fromstring(text)

    def copy_rows(self, values: dict[str, str]) -> dict[str, list[tuple]]:
        """The rows of one filler submission, by table."""
        out: dict[str, list[tuple]] = {}
        for name, rows in self.rows.items():
            filled = out.setdefault(name, [])
            for row, fields in rows:
                copy = list(row)
                for index, is_bytes, parts in fields:
                    text = "".join([values[p] if token else p for p, token in parts])
                    copy[index] = text.encode() if is_bytes else text
                filled.append(tuple(copy))
        return out

    def batch_rows(self, submissions: list[dict[str, str]]) -> dict[str, list[tuple]]:
        batches: dict[str, list[tuple]] = {name: [] for name in TABLES}
        for values in submissions:
            for name, rows in self.copy_rows(values).items():
                batches[name].extend(rows)
        return batches

    def write(
        self,
        conn: psycopg.Connection,
        batches: dict[str, list[tuple]],
        new_patients: list[str],
    ) -> None:
        """COPY the rows and the ``new_patients`` in one transaction."""
        with conn.cursor() as cursor:
            with cursor.copy("COPY registry_patient (patient_id) FROM STDIN") as out:
                for patient_id in new_patients:
                    out.write_row((patient_id,))
            for name, columns in TABLES.items():
                statement = f"COPY {name} ({', '.join(columns)}) FROM STDIN"
                with cursor.copy(statement) as out:
                    for row in batches[name]:
                        out.write_row(row)
        conn.commit()


def table_contents(engine: Engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        contents = {
            name: sorted(
                tuple(row)
                for row in conn.execute(
                    select(*[TABLE_OBJECTS[name].c[c] for c in columns])
                )
            )
            for name, columns in TABLES.items()
        }
        contents["registry_patient"] = sorted(
            tuple(row) for row in conn.execute(select(patient.c.patient_id))
        )
    return contents


def prove_loader(cluster: PostgresCluster, work: Path) -> Template:
    """Register three submissions for real and load the same three with the
    loader; stop unless both databases hold the same rows and answer alike."""
    real_url, loaded_url = cluster.create_database(), cluster.create_database()
    real = build_services(node_settings(work / "proof-real", real_url))
    loaded = build_services(node_settings(work / "proof-loaded", loaded_url))
    try:
        template = Template.register(real.registry)
        loader = FillerLoader(template)
        with real.engine.begin() as conn:
            for name in ("registry_value", "registry_code", "registry_object"):
                conn.execute(TABLE_OBJECTS[name].delete())
            conn.execute(patient.delete())

        # entryUUIDs sent as urn:uuid stay as sent (ITI TF-3 4.2.3.1.2), so
        # both paths get the same ids.
        local_ids = [f"PROOF{copy}" for copy in range(1, 4)]
        submissions = [
            loader.values(copy, local_id)
            for copy, local_id in enumerate(local_ids, start=1)
        ]
        for local_id, values in zip(local_ids, submissions, strict=True):
            real.registry.add_patient(
                PatientIdentity(patient_id_of(local_id), (), "", "", "", "A01")
            )
            outcome = real.registry.register(loader.request(values))
            if outcome.errors:
                raise RuntimeError(f"proof registration failed: {outcome.errors}")
        with psycopg.connect(libpq_url(loaded_url)) as conn:
            loader.write(
                conn,
                loader.batch_rows(submissions),
                [patient_id_of(i) for i in local_ids],
            )

        real_rows = table_contents(real.engine)
        loaded_rows = table_contents(loaded.engine)
        for name in real_rows:
            if real_rows[name] != loaded_rows[name]:
                raise RuntimeError(f"loader and ITI-42 differ in {name}")
        for local_id in local_ids:
            answers = [
                etree.tostring(
                    services.registry.query(find_documents(patient_id_of(local_id)))[0]
                )
                for services in (real, loaded)
            ]
            found = answers[0].count(b"<rim:ExtrinsicObject")
            if answers[0] != answers[1] or found != ENTRIES_PER_SUBMISSION:
                raise RuntimeError("loader and ITI-42 answer FindDocuments differently")
        counts = {name: len(rows) for name, rows in real_rows.items()}
        print(
            "Loader proof: 3 submissions through Registry.register and through "
            f"COPY wrote identical rows {counts}; FindDocuments answers identical"
        )
        return template
    finally:
        real.engine.dispose()
        loaded.engine.dispose()
        cluster.drop_database(real_url)
        cluster.drop_database(loaded_url)


# --- 2. FindDocuments latency by registry size -------------------------------


@dataclass
class Filler:
    """Filler submissions loaded so far, rotating over ``patients``."""

    loader: FillerLoader
    patients: int
    copies: int = 0

    def local_id(self, copy: int) -> str:
        return f"FILL{(copy - 1) % self.patients:06d}"

    def grow(self, conn: psycopg.Connection, entries: int, batch: int) -> None:
        """Load filler submissions until ``entries`` filler DocumentEntries.

        The next batch's rows are made while the server takes the current
        one (psycopg waits on the socket without the interpreter lock).
        """
        wanted = math.ceil(entries / ENTRIES_PER_SUBMISSION)
        starts = range(self.copies + 1, wanted + 1, batch)
        if not starts:
            return
        with ThreadPoolExecutor(1) as maker:
            pending = maker.submit(self._batch, starts[0], wanted, batch)
            for start in starts:
                batches, new_patients = pending.result()
                if start + batch <= wanted:
                    pending = maker.submit(self._batch, start + batch, wanted, batch)
                self.loader.write(conn, batches, new_patients)
        self.copies = wanted

    def _batch(
        self, start: int, wanted: int, batch: int
    ) -> tuple[dict[str, list[tuple]], list[str]]:
        copies = range(start, min(wanted, start + batch - 1) + 1)
        new_patients = [
            patient_id_of(self.local_id(c)) for c in copies if c <= self.patients
        ]
        submissions = [self.loader.values(c, self.local_id(c)) for c in copies]
        return self.loader.batch_rows(submissions), new_patients

    def entries_of_first_patient(self) -> int:
        return ENTRIES_PER_SUBMISSION * len(range(1, self.copies + 1, self.patients))


def timed_queries(
    run: Callable[[], etree._Element], count: int
) -> tuple[list[float], etree._Element]:
    latencies = []
    answer = run()
    for _ in range(count):
        started = time.perf_counter()
        answer = run()
        latencies.append(time.perf_counter() - started)
    return latencies, answer


def bench_queries(
    args: argparse.Namespace, cluster: PostgresCluster, work: Path
) -> None:
    template = prove_loader(cluster, work)
    loader = FillerLoader(template)
    database_url = cluster.create_database()
    filler = Filler(loader, args.patients)
    results = []
    with (
        running_node(work / "query-node", database_url) as node,
        psycopg.connect(libpq_url(database_url)) as conn,
    ):
        assert node.services is not None
        settings = node.settings
        registry = node.services.registry
        client = wire.SoapClient(settings.url("registry"))

        # The measured patient: fed by ITI-8, 20 entries registered by ITI-42.
        target = patient_id_of("TARGET")
        feed(settings, target)
        for n in range(TARGET_ENTRIES // ENTRIES_PER_SUBMISSION):
            register(
                client,
                submission_request(
                    target, f"2.25.{10**12 + n}", ENTRIES_PER_SUBMISSION
                ),
            )

        for size in args.sizes:
            started = time.monotonic()
            filler.grow(conn, size - TARGET_ENTRIES, args.batch)
            conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE")
            conn.autocommit = False
            load_s = time.monotonic() - started
            entries = conn.execute(
                "SELECT count(*) FROM registry_object WHERE kind = %s",
                (ebrim.DOCUMENT_ENTRY,),
            ).fetchone()[0]
            conn.commit()

            # The loaded entries answer as registered ones do.
            first = registry.query(find_documents(patient_id_of(filler.local_id(1))))[0]
            found = len(first.findall(f".//{{{ns.RIM}}}ExtrinsicObject"))
            if found != filler.entries_of_first_patient():
                raise RuntimeError(f"a filler patient has {found} entries")

            def over_http() -> etree._Element:
                with client.call(QUERY_ACTION, find_documents(target)) as reply:
                    return reply.body

            http, answer = timed_queries(over_http, args.queries)
            found = len(answer.findall(f".//{{{ns.RIM}}}ExtrinsicObject"))
            if read_status(answer) != SUCCESS or found != TARGET_ENTRIES:
                raise RuntimeError(f"FindDocuments found {found} entries")
            direct, _ = timed_queries(
                lambda: registry.query(find_documents(target))[0], args.queries
            )
            database_mb = (
                conn.execute("SELECT pg_database_size(current_database())").fetchone()[
                    0
                ]
                / 1e6
            )
            conn.commit()
            results.append((entries, load_s, http, direct, database_mb))
            print(
                f"  {entries} DocumentEntries loaded ({load_s:.1f} s, "
                f"{database_mb:.0f} MB); FindDocuments median "
                f"{statistics.median(http) * 1000:.2f} ms",
                flush=True,
            )
    cluster.drop_database(database_url)

    print(
        f"\nITI-18 FindDocuments (LeafClass, {TARGET_ENTRIES} entries of one patient; "
        f"{args.queries} queries each; filler over {args.patients} patients):"
    )
    header = (
        f"{'entries':>9} {'load s':>8} {'entries/s':>10} {'DB MB':>8} "
        f"{'median ms':>10} {'p95 ms':>8} {'query() median':>15} {'p95':>7}"
    )
    print(header)
    previous = 0
    for entries, load_s, http, direct, database_mb in results:
        print(
            f"{entries:>9} {load_s:>8.1f} {(entries - previous) / load_s:>10.0f} "
            f"{database_mb:>8.0f} {statistics.median(http) * 1000:>10.2f} "
            f"{percentile(http, 0.95) * 1000:>8.2f} "
            f"{statistics.median(direct) * 1000:>15.2f} "
            f"{percentile(direct, 0.95) * 1000:>7.2f}"
        )
        previous = entries
    if len(results) > 1:
        ratio = statistics.median(results[-1][2]) / statistics.median(results[0][2])
        print(
            f"median({results[-1][0]}) / median({results[0][0]}) = {ratio:.2f} "
            f"(target <= {LATENCY_RATIO_TARGET:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="0: no ITI-42 run")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--client",
        choices=["raw", "soap"],
        default="raw",
        help="raw: prepared bodies over http.client; soap: xdsi's SoapClient",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="the node's HTTP worker processes ([node] workers)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(s) for s in text.split(",") if s],
        default=[1000, 100_000, 1_000_000],
        help="registry sizes in DocumentEntries, ascending; empty: no ITI-18 run",
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument(
        "--batch", type=int, default=5000, help="filler submissions per transaction"
    )
    parser.add_argument("--sqlite", action="store_true", help="ITI-42 run on SQLite")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-count", type=int, default=300)
    args = parser.parse_args()
    # The development server logs a line per request; the figures are the output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.sizes != sorted(args.sizes) or any(s <= TARGET_ENTRIES for s in args.sizes):
        parser.error(f"--sizes must ascend and exceed {TARGET_ENTRIES}")

    with tempfile.TemporaryDirectory(prefix="bench-registry-") as work:
        with postgres_cluster() as cluster:
            if args.seconds > 0:
                bench_registrations(args, None if args.sqlite else cluster, Path(work))
            if args.sizes:
                bench_queries(args, cluster, Path(work))


if __name__ == "__main__":
    main()

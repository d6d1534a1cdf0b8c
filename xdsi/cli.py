"""The command line: ``xdsi serve | feed | publish | submit | find | fetch | audit |
arr | demo``."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from werkzeug.serving import make_server

from xdsi import __version__, ns
from xdsi.actors.consumer import Consumer, ConsumerError, FetchResult, FoundEntry
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.imaging_source import PublishError
from xdsi.actors.provide import SubmitError
from xdsi.app import Node, build_services
from xdsi.audit import Auditor, AuditSpool
from xdsi.audit.repository import (
    AuditRecordStore,
    AuditRepository,
    parse_time,
    query_app,
)
from xdsi.config import ConfigError, Settings, load_settings, to_toml
from xdsi.conformance.cli import conformance
from xdsi.dicom import scan
from xdsi.hl7.adt import build_feed, read_ack
from xdsi.hl7.mllp import MllpError, send_message
from xdsi.store.schema import make_engine

console = Console()
err_console = Console(stderr=True)


def qualify_patient_id(value: str, settings: Settings) -> str:
    """Qualify a bare id with the affinity domain (ITI TF-3 4.2.3.2.16).

    ``ID`` becomes ``ID^^^&OID&ISO`` with the configured assigning
    authority; a value that already carries ``^`` is taken as it is.
    """
    if "^" in value:
        return value
    return f"{value}^^^&{settings.node.assigning_authority}&ISO"


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


@click.group()
@click.version_option(__version__, prog_name="xdsi")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Node configuration (TOML); defaults to $XDSI_CONFIG or none.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv: DEBUG).")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """xdsi: an IHE XDS-I.b exchange node."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("werkzeug").setLevel(max(level, logging.WARNING))
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
    try:
        ctx.obj = {"settings": load_settings(config_path)}
    except ConfigError as exc:
        _fail(str(exc))


@main.group()
def config() -> None:
    """Inspect the node configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as TOML."""
    click.echo(to_toml(_settings(ctx)), nl=False)


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Start every enabled actor on its port and serve until interrupted."""
    settings = _settings(ctx)
    logging.getLogger("xdsi").setLevel(logging.INFO)
    node = Node(settings)
    try:
        effective = node.start()
    except (OSError, ConfigError) as exc:
        _fail(f"cannot start the node: {exc}")
    for actor in ("registry", "repository", "imaging_source"):
        if getattr(effective, actor).enabled:
            click.echo(f"{actor:15} {effective.url(actor)}")
    if effective.registry.enabled:
        click.echo(
            f"{'feed (MLLP)':15} {effective.node.host}:{effective.registry.feed_port}"
        )
    click.echo(f"{'storage':15} {effective.storage}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


@main.command()
@click.argument("patient_id")
@click.option(
    "--trigger",
    type=click.Choice(["A01", "A04", "A05"]),
    default="A01",
    help="ADT event: A01 admit, A04 register, A05 pre-admit (ITI TF-2 3.8).",
)
@click.option("--name", default="", help="PID-5, e.g. 'DOE^JANE'.")
@click.option("--host", default=None, help="Registry MLLP host (default: config).")
@click.option(
    "--port", type=int, default=None, help="Registry MLLP port (default: config)."
)
@click.pass_context
def feed(
    ctx: click.Context,
    patient_id: str,
    trigger: str,
    name: str,
    host: str | None,
    port: int | None,
) -> None:
    """Send an ITI-8 Patient Identity Feed (HL7 v2 ADT over MLLP)."""
    settings = _settings(ctx)
    cx = qualify_patient_id(patient_id, settings)
    message = build_feed(cx, trigger=trigger, name=name)
    try:
        ack = send_message(
            host or settings.node.host, port or settings.registry.feed_port, message
        )
    except (MllpError, OSError) as exc:
        _fail(f"ITI-8 feed failed: {exc}")
    summary = read_ack(ack)
    if summary.code != "AA":
        _fail(
            f"ITI-8 ADT^{trigger}: ACK {summary.code or '?'}: "
            f"{summary.text or 'no reason given'}"
        )
    click.echo(f"ITI-8 ADT^{trigger}: ACK {summary.code}")


@main.command()
@click.argument(
    "study_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--patient-id",
    required=True,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.pass_context
def publish(ctx: click.Context, study_dir: Path, patient_id: str) -> None:
    """Publish the studies in STUDY_DIR: KOS manifest + RAD-68."""
    settings = _settings(ctx)
    cx = qualify_patient_id(patient_id, settings)
    result = scan.scan_directory(study_dir)
    if result.rejected:
        # Each file and its reason were logged as a warning by the scan.
        click.secho(
            f"{_count(len(result.rejected), 'file')} skipped", fg="yellow", err=True
        )
    if not result.studies:
        _fail(f"no DICOM study found in {study_dir}")
    services = build_services(settings)
    failed = False
    for study in result.studies:
        try:
            published = services.imaging_source.publish(study, cx)
        except PublishError as exc:
            click.secho(
                f"study {study.study_instance_uid} not published: {exc}",
                fg="red",
                err=True,
            )
            failed = True
            continue
        click.echo(
            f"published study {published.study_instance_uid}: "
            f"{_count(published.instances, 'instance')}, manifest "
            f"{published.manifest_uid}, SubmissionSet "
            f"{published.submission_set_unique_id}"
        )
    services.engine.dispose()
    if failed:
        sys.exit(1)


@main.command()
@click.argument(
    "files",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--patient-id",
    required=True,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.option(
    "--mime-type", default=None, help="mimeType of every file (default: by name)."
)
@click.option("--title", default=None, help="Title of every DocumentEntry.")
@click.pass_context
def submit(
    ctx: click.Context,
    files: tuple[Path, ...],
    patient_id: str,
    mime_type: str | None,
    title: str | None,
) -> None:
    """Submit FILES as one SubmissionSet (ITI-41, one DocumentEntry each)."""
    settings = _settings(ctx)
    services = build_services(settings)
    source = DocumentSource(
        settings, settings.storage / "spool" / "source", services.auditor
    )
    try:
        submitted = source.submit(
            list(files),
            qualify_patient_id(patient_id, settings),
            mime_type=mime_type,
            title=title,
        )
    except SubmitError as exc:
        for error in exc.errors:
            click.secho(f"{error.code}: {error.message}", fg="red", err=True)
        _fail(str(exc) if not exc.errors else "ITI-41 answered Failure")
    click.echo(f"SubmissionSet {submitted.submission_set_unique_id}")
    for path, unique_id in zip(files, submitted.document_unique_ids, strict=True):
        click.echo(f"{unique_id} {path}")


def _entries_table(entries: list[FoundEntry]) -> Table:
    table = Table(title="DocumentEntries")
    for column in (
        "uniqueId",
        "title",
        "modalities",
        "service start",
        "study",
        "repository",
    ):
        table.add_column(column, overflow="fold")
    for entry in entries:
        table.add_row(
            entry.unique_id,
            entry.title,
            " ".join(entry.modalities),
            entry.service_start_time,
            " ".join(entry.study_instance_uids),
            entry.repository_unique_id,
        )
    return table


@main.command()
@click.option("--patient-id", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def find(ctx: click.Context, patient_id: str, as_json: bool) -> None:
    """Find a patient's documents (ITI-18 FindDocuments)."""
    settings = _settings(ctx)
    consumer = build_services(settings).consumer
    try:
        entries = consumer.find(qualify_patient_id(patient_id, settings))
    except ConsumerError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
    elif not entries:
        click.echo("no DocumentEntries found for this patient")
    else:
        console.print(_entries_table(entries))


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        yield bar


def _fetch(consumer: Consumer, patient_id: str, out: Path) -> FetchResult:
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done)

        return consumer.fetch(patient_id, out, update)


@main.command()
@click.option("--patient-id", required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def fetch(ctx: click.Context, patient_id: str, out: Path) -> None:
    """Retrieve a patient's manifests (ITI-43) and images (RAD-69) into OUT."""
    settings = _settings(ctx)
    consumer = build_services(settings).consumer
    try:
        result = _fetch(consumer, qualify_patient_id(patient_id, settings), out)
    except ConsumerError as exc:
        _fail(str(exc))
    click.echo(
        f"{_count(len(result.manifests), 'manifest')}, "
        f"{_count(len(result.instances), 'instance')}, "
        f"{result.bytes / 1e6:.1f} MB in {out}"
    )
    if result.missing:
        _fail(f"{_count(len(result.missing), 'referenced instance')} not returned")


@main.group("audit")
def audit_group() -> None:
    """Read the local audit spool or the Audit Record Repository."""


def _time_option(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        _fail(f"--{name} {value!r} is not an ISO 8601 date or date-time")
    return None


@audit_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--xml", "as_xml", is_flag=True, help="The AuditMessages as stored.")
@click.option("--patient", help="Only events naming this patient (bare ids qualified).")
@click.option("--since", help="Events at or after this ISO 8601 time (UTC if no zone).")
@click.option("--until", help="Events before this ISO 8601 time.")
@click.option(
    "--arr",
    "from_arr",
    is_flag=True,
    help="Read what the Audit Record Repository (xdsi arr) received.",
)
@click.pass_context
def audit_list(
    ctx: click.Context,
    as_json: bool,
    as_xml: bool,
    patient: str | None,
    since: str | None,
    until: str | None,
    from_arr: bool,
) -> None:
    """List audit events, oldest first: this node's spool, or the ARR's."""
    settings = _settings(ctx)
    patient_id = qualify_patient_id(patient, settings) if patient else None
    start, end = _time_option(since, "since"), _time_option(until, "until")
    if from_arr:
        _list_repository(settings, patient_id, start, end, as_json, as_xml)
        return
    services = build_services(settings)
    records = [
        r
        for r in services.audit_spool.records()
        if (patient_id is None or patient_id in r.patient_ids)
        and (start is None or r.event_time >= start)
        and (end is None or r.event_time < end)
    ]
    if as_xml:
        for record in records:
            click.echo(record.xml.decode("utf-8", "replace"))
        return
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "time": r.event_time.isoformat(),
                        "event": r.event_id.display if r.event_id else None,
                        "transaction": r.event_type,
                        "outcome": r.outcome,
                        "valid": r.valid,
                        "participants": list(r.actor_user_ids),
                        "patients": list(r.patient_ids),
                        "objects": list(r.object_ids),
                        "file": str(r.path),
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return
    console.print(_audit_table(records))


def _list_repository(
    settings: Settings,
    patient_id: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
    as_xml: bool,
) -> None:
    engine = make_engine(settings.database_url)
    try:
        records = AuditRecordStore(engine).query(
            patient_id=patient_id, since=since, until=until, limit=1_000_000
        )
    finally:
        engine.dispose()
    if as_xml:
        for record in records:
            click.echo((record.xml or record.raw).decode("utf-8", "replace"))
        return
    if as_json:
        click.echo(json.dumps([r.as_json() for r in records], indent=2))
        return
    table = Table(title="Audit Record Repository (ITI TF-2 3.20)")
    for column in ("time (UTC)", "from", "event", "type", "outcome", "source"):
        table.add_column(column, overflow="fold")
    for record in records:
        when = record.event_time or record.received_at
        table.add_row(
            when.strftime("%Y-%m-%d %H:%M:%S"),
            f"{record.transport} {record.peer}",
            record.event_id or "?",
            record.event_type or "?",
            str(record.outcome) if record.valid else f"malformed: {record.error}",
            record.audit_source_id or "?",
        )
    console.print(table)


def _arr_tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context that demands a certificate from ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@main.command("arr")
@click.option("--tls-port", type=int, help="Syslog over TLS (RFC 5425).")
@click.option("--udp-port", type=int, help="Syslog over UDP (RFC 5426).")
@click.option("--http-port", type=int, help="The JSON query endpoint, GET /audit.")
@click.option("--cert", type=click.Path(exists=True, path_type=Path))
@click.option("--key", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--ca",
    type=click.Path(exists=True, path_type=Path),
    help="Certificates of the nodes allowed to send (mutual TLS, ITI TF-2 3.19).",
)
@click.pass_context
def arr(
    ctx: click.Context,
    tls_port: int | None,
    udp_port: int | None,
    http_port: int | None,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
) -> None:
    """Run an Audit Record Repository until interrupted.

    Receives syslog audit messages over UDP, and over TLS when --cert, --key
    and --ca are given; stores them in the node's database.
    """
    settings = _settings(ctx)
    logging.getLogger("xdsi").setLevel(logging.INFO)
    tls = (cert, key, ca)
    if any(tls) and not all(tls):
        _fail("TLS needs --cert, --key and --ca together")
    context = None
    if cert is not None and key is not None and ca is not None:
        context = _arr_tls_context(cert, key, ca)
    engine = make_engine(settings.database_url)
    store = AuditRecordStore(engine)
    spool = AuditSpool(settings.storage / "audit")
    auditor = Auditor(spool, audit_source_id=settings.node.audit_source_id)
    try:
        repository = AuditRepository(
            store,
            host=settings.node.host,
            tls_port=(tls_port or settings.audit.arr_tls_port) if context else None,
            udp_port=udp_port if udp_port is not None else settings.audit.arr_udp_port,
            tls_context=context,
            auditor=auditor,
            node_id=settings.node.audit_source_id,
        )
        web = make_server(
            settings.node.host,
            http_port if http_port is not None else settings.audit.arr_http_port,
            query_app(store),
            threaded=True,
        )
    except OSError as exc:
        engine.dispose()
        _fail(f"cannot start the Audit Record Repository: {exc}")
    repository.start()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    click.echo(f"{'syslog tls':15} {repository.tls_port or 'off'}")
    click.echo(f"{'syslog udp':15} {repository.udp_port}")
    click.echo(f"{'query':15} http://{settings.node.host}:{web.server_port}/audit")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        web.shutdown()
        repository.stop()
        engine.dispose()


def _audit_table(records: list) -> Table:  # type: ignore[type-arg]
    table = Table(title="Audit trail (ATNA, DICOM PS3.15 A.5)")
    for column in ("time (UTC)", "transaction", "event", "outcome", "participants"):
        table.add_column(column, overflow="fold")
    for record in records:
        # The WS-Addressing anonymous address names a requestor that gave no
        # reply endpoint; it reads better as such.
        participants = [
            "(requestor)" if user_id == ns.WSA_ANONYMOUS else user_id
            for user_id in record.actor_user_ids
        ]
        table.add_row(
            record.event_time.strftime("%Y-%m-%d %H:%M:%S"),
            record.event_type or "?",
            record.event_id.display if record.event_id else "?",
            str(record.outcome) if record.valid else "corrupt",
            " → ".join(participants),
        )
    return table


def bundled_study() -> Path:
    """Return the CT study shipped with xdsi (xdsi/data/study-ct)."""
    return Path(str(resources.files("xdsi") / "data" / "study-ct"))


@main.command()
@click.option(
    "--study",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Study folder (default: the bundled CT study).",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the node's storage and the fetched files here.",
)
@click.pass_context
def demo(ctx: click.Context, study: Path | None, keep: Path | None) -> None:
    """Run the whole XDS-I.b chain on loopback and check every image."""
    workdir = keep or Path(tempfile.mkdtemp(prefix="xdsi-demo-"))
    try:
        ok = _demo(_settings(ctx), study or bundled_study(), workdir)
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if ok else 1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _demo(base: Settings, study_dir: Path, workdir: Path) -> bool:
    settings = base.with_storage(workdir / "node").with_ports(
        registry=0, repository=0, imaging_source=0, feed=0
    )
    timings: dict[str, float] = {}
    console.rule("[bold]xdsi demo: the XDS-I.b chain on loopback")

    with Node(settings) as node:
        settings = node.settings
        services = node.services
        assert services is not None
        for actor in ("registry", "repository", "imaging_source"):
            console.print(f"  {actor:15} {settings.url(actor)}")
        console.print(
            f"  {'feed (MLLP)':15} {settings.node.host}:{settings.registry.feed_port}"
        )

        started = time.monotonic()
        patient_id = qualify_patient_id("XDSI-DEMO-1", settings)
        ack = send_message(
            settings.node.host,
            settings.registry.feed_port,
            build_feed(patient_id, name="PHANTOM^HEAD"),
        )
        timings["ITI-8 feed"] = time.monotonic() - started
        code = read_ack(ack).code
        console.print(f"[green]✓[/] ITI-8 Patient Identity Feed: ACK {code}")
        if code != "AA":
            return False

        started = time.monotonic()
        result = scan.scan_directory(study_dir)
        if len(result.studies) != 1:
            err_console.print(
                f"expected one study in {study_dir}, found {len(result.studies)}"
            )
            return False
        study = result.studies[0]
        originals = {h.sop_instance_uid: _sha256(h.path) for h in study.instances}
        with console.status("publishing: KOS manifest + RAD-68 …"):
            published = services.imaging_source.publish(study, patient_id)
        timings["publish (scan, KOS, RAD-68)"] = time.monotonic() - started
        console.print(
            f"[green]✓[/] RAD-68 published study {study.study_instance_uid}"
            f": {published.instances} instances in {len(study.series)} "
            f"series, {published.bytes / 1e6:.1f} MB, manifest "
            f"{published.manifest_uid}"
        )

        started = time.monotonic()
        entries = services.consumer.find(patient_id)
        timings["ITI-18 find"] = time.monotonic() - started
        found = _count(len(entries), "DocumentEntry")
        console.print(f"[green]✓[/] ITI-18 FindDocuments: {found}")
        console.print(_entries_table(entries))

        started = time.monotonic()
        out = workdir / "fetched"
        fetched = _fetch(services.consumer, patient_id, out)
        timings["fetch (ITI-43 + RAD-69)"] = time.monotonic() - started
        console.print(
            f"[green]✓[/] ITI-43 retrieved {len(fetched.manifests)} "
            f"manifest, RAD-69 retrieved {len(fetched.instances)} instances"
            f" ({fetched.bytes / 1e6:.1f} MB)"
        )

        started = time.monotonic()
        got = {p.stem: _sha256(p) for p in fetched.instances}
        mismatched = [
            uid for uid, digest in originals.items() if got.get(uid) != digest
        ]
        timings["SHA-256 check"] = time.monotonic() - started

    console.print(_audit_table(list(services.audit_spool.records())))
    summary = Table(title="Summary")
    summary.add_column("step")
    summary.add_column("seconds", justify="right")
    for step, seconds in timings.items():
        summary.add_row(step, f"{seconds:.2f}")
    console.print(summary)
    total_mb = sum(h.size for h in study.instances) / 1e6
    if mismatched or fetched.missing:
        err_console.print(
            f"[bold red]✗ {len(mismatched)} of {len(originals)} "
            "instances differ from what was published or are missing"
        )
        return False
    console.print(
        f"[bold green]✓ byte-identical:[/] all {len(originals)} instances "
        f"({total_mb:.1f} MB) match the published files (SHA-256)"
    )
    return True


main.add_command(conformance)

"""The command line: ``xdsi serve | feed | publish | import | remove | verify | submit |
find | fetch | audit | arr | tls | demo``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import NoReturn
from xml.sax.saxutils import escape as xml_escape

import click
import sqlalchemy.exc
from lxml import etree
from pydicom.uid import UID
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from xdsi import __version__, audit, logs, ns, tls
from xdsi.actors.consumer import Consumer, ConsumerError, FetchResult, FoundEntry
from xdsi.actors.document_source import DocumentSource
from xdsi.actors.identity_source import send_feed
from xdsi.actors.imaging_source import PublishError
from xdsi.actors.intake import (
    REMOVE_COMMAND,
    Accepted,
    ImportInterrupted,
    ImportResult,
    NotAudited,
)
from xdsi.actors.provide import SubmitError, describe_errors
from xdsi.app import (
    Node,
    Services,
    audit_forwarder,
    build_services,
    make_storage,
    node_auditor,
    node_consumer,
)
from xdsi.audit import Auditor, AuditSpool
from xdsi.audit import repository as audit_repository
from xdsi.audit.messages import audit_event_rules
from xdsi.audit.repository import (
    AuditRecordStore,
    AuditRepository,
    CannotBind,
    OwnRecords,
    QueryServer,
    StoredAudit,
    parse_time,
)
from xdsi.config import (
    ConfigError,
    Settings,
    TlsSettings,
    hide_password,
    load_settings,
    to_toml,
)
from xdsi.conformance.cli import conformance
from xdsi.dicom import kos, scan
from xdsi.dicom.store_scu import Destination, SendResult, StoreScuError, send_files
from xdsi.errors import UnknownPatientId, error_code
from xdsi.hl7.adt import TRIGGER_EVENTS
from xdsi.hl7.mllp import MllpError
from xdsi.logs import guard_peer_text, quiet_pydicom
from xdsi.metadata.responses import RegistryError
from xdsi.metadata.validation import patient_id_problem
from xdsi.store.blobs import open_spool
from xdsi.store.schema import make_engine
from xdsi.store.verify import Damage, count_copies, verify_store
from xdsi.wire.xml import parse_xml, xml_text

console = Console()
err_console = Console(stderr=True)
# Columns a table printed to a pipe or file may take.
WIDE_OUTPUT = 400


def _print_table(table: Table) -> None:
    """Print a table on :func:`_table_console`."""
    _table_console().print(table)


def _table_console() -> Console:
    """Where tables go: piped or redirected, each row on one line, its UIDs
    whole, as grep and copying want them; a terminal folds to its width."""
    return console if console.is_terminal else Console(width=WIDE_OUTPUT)


def qualify_patient_id(value: str, settings: Settings) -> str:
    """Qualify a bare id with the affinity domain (ITI TF-3 4.2.3.2.16).

    ``ID`` becomes ``ID^^^&OID&ISO`` with the configured assigning
    authority; a value that already carries ``^`` is taken as it is.
    """
    if "^" in value:
        return value
    return f"{value}^^^&{settings.node.assigning_authority}&ISO"


def _patient_id_param(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    """A patient id as the command line takes it, qualified (see
    :func:`qualify_patient_id`) and checked as the Document Registry checks
    a patientId (ITI TF-3 4.2.3.2.16), before any work: one no registry
    could take is a wrong argument. Blanks around a bare id are no part of
    it, as an ITI-8 feed's PID-3 and a DICOM Patient ID are read."""
    if value is None:
        return None
    given = value if "^" in value else value.strip(" ")
    if not given:
        raise click.BadParameter("a patient id cannot be empty")
    cx = qualify_patient_id(given, ctx.obj["settings"])
    problem = patient_id_problem(cx)
    if problem is not None:
        as_cx = "it" if cx == given else f"qualified as {cx!r}, it"
        raise click.BadParameter(
            f"{given!r} is not usable as an XDS patientId: {as_cx} {problem}"
        )
    return cx


# HL7 Table 0001 Administrative Sex (PID-8): female, male, other, unknown,
# ambiguous, not applicable.
ADMINISTRATIVE_SEX = frozenset({"F", "M", "O", "U", "A", "N"})

# The date part of an HL7 TS (PID-7) by its length: YYYY, YYYYMM, YYYYMMDD.
_TS_DATE_FORMATS = {4: "%Y", 6: "%Y%m", 8: "%Y%m%d"}


def _birth_date_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """PID-7 Date of Birth as a date YYYY[MM[DD]] (the date part of an HL7
    v2.3.1 TS), a calendar date; anything else is a wrong argument, before
    any work."""
    if not value:
        return value
    layout = _TS_DATE_FORMATS.get(len(value))
    try:
        if layout is None or not value.isascii() or not value.isdigit():
            raise ValueError
        datetime.strptime(value, layout)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is no date YYYYMMDD (the date of an HL7 TS)"
        ) from None
    return value


def _sex_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """PID-8 Administrative Sex, a code of HL7 Table 0001, in either case."""
    value = value.upper()
    if value and value not in ADMINISTRATIVE_SEX:
        raise click.BadParameter(
            f"{value!r} is no code of HL7 Table 0001: "
            f"{', '.join(sorted(ADMINISTRATIVE_SEX))}"
        )
    return value


def _uid_param(
    ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...] | None
) -> str | tuple[str, ...] | None:
    """A UID argument (DICOM PS3.5 9.1), or several; anything else is a
    wrong argument, before any work."""
    for uid in (value,) if isinstance(value, str) else value or ():
        if not UID(uid).is_valid:
            raise click.BadParameter(f"{logs.shown(uid, 80)!r} is no UID")
    return value


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


def _wait_for_stop() -> None:
    """Block until SIGTERM, Ctrl-C or a hang-up (SIGHUP: the terminal
    closed), each a clean stop: SIGHUP's default would end the process at
    once, nothing audited. A hang-up ignored (nohup) stays ignored."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def hang_up(*_: object) -> None:
        logging.getLogger("xdsi").info("hang-up (SIGHUP): the node stops as on SIGTERM")
        stop.set()

    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, hang_up)
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass


# RFC 6838 4.2: type "/" subtype, each a restricted name.
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def _media_type(value: str | None) -> str | None:
    """A --mime-type as given, when it is a media type (RFC 6838 4.2)."""
    if value is not None and not _MEDIA_TYPE.fullmatch(value):
        raise click.BadParameter(
            f"{value!r} is no media type: type/subtype, as text/plain (RFC 6838)"
        )
    return value


def _services(settings: Settings) -> Services:
    """The node's actors over its storage; a storage that cannot be used
    (its directory under a file, no permission) ends the command with why,
    not a traceback."""
    _check_tls(settings)
    try:
        return build_services(settings)
    except OSError as exc:
        _storage_failed(settings, exc)
        raise  # unreachable: _fail exits


def _client_side(settings: Settings) -> tuple[Auditor, Consumer]:
    """What a client command (find, fetch, submit) acts with: the node's
    Auditor and its Consumer, over the storage's spools alone. The node's
    database is not opened: those commands read nothing of it, so that a
    workstation needs no access to it (nor its password)."""
    _check_tls(settings)
    try:
        make_storage(settings)
        auditor = node_auditor(settings)
        return auditor, node_consumer(settings, auditor)
    except OSError as exc:
        _storage_failed(settings, exc)
        raise  # unreachable: _fail exits


def _check_tls(settings: Settings) -> None:
    """Read the [tls] files now, so that one missing or unusable ends the
    command before anything is made or sent."""
    try:
        tls.client_context_for(settings)
    except tls.TlsConfigError as exc:
        _fail(str(exc))


def _storage_failed(settings: Settings, exc: OSError) -> None:
    _fail(
        f"cannot use the storage {settings.storage}: "
        f"{exc.strerror or exc} ({exc.filename or settings.storage})"
    )


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _not_found(message: str) -> NoReturn:
    """End find or fetch with EXIT_NOT_FOUND: the query went through and
    found nothing for the patient."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(EXIT_NOT_FOUND)


def _unknown_patient(errors: Iterable[RegistryError]) -> bool:
    """Whether a registry refused with XDSUnknownPatientId (ITI TF-3 Table
    4.2.4.1-2): it has had no ITI-8 for the patient."""
    unknown = error_code(UnknownPatientId, "registry")
    return any(error.code == unknown for error in errors)


def _given(key: str) -> object:
    """What the running command was started with (see main), None outside
    one."""
    context = click.get_current_context(silent=True)
    return context.obj.get(key) if context and context.obj else None


def _as_given(command: str) -> str:
    """``xdsi COMMAND`` with the ``--config`` this command was given, to be
    pasted as it is: without it, the command would use another node's
    configuration, or none."""
    config_path = _given("config_path")
    if config_path is None:
        return f"xdsi {command}"
    return f"xdsi --config {shlex.quote(str(config_path))} {command}"


def _as_told(reason: str) -> str:
    """An intake refusal's reason with the command it names given this
    command's ``--config``, as :func:`_as_given` writes it."""
    return reason.replace(REMOVE_COMMAND, _as_given("remove"))


def _feed_hint(patient_id: str | None) -> str:
    """What to do about a patient the registry does not know."""
    feed = "feed"
    if patient_id:
        feed += " " + shlex.quote(patient_id.split("^")[0])
    return f"; feed the patient first ({_as_given(feed)}), then run this again"


def _fail_query(exc: ConsumerError, settings: Settings) -> None:
    """End find or fetch whose ITI-18 or retrieve failed; a registry that
    refuses the query with XDSUnknownPatientId has found nothing for the
    patient: EXIT_NOT_FOUND, as an empty answer."""
    if _unknown_patient(exc.errors):
        _not_found(f"the Document Registry does not know this patient: {exc}")
    _fail(_unreachable_hint(str(exc), settings))


_PLURALS = {"study": "studies", "series": "series", "stored copy": "stored copies"}


def _own_endpoints(settings: Settings) -> list[str]:
    """The URLs and MLLP address this node serves (its actors enabled)."""
    own = [
        settings.url(actor)
        for actor in ("registry", "repository", "imaging_source")
        if getattr(settings, actor).enabled
    ]
    if settings.registry.enabled:
        own.append(f"{settings.node.public_host}:{settings.registry.feed_port}")
    return own


def _unreachable_hint(message: str, settings: Settings | None = None) -> str:
    """Add what to look at when a peer could not be reached at all: this
    node, when the address is one it serves (or ``settings`` are not
    given), else the other node the configuration names."""
    if "XDSRegistryNotAvailable" in message:
        # The repository answered: the registry it registers with is the
        # one down (ITI TF-3 Table 4.2.4.1-2), not the node the command asked.
        return (
            f"{message}\nThe Document Repository answered; the Document "
            "Registry it registers with ([repository] registry_url) could not "
            "be reached. A serving node publishes again by itself."
        )
    if "cannot connect" in message:
        if settings is not None and not any(
            endpoint in message for endpoint in _own_endpoints(settings)
        ):
            return (
                f"{message}\nThis node does not serve that address: is the "
                "other node there up, and is its address in this configuration "
                "right?"
            )
        if _given("configured"):
            # The configuration was given; the node it names may not serve.
            return (
                f"{message}\nIs the node serving? Start it with this "
                f"configuration ({_as_given('serve')})."
            )
        return (
            f"{message}\nIs the node serving? Client commands need the served "
            "node's configuration (xdsi --config FILE ...)."
        )
    return message


def _count(number: int, noun: str) -> str:
    return f"{number} {noun if number == 1 else _PLURALS.get(noun, noun + 's')}"


def _size(number: int) -> str:
    """A byte count in the unit that shows it: a radiograph of 47 kB is not
    "0.0 MB", which reads as nothing retrieved."""
    if number >= 1_000_000:
        return f"{number / 1e6:.1f} MB"
    if number >= 1_000:
        return f"{number / 1e3:.0f} kB"
    return _count(number, "byte")


# ctx.meta key of the arguments given after the command's name.
COMMAND_ARGS = "xdsi.command_args"


class _Commands(click.Group):
    """The xdsi commands; a database that cannot be used ends any of them
    with one line saying which and why, not a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        # The command's own arguments, which the group hands on before its
        # callback runs; kept so that the callback can tell a misplaced
        # --config.
        ctx.meta[COMMAND_ARGS] = list(ctx.args)
        try:
            return super().invoke(ctx)
        except sqlalchemy.exc.DBAPIError as exc:
            settings = (ctx.obj or {}).get("settings")
            where = f" at {hide_password(settings.database_url)}" if settings else ""
            # The driver's own first line: "connection refused", "file is
            # not a database"; the SQL and parameters stay out.
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else ""
            _fail(
                f"the database{where} cannot be used: {logs.shown(reason, 200)}"
                f"{_database_hint(reason)}"
            )
            raise  # unreachable: _fail exits


def _database_hint(reason: str) -> str:
    """What to look at for a PostgreSQL server's refusal the driver gave as
    ``reason``; empty when nothing more is to be said."""
    if "password authentication failed" in reason or "no password supplied" in (reason):
        return (
            "; give the user's password in [node] database_url or in "
            "$PGPASSWORD (libpq)"
        )
    if "Connection refused" in reason:
        return "; is the database server up, and on that host and port?"
    return ""


@click.group(cls=_Commands)
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
    quiet_pydicom(level)
    guard_peer_text()
    try:
        ctx.obj = {
            "settings": load_settings(config_path),
            # As given, for the commands a hint names ($XDSI_CONFIG holds).
            "config_path": config_path,
            # A file was named (--config or $XDSI_CONFIG), not the defaults.
            "configured": config_path is not None
            or bool(os.environ.get("XDSI_CONFIG")),
        }
    except ConfigError as exc:
        _fail(str(exc))
    storage = ctx.obj["settings"].storage
    # A command's --help touches no storage, so it is shown anywhere.
    asks_help = any(
        arg in ctx.help_option_names for arg in ctx.meta.get(COMMAND_ARGS, [])
    )
    if (
        ctx.invoked_subcommand in CLIENT_COMMANDS | STORAGE_COMMANDS
        and not ctx.obj["configured"]
        and not storage.exists()
        and not asks_help
    ):
        # A client command's audit trail (its patient named) would start a
        # storage of its own in whatever folder it runs in; a command that
        # reads a node's storage would read a new, empty one and find all
        # well (a `verify` run by cron from another folder).
        given = ctx.meta.get(COMMAND_ARGS, [])
        if any(arg == "--config" or arg.startswith("--config=") for arg in given):
            raise click.UsageError(
                "--config goes before the command: xdsi --config FILE "
                f"{ctx.invoked_subcommand} ..."
            )
        raise click.UsageError(
            f"no configuration named and no node storage here ({storage}): give "
            "the served node's configuration (xdsi --config FILE ...), or run "
            f"this in the folder {_server_of(ctx.invoked_subcommand, given)} runs in"
        )
    if ctx.invoked_subcommand in AUDITED_COMMANDS and ctx.obj["settings"].audit.targets:
        settings = ctx.obj["settings"]
        ctx.call_on_close(lambda: _deliver_audit(settings))


# The commands that ask a serving node (or peers) and keep nothing but their
# audit events: with no configuration they use the storage of a node served
# with the defaults from the same folder.
CLIENT_COMMANDS = {"feed", "find", "fetch", "submit"}
# The commands that read or change what a node's storage holds: with no
# configuration they act on the storage of a node served with the defaults
# from the same folder, and start none.
STORAGE_COMMANDS = {"verify", "remove", "audit"}
# The commands that write audit events (ITI TF-2 3.20) to the spool.
AUDITED_COMMANDS = {"feed", "find", "fetch", "submit", "publish", "import", "remove"}
# How long a command waits at its end for its audit events to go out.
AUDIT_DELIVERY_SECONDS = 10.0


def _server_of(command: str | None, given: list[str]) -> str:
    """The command whose storage ``command`` uses: `audit list --arr` reads
    what `xdsi arr` stored, every other command a served node's storage."""
    return "xdsi arr" if command == "audit" and "--arr" in given else "xdsi serve"


def _deliver_audit(settings: Settings) -> None:
    """Send the audit events the command wrote to the [audit] targets, as a
    serving node would (ITI-20); what cannot go now waits in the spool, for
    the next command or a node serving this storage, and the user is told."""
    spool = AuditSpool(settings.storage / "audit")
    try:
        forwarder = audit_forwarder(settings, spool)
        backlog = forwarder.deliver_pending(AUDIT_DELIVERY_SECONDS)
    except (OSError, ValueError, ConfigError) as exc:
        click.secho(f"warning: audit events not sent: {exc}", fg="yellow", err=True)
        return
    waiting = {url: n for url, n in (backlog or {}).items() if n}
    for url, count in waiting.items():
        wait, they_go = ("waits", "it goes") if count == 1 else ("wait", "they go")
        click.secho(
            f"warning: {_count(count, 'audit event')} {wait} in "
            f"{spool.directory} for {url}; {they_go} with the next command, or "
            "a node serving this storage, that has it among its [audit] targets",
            fg="yellow",
            err=True,
        )


@main.group()
def config() -> None:
    """Inspect the node configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration as TOML."""
    click.echo(to_toml(_settings(ctx)), nl=False)


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="HTTP worker processes (default: [node] workers).",
)
@click.pass_context
def serve(ctx: click.Context, workers: int | None) -> None:
    """Start every enabled actor on its port and serve until interrupted."""
    settings = _settings(ctx)
    if workers is not None:
        settings = replace(settings, node=replace(settings.node, workers=workers))
    logging.getLogger("xdsi").setLevel(logging.INFO)
    node = Node(settings)
    try:
        effective = node.start()
    except (OSError, ConfigError) as exc:
        _fail(f"cannot start the node: {exc}")
    for actor in ("registry", "repository", "imaging_source"):
        if getattr(effective, actor).enabled:
            click.echo(f"{actor:15} {effective.url(actor)}")
    if effective.imaging_source.enabled:
        for name, where in effective.imaging_endpoints():
            click.echo(f"{name:15} {where}")
    if effective.registry.enabled:
        click.echo(
            f"{'feed (MLLP)':15} "
            f"{effective.node.public_host}:{effective.registry.feed_port}"
        )
    click.echo(f"{'storage':15} {effective.storage}")
    try:
        _wait_for_stop()
    finally:
        node.stop()


@main.command()
@click.argument("patient_id", callback=_patient_id_param)
@click.option(
    "--trigger",
    type=click.Choice(sorted(TRIGGER_EVENTS)),
    default=None,
    help="ADT event: A01 admit, A04 register, A05 pre-admit, A08 update, "
    "A40 merge (ITI TF-2 3.8). Default A01, or A40 with --merge.",
)
@click.option(
    "--merge",
    "subsumed",
    default=None,
    metavar="SUBSUMED_ID",
    callback=_patient_id_param,
    help="A40: the patient id (MRG-1) merged into PATIENT_ID, which survives.",
)
@click.option("--name", default="", help="PID-5, e.g. 'DOE^JANE'.")
@click.option(
    "--birth-date", default="", callback=_birth_date_param, help="PID-7, YYYYMMDD."
)
@click.option(
    "--sex",
    default="",
    callback=_sex_param,
    help="PID-8 (HL7 Table 0001), e.g. F, M, U.",
)
@click.option("--host", default=None, help="Registry MLLP host (default: config).")
@click.option(
    "--port", type=int, default=None, help="Registry MLLP port (default: config)."
)
@click.pass_context
def feed(
    ctx: click.Context,
    patient_id: str,
    trigger: str | None,
    subsumed: str | None,
    name: str,
    birth_date: str,
    sex: str,
    host: str | None,
    port: int | None,
) -> None:
    """Send an ITI-8 Patient Identity Feed (HL7 v2 ADT over MLLP)."""
    settings = _settings(ctx)
    trigger = trigger or ("A40" if subsumed else "A01")
    if (trigger == "A40") != bool(subsumed):
        raise click.UsageError(
            "ITI-8 A40 merges: give --merge SUBSUMED_ID with A40, and only then"
        )
    try:
        summary = send_feed(
            settings,
            node_auditor(settings),
            patient_id,
            trigger=trigger,
            subsumed_patient_id=subsumed or "",
            name=name,
            birth_date=birth_date,
            sex=sex,
            host=host,
            port=port,
        )
    except (MllpError, OSError, ConfigError) as exc:
        message = f"ITI-8 feed failed: {exc}"
        if isinstance(exc.__cause__ or exc, ConnectionRefusedError):
            message = _unreachable_hint(f"{message} (cannot connect)", settings)
        _fail(message)
    if summary.code != "AA":
        hint = ""
        if "no PID-3 identifier has assigning authority" in (summary.text or ""):
            # HL7 v2.5 Table 0357 204: the domain is not the registry's.
            hint = (
                " (an xdsi registry takes the domains of its [node] "
                "assigning_authority and other_assigning_authorities)"
            )
        _fail(
            f"ITI-8 ADT^{trigger}: ACK {summary.code or '?'}: "
            f"{summary.text or 'no reason given'}{hint}"
        )
    click.echo(f"ITI-8 ADT^{trigger}: ACK {summary.code}")


@main.command()
@click.argument(
    "study_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--patient-id",
    required=True,
    callback=_patient_id_param,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.option(
    "--headers-only",
    is_flag=True,
    help="Read each file's header only, not its whole data set: faster, for "
    "files from a trusted archive. By default every file gets the checks of "
    "DICOM intake and a file that fails them is skipped.",
)
@click.pass_context
def publish(
    ctx: click.Context, study_dir: Path, patient_id: str, headers_only: bool
) -> None:
    """Publish the studies in STUDY_DIR: KOS manifest + RAD-68."""
    settings = _settings(ctx)
    if not headers_only:
        # Each file is copied into the store and the copy checked whole, as
        # intake does, so that what is shared is what was checked.
        services = _services(settings)
        taken = _take_in(services, study_dir, patient_id)
        _publish_now(services, sorted({a.study_instance_uid for a in taken.accepted}))
        services.engine.dispose()
        _exit_if_refused(_refusals(taken))
        return
    with _said_here(scan.logger):
        result = scan.scan_directory(study_dir)
    broken = [(p, why) for p, why in result.rejected if why != scan.NOT_DICOM]
    _say_skipped(broken, len(result.rejected) - len(broken))
    if not result.studies:
        _fail(f"no DICOM study found in {study_dir}")
    services = _services(settings)
    failed = False

    # Every study is kept first, what came in said as intake says it, then
    # published; a study published already is not kept again.
    kept: list[tuple[scan.Study, float, str | None]] = []
    accepted: list[Accepted] = []
    for study in result.studies:
        reason = services.intake.other_patient(study.study_instance_uid, patient_id)
        if reason is not None:
            # As intake refuses it (ITI TF-3 4.2.2.2.3).
            click.secho(f"not published: {_as_told(reason)}", fg="red", err=True)
            failed = True
            continue
        since = time.time()
        manifest = _published_already(services, study)
        if manifest is None:
            try:
                # Kept and recorded as imported (DICOM PS3.15 A.5.3.5) first.
                accepted += services.intake.keep_read(study, patient_id, study_dir)
            except (PublishError, NotAudited) as exc:
                click.secho(
                    f"study {study.study_instance_uid} not taken in: {exc}",
                    fg="red",
                    err=True,
                )
                failed = True
                continue
        kept.append((study, since, manifest))
    held = sum(len(study.instances) for study, _, manifest in kept if manifest)
    _say_taken_in(
        sum(1 for a in accepted if not a.duplicate),
        sum(1 for a in accepted if a.duplicate) + held,
        len(kept),
    )

    for study, since, manifest in kept:
        if manifest is not None:
            click.echo(
                f"study {study.study_instance_uid} published already: manifest "
                f"{manifest}"
            )
            continue
        try:
            published = services.imaging_source.publish(study, patient_id)
        except PublishError as exc:
            # Held now: a serving node publishes it by itself, as the next
            # import or publish does.
            services.intake.publish_read_failed(study.study_instance_uid, since, exc)
            click.secho(
                _unreachable_hint(
                    f"study {study.study_instance_uid} not published: {exc}", settings
                ),
                fg="red",
                err=True,
            )
            failed = True
            continue
        services.intake.note_published(study.study_instance_uid, patient_id, since)
        click.echo(
            f"published study {published.study_instance_uid}: "
            f"{_count(published.instances, 'instance')}, manifest "
            f"{published.manifest_uid}, SubmissionSet "
            f"{published.submission_set_unique_id}"
        )
    services.engine.dispose()
    if failed:
        sys.exit(1)
    _exit_if_refused([why for _, why in broken])


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
    callback=_patient_id_param,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.option(
    "--mime-type",
    default=None,
    callback=lambda ctx, param, value: _media_type(value),
    help="mimeType of every file (default: by name).",
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
    auditor, _ = _client_side(settings)
    spool = open_spool(settings.storage / "spool" / "source", "source")
    source = DocumentSource(settings, spool, auditor)
    try:
        submitted = source.submit(
            list(files),
            patient_id,
            mime_type=mime_type,
            title=title,
        )
    except SubmitError as exc:
        # A peer's codes and texts, escaped and cut (logs.shown).
        for error in exc.errors:
            click.secho(describe_errors([error]), fg="red", err=True)
        if not exc.errors:
            _fail(_unreachable_hint(str(exc), settings))
        hint = _feed_hint(patient_id) if _unknown_patient(exc.errors) else ""
        _fail(f"ITI-41 answered Failure{hint}")
    click.echo(f"SubmissionSet {submitted.submission_set_unique_id}")
    for path, unique_id in zip(files, submitted.document_unique_ids, strict=True):
        click.echo(f"{unique_id} {path}")


def _entries_table(entries: list[FoundEntry]) -> Table:
    table = Table(title="DocumentEntries")
    for column in (
        "uniqueId",
        "title",
        "modalities",
        # ITI TF-3 4.2.3.1.7: serviceStartTime is in UTC.
        "service start (UTC)",
        "study",
        "repository",
    ):
        table.add_column(column, overflow="fold")
    for entry in entries:
        # The registry's values, as plain text (see _plain).
        table.add_row(
            *_plain(
                entry.unique_id,
                entry.title,
                " ".join(entry.modalities),
                entry.service_start_time,
                " ".join(entry.study_instance_uids),
                entry.repository_unique_id,
            )
        )
    return table


@main.command()
@click.option(
    "--patient-id",
    required=True,
    callback=_patient_id_param,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def find(ctx: click.Context, patient_id: str, as_json: bool) -> None:
    """Find a patient's documents (ITI-18 FindDocuments).

    Exits 4 when the registry finds no DocumentEntry for the patient (one it
    does not know finds none), 1 when the query fails.
    """
    settings = _settings(ctx)
    _, consumer = _client_side(settings)
    try:
        entries = consumer.find(patient_id)
    except ConsumerError as exc:
        if as_json and _unknown_patient(exc.errors):
            # The same empty list as an answer that finds nothing.
            click.echo(json.dumps([], indent=2))
        _fail_query(exc, settings)
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2))
    if not entries:
        _not_found(
            "no DocumentEntries found for this patient (Approved ones: a "
            "withdrawn or replaced manifest is Deprecated); is the patient id "
            "the one fed (ITI-8) and published under?"
        )
    if not as_json:
        _print_table(_entries_table(entries))


@contextmanager
def _progress() -> Iterator[Progress]:
    """A progress bar on stderr, shown on a terminal only: elsewhere (cron, a
    pipe, a log file) rich would still end its transient bar with a blank
    line on stderr, which a scrub run from cron mails as if something had
    gone wrong."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
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
@click.option(
    "--patient-id",
    required=True,
    callback=_patient_id_param,
    help="Affinity-domain patient id: ID or ID^^^&OID&ISO.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--to-pacs",
    "to_pacs",
    default=None,
    metavar="AE@HOST:PORT",
    help="Then send every retrieved instance there by C-STORE.",
)
@click.option(
    "--pacs-tls",
    is_flag=True,
    help="C-STORE over TLS (DICOM PS3.15 B.1) with the node's [tls] certificate "
    "and trusted CAs.",
)
@click.pass_context
def fetch(
    ctx: click.Context,
    patient_id: str,
    out: Path,
    to_pacs: str | None,
    pacs_tls: bool,
) -> None:
    """Retrieve a patient's manifests (ITI-43) and images (RAD-69) into OUT.

    Exits 4 when the registry finds no imaging manifest for the patient (one
    it does not know finds none) and nothing is written, 1 when a query or a
    retrieve fails.
    """
    settings = _settings(ctx)
    destination = None
    if to_pacs is not None:
        try:
            destination = Destination.parse(to_pacs)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--to-pacs") from exc
    if pacs_tls and (destination is None or not settings.tls.enabled):
        raise click.BadParameter(
            "needs --to-pacs and a configuration with [tls] enabled (the "
            "certificate presented to the PACS and the CAs trusted in it)",
            param_hint="--pacs-tls",
        )
    unwritable = _unwritable_folder(out)
    if unwritable is not None:
        # Said before any query goes out.
        raise click.BadParameter(unwritable, param_hint="--out")
    # Before the folder is made: a node that cannot be used makes none.
    _, consumer = _client_side(settings)
    made = not out.exists()
    if made:
        # Patient images: a folder made here is the user's alone; it goes
        # again when nothing is written in it.
        try:
            out.mkdir(parents=True, mode=FETCHED_MODE)
        except OSError as exc:
            # A file system access(2) took for writable: /proc, /sys.
            raise click.BadParameter(
                f"{out} cannot be made: {exc.strerror or exc}", param_hint="--out"
            ) from None
    try:
        result = _fetch(consumer, patient_id, out)
    except KeyboardInterrupt:
        # Each exchange's own clean-up (its spool, its audit record) has run
        # on the way out; what was filed stays, not the whole of it.
        _remove_empty(out, made)
        click.secho(
            f"stopped: what was retrieved so far stays in {out}, incomplete; run "
            "the same fetch again to get it whole",
            fg="yellow",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except ConsumerError as exc:
        _remove_empty(out, made)
        _fail_query(exc, settings)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        _fail(f"cannot write{where}: {exc.strerror or exc}")
    for unique_id, reason in result.skipped:
        click.secho(
            f"  skipped document {logs.shown(unique_id, 100)}: {logs.shown(reason)}",
            fg="yellow",
            err=True,
        )
    if not result.manifests and not result.failed:
        # Documents skipped leave their folder empty.
        _remove_empty(out / "manifests", True)
        _remove_empty(out, made)
        _not_found("no imaging manifest found for this patient; nothing written")
    click.echo(
        f"{_count(len(result.manifests), 'manifest')}, "
        f"{_count(len(result.instances), 'instance')}, "
        f"{_size(result.bytes)} in {out}"
    )
    if destination is not None and result.instances:
        _send_to_pacs(
            result.instances, destination, settings, consumer, patient_id, pacs_tls
        )
    # The others were fetched; what failed is said after them.
    for what, reason in result.failed:
        click.secho(f"  failed: {what}: {reason}", fg="red", err=True)
    if result.missing and not result.failed:
        # SOP Instance UIDs name no patient; the warnings or the source's
        # log say why.
        for sop_instance_uid in result.missing[:LISTED_REFUSALS]:
            click.secho(f"  not returned: {sop_instance_uid}", fg="red", err=True)
        if len(result.missing) > LISTED_REFUSALS:
            more = len(result.missing) - LISTED_REFUSALS
            click.secho(f"  and {more} more", fg="red", err=True)
    said = []
    if result.failed:
        said.append(f"{_count(len(result.failed), 'retrieve')} failed, as said above")
    if result.missing:
        said.append(
            f"{_count(len(result.missing), 'referenced instance')} not returned"
            # Those of a failed retrieve are said above; others, the source
            # left out for reasons its log gives, or this side refused with
            # a WARNING (an instance not the one asked for).
            + (
                ""
                if result.failed
                else "; the warnings above or the Imaging Document Source's log say why"
            )
        )
    if said:
        _fail("; ".join(said))


def _remove_empty(folder: Path, made: bool) -> None:
    """Remove ``folder`` when this command ``made`` it and it is empty."""
    if made:
        try:
            folder.rmdir()
        except OSError:
            pass


def _unwritable_folder(path: Path) -> str | None:
    """Why ``path`` cannot be a folder to write in, made if need be; None
    when it can, as far as can be told without writing."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        # access(2) says so of a read-only file system too.
        return f"{probe} cannot be written in"
    return None


def _send_to_pacs(
    paths: list[Path],
    destination: Destination,
    settings: Settings,
    consumer: Consumer,
    patient_id: str,
    tls_: bool,
) -> None:
    """C-STORE the retrieved instances into a PACS (DICOM PS3.4 B), over TLS
    with ``tls_``, audited as DICOM Instances Transferred (DICOM PS3.15
    A.5.3.7): ``paths`` are ``DIR/StudyUID/SeriesUID/SOPUID.dcm``."""
    studies = tuple(dict.fromkeys(path.parent.parent.name for path in paths))
    sent: SendResult | None = None
    try:
        with _progress() as bar:
            task = bar.add_task(f"C-STORE to {destination.ae_title}", total=len(paths))
            try:
                sent = send_files(
                    paths,
                    destination,
                    calling_ae_title=settings.imaging_source.ae_title,
                    progress=lambda done, _total: bar.update(task, completed=done),
                    ssl_context=tls.client_context_for(settings) if tls_ else None,
                )
            except StoreScuError as exc:
                hint = ""
                if exc.unanswered and settings.tls.enabled and not tls_:
                    # DICOM PS3.15 B.1: a TLS listener drops a clear-text
                    # A-ASSOCIATE-RQ without a DICOM answer.
                    hint = "; the PACS may need --pacs-tls (DICOM over TLS)"
                _fail(f"{exc}{hint}")
    finally:
        not_stored = (
            len(paths) if sent is None else len(sent.failed) + len(sent.unsendable)
        )
        consumer.auditor.record(
            audit.AuditEvent(
                transaction="C-STORE",
                actor="Imaging Document Consumer",
                outcome=audit.Outcome.SUCCESS
                if not not_stored
                else audit.Outcome.MINOR_FAILURE
                if not_stored < len(paths)
                else audit.Outcome.SERIOUS_FAILURE,
                source=audit.Endpoint(
                    settings.imaging_source.ae_title, settings.node.advertised
                ),
                destination=audit.Endpoint(destination.ae_title, destination.host),
                patient_id=patient_id,
                study_instance_uids=studies,
                outcome_detail=(
                    f"{not_stored} of {len(paths)} instances not stored"
                    if not_stored
                    else None
                ),
            )
        )
    click.echo(
        f"{_count(len(sent.statuses) - len(sent.failed), 'instance')} stored in "
        f"{destination.ae_title}@{destination.host}:{destination.port}"
    )
    if sent.failed or sent.unsendable:
        for path, status in sent.failed.items():
            click.secho(f"{path.name}: status 0x{status:04X}", fg="red", err=True)
        for path, reason in sent.unsendable.items():
            click.secho(f"{path.name}: not sent: {reason}", fg="red", err=True)
        _fail(
            f"{_count(len(sent.failed) + len(sent.unsendable), 'instance')} "
            "not stored in the PACS"
        )


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--publish/--no-publish",
    default=True,
    help="Publish the changed studies now (default), or leave them to a "
    "serving node's auto-publishing.",
)
@click.pass_context
def import_(ctx: click.Context, folder: Path, publish: bool) -> None:
    """Import a folder or CD (with or without DICOMDIR) into the Imaging
    Document Source; each study is published under the images' Patient ID
    in the affinity domain."""
    services = _services(_settings(ctx))
    result = _take_in(services, folder)
    if publish:
        # Instances held already may belong to a study not yet published
        # (an earlier import --no-publish): it is published now too.
        _publish_now(services, sorted({a.study_instance_uid for a in result.accepted}))
    services.engine.dispose()
    _exit_if_refused(_refusals(result))


def _take_in(
    services: Services, folder: Path, patient_id: str | None = None
) -> ImportResult:
    """Take a folder's files in through intake and say what came in; exit 1
    when nothing did. ``patient_id`` replaces the images' own (publish)."""
    try:
        result = services.intake.import_folder(folder, patient_id=patient_id)
    except NotAudited as exc:
        services.engine.dispose()
        _fail(str(exc))
    except ImportInterrupted as exc:
        services.engine.dispose()
        click.secho(
            f"stopped: the {_count(exc.kept, 'instance')} taken in so far stay "
            "(a serving node publishes them once quiet); run it again to take "
            "in the rest",
            fg="yellow",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    broken = [
        (p, _as_told(r.reason)) for p, r in result.refused if r.rule != "not_dicom"
    ]
    _say_skipped(broken, len(result.refused) - len(broken))
    new = sum(1 for a in result.accepted if not a.duplicate)
    _say_taken_in(new, len(result.accepted) - new, len(result.studies))
    if not result.accepted:
        services.engine.dispose()
        # The reason a DICOM file was refused, rather than that of a file
        # beside it that is no DICOM at all.
        reasons = broken or [(p, r.reason) for p, r in result.refused]
        first = f" ({reasons[0][1]})" if reasons else ""
        _fail(f"no DICOM instance taken in from {folder}{first}")
    return result


def _say_taken_in(new: int, held: int, studies: int) -> None:
    """Say how many instances were taken in and were held already, of how
    many studies."""
    click.echo(
        f"{_count(new, 'instance')} taken in ({held} held already), "
        f"{_count(studies, 'study')}"
    )


@contextmanager
def _said_here(logger: logging.Logger) -> Iterator[None]:
    """Keep ``logger``'s records at WARNING and above out of the log
    meanwhile: the command tells its user the same itself, once (DEBUG
    keeps the detail)."""

    def below_warning(record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING

    logger.addFilter(below_warning)
    try:
        yield
    finally:
        logger.removeFilter(below_warning)


# Exit status of publish and import when DICOM files were refused and the
# rest was taken in: the folder is not shared whole.
EXIT_REFUSED = 3
# Exit status of verify when a stored copy is missing or damaged: distinct
# from a verify that could not run (1), so that a scrub run from cron tells
# damage from an outage.
EXIT_DAMAGED = 3
# Exit status of find and fetch when the registry finds nothing for the
# patient (nothing at all, or, for fetch, no imaging manifest): distinct from
# a failure (1) and from a wrong argument (2), so that a script can tell an
# unknown patient from a node that is down.
EXIT_NOT_FOUND = 4
# The --out folder fetch makes: its user's alone (patient images).
FETCHED_MODE = 0o700
# Exit status of a command stopped by SIGINT (Ctrl-C), as a shell gives.
EXIT_INTERRUPTED = 130


# A folder's refused DICOM files are listed by path up to this many.
LISTED_REFUSALS = 20


def _say_skipped(broken: list[tuple[Path, str]], not_dicom: int) -> None:
    """Say how many files were skipped and list the DICOM files among them
    with why: a reason of one file beside its path, a reason of several once,
    its files under it. Paths are the user's own and may name a patient:
    they are shown here, on the terminal, and logged at DEBUG only. A CD's
    file names are whatever its maker wrote: their control characters are
    shown escaped, never sent to the terminal."""
    if not broken and not not_dicom:
        return
    # Files not DICOM at all are only counted; the count says why.
    others = ""
    if not_dicom:
        others = f" ({not_dicom} not DICOM)" if broken else " (not DICOM)"
    click.secho(
        f"{_count(len(broken) + not_dicom, 'file')} skipped{others}",
        fg="yellow",
        err=True,
    )
    by_reason: dict[str, list[Path]] = {}
    for path, reason in broken:
        by_reason.setdefault(reason, []).append(path)
    listed = 0
    for reason, paths in by_reason.items():
        if len(paths) == 1:
            if listed < LISTED_REFUSALS:
                click.secho(
                    f"  {logs.shown(str(paths[0]))}: {reason}", fg="yellow", err=True
                )
            listed += 1
            continue
        click.secho(f"  {len(paths)} files: {reason}", fg="yellow", err=True)
        for path in paths[: max(LISTED_REFUSALS - listed, 0)]:
            click.secho(f"    {logs.shown(str(path))}", fg="yellow", err=True)
        listed += len(paths)
    if listed > LISTED_REFUSALS:
        more = listed - LISTED_REFUSALS
        click.secho(f"  and {more} more (-vv logs each)", fg="yellow", err=True)


def _refusals(result: ImportResult) -> list[str]:
    """The reasons of an import's refused files that are DICOM; files that
    are not DICOM at all (a CD's viewer, a README) do not count."""
    return [_as_told(r.reason) for _, r in result.refused if r.rule != "not_dicom"]


def _exit_if_refused(reasons: list[str]) -> None:
    """Exit EXIT_REFUSED when DICOM files were refused, for these reasons.

    A reason every refused file shares is repeated; several are not, so
    that the first file's is not read as the reason of them all: the list
    above gives each."""
    if reasons:
        distinct = set(reasons)
        why = (
            f"({reasons[0]})"
            if len(distinct) == 1
            else f"for {len(distinct)} reasons, listed above"
        )
        click.secho(
            f"error: {_count(len(reasons), 'DICOM file')} refused {why}; "
            "the rest was taken in",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_REFUSED)


@main.command()
@click.argument("study_instance_uid", callback=_uid_param)
@click.option(
    "--series",
    "series_instance_uid",
    default=None,
    callback=_uid_param,
    help="Remove this series of the study only.",
)
@click.option(
    "--instance",
    "sop_instance_uids",
    multiple=True,
    callback=_uid_param,
    help="Remove this instance only (SOP Instance UID); repeat for several.",
)
@click.option("--publish/--no-publish", default=True)
@click.pass_context
def remove(
    ctx: click.Context,
    study_instance_uid: str,
    series_instance_uid: str | None,
    sop_instance_uids: tuple[str, ...],
    publish: bool,
) -> None:
    """Remove instances (a study, a series, or named instances) from the
    Imaging Document Source; its manifest is replaced, or withdrawn when
    nothing is left."""
    services = _services(_settings(ctx))
    removed = services.intake.remove(
        study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uids=sop_instance_uids,
    )
    # A change an earlier removal (--no-publish) left unpublished is
    # published too; then removing nothing more is no failure.
    unpublished = publish and services.intake.changed(study_instance_uid)
    if removed or not unpublished:
        click.echo(f"{_count(removed, 'instance')} removed")
    if publish and (removed or unpublished):
        _publish_now(services, (study_instance_uid,))
    services.engine.dispose()
    if removed or unpublished:
        return
    named = f"study {study_instance_uid}"
    if series_instance_uid:
        named += f", series {series_instance_uid}"
    if sop_instance_uids:
        named += f", instances {', '.join(sop_instance_uids)}"
    _fail(f"nothing held matches {named}")


@main.command()
@click.pass_context
def verify(ctx: click.Context) -> None:
    """Read every stored document and instance and check each against the
    size and hash it was stored with; exit 3 when one is missing or
    damaged, 1 when the store cannot be read (its database down)."""
    services = _services(_settings(ctx))
    total = count_copies(services.engine)
    with _progress() as bar:
        task = bar.add_task("verify", total=total)
        report = verify_store(
            services.engine,
            services.repository.blobs,
            services.imaging_source.blobs,
            lambda done: bar.update(task, completed=done),
        )
    services.engine.dispose()
    for damage in report.damaged:
        click.secho(
            f"  {damage.what} {damage.unique_id}{_of_study(damage)}: {damage.problem}",
            fg="red",
            err=True,
        )
    if report.damaged:
        click.secho(
            f"error: {_count(len(report.damaged), 'stored copy')} of "
            f"{report.checked} missing or damaged",
            fg="red",
            err=True,
        )
        sys.exit(EXIT_DAMAGED)
    click.echo(f"{_count(report.checked, 'stored copy')} verified, all as stored")


def _of_study(damage: Damage) -> str:
    """The study of a damaged instance, which ``remove`` takes."""
    study = damage.study_instance_uid
    return f" of study {study}" if study else ""


def _published_already(services: Services, study: scan.Study) -> str | None:
    """The current manifest's SOP Instance UID when every instance of a
    study read is held and that manifest references exactly the instances
    held: a new one would repeat it; None otherwise."""
    uid = study.study_instance_uid
    source = services.imaging_source
    current = source.current_manifest(uid)
    if current is None or services.intake.changed(uid):
        return None
    held = source.held_study(uid, study)
    read = {header.sop_instance_uid for header in study.instances}
    if held is None or not read <= {i.sop_instance_uid for i in held.instances}:
        return None
    manifest = kos.parse_manifest(source.blobs.path(current.blob))
    referenced = {ref.sop_instance_uid for ref in manifest.references}
    if referenced != {i.sop_instance_uid for i in held.instances}:
        return None
    return str(current.sop_instance_uid)


def _publish_now(services: Services, studies: Iterable[str]) -> None:
    failed = False
    for study_instance_uid in studies:
        current = services.imaging_source.current_manifest(study_instance_uid)
        if current is not None and not services.intake.changed(study_instance_uid):
            click.echo(
                f"study {study_instance_uid} published already: manifest "
                f"{current.sop_instance_uid}"
            )
            continue
        published = services.intake.publish_now(study_instance_uid, caller_tells=True)
        if published is not None:
            click.echo(
                f"published study {study_instance_uid}: "
                f"{_count(published.instances, 'instance')}, manifest "
                f"{published.manifest_uid}"
                + (f", replacing {published.replaced}" if published.replaced else "")
            )
        elif (
            current is not None
            and services.imaging_source.held_study(study_instance_uid) is None
            and services.imaging_source.current_manifest(study_instance_uid) is None
        ):
            click.echo(f"manifest {current.sop_instance_uid} withdrawn")
        elif (
            current is None
            and services.imaging_source.held_study(study_instance_uid) is None
            and services.intake.last_failure(study_instance_uid) is None
        ):
            # Removed whole before it was ever published.
            click.echo(
                f"study {study_instance_uid}: no instance left, and it was never "
                "published; nothing to withdraw"
            )
        elif claim := services.intake.claim_of(study_instance_uid):
            who, since = claim
            host, _, rest = who.partition(" ")
            click.secho(
                f"study {study_instance_uid} is being published by process "
                f"{rest.split(' ')[0] or '?'} on {host or '?'} since "
                f"{datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S} UTC; "
                "not published twice (try again once it is done)",
                fg="red",
                err=True,
            )
            failed = True
        else:
            reason = services.intake.last_failure(study_instance_uid)
            hint = ""
            if reason and "XDSUnknownPatientId" in reason:
                patient = services.intake.study_patient(study_instance_uid)
                hint = _feed_hint(patient) + " (a serving node retries by itself)"
            click.secho(
                _unreachable_hint(
                    f"study {study_instance_uid} not published: "
                    f"{reason or 'see the log'}{hint}",
                    services.settings,
                ),
                fg="red",
                err=True,
            )
            failed = True
    if failed:
        sys.exit(1)


@main.group("audit")
def audit_group() -> None:
    """Read the local audit spool or the Audit Record Repository."""


def _time_option(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or date-time", param_hint=f"--{name}"
        ) from None


@audit_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--xml", "as_xml", is_flag=True, help="The AuditMessages as stored.")
@click.option(
    "--patient",
    callback=_patient_id_param,
    help="Only events naming this patient (bare ids qualified).",
)
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
    if as_json and as_xml:
        raise click.UsageError("--json and --xml are alternatives; give one")
    settings = _settings(ctx)
    start, end = _time_option(since, "since"), _time_option(until, "until")
    if start is not None and end is not None and end <= start:
        # Events at or after --since and before --until: none can be.
        raise click.BadParameter(
            f"{until} is not after --since {since}: no event can be between",
            param_hint="--until",
        )
    if from_arr:
        _list_repository(settings, patient, start, end, as_json, as_xml)
        return
    services = _services(settings)
    records = [
        r
        for r in services.audit_spool.records()
        if (patient is None or patient in r.patient_ids)
        and (start is None or r.event_time >= start)
        and (end is None or r.event_time < end)
    ]
    if as_xml:
        click.echo(_xml_document(record.xml for record in records))
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
    _print_table(_audit_table(records))


def _list_repository(
    settings: Settings,
    patient_id: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
    as_xml: bool,
) -> None:
    """Print what the ARR stored as it is read, a page of records at a time,
    so that a trail of any length prints in the memory of one page."""
    engine = make_engine(settings.database_url)
    store = AuditRecordStore(engine)

    def records(through: int | None = None) -> Iterator[StoredAudit]:
        return store.records(
            patient_id=patient_id, since=since, until=until, through=through
        )

    try:
        if as_xml:
            for line in _xml_lines(record.xml or record.raw for record in records()):
                click.echo(line)
        elif as_json:
            _echo_json_array(record.as_json() for record in records())
        else:
            _print_repository_table(settings, records)
    finally:
        engine.dispose()


def _echo_json_array(items: Iterable[object]) -> None:
    """Write ``items`` as ``json.dumps(list(items), indent=2)`` writes them,
    one at a time."""
    opening = "["
    for item in items:
        click.echo(f"{opening}\n{_indent(json.dumps(item, indent=2))}", nl=False)
        opening = ","
    click.echo("[]" if opening == "[" else "\n]")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.split("\n"))


_REPOSITORY_COLUMNS = ("time (UTC)", "from", "event", "type", "outcome", "source")


def _repository_row(record: StoredAudit) -> list[Text]:
    when = record.event_time or record.received_at
    # What the peers sent, as plain text (see _plain).
    return _plain(
        # strftime's %Y drops the zeros of a year before 1000.
        when.replace(tzinfo=None).isoformat(" ", "seconds"),
        f"{record.transport} {record.peer}",
        _event_name(record.event_id),
        record.event_type or "?",
        str(record.outcome) if record.valid else f"malformed: {record.error}",
        record.audit_source_id or "?",
    )


def _repository_table(
    widths: list[int] | None, *, title: str | None, header: bool
) -> Table:
    """The ARR's table, empty; ``widths`` fixes each column's width,
    padding included."""
    table = Table(title=title, show_header=header, padding=_CELL_PADDING)
    for index, column in enumerate(_REPOSITORY_COLUMNS):
        width = widths[index] - 2 * _CELL_PADDING[1] if widths else None
        table.add_column(column, overflow="fold", width=width)
    return table


_REPOSITORY_TITLE = "Audit Record Repository (ITI TF-2 3.20)"
# A cell's padding: no lines above or below, a space either side.
_CELL_PADDING = (0, 1)


def _print_repository_table(
    settings: Settings, records: Callable[[int | None], Iterator[StoredAudit]]
) -> None:
    """Print the records as one table, a page of rows at a time.

    A table's column widths depend on every row, so the records are read
    twice: first to measure each column's cells, the narrowest and the
    widest each can be; then to print, each page a table whose columns
    have the widths the whole table would give them. The pages' edges
    between them are left out, so that the output is the whole table's.
    """
    out = _table_console()

    # Each column's widest word and widest line, over all its cells.
    narrowest = [0] * len(_REPOSITORY_COLUMNS)
    widest = [0] * len(_REPOSITORY_COLUMNS)
    last = None
    for record in records(None):
        for index, cell in enumerate(_repository_row(record)):
            least, most = Measurement.get(out, out.options, cell)
            narrowest[index] = max(narrowest[index], least)
            widest[index] = max(widest[index], most)
        last = record.id
    if last is None:
        # The storage named may be no ARR's at all (the node's own).
        click.echo(
            f"no audit record stored at {settings.storage} that matches; "
            "give the Audit Record Repository's own --config",
            err=True,
        )
        return

    widths = _column_widths(out, narrowest, widest)
    first, bottom = True, ""
    page = _repository_table(widths, title=_REPOSITORY_TITLE, header=True)
    for record in records(last):
        page.add_row(*_repository_row(record))
        if page.row_count < audit_repository.PAGE_SIZE:
            continue
        bottom = _write_page(out, page, first=first)
        first = False
        page = _repository_table(widths, title=None, header=False)
    if page.row_count or first:
        bottom = _write_page(out, page, first=first)
    out.file.write(bottom)
    out.file.flush()


def _write_page(out: Console, page: Table, *, first: bool) -> str:
    """Write a page of the table without its bottom edge, and after the
    first, without its top edge; return the bottom edge."""
    with out.capture() as capture:
        out.print(page)
    lines = capture.get().splitlines(keepends=True)
    bottom = lines.pop()
    out.file.write("".join(lines if first else lines[1:]))
    return bottom


def _column_widths(out: Console, narrowest: list[int], widest: list[int]) -> list[int]:
    """The widths, padding included, that the ARR's table gives its columns
    on ``out`` when their cells' widest words are ``narrowest`` wide and
    their widest lines ``widest``.

    Those of a table of two rows that measure so: one a word as wide as
    each column's widest word, one a line as wide as its widest line; read
    off its top edge, a corner, a run of one character for each column, a
    divider between them and a corner.
    """
    table = _repository_table(None, title=None, header=True)
    table.add_row(*(Text("x" * width) for width in narrowest))
    table.add_row(*(Text(" " * (width - 1) + "x"[:width]) for width in widest))
    top = "".join(segment.text for segment in out.render_lines(table, pad=False)[0])
    edge = top.rstrip()[1:-1]
    return [len(run) for run in re.split(f"[^{re.escape(edge[0])}]", edge)]


def _event_name(code: str | None) -> str:
    """An EventID's name, as the node's own list shows it, where the code
    is one this node writes (DICOM PS3.16 CID 400); else the code."""
    if not code:
        return "?"
    names = {
        rule.event_id.code: rule.event_id.display
        for rule in audit_event_rules().values()
    }
    return names.get(code, code)


def _xml_document(messages: Iterable[bytes]) -> str:
    """The audit messages as one XML document (see :func:`_xml_lines`)."""
    return "\n".join(_xml_lines(messages))


def _xml_lines(messages: Iterable[bytes]) -> Iterator[str]:
    """The audit messages as one XML document, line by line: each
    AuditMessage (DICOM PS3.15 A.5) in an AuditMessages element, without its
    own declaration; one that is not XML (kept as received) as the text of
    a MalformedRecord element, each character XML 1.0 cannot carry (a
    control byte a peer sent) replaced by U+FFFD."""
    yield '<?xml version="1.0" encoding="UTF-8"?>'
    yield "<AuditMessages>"
    for message in messages:
        try:
            root = parse_xml(message)
        except Exception:
            text = xml_text(message.decode("utf-8", "replace"))
            yield f"<MalformedRecord>{xml_escape(text)}</MalformedRecord>"
            continue
        yield etree.tostring(root, encoding="unicode")
    yield "</AuditMessages>"


def _arr_tls_context(
    settings: Settings,
    cert: Path | None,
    key: Path | None,
    ca: Path | None,
    crls: tuple[Path, ...] = (),
) -> ssl.SSLContext | None:
    """The ARR's TLS server context: from the options, else the node's [tls]."""
    if cert is not None and key is not None and ca is not None:
        return tls.server_context(
            TlsSettings(
                enabled=True,
                certificate=str(cert),
                private_key=str(key),
                trusted=(str(ca),),
                crls=tuple(str(crl) for crl in crls),
            )
        )
    if settings.tls.enabled:
        return tls.server_context(settings.tls)
    return None


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
@click.option(
    "--crl",
    "crls",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CA's CRL (PEM) to check senders against, with --ca (repeatable).",
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
    crls: tuple[Path, ...],
) -> None:
    """Run an Audit Record Repository until interrupted.

    Receives syslog audit messages over UDP, and over mutual TLS when --cert,
    --key and --ca are given or [tls] is enabled; stores them in the node's
    database.
    """
    settings = _settings(ctx)
    logging.getLogger("xdsi").setLevel(logging.INFO)
    files = (cert, key, ca)
    if any(files) and not all(files):
        # Wrong arguments, as click's own (exit 2).
        raise click.UsageError("TLS needs --cert, --key and --ca together")
    if crls and ca is None:
        raise click.UsageError("--crl goes with --cert, --key and --ca")
    try:
        context = _arr_tls_context(settings, cert, key, ca, crls)
    except (OSError, ssl.SSLError, ConfigError) as exc:
        _fail(f"cannot load the TLS certificate or key: {exc}")
    host = settings.node.host
    if tls_port is None and context:
        tls_port = settings.audit.arr_tls_port
    udp_port = udp_port if udp_port is not None else settings.audit.arr_udp_port
    http_port = http_port if http_port is not None else settings.audit.arr_http_port
    engine = make_engine(settings.database_url)
    store = AuditRecordStore(engine)
    # Its own Security Alerts go where it keeps what it receives.
    auditor = OwnRecords(store, audit_source_id=settings.node.audit_source_id)
    try:
        repository = AuditRepository(
            store,
            host=host,
            tls_port=tls_port if context else None,
            udp_port=udp_port,
            tls_context=context,
            auditor=auditor,
            node_id=settings.node.audit_source_id,
            handshake_timeout=settings.tls.handshake_timeout,
        )
    except OSError as exc:
        engine.dispose()
        inputs = f"udp {udp_port}" + (f", tls {tls_port}" if context else "")
        _fail(
            f"cannot start the Audit Record Repository: syslog on {host} "
            f"({inputs}): {exc.strerror or exc}; stop what holds the port or "
            "choose another (--udp-port, --tls-port)"
        )
    try:
        web = QueryServer(host, http_port, store)
    except CannotBind as exc:
        engine.dispose()
        _fail(
            f"cannot start the Audit Record Repository: query port "
            f"{host}:{http_port}: {exc}; stop what holds the port or choose "
            "another (--http-port)"
        )
    repository.start()
    threading.Thread(target=web.serve_forever, daemon=True).start()
    click.echo(f"{'syslog tls':15} {repository.tls_port or 'off'}")
    click.echo(f"{'syslog udp':15} {repository.udp_port}")
    click.echo(f"{'query':15} http://{settings.node.host}:{web.server_port}/audit")
    try:
        _wait_for_stop()
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
        # A participant is named as the peer named itself (its
        # WS-Addressing reply address, say): plain text (see _plain).
        table.add_row(
            *_plain(
                record.event_time.strftime("%Y-%m-%d %H:%M:%S"),
                # Application Start/Stop and security alerts name no
                # transaction.
                record.event_type or "-",
                record.event_id.display if record.event_id else "?",
                str(record.outcome) if record.valid else "corrupt",
                " → ".join(participants),
            )
        )
    return table


def _plain(*values: str) -> list[Text]:
    """Table cells that show ``values`` as they are: rich reads "[...]" in
    a str as markup (a style, a hyperlink, or a MarkupError that ends the
    command with a traceback), and passes C1 controls to the terminal; each
    is escaped instead (logs.shown)."""
    return [Text(logs.shown(value)) for value in values]


@main.group("tls")
def tls_group() -> None:
    """Make a test CA and node certificates for mutual TLS (ITI-19)."""


@tls_group.command("make-ca")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="xdsi test CA", help="The CA's common name.")
@click.option("--days", type=int, default=365, show_default=True)
@click.option("--force", is_flag=True, help="Replace a CA already in DIRECTORY.")
def tls_make_ca(directory: Path, name: str, days: int, force: bool) -> None:
    """Write a self-signed test CA to DIRECTORY (ca.pem, ca-key.pem)."""
    existing = [
        p for p in (directory / "ca.pem", directory / "ca-key.pem") if p.exists()
    ]
    if existing and not force:
        # A new CA would leave every certificate the old one signed
        # unverifiable.
        _fail(
            f"{existing[0]} exists; certificates it signed would no longer "
            "verify (use --force to replace it)"
        )
    files = tls.make_ca(directory, common_name=name, days=days)
    click.echo(f"CA certificate {files.certificate}")
    click.echo(f"CA key         {files.private_key}")


# The test CA a certificate or CRL is made with (make-ca's directory).
_ca_option = click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of the CA made by make-ca.",
)


def _ca_files(ca_dir: Path) -> tls.CertificateFiles:
    return tls.CertificateFiles(ca_dir / "ca.pem", ca_dir / "ca-key.pem")


@tls_group.command("make-cert")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_ca_option
@click.option("--name", default="node", show_default=True, help="Common name.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="subjectAltName host or IP (repeatable; default localhost, 127.0.0.1).",
)
@click.option("--days", type=int, default=365, show_default=True)
def tls_make_cert(
    directory: Path, ca_dir: Path, name: str, hosts: tuple[str, ...], days: int
) -> None:
    """Write a node certificate signed by the CA to DIRECTORY.

    Prints the [tls] section that uses it.
    """
    ca = _ca_files(ca_dir)
    try:
        files = tls.make_cert(
            directory,
            ca,
            name=name,
            hosts=hosts or ("localhost", "127.0.0.1"),
            days=days,
        )
    except (OSError, ValueError) as exc:
        _fail(f"cannot make the certificate: {exc}")
    click.echo("[tls]")
    click.echo("enabled = true")
    click.echo(f'certificate = "{files.certificate.resolve()}"')
    click.echo(f'private_key = "{files.private_key.resolve()}"')
    click.echo(f'trusted = ["{ca.certificate.resolve()}"]')


@tls_group.command("make-crl")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@_ca_option
@click.option(
    "--revoke",
    "revoked",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A certificate (PEM) the CA revokes (repeatable).",
)
@click.option("--days", type=int, default=7, show_default=True)
def tls_make_crl(
    path: Path, ca_dir: Path, revoked: tuple[Path, ...], days: int
) -> None:
    """Write the test CA's Certificate Revocation List to PATH (PEM).

    List it in [tls] crls; a node reads it again when it changes.
    """
    ca = _ca_files(ca_dir)
    try:
        tls.make_crl(ca, path, revoked=revoked, days=days)
    except (OSError, ValueError) as exc:
        _fail(f"cannot make the CRL: {exc}")
    click.echo(f"CRL {path} revokes {_count(len(revoked), 'certificate')}")


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
@click.option(
    "--tls",
    "over_tls",
    is_flag=True,
    help="Run every exchange over mutual TLS, with a CA made for the demo.",
)
@click.pass_context
def demo(
    ctx: click.Context, study: Path | None, keep: Path | None, over_tls: bool
) -> None:
    """Run the whole XDS-I.b chain on loopback and check every image."""
    workdir = keep or Path(tempfile.mkdtemp(prefix="xdsi-demo-"))
    settings = _settings(ctx)
    if over_tls:
        ca = tls.make_ca(workdir / "tls", common_name="xdsi demo CA")
        node = tls.make_cert(workdir / "tls", ca, name="xdsi-demo")
        settings = replace(settings, tls=tls.tls_settings(node, ca.certificate))
    try:
        ok = _demo(settings, study or bundled_study(), workdir)
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
    over = "mutual TLS" if settings.tls.enabled else "loopback"
    console.rule(f"[bold]xdsi demo: the XDS-I.b chain over {over}")

    with Node(settings) as node:
        settings = node.settings
        services = node.services
        assert services is not None
        for actor in ("registry", "repository", "imaging_source"):
            console.print(f"  {actor:15} {settings.url(actor)}")
        console.print(
            f"  {'feed (MLLP)':15} "
            f"{settings.node.public_host}:{settings.registry.feed_port}"
        )

        started = time.monotonic()
        patient_id = qualify_patient_id("XDSI-DEMO-1", settings)
        code = send_feed(
            settings, services.auditor, patient_id, name="PHANTOM^HEAD"
        ).code
        timings["ITI-8 feed"] = time.monotonic() - started
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
        _print_table(_entries_table(entries))

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

    _print_table(_audit_table(list(services.audit_spool.records())))
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

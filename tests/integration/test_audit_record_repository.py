"""``xdsi arr`` and ``xdsi audit list --arr``: the Audit Record Repository.

ITI TF-2 3.20: a node's audit messages, sent by its forwarder over TLS and
UDP, are stored by the ARR process and answered by query.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import pytest
from click.testing import CliRunner
from lxml import etree
from sqlalchemy import Engine, event

from tests.integration.test_iti20_record_audit_event import PATIENT, retrieve_event
from tests.pki import Pki, make_pki
from xdsi.audit import AuditSpool, build_audit_message
from xdsi.audit import repository as audit_repository
from xdsi.audit.forwarder import AuditForwarder, Backoff
from xdsi.audit.repository import AuditRecordStore
from xdsi.audit.syslog import TlsSender, format_message
from xdsi.cli import main
from xdsi.config import Settings
from xdsi.store.schema import make_engine

ROOT = Path(__file__).resolve().parents[2]
# The ARR's [tls] handshake_timeout, well below the 10 s default.
HANDSHAKE_TIMEOUT = 1.0


def _xdsi(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def arr(tmp_path: Path) -> Iterator[tuple[Path, Pki, dict[str, str]]]:
    """``xdsi arr`` on free loopback ports, with mutual TLS."""
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "xdsi.toml"
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "node"}"\n'
        f"[tls]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xdsi",
            "--config",
            str(config),
            "arr",
            "--tls-port=0",
            "--udp-port=0",
            "--http-port=0",
            f"--cert={pki.path('server.pem')}",
            f"--key={pki.path('server.key')}",
            f"--ca={pki.ca}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    endpoints: dict[str, str] = {}
    deadline = time.monotonic() + 60
    said = []
    while "query" not in endpoints and time.monotonic() < deadline:
        line = process.stdout.readline()
        said.append(line)
        if not line and process.poll() is not None:
            pytest.fail(f"xdsi arr ended with {process.returncode}: {''.join(said)}")
        name, _, value = line.rstrip().rpartition(" ")
        if name.strip() in ("syslog tls", "syslog udp", "query"):
            endpoints[name.strip()] = value
    yield config, pki, endpoints
    process.terminate()
    process.wait(timeout=30)


def _query(endpoints: dict[str, str], query: str) -> list[dict[str, object]]:
    with urlopen(f"{endpoints['query']}?{query}", timeout=30) as answer:
        return json.load(answer)


def _arr_process(program: list[str], config: Path, pki: Pki) -> subprocess.Popen:
    """``xdsi arr``, run by ``program``, on free loopback ports with mutual
    TLS; what it says comes on its stdout."""
    return subprocess.Popen(
        [*program, "--config", str(config), "arr"]
        + ["--tls-port=0", "--udp-port=0", "--http-port=0"]
        + [f"--cert={pki.path('server.pem')}", f"--key={pki.path('server.key')}"]
        + [f"--ca={pki.ca}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _forward(
    spool: AuditSpool,
    pki: Pki,
    endpoints: dict[str, str],
    listeners: tuple[str, ...],
    stored: int,
) -> None:
    """Send what ``spool`` holds to the ARR's ``listeners`` ("syslog tls",
    "syslog udp") until it has ``stored`` records, 30 s at most."""
    scheme = {"syslog tls": "tls", "syslog udp": "udp"}
    sending = AuditForwarder(
        spool,
        [f"{scheme[name]}://127.0.0.1:{endpoints[name]}" for name in listeners],
        app_name="xdsi",
        tls_context=pki.client_context(),
        backoff=Backoff(0.1, 0.5),
        poll_interval=0.05,
    )
    sending.start()
    try:
        deadline = time.monotonic() + 30
        while len(_query(endpoints, "")) < stored and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sending.stop()


def test_arr_process_stores_tls_and_udp_audit_and_answers_queries(
    arr: tuple[Path, Pki, dict[str, str]], tmp_path: Path
) -> None:
    """ITI TF-2 3.20: stored from both transports, found by patient, time."""
    config, pki, endpoints = arr
    spool = AuditSpool(tmp_path / "spool")
    spool.write(build_audit_message(retrieve_event(1), audit_source_id="xdsi"))
    other = replace(retrieve_event(2), patient_id="OTHER^^^&1.2.3&ISO")
    spool.write(build_audit_message(other, audit_source_id="xdsi"))
    _forward(spool, pki, endpoints, ("syslog tls", "syslog udp"), stored=4)

    found = _query(endpoints, f"patient={quote(PATIENT)}&since=2024-05-02T09:00:00")
    assert sorted(r["transport"] for r in found) == ["tls", "udp"]
    assert _query(endpoints, "since=2999-01-01") == []

    listed = _xdsi(config, "audit", "list", "--arr", "--patient", PATIENT, "--xml")
    # One XML document: an XML parser takes the whole listing.
    document = etree.fromstring(listed.stdout.encode("utf-8"))
    assert document.tag == "AuditMessages"
    assert [m.tag for m in document] == ["AuditMessage", "AuditMessage"]
    as_json = json.loads(_xdsi(config, "audit", "list", "--arr", "--json").stdout)
    assert len(as_json) == 4 and all(r["valid"] for r in as_json)
    # A listing that finds nothing says so, and which storage it read.
    none = _xdsi(config, "audit", "list", "--arr", "--since", "2999-01-01")
    assert "no audit record stored at" in none.stderr
    assert "AuditMessage" not in none.stdout


def test_arr_process_drops_a_peer_that_never_starts_its_handshake(
    arr: tuple[Path, Pki, dict[str, str]],
) -> None:
    """RFC 5425 4.2: ``xdsi arr`` drops a TLS peer that has not authenticated
    within its configured [tls] handshake_timeout."""
    _, _, endpoints = arr
    port = int(endpoints["syslog tls"])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        # Well within the 10 s default, generously above the 1 s configured.
        silent.settimeout(8)
        try:
            assert silent.recv(1) == b""
        except ConnectionResetError:
            pass


def test_arr_tls_port_0_is_a_free_port_not_the_default(tmp_path: Path) -> None:
    """``--tls-port=0`` asks for a free port, as ``--udp-port=0`` does: the
    default (6514) taken by another program does not stop it."""
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    default = Settings().audit.arr_tls_port
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", default))
        holder.listen()
    except OSError:
        # Taken already by some other program: the same case.
        pass
    process = _arr_process([sys.executable, "-m", "xdsi"], config, pki)
    said: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while not any(line.startswith("query") for line in said):
            line = process.stdout.readline()
            said.append(line)
            assert line or process.poll() is None, "".join(said)
            assert time.monotonic() < deadline, "".join(said)
    finally:
        process.terminate()
        process.wait(timeout=30)
        holder.close()

    (tls,) = [line for line in said if line.startswith("syslog tls")]
    assert int(tls.split()[-1]) not in (0, default)


def test_audit_lists_show_what_peers_sent_as_text_not_as_markup(
    arr: tuple[Path, Pki, dict[str, str]], tmp_path: Path
) -> None:
    """A peer names itself (AuditSourceID, a WS-Addressing reply address as
    an ActiveParticipant's UserID) as it likes: both audit lists print the
    name as sent, where rich read "[/]" as markup and ended the command
    with a MarkupError traceback, and "[bold]" styled the rest of the row;
    a bidirectional override is escaped."""
    config, pki, endpoints = arr
    named = "[/]peer[bold]\u202e"
    event = retrieve_event(1)
    event = replace(event, destination=replace(event.destination, user_id=named))
    spool = AuditSpool(tmp_path / "node" / "audit")
    spool.write(build_audit_message(event, audit_source_id=named))
    _forward(spool, pki, endpoints, ("syslog tls",), stored=1)

    shown = "[/]peer[bold]\\u202e"
    from_arr = _xdsi(config, "audit", "list", "--arr")
    assert shown in from_arr.stdout
    # The event by its name, as the node's own list gives it.
    assert "Export" in from_arr.stdout and "110106" not in from_arr.stdout
    assert "\u202e" not in from_arr.stdout
    own = _xdsi(config, "audit", "list")
    assert shown in own.stdout
    assert "\u202e" not in own.stdout


def test_audit_list_xml_stays_one_document_when_a_peer_sent_control_bytes(
    arr: tuple[Path, Pki, dict[str, str]],
) -> None:
    """RFC 5426 3.1: a datagram that is no AuditMessage is kept as received,
    control characters and all; ``audit list --arr --xml`` still prints one
    well-formed document (XML 1.0 2.2 has no escape for them), the bytes it
    cannot carry replaced."""
    config, _, endpoints = arr
    sent = b"<13>1 - peer xdsi 1 IHE+RFC-3881 - \xef\xbb\xbfnot\x00 <xml>\x07\x1b[2J"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(sent, ("127.0.0.1", int(endpoints["syslog udp"])))
    deadline = time.monotonic() + 30
    while not _query(endpoints, "") and time.monotonic() < deadline:
        time.sleep(0.1)

    listed = _xdsi(config, "audit", "list", "--arr", "--xml")
    document = etree.fromstring(listed.stdout.encode("utf-8"))
    (record,) = document
    assert record.tag == "MalformedRecord"
    assert record.text == "not\ufffd <xml>\ufffd\ufffd[2J"


def test_idle_query_connections_leave_the_syslog_listener_its_descriptors(
    tmp_path: Path,
) -> None:
    """ITI TF-2 3.20: audit messages still arrive over TLS (RFC 5425) while
    peers hold more idle connections to the query endpoint than the process
    has file descriptors for; the endpoint takes a bounded number and
    closes the rest, where it took each, a thread and a descriptor apiece,
    and left none for the syslog listener to accept with."""
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    descriptors = 256
    # The limit is set in a first interpreter, which then becomes xdsi, its
    # process id and the limit kept (preexec_fn is unsafe with threads).
    launcher = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({descriptors}, {descriptors})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'xdsi', *sys.argv[1:]])"
    )
    process = _arr_process([sys.executable, "-c", launcher], config, pki)
    idle: list[socket.socket] = []
    try:
        assert process.stdout is not None
        endpoints: dict[str, str] = {}
        while "query" not in endpoints:
            line = process.stdout.readline()
            assert line, "xdsi arr ended before it listened"
            name, _, value = line.rstrip().rpartition(" ")
            endpoints[name.strip()] = value
        http_port = int(endpoints["query"].split(":")[2].split("/")[0])
        # Twice as many as the process may open: a listener that takes each
        # runs out of descriptors, and then its listen queue fills.
        for _ in range(2 * descriptors):
            try:
                idle.append(socket.create_connection(("127.0.0.1", http_port), 10))
            except OSError:
                break

        sender = TlsSender(
            "127.0.0.1", int(endpoints["syslog tls"]), pki.client_context()
        )
        xml = build_audit_message(retrieve_event(1), audit_source_id="xdsi")
        try:
            sender.send(format_message(xml, app_name="xdsi"))
        finally:
            sender.close()
        for sock in idle:
            sock.close()
        idle.clear()
        deadline = time.monotonic() + 30
        while not _query(endpoints, "") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r["valid"] for r in _query(endpoints, "")] == [True]
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        process.wait(timeout=30)


def test_arr_list_writes_an_early_event_time_with_four_digit_years(
    arr: tuple[Path, Pki, dict[str, str]],
) -> None:
    """DICOM PS3.15 A.5.1: EventDateTime is an xs:dateTime, which a peer may
    set to year 1; ``audit list --arr`` writes its year in four digits, as
    the column's ISO 8601 form has it, not "1-01-01"."""
    config, _, endpoints = arr
    xml = build_audit_message(retrieve_event(1), audit_source_id="xdsi")
    early = re.sub(
        rb'EventDateTime="[^"]*"', b'EventDateTime="0001-01-01T00:00:00Z"', xml
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(
            format_message(early, app_name="peer"),
            ("127.0.0.1", int(endpoints["syslog udp"])),
        )
    deadline = time.monotonic() + 30
    while not _query(endpoints, "") and time.monotonic() < deadline:
        time.sleep(0.1)

    listed = _xdsi(config, "audit", "list", "--arr")
    assert "0001-01-01 00:00:00" in listed.stdout


def _arr_run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``xdsi arr ARGS`` that is expected to end by itself."""
    return subprocess.run(
        [sys.executable, "-m", "xdsi", "--config", str(config), "arr", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (("--cert=server.pem",), "TLS needs --cert, --key and --ca together"),
        (("--crl=ca.crl",), "--crl goes with --cert, --key and --ca"),
    ],
    ids=["cert-alone", "crl-alone"],
)
def test_arr_given_tls_files_that_do_not_go_together_is_a_wrong_argument(
    tmp_path: Path, given: tuple[str, ...], said: str
) -> None:
    """ITI TF-2 3.19 needs the certificate, its key and the CA of the
    senders: one without the others is a wrong argument (exit 2), refused
    before any listener starts."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    for name in ("server.pem", "ca.crl"):
        (tmp_path / name).write_text("")
    arguments = [a.replace("=", f"={tmp_path}/") for a in given]

    ran = _arr_run(config, "--udp-port=0", "--http-port=0", *arguments)

    assert ran.returncode == 2, ran.stderr
    assert said in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("held", ["udp", "http"])
def test_arr_whose_port_is_held_names_that_port_and_its_option(
    tmp_path: Path, held: str
) -> None:
    """A port another program holds stops the ARR (exit 1) with a message
    naming the listener, the port and the option that moves it, not the
    advice werkzeug prints for its own command line."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    kind = socket.SOCK_DGRAM if held == "udp" else socket.SOCK_STREAM
    holder = socket.socket(socket.AF_INET, kind)
    holder.bind(("127.0.0.1", 0))
    if held == "http":
        holder.listen()
    port = holder.getsockname()[1]
    try:
        ran = _arr_run(
            config,
            f"--udp-port={port if held == 'udp' else 0}",
            f"--http-port={port if held == 'http' else 0}",
        )
    finally:
        holder.close()

    assert ran.returncode == 1, ran.stderr
    if held == "udp":
        assert f"syslog on 127.0.0.1 (udp {port})" in ran.stderr
        assert "--udp-port" in ran.stderr
    else:
        assert f"query port 127.0.0.1:{port}" in ran.stderr
        assert "--http-port" in ran.stderr
    assert "is in use by another program" not in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[Path, AuditRecordStore]]:
    """A config whose storage holds what an ARR stored: five AuditMessages,
    then malformed messages, one from a peer named at length, whose table
    is wider than a pipe's 400 columns."""
    config = tmp_path / "xdsi.toml"
    config.write_text(f'[node]\nstorage_dir = "{tmp_path / "node"}"\n')
    (tmp_path / "node").mkdir()
    engine = make_engine(f"sqlite:///{tmp_path / 'node' / 'xdsi.sqlite'}")
    store = AuditRecordStore(engine)
    for i in range(1, 6):
        xml = build_audit_message(retrieve_event(i), audit_source_id="xdsi")
        raw = format_message(xml, app_name="peer")
        store.store(raw, transport="udp", peer=f"127.0.0.1:{1000 + i}")
    cut = b"<85>1 - h xdsi - IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage a='" + b"b" * 600
    store.store(cut, transport="tls", peer="127.0.0.1:1006")
    store.store(b"not syslog", transport="udp", peer=f"{'h' * 240}:1007")
    yield config, store
    engine.dispose()


def _listed(config: Path, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["--config", str(config), "audit", "list", "--arr", *args]
    )
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("form", ["table", "--json", "--xml"])
def test_audit_list_arr_prints_the_same_whatever_its_page_size(
    stored: tuple[Path, AuditRecordStore], form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit list --arr`` reads the records a page at a time; what it
    prints is the same as when all are one page."""
    config, store = stored
    args = () if form == "table" else (form,)
    whole = _listed(config, *args)

    monkeypatch.setattr(audit_repository, "PAGE_SIZE", 2)
    paged = _listed(config, *args)

    assert paged == whole
    if form == "--json":
        records = [r.as_json() for r in store.query()]
        assert paged == json.dumps(records, indent=2) + "\n"
    if form == "--xml":
        listed = etree.fromstring(paged.encode())
        assert [e.tag for e in listed] == ["AuditMessage"] * 5 + ["MalformedRecord"] * 2
    if form == "table":
        assert max(len(line) for line in paged.splitlines()) <= 400
        assert paged.count("127.0.0.1:10") == 6


@pytest.mark.parametrize(
    ("form", "mark"),
    [
        ("table", "127.0.0.1:10"),
        ("--json", '"id": '),
        ("--xml", "</AuditMessage>|</MalformedRecord>"),
    ],
)
def test_audit_list_arr_prints_each_page_before_it_reads_the_next(
    stored: tuple[Path, AuditRecordStore],
    form: str,
    mark: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However many records the ARR holds, ``audit list --arr`` holds a page
    of them: when it reads a page, those before it are printed."""
    config, _ = stored
    monkeypatch.setattr(audit_repository, "PAGE_SIZE", 2)
    printed: list[int] = []

    def read(*args: object) -> None:
        statement = str(args[2])
        if "FROM audit_record" in statement and "LIMIT" in statement:
            sys.stdout.flush()
            printed.append(len(re.findall(mark, sys.stdout.buffer.getvalue().decode())))

    event.listen(Engine, "before_cursor_execute", read)
    try:
        _listed(config, *(() if form == "table" else (form,)))
    finally:
        event.remove(Engine, "before_cursor_execute", read)

    # Seven records, two a page: the last of four pages is read after six
    # are printed (a table reads them all once before, to measure them).
    assert printed[-4:] == [0, 2, 4, 6]

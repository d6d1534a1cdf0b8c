"""Shared test fixtures: the shared data folder, peers, schema validators."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
import pytest
from lxml import etree

from xdsi.wire.schema import compiled

ROOT = Path(__file__).resolve().parent.parent

# DICOM dates and times are local, and the node writes them in UTC by its
# own time zone where an instance gives no offset (xdsi.dicom.mapping). The
# tests, and the nodes they start, run in UTC whatever the machine's zone,
# so that the values they expect are the shared studies' own.
os.environ["TZ"] = "UTC"
time.tzset()


@contextmanager
def terminal_signals() -> Iterator[None]:
    """Processes started meanwhile take SIGINT and SIGHUP as a terminal's
    foreground job does, whatever this test run inherited.

    Run under nohup, or in the background of a non-interactive shell, the
    run ignores SIGHUP or SIGINT, and an ignored signal stays ignored in
    every program it starts (execve(2)), so that a test sending one would
    wait for good; a handled signal is reset to its default instead. Only
    in the main thread (signal.signal).
    """
    held = (signal.SIGINT, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _no_op) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _no_op(*_: object) -> None:
    pass


def shared_dir() -> Path:
    """The shared data folder: $XDSI_SHARED, else ../shared beside the clone."""
    return Path(os.environ.get("XDSI_SHARED", ROOT.parent / "shared"))


SHARED = shared_dir()
SCHEMAS = ROOT / "xdsi" / "schemas"


def require(what: str, present: bool) -> None:
    """Fail under CI=true, skip elsewhere, when a peer or data set is missing."""
    if present:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing; CI installs it (.ci/run)")
    pytest.skip(f"{what} is missing")


def require_program(name: str) -> str:
    path = shutil.which(name)
    require(f"program {name}", path is not None)
    assert path is not None
    return path


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    require(f"shared data {path}", path.exists())
    return path


# The two studies xdsi ships for its demo (xdsi/data, copies of the shared
# data set's dicom/study-ct and dicom/study-mr with their licence notices).
BUNDLED = ROOT / "xdsi" / "data"
BUNDLED_STUDIES = ("study-ct", "study-mr")


def dicom_path(*parts: str) -> Path:
    """A file or folder of the shared DICOM data set (its dicom/ folder).

    The studies xdsi ships are read from the project, so that the tests of
    them run on a clone alone; the rest needs the shared data set.
    """
    if parts and Path(parts[0]).parts[0] in BUNDLED_STUDIES:
        return BUNDLED.joinpath(*parts)
    return shared_path("dicom", *parts)


def schema(relative: str) -> etree.XMLSchema:
    """Compile one of the official schemas (the copy under xdsi/schemas)."""
    return compiled(relative)


# Which schema validates which root element (xdsi/schemas/README.md).
_QUERY = "{urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0}"
_XDSB = "{urn:ihe:iti:xds-b:2007}"
_REPOSITORY_XSD = "IHE/XDS.b_DocumentRepository.xsd"
SCHEMA_FOR_ROOT = {
    f"{_QUERY}AdhocQueryRequest": "ebRS/query.xsd",
    f"{_QUERY}AdhocQueryResponse": "ebRS/query.xsd",
    "{urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0}SubmitObjectsRequest": "ebRS/lcm.xsd",
    "{urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0}RegistryResponse": "ebRS/rs.xsd",
    f"{_XDSB}ProvideAndRegisterDocumentSetRequest": _REPOSITORY_XSD,
    f"{_XDSB}RetrieveDocumentSetRequest": _REPOSITORY_XSD,
    f"{_XDSB}RetrieveDocumentSetResponse": _REPOSITORY_XSD,
    "{urn:ihe:rad:xdsi-b:2009}RetrieveImagingDocumentSetRequest": (
        "IHE/XDSI.b_ImagingDocumentSource.xsd"
    ),
}


def assert_valid(element: etree._Element, relative: str | None = None) -> None:
    """Validate an element against its official schema, with the errors shown."""
    relative = relative or SCHEMA_FOR_ROOT[element.tag]
    validator = schema(relative)
    document = etree.ElementTree(etree.fromstring(etree.tostring(element)))
    if not validator.validate(document):
        errors = "\n".join(str(e) for e in validator.error_log)
        raise AssertionError(
            f"{element.tag} is not valid against {relative}:\n{errors}"
        )


@cache
def _native_dicom_model_schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMAS / "dicom" / "native-dicom-model.rng")))


def assert_native_dicom_model(data: bytes) -> etree._Element:
    """Parse a Native DICOM Model document and validate it against the RELAX
    NG schema of DICOM PS3.19 A.1.6 (xdsi/schemas/dicom), errors shown."""
    root = etree.fromstring(data)
    validator = _native_dicom_model_schema()
    if not validator.validate(root):
        errors = "\n".join(str(e) for e in validator.error_log)
        raise AssertionError(f"not a valid Native DICOM Model document:\n{errors}")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests of a module that reads it mark
    themselves with ``pytestmark = pytest.mark.usefixtures("shared_data")``."""
    require(f"shared data {SHARED}", SHARED.is_dir())
    return SHARED


# --- PostgreSQL ------------------------------------------------------------


@dataclass(frozen=True)
class PostgresCluster:
    """A private PostgreSQL cluster on 127.0.0.1 that hands out databases."""

    port: int
    user: str = "xdsi"
    password: str = "xdsi"

    def admin(self) -> psycopg.Connection:
        """Connect as the superuser to the maintenance database."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        )

    def create_database(self) -> str:
        """Create an empty database owned by the test role; return its URL."""
        name = f"xdsi_{uuid.uuid4().hex}"
        with self.admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return (
            f"postgresql+psycopg://{self.user}:{self.password}"
            f"@127.0.0.1:{self.port}/{name}"
        )

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries, else those on PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _runuser() -> str | None:
    """util-linux runuser, on PATH or in the sbin folders a root PATH holds
    (a PATH without them is still a user's)."""
    return shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")


def _as_server_user() -> list[str]:
    """initdb and pg_ctl refuse root: as root, run them as user postgres."""
    if os.geteuid() != 0:
        return []
    runuser = _runuser()
    assert runuser is not None  # required by the postgresql fixture
    return [runuser, "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_cluster(pg_bin: Path) -> dict[str, Any]:
    """initdb a cluster in a new temporary folder and start it on 127.0.0.1."""
    # The server user must reach the folder; mkdtemp makes it mode 700.
    base = Path(tempfile.mkdtemp(prefix="xdsi-pg-"))
    base.chmod(0o755)
    if os.geteuid() == 0:
        server_user = pwd.getpwnam("postgres")
        os.chown(base, server_user.pw_uid, server_user.pw_gid)
    data = base / "data"
    subprocess.run(
        [
            *_as_server_user(),
            str(pg_bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )

    # A free port may be taken before the server binds it; try another.
    for _attempt in range(5):
        port = _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = subprocess.run(
            [
                *_as_server_user(),
                str(pg_bin / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                "30",
                "-o",
                options,
                "start",
            ],
            capture_output=True,
        )
        if started.returncode == 0:
            break
    else:
        log = (base / "server.log").read_text(errors="replace")
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start:\n{log}")

    cluster = PostgresCluster(port)
    with cluster.admin() as admin:
        admin.execute(f"CREATE ROLE {cluster.user} LOGIN PASSWORD '{cluster.password}'")
    return {"base": str(base), "port": port, "users": 0}


def _stop_cluster(pg_bin: Path, state: dict[str, Any]) -> None:
    data = Path(state["base"]) / "data"
    subprocess.run(
        [
            *_as_server_user(),
            str(pg_bin / "pg_ctl"),
            "-D",
            str(data),
            "-m",
            "fast",
            "-w",
            "stop",
        ],
        capture_output=True,
    )
    # Removed also when pg_ctl found the server stopped already.
    shutil.rmtree(state["base"], ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def postgresql(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the run, shared by the xdist workers.

    The first worker to ask starts it and the last one to finish stops it; a
    count under a file lock in the run's temporary folder keeps track. Each
    user creates its own databases (PostgresCluster.create_database).
    """
    pg_bin = _postgres_bin()
    require("PostgreSQL server (initdb, pg_ctl)", pg_bin is not None)
    assert pg_bin is not None
    if os.geteuid() == 0:
        require("user postgres", _user_exists("postgres"))
        require("program runuser (util-linux)", _runuser() is not None)

    run_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = run_dir.parent
    state_file = run_dir / "postgresql.json"
    with _locked(run_dir / "postgresql.lock"):
        state = (
            json.loads(state_file.read_text())
            if state_file.exists()
            else _start_cluster(pg_bin)
        )
        state["users"] += 1
        state_file.write_text(json.dumps(state))

    yield PostgresCluster(state["port"])

    with _locked(run_dir / "postgresql.lock"):
        state = json.loads(state_file.read_text())
        state["users"] -= 1
        if state["users"] == 0:
            state_file.unlink()
            _stop_cluster(pg_bin, state)
        else:
            state_file.write_text(json.dumps(state))

"""The container image of docker/: built from docker/Dockerfile, it runs the
demo, serves a node that keeps its studies across a restart and stops
cleanly on SIGTERM, and runs on PostgreSQL with docker/compose.toml.

No image registry is reached: the base image is one on the Docker host
already, $XDSI_DOCKER_BASE (.ci/run makes one of Debian's packages, whose
pip trusts this machine's CAs), else the Dockerfile's default if present.
Builds reach the package index through the host's network; every
container runs with no network but its own loopback (``--network none``),
or in the namespace of another such container, and the tests drive the
node from inside with ``docker exec``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require, require_program

DEFAULT_BASE = "python:3.11-slim-bookworm"
POSTGRES_CONTEXT = Path(__file__).parent / "peers" / "postgres-container"
# The bundled CT inside the image, and its size in instances.
STUDY_IN_IMAGE = (
    "$(python3 -c 'import pathlib, xdsi; "
    'print(pathlib.Path(xdsi.__file__).parent / "data" / "study-ct")\')'
)
CT_INSTANCES = 60
# The images a fetch into /tmp/fetched wrote, its KOS manifests left out.
FETCHED_IMAGES = (
    "find /tmp/fetched -path /tmp/fetched/manifests -prune -o -name '*.dcm' "
    "-print | wc -l"
)

pytestmark = pytest.mark.peer("docker")


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run the docker command; its standard output, or a failure with both
    outputs when it fails."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def in_container(name: str, script: str, timeout: float = 300) -> str:
    """Run a shell script in a running container; its standard output."""
    return docker("exec", name, "sh", "-c", script, timeout=timeout)


def wait_until(what: str, ready, seconds: float = 120) -> None:
    """Wait for ``ready()``, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.5)


def wait_healthy(name: str, seconds: float = 120) -> None:
    """Wait for the image's HEALTHCHECK to pass; fail with the container's
    log when it does not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        state = docker(
            "inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name
        ).split()
        if state == ["running", "healthy"]:
            return
        if state[0] != "running" or time.monotonic() > deadline:
            log = subprocess.run(
                ["docker", "logs", "--tail", "40", name],
                capture_output=True,
                text=True,
                timeout=60,
            )
            pytest.fail(
                f"container {name} is {' '.join(state)}, not healthy:\n"
                f"{log.stdout}{log.stderr}"
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def base_image() -> str:
    require_program("docker")
    up = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
    require("a running Docker daemon", up.returncode == 0)
    base = os.environ.get("XDSI_DOCKER_BASE", DEFAULT_BASE)
    present = subprocess.run(
        ["docker", "image", "inspect", base], capture_output=True, timeout=60
    )
    require(f"the Docker base image {base}", present.returncode == 0)
    return base


def build(tag: str, context: Path, base: str, *options: str) -> None:
    """Build ``context`` as ``tag`` on the base image ``base``; its build
    steps reach the package indexes through the host's network."""
    docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        *options,
        "--tag",
        tag,
        str(context),
        timeout=900,
    )


@pytest.fixture(scope="module")
def image(base_image: str) -> Iterator[str]:
    tag = f"xdsi-test:{uuid.uuid4().hex[:12]}"
    build(tag, ROOT, base_image, "--file", str(ROOT / "docker" / "Dockerfile"))
    yield tag
    docker("image", "rm", "--force", tag, check=False)


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Containers and volumes a test makes, removed after it."""
    made: list[str] = []
    yield made
    for name in made:
        docker("rm", "--force", "--volumes", name, check=False)
        docker("volume", "rm", "--force", name, check=False)


def test_the_image_runs_the_demo_on_its_own_defaults(image: str) -> None:
    out = docker("run", "--rm", "--network", "none", image, "demo", timeout=600)
    assert f"byte-identical: all {CT_INSTANCES} instances" in out


def test_a_node_in_the_image_serves_keeps_its_studies_and_stops_on_sigterm(
    image: str, names: list[str]
) -> None:
    name = f"xdsi-test-{uuid.uuid4().hex[:12]}"
    names.append(name)
    docker("volume", "create", name)
    start = [
        "--network",
        "none",
        "--name",
        name,
        "--volume",
        f"{name}:/var/lib/xdsi",
        "--health-interval",
        "1s",
    ]
    docker("run", "--detach", *start, image)
    # The image's own HEALTHCHECK says when the node listens.
    wait_healthy(name)
    # The image's user has a fixed uid, the one a bind-mounted folder is
    # given to; its volume starts closed to other users.
    assert in_container(name, "id -u").strip() == "10001"
    assert in_container(name, "stat -c %a /var/lib/xdsi").strip() == "700"

    in_container(name, "xdsi feed DOCKER-1")
    published = in_container(
        name, f"xdsi publish {STUDY_IN_IMAGE} --patient-id DOCKER-1"
    )
    assert "published" in published.lower()
    in_container(name, "xdsi fetch --patient-id DOCKER-1 --out /tmp/fetched")
    fetched = in_container(name, FETCHED_IMAGES)
    assert int(fetched) == CT_INSTANCES

    # docker stop sends SIGTERM: the node stops cleanly, not killed at the
    # end of the grace period (exit code 137).
    docker("stop", "--time", "60", name, timeout=120)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", name).strip() == "0"
    logs = subprocess.run(
        ["docker", "logs", name], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in logs.stdout + logs.stderr
    assert "can be read by other users" not in logs.stdout + logs.stderr

    # The study is in the volume when the node starts again.
    docker("start", name)
    wait_healthy(name)
    (entry,) = json.loads(in_container(name, "xdsi find --patient-id DOCKER-1 --json"))
    assert entry["mime_type"] == "application/dicom"
    assert entry["status"].endswith("Approved")


def test_the_health_check_of_a_node_under_tls_raises_no_security_alert(
    image: str, names: list[str]
) -> None:
    """The HEALTHCHECK looks the node's ports up, not connecting to them: a
    TLS listener would log and audit each check's connection, closed before
    its handshake, as a refused peer (a Security Alert for the ARRs)."""
    name = f"xdsi-test-{uuid.uuid4().hex[:12]}"
    names.append(name)
    docker("volume", "create", name)
    volume = ["--network", "none", "--volume", f"{name}:/var/lib/xdsi"]
    # A test CA and the node's certificate in the volume, and a configuration
    # with [tls] and a registry on a port of its own, which the check follows.
    docker(
        "run",
        "--rm",
        *volume,
        "--entrypoint",
        "sh",
        image,
        "-c",
        "xdsi tls make-ca /var/lib/xdsi/pki/ca >/dev/null"
        " && { cat /etc/xdsi/xdsi.toml; printf '[registry]\\nport = 9181\\n';"
        " xdsi tls make-cert /var/lib/xdsi/pki/node --ca /var/lib/xdsi/pki/ca"
        " --name localhost; } > /var/lib/xdsi/tls.toml",
    )
    docker(
        "run",
        "--detach",
        *volume,
        "--name",
        name,
        "--health-interval",
        "1s",
        "--env",
        "XDSI_CONFIG=/var/lib/xdsi/tls.toml",
        image,
    )
    wait_healthy(name)
    time.sleep(3)  # a few more checks
    assert docker("inspect", "--format", "{{.State.Health.Status}}", name).strip() == (
        "healthy"
    )
    assert "Security Alert" not in in_container(name, "xdsi audit list")
    logs = subprocess.run(
        ["docker", "logs", name], capture_output=True, text=True, timeout=60
    )
    assert "https://localhost:9181/xds/registry" in logs.stdout + logs.stderr
    assert "refused peer" not in logs.stdout + logs.stderr


def test_the_image_runs_on_postgresql_with_the_compose_configuration(
    base_image: str, image: str, names: list[str]
) -> None:
    postgres = f"xdsi-test-pg-{uuid.uuid4().hex[:12]}"
    build(postgres, POSTGRES_CONTEXT, base_image)
    names.append(postgres)
    password = uuid.uuid4().hex
    # compose.toml names the database host "db"; here it is the loopback of
    # the PostgreSQL container, whose network namespace the node shares.
    docker(
        "run",
        "--detach",
        "--network",
        "none",
        "--name",
        postgres,
        "--add-host",
        "db:127.0.0.1",
        "--env",
        "POSTGRES_USER=xdsi",
        "--env",
        "POSTGRES_DB=xdsi",
        "--env",
        f"POSTGRES_PASSWORD={password}",
        postgres,
    )
    try:
        wait_until(
            "PostgreSQL ready",
            lambda: (
                subprocess.run(
                    ["docker", "exec", postgres, "pg_isready", "-h", "127.0.0.1"],
                    capture_output=True,
                    timeout=30,
                ).returncode
                == 0
            ),
        )
        node = f"xdsi-test-{uuid.uuid4().hex[:12]}"
        names.insert(0, node)
        docker(
            "run",
            "--detach",
            "--network",
            f"container:{postgres}",
            "--name",
            node,
            "--health-interval",
            "1s",
            "--env",
            "XDSI_CONFIG=/etc/xdsi/compose.toml",
            "--env",
            f"PGPASSWORD={password}",
            "--volume",
            f"{ROOT / 'docker' / 'compose.toml'}:/etc/xdsi/compose.toml:ro",
            image,
        )
        wait_healthy(node)
        in_container(node, "xdsi feed DOCKER-PG-1")
        in_container(node, f"xdsi publish {STUDY_IN_IMAGE} --patient-id DOCKER-PG-1")
        in_container(node, "xdsi fetch --patient-id DOCKER-PG-1 --out /tmp/fetched")
        fetched = in_container(node, FETCHED_IMAGES)
        assert int(fetched) == CT_INSTANCES
        # What the node keeps is in PostgreSQL, not in a SQLite file.
        held = in_container(
            postgres,
            "psql -h /var/run/postgresql -U postgres -d xdsi -tAc "
            "'SELECT count(*) FROM imaging_instance'",
        )
        assert int(held) == CT_INSTANCES
        sqlite = in_container(node, "find /var/lib/xdsi -name '*.sqlite*' | wc -l")
        assert int(sqlite) == 0
    finally:
        docker("image", "rm", "--force", postgres, check=False)


def test_the_compose_file_needs_the_database_password(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    require("program docker-compose", compose is not None)
    assert compose is not None
    file = str(ROOT / "docker" / "compose.yaml")
    env = {k: v for k, v in os.environ.items() if k != "XDSI_DB_PASSWORD"}

    def config(**password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [compose, "--file", file, "config"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **password},
            cwd=tmp_path,
        )

    refused = config()
    assert refused.returncode != 0
    assert "XDSI_DB_PASSWORD" in refused.stderr
    taken = config(XDSI_DB_PASSWORD="a-password")
    assert taken.returncode == 0, taken.stderr
    assert "PGPASSWORD: a-password" in taken.stdout
    assert "POSTGRES_PASSWORD: a-password" in taken.stdout

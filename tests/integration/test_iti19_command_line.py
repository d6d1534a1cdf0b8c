"""The command line over mutual TLS: ``xdsi tls make-ca``, ``make-cert``, a
served node fed over MLLPS, and ``xdsi demo --tls``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import ROOT, dicom_path
from tests.integration.test_command_line import _free_port, _xdsi


@pytest.fixture
def tls_config(tmp_path: Path) -> Path:
    """A node configuration whose [tls] section is what make-cert printed."""
    config = tmp_path / "xdsi.toml"
    config.write_text("")
    _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"))
    made = _xdsi(
        config, "tls", "make-cert", str(tmp_path / "node"), "--ca", str(tmp_path / "ca")
    )
    config.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "storage"}"\n'
        f"[registry]\nport = {_free_port()}\nfeed_port = {_free_port()}\n"
        f"[repository]\nport = {_free_port()}\n"
        f"[imaging_source]\nport = {_free_port()}\n" + made.stdout
    )
    return config


@pytest.fixture
def served_over_tls(tls_config: Path) -> Iterator[Path]:
    """``xdsi serve`` with the generated certificates."""
    with _serving(tls_config):
        yield tls_config


@contextmanager
def _serving(config: Path) -> Iterator[None]:
    """``xdsi serve`` with ``config``, until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-m", "xdsi", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("storage"):
                break
            if process.poll() is not None:
                raise AssertionError("xdsi serve exited:\n" + "".join(lines))
        (registry,) = [line for line in lines if line.startswith("registry")]
        assert "https://127.0.0.1:" in registry
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_feed_over_mllps_to_a_served_node_is_acknowledged(
    served_over_tls: Path,
) -> None:
    """ITI TF-2 3.19, ITI TF-2 3.8: xdsi feed authenticates and is answered."""
    result = _xdsi(served_over_tls, "feed", "XDSI-TLS-1")

    assert result.stdout.strip() == "ITI-8 ADT^A01: ACK AA"


def test_feed_without_tls_to_a_tls_node_fails(served_over_tls: Path, tmp_path: Path):
    """ITI TF-2 3.19: a clear-text feed gets no acknowledgement."""
    plain = tmp_path / "plain.toml"
    text = served_over_tls.read_text()
    plain.write_text(text[: text.index("[tls]")])

    result = _xdsi(plain, "feed", "XDSI-TLS-1", check=False)

    assert result.returncode == 1
    assert "ITI-8 feed failed" in result.stderr


def test_fetch_stores_into_a_pacs_over_dicom_tls(tls_config: Path) -> None:
    """DICOM PS3.15 B.1, ITI TF-2 3.19: ``fetch --to-pacs --pacs-tls`` sends
    by C-STORE over mutual TLS (into the served node's own storage SCP,
    which holds the instances already and says so with Success)."""
    dicom_port = _free_port()
    config = tls_config
    config.write_text(
        config.read_text().replace(
            "[imaging_source]\n",
            f"[imaging_source]\nstore_scp = true\ndicom_port = {dicom_port}\n",
        )
    )
    images = dicom_path("study-mr", "images")
    with _serving(config):
        _xdsi(config, "feed", "XDSI-TLS-PACS")
        _xdsi(config, "publish", str(images), "--patient-id", "XDSI-TLS-PACS")

        fetched = _xdsi(
            config,
            "fetch",
            "--patient-id",
            "XDSI-TLS-PACS",
            "--out",
            str(config.parent / "out"),
            "--to-pacs",
            f"XDSI@127.0.0.1:{dicom_port}",
            "--pacs-tls",
        )

    count = len(list(images.iterdir()))
    assert f"{count} instances stored in XDSI@127.0.0.1:{dicom_port}" in (
        fetched.stdout
    )


def test_pacs_tls_needs_tls_configured(tmp_path: Path) -> None:
    """``--pacs-tls`` without [tls] is a wrong argument (exit 2), not a
    clear-text C-STORE."""
    config = tmp_path / "xdsi.toml"
    config.write_text("")

    result = _xdsi(
        config,
        "fetch",
        "--patient-id",
        "P",
        "--out",
        str(tmp_path / "out"),
        "--to-pacs",
        "PACS@127.0.0.1:11112",
        "--pacs-tls",
        check=False,
    )

    assert result.returncode == 2
    assert "[tls] enabled" in result.stderr


def test_demo_runs_the_chain_over_mutual_tls(tmp_path: Path) -> None:
    """ITI TF-2 3.19: ``xdsi demo --tls`` runs every exchange over mutual TLS."""
    config = tmp_path / "xdsi.toml"
    config.write_text("")

    result = _xdsi(config, "demo", "--tls")

    assert "the XDS-I.b chain over mutual TLS" in result.stdout
    assert "https://127.0.0.1:" in result.stdout
    assert "byte-identical" in result.stdout


def test_make_ca_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """A second make-ca into the same directory would leave every
    certificate the first CA signed unverifiable: it is refused unless
    forced."""
    config = tmp_path / "xdsi.toml"
    config.write_text("")
    _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"))
    first = (tmp_path / "ca" / "ca.pem").read_bytes()

    again = _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"), check=False)
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == first

    forced = _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"), "--force")
    assert forced.returncode == 0
    assert (tmp_path / "ca" / "ca.pem").read_bytes() != first


def test_make_crl_writes_a_crl_of_the_ca_listing_the_revoked(tmp_path: Path) -> None:
    """``xdsi tls make-crl``: a CRL (RFC 5280 5) signed by the test CA, whose
    revoked certificates are those named, for ``[tls] crls``."""
    config = tmp_path / "xdsi.toml"
    config.write_text("")
    _xdsi(config, "tls", "make-ca", str(tmp_path / "ca"))
    _xdsi(
        config, "tls", "make-cert", str(tmp_path / "old"), "--ca", str(tmp_path / "ca")
    )
    old = tmp_path / "old" / "node.pem"

    made = _xdsi(
        config,
        "tls",
        "make-crl",
        str(tmp_path / "ca.crl"),
        "--ca",
        str(tmp_path / "ca"),
        "--revoke",
        str(old),
    )

    assert "revokes 1 certificate" in made.stdout
    crl = x509.load_pem_x509_crl((tmp_path / "ca.crl").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.pem").read_bytes())
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())
    serial = x509.load_pem_x509_certificate(old.read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.next_update_utc is not None
    missing = _xdsi(
        config,
        "tls",
        "make-crl",
        str(tmp_path / "x.crl"),
        "--ca",
        str(tmp_path / "old"),
        check=False,
    )
    assert missing.returncode == 1 and "cannot make the CRL" in missing.stderr


@pytest.mark.parametrize("broken", ["missing", "other-key"])
def test_a_tls_file_that_cannot_be_used_ends_a_client_command_with_its_name(
    tls_config: Path, tmp_path: Path, broken: str
) -> None:
    """A [tls] file missing, or a key that is not the certificate's, ends
    each client command with one line naming the setting and the file, no
    traceback, before anything is made: fetch makes no --out folder."""
    text = tls_config.read_text()
    (key,) = [
        line.split("=", 1)[1].strip().strip('"')
        for line in text.splitlines()
        if line.startswith("private_key")
    ]
    if broken == "missing":
        Path(key).unlink()
        said = f"[tls] private_key {key}: No such file or directory"
    else:
        _xdsi(
            tls_config,
            "tls",
            "make-cert",
            str(tmp_path / "other"),
            "--ca",
            str(tmp_path / "ca"),
        )
        (other_key,) = (tmp_path / "other").glob("*key*.pem")
        tls_config.write_text(text.replace(key, str(other_key)))
        said = "[tls] certificate and private_key "
    out = tmp_path / "fetched"

    for command in (
        ("find", "--patient-id", "PAT-1"),
        ("fetch", "--patient-id", "PAT-1", "--out", str(out)),
        ("submit", "--patient-id", "PAT-1", str(tls_config)),
        ("feed", "PAT-1"),
    ):
        ran = _xdsi(tls_config, *command, check=False)
        assert ran.returncode == 1, ran.stderr
        assert "Traceback" not in ran.stderr, ran.stderr
        assert said in ran.stderr, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    assert not out.exists()

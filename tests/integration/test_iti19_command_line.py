"""The command line over mutual TLS: ``xdsi tls make-ca``, ``make-cert``, a
served node fed over MLLPS, and ``xdsi demo --tls``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
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
    process = subprocess.Popen(
        [sys.executable, "-m", "xdsi", "--config", str(tls_config), "serve"],
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
        yield tls_config
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

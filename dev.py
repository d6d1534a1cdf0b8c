#!/usr/bin/env python3
"""Set up a virtual environment and run xdsi's main job or its tests.

    python3 dev.py demo    # install into .venv, then run `xdsi demo`
    python3 dev.py test    # install with test extras, then run the test suite

Any further arguments go to the command (`python3 dev.py test -k mtom`).
Needs only Python 3.11+ and access to the package registry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_environment(extras: str) -> None:
    """Create .venv and install xdsi (editable) when pyproject.toml changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 (runs on any python3 first)
        sys.exit(f"xdsi needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    target = f".[{extras}]" if extras else "."
    print(f"installing xdsi{f'[{extras}]' if extras else ''} into {VENV}", flush=True)
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            target,
        ],
        cwd=ROOT,
        check=True,
    )
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        ensure_environment("")
        return subprocess.run([str(BIN / "xdsi"), "demo", *rest], cwd=ROOT).returncode
    ensure_environment("test")
    # pytest exits 5 when no test ran; that is a failure here, as any non-zero.
    return subprocess.run(
        [*private_network(), str(BIN / "python"), "-m", "pytest", *rest], cwd=ROOT
    ).returncode


def private_network() -> list[str]:
    """The command prefix that runs the tests in a network namespace of their
    own, with only loopback up, when root can make one.

    Orthanc and the dcmtk servers bind 0.0.0.0; in such a namespace that is
    loopback alone (../shared/peers.md, "Read this first"). Installs happen
    before, outside it, as it has no network.
    """
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if os.name == "nt" or os.geteuid() != 0 or not unshare or not ip:
        return []
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return []
    return [
        unshare,
        "--net",
        "--fork",
        "--",
        "sh",
        "-c",
        f'{ip} link set lo up && exec "$@"',
        "sh",
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

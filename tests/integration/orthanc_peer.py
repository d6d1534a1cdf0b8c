"""Orthanc as a test peer: a PACS that sends studies and receives them.

Orthanc 1.10 binds 0.0.0.0 only, so it runs solely inside a private network
namespace whose one interface is loopback (shared peers.md, "Read this
first"); :func:`require_private_netns` skips, or fails under CI=true,
anywhere else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.conftest import require

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")


def only_loopback() -> bool:
    """Whether this process's network namespace has no interface but lo.

    /proc/self/net follows the process's network namespace; /sys/class/net
    shows that of whoever mounted sysfs, so `unshare --net` alone would not
    change it.
    """
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":", 1)[0].strip() for line in lines] == ["lo"]


def require_private_netns() -> None:
    require(
        "a private network namespace with only lo (unshare --net; peers.md)",
        only_loopback(),
    )


@dataclass
class Orthanc:
    """One running Orthanc: AE title, DICOM and HTTP ports on 127.0.0.1."""

    ae_title: str
    dicom_port: int
    http_port: int
    storage: Path
    process: subprocess.Popen  # type: ignore[type-arg]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> requests.Response:
        response = requests.get(self.url + path, timeout=60)
        response.raise_for_status()
        return response

    def post(self, path: str, body: object) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = requests.post(self.url + path, data=data, timeout=300)
        response.raise_for_status()
        return response


@contextmanager
def orthanc(
    workdir: Path,
    ae_title: str,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, tuple[str, str, int]],
) -> Iterator[Orthanc]:
    """Start an Orthanc in ``workdir``; stop it by its PID on exit."""
    require_private_netns()
    require(f"program {ORTHANC}", shutil.which(ORTHANC) is not None)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": ae_title,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {k: list(v) for k, v in modalities.items()},
        "UnknownSopClassAccepted": True,
        "StableAge": 1,
        "SaveJobs": False,
        "DicomAssociationCloseDelay": 0,
        "Plugins": [str(PLUGINS / "libOrthancGdcm.so")],
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT
    )
    peer = Orthanc(ae_title, dicom_port, http_port, workdir / "storage", process)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                peer.get("/system")
                break
            except requests.RequestException:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc {ae_title} did not start; see {workdir}/orthanc.log"
                    ) from None
                time.sleep(0.2)
        yield peer
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

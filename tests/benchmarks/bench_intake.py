"""Benchmark: C-STORE intake of the Imaging Document Source against dcmtk's
storescp, both receiving the same study from dcmtk's storescu.

Run on demand (not a test), as root, since storescp binds 0.0.0.0 and so
runs only inside a private network namespace (shared peers.md)::

    unshare --net --fork -- sh -c 'ip link set lo up && \\
        python tests/benchmarks/bench_intake.py [STUDY_DIR] [--rounds N]'

Each round sends the whole study with ``storescu +sd +r`` over one
association, first to storescp (bit-preserving, writing files), then to a
node's C-STORE SCP (streamed to disk, checked, deduplicated, indexed; the
node's store starts empty each round). The ratio printed is storescp's time
over ours: 1.0 means as fast, the target is 0.8 or more.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from xdsi.app import Node
from xdsi.cli import bundled_study
from xdsi.config import Settings

STORESCP_PORT = 11113
STORESCU = ["storescu", "-aet", "BENCH", "+sd", "+r"]


def only_loopback() -> bool:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return [line.split(":", 1)[0].strip() for line in lines] == ["lo"]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def send(study: Path, ae_title: str, port: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [*STORESCU, "-aec", ae_title, "127.0.0.1", str(port), str(study)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def storescp_round(study: Path, workdir: Path) -> float:
    out = workdir / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    server = subprocess.Popen(
        [
            "storescp",
            "-dhl",
            "-aet",
            "STORESCP",
            "+B",
            "-od",
            str(out),
            str(STORESCP_PORT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(STORESCP_PORT)
        return send(study, "STORESCP", STORESCP_PORT)
    finally:
        server.terminate()
        server.wait(timeout=30)


def xdsi_round(study: Path, workdir: Path) -> float:
    storage = workdir / "node"
    shutil.rmtree(storage, ignore_errors=True)
    settings = (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    # Publication is not timed: the quiet time outlasts the round.
    settings = replace(
        settings,
        imaging_source=replace(
            settings.imaging_source, store_scp=True, dicom_port=0, publish_after=3600
        ),
    )
    node = Node(settings)
    effective = node.start()
    try:
        cfg = effective.imaging_source
        return send(study, cfg.ae_title, cfg.dicom_port)
    finally:
        node.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", type=Path, default=bundled_study())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not only_loopback():
        print("run inside a private network namespace (see the docstring)")
        return 2
    if shutil.which("storescp") is None or shutil.which("storescu") is None:
        print("dcmtk's storescp and storescu are needed")
        return 2

    files = [p for p in args.study.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    theirs, ours = [], []
    with tempfile.TemporaryDirectory(prefix="xdsi-bench-intake-") as tmp:
        workdir = Path(tmp)
        for _ in range(args.rounds):
            theirs.append(storescp_round(args.study, workdir))
            ours.append(xdsi_round(args.study, workdir))
    t_theirs, t_ours = statistics.median(theirs), statistics.median(ours)
    print(f"study: {len(files)} files, {size / 1e6:.1f} MB, {args.rounds} rounds")
    print(f"dcmtk storescp : {t_theirs:7.3f} s  {size / 1e6 / t_theirs:7.1f} MB/s")
    print(f"xdsi C-STORE   : {t_ours:7.3f} s  {size / 1e6 / t_ours:7.1f} MB/s")
    print(f"ratio (storescp time / xdsi time): {t_theirs / t_ours:.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

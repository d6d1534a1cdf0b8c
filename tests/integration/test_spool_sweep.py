"""The node's HTTP spools are swept as it starts, as its blob stores' are:
what a process killed while reading a request or writing an answer left
(patient data included) goes, what a live process holds stays."""

from __future__ import annotations

from pathlib import Path

from tests.spooling import left_by_killed_process, spooling
from xdsi.app import Node
from xdsi.config import Settings

# storage/spool/<name>: the SOAP actors', DICOMweb's and the Consumer's
# (the Document Source's, "source", is swept by ``xdsi submit``).
SPOOLS = (
    "registry",
    "repository",
    "imaging_source",
    "imaging_source-dicomweb",
    "consumer",
)


def test_a_starting_node_sweeps_what_processes_gone_left_in_its_http_spools(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "node"
    roots = [storage / "spool" / name for name in SPOOLS]
    for root in roots:
        root.mkdir(parents=True)
    left = [left_by_killed_process(root, "msg") for root in roots]
    settings = (
        Settings()
        .with_storage(storage)
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )

    with spooling(roots[1], "msg") as held:
        with Node(settings):
            assert [p for p in left if p.exists()] == []
            assert held.is_file()

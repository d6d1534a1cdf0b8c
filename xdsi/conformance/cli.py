"""``xdsi conformance run``: replay a case set against a node and report.

Against a node given by URLs or by its configuration file, or against a
node started here on loopback (``--local``) that is first given the DICOM
instances the RAD-69 cases ask for (RAD TF-3 4.68, 4.69).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import click
from lxml import etree

from xdsi import ns
from xdsi.actors.imaging_source import PublishError
from xdsi.app import Node, Services
from xdsi.config import ConfigError, Settings, load_settings
from xdsi.conformance.cases import Case, CaseSetError, load_cases
from xdsi.conformance.prepare import (
    InstanceRef,
    build_stand_ins,
    find_study_files,
    instances_to_hold,
    literal_patients,
    new_patient_id,
)
from xdsi.conformance.runner import (
    CaseResult,
    Runner,
    Target,
    junit_xml,
    order_cases,
    summary,
)
from xdsi.dicom import scan

logger = logging.getLogger(__name__)

IMAGING_TRANSACTION = "RAD-69"


def shipped_study() -> Path:
    """The IHE study shipped with xdsi (xdsi/data/study-mr)."""
    return Path(str(resources.files("xdsi") / "data" / "study-mr"))


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _most_common(values: Sequence[str]) -> str | None:
    counted = Counter(v for v in values if v)
    return counted.most_common(1)[0][0] if counted else None


def _requested(cases: Sequence[Case], local: str) -> list[str]:
    """Return the text of every ``local`` element in the RAD-69 requests
    of cases that expect Success, e.g. their RepositoryUniqueId values."""
    values = []
    for case in cases:
        if case.transaction != IMAGING_TRANSACTION or case.expect.status != "Success":
            continue
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        root = etree.parse(str(case.file), parser).getroot()
        values.extend(
            (e.text or "").strip() for e in root.iter(f"{{{ns.XDSB}}}{local}")
        )
    return values


def _parse_feed(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--feed")
    return host, int(port)


def _local_settings(
    workdir: Path,
    cases: Sequence[Case],
    repository_unique_id: str | None,
    imaging_source_unique_id: str | None,
    home_community_id: str | None,
    assigning_authority: str | None,
) -> Settings:
    """A node on loopback ports 0, identified as the case set expects.

    The Imaging Document Source takes the repositoryUniqueId and the
    homeCommunityId that the RAD-69 requests of Success cases name, unless
    given; the Document Repository keeps its own unless given. The affinity
    domain is the one most of the literal patient ids in ``needs`` belong
    to, unless given; the registry also accepts the other domains those ids
    name.
    """
    settings = Settings().with_storage(workdir / "node")
    domains = [p.split("&")[1] for c in cases for p in literal_patients(c)]
    authority = assigning_authority or _most_common(domains)
    if authority:
        # The set's other literal patient ids come from other domains (wire
        # captures of other test systems); the registry accepts those too.
        others = tuple(sorted({d for d in domains if d and d != authority}))
        settings = replace(
            settings,
            node=replace(
                settings.node,
                assigning_authority=authority,
                other_assigning_authorities=others,
            ),
        )
    settings = settings.with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    imaging_id = imaging_source_unique_id or _most_common(
        _requested(cases, "RepositoryUniqueId")
    )
    community = home_community_id or _most_common(_requested(cases, "HomeCommunityId"))
    if imaging_id:
        settings = replace(
            settings,
            imaging_source=replace(
                settings.imaging_source, repository_unique_id=imaging_id
            ),
        )
    if repository_unique_id:
        settings = replace(
            settings,
            repository=replace(
                settings.repository, repository_unique_id=repository_unique_id
            ),
        )
    if community:
        settings = replace(
            settings, node=replace(settings.node, home_community_id=community)
        )
    return settings


def _target(settings: Settings) -> Target:
    return Target(
        registry=settings.url("registry") if settings.registry.enabled else None,
        repository=settings.url("repository") if settings.repository.enabled else None,
        imaging_source=(
            settings.url("imaging_source") if settings.imaging_source.enabled else None
        ),
        feed=(settings.node.host, settings.registry.feed_port),
        repository_unique_id=settings.repository.repository_unique_id,
        assigning_authority=settings.node.assigning_authority,
    )


def imaging_needs(cases: Sequence[Case]) -> dict[str, list[InstanceRef]]:
    """The instances each RAD-69 case needs the Imaging Document Source to hold."""
    return {
        case.id: instances_to_hold(case)
        for case in cases
        if case.transaction == IMAGING_TRANSACTION
    }


def hold_imaging_data(
    services: Services,
    runner: Runner,
    cases: Sequence[Case],
    dicom_dirs: list[Path],
    workdir: Path,
    assigning_authority: str,
) -> list[str]:
    """Publish, through RAD-68, what the RAD-69 cases need; return notes.

    A study found in ``dicom_dirs`` (the shipped IHE study first) is
    published whole; every other instance is a stand-in built from an
    instance of the shipped study with exactly the requested UIDs, published
    study by study.
    """
    needed = [ref for refs in imaging_needs(cases).values() for ref in refs]
    if not needed:
        return []
    found = find_study_files(
        dicom_dirs,
        {r.study_instance_uid for r in needed if r.study_instance_uid},
        {r.series_instance_uid for r in needed if r.series_instance_uid},
    )
    folders = [
        Path(os.path.commonpath([str(f.parent) for f in files]))
        for files in found.values()
    ]

    # Stand-ins: one folder per study that no DICOM folder holds.
    missing: dict[str, list[InstanceRef]] = {}
    for ref in dict.fromkeys(needed):
        if ref.complete and ref.study_instance_uid not in found:
            missing.setdefault(ref.study_instance_uid, []).append(ref)
    for number, refs in enumerate(missing.values(), start=1):
        folder = workdir / "stand-ins" / f"study-{number}"
        build_stand_ins(_template(), refs, folder)
        folders.append(folder)

    notes = []
    wanted = set(found) | set(missing)
    for folder in folders:
        for study in scan.scan_directory(folder).studies:
            if study.study_instance_uid not in wanted:
                continue
            study = replace(
                study, series=tuple(s for s in study.series if s.modality != "KO")
            )
            patient_id = new_patient_id(assigning_authority)
            problem = runner.feed(patient_id)
            if problem:
                notes.append(problem)
            try:
                services.imaging_source.publish(study, patient_id)
            except PublishError as exc:
                notes.append(f"study {study.study_instance_uid} not published: {exc}")
    return notes


def _template() -> Path:
    """The first image of the shipped IHE study: the stand-ins' template."""
    images = sorted((shipped_study() / "images").glob("*.dcm"))
    if not images:
        raise click.ClickException(f"no images in {shipped_study()}")
    return images[0]


def _print_imaging_source_id(cases: Sequence[Case], served: Settings) -> None:
    """Name the Imaging Document Source repositoryUniqueId the RAD-69 cases
    send their requests to, when the served node has another."""
    named = _most_common(_requested(cases, "RepositoryUniqueId"))
    own = served.imaging_source.repository_unique_id
    if named and named != own:
        click.echo(
            f"# the RAD-69 cases name Imaging Document Source {named}; this node "
            f'is {own}: set [imaging_source] repository_unique_id = "{named}" '
            "or they fail with XDSUnknownRepositoryId",
            err=True,
        )


def _print_patient_domains(
    cases: Sequence[Case], authority: str, accepted: Sequence[str] = ()
) -> None:
    """Name the assigning authorities of the set's literal patient ids that
    the node must accept ITI-8 feeds of, besides its own and those it is
    set to accept already."""
    others = sorted(
        {p.split("&")[1] for c in cases for p in literal_patients(c)}
        - {authority, "", *accepted}
    )
    if others:
        click.echo(
            "# the node must also accept patients of "
            + ", ".join(others)
            + " ([node] other_assigning_authorities)",
            err=True,
        )


def _print_imaging_needs(cases: Sequence[Case]) -> None:
    for case_id, refs in imaging_needs(cases).items():
        click.echo(
            f"# {case_id} needs the Imaging Document Source to hold "
            f"{len(refs)} instance{'' if len(refs) == 1 else 's'}:",
            err=True,
        )
        for ref in refs:
            click.echo(
                f"#   {ref.study_instance_uid}/{ref.series_instance_uid}/"
                f"{ref.sop_instance_uid}",
                err=True,
            )


@click.group()
def conformance() -> None:
    """Replay Connectathon-style conformance cases against a node."""


@conformance.command("run")
@click.option(
    "--cases",
    "cases_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Case set folder holding index.json.",
)
@click.option("--registry", help="Document Registry URL (ITI-18, ITI-42).")
@click.option("--repository", help="Document Repository URL (ITI-41, ITI-43).")
@click.option("--imaging-source", help="Imaging Document Source URL (RAD-69).")
@click.option("--feed", help="ITI-8 MLLP listener of the registry, HOST:PORT.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take endpoints and identifiers from this running node's configuration.",
)
@click.option(
    "--local", is_flag=True, help="Start an xdsi node on loopback and run against it."
)
@click.option("--repository-unique-id", help="repositoryUniqueId of the Repository.")
@click.option(
    "--imaging-source-unique-id", help="repositoryUniqueId of the Imaging Source."
)
@click.option("--home-community-id", help="homeCommunityId of the node (urn:oid:…).")
@click.option(
    "--assigning-authority",
    help="Affinity domain OID for the test patients (default: the node's, "
    "else the Connectathon domain).",
)
@click.option(
    "--dicom",
    "dicom_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="DICOM studies for RAD-69 (default: <cases>/../dicom when present).",
)
@click.option(
    "--only", help="Run the cases whose id matches (fnmatch) and their needs."
)
@click.option(
    "--junit",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write JUnit XML here.",
)
@click.pass_context
def run(
    ctx: click.Context,
    cases_dir: Path,
    registry: str | None,
    repository: str | None,
    imaging_source: str | None,
    feed: str | None,
    config_file: Path | None,
    local: bool,
    repository_unique_id: str | None,
    imaging_source_unique_id: str | None,
    home_community_id: str | None,
    assigning_authority: str | None,
    dicom_dir: Path | None,
    only: str | None,
    junit: Path | None,
) -> None:
    """Replay the cases and print one line per case, then the totals.

    Exits 1 when a case fails, 2 when the run cannot start.
    """
    urls = any((registry, repository, imaging_source, feed))
    configured = (ctx.obj or {}).get("configured", False)
    given = sum((bool(urls), config_file is not None, local))
    if given > 1 or (given == 0 and not configured):
        _fail("give exactly one of: endpoint URLs, --config FILE, --local")
    try:
        cases = load_cases(cases_dir)
        selected = order_cases(cases, only)
    except CaseSetError as exc:
        _fail(str(exc))
    if not selected:
        _fail(f"no case matches {only!r}")
    if dicom_dir is None and (cases_dir / ".." / "dicom").is_dir():
        dicom_dir = (cases_dir / ".." / "dicom").resolve()

    workdir = Path(tempfile.mkdtemp(prefix="xdsi-conformance-"))
    node: Node | None = None
    served: Settings | None = None
    try:
        if local:
            node = Node(
                _local_settings(
                    workdir,
                    selected,
                    repository_unique_id,
                    imaging_source_unique_id,
                    home_community_id,
                    assigning_authority,
                )
            )
            target = _target(node.start())
        elif config_file is not None:
            try:
                served = load_settings(config_file)
            except ConfigError as exc:
                _fail(str(exc))
            target = _target(served)
        elif not urls:
            # The node named by xdsi's own --config (before the command).
            served = ctx.obj["settings"]
            target = _target(served)
        else:
            target = Target(
                registry=registry,
                repository=repository,
                imaging_source=imaging_source,
                feed=_parse_feed(feed) if feed else None,
                repository_unique_id=repository_unique_id,
            )
        if served is not None and served.tls.enabled:
            # Limitation: the runner has no TLS client (ITI TF-2 3.19).
            _fail(
                "the node's configuration has [tls] enabled, and this runner "
                "talks plain HTTP and MLLP only; run it against a node served "
                "without [tls], or with --local"
            )
        if assigning_authority:
            target = replace(target, assigning_authority=assigning_authority)

        runner = Runner(target, workdir / "spool", report=_echo)
        if node is not None:
            assert node.services is not None
            dirs = [shipped_study(), *([dicom_dir] if dicom_dir else [])]
            for note in hold_imaging_data(
                node.services,
                runner,
                selected,
                dirs,
                workdir,
                target.assigning_authority,
            ):
                click.echo(f"# {note}", err=True)
        else:
            _print_patient_domains(
                selected,
                target.assigning_authority,
                served.node.other_assigning_authorities if served else (),
            )
            if served is not None:
                _print_imaging_source_id(selected, served)
            _print_imaging_needs(selected)
        results = runner.run(cases, only)
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    click.echo(summary(results))
    if junit is not None:
        junit.write_bytes(junit_xml(results))
    sys.exit(0 if all(r.passed for r in results) else 1)


def _echo(result: CaseResult) -> None:
    click.echo(result.line())

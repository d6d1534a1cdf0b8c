"""ITI-8 Patient Identity Feed into the Document Registry over MLLP
(ITI TF-2 3.8.4.1), with the identifier domains it accepts."""

from __future__ import annotations

from dataclasses import replace

from xdsi.app import Node
from xdsi.config import Settings
from xdsi.hl7.adt import build_feed, read_ack
from xdsi.hl7.mllp import send_message


def _node(tmp_path, others: tuple[str, ...]) -> Node:  # type: ignore[no-untyped-def]
    settings = (
        Settings()
        .with_storage(tmp_path / "node")
        .with_ports(registry=0, repository=0, imaging_source=0, feed=0)
    )
    settings = replace(
        settings,
        node=replace(settings.node, other_assigning_authorities=others),
    )
    return Node(settings)


def test_feed_of_the_affinity_domain_is_accepted_and_known(tmp_path):
    """ITI TF-2 3.8.4.1.3: the registry records the domain's patient id."""
    with _node(tmp_path, ()) as node:
        patient = f"P1^^^&{node.settings.node.assigning_authority}&ISO"
        ack = send_message(
            "127.0.0.1", node.settings.registry.feed_port, build_feed(patient)
        )
        assert read_ack(ack).code == "AA"
        assert node.services.registry.knows_patient(patient)


def test_feed_of_another_domain_is_refused_unless_configured(tmp_path):
    """A PID-3 of no accepted domain is AE; a configured second domain is
    accepted, and the affinity domain still is."""
    other = "SR7^^^&1.2.260&ISO"
    with _node(tmp_path / "one", ()) as node:
        ack = send_message(
            "127.0.0.1", node.settings.registry.feed_port, build_feed(other)
        )
        assert read_ack(ack).code == "AE"
        assert not node.services.registry.knows_patient(other)
    with _node(tmp_path / "two", ("1.2.260",)) as node:
        ack = send_message(
            "127.0.0.1", node.settings.registry.feed_port, build_feed(other)
        )
        assert read_ack(ack).code == "AA"
        assert node.services.registry.knows_patient(other)

"""The Imaging Document Source intake's retry delays (RAD TF-3 4.68)."""

from __future__ import annotations

import pytest

from xdsi.actors.intake import MAX_RETRY_DELAY, retry_delay


@pytest.mark.parametrize(
    ("quiet", "failures", "delay"),
    [
        (30.0, 1, 30.0),
        (30.0, 2, 60.0),
        (30.0, 5, 480.0),
        (30.0, 8, MAX_RETRY_DELAY),
        (30.0, 10_000, MAX_RETRY_DELAY),
        (0.0, 1, 1.0),
    ],
    ids=["first", "second", "fifth", "capped", "many", "no-quiet-time"],
)
def test_retry_delay_doubles_from_the_quiet_time_up_to_an_hour(
    quiet: float, failures: int, delay: float
) -> None:
    """RAD TF-3 4.68: a study that failed to publish waits longer each time."""
    assert retry_delay(quiet, failures) == delay

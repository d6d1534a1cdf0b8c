"""Fixtures of the DICOM unit tests."""

from collections.abc import Iterator

import pytest

from xdsi import worker


@pytest.fixture
def own_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A worker process of this test's own, shut down after it."""
    monkeypatch.setattr(worker, "_executor", None)
    monkeypatch.setattr(worker, "_busy", 0)
    monkeypatch.setattr(worker, "_idle_timer", None)
    yield
    if worker._idle_timer is not None:
        worker._idle_timer.cancel()
    if worker._executor is not None:
        worker._executor.shutdown()

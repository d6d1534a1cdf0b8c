"""Fixtures of the DICOM unit tests."""

from collections.abc import Iterator

import pytest

from xdsi import worker


@pytest.fixture
def own_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A worker process of this test's own, shut down after it."""
    own = worker.Pool(1, "the test's worker process")
    monkeypatch.setattr(worker, "DEFAULT", own)
    yield
    own.close()

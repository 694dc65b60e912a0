"""Fixtures for reach tests: the network lab (skips with a reason where it cannot run)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import netlab


@pytest.fixture
def lab() -> Iterator[netlab.Lab]:
    why = netlab.unavailable()
    if why is not None:
        pytest.skip(why)
    with netlab.lab() as built:
        yield built

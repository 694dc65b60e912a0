"""py-libp2p's churn warnings are demoted; nested exception groups are logged leaf by leaf."""

from __future__ import annotations

import logging

import pytest

from peer.logging_setup import (
    QuietLibp2pFilter,
    exception_leaves,
    log_exception_leaves,
    without_teardown_races,
)


def record(name: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_expected_churn_is_dropped_below_debug() -> None:
    f = QuietLibp2pFilter()
    noisy = record("libp2p.kad_dht.kad_dht", "Failed to read DHT message from stream: EOF")
    assert f.filter(noisy) is logging.getLogger().isEnabledFor(logging.DEBUG)
    assert noisy.levelno == logging.DEBUG


def test_real_problems_and_our_own_logs_pass() -> None:
    f = QuietLibp2pFilter()
    assert f.filter(record("libp2p.network.swarm", "something new went wrong"))
    assert f.filter(record("peer.node", "Failed to read DHT message from stream"))


def test_exception_leaves_flattens_nested_groups(caplog: pytest.LogCaptureFixture) -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    group = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("x", [c])])])
    assert list(exception_leaves(group)) == [a, b, c]
    log_exception_leaves(logging.getLogger("t"), group, "services failed")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "services failed: ValueError: a",
        "services failed: KeyError: 'b'",
        "services failed: OSError: c",
    ]


def test_py_libp2p_teardown_race_is_dropped_and_nothing_else() -> None:
    race = RuntimeError("Nursery is closed to new arrivals")
    real = RuntimeError("disk full")
    assert without_teardown_races(ExceptionGroup("g", [race])) is None
    rest = without_teardown_races(ExceptionGroup("g", [race, ExceptionGroup("h", [race, real])]))
    assert rest is not None and list(exception_leaves(rest)) == [real]
    assert without_teardown_races(ExceptionGroup("g", [ValueError("x")])) is not None

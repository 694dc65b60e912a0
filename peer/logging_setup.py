"""Logging for edgeswarm processes, and the two things py-libp2p's logs get wrong.

* Shutdown (and every peer that goes away) makes py-libp2p log warnings that
  describe normal life in a P2P network ("Failed to read DHT message from
  stream", "Failed to store value at peer" ...). ``QuietLibp2pFilter`` turns
  those into DEBUG records so an operator's log shows real problems only.
* An exception inside its services can arrive as an ExceptionGroup nested
  deeper than trio prints; ``log_exception_leaves`` logs every leaf.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

# Substrings of py-libp2p warnings that are expected whenever a peer leaves.
_EXPECTED_NOISE = (
    "Failed to read DHT message from stream",
    "Incomplete DHT message from stream",
    "Failed to store value at peer",
    "Failed to get value from peer",
    "Value not found for key",
    "Quorum not met",
    "Error in DHT maintenance loop",
    "Failed to parse as protobuf",
    "Failed to store value",
    "Failed to send",
    "Error handling DHT stream",
    "Error in handle_peer_queue",
    "Stream reset",
    "Connection closed",
    "Failed to open stream",
    "Error while reading",
    "Failed to upgrade",
    "Failed to dial",
    "failed to dial",
    "Failed to notify",
    "Failed to open TCP stream",
    "MultiselectClient handshake",
    "Error in handle_incoming for peer",
    "Failed to parse protobuf message",
    "is_established=False",
    "phantom connection",
    "Auto-connect dial",
    # py-libp2p 0.8.1 sends its own bucket-refresh lookups with keys its servers reject.
    "FIND_NODE key is not a valid PeerId",
    # Circuit relay v2 (peer.reach.relay): a client closing its stream after a reservation,
    # a circuit ending, a refused stream, an AutoNAT probe's short connection.
    "Error reading from hop stream",
    "Unexpected error reading from stream",
    "Error writing to destination stream",
    "Error relaying data",
    "Error sending status message",
    "Unexpected error handling hop stream",
    "Reservation failed with relay",
    "fail to upgrade mux",
    "Error handling AutoNAT stream",
    # gossipsub queues each message for connected peers not (yet) in its topic, and warns on
    # every message once a peer that never joins the topic has 100 queued (it keeps the last
    # 100 and drops them after a TTL): normal for a peer outside a topic, not a fault.
    "pending message queue for peer",
)


class QuietLibp2pFilter(logging.Filter):
    """Demote expected py-libp2p churn warnings to DEBUG (dropped below DEBUG level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("libp2p") and record.levelno >= logging.WARNING:
            msg = record.getMessage()
            if any(noise in msg for noise in _EXPECTED_NOISE):
                record.levelno = logging.DEBUG
                record.levelname = "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


_FILTER = QuietLibp2pFilter()


def install_libp2p_filter() -> None:
    """Attach the filter to every py-libp2p logger that exists (idempotent).

    Logger-level filters see only records made on that very logger, so each
    one gets it; call this after libp2p's modules are imported.
    """
    for name, obj in list(logging.Logger.manager.loggerDict.items()):
        if not name.startswith("libp2p") or not isinstance(obj, logging.Logger):
            continue
        if _FILTER not in obj.filters:
            obj.addFilter(_FILTER)
    # The auto-connector pins itself to INFO and reports its state every 30 s;
    # let it inherit the level of the "libp2p" logger like the rest.
    auto = logging.getLogger("libp2p.network.auto_connector")
    if auto.level == logging.INFO:
        auto.setLevel(logging.NOTSET)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr as ``time level logger: message``; quiet py-libp2p's chatter."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(numeric)
    # py-libp2p logs a lot at INFO (every put, every DHT start); keep it at WARNING
    # unless the operator asked for DEBUG.
    libp2p_level = logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.setLevel(libp2p_level)
    # py-libp2p turns propagation off, so its warnings bypass our handler (and
    # its format); route them through ours, where the filter applies.
    libp2p_logger.propagate = True
    install_libp2p_filter()


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """Every non-group exception inside ``exc`` (which may be a nested ExceptionGroup)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc


_TEARDOWN_RACE = "Nursery is closed to new arrivals"


def without_teardown_races(group: BaseExceptionGroup[Any]) -> BaseExceptionGroup[Any] | None:
    """``group`` less py-libp2p's shutdown race (None if nothing else is left).

    While a peer stops, pubsub's service stops before the host's connections do, and a
    message read in that gap makes py-libp2p 0.8.1 schedule a task on its closed nursery
    (``RuntimeError: Nursery is closed to new arrivals``). Only a closing nursery raises
    it, so it is never the error that stopped the peer.
    """
    _races, rest = group.split(lambda e: isinstance(e, RuntimeError) and str(e) == _TEARDOWN_RACE)
    return rest


def reraise_lone_error(group: BaseExceptionGroup[Any], body_error: BaseException | None) -> None:
    """Trio wraps errors in (nested) groups; give a lone error back unwrapped.

    That keeps ``except ListenError`` (and errors from the caller's own ``async
    with`` body) working as callers expect. Returns if the group holds several.
    """
    leaves = [leaf for leaf in exception_leaves(group) if type(leaf).__name__ != "Cancelled"]
    if body_error is not None and leaves and all(leaf is body_error for leaf in leaves):
        raise body_error from None
    if len(leaves) == 1 and isinstance(leaves[0], Exception):
        raise leaves[0] from None


def log_exception_leaves(logger: logging.Logger, exc: BaseException, what: str) -> None:
    """Log each leaf of ``exc`` with its traceback (Cancelled and KeyboardInterrupt skipped)."""
    for leaf in exception_leaves(exc):
        if type(leaf).__name__ in ("Cancelled", "KeyboardInterrupt"):
            continue
        logger.error("%s: %s: %s", what, type(leaf).__name__, leaf, exc_info=leaf)

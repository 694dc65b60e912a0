"""The job market: gossip auctions, awards over ``/edgeswarm/job/1``, remote execution, receipts.

See ``docs/market.md`` for the messages and state machines (``protocols/``) this
package drives, and ``peer.market.service`` for the API.
"""

from peer.market.receipts import ReceiptBook, ReceiptHook
from peer.market.requester import JobFailed
from peer.market.service import (
    MICRO,
    InferResult,
    Lease,
    MarketService,
    MarketSettings,
    UnknownModel,
    open_market,
    to_micro,
)
from protocols.requester import DeadlineExceeded, ExecutorsFailed, MarketFailure, NoExecutors

__all__ = [
    "MICRO",
    "DeadlineExceeded",
    "ExecutorsFailed",
    "InferResult",
    "JobFailed",
    "Lease",
    "MarketFailure",
    "MarketService",
    "MarketSettings",
    "NoExecutors",
    "ReceiptBook",
    "ReceiptHook",
    "UnknownModel",
    "open_market",
    "to_micro",
]

"""Settlement: pays receipts, witnesses others' payments, spreads ledger facts.

One role per module:

* ``ledger_rpc``: the client side of ``/edgeswarm/ledger/1`` (wire in ``protocols.ledger_rpc``);
* ``payer``: ``Payer`` signs transfers and gets them certified;
* ``witness_server``: ``WitnessServer`` votes for others' transfers;
* ``fact_sync``: ``FactSync`` spreads facts (push, gossip, anti-entropy);
* ``server``: the stream handler that dispatches requests to those roles;
* ``service``: ``SettlementService`` wires them together (``open_settlement``,
  ``open_peer_settlement``).
"""

from peer.settlement.base import (
    LedgerFacts,
    PaymentFailed,
    SettlementConfig,
    SettlementError,
    Stats,
    SyncResult,
)
from peer.settlement.fact_sync import GOSSIP_TOPIC, FactSync
from peer.settlement.ledger_rpc import PROTOCOL_ID, LedgerClient
from peer.settlement.network import resolve_genesis
from peer.settlement.payer import Payer
from peer.settlement.service import (
    SettlementPeer,
    SettlementService,
    committee_rule_from_config,
    credit_policy_from_config,
    open_peer_settlement,
    open_settlement,
)
from peer.settlement.witness_server import WitnessServer
from peer.settlement_paths import NetworkError, known_networks, ledger_dir, network_dir
from protocols.ledger_rpc import MAX_FRAME

__all__ = [
    "GOSSIP_TOPIC",
    "MAX_FRAME",
    "PROTOCOL_ID",
    "FactSync",
    "LedgerClient",
    "LedgerFacts",
    "NetworkError",
    "Payer",
    "PaymentFailed",
    "SettlementConfig",
    "SettlementError",
    "SettlementPeer",
    "SettlementService",
    "Stats",
    "SyncResult",
    "WitnessServer",
    "committee_rule_from_config",
    "credit_policy_from_config",
    "known_networks",
    "ledger_dir",
    "network_dir",
    "open_peer_settlement",
    "open_settlement",
    "resolve_genesis",
]

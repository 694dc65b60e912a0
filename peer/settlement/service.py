"""The settlement service: one peer's payer, witness server and fact sync, wired together.

``open_settlement(peer, store)`` runs, in one nursery:

* the ``/edgeswarm/ledger/1`` stream handler (``server.LedgerServer``), answering
  ``certify`` (``witness_server.WitnessServer``: the lock is committed durably by
  the store *before* the vote is written back), ``push``, ``sync`` and ``get``
  (``fact_sync.FactSync``); the wire is ``protocols.ledger_rpc``;
* the payer (``payer.Payer``): ``pay(receipt)`` signs the next transfer, stores it,
  asks the committee in parallel (``ledger_rpc.LedgerClient``) and returns the
  certificate; with ``auto_pay`` every receipt this peer owes is paid in the
  background, and transfers left over from a crash are resent unchanged;
* gossip of certificates and proofs on ``GOSSIP_TOPIC`` (when the peer has pubsub)
  and anti-entropy with a random connected neighbour every ``sync_interval`` s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import nacl.signing
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.pubsub.pubsub import Pubsub

from peer import metrics
from peer.config import Config
from peer.host import retire_stream_handler
from peer.ledger_store import LedgerStore, fact_bytes, open_ledger_store
from peer.settlement.base import (
    LedgerFacts,
    SettlementConfig,
    SettlementError,
    Stats,
    SyncResult,
)
from peer.settlement.checkpointer import VOTES_DIR, Checkpointer, CheckpointVoteFiles
from peer.settlement.epochs import EpochFiles, EpochService, epoch_rules
from peer.settlement.fact_sync import FactSync
from peer.settlement.ledger_rpc import LedgerClient
from peer.settlement.network import GENESIS_PROTOCOL, resolve_genesis, serve_genesis
from peer.settlement.payer import Payer
from peer.settlement.pow_search import search_in_process
from peer.settlement.server import LedgerServer, StreamState
from peer.settlement.witness_server import WitnessServer
from peer.settlement_paths import NoNetwork, remember_network
from protocols.certificate import Certificate
from protocols.committee import CommitteeRule
from protocols.epochs import EpochRules
from protocols.errors import ProtocolError
from protocols.genesis import Genesis
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, IdentityProof, solve_pow
from protocols.ledger_state import FactKind, LedgerState
from protocols.market_fields import want_peer_id
from protocols.proofs import ArbitratedReceipt, FraudProof, PayableReceipt
from protocols.witness import Witness

log = logging.getLogger(__name__)

# Nonces searched per thread call while proving an identity (~40 ms of hashing).
POW_CHUNK = 1 << 16


class SettlementPeer(Protocol):
    """What settlement needs of a running peer (``peer.node.Peer`` is one)."""

    @property
    def host(self) -> IHost: ...
    @property
    def key(self) -> nacl.signing.SigningKey: ...
    @property
    def pubsub(self) -> Pubsub | None: ...
    @property
    def dht(self) -> KadDHT | None: ...


class SettlementService:
    """One peer's settlement: payer, witness, gossip and anti-entropy. Use ``open_settlement``."""

    def __init__(
        self,
        host: IHost,
        key: nacl.signing.SigningKey,
        store: LedgerStore,
        config: SettlementConfig,
        *,
        pubsub: Pubsub | None = None,
        dht: KadDHT | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.key = key
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self.store = store
        self.config = config
        self.clock = clock
        self.stats = Stats()
        self.facts = LedgerFacts(store)
        self.client = LedgerClient(
            host, self.peer_id, request_timeout=config.request_timeout, dht=dht
        )
        self.fact_sync = FactSync(
            host, self.peer_id, self.facts, self.client, config, self.stats, pubsub=pubsub
        )
        self.payer = Payer(
            key, self.facts, self.client, self.fact_sync.spread, config, self.stats, clock=clock
        )
        self.witness_server = WitnessServer(
            key, self.facts, self.fact_sync.spread, self.stats, now_ms=self.now_ms
        )
        self.server = LedgerServer(host, self.witness_server, self.fact_sync, config, self.stats)
        # Ledger checkpoints (peer/settlement/checkpointer.py); its interval is the genesis
        # epoch length (set by open_peer_settlement).
        self.checkpointer = Checkpointer(
            key,
            self.facts,
            self.client,
            self.fact_sync.spread,
            sync_with=self.fact_sync.sync_with,
            clock=clock,
            votes=CheckpointVoteFiles(Path(store.path).parent / VOTES_DIR),
        )
        self.fact_sync.checkpointer = self.checkpointer
        # Set once this identity has its proof-of-work (or needs none): it may then owe.
        self.identity_ready = trio.Event()
        self.payer.identity_ready = self.identity_ready
        # The network this ledger belongs to (set by open_peer_settlement).
        self.genesis: Genesis | None = None
        # Epoch checkpoints: committees drawn from the network's pool (protocols.epochs).
        self.epochs: EpochService | None = None
        rule = store.ledger.rule
        if isinstance(rule, EpochRules) and config.epochs_dir is not None:
            self.epochs = EpochService(
                host,
                key,
                self.facts,
                rule,
                EpochFiles(config.epochs_dir),
                min_earned=config.eligible_earned,
                stand=config.stand,
                sync_interval=config.sync_interval,
                clock=clock,
            )

    # --- state ----------------------------------------------------------------------------

    @property
    def ledger(self) -> LedgerState:
        return self.store.ledger

    @property
    def witness(self) -> Witness:
        return self.witness_server.witness

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def balances(self) -> dict[str, int]:
        return self.ledger.balances()

    def state_hash(self) -> bytes:
        return self.ledger.state_hash()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever a new fact lands."""
        await self.facts.wait_until(predicate)

    async def add_facts(
        self, items: Iterable[tuple[FactKind, bytes]]
    ) -> list[bool | ProtocolError]:
        """Verify and store facts (from anywhere); wakes waiters and the payer on news."""
        return await self.facts.add_facts(items)

    async def add(self, obj: Any) -> bool:
        return await self.facts.add(obj)

    # --- receipts and proofs from the market ----------------------------------------------

    async def ingest_receipt(self, receipt: PayableReceipt) -> bool:
        """A receipt from the job market (either side): verify, store, and if we owe it and
        ``auto_pay`` is on, pay it in the background. Returns True if it was new."""
        new = await self.facts.add(receipt)
        if receipt.requester == self.peer_id:
            self.payer.wake()
        return new

    async def on_market_receipt(self, receipt: PayableReceipt, role: str) -> None:
        """Hook for the job market: ``market.on_receipt.append(service.on_market_receipt)``.

        Both sides call it; the requester's side also pays (``auto_pay``)."""
        await self.ingest_receipt(receipt)

    async def ingest_fraud_proof(self, proof: FraudProof) -> bool:
        """A fraud proof found by this peer's spot checks: store it and spread it."""
        new = await self.facts.add(proof)
        if new:
            metrics.FRAUD_PROOFS.inc()
            self.fact_sync.spread([fact_bytes(proof)])
        return new

    async def settle_arbitrated(self, receipt: ArbitratedReceipt) -> int:
        """The executor's side of arbitration: a referee panel found our committed result
        right, but the requester never signed (it vanished, or refused). Verify and store
        the ``ArbitratedReceipt`` (from ``protocols.verification.decide``), then hand it to
        the requester's witnesses and the requester: until it is paid the witnesses certify
        no other payment of the requester, and the requester's payer pays it as soon as it
        holds it. Returns how many of them took it (the rest get it by anti-entropy)."""
        if receipt.executor != self.peer_id:
            raise SettlementError("only the executor settles its arbitrated receipt")
        await self.facts.add(receipt)  # verified against the job's referee panel
        targets = [*self.ledger.rule.committee_for(receipt.requester).members, receipt.requester]
        items = [fact_bytes(receipt)]
        delivered = 0

        async def deliver(peer_id: str) -> None:
            nonlocal delivered
            try:
                await self.client.push(peer_id, items)
                delivered += 1
            except SettlementError as exc:
                log.info("arbitrated receipt not delivered to %s yet: %s", peer_id[-8:], exc)

        async with trio.open_nursery() as nursery:
            for peer_id in dict.fromkeys(targets):
                if peer_id != self.peer_id:
                    nursery.start_soon(deliver, peer_id)
        return delivered

    # --- the roles' entry points ----------------------------------------------------------

    def unpaid(self) -> list[PayableReceipt]:
        """Receipts this peer owes that no certificate pays yet (arrival order)."""
        return self.payer.unpaid()

    async def pay(self, receipt: PayableReceipt) -> Certificate:
        """Pay ``receipt`` now; see ``Payer.pay``."""
        return await self.payer.pay(receipt)

    async def push(self, peer_id: str, items: list[tuple[FactKind, bytes]]) -> int:
        """Send facts to a peer; returns how many were new to it."""
        return await self.client.push(peer_id, items)

    async def sync_with(self, peer_id: str) -> SyncResult:
        """One anti-entropy session with ``peer_id``; see ``FactSync.sync_with``."""
        return await self.fact_sync.sync_with(peer_id)

    async def sync_random(self) -> SyncResult | None:
        return await self.fact_sync.sync_random()

    async def answer(self, data: bytes, state: StreamState | None = None) -> dict[str, Any]:
        """The reply to one request frame, as the stream handler would send it."""
        return await self.server.answer(data, state or StreamState())

    # --- lifecycle ------------------------------------------------------------------------

    def _stored_identity(self) -> IdentityProof | None:
        return self.ledger.identity_proof(self.peer_id)

    async def _solve_chunk(self, start: int) -> int | None:
        bits = self.ledger.policy.pow_bits
        return await trio.to_thread.run_sync(
            functools.partial(solve_pow, self.peer_id, bits, start=start, max_tries=POW_CHUNK)
        )

    async def _have_identity(self, nonce: int) -> None:
        proof = IdentityProof(self.peer_id, nonce)
        await self.facts.add(proof)
        self.client.identity = proof
        self.identity_ready.set()

    async def _prove_identity(self) -> None:
        """Background: search the identity proof-of-work in a child process (pure-Python
        hashing in a thread would hold the GIL and slow this peer's loop for as long), then
        store and use it. Cancelling kills the child."""
        bits = self.ledger.policy.pow_bits
        log.info("proving this identity (%d bits of proof-of-work, ~%.0e hashes)", bits, 2.0**bits)
        t0 = time.monotonic()
        # The first chunk was searched before start-up finished.
        nonce = await search_in_process(self.peer_id, bits, POW_CHUNK)
        if nonce is None:
            raise SettlementError(f"no identity proof of {bits} bits found")
        await self._have_identity(nonce)
        log.info("identity proof found in %.1f s", time.monotonic() - t0)

    async def _ensure_identity(self, nursery: trio.Nursery) -> None:
        """Our identity proof: stored, or found in the first chunk of nonces (cheap networks),
        or searched in the background (until then this peer may not owe anything)."""
        if self.peer_id in self.ledger.policy.genesis:
            self.identity_ready.set()
            return
        proof = self._stored_identity()
        if proof is not None:
            self.client.identity = proof
            self.identity_ready.set()
            return
        nonce = await self._solve_chunk(0)
        if nonce is not None:
            await self._have_identity(nonce)
        else:
            nursery.start_soon(self._prove_identity)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._ensure_identity(nursery)
                await nursery.start(self.server.run)
                if self.epochs is not None:
                    await nursery.start(self.epochs.run)
                await nursery.start(self.fact_sync.run)
                await nursery.start(self.payer.run)
                await nursery.start(self.checkpointer.run)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.client.close()


@asynccontextmanager
async def open_settlement(
    peer: SettlementPeer,
    store: LedgerStore,
    config: SettlementConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[SettlementService]:
    """Run settlement for ``peer`` (``.host``, ``.key``, ``.pubsub``, ``.dht``) over ``store``.

    Everything it starts stops when the block exits; the store stays open (its owner
    closes it after this)."""
    service = SettlementService(
        peer.host,
        peer.key,
        store,
        config or SettlementConfig(),
        pubsub=peer.pubsub,
        dht=peer.dht,
        clock=clock,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        try:
            yield service
        finally:
            nursery.cancel_scope.cancel()


def committee_rule_from_config(config: Any) -> CommitteeRule:
    """The network's committee rule from a ``peer.config.Config``: fallback witnesses are
    ``ledger_witnesses``, or the peer ids of the ``bootstrap`` addresses."""
    witnesses = set(config.ledger_witnesses)
    if not witnesses:
        for address in config.bootstrap:
            part = address.rsplit("/p2p/", 1)
            if len(part) == 2 and part[1]:
                witnesses.add(part[1])
    if not witnesses:
        raise SettlementError(
            "no ledger witnesses: set ledger_witnesses (EDGESWARM_LEDGER_WITNESSES) or give "
            "--bootstrap addresses, whose peers then witness payments"
        )
    for w in witnesses:
        want_peer_id("Config", "ledger_witnesses[]", w)
    return CommitteeRule(
        beacon=config.ledger_beacon.encode(), fallback=frozenset(witnesses), f=config.ledger_f
    )


def credit_policy_from_config(config: Any) -> CreditPolicy:
    """The network's credit policy: defaults, with ``ledger_base_limit`` credits for a new
    identity (every peer of a network must use the same value)."""
    return CreditPolicy(base_limit=round(config.ledger_base_limit * 1_000_000))


def warn_if_degraded(service: SettlementService) -> bool:
    """Log a warning when this identity's committee is smaller than 3f+1 (True if so)."""
    try:
        committee = service.ledger.rule.committee_for(service.peer_id)
    except ProtocolError:
        log.warning(
            "degraded witness committee: this peer is the network's only witness "
            "(f = 0): it certifies every payment, and its own cannot be certified"
        )
        return True
    if not committee.degraded:
        return False
    log.warning(
        "degraded witness committee: %d of %d witnesses (tolerates f = %d; %s), so %s "
        "certify every payment of this peer; `edgeswarm ledger status` shows it",
        committee.size,
        committee.target_size,
        committee.f,
        ", ".join(m[-8:] for m in committee.members),
        "one operator can" if committee.size == 1 else "fewer than 3f+1 witnesses",
    )
    return True


@asynccontextmanager
async def open_peer_settlement(
    peer: SettlementPeer,
    config: Config,
    *,
    policy: CreditPolicy | None = None,
    settings: SettlementConfig | None = None,
    optional: bool = False,
    genesis: Genesis | None = None,
    role: str = "peer",
) -> AsyncIterator[SettlementService | None]:
    """The network's ledger in ``config.data_dir`` + settlement service for a running ``peer``.

    ::

        async with (
            open_peer(config) as peer,
            open_market(peer) as market,
            open_peer_settlement(peer, config, optional=True) as settlement,
        ):
            if settlement is not None:
                market.on_receipt.append(settlement.on_market_receipt)

    The network is ``genesis``, else the one ``network.resolve_genesis`` finds (a
    genesis file, the ledger_witnesses setting, the network a bootstrap node founded,
    or the genesis the bootstrap nodes serve); its ledger is
    ``<data dir>/networks/<network id>/``, and this peer answers
    ``/edgeswarm/genesis/1`` with it while the block runs.

    ``optional``: when no network can be found (a lone peer with no bootstrap), log a
    warning and yield None instead of raising ``NetworkError``. A genesis that breaks
    the ``network`` pin is always an error.
    """
    source = "the caller"
    if genesis is None:
        try:
            genesis, source = await resolve_genesis(peer.host, config, role=role)
        except NoNetwork as exc:  # (a bad genesis or a broken pin is always an error)
            if not optional or config.network or config.genesis:
                raise
            log.warning("settlement is off: %s", exc)
            yield None
            return
    path = await trio.to_thread.run_sync(remember_network, config.data_dir, genesis)
    log.info(
        "settlement network %s (%s, from %s); ledger in %s",
        genesis.network_id[:16],
        genesis.name,
        source,
        path,
    )
    settings = settings or SettlementConfig(
        sync_interval=config.ledger_sync_interval,
        epochs_dir=path,
        stand=role == "peer",
        eligible_earned=genesis.eligible_earned,
    )
    rules = await trio.to_thread.run_sync(epoch_rules, genesis, path)
    serve_genesis(peer.host, genesis)
    try:
        async with (
            open_ledger_store(path, rules, policy or genesis.policy()) as store,
            open_settlement(peer, store, settings) as service,
        ):
            service.genesis = genesis
            service.checkpointer.interval_ms = genesis.epoch_ms
            warn_if_degraded(service)
            yield service
    finally:
        with contextlib.suppress(Exception):
            retire_stream_handler(peer.host, GENESIS_PROTOCOL)

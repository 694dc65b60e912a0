"""Builders for the settlement I/O tests: keys, signed receipts, certificates (pure witnesses)."""

from __future__ import annotations

import hashlib
import time

import nacl.signing

from protocols.certificate import Certificate, CertificateAssembler
from protocols.committee import CommitteeRule
from protocols.identity import peer_id_from_public_key
from protocols.ledger import CreditPolicy, Transfer, sign_transfer
from protocols.ledger_state import LedgerState
from protocols.receipt import Receipt, ResultCommitment, commit, content_digest
from protocols.signed import Signed
from protocols.witness import PersistLock, ReplyVote, Witness

CID = hashlib.sha256(b"model").hexdigest()
BEACON = b"test-beacon"


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"settle-key%d" % n).digest())


def pid(k: nacl.signing.SigningKey) -> str:
    return peer_id_from_public_key(bytes(k.verify_key))


def now_ms() -> int:
    return int(time.time() * 1000)


def make_receipt(
    requester: nacl.signing.SigningKey,
    executor: nacl.signing.SigningKey,
    price: int,
    job: int,
    *,
    output: bytes = b"out",
) -> Receipt:
    c = commit(
        executor,
        ResultCommitment(
            job_id=hashlib.sha256(b"job%d" % job).digest()[:16],
            requester=pid(requester),
            executor=pid(executor),
            model_cid=CID,
            input_digest=content_digest({"x": b"in%d" % job}),
            output_digest=content_digest({"y": output}),
            price=price,
            compute_ms=5,
        ),
    )
    return Receipt.create(requester, c)


def make_transfer(
    payer: nacl.signing.SigningKey, r: Receipt, seq: int, *, time_ms: int | None = None
) -> Signed[Transfer]:
    return sign_transfer(
        payer,
        Transfer(
            payer=pid(payer),
            payee=r.executor,
            amount=r.price,
            seq=seq,
            receipt_id=r.receipt_id,
            time_ms=now_ms() if time_ms is None else time_ms,
        ),
    )


GENESIS = frozenset(peer_id_from_public_key(bytes(key(n).verify_key)) for n in range(1, 10))


def policy(**over: object) -> CreditPolicy:
    """Keys 1..9 are genesis accounts (credit without PoW); others need an identity proof."""
    fields: dict[str, object] = {
        "base_limit": 1_000_000,
        "pow_bits": 4,
        "fraud_window_ms": 60_000,
        "genesis": GENESIS,
    }
    fields.update(over)
    return CreditPolicy(**fields)  # type: ignore[arg-type]


def rule_for(witnesses: list[nacl.signing.SigningKey], f: int = 1) -> CommitteeRule:
    return CommitteeRule(beacon=BEACON, fallback=frozenset(pid(k) for k in witnesses), f=f)


def certify_offline(
    witness_keys: list[nacl.signing.SigningKey],
    rule: CommitteeRule,
    pol: CreditPolicy,
    t: Signed[Transfer],
    r: Receipt,
    history: list[Certificate] = (),  # type: ignore[assignment]
) -> Certificate:
    """A certificate made by pure, in-memory witnesses (no network, no store)."""
    asm = CertificateAssembler(t, rule.committee_for(t.message.payer))
    for k in witness_keys:
        led = LedgerState(rule, pol)
        for c in history:
            led.ingest_certificate(c)
        led.ingest_payable(r)
        w = Witness(k)
        action = w.handle_transfer(t, r, led, t.message.time_ms)
        if isinstance(action, PersistLock):
            action = w.lock_persisted(action.record)
        assert isinstance(action, ReplyVote), action
        cert = asm.add_vote(action.vote)
        if cert is not None:
            return cert
    raise AssertionError("no quorum")


# --- running nodes (real libp2p hosts on 127.0.0.1) ----------------------------------------

from collections.abc import AsyncIterator, Callable  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from peer.config import Config  # noqa: E402
from peer.ledger_store import LedgerStore, open_ledger_store  # noqa: E402
from peer.node import Peer, open_peer  # noqa: E402
from peer.settlement import SettlementConfig, SettlementService, open_settlement  # noqa: E402


class FakeHardware:
    """What edge_models.hardware.probe() returns, without importing onnxruntime."""

    providers = ("CPUExecutionProvider",)

    def devices(self) -> list[dict[str, Any]]:
        return [{"kind": "cpu", "name": "test cpu", "memory": 2**30}]


@dataclass
class Node:
    peer: Peer
    store: LedgerStore
    svc: SettlementService

    @property
    def id(self) -> str:
        return self.peer.peer_id

    @property
    def addr(self) -> str:
        return self.peer.listen_addrs[0]


@asynccontextmanager
async def settlement_node(
    data_dir: Path,
    k: nacl.signing.SigningKey,
    rule: CommitteeRule,
    pol: CreditPolicy,
    config: SettlementConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Node]:
    cfg = Config(data_dir=data_dir, listen=("/ip4/127.0.0.1/tcp/0",))
    async with (
        open_peer(cfg, key=k, hardware=FakeHardware(), settlement=False) as peer,
        open_ledger_store(data_dir, rule, pol) as store,
        open_settlement(
            peer, store, config or SettlementConfig(sync_interval=0, gossip=False), clock=clock
        ) as svc,
    ):
        yield Node(peer, store, svc)


async def connect_all(nodes: list[Node]) -> None:
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            await a.peer.connect(b.addr)


async def wait_for(what: str, predicate: Any, nodes: list[Node], limit: float = 20.0) -> None:
    """Wait (event-driven, bounded) until ``predicate(node)`` holds on every node."""
    try:
        with trio.fail_after(limit):
            for n in nodes:
                await n.svc.wait_until(lambda n=n: predicate(n))
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {limit} s waiting for {what}") from None

"""The checkpointer: makes, signs and adopts ledger checkpoints (protocols/checkpoint.py).

Every ``interval_ms`` (a network-wide setting: the genesis epoch length) the designated
proposer of the round, a member of the next checkpoint's committee
(``checkpoint_committee(rule, epoch)``, round-robin by wall-clock round), syncs with the
other members, drafts the checkpoint from its ledger (cut: the last round boundary at
least one fraud window plus the clock skew in the past, so every payment it covers is out
of escrow), asks the members to vote (``ckpt_sign``) and, with a quorum, adopts it (the
store prunes what it covers) and spreads it like any network-wide fact. A member votes
only for a header it computes itself from its own facts, for the next epoch after the
checkpoint it adopted, with a cut of the current or the previous round.

Peers that are not members adopt a checkpoint they hold when they can compute it from
their facts; otherwise anti-entropy fetches its account rows (``FactSync.catch_up``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import nacl.signing
import trio

from peer.ledger_store import StoreError
from peer.settlement.base import LedgerFacts, SettlementError
from peer.settlement.ledger_rpc import LedgerClient
from protocols.checkpoint import (
    Checkpoint,
    CheckpointAssembler,
    CheckpointHeader,
    checkpoint_committee,
    open_checkpoint_vote,
    rule_id,
    sign_checkpoint,
)
from protocols.errors import ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger_rpc import SignCheckpoint, VoteReply
from protocols.ledger_state import FactKind

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 600_000  # the genesis default epoch length
MAX_MEMBER_SYNCS = 8  # members a proposer syncs with before drafting


class Checkpointer:
    """Proposes, votes for and adopts checkpoints of this peer's ledger."""

    def __init__(
        self,
        key: nacl.signing.SigningKey,
        facts: LedgerFacts,
        client: LedgerClient,
        spread: Callable[..., None],
        *,
        sync_with: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.time,
        interval_ms: int = DEFAULT_INTERVAL_MS,
    ) -> None:
        self.key = key
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self.facts = facts
        self.client = client
        self.spread = spread
        self.sync_with = sync_with
        self.clock = clock
        self.interval_ms = interval_ms
        self.made = 0  # checkpoints this peer proposed and got certified
        # The last draft computed, by (state hash, cut): a remote ``ckpt_sign`` costs a
        # read of every certificate it would cover, so repeated asks cost one draft.
        self._draft: tuple[tuple[bytes, int], CheckpointHeader] | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def cut_for(self, now_ms: int) -> int:
        """The round boundary a checkpoint made at ``now_ms`` cuts at (0: too early)."""
        pol = self.facts.ledger.policy
        safe = now_ms - pol.fraud_window_ms - pol.max_clock_skew_ms
        return max(0, safe // self.interval_ms * self.interval_ms)

    # --- member side ----------------------------------------------------------------------

    def answer_sign(self, req: SignCheckpoint) -> VoteReply:
        """Vote for ``req.header`` if this peer computes the very same header itself."""
        ledger = self.facts.ledger
        h = req.header
        if h.network != rule_id(ledger.rule):
            raise ValidationError("checkpoint is for another network")
        if self.peer_id not in checkpoint_committee(ledger.rule, h.epoch):
            raise ValidationError(f"not a member of the committee of checkpoint {h.epoch}")
        prev = ledger.checkpoint
        want = 1 if prev is None else prev.epoch + 1
        if h.epoch != want:
            raise ValidationError(f"checkpoint {h.epoch} asked, this peer is at {want}")
        cut = self.cut_for(self.now_ms())
        if h.cut_ms not in (cut, cut - self.interval_ms) or h.cut_ms <= 0:
            raise ValidationError(f"cut {h.cut_ms} is not this round's ({cut})")
        own = self.draft(h.cut_ms)
        if own.digest != h.digest:
            raise ValidationError(
                f"checkpoint {h.epoch} differs from this peer's ({own.covered_count} covered "
                f"vs {h.covered_count}): sync first"
            )
        return VoteReply(sign_checkpoint(self.key, h).to_bytes())

    def draft(self, cut_ms: int) -> CheckpointHeader:
        """``checkpoint_draft`` of this ledger at ``cut_ms``, computed once per ledger state."""
        ledger = self.facts.ledger
        key = (ledger.state_hash(), cut_ms)
        if self._draft is None or self._draft[0] != key:
            header, _ = ledger.checkpoint_draft(cut_ms, rule_id(ledger.rule))
            self._draft = (key, header)
        return self._draft[1]

    # --- proposer side --------------------------------------------------------------------

    async def step(self) -> Checkpoint | None:
        """One round: adopt what can be adopted; propose if it is this peer's turn."""
        ledger = self.facts.ledger
        now = self.now_ms()
        epoch = 1 if ledger.checkpoint is None else ledger.checkpoint.epoch + 1
        try:
            committee = checkpoint_committee(ledger.rule, epoch)
        except ProtocolError:
            return None
        if self.peer_id not in committee:
            return None
        turn = committee.members[(now // self.interval_ms) % committee.size]
        if turn != self.peer_id and committee.size > 1:
            return None
        cut = self.cut_for(now)
        prev = ledger.checkpoint
        if cut <= 0 or (prev is not None and cut <= prev.header.cut_ms):
            return None
        covered_before = 0 if prev is None else prev.header.covered_count
        if self.draft(cut).covered_count == covered_before:
            return None  # nothing new to cover here (checked before asking anyone anything)
        others = [m for m in committee.members if m != self.peer_id]
        if self.sync_with is not None:
            for member in others[:MAX_MEMBER_SYNCS]:  # bring everyone to the same facts
                try:
                    await self.sync_with(member)
                except SettlementError as exc:
                    log.debug("checkpoint: sync with %s failed: %s", member[-8:], exc)
        ledger = self.facts.ledger
        if ledger.checkpoint is not None and ledger.checkpoint.epoch >= epoch:
            return None  # someone else's checkpoint arrived meanwhile
        header = self.draft(cut)
        asm = CheckpointAssembler(ledger.rule, header)
        cp = asm.add_vote(sign_checkpoint(self.key, header))

        async def ask(member: str) -> None:
            nonlocal cp
            try:
                reply = await self.client.call(member, SignCheckpoint(header), VoteReply)
                got = asm.add_vote(open_checkpoint_vote(reply.vote))
            except (SettlementError, ProtocolError) as exc:
                log.info("checkpoint %d: no vote from %s: %s", epoch, member[-8:], exc)
                return
            cp = cp or got

        async with trio.open_nursery() as nursery:
            for member in others:
                nursery.start_soon(ask, member)
        if cp is None:
            return None
        try:
            await self.facts.store.adopt_checkpoint(cp)
        except (ProtocolError, StoreError) as exc:
            log.warning("checkpoint %d certified but not adopted: %s", epoch, exc)
            return None
        self.facts.notify()
        self.made += 1
        log.info(
            "checkpoint %d: %d certificates covered, %d accounts",
            cp.epoch,
            cp.header.covered_count,
            cp.header.n_accounts,
        )
        self.spread([(FactKind.CHECKPOINT, cp.to_bytes())], committee.members)
        return cp

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Once per round (jittered): ``step``."""
        task_status.started()
        while True:
            # At least a second apart, whatever the epoch length (tests use short epochs).
            await trio.sleep(max(1.0, self.interval_ms / 1000 * random.uniform(0.5, 1.0)))
            try:
                await self.step()
            except (SettlementError, StoreError, ProtocolError) as exc:
                log.warning("checkpoint round failed: %s", exc)

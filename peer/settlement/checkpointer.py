"""The checkpointer: makes, signs and adopts ledger checkpoints (protocols/checkpoint.py).

Every ``interval_ms`` (a network-wide setting: the genesis epoch length) the designated
proposer of the round, a member of the next checkpoint's committee
(``checkpoint_committee(rule, epoch, pool)``, drawn under the epoch checkpoint ``pool``
that payments are witnessed under now, so it outlives the genesis witnesses; round-robin
by wall-clock round), syncs with the other members, drafts the checkpoint from its ledger
(cut: the last round boundary at least one fraud window plus the clock skew in the past,
so every payment it covers is out of escrow), asks the members to vote (``ckpt_sign``)
and, with a quorum, adopts it (the store prunes what it covers) and spreads it like any
network-wide fact. A member votes
only for a header it computes itself from its own facts, for the next epoch after the
checkpoint it adopted, with a cut that is safe now, after the adopted one's and at most
``MAX_CUT_ROUNDS`` rounds old, and it votes for at most one header per checkpoint epoch
(``CheckpointVoteLock``; the header is fsync'd under ``<ledger dir>/checkpoint-votes/``
before the vote is sent, so the lock holds across restarts). A member locked on a header
proposes that header again each round until the epoch is certified, so a round that got
no quorum does not strand the members that voted in it.

Peers that are not members adopt a checkpoint they hold when they can compute it from
their facts; otherwise anti-entropy fetches its account rows (``FactSync.catch_up``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import trio

from peer.ledger_store import StoreError
from peer.settlement.base import LedgerFacts, SettlementError
from peer.settlement.ledger_rpc import LedgerClient
from peer.settlement_paths import write_atomic
from protocols.checkpoint import (
    Checkpoint,
    CheckpointAssembler,
    CheckpointHeader,
    CheckpointVote,
    CheckpointVoteLock,
    checkpoint_committee,
    open_checkpoint_vote,
    rule_id,
    sign_checkpoint,
)
from protocols.codec import decode
from protocols.errors import ProtocolError, ValidationError
from protocols.identity import peer_id_from_public_key
from protocols.ledger_rpc import SignCheckpoint, VoteReply
from protocols.ledger_state import FactKind
from protocols.signed import Signed

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 600_000  # the genesis default epoch length
MAX_MEMBER_SYNCS = 8  # members a proposer syncs with before drafting
MAX_CUT_ROUNDS = 16  # a member votes for a cut at most this many rounds old
VOTES_DIR = "checkpoint-votes"  # under the ledger's dir
MAX_STORED_VOTES = 64  # vote locks kept on disk (only the next epoch's ever matters)


class CheckpointVoteFiles:
    """This member's checkpoint vote locks on disk: ``<dir>/<epoch>`` holds the header it
    voted for, written atomically and fsync'd before the vote is sent."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def load(self) -> dict[int, CheckpointHeader | None]:
        """Every stored lock; one that cannot be read back locks its epoch against all."""
        if not self.dir.is_dir():
            return {}
        out: dict[int, CheckpointHeader | None] = {}
        for p in self.dir.iterdir():
            if not p.name.isdigit():
                continue
            epoch = int(p.name)
            try:
                raw = decode(p.read_bytes(), max_size=CheckpointHeader.MAX_BYTES)
                header = CheckpointHeader.from_body(raw)
            except (OSError, ProtocolError) as exc:
                log.warning("checkpoint vote lock %d unreadable, epoch refused: %s", epoch, exc)
                header = None
            out[epoch] = header if header is not None and header.epoch == epoch else None
        return out

    def save(self, header: CheckpointHeader) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / str(header.epoch), header.to_bytes())
        names = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())
        for old in names[:-MAX_STORED_VOTES]:
            (self.dir / str(old)).unlink(missing_ok=True)


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
        votes: CheckpointVoteFiles | None = None,
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
        # One vote per checkpoint epoch, durable when ``votes`` is given (None: in memory).
        self.votes = votes
        self.lock = CheckpointVoteLock(votes.load() if votes is not None else None)
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

    def vote(self, header: CheckpointHeader) -> Signed[CheckpointVote]:
        """This member's vote for ``header``: the lock is taken and persisted first."""
        if self.lock.lock(header) and self.votes is not None:
            try:
                self.votes.save(header)
            except OSError as exc:
                self.lock.unlock(header)
                raise ValidationError(f"cannot store the checkpoint vote: {exc}") from None
        return sign_checkpoint(self.key, header)

    def answer_sign(self, req: SignCheckpoint) -> VoteReply:
        """Vote for ``req.header`` if this peer computes the very same header itself."""
        ledger = self.facts.ledger
        h = req.header
        if h.network != rule_id(ledger.rule):
            raise ValidationError("checkpoint is for another network")
        prev = ledger.checkpoint
        now = self.now_ms()
        lowest = 0 if prev is None else prev.header.pool
        newest = ledger.rule.cp_for(now)
        if not lowest <= h.pool <= newest:
            raise ValidationError(
                f"checkpoint {h.epoch} is cast under epoch checkpoint {h.pool}, "
                f"not one of {lowest}..{newest}"
            )
        if self.peer_id not in checkpoint_committee(ledger.rule, h.epoch, h.pool):
            raise ValidationError(f"not a member of the committee of checkpoint {h.epoch}")
        want = 1 if prev is None else prev.epoch + 1
        if h.epoch != want:
            raise ValidationError(f"checkpoint {h.epoch} asked, this peer is at {want}")
        held = self.lock.locked.get(h.epoch)
        if held is not None and held.digest == h.digest:
            return VoteReply(sign_checkpoint(self.key, h).to_bytes())  # the vote it gave
        self.lock.check(h)  # another header of this epoch was voted for: refused
        cut = self.cut_for(now)
        oldest = cut - MAX_CUT_ROUNDS * self.interval_ms
        if not 0 < h.cut_ms <= cut or h.cut_ms < oldest:
            raise ValidationError(f"cut {h.cut_ms} is not this round's ({cut}) nor a recent one")
        if prev is not None and h.cut_ms <= prev.header.cut_ms:
            raise ValidationError(f"cut {h.cut_ms} is not after checkpoint {prev.epoch}'s")
        own = self.draft(h.cut_ms, h.pool)
        if own.digest != h.digest:
            raise ValidationError(
                f"checkpoint {h.epoch} differs from this peer's ({own.covered_count} covered "
                f"vs {h.covered_count}): sync first"
            )
        return VoteReply(self.vote(h).to_bytes())

    def draft(self, cut_ms: int, pool: int = 0) -> CheckpointHeader:
        """``checkpoint_draft`` of this ledger at ``cut_ms``, computed once per ledger state,
        to be signed by the committee of epoch checkpoint ``pool``."""
        ledger = self.facts.ledger
        key = (ledger.state_hash(), cut_ms)
        if self._draft is None or self._draft[0] != key:
            header, _ = ledger.checkpoint_draft(cut_ms, rule_id(ledger.rule))
            self._draft = (key, header)
        return dataclasses.replace(self._draft[1], pool=pool)

    # --- proposer side --------------------------------------------------------------------

    async def step(self) -> Checkpoint | None:
        """One round: adopt what can be adopted; propose if it is this peer's turn."""
        ledger = self.facts.ledger
        now = self.now_ms()
        epoch = 1 if ledger.checkpoint is None else ledger.checkpoint.epoch + 1
        locked = self.lock.locked.get(epoch)
        if epoch in self.lock.locked and locked is None:
            return None  # an unreadable lock: this member sits this epoch out
        # The committee of the epoch checkpoint payments are witnessed under now (the
        # genesis witnesses only until the pool has members), or the locked header's.
        pool = ledger.rule.cp_for(now) if locked is None else locked.pool
        try:
            committee = checkpoint_committee(ledger.rule, epoch, pool)
        except ProtocolError:
            return None
        if self.peer_id not in committee:
            return None
        turn = committee.members[(now // self.interval_ms) % committee.size]
        if locked is None and turn != self.peer_id and committee.size > 1:
            return None  # (a member locked on a header proposes it every round)
        cut = self.cut_for(now) if locked is None else locked.cut_ms
        prev = ledger.checkpoint
        if cut <= 0 or (prev is not None and cut <= prev.header.cut_ms):
            return None
        covered_before = 0 if prev is None else prev.header.covered_count
        if locked is None and self.draft(cut, pool).covered_count == covered_before:
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
        header = self.draft(cut, pool) if locked is None else locked
        asm = CheckpointAssembler(ledger.rule, header)
        try:
            cp = asm.add_vote(self.vote(header))
        except ValidationError as exc:  # it voted for another header meanwhile
            log.info("checkpoint %d: not proposing: %s", epoch, exc)
            return None

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
